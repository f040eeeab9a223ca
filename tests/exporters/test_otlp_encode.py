"""The OTLP exporters' encoder (exporters/otlp/encode.py) against opentelemetry-exporter-otlp's `encode_metrics`:
the same bytes for the same batch, requests split between resources under the size limit, histogram min/max
that are unknown (NaN) left out, and resources encoded once per Resource object."""

from __future__ import annotations

import gc
import math

from cgroup.helpers import make_receiver
from cgroup.layouts import all_layouts, build
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics._internal.exemplar import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from exporters.otlp.encode import Encoder
from podmeter.metrics import MetricsBuilder, MetricSpec, count_points

COUNTER = MetricSpec("container.cpu.time", "sum", "s", "CPU time", ("cpu.mode",))
UPDOWN = MetricSpec("k8s.pod.count", "updowncounter", "{pod}", "Pods")
GAUGE = MetricSpec("container.memory.usage", "gauge", "By", "Memory")
HIST = MetricSpec("container.runqueue.latency", "histogram", "s", "Run-queue latency")


def mixed_batch(same_resources: bool = False) -> MetricsData:
    """Every shape podmeter's batches take: ints and floats, sums (monotonic or not), gauges, histograms,
    attribute values of every type on resources and points, several resources and scopes (with
    `same_resources`, the two scopes' batches are about the same three resources)."""
    out = []
    for scope, start in (("podmeter/receiver/a", 100), ("podmeter/receiver/b", 200)):
        b = MetricsBuilder(scope, start, time_ns=1_000)
        for i in range(3):
            res = {"k8s.pod.uid": f"uid-{i}" if same_resources else f"uid-{scope}-{i}", "container.id": f"c{i}", "k8s.pod.label.tier": "web", "n": i,
                   "ratio": 0.5 * i, "gpu": i % 2 == 0, "ids": ["a", "b"]}
            add = b.adder(res)
            add(COUNTER, 1.5 + i, {"cpu.mode": "user"})
            add(COUNTER, 2 + i, {"cpu.mode": "system"})
            add(UPDOWN, -3 + i)
            add(GAUGE, 4096 * i, {"numbers": [1, 2], "flag": True, "x": 1.25, "k": 7})
            b.add_histogram(HIST, [1, 2, 3], [0.001, 0.01], total=0.05, attributes={"cpu.mode": "user"},
                            resource=res, minimum=0.0005, maximum=0.02)
        out += b.build().resource_metrics
    return MetricsData(resource_metrics=out)


def sdk_bytes(data: MetricsData) -> bytes:
    return encode_metrics(data).SerializeToString()


def test_the_same_bytes_as_the_sdk_encoder():
    data = mixed_batch()
    [(encoded, points)] = Encoder().requests(data, 1 << 30)
    assert encoded == sdk_bytes(data)
    assert points == count_points(data)


def test_equal_resources_in_two_entries_are_both_kept():
    """The SDK's encoder keys its output by Resource, so of two entries with equal resources (two receivers'
    batches merged) it keeps only the last one's metrics; each entry is encoded here."""
    data = mixed_batch(same_resources=True)
    [(encoded, points)] = Encoder().requests(data, 1 << 30)
    ours = ExportMetricsServiceRequest.FromString(encoded)
    assert len(ours.resource_metrics) == 6 and points == count_points(data)
    assert len(encode_metrics(data).resource_metrics) == 3


def test_the_same_bytes_for_exemplars_and_empty_metrics():
    point = NumberDataPoint(attributes={"a": "1"}, start_time_unix_nano=1, time_unix_nano=2, value=3, exemplars=[
        Exemplar({"b": "2"}, 4.5, 5, span_id=6, trace_id=7)])
    metrics = [Metric("with.exemplar", "d", "1", Sum([point], AggregationTemporality.CUMULATIVE, True)),
               Metric("no.points", "d", "1", Gauge([]))]
    data = MetricsData([ResourceMetrics(Resource({"r": "1"}), [ScopeMetrics(InstrumentationScope("s", "1"),
                                                                            metrics, "")], "")])
    assert Encoder().requests(data, 1 << 30)[0][0] == sdk_bytes(data)


