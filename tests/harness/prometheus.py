"""A real Prometheus server (Debian's /usr/bin/prometheus) on loopback, and promtool's linter.

    from harness.prometheus import PrometheusServer, promtool_check_metrics

    with PrometheusServer(["127.0.0.1:9464"]) as prom:      # scrapes every 1s
        rows = prom.wait_for("container_cpu_time_seconds_total", lambda rows: len(rows) == 2)
        rows[0] -> ({"__name__": ..., "k8s_pod_uid": ..., ...}, 1.5)
        prom.query('sum by (k8s_pod_uid) (...)')           # -> [(labels, value)], instant query
        prom.target_health()                                # -> [{"health": "up", "lastError": ""...}]

    rc, output = promtool_check_metrics(exposition_text)    # rc 0: clean; 3: lint problems; 1: parse error

Options: `scheme="https"` with `tls_config={"ca_file": ..., "cert_file": ..., "key_file": ...}`,
`basic_auth={"username": ..., "password": ...}`, `scrape_interval="1s"`, `metrics_path="/metrics"`.
Needs the `prometheus` Debian package (tests call `harness.require` on it via `prometheus_binary()`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

from harness import free_port, require, stop_process


def prometheus_binary() -> str:
    path = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)
    require(path is not None, "needs the prometheus server (apt-get install prometheus)")
    return path  # type: ignore[return-value]


def promtool_binary() -> str:
    path = shutil.which("promtool")
    require(path is not None, "needs promtool (apt-get install prometheus)")
    return path  # type: ignore[return-value]


def promtool_check_metrics(text: bytes | str) -> tuple[int, str]:
    """Lint exposition text with `promtool check metrics`: (exit code, output). 0 means clean."""
    data = text.encode() if isinstance(text, str) else text
    proc = subprocess.run([promtool_binary(), "check", "metrics"], input=data, capture_output=True, timeout=30)
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


class PrometheusServer:
    def __init__(self, targets: list[str], scrape_interval: str = "1s", scheme: str = "http",
                 tls_config: dict | None = None, basic_auth: dict | None = None, metrics_path: str = "/metrics",
                 job: str = "podmeter") -> None:
        self.binary = prometheus_binary()
        self.dir = tempfile.mkdtemp(prefix="prom-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        scrape = {"job_name": job, "scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                  "metrics_path": metrics_path, "scheme": scheme, "static_configs": [{"targets": list(targets)}]}
        if tls_config:
            scrape["tls_config"] = tls_config
        if basic_auth:
            scrape["basic_auth"] = basic_auth
        self.config_path = os.path.join(self.dir, "prometheus.yml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump({"global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
                            "scrape_configs": [scrape]}, f)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.dir, "prometheus.log")

    def start(self) -> PrometheusServer:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.dir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not become ready: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def _api(self, path: str, params: dict) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus API {path} failed: {body}")
        return body["data"]

    def query(self, expr: str) -> list[tuple[dict, float]]:
        """Instant PromQL query: [(labels, value)]."""
        data = self._api("/api/v1/query", {"query": expr})
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def wait_for(self, expr: str, predicate=lambda rows: bool(rows), timeout: float = 30.0) -> list[tuple[dict, float]]:
        """Poll `expr` until predicate(rows) holds; return the rows (raise with the last rows on timeout)."""
        deadline = time.monotonic() + timeout
        rows: list = []
        while time.monotonic() < deadline:
            rows = self.query(expr)
            if predicate(rows):
                return rows
            time.sleep(0.25)
        raise AssertionError(f"PromQL {expr!r} never matched within {timeout}s; last result {rows}; "
                             f"targets {self.target_health()}")

    def target_health(self) -> list[dict]:
        data = self._api("/api/v1/targets", {})
        return [{"health": t["health"], "lastError": t.get("lastError", ""), "scrapeUrl": t["scrapeUrl"]}
                for t in data["activeTargets"]]

    def stop(self) -> None:
        stop_process(self.proc)
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
