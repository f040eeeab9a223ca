"""A batch as OTLP requests (`ExportMetricsServiceRequest` bytes), each under a size limit.

The messages are opentelemetry-proto's, and what they hold is what opentelemetry-exporter-otlp's `encode_metrics`
makes of the same batch: `tests/exporters/test_otlp_encode.py` checks that the serialized bytes are identical. The
SDK's encoder builds each message bottom-up, and a message handed to a constructor or appended is copied, so each
point was copied once per level on its way into the request: at 250 pods it cost more than collecting the batch
(110 ms for the cgroup receiver's 16,500 points in 11,250 metrics). Here sums and gauges are built in place, top
down (`add()`), and attribute lists are encoded once per distinct set (a resource's once per Resource object, as
receivers keep theirs across collections): 46 ms for the same batch. The SDK's own code still encodes what is rare
in podmeter's batches (histograms, exemplars, attribute values).

A batch larger than the limit is split between resources, each encoded once. A request that a gateway refuses
as too large is split again (`split_request`): between resources, or within a resource when it is alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes, _encode_instrumentation_scope
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import _encode_exemplars, _encode_metric
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1 import metrics_pb2 as pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PB2Resource
from opentelemetry.sdk.metrics.export import Gauge, Histogram, MetricsData, Sum

from podmeter.metrics import PerResource, utf8_safe

MAX_CACHED = 4096  # point attribute sets and scopes kept encoded (they are few: cpu modes, devices, directions)


def _encode_valid_attributes(attributes: Mapping[str, Any]) -> list:
    """The SDK's `_encode_attributes`, with keys and string values made `utf8_safe` first: protobuf refuses lone
    surrogates, and the SDK's encoder then logs a traceback and drops the attribute (a resource losing what tells
    it apart), at every export. Only called on cache misses."""
    def fix(v):
        if isinstance(v, str):
            return utf8_safe(v)
        if isinstance(v, list | tuple):
            return [fix(x) for x in v]
        return v

    if not all(k.isascii() and (v.isascii() if isinstance(v, str) else not isinstance(v, list | tuple))
               for k, v in attributes.items()):
        attributes = {fix(k): fix(v) for k, v in attributes.items()}
    return _encode_attributes(attributes)


class Encoder:
    """Encodes batches; keeps the encoded attributes of the resources (per Resource object, while it lives) and
    of the point attribute sets and scopes it meets (bounded: a full cache is emptied and filled again)."""

    def __init__(self) -> None:
        self._resources = PerResource()
        self._point_attributes: dict[tuple, list] = {}
        self._scopes: dict[Any, Any] = {}

    def requests(self, data: MetricsData, max_bytes: int) -> list[tuple[bytes, int]]:
        """(serialized request, points in it) for the batch, each request at most `max_bytes` unless a single
        resource is larger on its own."""
        # Messages are built in place, top-down (`add()`): a message given to a constructor or appended is copied,
        # so building bottom-up copied every point once per level (five times) on the way into the request.
        out: list[tuple[bytes, int]] = []
        request = ExportMetricsServiceRequest()
        size = points = 0
        for rm in data.resource_metrics:
            encoded = request.resource_metrics.add()
            n = self._fill_resource_metrics(encoded, rm)
            # a resource is one length-delimited entry of the request: its size, a tag and the length's varint
            own = encoded.ByteSize()
            own += 1 + _varint_size(own)
            if points and size + own > max_bytes:
                # over the limit with this resource: the request goes without it, and a new one starts with it
                moved = ExportMetricsServiceRequest()
                moved.resource_metrics.add().CopyFrom(encoded)
                del request.resource_metrics[-1]
                out.append((request.SerializeToString(), points))
                request, size, points = moved, 0, 0
            size += own
            points += n
        out.append((request.SerializeToString(), points))
        return out

    def _fill_resource_metrics(self, out: pb2.ResourceMetrics, rm) -> int:
        """One ResourceMetrics as the SDK encodes it, into `out`; returns the number of points."""
        resource = rm.resource
        out.resource.CopyFrom(self._resource(resource))
        out.schema_url = resource.schema_url
        points = 0
        for sm in rm.scope_metrics:
            scope = sm.scope
            encoded_scope = out.scope_metrics.add(schema_url=scope.schema_url if scope is not None else "")
            encoded_scope.scope.CopyFrom(self._scope(scope))
            add_metric = encoded_scope.metrics.add
            for metric in sm.metrics:
                points += self._fill_metric(add_metric(name=metric.name, description=metric.description,
                                                       unit=metric.unit), metric)
        return points

    def _fill_metric(self, out: pb2.Metric, metric) -> int:
        data = metric.data
        points = data.data_points
        if type(data) is Sum and points:
            out.sum.aggregation_temporality = data.aggregation_temporality
            out.sum.is_monotonic = data.is_monotonic
            add, start = out.sum.data_points.add, True
        elif type(data) is Gauge and points:
            add, start = out.gauge.data_points.add, False  # the SDK sends no start time on gauges
        else:
            # anything else (histograms, a metric with no points, a type this module does not know) as the SDK does
            _encode_metric(metric, out)
            if isinstance(data, Histogram):
                _clear_unknown_min_max(out)
            return len(points)
        attributes_of = self._point_attributes_of
        for p in points:
            value = p.value
            # the SDK's test: an int (a bool included) is as_int, anything else as_double
            if isinstance(value, int):
                encoded = add(start_time_unix_nano=p.start_time_unix_nano if start else 0,
                              time_unix_nano=p.time_unix_nano, as_int=value)
            else:
                encoded = add(start_time_unix_nano=p.start_time_unix_nano if start else 0,
                              time_unix_nano=p.time_unix_nano, as_double=value)
            if p.attributes:
                encoded.attributes.extend(attributes_of(p.attributes))
            if p.exemplars:  # podmeter's receivers make none
                encoded.exemplars.extend(_encode_exemplars(p.exemplars))
        return len(points)

    def _point_attributes_of(self, attributes: Mapping[str, Any]) -> list:
        try:
            key = tuple(attributes.items())
            encoded = self._point_attributes.get(key)
        except TypeError:  # a sequence value: not hashable, not cached
            return _encode_valid_attributes(attributes)
        if encoded is None:
            if len(self._point_attributes) >= MAX_CACHED:
                self._point_attributes.clear()
            encoded = self._point_attributes[key] = _encode_valid_attributes(attributes)
        return encoded

    def _resource(self, resource) -> PB2Resource:
        encoded = self._resources.get(resource)
        if encoded is None:
            encoded = PB2Resource(attributes=_encode_valid_attributes(resource.attributes))
            self._resources.put(resource, encoded)
        return encoded

    def _scope(self, scope):
        encoded = self._scopes.get(scope)
        if encoded is None:
            if len(self._scopes) >= MAX_CACHED:
                self._scopes.clear()
            encoded = self._scopes[scope] = _encode_instrumentation_scope(scope)
        return encoded


def split_request(data: bytes) -> list[tuple[bytes, int]] | None:
    """An encoded request as two requests, with their points: half its resources each, or for a single resource
    half its metrics (half the points of a single metric); None for a single point."""
    request = ExportMetricsServiceRequest.FromString(data)
    resources = request.resource_metrics
    if len(resources) >= 2:
        parts = [resources[:len(resources) // 2], resources[len(resources) // 2:]]
    elif resources:
        halves = _split_resource(resources[0])
        if halves is None:
            return None
        parts = [[half] for half in halves]
    else:
        return None
    out = []
    for part in parts:
        half = ExportMetricsServiceRequest(resource_metrics=part)
        points = sum(len(getattr(m, m.WhichOneof("data")).data_points) if m.WhichOneof("data") else 0
                     for rm in part for sm in rm.scope_metrics for m in sm.metrics)
        out.append((half.SerializeToString(), points))
    return out


def _split_resource(rm: pb2.ResourceMetrics) -> list[pb2.ResourceMetrics] | None:
    """One resource's metrics in two halves, each with the resource and its scopes: a gateway with a small
    request limit (a proxy's body limit) refuses a resource with many series as a whole."""
    metrics = [(i, m) for i, sm in enumerate(rm.scope_metrics) for m in sm.metrics]
    if len(metrics) == 1:  # one metric: its points in halves
        i, metric = metrics[0]
        kind = metric.WhichOneof("data")
        points = getattr(metric, kind).data_points if kind else []
        if len(points) < 2:
            return None
        out = []
        for chosen in (points[:len(points) // 2], points[len(points) // 2:]):
            half = pb2.ResourceMetrics()
            half.CopyFrom(rm)
            kept = getattr(half.scope_metrics[i].metrics[0], kind).data_points
            del kept[:]
            kept.extend(chosen)
            out.append(half)
        return out
    if len(metrics) < 2:
        return None
    out = []
    for group in (metrics[:len(metrics) // 2], metrics[len(metrics) // 2:]):
        half = pb2.ResourceMetrics(resource=rm.resource, schema_url=rm.schema_url)
        scopes: dict[int, pb2.ScopeMetrics] = {}
        for i, metric in group:
            if i not in scopes:
                sm = rm.scope_metrics[i]
                scopes[i] = half.scope_metrics.add(scope=sm.scope, schema_url=sm.schema_url)
            scopes[i].metrics.add().CopyFrom(metric)
        out.append(half)
    return out


def _clear_unknown_min_max(metric: pb2.Metric) -> None:
    """Histogram min/max are optional in OTLP; podmeter's receivers leave them NaN when unknown (kernel and
    cgroup histograms have no min/max). The SDK encoder would send NaN as if it were a value: unset it."""
    for dp in metric.histogram.data_points:
        if dp.HasField("min") and math.isnan(dp.min):
            dp.ClearField("min")
        if dp.HasField("max") and math.isnan(dp.max):
            dp.ClearField("max")


def _varint_size(n: int) -> int:
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size
