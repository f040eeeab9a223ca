"""otlp (gRPC) and otlphttp exporters against real receivers: rotel (a Rust OTel collector) and a sink on the
official opentelemetry-proto gRPC stubs downstream of it (or directly, for TLS, which rotel's receivers lack)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from harness import wait_for
from harness.otlp import OTLPSink, RotelAgent
from harness.tls import make_certs

from exporters.otlp import grpc_factory, http_factory
from podmeter.config import validate_component

FAST_RETRY = {"initial_interval": "50ms", "max_interval": "300ms", "max_elapsed_time": "60s"}
FACTORIES = {"grpc": grpc_factory, "http": http_factory}


def endpoint_of(peer, proto: str) -> str:
    return peer.grpc_endpoint if proto == "grpc" else peer.http_endpoint


@pytest.fixture
def sink():
    s = OTLPSink().start()
    yield s
    s.stop()


@pytest.fixture
def exporter(kit, host):
    created = []

    def start(proto: str, **config):
        exp, telemetry = kit.make(FACTORIES[proto], {"retry_on_failure": FAST_RETRY, **config})
        exp.start(host)
        created.append(exp)
        return exp, telemetry

    yield start
    for exp in created:
        exp.shutdown(timeout_millis=2000)


def cpu_values(points, cpu_mode="user") -> dict:
    return {p.resource["k8s.pod.uid"]: p.value for p in points
            if p.name == "container.cpu.time" and p.attributes.get("cpu.mode") == cpu_mode}


def steps_seen(points) -> set:
    """Batches are told apart by `step`: pod 0's user CPU time equals the step."""
    return {p.value for p in points if p.name == "container.cpu.time" and p.resource["k8s.pod.uid"] == "uid-0"
            and p.attributes.get("cpu.mode") == "user"}


def test_both_pushes_delivered_through_rotel(sink, exporter, kit):
    with RotelAgent(forward_to=sink.grpc_endpoint) as rotel:
        grpc_exp, gt = exporter("grpc", endpoint=rotel.grpc_endpoint)
        http_exp, ht = exporter("http", endpoint=rotel.http_endpoint)
        grpc_exp.export(kit.batch([0, 1], step=3))
        http_exp.export(kit.batch([2, 3], step=4))
        points = sink.wait_for(lambda pts: len(cpu_values(pts)) == 4)
        assert cpu_values(points) == {"uid-0": 3.0, "uid-1": 13.0, "uid-2": 24.0, "uid-3": 34.0}
        mem = {p.resource["k8s.pod.uid"]: p.value for p in points if p.name == "container.memory.usage"}
        assert mem == {"uid-0": 1048576.0, "uid-1": 2097152.0, "uid-2": 3145728.0, "uid-3": 4194304.0}
        hist = [p for p in points if p.name == "k8s.pod.run_queue.latency" and p.resource["k8s.pod.uid"] == "uid-2"]
        assert hist[0].value == (6, 2.05, (1, 2, 3), (0.001, 0.01))
        raw = [dp for req in sink.requests for rm in req.resource_metrics for sm in rm.scope_metrics
               for m in sm.metrics if m.WhichOneof("data") == "histogram" for dp in m.histogram.data_points]
        assert raw and not any(dp.HasField("min") or dp.HasField("max") for dp in raw)  # unknown, not NaN
        cpu = next(p for p in points if p.name == "container.cpu.time")
        assert cpu.kind == "sum" and cpu.temporality == 2  # cumulative, as collected
        assert next(p for p in points if p.resource["k8s.pod.uid"] == "uid-3").resource["k8s.pod.name"] == "pod-3"
        assert grpc_exp.force_flush(5000) and http_exp.force_flush(5000)
        assert "container.cpu.time" in rotel.log()  # rotel's own debug log saw them too
    for telemetry, kind in ((gt, "otlp"), (ht, "otlphttp")):
        assert kit.sample(telemetry, f"podmeter_{kind}_exporter_sent_metric_points_total", component=kind) == 2 * 5


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_outage_of_the_real_backend_then_delivery(proto, sink, exporter, kit):
    """rotel is stopped while batches keep coming, then restarted on the same ports: every queued batch arrives.
    The outage is a few seconds here, not 30: the exporter's behaviour (retry with backoff, bounded by
    max_interval) is the same, only the number of retries differs."""
    with RotelAgent(forward_to=sink.grpc_endpoint) as rotel:
        exp, telemetry = exporter(proto, endpoint=endpoint_of(rotel, proto), sending_queue={"num_consumers": 2})
        exp.export(kit.batch([0], step=1))
        sink.wait_for(lambda pts: steps_seen(pts) == {1.0})
        rotel.stop()
        for step in range(2, 7):
            exp.export(kit.batch([0], step=step))
        name = f"podmeter_{'otlp' if proto == 'grpc' else 'otlphttp'}_exporter_retries_total"
        cid = "otlp" if proto == "grpc" else "otlphttp"
        wait_for(lambda: kit.sample(telemetry, name, component=cid) >= 4, timeout=30, what="retries during outage")
        time.sleep(2)
        assert steps_seen(sink.points()) == {1.0}
        rotel.start()
        sink.wait_for(lambda pts: steps_seen(pts) == {1.0, 2.0, 3.0, 4.0, 5.0, 6.0}, timeout=60)
        assert exp.force_flush(10_000)


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_unavailable_and_503_are_retried(proto, sink, exporter, kit):
    exp, telemetry = exporter(proto, endpoint=endpoint_of(sink, proto))
    sink.set_failing(True)
    exp.export(kit.batch([0], step=9))
    wait_for(lambda: sink.refused >= 3, timeout=30, what="the sink to refuse a few attempts")
    sink.set_failing(False)
    sink.wait_for(lambda pts: steps_seen(pts) == {9.0})
    cid = "otlp" if proto == "grpc" else "otlphttp"
    assert kit.sample(telemetry, f"podmeter_{cid}_exporter_retries_total", component=cid) >= 3
    assert kit.sample(telemetry, f"podmeter_{cid}_exporter_send_failed_metric_points_total", component=cid) == 0


