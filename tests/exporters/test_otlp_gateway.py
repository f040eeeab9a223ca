"""What a gateway answers, and what a config copied from the collector's otlp / otlphttp exporters means here.

The servers are real (grpcio's server on opentelemetry-proto's official servicer, the standard library's HTTP
server) and script their answers the way the collector's receiver and the OTLP spec shape them: gRPC status codes
with RetryInfo as a detail of the google.rpc.Status (`grpc-status-details-bin`), HTTP errors with a protobuf
google.rpc.Status body, partial successes."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf.any_pb2 import Any
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from harness import wait_for
from harness.otlp import OTLPSink
from harness.otlp_http import HttpEndpoint
from harness.tls import make_certs
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms_pb2

from exporters.otlp import grpc_factory, http_factory


class _GrpcStatus(grpc.Status):
    def __init__(self, code, details, trailing_metadata):
        self.code, self.details, self.trailing_metadata = code, details, trailing_metadata


class ScriptedGrpcSink(OTLPSink):
    """The real sink, answering its first requests from `script`: (code, retry delay in seconds or None) as a
    status, or an ExportMetricsServiceResponse (a partial success) after recording the request."""

    def __init__(self, script) -> None:
        super().__init__()
        self.script = list(script)
        self.attempts = 0

    def Export(self, request, context):  # noqa: N802 - the generated servicer's name
        with self.cond:
            self.attempts += 1
            step = self.script.pop(0) if self.script else None
        if isinstance(step, ms_pb2.ExportMetricsServiceResponse):
            self._record(request, dict(context.invocation_metadata()))
            return step
        if step is not None:
            code, delay = step
            status = Status(code=code.value[0], message=f"scripted {code.name}")
            if delay is not None:  # as grpc-go's status.WithDetails(&errdetails.RetryInfo{...}) sends it
                detail = Any()
                detail.Pack(RetryInfo(retry_delay={"seconds": int(delay), "nanos": int(delay % 1 * 1e9)}))
                status.details.append(detail)
            context.abort_with_status(_GrpcStatus(code, status.message,
                                                  (("grpc-status-details-bin", status.SerializeToString()),)))
        return super().Export(request, context)


def counter(kit, telemetry, cid: str, what: str) -> float:
    return kit.sample(telemetry, f"podmeter_{cid}_exporter_{what}_total", component=cid)


@pytest.mark.parametrize("code,delay,retried", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 0.1, True),  # throttled: the server says when to come back
    (grpc.StatusCode.RESOURCE_EXHAUSTED, None, False),  # e.g. a message over the server's size limit
    (grpc.StatusCode.UNAVAILABLE, 0.1, True),
    (grpc.StatusCode.UNAVAILABLE, None, True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, None, True),
    (grpc.StatusCode.PERMISSION_DENIED, None, False),
    (grpc.StatusCode.INVALID_ARGUMENT, None, False),
])
def test_grpc_status_codes_are_retried_or_dropped_as_the_collector_does(code, delay, retried, make_exporter, kit):
    sink = ScriptedGrpcSink([(code, delay)]).start()
    try:
        exp, telemetry = make_exporter(grpc_factory, endpoint=sink.grpc_endpoint)
        exp.export(kit.batch([0], step=1))
        if retried:
            sink.wait_for(lambda pts: len(pts) == 5)
            assert counter(kit, telemetry, "otlp", "retries") == 1
            assert counter(kit, telemetry, "otlp", "send_failed_metric_points") == 0
        else:
            wait_for(lambda: counter(kit, telemetry, "otlp", "send_failed_metric_points") == 5,
                     what="the batch to be dropped")
            assert sink.attempts == 1 and counter(kit, telemetry, "otlp", "retries") == 0
            assert f"send_failed:{code.name}" in exp.telemetry.failing()
    finally:
        sink.stop()


def test_partial_success_counts_rejected_points_and_logs_warnings_once(make_exporter, kit, caplog):
    rejected = ms_pb2.ExportMetricsServiceResponse()
    rejected.partial_success.rejected_data_points = 2
    rejected.partial_success.error_message = "2 points had no name"
    warning = ms_pb2.ExportMetricsServiceResponse()
    warning.partial_success.error_message = "metric names will be truncated"
    too_many = ms_pb2.ExportMetricsServiceResponse()
    too_many.partial_success.rejected_data_points = 99  # a server counting differently from us
    sink = ScriptedGrpcSink([rejected, warning, warning, too_many]).start()
    try:
        exp, telemetry = make_exporter(grpc_factory, endpoint=sink.grpc_endpoint)
        with caplog.at_level(logging.INFO):
            for step in range(1, 5):
                exp.export(kit.batch([0], step=step))
                wait_for(lambda s=step: len(sink.requests) == s, what=f"batch {step}")
            assert exp.force_flush(5000)
    finally:
        sink.stop()
    assert counter(kit, telemetry, "otlp", "sent_metric_points") == 3 + 5 + 5 + 0
    assert kit.sample(telemetry, "podmeter_otlp_exporter_dropped_metric_points_total", component="otlp",
                      cause="rejected") == 2 + 5
    assert counter(kit, telemetry, "otlp", "send_failed_metric_points") == 0  # none failed as a whole
    text = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("2 points had no name" in t for t in text) == 1
    assert sum("metric names will be truncated" in t for t in text) == 1  # a warning: logged, once
    assert not any("internal" in t for t in text)


class ScriptedHttpSink(HttpEndpoint):
    """An OTLP/HTTP receiver answering its first requests from `script` (status, headers, body); then 200."""

    def __init__(self, script, max_body: int = 0) -> None:
        self.script = list(script)
        self.max_body = max_body  # larger bodies are answered 413, as a proxy's body limit does
        self.requests: list = []
        super().__init__(self._answer)

    def _answer(self, body: bytes, headers):
        status, reply_headers, reply = self.script.pop(0) if self.script else (200, {}, b"")
        if self.max_body and int(headers.get("Content-Length", 0)) > self.max_body:  # the body as sent
            status, reply_headers, reply = 413, {}, b"request entity too large"
        if status == 200:
            self.requests.append(ms_pb2.ExportMetricsServiceRequest.FromString(body))
        return status, reply_headers, reply


def test_http_error_body_is_decoded_as_a_google_rpc_status(make_exporter, kit, caplog):
    """The collector's OTLP/HTTP receiver answers 400 with a protobuf google.rpc.Status: its message is what the
    log says, not the raw protobuf bytes."""
    body = Status(code=3, message="unknown metric type for container.cpu.time").SerializeToString()
    sink = ScriptedHttpSink([(400, {"Content-Type": "application/x-protobuf"}, body)])
    try:
        exp, telemetry = make_exporter(http_factory, endpoint=sink.endpoint)
        with caplog.at_level(logging.WARNING):
            exp.export(kit.batch([0], step=1))
            wait_for(lambda: counter(kit, telemetry, "otlphttp", "send_failed_metric_points") == 5,
                     what="the batch to be dropped")
    finally:
        sink.stop()
    (line,) = [r.getMessage() for r in caplog.records if "send_failed:HTTP 400" in r.getMessage()]
    assert "HTTP 400 Bad Request: unknown metric type for container.cpu.time (not retryable)" in line, line


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_tls_without_ca_file_trusts_the_system_store_as_the_collector(proto, make_exporter, kit, tmp_path,
                                                                      monkeypatch):
    """A gateway whose CA is in the system trust store (here: $SSL_CERT_FILE, which Go, so the collector, and
    OpenSSL honour) is trusted without tls.ca_file. grpcio's bundled roots and requests' certifi bundle are not
    the system's: a private CA installed on the node failed every send."""
    certs = make_certs(tmp_path)
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        monkeypatch.delenv(var, raising=False)  # not set in a pod; some CI machines set them
    monkeypatch.setenv("SSL_CERT_FILE", certs.ca)
    sink = OTLPSink(certs=certs).start()
    try:
        factory = grpc_factory if proto == "grpc" else http_factory
        exp, telemetry = make_exporter(factory, endpoint=sink.grpc_endpoint if proto == "grpc" else sink.http_endpoint)
        exp.export(kit.batch([0], step=1))
        sink.wait_for(lambda pts: len(pts) == 5, timeout=15)
    finally:
        sink.stop()



