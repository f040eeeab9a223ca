"""otlp / otlphttp against the real OTLP sink: what a persistent queue finds on disk at start (files cut short by
a crash, files it cannot read or remove, a full disk), throttling by an HTTP-date Retry-After, a send cut by the shutdown."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from email.utils import formatdate

import pytest
from harness import require, require_root, wait_for
from harness.otlp import OTLPSink
from harness.otlp_http import HttpEndpoint
from opentelemetry.sdk.metrics.export import MetricExportResult

from exporters.otlp import grpc_factory, http_factory
from exporters.otlp.encode import Encoder

FAST = {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": "20s"}


def counter(kit, telemetry, cid: str, what: str) -> float:
    return kit.sample(telemetry, f"podmeter_{cid}_exporter_{what}_total", component=cid)


def stored(qdir, seq: int, points: int, data: bytes) -> None:
    (qdir / f"{seq:020d}-{points}.otlp").write_bytes(data)


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_corrupt_files_left_by_a_crash_are_counted_not_sent(proto, make_exporter, kit, tmp_path, caplog):
    """Without fsync a power cut leaves a queued file empty or cut short. An empty one was dropped without being
    counted or logged; one cut short was sent, and the backend refused it as malformed (gRPC INTERNAL, or a
    receiver that cannot parse it), so the log blamed the backend. Each is now counted as send_failed and logged
    once as a storage problem; the whole batches beside them are delivered."""
    cid = "otlp" if proto == "grpc" else "otlphttp"
    qdir = tmp_path / "queue" / f"exporter_{cid}"
    qdir.mkdir(parents=True)
    ((whole, n),) = Encoder().requests(kit.batch([0], step=1), 3 << 20)
    assert n == 5
    stored(qdir, 1, 5, b"")  # the file was created, its data never reached the disk
    stored(qdir, 2, 5, whole[: len(whole) // 2])  # cut short
    stored(qdir, 3, 5, b"\x00" * 512)  # blocks allocated, never written
    stored(qdir, 4, 5, whole)
    sink = OTLPSink().start()
    try:
        factory = grpc_factory if proto == "grpc" else http_factory
        endpoint = sink.grpc_endpoint if proto == "grpc" else sink.http_endpoint
        with caplog.at_level(logging.WARNING):
            exp, telemetry = make_exporter(factory, endpoint=endpoint,
                                           sending_queue={"num_consumers": 1, "storage": str(tmp_path / "queue")})
            assert exp.force_flush(20_000)
    finally:
        sink.stop()
    assert counter(kit, telemetry, cid, "sent_metric_points") == 5
    assert counter(kit, telemetry, cid, "send_failed_metric_points") == 15
    assert len(sink.requests) == 1 and sink.refused == 0
    assert {p.value for p in sink.points() if p.name == kit.CPU.name} == {1.0}
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("storage_read" in line for line in lines) == 1, lines
    assert not any("send_failed" in line for line in lines), lines  # the backend is not blamed
    assert list(qdir.glob("*.otlp")) == []


def test_a_file_cut_between_two_resources_is_told_by_its_size(make_exporter, kit, tmp_path, caplog):
    """A request cut exactly where one resource ends still parses, as a smaller request: sent, it would deliver
    one pod and lose the other without a word. The file name gives the size written, so it is counted and
    logged instead. A file named as before the size was in names (`<seq>-<points>.otlp`) is still delivered."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    qdir = tmp_path / "queue" / "exporter_otlp"
    qdir.mkdir(parents=True)
    ((two_pods, n),) = Encoder().requests(kit.batch([0, 1], step=1), 3 << 20)
    ((older, m),) = Encoder().requests(kit.batch([2], step=1), 3 << 20)
    first = ExportMetricsServiceRequest(
        resource_metrics=[ExportMetricsServiceRequest.FromString(two_pods).resource_metrics[0]]).SerializeToString()
    assert two_pods.startswith(first) and len(first) < len(two_pods)  # the cut parses: a whole request of one pod
    (qdir / f"{1:020d}-{n}-{len(two_pods)}.otlp").write_bytes(first)
    stored(qdir, 2, m, older)
    sink = OTLPSink().start()
    try:
        with caplog.at_level(logging.WARNING):
            exp, telemetry = make_exporter(grpc_factory, endpoint=sink.grpc_endpoint,
                                           sending_queue={"num_consumers": 1, "storage": str(tmp_path / "queue")})
            assert exp.force_flush(20_000)
    finally:
        sink.stop()
    assert counter(kit, telemetry, "otlp", "send_failed_metric_points") == n
    assert counter(kit, telemetry, "otlp", "sent_metric_points") == m
    assert len(sink.requests) == 1
    assert {p.value for p in sink.points() if p.name == kit.CPU.name} == {21.0, 3.0}  # pod 2's only
    lines = [r.getMessage() for r in caplog.records if "storage_read" in r.getMessage()]
    assert len(lines) == 1 and f"of the {len(two_pods)} bytes written" in lines[0], lines
    assert list(qdir.glob("*.otlp")) == []