def test_full_queue_drops_the_oldest_batch(exporter, kit):
    sink = OTLPSink()  # not started: the backend is down
    exp, telemetry = exporter("grpc", endpoint=sink.grpc_endpoint,
                              sending_queue={"queue_size": 3, "num_consumers": 1})
    exp.export(kit.batch([0], step=1))
    wait_for(lambda: len(exp.queue) == 0, what="the consumer to take batch 1")  # in flight, retrying
    for step in range(2, 7):
        exp.export(kit.batch([0], step=step))
    assert len(exp.queue) == 3
    assert kit.sample(telemetry, "podmeter_otlp_exporter_dropped_metric_points_total", component="otlp",
                      cause="queue_full") == 2 * 5
    assert kit.sample(telemetry, "podmeter_otlp_exporter_queue_size", component="otlp") == 3
    assert kit.sample(telemetry, "podmeter_otlp_exporter_queue_capacity", component="otlp") == 3
    sink.start()
    try:
        sink.wait_for(lambda pts: steps_seen(pts) == {1.0, 4.0, 5.0, 6.0}, timeout=30)
    finally:
        sink.stop()


AGENT = textwrap.dedent("""
    import logging, sys, time
    sys.path.insert(0, {tests!r})
    from podmeter.component import ComponentID, CreateSettings, Host
    from podmeter.metrics import MetricsBuilder, MetricSpec
    from podmeter.telemetry import null_component_telemetry
    from exporters.otlp import {factory} as factory
    logging.basicConfig(level=logging.INFO)
    cfg = factory.config_model.model_validate({{
        "endpoint": {endpoint!r}, "retry_on_failure": {{"initial_interval": "50ms", "max_interval": "300ms"}},
        "sending_queue": {{"storage": {storage!r}, "num_consumers": 2}}}})
    s = CreateSettings(id=ComponentID(factory.type), kind="exporter", logger=logging.getLogger("agent"),
                       telemetry=null_component_telemetry(factory.type))
    exp = factory.create(s, cfg)
    exp.start(Host())
    spec = MetricSpec("container.cpu.time", "sum", "s", "CPU time")
    for step in {steps!r}:
        b = MetricsBuilder("podmeter/receiver/cgroup", 1)
        b.add(spec, float(step), {{"cpu.mode": "user"}}, resource={{"k8s.pod.uid": "uid-0"}})
        exp.export(b.build())
    print("exported", flush=True)
    if {flush!r}:
        # until delivered: force_flush() with storage gives up once the backend fails (the batches stay on disk)
        print("flushed", exp.queue.wait_empty(30), flush=True)
        exp.shutdown(5000)
    else:
        time.sleep(600)
""")


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_persistent_queue_survives_sigkill(proto, tmp_path):
    """An agent queues batches while the backend is down and is killed with SIGKILL; a new agent on the same
    storage directory delivers them once the backend is up."""
    sink = OTLPSink()
    storage = str(tmp_path / "queue")
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    factory = "grpc_factory" if proto == "grpc" else "http_factory"

    def agent(steps, flush):
        script = AGENT.format(tests=tests_dir, factory=factory, endpoint=endpoint_of(sink, proto), storage=storage,
                              steps=steps, flush=flush)
        return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    first = agent([1, 2, 3, 4], flush=False)
    assert first.stdout.readline().strip() == "exported"
    qdir = tmp_path / "queue" / f"exporter_{'otlp' if proto == 'grpc' else 'otlphttp'}"
    assert len(list(qdir.glob("*.otlp"))) == 4
    first.send_signal(signal.SIGKILL)
    first.wait()
    sink.start()
    try:
        second = agent([5], flush=True)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err
        assert "flushed True" in out, err
        got = {p.value for p in sink.points()}
        assert got == {1.0, 2.0, 3.0, 4.0, 5.0}
        assert list(qdir.glob("*.otlp")) == []
    finally:
        sink.stop()


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_mutual_tls_with_self_signed_certificates(proto, exporter, kit, tmp_path):
    certs = make_certs(tmp_path)
    sink = OTLPSink(certs=certs, client_auth=True).start()
    try:
        tls = {"ca_file": certs.ca, "cert_file": certs.client_cert, "key_file": certs.client_key}
        exp, _ = exporter(proto, endpoint=endpoint_of(sink, proto), tls=tls, headers={"X-Tenant": "team-a"})
        exp.export(kit.batch([0], step=7))
        points = sink.wait_for(lambda pts: steps_seen(pts) == {7.0})
        assert points and sink.headers[-1]["x-tenant"] == "team-a"
        # a client that does not trust the server's CA fails, is counted and does not crash
        bad, telemetry = exporter(proto, endpoint=endpoint_of(sink, proto),
                                  retry_on_failure={"enabled": False}, sending_queue={"enabled": False})
        from opentelemetry.sdk.metrics.export import MetricExportResult

        assert bad.export(kit.batch([0], step=8)) == MetricExportResult.FAILURE
        assert 8.0 not in steps_seen(sink.points())
    finally:
        sink.stop()


