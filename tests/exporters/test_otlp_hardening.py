"""otlp / otlphttp hardening against the real OTLP sink: misconfiguration fails the start, the queue is bounded in
bytes, the runtime's generic counters say what the backend got, causes recover, shutdown counts what it abandons."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from harness import wait_for
from harness.otlp import OTLPSink
from harness.tls import make_certs

from exporters.otlp import grpc_factory, http_factory
from exporters.otlp.queue import SendingQueue
from podmeter.component import ComponentUnavailable
from podmeter.config import load
from podmeter.runtime import Service, StartError

FAST = {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": "1s"}


@pytest.fixture(autouse=True)
def plugins():
    from core import plugins

    plugins.register()
    plugins.RECORDS.clear()
    return plugins


def service(tmp_path, exporters: dict, interval: str = "50ms") -> Service:
    """A service: the counting receiver into `exporters` ({id: config}); the config is written as JSON (YAML)."""
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({
        "receivers": {"counter": {"collection_interval": interval, "initial_delay": "0s", "pods": 3}},
        "exporters": exporters,
        "service": {"telemetry": {"metrics": {"level": "none"}},
                    "pipelines": {"metrics": {"receivers": ["counter"], "exporters": list(exporters)}}}}))
    return Service(load([str(path)], env={}))


def generic(svc: Service, which: str, exporter: str) -> float:
    counter = {"sent": svc.telemetry.exporter_sent, "failed": svc.telemetry.exporter_failed,
               "enqueue_failed": svc.telemetry.exporter_enqueue_failed}[which]
    return counter.labels(exporter)._value.get()


@pytest.mark.parametrize("tls", [{"ca_file": "/nonexistent/ca.pem"},
                                 {"cert_file": "/nonexistent/c.pem", "key_file": "/nonexistent/k.pem"}])
@pytest.mark.parametrize("factory", [grpc_factory, http_factory])
def test_missing_tls_files_fail_the_start(factory, tls, kit, host):
    endpoint = "https://127.0.0.1:1" if factory is http_factory else "127.0.0.1:1"
    exp, _ = kit.make(factory, {"endpoint": endpoint, "tls": tls})
    with pytest.raises(ComponentUnavailable, match="tls::.*No such file or directory"):
        exp.start(host)


def test_malformed_ca_file_fails_the_start(kit, host, tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    exp, _ = kit.make(http_factory, {"endpoint": "https://127.0.0.1:1", "tls": {"ca_file": str(bad)}})
    with pytest.raises(ComponentUnavailable, match="tls::ca_file"):
        exp.start(host)


def test_valid_tls_files_still_start(kit, host, tmp_path):
    certs = make_certs(tmp_path)
    tls = {"ca_file": certs.ca, "cert_file": certs.client_cert, "key_file": certs.client_key}
    for factory, endpoint in ((grpc_factory, "https://127.0.0.1:1"), (http_factory, "https://127.0.0.1:1")):
        exp, _ = kit.make(factory, {"endpoint": endpoint, "tls": tls})
        exp.start(host)
        exp.shutdown(timeout_millis=100)


def test_misconfigured_otlp_fails_the_service_start(tmp_path):
    """A storage path that is a regular file and a missing CA: the service does not start, naming both."""
    (tmp_path / "plainfile").write_text("")
    svc = service(tmp_path, {
        "otlp": {"endpoint": "127.0.0.1:1", "tls": {"insecure": True},
                 "sending_queue": {"storage": f"{tmp_path}/plainfile"}},
        "otlphttp": {"endpoint": "https://127.0.0.1:1", "tls": {"ca_file": f"{tmp_path}/missing.pem"}}})
    with pytest.raises(StartError) as err:
        svc.start()
    message = str(err.value)
    assert "exporter otlp failed to start: sending_queue::storage: cannot use" in message
    assert "Not a directory" in message
    assert "exporter otlphttp failed to start:" in message and "tls::ca_file" in message


def test_generic_counters_during_a_total_outage_then_delivery(tmp_path):
    """Nothing listens: the runtime's generic counters say nothing was sent and points failed (given up after
    retries), and, with a small queue, that the queue dropped some. Then the backend comes: points count as sent."""
    sink = OTLPSink()  # not started: connections are refused
    queue = {"queue_size": 3, "num_consumers": 2}
    svc = service(tmp_path, {"otlp": {"endpoint": sink.grpc_endpoint, "retry_on_failure": FAST, "sending_queue": queue},
                             "otlphttp": {"endpoint": sink.http_endpoint, "retry_on_failure": FAST,
                                          "sending_queue": queue}})
    svc.start()
    try:
        for eid in ("otlp", "otlphttp"):
            wait_for(lambda eid=eid: generic(svc, "failed", eid) > 0, timeout=30, what=f"{eid} send_failed")
            wait_for(lambda eid=eid: generic(svc, "enqueue_failed", eid) > 0, timeout=30, what=f"{eid} drops")
            assert generic(svc, "sent", eid) == 0
        sink.start()
        for eid in ("otlp", "otlphttp"):
            wait_for(lambda eid=eid: generic(svc, "sent", eid) > 0, timeout=30, what=f"{eid} sent after recovery")
    finally:
        svc.shutdown(timeout=2)
        sink.stop()
    delivered = sum(1 for req in sink.requests for rm in req.resource_metrics for sm in rm.scope_metrics
                    for m in sm.metrics for _ in m.gauge.data_points)
    assert generic(svc, "sent", "otlp") + generic(svc, "sent", "otlphttp") == delivered


def test_queue_is_bounded_in_bytes(exporter_kit):
    kit, host = exporter_kit
    sink = OTLPSink()  # down
    exp, telemetry = kit.make(grpc_factory, {"endpoint": sink.grpc_endpoint, "retry_on_failure": FAST,
                                             "sending_queue": {"num_consumers": 1, "max_bytes": "4KiB"}})
    exp.start(host)
    try:
        size = len(exp._encode(kit.batch([0, 1], step=1))[0][0])
        assert size < 4096 < 10 * size
        for step in range(1, 31):
            exp.export(kit.batch([0, 1], step=step))
            assert exp.queue.nbytes() <= 4096
        assert len(exp.queue) <= 4096 // size
        dropped = kit.sample(telemetry, "podmeter_otlp_exporter_dropped_metric_points_total", component="otlp",
                             cause="queue_full")
        assert dropped >= (30 - 1 - 4096 // size) * 10  # one in flight, the rest held up to max_bytes
        assert kit.sample(telemetry, "podmeter_exporter_enqueue_failed_metric_points_total", exporter="otlp") == dropped
        assert kit.sample(telemetry, "podmeter_otlp_exporter_queue_size_bytes", component="otlp") <= 4096
        # reported (whether it is still failing depends on whether the last export found the queue full: the
        # consumer frees a slot whenever its in-flight batch gives up, at a pace this test does not control)
        assert kit.sample(telemetry, "podmeter_component_errors_total", component="otlp", cause="queue_full") > 0
        sink.start()
        exp.force_flush(10_000)
        exp.export(kit.batch([0, 1], step=31))  # taken without dropping: the cause recovers
        assert "queue_full" not in exp.telemetry.failing()
    finally:
        exp.shutdown(timeout_millis=2000)
        sink.stop()


def test_persistent_queue_is_bounded_in_bytes_across_restarts(tmp_path):
    q = SendingQueue(100, str(tmp_path), max_bytes=25)
    dropped = [d.seq for i in range(5) for d in q.put(b"x" * 10, 1)]
    assert dropped == [0, 1, 2] and q.nbytes() == 20
    q.release()
    q2 = SendingQueue(100, str(tmp_path), max_bytes=15)  # smaller now: the oldest stored batch goes
    assert [i.seq for i in q2.trimmed] == [3] and q2.nbytes() == 10 and len(q2) == 1
    q2.release()


def test_each_error_class_is_logged_once_and_delivery_recovers_them(exporter_kit, caplog):
    """503 then 404 from the backend: two log lines (one per class), not one for both; a delivery clears them,
    so the next outage is logged again."""
    kit, host = exporter_kit
    sink = OTLPSink().start()
    exp, telemetry = kit.make(http_factory, {"endpoint": sink.http_endpoint, "retry_on_failure": FAST,
                                             "sending_queue": {"num_consumers": 1}})
    exp.start(host)
    try:
        with caplog.at_level(logging.INFO):
            sink.set_failing(True)
            exp.export(kit.batch([0], step=1))
            wait_for(lambda: "send_failed:HTTP 503" in exp.telemetry.failing(), timeout=30, what="503 given up")
            exp.sender.url = sink.http_endpoint + "/wrong"  # the backend now answers 404
            sink.set_failing(False)
            exp.export(kit.batch([0], step=2))
            wait_for(lambda: "send_failed:HTTP 404" in exp.telemetry.failing(), timeout=30, what="404 given up")
            exp.sender.url = sink.http_endpoint + "/v1/metrics"
            exp.export(kit.batch([0], step=3))
            sink.wait_for(lambda pts: len(pts) > 0)
            wait_for(lambda: not exp.telemetry.failing(), what="the causes to recover")
            sink.set_failing(True)
            exp.export(kit.batch([0], step=4))
            wait_for(lambda: "send:HTTP 503" in exp.telemetry.failing(), timeout=30, what="the next outage")
    finally:
        sink.set_failing(False)
        exp.shutdown(timeout_millis=2000)
        sink.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "test.otlphttp"]
    assert sum(w.startswith("send_failed:HTTP 503:") for w in warnings) == 1
    assert sum(w.startswith("send_failed:HTTP 404:") for w in warnings) == 1
    assert sum(w.startswith("send:HTTP 503:") for w in warnings) == 2  # the first outage and the next one
    recovered = [r.getMessage() for r in caplog.records if r.getMessage().endswith(": recovered")]
    assert "send_failed:HTTP 404: recovered" in recovered


def test_without_a_queue_a_hung_backend_at_shutdown_is_counted_not_a_bug(tmp_path, caplog):
    """sending_queue disabled, a backend that accepts connections and never answers: at the shutdown deadline
    the batch being sent and those waiting are counted as send_failed and logged once; nothing is sent on a
    closed channel."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
    try:
        svc = service(tmp_path, {"otlp": {"endpoint": f"127.0.0.1:{hung.getsockname()[1]}", "tls": {"insecure": True},
                                          "timeout": "30s", "sending_queue": {"enabled": False}}}, interval="20ms")
        svc.start()
        worker = svc.exporters["otlp"]
        wait_for(lambda: worker.busy and len(worker.queue) >= 2, what="a batch in flight and a backlog")
        with caplog.at_level(logging.INFO):
            assert svc.shutdown(timeout=1.0) is False
            wait_for(lambda: generic(svc, "failed", "otlp") >= 3 * 3, what="the in-flight batch counted too")
            # the sending thread counts the points, then logs: the line can come a moment after the count
            wait_for(lambda: any("points not delivered" in r.getMessage() for r in caplog.records),
                     what="the in-flight batch logged")
    finally:
        hung.close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    # the log goes with each assertion: this test failed once in many runs, and the log is what tells why
    assert "closed channel" not in text and "internal" not in text, text
    assert "not exported before the shutdown deadline: dropped" in text, text
    assert sum("shutdown: " in r.getMessage() and "points not delivered" in r.getMessage()
               for r in caplog.records) == 1, text
    assert generic(svc, "sent", "otlp") == 0, text


