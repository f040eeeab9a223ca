"""cumulative -> delta, for backends that want deltas (temporality_preference: delta).

Monotonic sums and histograms become the change since the previous point of the same series; gauges and
non-monotonic sums stay as they are (as the SDK's delta preference does for UpDownCounters). Series not seen for
`forget_after` seconds are forgotten, so memory follows the live series.

The first point of a series is held back as the baseline, unless its start time is at or after the first
collection this converter saw from the same scope: then the series began while podmeter was watching (a new pod,
a cgroup made again), its cumulative value is all new and is sent whole, as the collector's cumulativetodelta
`initial_value: auto` does. (Receivers start before the exporter sees anything, so the exporter's own start time
cannot tell new series from old: the first collection of the scope can.)

A reset (a value going down, or a later start time: the OTLP data model's sign of a restarted cumulative) sends
the new cumulative value. Every delta point starts where the previous point of its series ended, or later, so a
backend summing deltas never sees two intervals overlap.
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
        self._epoch: dict[str, int] = {}  # scope name -> time_unix_nano of its first converted point
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
                        epoch = self._epoch.setdefault(sm.scope.name, p.time_unix_nano)
                        if prev is not None:
                            points.append(_delta(prev[1], p, isinstance(d, Histogram)))
                        elif epoch <= p.start_time_unix_nano < p.time_unix_nano:
                            points.append(p)  # began after this scope's first collection: all of it is new
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
    restarted = cur.start_time_unix_nano > prev.start_time_unix_nano  # a new start time is a reset (data model)
    if histogram:
        reset = restarted or cur.count < prev.count or len(cur.bucket_counts) != len(prev.bucket_counts) \
            or list(cur.explicit_bounds) != list(prev.explicit_bounds)
        if not reset:
            # the interval's min and max are unknowable from two cumulative points: leave them unset (NaN)
            return replace(cur, start_time_unix_nano=prev.time_unix_nano, count=cur.count - prev.count,
                           sum=cur.sum - prev.sum, min=float("nan"), max=float("nan"),
                           bucket_counts=[a - b for a, b in zip(cur.bucket_counts, prev.bucket_counts, strict=True)])
    elif not restarted and cur.value >= prev.value:
        return replace(cur, start_time_unix_nano=prev.time_unix_nano, value=cur.value - prev.value)
    # reset: the new cumulative value is the delta since the reset, which happened after the previous point (its
    # own start time, when the receiver knows it and it is later); starting it earlier would overlap the interval
    # already sent for the previous point
    return replace(cur, start_time_unix_nano=max(cur.start_time_unix_nano, prev.time_unix_nano))
