from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from harness import require, require_root
from harness.cgroups import PodCgroup, v2_root

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.telemetry import null_component_telemetry
from receivers.ebpf import factory
from receivers.ebpf.programs import DEFAULT_OBJECT

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOAD = os.path.join(HERE, "workload.py")
EBPF_DIR = os.path.dirname(DEFAULT_OBJECT)


def ensure_object() -> None:
    """The object is a build output (gitignored): build it here when the tools exist, as `make bpf` would (make
    rebuilds it when podmeter.bpf.c or podmeter.h changed, so tests never run a stale object)."""
    if shutil.which("clang") and shutil.which("bpftool"):
        subprocess.run(["make", "-s", "-C", EBPF_DIR], check=False, capture_output=True, timeout=120)
    require(os.path.exists(DEFAULT_OBJECT), f"{DEFAULT_OBJECT} not built: run `make bpf` (clang, bpftool, libbpf-dev)")


def make_receiver(**config):
    settings = CreateSettings(id=ComponentID("ebpf"), kind="receiver", logger=logging.getLogger("test.ebpf"),
                              telemetry=null_component_telemetry("ebpf"))
    return factory.create(settings, factory.config_model.model_validate(config))


@pytest.fixture
def receiver_factory():
    """Start receivers on the real kernel (root, BTF, cgroup2); shut them down after the test."""
    require_root()
    require(os.path.exists("/sys/kernel/btf/vmlinux"), "needs a kernel with BTF")
    require(v2_root() is not None, "needs a cgroup2 hierarchy")
    ensure_object()
    started = []

    def start(**config):
        r = make_receiver(**config)
        r.start(Host())
        started.append(r)
        return r

    yield start
    for r in started:
        r.shutdown()


@pytest.fixture
def pod():
    require_root()
    p = PodCgroup().create()
    yield p
    p.destroy()


def run_workload(pod: PodCgroup, *args, timeout: float = 120, check: bool = True) -> dict:
    proc = pod.spawn([sys.executable, WORKLOAD, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True)
    out, err = proc.communicate(timeout=timeout)
    if check:
        assert proc.returncode == 0, f"workload {args} failed: {err[-2000:]}"
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    result["returncode"] = proc.returncode
    return result


def series(md, pod: PodCgroup | None = None) -> dict:
    """{(metric name, sorted point attributes): value or histogram point} for one pod's container resource
    (all resources when pod is None, keyed with the resource too)."""
    out = {}
    for rm in md.resource_metrics:
        res = dict(rm.resource.attributes)
        if pod is not None and (res.get("k8s.pod.uid") != pod.uid or res.get("container.id") != pod.container_id):
            continue
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    key = (metric.name, tuple(sorted(p.attributes.items())))
                    if pod is None:
                        key = (tuple(sorted(res.items())),) + key
                    out[key] = p.value if hasattr(p, "value") else p
    return out


@pytest.fixture(name="workload")
def _workload():
    return run_workload


@pytest.fixture(name="series")
def _series():
    return series


@pytest.fixture
def built_object() -> str:
    ensure_object()
    return DEFAULT_OBJECT
