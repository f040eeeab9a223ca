"""Metric definitions and a builder for opentelemetry-sdk `MetricsData`, the payload between stages.

Each component declares its metrics as `MetricSpec`s (the one source its README table is generated from) and
adds points through a `MetricsBuilder`, which groups them by resource and returns `MetricsData`.
"""

from __future__ import annotations

import dataclasses
import re
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


_KEPT = object()  # marks the bucket key of a Resource object passed as it is


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
        # resource key -> (resource attrs, metric name -> [points], metric name -> spec); two dicts rather than
        # one of (spec, points) pairs: a pair per metric per resource is one more object for the garbage collector
        self._resources: dict[tuple, tuple[dict, dict[str, list], dict[str, MetricSpec]]] = {}
        self._keys: dict[int, tuple[Mapping, tuple]] = {}
        self._last_resource: Mapping | None = None
        self._last_entry: tuple[dict, dict[str, list], dict[str, MetricSpec]] = ({}, {}, {})

    def _entry_of(self, resource: Mapping[str, Any] | Resource
                  ) -> tuple[dict | Resource, dict[str, list], dict[str, MetricSpec]]:
        # Receivers add a resource's points together with one dict: find its bucket by identity first, then by
        # a sorted key computed once per dict (the dict is held, so its id cannot be reused meanwhile).
        if resource is self._last_resource:
            return self._last_entry
        if isinstance(resource, Resource):
            # a Resource the receiver keeps across collections: used as it is (held by the entry, so its id
            # cannot be reused meanwhile), and downstream caches keyed by the object find it again
            key = (_KEPT, id(resource))
            entry = self._resources.get(key)
            if entry is None:
                entry = self._resources[key] = (resource, {}, {})
            self._last_resource, self._last_entry = resource, entry
            return entry
        memo = self._keys.get(id(resource))
        if memo is not None and memo[0] is resource:
            key = memo[1]
        else:
            key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in resource.items()))
            self._keys[id(resource)] = (resource, key)
        entry = self._resources.get(key)
        if entry is None:
            entry = self._resources[key] = (dict(resource), {}, {})
        self._last_resource, self._last_entry = resource, entry
        return entry

    def _bucket(self, spec: MetricSpec, resource: Mapping[str, Any]) -> list:
        _attrs, points, specs = self._last_entry if resource is self._last_resource else self._entry_of(resource)
        bucket = points.get(spec.name)
        if bucket is None:
            bucket = points[spec.name] = []
            specs[spec.name] = spec
        return bucket

    def add(self, spec: MetricSpec, value: int | float, attributes: Mapping[str, Any] | None = None,
            resource: Mapping[str, Any] | None = None, start_time_ns: int | None = None,
            time_ns: int | None = None) -> None:
        if value is None or not spec.enabled:
            return
        start = (start_time_ns or self._start) if spec.instrument != "gauge" else 0
        if time_ns and start > time_ns:
            # a point timed by its source (CRI's stats timestamps) from before the start we know: the interval ends
            # there, and OTLP wants start <= time
            start = time_ns
        self._bucket(spec, resource or {}).append(number_point(
            dict(attributes) if attributes else {},
            start,
            time_ns or self._time,
            value,
        ))

    def adder(self, resource: Mapping[str, Any] | Resource, start_time_ns: int | None = None) -> Callable[..., None]:
        """`add` bound to one resource, for receivers that add many points per resource: `adder(resource)(spec,
        value, attributes)` is `add(spec, value, attributes, resource)` with the resource's bucket found once.
        `resource` is a dict of attributes, or a Resource the receiver keeps across collections (used as it is).
        `start_time_ns`: the start of the resource's cumulative points, where it is not the builder's (a cgroup
        made after the receiver started, or made again).

        `attributes` is kept as given, not copied: pass a dict made for the point (or None).
        """
        _attrs, points, specs = self._entry_of(resource)
        start, now, point = start_time_ns or self._start, self._time, number_point

        def add(spec: MetricSpec, value: int | float | None, attributes: dict | None = None) -> None:
            if value is None or not spec.enabled:
                return
            bucket = points.get(spec.name)
            if bucket is None:
                bucket = points[spec.name] = []
                specs[spec.name] = spec
            bucket.append(point({} if attributes is None else attributes,
                                0 if spec.instrument == "gauge" else start, now, value))

        return add

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
        for resource, points, specs in self._resources.values():
            built = [make_metric(specs[name], bucket) for name, bucket in points.items() if bucket]
            if built:
                out.append(ResourceMetrics(
                    resource=resource if isinstance(resource, Resource) else Resource(resource),
                    scope_metrics=[ScopeMetrics(scope=self._scope, metrics=built, schema_url="")],
                    schema_url="",
                ))
        if not out:
            # An empty scope still tells exporters "this receiver now has nothing": the prometheus exporter
            # drops the series of the last pod that went away instead of keeping them until they expire.
            out.append(ResourceMetrics(resource=Resource({}), schema_url="",
                                       scope_metrics=[ScopeMetrics(scope=self._scope, metrics=[], schema_url="")]))
        return MetricsData(resource_metrics=out)


# The SDK's point types are frozen dataclasses: their generated __init__ goes through a keyword-argument call and
# sets each field with object.__setattr__ under a frozen check. Tens of thousands of points per collection make
# that a receiver's largest cost after reading; setting the fields directly builds the same object (same fields,
# equal, repr'd alike) in half the time. Fields are set one by one rather than through `obj.__dict__`, which
# would materialise a dict per object: one more object for the cyclic garbage collector to traverse, for each
# point. Where a future SDK changes a class's shape (slots, __post_init__, other fields) it is called as usual.
def _plain(cls: type, names: tuple[str, ...]) -> bool:
    try:
        fields = tuple(f.name for f in dataclasses.fields(cls))
    except TypeError:
        return False
    return fields == names and "__slots__" not in cls.__dict__ and not hasattr(cls, "__post_init__")


