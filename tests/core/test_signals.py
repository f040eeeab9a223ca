"""`podmeter run` stops the same way on every signal that ends a process politely: receivers stop, exporters
flush what they hold, exit 0, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from harness import wait_for

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