@pytest.fixture
def exporter_kit(kit, host):
    return kit, host


def test_a_service_with_storage_stops_without_waiting_out_an_outage(tmp_path):
    """`podmeter run` stopping (SIGTERM) while the backend is down, with persistent queues: the runtime flushes
    each exporter, then shuts it down, and both waited for the whole shutdown_timeout, though the batches stay on
    disk for the next start. The service stops once the sends are being retried, nothing counted as failed."""
    sink = OTLPSink()  # not started: connections are refused
    retry = {**FAST, "max_elapsed_time": "0s"}
    svc = service(tmp_path, {
        "otlp": {"endpoint": sink.grpc_endpoint, "retry_on_failure": retry,
                 "sending_queue": {"storage": str(tmp_path / "queue")}},
        "otlphttp": {"endpoint": sink.http_endpoint, "retry_on_failure": retry,
                     "sending_queue": {"storage": str(tmp_path / "queue")}}})
    svc.start()
    stopped = None
    try:
        for eid in ("otlp", "otlphttp"):
            wait_for(lambda eid=eid: list((tmp_path / "queue" / f"exporter_{eid}").glob("*.otlp")),
                     what=f"{eid} to store a batch")
        import threading

        stopped = threading.Thread(target=svc.shutdown, kwargs={"timeout": 3600}, daemon=True)
        stopped.start()
        wait_for(lambda: not stopped.is_alive(), timeout=30, what="the service to stop before its hour-long deadline")
    finally:
        if stopped is None:
            svc.shutdown(timeout=2)
    for eid in ("otlp", "otlphttp"):
        assert generic(svc, "failed", eid) == 0
        assert list((tmp_path / "queue" / f"exporter_{eid}").glob("*.otlp"))