_FIELDS = {
    NumberDataPoint: ("attributes", "start_time_unix_nano", "time_unix_nano", "value", "exemplars"),
    Gauge: ("data_points",),
    Sum: ("data_points", "aggregation_temporality", "is_monotonic"),
    Metric: ("name", "description", "unit", "data"),
}
_PLAIN = {cls for cls, names in _FIELDS.items() if _plain(cls, names)}
_object_new = object.__new__
_set = object.__setattr__
# Points carry no exemplars: they all share one empty list (never appended to) instead of one list each, which
# would be one more allocation and one more object for the cyclic garbage collector per point.
_NO_EXEMPLARS: list = []


if NumberDataPoint in _PLAIN:
    def number_point(attributes: dict, start: int, now: int, value: int | float,
                      _new=_object_new, _cls=NumberDataPoint, _set=_set) -> NumberDataPoint:
        p = _new(_cls)
        _set(p, "attributes", attributes)
        _set(p, "start_time_unix_nano", start)
        _set(p, "time_unix_nano", now)
        _set(p, "value", value)
        _set(p, "exemplars", _NO_EXEMPLARS)
        return p
else:  # pragma: no cover - another SDK's shape
    def number_point(attributes: dict, start: int, now: int, value: int | float) -> NumberDataPoint:
        return NumberDataPoint(attributes=attributes, start_time_unix_nano=start, time_unix_nano=now, value=value)


if {Gauge, Sum, Metric} <= _PLAIN:
    # one call per metric, its data and the Metric made inline: a collection makes one per metric per resource
    # (11,000 at 250 pods)
    def make_metric(spec: MetricSpec, points: list, _new=_object_new, _set=_set, _gauge=Gauge, _sum=Sum,
                    _metric=Metric) -> Metric:
        instrument = spec.instrument
        if instrument == "gauge":
            data = _new(_gauge)
            _set(data, "data_points", points)
        elif instrument == "histogram":
            data = Histogram(data_points=points, aggregation_temporality=CUMULATIVE)  # rare: as usual
        else:
            data = _new(_sum)
            _set(data, "data_points", points)
            _set(data, "aggregation_temporality", CUMULATIVE)
            _set(data, "is_monotonic", instrument == "sum")
        m = _new(_metric)
        _set(m, "name", spec.name)
        _set(m, "description", spec.description)
        _set(m, "unit", spec.unit)
        _set(m, "data", data)
        return m
else:  # pragma: no cover - another SDK's shape
    def make_metric(spec: MetricSpec, points: list) -> Metric:
        if spec.instrument == "gauge":
            data = Gauge(data_points=points)
        elif spec.instrument == "histogram":
            data = Histogram(data_points=points, aggregation_temporality=CUMULATIVE)
        else:
            data = Sum(data_points=points, aggregation_temporality=CUMULATIVE, is_monotonic=spec.instrument == "sum")
        return Metric(name=spec.name, description=spec.description, unit=spec.unit, data=data)


# ---------------------------------------------------------------------------------------------------------
# Helpers for processors and exporters: SDK point types are frozen dataclasses, so transforms rebuild.


# Lone surrogates: what Python's os and pwd functions make of bytes that are not UTF-8 (a cgroup directory's name,
# a user name). Neither exposition can encode them (the text cannot be written as UTF-8; protobuf refuses it).
_SURROGATES = re.compile("[\ud800-\udfff]")


def utf8_safe(text: str) -> str:
    """`text` with lone surrogates as U+FFFD, as invalid bytes become when decoded; ASCII text as it is, at once."""
    return text if text.isascii() else _SURROGATES.sub("\ufffd", text)


class PerResource:
    """What a component derived from a Resource (an exporter's rendered labels, its encoded attributes), kept per
    Resource object for as long as that object lives. Resources are immutable, and receivers that keep theirs
    (nvml, cgroup) and the k8sattributes processor (which hands back the same enriched Resource while the pod table
    is unchanged) pass the same object collection after collection, so the work is done once. An entry goes with
    its Resource (a weak reference): the cache holds only resources something else still holds."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Any]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, resource) -> Any:
        entry = self._entries.get(id(resource))
        if entry is not None and entry[0]() is resource:
            return entry[1]
        return None

    def put(self, resource, value: Any) -> None:
        key, entries = id(resource), self._entries

        def gone(ref: weakref.ref) -> None:
            if entries.get(key, (None,))[0] is ref:  # not an entry a newer object with the same id made
                entries.pop(key, None)

        try:
            entries[key] = (weakref.ref(resource, gone), value)
        except TypeError:  # a resource type without weak references: not cached
            pass


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


def metrics_table(specs: Iterable[MetricSpec], prometheus_name: Callable[[MetricSpec], str] | None = None) -> str:
    """The Markdown table of a component's metrics, generated into its README; with `prometheus_name`, a column
    with each metric's name on the prometheus exporter (what a PromQL query or a dashboard spells)."""
    promql = prometheus_name is not None
    rows = ["| metric | " + ("Prometheus | " if promql else "") + "type | unit | attributes | description |",
            "| --- | " + ("--- | " if promql else "") + "--- | --- | --- | --- |"]
    for s in specs:
        attrs = ", ".join(f"`{a}`" for a in s.attributes) or "-"
        default = "" if s.enabled else " (off by default)"
        prom = f"`{prometheus_name(s)}` | " if promql else ""
        rows.append(f"| `{s.name}` | {prom}{s.instrument} | `{s.unit}` | {attrs} | {s.description}{default} |")
    return "\n".join(rows)