def test_the_same_bytes_on_a_cgroup_receivers_batch(tmp_path):
    layout = all_layouts()[1]
    receiver = make_receiver(cgroup_root=build(str(tmp_path), layout), proc_root=str(tmp_path / "noproc"))
    try:
        encoder = Encoder()
        for _ in range(2):  # the second time its resources' encodings come from the cache
            data = receiver.collect()
            assert encoder.requests(data, 1 << 30)[0][0] == sdk_bytes(data)
    finally:
        receiver.shutdown()


def test_a_large_batch_is_split_between_resources_under_the_limit():
    data = mixed_batch()
    whole = ExportMetricsServiceRequest.FromString(sdk_bytes(data))
    one_resource = max(rm.ByteSize() for rm in whole.resource_metrics) + 8
    limit = 2 * one_resource
    requests = Encoder().requests(data, limit)
    assert len(requests) >= 3
    decoded = [ExportMetricsServiceRequest.FromString(b) for b, _ in requests]
    assert all(len(b) <= limit for b, _ in requests)
    assert [rm for r in decoded for rm in r.resource_metrics] == list(whole.resource_metrics)
    assert sum(n for _, n in requests) == count_points(data)
    # a resource larger than the limit on its own still goes, alone
    alone = Encoder().requests(data, 10)
    assert len(alone) == len(data.resource_metrics)


def test_unknown_histogram_min_and_max_are_left_out():
    b = MetricsBuilder("s", 1, time_ns=2)
    b.add_histogram(HIST, [1, 1], [1.0], total=1.5, resource={"k8s.pod.uid": "u"})  # min/max NaN: unknown
    [(encoded, _)] = Encoder().requests(b.build(), 1 << 30)
    point = ExportMetricsServiceRequest.FromString(encoded).resource_metrics[0].scope_metrics[0].metrics[0] \
        .histogram.data_points[0]
    assert not point.HasField("min") and not point.HasField("max")
    assert point.sum == 1.5 and list(point.bucket_counts) == [1, 1]
    assert not math.isnan(point.sum)


def test_resources_are_encoded_once_per_object_while_it_lives():
    encoder = Encoder()
    resource = Resource({"k8s.pod.uid": "u"})
    b = MetricsBuilder("s", 1, time_ns=2)
    b.adder(resource)(GAUGE, 1)
    data = b.build()
    first = encoder.requests(data, 1 << 30)
    assert len(encoder._resources) == 1
    assert encoder.requests(data, 1 << 30) == first
    del data, b, resource
    gc.collect()
    assert len(encoder._resources) == 0


def test_attributes_that_are_not_utf8_are_replaced_not_dropped(caplog):
    """A lone surrogate (what Python's os and pwd functions make of bytes that are not UTF-8: a cgroup directory's
    name under ebpf's `non_pod_cgroups: keep`, a user name) cannot be encoded by protobuf: the SDK's encoder logged a
    traceback and dropped the attribute, at every export, and the resource lost what tells it apart. It becomes
    U+FFFD, as the prometheus exporter renders it; valid non-ASCII text is kept as it is."""
    b = MetricsBuilder("podmeter/receiver/ebpf", 1)
    b.add(COUNTER, 2.0, {"cpu.mode": "user", "tag\udcff": ["ok", "b\udcfead"], "name": "héllo"},
          resource={"cgroup.path": "/system.slice/b\udcffd.service", "k8s.pod.uid": "uid-1"})
    with caplog.at_level("DEBUG"):
        ((body, points),) = Encoder().requests(b.build(), 4 << 20)
    assert points == 1 and not [r for r in caplog.records if r.levelname in ("ERROR", "WARNING")]
    req = ExportMetricsServiceRequest.FromString(body)
    rm = req.resource_metrics[0]
    assert {a.key: a.value.string_value for a in rm.resource.attributes} == {
        "cgroup.path": "/system.slice/b\ufffdd.service", "k8s.pod.uid": "uid-1"}
    point = rm.scope_metrics[0].metrics[0].sum.data_points[0]
    attrs = {a.key: a.value for a in point.attributes}
    assert attrs["name"].string_value == "héllo" and attrs["cpu.mode"].string_value == "user"
    assert [v.string_value for v in attrs["tag\ufffd"].array_value.values] == ["ok", "b\ufffdad"]