def test_gzip_and_headers_on_http(sink, exporter, kit):
    exp, _ = exporter("http", endpoint=sink.http_endpoint, headers={"Authorization": "Bearer t0k"})
    exp.export(kit.batch([0], step=2))
    sink.wait_for(lambda pts: steps_seen(pts) == {2.0})
    assert sink.headers[-1]["content-encoding"] == "gzip"
    assert sink.headers[-1]["authorization"] == "Bearer t0k"
    assert sink.headers[-1]["user-agent"].startswith("podmeter/")


def test_permanent_errors_are_not_retried(sink, exporter, kit):
    exp, telemetry = exporter("http", metrics_endpoint=sink.http_endpoint + "/wrong/path")
    exp.export(kit.batch([0]))
    wait_for(lambda: kit.sample(telemetry, "podmeter_otlphttp_exporter_send_failed_metric_points_total",
                                component="otlphttp") == 5, what="the batch to be given up")
    assert kit.sample(telemetry, "podmeter_otlphttp_exporter_retries_total", component="otlphttp") == 0
    assert "send_failed:HTTP 404" in exp.telemetry.failing()  # a cause per error class, each logged once


def test_delta_temporality(sink, exporter, kit):
    exp, _ = exporter("grpc", endpoint=sink.grpc_endpoint, temporality_preference="delta")
    exp.export(kit.batch([0], step=1))
    exp.export(kit.batch([0], step=4))
    points = sink.wait_for(lambda pts: any(p.name == "container.cpu.time" for p in pts))
    cpu = [p for p in points if p.name == "container.cpu.time" and p.attributes["cpu.mode"] == "user"]
    assert [(p.value, p.temporality) for p in cpu] == [(3.0, 1)]  # first point is the baseline; then the change
    assert {p.name for p in points} >= {"container.memory.usage", "hw.gpu.utilization"}  # gauges pass unchanged
    (hist,) = [p for p in points if p.name == "k8s.pod.run_queue.latency"]
    assert hist.value == (0, 0.0, (0, 0, 0), (0.001, 0.01)) and hist.temporality == 1  # nothing new since


def test_shutdown_flushes_within_the_deadline(sink, exporter, kit):
    exp, _ = exporter("http", endpoint=sink.http_endpoint)
    for step in range(1, 4):
        exp.export(kit.batch([0], step=step))
    exp.shutdown(timeout_millis=10_000)
    assert steps_seen(sink.points()) == {1.0, 2.0, 3.0}


