"""--log-format json writes one JSON object per line."""

from __future__ import annotations

import asyncio
import json

from tests.support.llamacpp import stop_process
from tests.support.processes import paddler_process


async def test_json_log_lines_parse_and_carry_the_standard_fields() -> None:
    """Every line the balancer writes with --log-format json is a JSON object."""
    process = await paddler_process(
        "balancer", "--log-format=json", "--management-port=0", "--reverseproxy-port=0"
    )
    assert process.stderr is not None
    try:
        async with asyncio.timeout(20):
            lines = [json.loads(await process.stderr.readline()) for _ in range(3)]
    finally:
        await stop_process(process)
    assert [line["message"].split(" listening")[0].split(":")[0] for line in lines] == [
        "event loop",
        "management",
        "reverseproxy",
    ]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert lines[0]["level"] == "INFO"
