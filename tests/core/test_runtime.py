"""Runtime: scheduling, fan-out isolation, per-pipeline processors, shutdown flushing, health, CLI run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest
from harness import free_port, wait_for

from podmeter.config import load
from podmeter.metrics import count_points
from podmeter.runtime import Service, StartError

HERE = os.path.dirname(__file__)
PLUGINS = os.path.join(HERE, "plugins.py")


@pytest.fixture(autouse=True)
def plugins():
    from core import plugins

    plugins.register()
    plugins.RECORDS.clear()
    return plugins


def config(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return load([str(path)], env={})


def base(extra_exporters: str = "", exporters: str = "[record/ok]", interval: str = "50ms", telemetry_port: int = 0):
    return f"""
        receivers:
          counter:
            collection_interval: {interval}
            initial_delay: 0s
        exporters:
          record/ok:
            name: ok
        {extra_exporters}
        service:
          telemetry:
            metrics:
              {"level: none" if not telemetry_port else f"address: 127.0.0.1:{telemetry_port}"}
          pipelines:
            metrics:
              receivers: [counter]
              exporters: {exporters}
        """


def test_failing_and_hanging_exporters_do_not_delay_the_others(tmp_path, plugins):
    text = base("""  record/fail:
            name: fail
            fail: true
          record/hang:
            name: hang
            hang: true""", exporters="[record/fail, record/hang, record/ok]")
    service = Service(config(tmp_path, text))
    service.start()
    try:
        wait_for(lambda: len(plugins.RECORDS.get("ok", [])) >= 10, what="10 batches at the healthy exporter")
        hang = service.exporters["record/hang"]
        assert len(hang.queue) > 0  # the hanging exporter's own queue fills...
        assert len(hang.queue) <= hang.capacity  # ...bounded
        failed = service.telemetry.exporter_failed.labels("record/fail")._value.get()
        assert failed >= 5
    finally:
        service.exporters["record/hang"].exporter.release.set()
        service.shutdown(timeout=2)


def test_full_queue_drops_oldest_and_counts(tmp_path, plugins):
    text = base("""  record/hang:
            name: hang
            hang: true""", exporters="[record/hang]", interval="10ms")
    service = Service(config(tmp_path, text))
    service.exporters["record/hang"].capacity = 3
    service.start()
    try:
        wait_for(lambda: service.telemetry.exporter_enqueue_failed.labels("record/hang")._value.get() >= 3,
                 what="dropped batches counted")
        newest = service.exporters["record/hang"].queue[-1]
        oldest = service.exporters["record/hang"].queue[0]
        value = lambda d: d.resource_metrics[0].scope_metrics[0].metrics[0].data.data_points[0].value  # noqa: E731
        assert value(newest) > value(oldest)
    finally:
        service.exporters["record/hang"].exporter.release.set()
        service.shutdown(timeout=2)


def test_queue_is_bounded_in_points_too(tmp_path, plugins):
    """Batches of a big node are large: the queue in front of a hung exporter holds at most `max_points` points
    (the oldest batches go, counted), not `capacity` batches of any size."""
    text = base("""  record/hang:
            name: hang
            hang: true""", exporters="[record/hang]", interval="10ms")
    service = Service(config(tmp_path, text))
    worker = service.exporters["record/hang"]
    worker.max_points = 5  # a few batches of the counter receiver's points
    service.start()
    try:
        wait_for(lambda: service.telemetry.exporter_enqueue_failed.labels("record/hang")._value.get() >= 3,
                 what="dropped batches counted")
        with worker.cond:
            assert len(worker.queue) < worker.capacity
            assert worker.queued_points == sum(worker.sizes) == sum(count_points(d) for d in worker.queue)
            assert worker.queued_points <= worker.max_points or len(worker.queue) == 1
    finally:
        worker.exporter.release.set()
        service.shutdown(timeout=2)


def test_receiver_shared_by_pipelines_collects_once_and_processors_are_per_pipeline(tmp_path, plugins):
    text = """
        receivers:
          counter:
            collection_interval: 50ms
            initial_delay: 0s
        processors:
          tag:
        exporters:
          record/a:
            name: a
          record/b:
            name: b
        service:
          telemetry: {metrics: {level: none}}
          pipelines:
            metrics/a: {receivers: [counter], processors: [tag], exporters: [record/a]}
            metrics/b: {receivers: [counter], processors: [tag], exporters: [record/b]}
        """
    service = Service(config(tmp_path, text))
    service.start()
    try:
        wait_for(lambda: len(plugins.RECORDS.get("a", [])) >= 3 and len(plugins.RECORDS.get("b", [])) >= 3)
    finally:
        service.shutdown(timeout=2)
    procs = [p for pipe in service.pipelines.values() for _, p in pipe.processors]
    assert len(procs) == 2 and procs[0] is not procs[1]
    assert {r[0][3] for r in plugins.RECORDS["a"]} == {"metrics/a"}
    assert {r[0][3] for r in plugins.RECORDS["b"]} == {"metrics/b"}
    # one receiver instance: both pipelines saw the same sequence of collection counts
    seq_a = [r[0][2] for r in plugins.RECORDS["a"]]
    seq_b = [r[0][2] for r in plugins.RECORDS["b"]]
    n = min(len(seq_a), len(seq_b))
    assert seq_a[:n] == seq_b[:n] == list(range(1, n + 1))


def test_shutdown_flushes_queued_batches(tmp_path, plugins):
    text = base("""  record/slow:
            name: slow
            delay: 0.2""", exporters="[record/slow]", interval="20ms")
    service = Service(config(tmp_path, text))
    service.start()
    wait_for(lambda: len(service.exporters["record/slow"].queue) >= 3, what="a backlog")
    service.runners[0].stop()
    service.runners[0].join(2)
    backlog = len(service.exporters["record/slow"].queue)
    delivered_before = len(plugins.RECORDS["slow"])
    assert service.shutdown(timeout=10) is True
    assert len(plugins.RECORDS["slow"]) >= delivered_before + backlog


def test_unavailable_component_is_disabled_and_strict_makes_it_fatal(tmp_path, plugins, caplog):
    text = base().replace("initial_delay: 0s", "initial_delay: 0s\n            unavailable: no GPU on this host")
    service = Service(config(tmp_path, text))
    service.start()
    service.shutdown(timeout=1)
    assert service.status["receiver:counter"].state == "unavailable"
    assert sum("no GPU on this host" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(StartError):
        Service(config(tmp_path, text), strict=True).start()


def test_collection_errors_are_counted_and_collection_goes_on(tmp_path, plugins):
    text = base().replace("initial_delay: 0s", "initial_delay: 0s\n            fail_every: 2")
    service = Service(config(tmp_path, text))
    service.start()
    try:
        wait_for(lambda: service.telemetry.receiver_collections.labels("counter", "error")._value.get() >= 3)
        wait_for(lambda: len(plugins.RECORDS["ok"]) >= 3)
    finally:
        service.shutdown(timeout=1)


def test_failing_processor_drops_batch_not_pipeline(tmp_path, plugins):
    text = base().replace("exporters:\n", "processors:\n          tag:\n            fail: true\n        exporters:\n", 1)
    text = text.replace("receivers: [counter]", "receivers: [counter]\n              processors: [tag]")
    service = Service(config(tmp_path, text))
    service.start()
    try:
        wait_for(lambda: service.status["processor:tag:metrics"].state == "error")
        wait_for(lambda: service.telemetry.receiver_refused.labels("counter")._value.get() >= 1)
        assert service.runners[0].thread.is_alive()
    finally:
        service.shutdown(timeout=1)


def test_collect_once_runs_processors_and_binds_nothing(tmp_path, plugins):
    port = free_port()
    text = base(telemetry_port=port).replace("exporters:\n", "processors:\n          tag:\n        exporters:\n", 1)
    text = text.replace("receivers: [counter]", "receivers: [counter]\n              processors: [tag]")
    data = Service(config(tmp_path, text)).collect_once()
    attrs = data.resource_metrics[0].resource.attributes
    assert attrs["tagged"] == "yes"
    assert plugins.RECORDS.get("ok", []) == []  # printed, not exported


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, PLUGINS, *args], capture_output=True, text=True, timeout=60, **kwargs)


def test_cli_collect_once_formats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(base().replace("initial_delay: 0s", "initial_delay: 0s\n            pods: 2")))
    out = _cli("collect", "--once", "--config", str(path), "--format", "otlp-json")
    assert out.returncode == 0, out.stderr
    request = json.loads(out.stdout)
    names = {a["value"]["stringValue"] for rm in request["resourceMetrics"] for a in rm["resource"]["attributes"]
             if a["key"] == "k8s.pod.name"}
    assert names == {"pod-0", "pod-1"}
    table = _cli("collect", "--once", "--config", str(path))
    assert table.returncode == 0, table.stderr
    assert "POD default/pod-0 uid=uid-0" in table.stdout and "test.value = 1" in table.stdout


def test_cli_collect_once_otlp_json_is_what_the_exporters_send(tmp_path):
    """`collect --format otlp-json` prints the request the otlp exporters would send: a receiver with nothing yet
    adds no empty entry, and a value that is not UTF-8 (a lone surrogate, as os functions make of such bytes) is
    U+FFFD, where the SDK's encoder logged a traceback and dropped the attribute."""
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""
        receivers:
          counter:
            initial_delay: 0s
            namespace: "ns-\\udcff"
          counter/empty:
            initial_delay: 0s
            pods: 0
        exporters:
          debug:
        service:
          telemetry: {metrics: {level: none}}
          pipelines:
            metrics: {receivers: [counter, counter/empty], exporters: [debug]}
        """))
    out = _cli("collect", "--once", "--config", str(path), "--format", "otlp-json")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    (entry,) = json.loads(out.stdout)["resourceMetrics"]
    attrs = {a["key"]: a["value"]["stringValue"] for a in entry["resource"]["attributes"]}
    assert attrs["k8s.namespace.name"] == "ns-\ufffd" and attrs["k8s.pod.name"] == "pod-0"


def test_cli_components_and_version():
    out = subprocess.run([sys.executable, "-m", "podmeter.cli", "components"], capture_output=True, text=True)
    assert out.returncode == 0
    assert any(line.split()[:2] == ["exporter", "debug"] for line in out.stdout.splitlines())
    version = subprocess.run([sys.executable, "-m", "podmeter.cli", "--version"], capture_output=True, text=True)
    assert version.stdout.startswith("podmeter ")


def test_liveness_fails_only_when_a_restart_is_what_recovers(tmp_path):
    """Readiness (`/`) fails while a receiver fails; liveness (`/livez`, the DaemonSet's livenessProbe) stays 200,
    since kubelet restarting the agent would not bring a dead source back and would cost the other receivers' data.
    It fails once a component raises RestartRequired (the NVIDIA driver replaced under the agent)."""
    health = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          counter/flaky: {{collection_interval: 100ms, initial_delay: 0s, fail_every: 1}}
          counter/driver: {{collection_interval: 100ms, initial_delay: 0s, restart_after: 50}}
        exporters:
          debug:
        extensions:
          health_check: {{endpoint: "127.0.0.1:{health}"}}
        service:
          extensions: [health_check]
          pipelines:
            metrics: {{receivers: [counter/flaky, counter/driver], exporters: [debug]}}
        """))
    proc = subprocess.Popen([sys.executable, PLUGINS, "run", "--config", str(path)], stderr=subprocess.PIPE, text=True)
    try:
        def get(p):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}{p}", timeout=1) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())
            except OSError:
                return None

        ready = wait_for(lambda: (r := get("/")) and "counter/flaky" in r[1].get("failing", {}) and r,
                         what="readiness naming the failing receiver")
        assert ready[0] == 503
        assert get("/livez") == (200, {"status": "Alive"})
        live = wait_for(lambda: (r := get("/livez")) and r[0] == 503 and r, what="liveness after RestartRequired")
        assert list(live[1]["failing"]) == ["counter/driver"]
        assert "replaced" in live[1]["failing"]["counter/driver"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "Traceback" not in proc.stderr.read()


def test_cli_run_health_telemetry_and_sigterm(tmp_path):
    health, telemetry = free_port(), free_port()
    out_file = tmp_path / "out.jsonl"
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          counter: {{collection_interval: 100ms, initial_delay: 0s}}
          counter/broken: {{collection_interval: 100ms, fail_start: true}}
          counter/gpu: {{unavailable: "no NVML library"}}
        exporters:
          record: {{path: {out_file}}}
          debug:
        extensions:
          health_check: {{endpoint: "127.0.0.1:{health}"}}
        service:
          extensions: [health_check]
          telemetry: {{metrics: {{address: "127.0.0.1:{telemetry}"}}}}
          pipelines:
            metrics: {{receivers: [counter, counter/gpu], exporters: [record, debug]}}
            metrics/broken: {{receivers: [counter/broken], exporters: [debug]}}
        """))
    proc = subprocess.Popen([sys.executable, PLUGINS, "run", "--config", str(path)], stderr=subprocess.PIPE, text=True)
    try:
        def get(port, p="/"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{p}", timeout=1) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()
            except OSError:
                return None

        status = wait_for(lambda: (r := get(health)) and not json.loads(r[1]).get("starting") and r,
                          what="health after start (503 while components start)")
        assert status[0] == 503 and "counter/broken" in status[1]  # start failure names the component
        metrics = wait_for(lambda: get(telemetry, "/metrics"), what="self-telemetry")[1]
        assert "podmeter_receiver_accepted_metric_points_total" in metrics
        # failure counters are there at 0 before any failure, as the collector's: alerts on increase() see the first
        for series in ('podmeter_exporter_send_failed_metric_points_total{exporter="record"} 0.0',
                       'podmeter_exporter_enqueue_failed_metric_points_total{exporter="record"} 0.0',
                       'podmeter_receiver_refused_metric_points_total{receiver="counter"} 0.0',
                       'podmeter_receiver_collections_total{outcome="error",receiver="counter"} 0.0',
                       'podmeter_receiver_collections_total{outcome="timeout",receiver="counter"} 0.0'):
            assert series in metrics, series
        assert "podmeter_process_resident_memory_bytes" in metrics
        assert "_created" not in metrics  # as the collector's: no second series per counter and histogram child
        wait_for(lambda: out_file.exists() and len(out_file.read_text().splitlines()) >= 3, what="exports")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert stderr.count("no NVML library") == 1
    assert "Traceback" not in stderr


def test_health_ok_when_only_unavailable_components(tmp_path):
    health = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          counter: {{collection_interval: 100ms, initial_delay: 0s}}
          counter/gpu: {{unavailable: "no GPU"}}
        exporters: {{debug: {{}}}}
        extensions: {{health_check: {{endpoint: "127.0.0.1:{health}"}}}}
        service:
          extensions: [health_check]
          telemetry: {{metrics: {{level: none}}}}
          pipelines: {{metrics: {{receivers: [counter, counter/gpu], exporters: [debug]}}}}
        """))
    proc = subprocess.Popen([sys.executable, PLUGINS, "run", "--config", str(path)], stderr=subprocess.DEVNULL)
    try:
        def ok():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health}/", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for(ok, what="health 200")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0


