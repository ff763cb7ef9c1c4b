"""The scale benchmark's pure parts: order checks, wrk's report, percentiles, the bytes of the
fake llama.cpp and of the simulated agents, and the marked sections of docs/benchmarks.md."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from bench import llamacpp_wire as wire
from bench.fake_agents import Fleet
from bench.order_check import check_order, inversions
from bench.routing_report import marked_sections
from bench.scale_measure import percentile
from bench.wrk import MARKER, lua_script, parse
from paddler import protocol


def _brute_force(values: list[int]) -> int:
    return sum(a > b for a, b in itertools.combinations(values, 2))


def test_sorted_sequences_have_no_inversions_and_reversed_ones_have_all_pairs() -> None:
    """The two extremes: FIFO gives 0, LIFO gives n(n-1)/2."""
    assert inversions(list(range(100))) == 0
    assert inversions(list(range(100, 0, -1))) == 100 * 99 // 2
    assert inversions([]) == 0


def test_inversions_match_counting_every_pair() -> None:
    """The merge sort count agrees with the O(n²) definition on shuffled input."""
    shuffler = random.Random(4)
    for size in (1, 2, 7, 64, 301):
        values = list(range(size))
        shuffler.shuffle(values)
        assert inversions(values) == _brute_force(values)


def test_local_swaps_within_the_window_are_not_counted_as_displaced_beyond_it() -> None:
    """Requests that raced within the serving window are displaced, but not beyond it."""
    arrived = [1, 0, 3, 2, 5, 4, 6, 7]
    check = check_order(arrived, window=2)
    assert check.inversions == 3
    assert check.max_displacement == 1
    assert check.displaced_beyond == 0


def test_a_request_overtaken_by_many_is_displaced_beyond_the_window() -> None:
    """A waiter left behind by the whole queue shows as one far displacement."""
    arrived = [*range(1, 20), 0]
    check = check_order(arrived, window=4)
    assert check.max_displacement == 19
    assert check.displaced_beyond == 1
    assert check.inverted_share == pytest.approx(19 / (20 * 19 / 2))


def test_wrk_results_are_read_from_the_scripts_json_line() -> None:
    """wrk's own report around the line is ignored; microseconds become seconds."""
    output = (
        "Running 2s test @ http://127.0.0.1:1\n  1 threads and 4 connections\n"
        f'{MARKER}{{"requests":2000,"duration_us":2000000,"bytes":1,"connect":0,"read":3,'
        '"write":0,"status":1,"timeout":0,"p50_us":500,"p90_us":900,"p99_us":1500,'
        '"max_us":4000,"mean_us":550.5}\nRequests/sec: 1000.00\n'
    )
    result = parse(output)
    assert result.requests_per_second == 1000.0
    assert result.p50 == pytest.approx(0.0005)
    assert result.p99 == pytest.approx(0.0015)
    assert result.error_count == 4


def test_wrk_output_without_the_json_line_is_an_error() -> None:
    """A wrk that failed before its done hook is reported, not read as zero requests."""
    with pytest.raises(ValueError, match="WRK_JSON"):
        parse("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_the_wrk_script_quotes_the_json_body_for_lua() -> None:
    """A body with quotes and backslashes survives Lua's single-quoted string."""
    script = lua_script("/completion", {"prompt": "it's \\ here"})
    assert 'wrk.body = \'{"prompt":"it\\\'s \\\\\\\\ here"}\'' in script


def test_the_fake_llamacpp_final_event_is_valid_json_with_timings() -> None:
    """The last event of a native stream parses, says stop, and carries timings."""
    final = json.loads(wire.final(20, 0, stream=True))
    assert final["stop"] is True
    assert final["tokens_predicted"] == 20
    assert final["generation_settings"]["stream"] is True
    assert "predicted_per_second" in final["timings"]
    props = json.loads(wire.props(8, 4096))
    assert props["total_slots"] == 8


def test_the_fake_llamacpp_frames_each_event_as_one_http_chunk() -> None:
    """A token event is one chunk whose size line matches its ``data: ...\\n\\n`` payload."""
    event = wire.token_event(3)
    size, _, rest = event.partition(b"\r\n")
    assert rest.endswith(b"\n\n\r\n")
    assert int(size, 16) == len(rest) - 2
    assert json.loads(rest[len(b"data: ") : -4])["tokens_predicted"] == 3


def test_simulated_agents_send_frames_the_balancer_parses_with_the_slots_asked() -> None:
    """Busy reports no idle slot, free every slot idle; both are valid protocol v1 statuses."""
    fleet = Fleet(slots=4, busy=True)
    busy = protocol.parse_agent_message(fleet.frame())
    assert isinstance(busy, protocol.Status)
    assert (busy.slots_idle, busy.slots_processing) == (0, 4)
    fleet.set_busy(False)
    free = protocol.parse_agent_message(fleet.frame())
    assert isinstance(free, protocol.Status)
    assert (free.slots_idle, free.slots_processing) == (4, 0)
    assert fleet.version == 1


def test_percentiles_are_nearest_rank_and_nan_without_values() -> None:
    """p50 of 1..100 is 50, p99 is 99, and an empty cell reads as NaN, not 0."""
    values = [float(n) for n in range(100, 0, -1)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert math.isnan(percentile([], 50))


def test_every_benchmarks_marked_section_is_found_for_the_overhead_rewrite() -> None:
    """The overhead benchmark rewrites docs/benchmarks.md: each marked section survives it."""
    document = (
        "# Benchmarks\n\nold overhead text\n"
        "<!-- routing:begin -->\nR\n<!-- routing:end -->\n\n"
        "<!-- scale-before:begin -->\nB\n<!-- scale-before:end -->\ntrailing\n"
    )
    assert marked_sections(document) == [
        "<!-- routing:begin -->\nR\n<!-- routing:end -->",
        "<!-- scale-before:begin -->\nB\n<!-- scale-before:end -->",
    ]
