"""`podmeter run` stops the same way on every signal that ends a process politely: receivers stop, exporters
flush what they hold, exit 0, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from harness import free_port, http_get, wait_for

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins.py")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_run_stops_cleanly_on(tmp_path, signum):
    """SIGHUP too: a terminal closing (or a supervisor that sends it) would otherwise kill the agent on the spot,
    with nothing flushed. The collector reloads its configuration on SIGHUP; podmeter has no reload, and a restart
    (by kubelet or systemd) is what reads a changed configuration."""
    out_file = tmp_path / "out.jsonl"
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          counter: {{collection_interval: 100ms, initial_delay: 0s}}
        exporters:
          record: {{path: {out_file}}}
        service:
          telemetry: {{metrics: {{level: none}}}}
          pipelines:
            metrics: {{receivers: [counter], exporters: [record]}}
        """))
    proc = subprocess.Popen([sys.executable, PLUGINS, "run", "--config", str(path)], stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for(lambda: out_file.exists() and out_file.read_text().count("\n") >= 2, what="exports")
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read()
    assert f"received {signum.name}" in stderr and "stopped" in stderr, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_second_signal_while_stopping_exits_at_once(tmp_path, second):
    """The shutdown waits up to shutdown_timeout for a hung exporter; a second signal (a second Ctrl-C, or a
    supervisor done waiting) ends the process then and there, exit 1, saying so in one line."""
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""
        receivers:
          counter: {collection_interval: 100ms, initial_delay: 0s}
        exporters:
          record: {hang: true}
        service:
          shutdown_timeout: 10m
          telemetry: {metrics: {level: none}}
          pipelines:
            metrics: {receivers: [counter], exporters: [record]}
        """))
    log = tmp_path / "agent.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, PLUGINS, "run", "--config", str(path)], stderr=err)
    try:
        wait_for(lambda: "podmeter started" in log.read_text(), what="start")
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "received SIGTERM" in log.read_text(), what="the shutdown to begin")
        proc.send_signal(second)
        assert proc.wait(timeout=60) == 1  # not after the 10m shutdown_timeout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"received {second.name} while stopping: exiting now" in text, text
    assert "Traceback" not in text


def test_log_level_flag_takes_the_collectors_warn(tmp_path):
    """service::telemetry::logs::level takes `warn` (the collector's word); --log-level takes it too."""
    path = tmp_path / "c.yaml"
    path.write_text("receivers: {}\n")
    out = subprocess.run([sys.executable, "-m", "podmeter.cli", "run", "--log-level", "warn", "--config", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "invalid configuration" in out.stderr and "invalid choice" not in out.stderr


@pytest.mark.parametrize("strict", [False, True], ids=["", "strict"])
def test_sigterm_while_a_receiver_start_hangs_stops_without_waiting_for_it(tmp_path, strict):
    """A receiver whose start() hangs is given up on after RECEIVER_START_TIMEOUT (20s); SIGTERM before then does
    not wait for it: the agent stops (exit 0) well within the pod's terminationGracePeriodSeconds (30s), rather than
    after the start timeout plus the shutdown. With --strict too: the start cut short is the stop the operator
    asked for, not exit 1 with "start-up failed"."""
    health = free_port()
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          counter: {{hang_start: true}}
        exporters:
          record:
        extensions:
          health_check: {{endpoint: "127.0.0.1:{health}"}}
        service:
          extensions: [health_check]
          telemetry: {{metrics: {{level: none}}}}
          pipelines:
            metrics: {{receivers: [counter], exporters: [record]}}
        """))
    log = tmp_path / "agent.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, PLUGINS, "run", *(["--strict"] if strict else []), "--config",
                                 str(path)], stderr=err)
    try:
        wait_for(lambda: (r := http_get(f"http://127.0.0.1:{health}/")) and '"counter"' in r[1], what="the start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0  # not after the 20s start timeout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "received SIGTERM" in text and "Traceback" not in text, text
    assert "start-up failed" not in text and "ERROR" not in text, text

