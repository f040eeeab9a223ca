"""Runtime hardening: a wedged collection cannot hold up SIGTERM, shutdown is bounded and abandons what does not
return, an exporter or extension that cannot start fails the start (as in the collector), batches abandoned at
shutdown are counted."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from harness import free_port, http_get, wait_for

from podmeter.component import Factory, Receiver, registry
from podmeter.config import ScraperConfig, load
from podmeter.metrics import MetricsBuilder, MetricSpec, now_ns
from podmeter.runtime import Service, StartError

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGINS = os.path.join(HERE, "plugins.py")
VALUE = MetricSpec("test.value", "gauge", "1", "Collections so far")


class WedgeConfig(ScraperConfig):
    wedge_after: int = 1  # collections that return before one blocks for good


class WedgedReceiver(Receiver):
    """The nvml receiver's shape: collect() and shutdown() share a lock, and a collection blocks inside it forever
    (a hung driver call). A test subject for the runtime, like the plug-ins in plugins.py."""

    def __init__(self, settings, config: WedgeConfig) -> None:
        self.config, self.calls = config, 0
        self.lock = threading.Lock()
        self.wedged = threading.Event()
        self.release = threading.Event()

    def collect(self):
        with self.lock:
            self.calls += 1
            if self.calls > self.config.wedge_after:
                self.wedged.set()
                self.release.wait()
            b = MetricsBuilder("podmeter/receiver/wedge", now_ns())
            b.add(VALUE, self.calls, resource={"k8s.pod.uid": "uid-0"})
            return b.build()

    def shutdown(self) -> None:
        with self.lock:  # behind the wedged call
            pass


class HungStartReceiver(Receiver):
    """A receiver whose start() does not return until released, as nvmlInit on a GPU in a bad state. A test
    subject."""

    release = threading.Event()

    def __init__(self, settings, config: ScraperConfig) -> None:
        self.started = False

    def start(self, host) -> None:
        self.release.wait()
        self.started = True

    def collect(self):
        assert self.started, "collected before its start returned"
        b = MetricsBuilder("podmeter/receiver/hungstart", now_ns())
        b.add(VALUE, 1, resource={"k8s.pod.uid": "uid-late"})
        return b.build()


class ScriptConfig(ScraperConfig):
    script: list[str] = []  # per collection: an exception type to raise, or "ok"; then "ok" for good


class ScriptedReceiver(Receiver):
    """Raises what its script says, one entry per collection. A test subject."""

    def __init__(self, settings, config: ScriptConfig) -> None:
        self.script = list(config.script)

    def collect(self):
        step = self.script.pop(0) if self.script else "ok"
        if step != "ok":
            raise {"OSError": OSError, "ValueError": ValueError}[step](f"scripted {step}")
        b = MetricsBuilder("podmeter/receiver/script", now_ns())
        b.add(VALUE, 1, resource={"k8s.pod.uid": "uid-0"})
        return b.build()


@pytest.fixture(autouse=True)
def plugins():
    from core import plugins

    plugins.register()
    plugins.RECORDS.clear()
    registry().register(Factory("receiver", "wedge", WedgeConfig, WedgedReceiver))
    registry().register(Factory("receiver", "hungstart", ScraperConfig, HungStartReceiver))
    registry().register(Factory("receiver", "script", ScriptConfig, ScriptedReceiver))
    yield plugins
    for type_ in ("wedge", "hungstart", "script"):  # test_docs checks every registered type has a README
        registry().factories["receiver"].pop(type_, None)


def config(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return load([str(path)], env={})


def test_shutdown_is_bounded_when_a_receiver_is_wedged(tmp_path, plugins, caplog):
    """Exporters are drained before (not after) the receivers' shutdowns, and a receiver whose shutdown blocks
    behind a hung collection is abandoned at the deadline, logged once."""
    service = Service(config(tmp_path, """
        receivers:
          wedge: {collection_interval: 50ms, initial_delay: 0s, wedge_after: 2}
        exporters:
          record/slow: {name: slow, delay: 0.1}
        service:
          telemetry: {metrics: {level: none}}
          pipelines:
            metrics: {receivers: [wedge], exporters: [record/slow]}
        """))
    service.start()
    receiver = service.receivers["wedge"]
    try:
        wait_for(receiver.wedged.is_set, what="the collection to wedge")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="podmeter"):
            assert service.shutdown(timeout=2.0) is True  # the exporter flushed; only the receiver was abandoned
        assert time.monotonic() - started < 2.0 + 5.0  # generous: the deadline plus the extensions' grace
        assert len(plugins.RECORDS["slow"]) == 2  # both collections before the wedge were exported
        abandoned = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
        assert abandoned == ["receiver wedge: shutdown did not return before the shutdown deadline: abandoned"]
        assert service.status["receiver:wedge"].state == "stopped"
    finally:
        receiver.release.set()


def _cgroup_tree_with_a_fifo(base: str) -> str:
    """A v2 cgroup tree (the cgroup tests' fixtures) where one pod's cpu.stat is a FIFO nobody writes: reading it
    blocks in the kernel, as a wedged cgroup or sysfs file does."""
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "cgroup"))
    try:
        import layouts
    finally:
        sys.path.pop(0)
    layout = next(lay for lay in layouts.all_layouts() if lay.name == "v2-cgroupfs-containerd")
    root = layouts.build(base, layout)
    pod = layout.pods[1]
    stat = os.path.join(root, pod.dir.lstrip("/"), "cpu.stat")
    os.unlink(stat)
    os.mkfifo(stat)
    return root


def test_sigterm_exits_while_a_collection_is_blocked_in_the_kernel(tmp_path):
    """The real cgroup receiver blocked reading a FIFO: `podmeter run` still exits on SIGTERM within the
    shutdown deadline (collections run on daemon threads: nothing waits for the wedged one at exit)."""
    root = _cgroup_tree_with_a_fifo(str(tmp_path / "tree"))
    (tmp_path / "proc").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          cgroup: {{collection_interval: 500ms, initial_delay: 0s, cgroup_root: {root}, proc_root: {tmp_path}/proc}}
        exporters:
          prometheus: {{endpoint: "127.0.0.1:{free_port()}"}}
        service:
          shutdown_timeout: 3s
          telemetry: {{metrics: {{level: none}}}}
          pipelines:
            metrics: {{receivers: [cgroup], exporters: [prometheus]}}
        """))
    log = tmp_path / "agent.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "podmeter.cli", "run", "--config", str(path)], stderr=err)
    try:
        wait_for(lambda: "collection exceeded its timeout" in log.read_text(), timeout=30,
                 what="the collection to block on the FIFO")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=3 + 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "received SIGTERM" in text and "Traceback" not in text


