"""A gateway refusing a request as too large when the request holds a single resource: a real grpcio server with
a small `grpc.max_receive_message_length` (as a collector with a small `max_recv_msg_size_mib`), and an HTTP
server answering 413 over a body limit, as a proxy does."""

from __future__ import annotations

import threading

import pytest
from harness import wait_for
from harness.otlp import OTLPSink, flatten
from harness.otlp_http import HttpEndpoint
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms_pb2

from exporters.otlp import grpc_factory, http_factory
from podmeter.metrics import MetricsBuilder, MetricSpec

FAST = {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": "20s"}
LIMIT = 6_000
THREADS = MetricSpec("process.thread.cpu.time", "sum", "s", "CPU time by thread", attributes=("thread.id",))


class _LimitedHttp(HttpEndpoint):
    """OTLP/HTTP (protobuf) refusing bodies over `LIMIT` bytes with 413."""

    def __init__(self) -> None:
        self.requests: list = []
        super().__init__(self._answer)

    def _answer(self, body: bytes, headers):
        if len(body) > LIMIT:
            return 413, {}, b""
        self.requests.append(ms_pb2.ExportMetricsServiceRequest.FromString(body))
        return 200, {}, b""


def one_resource_batch(threads: int, metrics: int = 2):
    """One resource (a pod) with `metrics` metrics of `threads` points each: larger than LIMIT encoded."""
    b = MetricsBuilder("podmeter/receiver/test", 1_700_000_000_000_000_000)
    resource = {"k8s.pod.uid": "uid-big", "k8s.pod.name": "big"}
    for m in range(metrics):
        spec = MetricSpec(f"{THREADS.name}.{m}", "sum", "s", THREADS.description, attributes=("thread.id",))
        for t in range(threads):
            b.add(spec, float(t), {"thread.id": t}, resource=resource)
    return b.build()


@pytest.mark.parametrize("metrics", [2, 1])
@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_a_single_resource_too_large_for_the_gateway_is_split_within(proto, metrics, kit, host):
    """Requests were split between resources only: a request of one resource over the gateway's limit was
    dropped, every time. It is split by metric, and a single metric by point, until the gateway takes it."""
    if proto == "grpc":
        sink = OTLPSink(max_receive_message_length=LIMIT).start()
        stop, endpoint, requests = sink.stop, sink.grpc_endpoint, sink.requests
    else:
        http = _LimitedHttp()
        stop, endpoint, requests = http.stop, http.endpoint, http.requests
    threads = 400 // metrics
    data = one_resource_batch(threads, metrics)
    try:
        factory = grpc_factory if proto == "grpc" else http_factory
        cid = "otlp" if proto == "grpc" else "otlphttp"
        exp, telemetry = kit.make(factory, {"endpoint": endpoint, "compression": "none", "retry_on_failure": FAST,
                                            "sending_queue": {"num_consumers": 1}})
        exp.start(host)
        try:
            exp.export(data)
            wait_for(lambda: kit.sample(telemetry, f"podmeter_{cid}_exporter_sent_metric_points_total",
                                        component=cid) == 400, what="every point")
        finally:
            exp.shutdown(timeout_millis=2000)
    finally:
        stop()
    assert kit.sample(telemetry, f"podmeter_{cid}_exporter_send_failed_metric_points_total", component=cid) == 0
    assert len(requests) > 2 and all(r.ByteSize() <= LIMIT for r in requests)
    got = sorted((p.name, p.attributes["thread.id"], p.value, p.resource["k8s.pod.uid"]) for p in flatten(requests))
    assert got == sorted((f"{THREADS.name}.{m}", t, float(t), "uid-big") for m in range(metrics)
                         for t in range(threads))


class _SplitThenAway(HttpEndpoint):
    """OTLP/HTTP (protobuf): 413 to the first request, 200 to the second, then 503 to every other: a request
    split for a gateway's limit whose first half is delivered while the gateway goes away for the second."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.accepted: list = []
        super().__init__(self._answer)

    def _answer(self, body: bytes, headers):
        status = (413, 200)[len(self.answers)] if len(self.answers) < 2 else 503
        if status == 200:
            self.accepted.append(ms_pb2.ExportMetricsServiceRequest.FromString(body))
        self.answers.append(status)
        return status, {}, b""


@pytest.mark.parametrize("queue", ["memory", "none"])
def test_a_split_request_cut_by_the_shutdown_counts_each_point_once(queue, kit, host):
    """The shutdown came while the second half of a split request was being retried: the whole request was counted
    as abandoned (send_failed), its delivered half included, so those points were counted sent and failed."""
    sink = _SplitThenAway()
    sending_queue = {"num_consumers": 1} if queue == "memory" else {"enabled": False}
    exp, telemetry = kit.make(http_factory, {"endpoint": sink.endpoint, "compression": "none",
                                             "retry_on_failure": FAST, "sending_queue": sending_queue})
    exp.start(host)
    try:
        if queue == "memory":
            exp.export(kit.batch([0, 1], step=1))
        else:  # export() sends on the caller's thread (the runtime's worker)
            threading.Thread(target=exp.export, args=(kit.batch([0, 1], step=1),), kwargs={"timeout_millis": 60_000},
                             daemon=True).start()
        wait_for(lambda: sink.answers.count(503) >= 2, what="the second half to be retried")
    finally:
        exp.shutdown(timeout_millis=300)
        sink.stop()
    sent = kit.sample(telemetry, "podmeter_otlphttp_exporter_sent_metric_points_total", component="otlphttp")
    failed = kit.sample(telemetry, "podmeter_otlphttp_exporter_send_failed_metric_points_total", component="otlphttp")
    assert (sent, failed) == (5, 5)


def test_a_split_request_cut_by_the_shutdown_keeps_only_its_undelivered_part(kit, host, tmp_path):
    """With a persistent queue, the whole split request stayed on disk, so its half already delivered was sent
    again at the next start. Only the undelivered half stays."""
    sink = _SplitThenAway()
    exp, telemetry = kit.make(http_factory, {"endpoint": sink.endpoint, "compression": "none",
                                             "retry_on_failure": FAST,
                                             "sending_queue": {"num_consumers": 1, "storage": str(tmp_path)}})
    exp.start(host)
    try:
        exp.export(kit.batch([0, 1], step=1))
        wait_for(lambda: sink.answers.count(503) >= 2, what="the second half to be retried")
    finally:
        exp.shutdown(timeout_millis=300)
        sink.stop()
    ((delivered,),) = [r.resource_metrics for r in sink.accepted]
    files = list((tmp_path / "exporter_otlphttp").glob("*.otlp"))
    assert len(files) == 1 and files[0].name.endswith(f"-5-{files[0].stat().st_size}.otlp"), files  # 5 points
    left = ms_pb2.ExportMetricsServiceRequest.FromString(files[0].read_bytes())
    assert [rm.resource for rm in left.resource_metrics] != [delivered.resource]
    assert len(left.resource_metrics) == 1
    assert kit.sample(telemetry, "podmeter_otlphttp_exporter_sent_metric_points_total", component="otlphttp") == 5
    assert kit.sample(telemetry, "podmeter_otlphttp_exporter_send_failed_metric_points_total",
                      component="otlphttp") == 0


class _SplitThenDown(HttpEndpoint):
    """OTLP/HTTP (protobuf): 413 to a request of more than one resource, 503 to every other; records which
    resources (pod uids) each 503 answered."""

    def __init__(self) -> None:
        self.refused: list[tuple[str, ...]] = []
        super().__init__(self._answer)

    def _answer(self, body: bytes, headers):
        request = ms_pb2.ExportMetricsServiceRequest.FromString(body)
        if len(request.resource_metrics) > 1:
            return 413, {}, b""
        uids = tuple(kv.value.string_value for rm in request.resource_metrics for kv in rm.resource.attributes
                     if kv.key == "k8s.pod.uid")
        self.refused.append(uids)
        return 503, {}, b""


def test_the_parts_of_a_split_request_share_one_max_elapsed_time(kit, host):
    """Each half of a request split for a gateway's limit started its own max_elapsed_time: a request split into
    n parts was retried for up to n times max_elapsed_time during an outage (forever as the parts were split
    again). The whole request shares one: once the first half has used it up, the second gets one attempt."""
    sink = _SplitThenDown()
    # a constant wait (no jitter, no growth) so the first half's last retry is over max_elapsed_time for sure
    retry = {"initial_interval": "100ms", "max_interval": "100ms", "multiplier": 1, "randomization_factor": 0,
             "max_elapsed_time": "350ms"}
    exp, telemetry = kit.make(http_factory, {"endpoint": sink.endpoint, "compression": "none",
                                             "retry_on_failure": retry, "sending_queue": {"num_consumers": 1}})
    exp.start(host)
    try:
        exp.export(kit.batch([0, 1], step=1))
        wait_for(lambda: kit.sample(telemetry, "podmeter_otlphttp_exporter_send_failed_metric_points_total",
                                    component="otlphttp") == 10, what="both halves to be given up")
    finally:
        exp.shutdown(timeout_millis=2000)
        sink.stop()
    first, second = sink.refused[0], sink.refused[-1]
    assert first != second
    assert sink.refused.count(first) >= 2  # the first half was retried
    assert sink.refused.count(second) == 1, sink.refused