def test_queue_files_are_named_with_their_size(tmp_path):
    from exporters.otlp.queue import SendingQueue

    q = SendingQueue(3, str(tmp_path))
    q.put(b"12345", 2)
    assert [f.name for f in tmp_path.glob("*.otlp")] == [f"{0:020d}-2-5.otlp"]
    item, data = q.get(timeout=1)
    assert data == b"12345" and not item.error
    q.done(item)
    assert list(tmp_path.glob("*.otlp")) == []
    q.release()


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_a_file_that_cannot_be_removed_does_not_stop_the_sender(proto, make_exporter, kit, tmp_path, caplog):
    """An OSError removing a finished batch's file (here a directory where a batch file should be; a filesystem
    gone read-only does the same) escaped the consumer thread with a traceback and ended it: with one consumer
    nothing was ever sent again, and the queue filled. It is logged once and the consumer goes on."""
    cid = "otlp" if proto == "grpc" else "otlphttp"
    qdir = tmp_path / "queue" / f"exporter_{cid}"
    qdir.mkdir(parents=True)
    (qdir / f"{0:020d}-5.otlp").mkdir()
    sink = OTLPSink().start()
    try:
        factory = grpc_factory if proto == "grpc" else http_factory
        endpoint = sink.grpc_endpoint if proto == "grpc" else sink.http_endpoint
        with caplog.at_level(logging.WARNING):
            exp, telemetry = make_exporter(factory, endpoint=endpoint,
                                           sending_queue={"num_consumers": 1, "storage": str(tmp_path / "queue")})
            wait_for(lambda: counter(kit, telemetry, cid, "send_failed_metric_points") == 5,
                     what="the unreadable batch to be counted")
            exp.export(kit.batch([0], step=2))
            wait_for(lambda: counter(kit, telemetry, cid, "sent_metric_points") == 5, what="the next batch")
    finally:
        sink.stop()
    assert all(t.is_alive() for t in exp._threads)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("storage_remove" in line and "Is a directory" in line for line in lines) == 1, lines


def test_retry_after_as_an_http_date_is_honoured(make_exporter, kit):
    """Retry-After may be an HTTP-date (RFC 9110), which the collector's otlphttp exporter reads. Only
    delay-seconds were read: a 429 asking to come back in an hour was retried 50 ms later. Asking for longer
    than max_elapsed_time (20 s here) the batch is given up at once, as with delay-seconds."""
    server, answers = _retry_after_server(formatdate(time.time() + 3600, usegmt=True), status=429)
    try:
        exp, telemetry = make_exporter(http_factory, endpoint=server.endpoint, sending_queue={"num_consumers": 1})
        exp.export(kit.batch([0], step=1))
        wait_for(lambda: counter(kit, telemetry, "otlphttp", "send_failed_metric_points") == 5,
                 what="the batch to be given up")
    finally:
        server.stop()
    assert answers == [429]  # no second attempt
    assert counter(kit, telemetry, "otlphttp", "sent_metric_points") == 0


