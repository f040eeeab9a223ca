"""otlphttp's `encoding` (the collector's key: proto, the default, or json); endpoints and header values no send can use.

A copied collector config saying `encoding: proto` was refused as an unknown key, and `encoding: json` could not be
had. The receiver here is the standard library's HTTP server decoding with protobuf's own JSON parser
(`json_format.Parse`): no OTLP/JSON receiver that follows the spec runs here (rotel accepts application/json but
drops every 64-bit integer sent as the spec's decimal string), so the spec's rules are checked on the raw JSON."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format
from harness import wait_for
from harness.otlp_http import HttpEndpoint
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms_pb2
from opentelemetry.sdk.metrics._internal.exemplar import Exemplar
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from exporters.otlp import grpc_factory, http_factory
from exporters.otlp.config import OTLPHttpConfig

FAST = {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": "20s"}


class JsonSink(HttpEndpoint):
    """OTLP/HTTP with JSON bodies: records (raw JSON tree, parsed request, headers); answers from `script`
    ((status, JSON body) pairs), then 200 with an empty response."""

    def __init__(self, script=()) -> None:
        self.script = list(script)
        self.got: list = []
        super().__init__(self._answer)

    def _answer(self, body: bytes, headers):
        status, reply = self.script.pop(0) if self.script else (200, {})
        if status == 200:
            request = json_format.Parse(body, ms_pb2.ExportMetricsServiceRequest())
            self.got.append((json.loads(body), request, dict(headers)))
        return status, {"Content-Type": "application/json"}, json.dumps(reply).encode()


def counter(kit, telemetry, what: str, **labels) -> float:
    return kit.sample(telemetry, f"podmeter_otlphttp_exporter_{what}_total", component="otlphttp", **labels)


def test_encoding_is_the_collectors_key_with_its_default():
    assert OTLPHttpConfig().encoding == "proto"
    assert OTLPHttpConfig(encoding="proto").encoding == "proto"
    assert OTLPHttpConfig(encoding="json").encoding == "json"
    with pytest.raises(ValueError, match="encoding"):
        OTLPHttpConfig(encoding="yaml")


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_json_encoding_follows_the_otlp_spec(compression, make_exporter, kit):
    """OTLP/JSON: lowerCamelCase keys, enums as integers, 64-bit integers as decimal strings, application/json;
    a JSON partial success counts its rejected points."""
    partial = {"partialSuccess": {"rejectedDataPoints": "2", "errorMessage": "2 points refused"}}
    sink = JsonSink([(200, partial)])
    try:
        exp, telemetry = make_exporter(http_factory, endpoint=sink.endpoint, encoding="json", compression=compression)
        exp.export(kit.batch([0, 1], step=1))
        wait_for(lambda: counter(kit, telemetry, "sent_metric_points") == 8, what="the batch")
    finally:
        sink.stop()
    assert counter(kit, telemetry, "dropped_metric_points", cause="rejected") == 2
    ((tree, request, headers),) = sink.got
    assert headers["Content-Type"] == "application/json"
    metrics = {m["name"]: m for m in tree["resourceMetrics"][0]["scopeMetrics"][0]["metrics"]}
    cpu = metrics[kit.CPU.name]["sum"]
    assert cpu["aggregationTemporality"] == 2 and cpu["isMonotonic"] is True
    assert isinstance(cpu["dataPoints"][0]["timeUnixNano"], str)
    assert metrics[kit.MEM.name]["sum"]["dataPoints"][0]["asInt"] == "1048576"
    assert metrics[kit.LAT.name]["histogram"]["dataPoints"][0]["bucketCounts"] == ["1", "2", "3"]
    pods = {a.value.string_value for rm in request.resource_metrics for a in rm.resource.attributes
            if a.key == "k8s.pod.uid"}
    assert pods == {"uid-0", "uid-1"}


def test_json_exemplar_ids_are_hex(make_exporter):
    """The spec's one departure from the proto3 JSON mapping that podmeter could meet: trace and span ids are hex
    strings, not base64."""
    point = NumberDataPoint(attributes={}, start_time_unix_nano=1, time_unix_nano=2, value=3, exemplars=[
        Exemplar({}, 4.5, 5, span_id=0x00F067AA0BA902B7, trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736)])
    data = MetricsData([ResourceMetrics(Resource({"r": "1"}), [ScopeMetrics(InstrumentationScope("s", "1"), [
        Metric("with.exemplar", "d", "1", Sum([point], AggregationTemporality.CUMULATIVE, True))], "")], "")])
    sink = JsonSink()
    try:
        exp, _ = make_exporter(http_factory, endpoint=sink.endpoint, encoding="json")
        exp.export(data)
        wait_for(lambda: sink.got, what="the batch")
    finally:
        sink.stop()
    tree = sink.got[0][0]
    exemplar = tree["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["sum"]["dataPoints"][0]["exemplars"][0]
    assert exemplar["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert exemplar["spanId"] == "00f067aa0ba902b7"


def test_json_error_status_is_decoded_for_the_log(make_exporter, kit, caplog):
    sink = JsonSink([(400, {"code": 3, "message": "unknown metric type"})])
    try:
        exp, telemetry = make_exporter(http_factory, endpoint=sink.endpoint, encoding="json")
        exp.export(kit.batch([0], step=1))
        wait_for(lambda: counter(kit, telemetry, "send_failed_metric_points") == 5, what="the batch to be dropped")
    finally:
        sink.stop()
    assert "HTTP 400 Bad Request: unknown metric type (not retryable)" in exp.telemetry.failing()[
        "send_failed:HTTP 400"]


@pytest.mark.parametrize("headers,problem", [
    ({"X-Team": "Zürich €"}, "header 'X-Team': the value must be printable ASCII"),
    ({"X-Team": "a\tb"}, "header 'X-Team': the value must be printable ASCII"),  # grpcio: "Illegal header value"
    ({"X!Team": "a"}, "header name 'X!Team': a gRPC metadata key has only"),  # a valid HTTP header name
])
def test_a_header_that_grpc_cannot_send_is_refused_naming_the_key(headers, problem):
    """These were accepted, then every batch was dropped at send time as INTERNAL "Invalid metadata", as if the
    backend had refused it (grpc-go, so the collector, refuses them as well)."""
    from podmeter.config import validate_component

    problems: list[str] = []
    validate_component(grpc_factory, {"headers": headers}, "exporters::otlp", problems)
    assert len(problems) == 1 and problems[0].startswith(f"exporters::otlp::headers: {problem}"), problems
    for factory in (grpc_factory, http_factory):
        ok: list[str] = []
        validate_component(factory, {"headers": {"Authorization": "Bearer a.b-c_d~e/f+g="}},
                           f"exporters::{factory.type}", ok)
        assert ok == []
    bad: list[str] = []
    validate_component(http_factory, {"headers": {"X-Team": "a\x00b"}}, "exporters::otlphttp", bad)
    assert bad == ["exporters::otlphttp::headers: header 'X-Team': the value must not hold control characters"]


def test_header_values_are_sent_as_the_collector_sends_them(kit, host):
    """otlphttp refused a value that is not ASCII (the collector sends its UTF-8 bytes), and a value with leading
    whitespace failed every send in requests (InvalidHeader), retried as if the backend were away. An otlp header
    whose key ends in -bin (gRPC binary metadata, which the collector sends as the value's bytes) failed every
    send with a TypeError. Each arrives at the real sink."""
    from harness.otlp import OTLPSink

    sink = OTLPSink().start()
    try:
        for factory, endpoint, headers in (
                (http_factory, sink.http_endpoint, {"X-Team": "Zürich €", "X-Lead": "  a b"}),
                (grpc_factory, sink.grpc_endpoint, {"X-Token-Bin": "Zürich"})):
            cid = factory.type
            exp, telemetry = kit.make(factory, {"endpoint": endpoint, "headers": headers, "retry_on_failure": FAST,
                                                "sending_queue": {"num_consumers": 1}})
            exp.start(host)
            try:
                exp.export(kit.batch([0], step=1))
                assert exp.force_flush(20_000)
            finally:
                exp.shutdown(timeout_millis=2000)
            assert kit.sample(telemetry, f"podmeter_{cid}_exporter_sent_metric_points_total", component=cid) == 5
    finally:
        sink.stop()
    http, grpc = sink.headers
    # http.server decodes header bytes as Latin-1
    assert http["x-team"].encode("latin-1").decode() == "Zürich €" and http["x-lead"] == "a b"
    assert grpc["x-token-bin"] == "Zürich".encode()


@pytest.mark.parametrize("factory,endpoint", [
    (http_factory, "http://"), (http_factory, "https://:4318"), (http_factory, "http://gw:43x8"),
    (http_factory, "http://gw:99999"), (http_factory, "http://otel gateway:4318"), (http_factory, ""),
    (grpc_factory, "gw:99999"), (grpc_factory, "otel gateway:4317"),
])
def test_an_endpoint_that_cannot_be_reached_by_any_send_is_refused(factory, endpoint):
    """These were accepted; then every batch failed in the HTTP client (InvalidURL, retried as if the backend were
    away, for max_elapsed_time) or in the gRPC channel (UNAVAILABLE, forever). An empty endpoint is what an unset
    ${env:...} leaves."""
    from podmeter.config import validate_component

    problems: list[str] = []
    validate_component(factory, {"endpoint": endpoint}, f"exporters::{factory.type}", problems)
    assert len(problems) == 1 and "endpoint" in problems[0], problems
    ok: list[str] = []
    for good in (["http://gw:4318/otlp", "https://[::1]:4318", "https://otlp.example.com"]
                 if factory is http_factory else ["gw:4317", "[::1]:4317", "https://gw:4317"]):
        validate_component(factory, {"endpoint": good}, f"exporters::{factory.type}", ok)
    assert ok == []


def test_a_grpc_dns_target_is_taken_as_the_collector_takes_it(kit, host):
    """`dns:///gateway:4317` (gRPC's name syntax, which the collector's otlp exporter accepts and its docs point
    to) was refused: "the scheme must be http:// or https://"."""
    from harness.otlp import OTLPSink

    from podmeter.config import validate_component

    ok: list[str] = []
    for good in ("dns:///otel-gateway.monitoring.svc:4317", "dns://10.0.0.10/gw:4317", "dns:///[::1]:4317"):
        validate_component(grpc_factory, {"endpoint": good}, "exporters::otlp", ok)
    assert ok == []
    bad: list[str] = []
    validate_component(grpc_factory, {"endpoint": "dns:///gw"}, "exporters::otlp", bad)
    assert len(bad) == 1 and "endpoint" in bad[0], bad
    sink = OTLPSink().start()
    try:
        exp, telemetry = kit.make(grpc_factory, {"endpoint": f"dns:///127.0.0.1:{sink.grpc_port}",
                                                 "tls": {"insecure": True}, "retry_on_failure": FAST,
                                                 "sending_queue": {"num_consumers": 1}})
        exp.start(host)
        try:
            exp.export(kit.batch([0], step=1))
            wait_for(lambda: kit.sample(telemetry, "podmeter_otlp_exporter_sent_metric_points_total",
                                        component="otlp") == 5, what="the batch")
        finally:
            exp.shutdown(timeout_millis=2000)
    finally:
        sink.stop()
    assert len(sink.requests) == 1
