"""``--workers``: the balancer's limits shared out among its workers."""

from __future__ import annotations

from paddler.balancer.worker import share


def test_a_limit_is_shared_out_rounding_up_so_that_none_is_lost() -> None:
    """N workers' shares add up to the whole limit or a little more, never less, and a
    worker always gets at least one."""
    assert share(2048, 1) == 2048
    assert share(2048, 4) == 512
    assert share(2049, 4) == 513
    assert share(3, 4) == 1
    for total in range(1, 200):
        for workers in range(1, 9):
            assert share(total, workers) * workers >= total
            assert (share(total, workers) - 1) * workers < total