def test_a_tls_connection_closed_in_the_handshake_is_retried(make_exporter, kit, tmp_path):
    """otlphttp took every TLS error for a configuration error and dropped the batch: a load balancer or proxy
    closing connections while the gateway behind it restarts (EOF in the handshake) lost every batch of the
    outage, where the collector retries. Here a listener on the gateway's port accepts and closes, then the real
    TLS sink takes the port. A certificate the client does not trust is still given up at once."""
    import socket
    import threading

    certs = make_certs(tmp_path)
    sink = OTLPSink(certs=certs)
    closer = socket.create_server(("127.0.0.1", sink.http_port))

    def close_all():
        while True:
            try:
                conn, _ = closer.accept()
            except OSError:  # the listener was closed
                return
            conn.close()

    threading.Thread(target=close_all, daemon=True).start()
    try:
        exp, telemetry = make_exporter(http_factory, endpoint=sink.http_endpoint, tls={"ca_file": certs.ca})
        exp.export(kit.batch([0], step=1))
        wait_for(lambda: counter(kit, telemetry, "otlphttp", "retries") >= 1, what="a retry")
        closer.shutdown(socket.SHUT_RDWR)  # wakes the accept(), which holds the port until it returns
        closer.close()
        sink.start()
        sink.wait_for(lambda pts: len(pts) == 5, timeout=15)
        assert counter(kit, telemetry, "otlphttp", "send_failed_metric_points") == 0
        untrusting, telemetry = make_exporter(http_factory, endpoint=sink.http_endpoint)  # no ca_file
        untrusting.export(kit.batch([0], step=2))
        wait_for(lambda: counter(kit, telemetry, "otlphttp", "send_failed_metric_points") == 5,
                 what="the batch to be given up")
        assert counter(kit, telemetry, "otlphttp", "retries") == 0
    finally:
        closer.close()
        sink.stop()