def test_bad_config_names_the_key():
    problems: list[str] = []
    validate_component(grpc_factory, {"endpoint": "nohost", "compresion": "gzip",
                                      "retry_on_failure": {"initial_interval": "soon"},
                                      "sending_queue": {"queue_size": 0}}, "exporters::otlp", problems)
    text = "\n".join(problems)
    assert "exporters::otlp::endpoint: invalid endpoint 'nohost'" in text
    assert 'exporters::otlp::compresion: unknown key (did you mean "compression"?)' in text
    assert "exporters::otlp::retry_on_failure::initial_interval: invalid duration" in text
    assert "exporters::otlp::sending_queue::queue_size:" in text
    problems = []
    validate_component(http_factory, {"endpoint": "collector:4318"}, "exporters::otlphttp", problems)
    assert problems == ["exporters::otlphttp::endpoint: invalid URL 'collector:4318': must start with http:// "
                        "or https:// (got 'collector:4318')"]


@pytest.mark.slow
def test_thirty_second_outage_with_sigkill_and_restart(tmp_path):
    """The issue's scenario at full length: rotel (the real backend) is down for 30 s; meanwhile the agent queues
    to disk and is killed with SIGKILL; rotel comes back, a restarted agent delivers every queued batch."""
    sink = OTLPSink().start()
    try:
        with RotelAgent(forward_to=sink.grpc_endpoint) as rotel:
            rotel.stop()
            outage_started = time.monotonic()
            storage = str(tmp_path / "queue")
            tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            script = AGENT.format(tests=tests_dir, factory="grpc_factory", endpoint=rotel.grpc_endpoint,
                                  storage=storage, steps=list(range(1, 11)), flush=False)
            first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
            assert first.stdout.readline().strip() == "exported"
            time.sleep(5)  # retrying against the dead backend
            first.send_signal(signal.SIGKILL)
            first.wait()
            restarted = subprocess.Popen([sys.executable, "-c", AGENT.format(
                tests=tests_dir, factory="grpc_factory", endpoint=rotel.grpc_endpoint, storage=storage,
                steps=[11], flush=True)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(max(0.0, 30 - (time.monotonic() - outage_started)))
            rotel.start()
            out, err = restarted.communicate(timeout=120)
            assert restarted.returncode == 0 and "flushed True" in out, err[-2000:]
            got = sink.wait_for(lambda pts: {p.value for p in pts} == set(map(float, range(1, 12))), timeout=30)
            assert got
    finally:
        sink.stop()


def test_persistent_queue_bounds_and_lock(tmp_path):
    from exporters.otlp.queue import QueueLocked, SendingQueue

    q = SendingQueue(3, str(tmp_path))
    dropped = [d.seq for i in range(5) for d in q.put(b"batch%d" % i, i)]
    assert dropped == [0, 1] and len(q) == 3
    with pytest.raises(QueueLocked):
        SendingQueue(3, str(tmp_path))  # a second process (or exporter) on the same directory
    item, data = q.get(timeout=1)
    assert data == b"batch2"
    q.done(item, keep=True)  # e.g. shut down mid-retry: stays on disk
    q.release()
    (tmp_path / "00000000000000000099-1.otlp.tmp").write_bytes(b"half")  # a write cut by SIGKILL
    q2 = SendingQueue(2, str(tmp_path))  # smaller now: the oldest stored batch is dropped
    assert [i.seq for i in q2.trimmed] == [2]
    assert [q2.get(timeout=1)[1] for _ in range(2)] == [b"batch3", b"batch4"]
    assert not list(tmp_path.glob("*.tmp"))
    q2.release()


def test_persistent_queue_fsync_flushes_each_file_and_then_the_directory(tmp_path, monkeypatch):
    """A power loss cannot be staged here, so os.fsync is watched (a spy that still calls the real one): with
    `fsync` every batch file is flushed before its rename and the directory after it; without, nothing is."""
    from exporters.otlp import queue as queue_module

    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(queue_module.os, "fsync", spy)
    plain = queue_module.SendingQueue(3, str(tmp_path / "plain"))
    plain.put(b"batch", 1)
    assert synced == []
    plain.release()
    durable = queue_module.SendingQueue(3, str(tmp_path / "durable"), fsync=True)
    durable.put(b"batch", 7)
    directory = str(tmp_path / "durable")
    assert synced == [f"{directory}/00000000000000000000-7-5.otlp.tmp", directory]
    assert durable.get(timeout=1)[1] == b"batch"
    durable.release()


@pytest.mark.parametrize("proto", ["grpc", "http"])
def test_large_batches_are_split_under_the_request_limit(proto, sink, exporter, kit):
    exp, telemetry = exporter(proto, endpoint=endpoint_of(sink, proto))
    exp.max_request_bytes = 20_000  # the real limit is 3 MiB; a small one makes a small batch split
    exp.export(kit.batch(range(200), step=1))
    points = sink.wait_for(lambda pts: len(cpu_values(pts)) == 200)
    assert len(points) == 200 * 5
    assert len(sink.requests) > 1 and all(r.ByteSize() <= 20_000 for r in sink.requests)
