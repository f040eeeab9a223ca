"""The synthetic node's pods in the project's API stand-in (tests/harness/apiserver.py), run as its own process.

A separate process keeps the stand-in's own CPU (serving watches) out of the in-process CPU figures and its memory
(it keeps an event history) out of the RSS the soak checks. Pods, ReplicaSets and Deployments are created and
deleted over its REST API, as kubectl would.

    python -m bench.api --port-file F      # the server process (started by start())
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
import uuid

from . import REPO

NAMESPACES = ("bench-a", "bench-b", "bench-c")


class ApiStandIn:
    def __init__(self, proc: subprocess.Popen, port: int, workdir: str) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.kubeconfig = os.path.join(workdir, "kubeconfig.yaml")
        with open(self.kubeconfig, "w") as f:
            f.write("apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster:\n"
                    f"    server: {self.url}\ncontexts:\n- name: bench\n  context:\n    cluster: bench\n"
                    "    user: bench\ncurrent-context: bench\nusers:\n- name: bench\n  user:\n    token: bench\n")
        self._conn: http.client.HTTPConnection | None = None
        self._owners: set[tuple[str, str]] = set()

    # -- REST ------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                data = json.dumps(body).encode() if body is not None else None
                self._conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                                     "Authorization": "Bearer bench"})
                resp = self._conn.getresponse()
                payload = resp.read()
                return resp.status, (json.loads(payload) if payload else {})
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _create(self, path: str, body: dict) -> None:
        status, out = self._request("POST", path, body)
        if status not in (200, 201, 409):
            raise RuntimeError(f"API stand-in: POST {path}: {status} {out.get('message', '')}")

    def add_pod(self, pod) -> None:
        obj = pod.api_object()
        ns = pod.namespace
        if (ns, pod.replicaset) not in self._owners:
            self._create(f"/apis/apps/v1/namespaces/{ns}/deployments",
                         {"metadata": {"name": pod.deployment, "labels": {"app": pod.deployment}}, "spec": {}})
            self._create(f"/apis/apps/v1/namespaces/{ns}/replicasets", {
                "metadata": {"name": pod.replicaset, "labels": {"app": pod.deployment},
                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                                  "name": pod.deployment, "uid": str(uuid.uuid4()),
                                                  "controller": True}]},
                "spec": {}})
            self._owners.add((ns, pod.replicaset))
        self._create(f"/api/v1/namespaces/{ns}/pods", obj)

    def delete_pod(self, pod) -> None:
        status, out = self._request("DELETE", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}")
        if status not in (200, 202, 404):
            raise RuntimeError(f"API stand-in: DELETE pod {pod.name}: {status} {out.get('message', '')}")

    # -- podmeter side -----------------------------------------------------------------------------------------

    def k8sattributes_config(self, node: str, soak: bool = False) -> dict:
        cfg = {
            "auth_type": "kubeConfig",
            "kube_config_path": self.kubeconfig,
            "filter": {"node": node},
            "wait_for_metadata": True,
            "wait_for_metadata_timeout": "30s",
            "extract": {"labels": [{"key": "app"}, {"key": "team"}]},
        }
        if soak:
            # the soak compresses days of pod churn into seconds (the short one: 300 cycles in about 5 s): a
            # deleted pod's metadata is kept no longer than until the next event or collection, so that the pods
            # kept are those of the cycle at hand and "bounded" is about count, not about the deletion rate
            cfg["pod_delete_grace_period"] = "0s"
        return cfg

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": self.kubeconfig}

    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.proc.kill()
        self.proc.wait()


def start(node):
    """-> (stand-in, "") or (None, why it is not there). Node pods (node.pods) are created in it."""
    try:
        from harness import apiserver  # noqa: F401
    except ImportError as exc:
        return None, f"no API stand-in ({exc}): k8sattributes not measured"
    port_file = os.path.join(node.workdir, "apiserver.port")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    proc = subprocess.Popen([sys.executable, "-m", "bench.api", "--port-file", port_file], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not os.path.exists(port_file):
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode(errors="replace")[-500:] if proc.poll() is not None else "timeout"
            proc.kill()
            return None, f"the API stand-in did not start: {err}"
        time.sleep(0.05)
    with open(port_file) as f:
        port = int(f.read())
    api = ApiStandIn(proc, port, node.workdir)
    try:
        for pod in getattr(node, "pods", []):
            api.add_pod(pod)
    except Exception:
        api.stop()
        raise
    return api, ""


def _serve(port_file: str) -> None:
    from harness import apiserver

    # the handler writes headers and body in separate small sends: with Nagle on, each response waits for the
    # client's delayed ACK (40 ms). The bench creates thousands of pods; a real API server sets TCP_NODELAY too.
    apiserver._Handler.disable_nagle_algorithm = True
    api = apiserver.ApiServer(token="bench").start()
    for ns in NAMESPACES:
        api.create("namespaces", None, {"metadata": {"name": ns, "labels": {"team": "bench"}}})
    tmp = port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(api.port))
    os.replace(tmp, port_file)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port-file", required=True)
    _serve(p.parse_args().port_file)