class _HeldSink(OTLPSink):
    """The real gRPC sink, holding every request until `release` is set: a backend slower than the shutdown."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.arrived = threading.Event()

    def Export(self, request, context):  # noqa: N802 - the generated servicer's name
        self.arrived.set()
        self.release.wait(30)
        return super().Export(request, context)


def test_a_send_cut_by_the_shutdown_deadline_is_not_a_backend_failure(kit, host, caplog):
    """At the shutdown deadline the channel is closed under a send still waiting for a slow backend. The failed
    attempt (CANCELLED "Channel closed!") was taken for a backend failure: logged as `send:CANCELLED ... retrying
    with backoff` and counted as a retry, at every such shutdown. It is counted once, as abandoned at shutdown."""
    sink = _HeldSink().start()
    try:
        exp, telemetry = kit.make(grpc_factory, {"endpoint": sink.grpc_endpoint, "timeout": "30s",
                                                 "retry_on_failure": FAST, "sending_queue": {"num_consumers": 1}})
        exp.start(host)
        with caplog.at_level(logging.WARNING):
            exp.export(kit.batch([0], step=1))
            assert sink.arrived.wait(20)
            exp.shutdown(timeout_millis=200)
            wait_for(lambda: counter(kit, telemetry, "otlp", "send_failed_metric_points") == 5,
                     what="the batch to be counted as abandoned")
    finally:
        sink.release.set()
        sink.stop()
    assert counter(kit, telemetry, "otlp", "retries") == 0
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any(line.startswith("send:") for line in lines), lines
    assert sum(line.startswith("shutdown:") for line in lines) == 1, lines


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs: a persistent queue's disk that fills up."""
    require_root()
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    require(done.returncode == 0, f"needs to mount a tmpfs: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_leaves_no_partial_files(small_disk, kit, host, caplog):
    """A batch that does not fit on the full disk is counted and logged once; its partial `.tmp` file was left
    behind, one per export while the disk stayed full, holding blocks and inodes until the next start."""
    exp, telemetry = kit.make(grpc_factory, {"endpoint": "http://127.0.0.1:1", "retry_on_failure": FAST,
                                             "sending_queue": {"num_consumers": 1, "storage": str(small_disk)}})
    exp.start(host)
    try:
        with caplog.at_level(logging.WARNING):
            results = [exp.export(kit.batch(range(40), step=i)) for i in range(12)]
    finally:
        exp.shutdown(timeout_millis=100)
    failed = results.count(MetricExportResult.FAILURE)
    assert failed >= 2  # the disk filled up
    assert kit.sample(telemetry, "podmeter_otlp_exporter_dropped_metric_points_total", component="otlp",
                      cause="storage") == failed * 200
    assert list((small_disk / "exporter_otlp").glob("*.tmp")) == []
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("storage:")]
    assert len(lines) == 1 and "No space left on device" in lines[0], lines


def _retry_after_server(value: str, status: int = 503):
    """HTTP answering `status` with `Retry-After: value` to the first request, 200 to the others; (server, answers)
    with the status of each attempt in `answers`."""
    answers: list[int] = []

    def answer(body: bytes, headers):
        if answers:
            answers.append(200)
            return 200, {}, b""
        answers.append(status)
        return status, {"Retry-After": value}, b""  # sent as Latin-1, as http.server encodes headers

    return HttpEndpoint(answer), answers


def test_a_retry_after_of_non_ascii_digits_is_no_request(make_exporter, kit):
    """"²" is a digit to str.isdigit() but not to float(): the ValueError escaped the sender and the batch was
    dropped as an internal error instead of being retried."""
    server, answers = _retry_after_server("²")
    try:
        exp, telemetry = make_exporter(http_factory, endpoint=server.endpoint,
                                       sending_queue={"num_consumers": 1})
        exp.export(kit.batch([0], step=1))
        wait_for(lambda: counter(kit, telemetry, "otlphttp", "sent_metric_points")
                 + counter(kit, telemetry, "otlphttp", "send_failed_metric_points") >= 5, what="the batch")
    finally:
        server.stop()
    assert counter(kit, telemetry, "otlphttp", "sent_metric_points") == 5
    assert answers == [503, 200]