def test_health_is_not_ready_while_components_are_starting(tmp_path, plugins):
    """The health endpoint is served from the moment its extension starts, before exporters and receivers:
    until they have started it answers 503 naming them, as the collector's health_check does; and again from the
    moment shutdown begins (it answered 200 until the agent was gone)."""
    health = free_port()
    service = Service(config(tmp_path, f"""
        receivers:
          counter: {{collection_interval: 100ms}}
        exporters: {{debug: {{}}}}
        extensions: {{health_check: {{endpoint: "127.0.0.1:{health}"}}}}
        service:
          extensions: [health_check]
          telemetry: {{metrics: {{level: none}}}}
          pipelines: {{metrics: {{receivers: [counter], exporters: [debug]}}}}
        """))
    ext = service.extensions["health_check"]
    ext.service = service  # what its start() finds; the others have not started yet
    code, body = ext.report()
    assert code == 503 and "counter" in body["starting"] and "debug" in body["starting"]
    service.start()
    try:
        code, body = ext.report()
        assert code == 200, body
        service.stopping.set()  # what SIGTERM does: from then on not ready, as the collector's health_check
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{health}/", timeout=5)
        assert err.value.code == 503 and json.loads(err.value.read()) == {"status": "Server not available",
                                                                          "stopping": True}
    finally:
        service.shutdown(timeout=2)


def test_collect_once_waits_for_receivers_metadata(tmp_path, plugins):
    """`collect --once` waits (up to --wait) for each receiver's ready() as for the processors': a receiver whose
    metadata comes after start (a CRI or kubelet socket whose first sync failed) is collected with it."""
    text = base().replace("initial_delay: 0s", "initial_delay: 0s\n            sync_delay: 0.5")
    data = Service(config(tmp_path, text)).collect_once(wait_timeout=30)
    assert [rm.resource.attributes["k8s.namespace.name"] for rm in data.resource_metrics] == ["default"]
