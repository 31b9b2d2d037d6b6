"""A Prometheus histogram fed a whole step's values at once (host only, no jax).

prometheus-client's ``Histogram.observe`` takes one value per call, with a lock, a label-child
lookup and a linear scan of the buckets; a 64-sequence decode step has 64 inter-token latencies.
``BatchHistogram.observe(values, labels)`` takes one lock per step and bins each value with a
C ``bisect`` into a plain list of counts. It is a custom collector (prometheus-client's
documented extension point): the exposition is built from the counts at scrape time, on the
scraping thread. Buckets are inclusive upper bounds (``le``), as Prometheus's.
"""

from __future__ import annotations

import itertools
import threading
from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class BatchHistogram:
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.bounds = sorted(float(b) for b in buckets)  # +Inf implied
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], list] = {}  # labels -> [counts per bucket (not cumulative), sum]
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, values: Sequence[float], labels: tuple[str, ...]) -> None:
        if not values:
            return
        bounds = self.bounds
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = [[0] * len(self._le), 0.0]
            counts = series[0]
            for v in values:
                counts[bisect_left(bounds, v)] += 1
            series[1] += sum(values)

    def count(self, labels: tuple[str, ...]) -> int:
        series = self._series.get(labels)
        return 0 if series is None else sum(series[0])

    # ----- the collector protocol (scrape thread) ------------------------------------
    def describe(self):
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self):
        with self._lock:
            snapshot = [(labels, list(counts), total) for labels, (counts, total) in self._series.items()]
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, counts, total in snapshot:
            family.add_metric(list(labels), list(zip(self._le, itertools.accumulate(counts))), sum_value=total)
        yield family
