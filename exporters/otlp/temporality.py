"""cumulative -> delta, for backends that want deltas (temporality_preference: delta).

Monotonic sums and histograms become the change since the previous point of the same series; gauges and
non-monotonic sums stay as they are (as the SDK's delta preference does for UpDownCounters). The first point of
a series only sets the baseline and is held back; a drop in value is a reset and sends the new value. Series not
seen for `forget_after` seconds are forgotten, so memory follows the live series.
"""

from __future__ import annotations

import time
from dataclasses import replace

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)

DELTA = AggregationTemporality.DELTA


def _key(*parts) -> tuple:
    return tuple(tuple(sorted((k, str(v)) for k, v in p.items())) if isinstance(p, dict) else p for p in parts)


class DeltaConverter:
    def __init__(self, forget_after: float = 900.0) -> None:
        self.forget_after = forget_after
        self._last: dict[tuple, tuple[float, object]] = {}  # series -> (monotonic seen, previous point)
        self._next_sweep = time.monotonic() + forget_after

    def __len__(self) -> int:
        return len(self._last)

    def convert(self, data: MetricsData) -> MetricsData:
        now = time.monotonic()
        out_rm = []
        for rm in data.resource_metrics:
            rattrs = dict(rm.resource.attributes)
            out_sm = []
            for sm in rm.scope_metrics:
                metrics = []
                for metric in sm.metrics:
                    d = metric.data
                    cumulative = getattr(d, "aggregation_temporality", None) == AggregationTemporality.CUMULATIVE
                    if not cumulative or (isinstance(d, Sum) and not d.is_monotonic):
                        metrics.append(metric)
                        continue
                    points = []
                    for p in d.data_points:
                        key = _key(rattrs, sm.scope.name, metric.name, dict(p.attributes or {}))
                        prev = self._last.get(key)
                        self._last[key] = (now, p)
                        if prev is not None:
                            points.append(_delta(prev[1], p, isinstance(d, Histogram)))
                    if points:
                        metrics.append(replace(metric, data=replace(d, data_points=points,
                                                                    aggregation_temporality=DELTA)))
                if metrics:
                    out_sm.append(ScopeMetrics(scope=sm.scope, metrics=metrics, schema_url=sm.schema_url))
            if out_sm:
                out_rm.append(ResourceMetrics(resource=rm.resource, scope_metrics=out_sm, schema_url=rm.schema_url))
        if now >= self._next_sweep:
            horizon = now - self.forget_after
            self._last = {k: v for k, v in self._last.items() if v[0] >= horizon}
            self._next_sweep = now + self.forget_after / 4
        return MetricsData(resource_metrics=out_rm)


def _delta(prev, cur, histogram: bool):
    if histogram:
        reset = cur.count < prev.count or len(cur.bucket_counts) != len(prev.bucket_counts)
        if reset:
            return cur
        # the interval's min and max are unknowable from two cumulative points: leave them unset (NaN)
        return replace(cur, start_time_unix_nano=prev.time_unix_nano, count=cur.count - prev.count,
                       sum=cur.sum - prev.sum, min=float("nan"), max=float("nan"),
                       bucket_counts=[a - b for a, b in zip(cur.bucket_counts, prev.bucket_counts, strict=True)])
    if cur.value < prev.value:  # counter reset: the new cumulative value is the delta since the reset
        return cur
    return replace(cur, start_time_unix_nano=prev.time_unix_nano, value=cur.value - prev.value)