def test_a_retry_after_beyond_what_a_wait_can_take_is_waited(make_exporter, kit):
    """With max_elapsed_time 0 (retry forever) a Retry-After of 10^11 s (or an HTTP-date in year 9999) made the
    retry wait raise OverflowError: the batch was dropped as an internal error. It is waited for, until the
    shutdown keeps it."""
    server, answers = _retry_after_server("99999999999")
    try:
        exp, telemetry = make_exporter(http_factory, endpoint=server.endpoint,
                                       retry_on_failure={**FAST, "max_elapsed_time": 0},
                                       sending_queue={"num_consumers": 1})
        exp.export(kit.batch([0], step=1))
        wait_for(lambda: counter(kit, telemetry, "otlphttp", "retries") == 1, what="the retry")
        # the shutdown first waits for the queue to drain: the OverflowError, if any, comes before its stop
        exp.shutdown(timeout_millis=300)
    finally:
        server.stop()
    assert kit.sample(telemetry, "podmeter_component_errors_total", component="otlphttp", cause="internal") == 0
    assert counter(kit, telemetry, "otlphttp", "send_failed_metric_points") == 5  # abandoned at the shutdown
    assert "shutdown" in exp.telemetry.failing()
    assert answers == [503]


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_shutdown_with_storage_does_not_wait_out_an_outage(proto, kit, host, tmp_path):
    """With a persistent queue, a shutdown during an outage waited for the whole shutdown_timeout (the queue never
    drained), though the batches stay on disk and the next start sends them: a rolling update waited out every
    grace period, and was SIGKILLed by the kubelet when it was shorter. The shutdown ends once a send is being
    retried; the batch stays on disk, is not counted as failed, and the next run delivers it."""
    cid = "otlp" if proto == "grpc" else "otlphttp"
    factory = grpc_factory if proto == "grpc" else http_factory
    sink = OTLPSink()  # not started: the backend is down (nothing listens on its ports)
    endpoint = sink.grpc_endpoint if proto == "grpc" else sink.http_endpoint
    config = {"endpoint": endpoint, "retry_on_failure": {**FAST, "max_elapsed_time": 0},
              "sending_queue": {"num_consumers": 1, "storage": str(tmp_path)}}
    exp, telemetry = kit.make(factory, config)
    exp.start(host)
    exp.export(kit.batch([0], step=1))
    wait_for(lambda: counter(kit, telemetry, cid, "retries") >= 1, what="a retry")
    done = threading.Thread(target=exp.shutdown, kwargs={"timeout_millis": 3_600_000}, daemon=True)
    done.start()
    wait_for(lambda: not done.is_alive(), what="the shutdown to end before its hour-long timeout")
    assert counter(kit, telemetry, cid, "send_failed_metric_points") == 0
    assert len(list((tmp_path / f"exporter_{cid}").glob("*.otlp"))) == 1
    sink.start()
    try:
        again, telemetry = kit.make(factory, config)
        again.start(host)
        try:
            assert again.force_flush(20_000)
        finally:
            again.shutdown(timeout_millis=2000)
    finally:
        sink.stop()
    assert counter(kit, telemetry, cid, "sent_metric_points") == 5
    assert len(sink.requests) == 1 and len(sink.points()) == 5


def test_shutdown_without_storage_still_waits_for_the_queue(kit, host):
    """Without storage what is not sent by the shutdown deadline is lost: the shutdown waits for the backend to
    come back within it, retrying."""
    sink = OTLPSink()
    exp, telemetry = kit.make(grpc_factory, {"endpoint": sink.grpc_endpoint, "retry_on_failure": FAST,
                                             "sending_queue": {"num_consumers": 1}})
    exp.start(host)
    exp.export(kit.batch([0], step=1))
    wait_for(lambda: counter(kit, telemetry, "otlp", "retries") >= 1, what="a retry")
    done = threading.Thread(target=exp.shutdown, kwargs={"timeout_millis": 60_000}, daemon=True)
    done.start()
    try:
        wait_for(lambda: counter(kit, telemetry, "otlp", "retries") >= 2, what="retries during the shutdown")
        assert done.is_alive()
        sink.start()
        wait_for(lambda: not done.is_alive(), timeout=30, what="the shutdown to end after delivery")
    finally:
        sink.stop()
    assert counter(kit, telemetry, "otlp", "sent_metric_points") == 5
    assert counter(kit, telemetry, "otlp", "send_failed_metric_points") == 0