def test_an_exporter_that_cannot_start_fails_the_start_and_releases_the_rest(tmp_path, plugins):
    """A port in use is a configuration error, not "not available on this host": start() raises naming the
    exporter and the cause, after the extension that had started has let its port go."""
    health = free_port()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        service = Service(config(tmp_path, f"""
            receivers:
              counter: {{collection_interval: 50ms, initial_delay: 0s}}
              counter/gpu: {{unavailable: "no GPU"}}
            exporters:
              prometheus: {{endpoint: "127.0.0.1:{busy.getsockname()[1]}"}}
              record/ok: {{name: ok}}
            extensions:
              health_check: {{endpoint: "127.0.0.1:{health}"}}
            service:
              extensions: [health_check]
              telemetry: {{metrics: {{level: none}}}}
              pipelines:
                metrics: {{receivers: [counter, counter/gpu], exporters: [prometheus, record/ok]}}
            """))
        with pytest.raises(StartError) as err:
            service.start()
    finally:
        busy.close()
    message = str(err.value)
    assert message.startswith("exporter prometheus failed to start: cannot listen on 127.0.0.1:")
    assert "Address already in use" in message and "\n" not in message
    assert "gpu" not in message  # an unavailable receiver stays optional
    assert http_get(f"http://127.0.0.1:{health}/", timeout=0.5) is None  # the health server was shut down
    with socket.socket() as again:
        again.bind(("127.0.0.1", health))