_SPREAD_AGENT = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
from conftest import batch, make
from exporters.otlp import grpc_factory
from podmeter.component import Host
exp, _ = make(grpc_factory, {{"endpoint": "http://gw:{port}", "sending_queue": {{"num_consumers": 1}}}})
exp.start(Host())
for step in range(20):
    exp.export(batch([0], step=step))
print("flushed", exp.force_flush(20_000), flush=True)
exp.shutdown(2000)
"""


def test_requests_are_spread_over_the_gateways_a_name_resolves_to(tmp_path):
    """The collector's otlp exporter balances over every address of its endpoint (balancer_name defaults to
    round_robin): a headless Service's gateway pods share the load. grpcio's default, pick_first, sent everything
    to the first address. Here `gw` resolves to two real gRPC receivers (127.0.0.1 and 127.0.0.2, same port)
    through an /etc/hosts of the agent's own mount namespace."""
    import os
    import subprocess
    import sys
    from concurrent import futures

    from harness import free_port, require_binary, require_root
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as ms_grpc

    require_root()
    unshare = require_binary("unshare")
    hits = {"127.0.0.1": 0, "127.0.0.2": 0}

    class Receiver(ms_grpc.MetricsServiceServicer):
        def __init__(self, address: str) -> None:
            self.address = address

        def Export(self, request, context):  # noqa: N802 - the generated servicer's name
            hits[self.address] += 1
            return ms_pb2.ExportMetricsServiceResponse()

    port = free_port()
    servers = []
    try:
        for address in hits:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            ms_grpc.add_MetricsServiceServicer_to_server(Receiver(address), server)
            server.add_insecure_port(f"{address}:{port}")
            server.start()
            servers.append(server)
        hosts = tmp_path / "hosts"
        hosts.write_text("127.0.0.1 localhost\n127.0.0.1 gw\n127.0.0.2 gw\n")
        tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        script = tmp_path / "agent.py"
        script.write_text(_SPREAD_AGENT.format(root=os.path.dirname(tests), tests=os.path.join(tests, "exporters"),
                                               port=port))
        done = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c",
                               f'mount --bind "{hosts}" /etc/hosts && exec "{sys.executable}" "{script}"'],
                              capture_output=True, text=True, timeout=60)
    finally:
        for server in servers:
            server.stop(0)
    assert "flushed True" in done.stdout, done.stderr[-2000:]
    assert sum(hits.values()) == 20 and all(hits.values()), hits


