"""The shipped pipelines.yaml on this host: validates; runs; absent hardware/sockets are reported once; health
answers 200; metrics are served; SIGTERM exits 0 (what `make run` does)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from harness import free_port, http_get, require, wait_for
from harness.cgroups import PodCgroup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(ROOT, "pipelines.yaml")


def podmeter(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "podmeter.cli", *args], capture_output=True, text=True,
                          timeout=60, **kwargs)


def test_shipped_config_validates():
    result = podmeter("validate", "--config", SHIPPED)
    assert result.returncode == 0, result.stderr



def test_run_with_shipped_config_on_this_host(tmp_path):
    require(os.geteuid() == 0, "the shipped pipeline reads host cgroups and loads eBPF as root")
    # a fresh CI machine runs no pods: give the cgroup receiver one real pod to find
    pod = PodCgroup().create()
    pod.spawn(["sleep", "300"])
    prom, health, telemetry = free_port(), free_port(), free_port()
    # a second --config merges over the shipped one: only the listen ports change
    override = tmp_path / "ports.yaml"
    override.write_text(textwrap.dedent(f"""
        exporters:
          prometheus:
            endpoint: 127.0.0.1:{prom}
        extensions:
          health_check:
            endpoint: 127.0.0.1:{health}
        service:
          telemetry:
            metrics:
              address: 127.0.0.1:{telemetry}
        receivers:
          cgroup:
            collection_interval: 1s
            initial_delay: 0s
        """))
    env = {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)}  # make sure no NVML library is found
    proc = subprocess.Popen([sys.executable, "-m", "podmeter.cli", "run", "--config", SHIPPED, "--config",
                             str(override)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        status = wait_for(lambda: (r := http_get(f"http://127.0.0.1:{health}/")) and not json.loads(r[1]).get("starting")
                          and r, timeout=90, what="health after start (503 while components start)")
        assert status[0] == 200, status
        body = wait_for(lambda: (r := http_get(f"http://127.0.0.1:{prom}/metrics")) and pod.uid in r[1] and r[1],
                        timeout=30, what="the pod's cgroup metrics on the prometheus endpoint")
        assert "container_cpu_time_seconds_total" in body
        assert "# TYPE" in body
        assert http_get(f"http://127.0.0.1:{telemetry}/metrics")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pod.destroy()
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr
    # no GPU here: said once, not on every collection
    nvml_lines = [line for line in stderr.splitlines() if "nvml" in line and "not available" in line]
    assert len(nvml_lines) == 1, stderr
