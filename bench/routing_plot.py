"""TTFT against offered load, one panel per workload: where each contestant saturates."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.routing_stats import RunStats


def plot_ttft(
    runs: list[RunStats],
    workloads: Sequence[str],
    titles: Mapping[str, str],
    contestants: Sequence[str],
    path: Path,
) -> None:
    """Write a PNG: p50 (solid) and p90 (dashed) TTFT of each contestant at each offered load."""
    import matplotlib  # imported here: only the report needs it, and it is slow to import

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(
        1, len(workloads), figsize=(5 * len(workloads), 4.6), squeeze=False
    )
    colors = pyplot.get_cmap("tab10")
    for panel, workload in zip(axes[0], workloads, strict=True):
        for index, contestant in enumerate(contestants):
            mine = sorted(
                (
                    stats
                    for stats in runs
                    if (stats.workload, stats.contestant) == (workload, contestant)
                ),
                key=lambda stats: stats.rate,
            )
            rates = [stats.rate for stats in mine]
            for quantile, style in (("p50", "-"), ("p90", "--")):
                values = [getattr(stats.ttft, quantile) for stats in mine]
                panel.plot(
                    rates,
                    [math.nan if value is None else value for value in values],
                    style,
                    marker="o",
                    color=colors(index),
                    label=f"{contestant} {quantile}",
                )
        panel.set_title(titles.get(workload, workload))
        panel.set_xlabel("offered load (requests/s)")
        panel.set_ylabel("time to first token (s)")
        panel.set_yscale("log")
        panel.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(contestants), fontsize="small")
    figure.suptitle("Time to first token: p50 solid, p90 dashed (log scale)")
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