def test_delta_first_points_resets_and_start_times(make_exporter, kit):
    """temporality_preference: delta, as the gateway receives it. A series already running at the first collection
    is the baseline (held back); one that began later (a new pod: the cgroup receiver starts it at the previous
    collection) is sent whole, as the collector's cumulativetodelta `initial_value: auto` does; a reset, by a drop
    in value or by a new start time (a restarted container whose counter passed its old value), sends the new
    value; no two points of a series cover overlapping intervals."""
    from podmeter.metrics import MetricsBuilder

    s = kit.START_NS
    t = [s + k * 10_000_000_000 for k in range(5)]  # collections at t[1]..t[4], 10 s apart

    def collection(k: int, points: dict):
        b = MetricsBuilder("podmeter/receiver/cgroup", s, time_ns=t[k])
        for pod, (start, value) in points.items():
            b.add(kit.CPU, float(value), {"cpu.mode": "user"}, resource=kit.pod_resource(pod), start_time_ns=start)
            b.add_histogram(kit.LAT, [int(value), 0, 0], [0.001, 0.01], total=value, resource=kit.pod_resource(pod),
                            start_time_ns=start)
        return b.build()

    sink = OTLPSink().start()
    try:
        exp, _ = make_exporter(grpc_factory, endpoint=sink.grpc_endpoint, temporality_preference="delta")
        exp.export(collection(1, {0: (s, 100)}))
        exp.export(collection(2, {0: (s, 105), 1: (t[1], 7)}))  # pod 1 is new
        exp.export(collection(3, {0: (s, 2), 1: (t[2], 9)}))  # pod 0's counter went back; pod 1 restarted
        exp.export(collection(4, {0: (s, 4), 1: (t[2], 10)}))
        assert exp.force_flush(10_000)
        sink.wait_for(lambda pts: len(pts) >= 2 * 5)
    finally:
        sink.stop()
    got: dict[tuple, list] = {}
    for req in sink.requests:
        for rm in req.resource_metrics:
            pod = next(a.value.string_value for a in rm.resource.attributes if a.key == "k8s.pod.uid")
            for m in (m for sm in rm.scope_metrics for m in sm.metrics):
                data = m.sum if m.name == kit.CPU.name else m.histogram
                assert data.aggregation_temporality == 1  # delta
                for dp in data.data_points:
                    value = dp.as_double if m.name == kit.CPU.name else dp.count
                    got.setdefault((pod, m.name), []).append((dp.start_time_unix_nano, dp.time_unix_nano, value))
    expected = {
        "uid-0": [(t[1], t[2], 5), (t[2], t[3], 2), (t[3], t[4], 2)],
        "uid-1": [(t[1], t[2], 7), (t[2], t[3], 9), (t[3], t[4], 1)],
    }
    for pod, series in expected.items():
        assert got[(pod, kit.CPU.name)] == series, pod
        assert got[(pod, kit.LAT.name)] == series, pod
    for series in got.values():
        assert all(start < end for start, end, _ in series)
        assert all(later[0] >= earlier[1] for earlier, later in zip(series, series[1:], strict=False))