def test_cli_run_exits_1_with_one_line_naming_the_extension(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          counter: {{collection_interval: 100ms, initial_delay: 0s}}
        exporters:
          record: {{name: ok}}
        extensions:
          health_check: {{endpoint: "127.0.0.1:{busy.getsockname()[1]}"}}
        service:
          extensions: [health_check]
          telemetry: {{metrics: {{level: none}}}}
          pipelines:
            metrics: {{receivers: [counter], exporters: [record]}}
        """))
    try:
        out = subprocess.run([sys.executable, PLUGINS, "run", "--config", str(path)], capture_output=True,
                             text=True, timeout=60)
    finally:
        busy.close()
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "extension health_check failed to start" in errors[0], out.stderr
    assert "Address already in use" in errors[0]
    assert "Traceback" not in out.stderr


def test_batches_still_queued_at_the_deadline_are_counted_and_logged(tmp_path, plugins, caplog):
    service = Service(config(tmp_path, """
        receivers:
          counter: {collection_interval: 10ms, initial_delay: 0s}
        exporters:
          record/hang: {name: hang, hang: true}
        service:
          telemetry: {metrics: {level: none}}
          pipelines:
            metrics: {receivers: [counter], exporters: [record/hang]}
        """))
    service.start()
    worker = service.exporters["record/hang"]
    try:
        wait_for(lambda: len(worker.queue) >= 3, what="a backlog behind the hung exporter")
        with caplog.at_level(logging.WARNING, logger="podmeter"):
            assert service.shutdown(timeout=0.5) is False
        lines = [r.getMessage() for r in caplog.records if "not exported before the shutdown deadline" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith("exporter record/hang: ")
        failed = service.telemetry.exporter_failed.labels("record/hang")._value.get()
        assert failed >= 3  # one point per batch: every batch left in the queue
        assert len(worker.queue) == 0
    finally:
        worker.exporter.release.set()


def test_collection_timeout_and_shutdown_do_not_wait_for_each_other(tmp_path, plugins):
    """A collection in progress is not waited for once shutdown starts: the scheduler returns at once."""
    service = Service(config(tmp_path, """
        receivers:
          wedge: {collection_interval: 50ms, initial_delay: 0s, timeout: 60s, wedge_after: 0}
        exporters:
          record/ok: {name: ok}
        service:
          telemetry: {metrics: {level: none}}
          pipelines:
            metrics: {receivers: [wedge], exporters: [record/ok]}
        """))
    service.start()
    receiver = service.receivers["wedge"]
    try:
        wait_for(receiver.wedged.is_set, what="the collection to wedge")
        runner = service.runners[0]
        runner.stop()
        runner.join(5.0)
        assert not runner.thread.is_alive()
        assert service.telemetry.receiver_collections.labels("wedge", "timeout")._value.get() == 0
        collector = runner.collector.thread
        assert collector.daemon  # the wedged call's thread does not hold up the interpreter's exit
    finally:
        receiver.release.set()
        service.shutdown(timeout=1)



def test_a_receiver_whose_start_hangs_is_disabled_and_the_rest_runs(tmp_path, plugins, monkeypatch, caplog):
    """A start() that did not return (a hung driver call) kept every receiver after it from starting, and health
    at 503 "starting" naming nothing. Past RECEIVER_START_TIMEOUT it is a component error, logged once, and the
    rest starts and runs; health names it and the cause. Should its start return later, it is collected."""
    from podmeter import runtime

    monkeypatch.setattr(runtime, "RECEIVER_START_TIMEOUT", 0.5)
    health = free_port()
    service = Service(config(tmp_path, f"""
        receivers:
          hungstart:
          counter: {{collection_interval: 100ms, initial_delay: 0s}}
        exporters:
          record:
        extensions: {{health_check: {{endpoint: "127.0.0.1:{health}"}}}}
        service:
          extensions: [health_check]
          telemetry: {{metrics: {{level: none}}}}
          pipelines:
            metrics: {{receivers: [hungstart, counter], exporters: [record]}}
        """))
    try:
        with caplog.at_level(logging.WARNING, logger="podmeter"):
            starter = threading.Thread(target=service.start, daemon=True)  # hangs for good without the bound
            starter.start()
            starter.join(60)
        assert not starter.is_alive(), "start() is stuck behind the receiver's start"
        wait_for(lambda: plugins.RECORDS.get("default"), what="the other receiver's exports")
        assert service.status["receiver:hungstart"].state == "error"
        code, body = service.extensions["health_check"].report()
        assert code == 503 and not body["starting"], body
        assert "has not returned after 0.5s" in body["failing"]["hungstart"]
        assert body["components"]["receiver:counter"] == "ok"
        assert sum("hungstart" in r.getMessage() for r in caplog.records) == 1
        HungStartReceiver.release.set()  # the start returns after all: collected from then on
        wait_for(lambda: any(p[0] == "uid-late" for batch in plugins.RECORDS["default"] for p in batch),
                 what="the late receiver's exports")
        assert service.extensions["health_check"].report()[0] == 200
    finally:
        HungStartReceiver.release.set()
        service.shutdown(timeout=1)


def test_each_kind_of_collection_failure_is_logged_once_and_the_recovery_too(tmp_path, plugins, caplog):
    """A receiver failing in one way, then another (a timeout, then an exception; or one exception type, then
    another) logs each at WARNING once: the second is not hidden at DEBUG behind the first. Recovery is logged."""
    service = Service(config(tmp_path, """
        receivers:
          script: {collection_interval: 50ms, initial_delay: 0s,
                   script: [OSError, OSError, ValueError, ValueError, ok]}
        exporters:
          record:
        service:
          telemetry: {metrics: {level: none}}
          pipelines:
            metrics: {receivers: [script], exporters: [record]}
        """))
    with caplog.at_level(logging.INFO, logger="podmeter"):
        service.start()
        try:
            wait_for(lambda: plugins.RECORDS.get("default"), what="a collection after the failures")
        finally:
            service.shutdown(timeout=1)
    records = [r for r in caplog.records if r.name == "podmeter.receiver.script"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "OSError: scripted OSError" in warnings[0] and "ValueError: scripted ValueError" in warnings[1]
    assert sum("recovered" in r.getMessage() for r in records if r.levelno == logging.INFO) >= 1


def test_only_exporters_have_exporter_series():
    """The generic exporter counters an exporter reports through its telemetry appear once it reports: a
    receiver's or processor's telemetry does not show up as an exporter."""
    import logging

    from prometheus_client import generate_latest

    from podmeter.telemetry import ComponentTelemetry, Telemetry

    t = Telemetry()
    ComponentTelemetry(t, "cgroup", logging.getLogger("test.cgroup"))
    otlp = ComponentTelemetry(t, "otlp", logging.getLogger("test.otlp"))
    otlp.sent(5)
    text = generate_latest(t.registry).decode()
    assert 'exporter="cgroup"' not in text
    assert 'podmeter_exporter_sent_metric_points_total{exporter="otlp"} 5.0' in text
