"""Counters and histograms of requests, counted in plain numbers and read at scrape time.

Every proxied request counts once in ``paddler_requests`` and observes up to three histograms
(``prometheus_metrics``). prometheus_client's ``Counter`` and ``Histogram`` are made for any
thread: each ``inc`` or ``observe`` takes a lock, checks its arguments and, for a histogram,
walks its buckets in Python, one lock per bucket counted. The balancer counts on its event loop
alone, and so is the scrape, so these keep a series as a number (a counter) or a list of counts
per bucket (a histogram, whose bucket is found by ``bisect``), and turn them into
prometheus_client's families only when ``/metrics`` asks. What a scraper reads is the same:
names, labels, buckets (``le``), ``_sum``, ``_count`` and ``_created``, series in the order they
first counted.

A series is created by its first count; label values are the caller's to bound (``routes``).

Measured with callgrind: the Prometheus observer's three hooks of a request took 50 k
instructions with prometheus_client's metrics and take 18 k with these (in process); in the
balancer, 54 k of a small request's instructions before, 18 k after
(``python -m bench.profile_proxy instructions``, with and without the observer).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

Key = tuple[str, ...]
"""A series' label values, in the order of the metric's label names."""


class RequestCounter:
    """A counter by label values (``prometheus_client.Counter``'s samples)."""

    __slots__ = ("_created", "_documentation", "_labelnames", "_name", "_values")

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._values: dict[Key, int] = {}
        self._created: dict[Key, float] = {}

    def count(self, key: Key) -> None:
        """One more in the series ``key``."""
        values = self._values
        if key in values:
            values[key] += 1
        else:
            values[key] = 1
            self._created[key] = time.time()

    def describe(self) -> Iterator[Metric]:
        yield Metric(self._name, self._documentation, "counter")

    def collect(self) -> Iterator[Metric]:
        family = Metric(self._name, self._documentation, "counter")
        total, created = self._name + "_total", self._name + "_created"
        for key, value in self._values.items():
            labels = dict(zip(self._labelnames, key, strict=True))
            family.add_sample(total, labels, value)
            family.add_sample(created, labels, self._created[key])
        yield family


class _Series:
    __slots__ = ("counts", "created", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.sum = 0.0
        self.created = time.time()


class RequestHistogram:
    """A histogram by label values (``prometheus_client.Histogram``'s samples)."""

    __slots__ = ("_bounds", "_documentation", "_labelnames", "_name", "_series")

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Iterable[float]
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        bounds = sorted(float(bound) for bound in buckets)
        if not bounds or bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self._bounds = tuple(bounds)
        self._series: dict[Key, _Series] = {}

    def observe(self, key: Key, value: float) -> None:
        """``value`` in the series ``key``: its bucket is the first whose bound it does not
        exceed, as prometheus_client's."""
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(len(self._bounds))
        series.counts[bisect_left(self._bounds, value)] += 1
        series.sum += value

    def describe(self) -> Iterator[Metric]:
        yield Metric(self._name, self._documentation, "histogram")

    def collect(self) -> Iterator[Metric]:
        name = self._name
        family = Metric(name, self._documentation, "histogram")
        bounds = [floatToGoString(bound) for bound in self._bounds]  # type: ignore[no-untyped-call]
        for key, series in self._series.items():
            labels = dict(zip(self._labelnames, key, strict=True))
            cumulative = 0
            for bound, count in zip(bounds, series.counts, strict=True):
                cumulative += count
                family.add_sample(name + "_bucket", {**labels, "le": bound}, cumulative)
            family.add_sample(name + "_count", labels, cumulative)
            if self._bounds[0] >= 0:
                family.add_sample(name + "_sum", labels, series.sum)
            family.add_sample(name + "_created", labels, series.created)
        yield family