def test_collector_settings_without_an_equivalent_are_refused_naming_the_key():
    """Keys copied from a collector config either work or stop validation with their path; none is ignored. The
    collector's `sending_queue.storage` names a storage extension: taken as a path it became a directory relative
    to the agent's working directory, silently."""
    from podmeter.config import validate_component

    problems: list[str] = []
    validate_component(grpc_factory, {
        "endpoint": "otel-gateway:4317", "balancer_name": "round_robin", "keepalive": {"time": "30s"},
        "auth": {"authenticator": "oauth2client"}, "compression": "zstd",
        "tls": {"server_name_override": "gw", "min_version": "1.3"},
        "sending_queue": {"storage": "file_storage/otc"}}, "exporters::otlp", problems)
    validate_component(http_factory, {"endpoint": "https://gw:4318", "compression": "snappy"},
                       "exporters::otlphttp", problems)
    validate_component(grpc_factory, {"tls": {"insecure_skip_verify": True}}, "exporters::otlp", problems)
    text = "\n".join(problems)
    for key in ("otlp::balancer_name", "otlp::keepalive", "otlp::auth", "otlp::compression",
                "otlp::tls::server_name_override", "otlp::tls::min_version", "otlphttp::compression"):
        assert f"exporters::{key}: " in text, key
    assert "exporters::otlp::sending_queue::storage: must be an absolute directory path" in text
    assert "tls::insecure_skip_verify is not supported by the gRPC exporter" in text
    ok: list[str] = []
    validate_component(grpc_factory, {"sending_queue": {"storage": "/var/lib/podmeter/queue"}}, "exporters::otlp", ok)
    assert ok == []


def test_defaults_are_the_collectors():
    """A config copied from a collector behaves the same where it leaves a key out. The collector's otlphttp
    exporter gives its HTTP client 30 s (connect, send and read the reply); the otlp exporter's exporterhelper
    timeout is 5 s. podmeter's otlphttp had 5 s: a gateway answering a large batch in 6 s got it resent, forever."""
    from exporters.otlp.config import OTLPGrpcConfig, OTLPHttpConfig

    grpc, http = OTLPGrpcConfig(), OTLPHttpConfig()
    assert (grpc.timeout, http.timeout) == (5.0, 30.0)
    assert grpc.compression == http.compression == "gzip"
    assert (grpc.sending_queue.queue_size, grpc.sending_queue.num_consumers) == (1000, 10)
    assert (grpc.retry_on_failure.initial_interval, grpc.retry_on_failure.max_interval,
            grpc.retry_on_failure.max_elapsed_time) == (5.0, 30.0, 300.0)


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_a_gateway_with_a_smaller_request_limit_gets_smaller_requests(proto, make_exporter, kit):
    """A gateway refusing our request size (a collector with max_recv_msg_size_mib below 3, a proxy's body limit
    answering 413) got every batch dropped, forever; the batch is sent in parts under its limit instead."""
    limit = 6_000
    if proto == "grpc":
        sink = OTLPSink(max_receive_message_length=limit).start()
        stop, endpoint, requests = sink.stop, sink.grpc_endpoint, sink.requests
    else:
        sink = ScriptedHttpSink([], max_body=limit)
        stop, endpoint, requests = sink.stop, sink.endpoint, sink.requests
    try:
        factory = grpc_factory if proto == "grpc" else http_factory
        cid = "otlp" if proto == "grpc" else "otlphttp"
        exp, telemetry = make_exporter(factory, endpoint=endpoint, compression="none")
        exp.export(kit.batch(range(20), step=1))
        wait_for(lambda: counter(kit, telemetry, cid, "sent_metric_points") == 20 * 5, what="every point")
    finally:
        stop()
    assert counter(kit, telemetry, cid, "send_failed_metric_points") == 0
    assert len(requests) > 2 and all(r.ByteSize() <= limit for r in requests)
    pods = {a.value.string_value for r in requests for rm in r.resource_metrics for a in rm.resource.attributes
            if a.key == "k8s.pod.uid"}
    assert pods == {f"uid-{i}" for i in range(20)}
