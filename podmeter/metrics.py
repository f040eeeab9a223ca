"""Metric definitions and a builder for opentelemetry-sdk `MetricsData`, the payload between stages.

Each component declares its metrics as `MetricSpec`s (the one source its README table is generated from) and
adds points through a `MetricsBuilder`, which groups them by resource and returns `MetricsData`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from podmeter import __version__

Instrument = Literal["sum", "updowncounter", "gauge", "histogram"]
CUMULATIVE = AggregationTemporality.CUMULATIVE


@dataclass(frozen=True)
class MetricSpec:
    """One metric a component emits.

    instrument: "sum" (monotonic counter), "updowncounter" (non-monotonic sum), "gauge" or "histogram".
    attributes: the data point attribute keys it carries (documentation; not enforced).
    """

    name: str
    instrument: Instrument
    unit: str
    description: str
    attributes: tuple[str, ...] = ()
    enabled: bool = True


def empty() -> MetricsData:
    return MetricsData(resource_metrics=[])


def now_ns() -> int:
    return time.time_ns()


class MetricsBuilder:
    """Collects points for one collection and builds `MetricsData`.

    Cumulative sums use `start_time_ns` (the receiver's start) unless a point gives its own, as the
    collector's host metrics scrapers do.
    """

    def __init__(self, scope_name: str, start_time_ns: int, scope_version: str = __version__,
                 time_ns: int | None = None) -> None:
        self._scope = InstrumentationScope(scope_name, scope_version)
        self._start = start_time_ns
        self._time = time_ns or now_ns()
        # resource key -> (resource attrs, metric name -> (spec, [points]))
        self._resources: dict[tuple, tuple[dict, dict[str, tuple[MetricSpec, list]]]] = {}
        self._keys: dict[int, tuple[Mapping, tuple]] = {}
        self._last_resource: Mapping | None = None
        self._last_metrics: dict[str, tuple[MetricSpec, list]] = {}

    def _bucket(self, spec: MetricSpec, resource: Mapping[str, Any]) -> list:
        # Receivers add a resource's points together with one dict: find its bucket by identity first, then by
        # a sorted key computed once per dict (the dict is held, so its id cannot be reused meanwhile).
        if resource is self._last_resource:
            metrics = self._last_metrics
        else:
            memo = self._keys.get(id(resource))
            if memo is not None and memo[0] is resource:
                key = memo[1]
            else:
                key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in resource.items()))
                self._keys[id(resource)] = (resource, key)
            entry = self._resources.get(key)
            if entry is None:
                entry = self._resources[key] = (dict(resource), {})
            metrics = entry[1]
            self._last_resource, self._last_metrics = resource, metrics
        slot = metrics.get(spec.name)
        if slot is None:
            slot = metrics[spec.name] = (spec, [])
        return slot[1]

    def add(self, spec: MetricSpec, value: int | float, attributes: Mapping[str, Any] | None = None,
            resource: Mapping[str, Any] | None = None, start_time_ns: int | None = None,
            time_ns: int | None = None) -> None:
        if not spec.enabled or value is None:
            return
        self._bucket(spec, resource or {}).append(NumberDataPoint(
            attributes=dict(attributes or {}),
            start_time_unix_nano=start_time_ns or self._start if spec.instrument != "gauge" else 0,
            time_unix_nano=time_ns or self._time,
            value=value,
        ))

    def add_histogram(self, spec: MetricSpec, bucket_counts: Sequence[int], explicit_bounds: Sequence[float],
                      total: float, count: int | None = None, attributes: Mapping[str, Any] | None = None,
                      resource: Mapping[str, Any] | None = None, start_time_ns: int | None = None,
                      minimum: float = float("nan"), maximum: float = float("nan")) -> None:
        if not spec.enabled:
            return
        if len(bucket_counts) != len(explicit_bounds) + 1:
            raise ValueError(f"{spec.name}: {len(bucket_counts)} buckets for {len(explicit_bounds)} bounds")
        self._bucket(spec, resource or {}).append(HistogramDataPoint(
            attributes=dict(attributes or {}),
            start_time_unix_nano=start_time_ns or self._start,
            time_unix_nano=self._time,
            count=sum(bucket_counts) if count is None else count,
            sum=total,
            bucket_counts=list(bucket_counts),
            explicit_bounds=list(explicit_bounds),
            min=minimum,
            max=maximum,
        ))

    def build(self) -> MetricsData:
        out = []
        for resource, metrics in self._resources.values():
            built = [make_metric(spec, points) for spec, points in metrics.values() if points]
            if built:
                out.append(ResourceMetrics(
                    resource=Resource(resource),
                    scope_metrics=[ScopeMetrics(scope=self._scope, metrics=built, schema_url="")],
                    schema_url="",
                ))
        if not out:
            # An empty scope still tells exporters "this receiver now has nothing": the prometheus exporter
            # drops the series of the last pod that went away instead of keeping them until they expire.
            out.append(ResourceMetrics(resource=Resource({}), schema_url="",
                                       scope_metrics=[ScopeMetrics(scope=self._scope, metrics=[], schema_url="")]))
        return MetricsData(resource_metrics=out)


def make_metric(spec: MetricSpec, points: list) -> Metric:
    if spec.instrument == "gauge":
        data = Gauge(data_points=points)
    elif spec.instrument == "histogram":
        data = Histogram(data_points=points, aggregation_temporality=CUMULATIVE)
    else:
        data = Sum(data_points=points, aggregation_temporality=CUMULATIVE,
                   is_monotonic=spec.instrument == "sum")
    return Metric(name=spec.name, description=spec.description, unit=spec.unit, data=data)


# ---------------------------------------------------------------------------------------------------------
# Helpers for processors and exporters: SDK point types are frozen dataclasses, so transforms rebuild.


def iter_points(data: MetricsData) -> Iterator[tuple[ResourceMetrics, ScopeMetrics, Metric, Any]]:
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    yield rm, sm, metric, point


def count_points(data: MetricsData | None) -> int:
    if data is None:
        return 0
    return sum(len(m.data.data_points) for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics)


def with_points(metric: Metric, points: Iterable[Any]) -> Metric:
    return replace(metric, data=replace(metric.data, data_points=list(points)))


def with_resource(rm: ResourceMetrics, attributes: Mapping[str, Any]) -> ResourceMetrics:
    return ResourceMetrics(resource=Resource(dict(attributes), rm.resource.schema_url),
                           scope_metrics=rm.scope_metrics, schema_url=rm.schema_url)


def merge(batches: Iterable[MetricsData]) -> MetricsData:
    return MetricsData(resource_metrics=[rm for b in batches if b is not None for rm in b.resource_metrics])


def metrics_table(specs: Iterable[MetricSpec]) -> str:
    """The Markdown table of a component's metrics, generated into its README."""
    rows = ["| metric | type | unit | attributes | description |", "| --- | --- | --- | --- | --- |"]
    for s in specs:
        attrs = ", ".join(f"`{a}`" for a in s.attributes) or "-"
        default = "" if s.enabled else " (off by default)"
        rows.append(f"| `{s.name}` | {s.instrument} | `{s.unit}` | {attrs} | {s.description}{default} |")
    return "\n".join(rows)
