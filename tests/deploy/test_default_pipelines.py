"""The top-level pipelines.yaml (packaged as podmeter/pipelines.yaml: what the image runs without --config, and what
`make run` runs): its host paths follow PODMETER_PROC_ROOT and PODMETER_CGROUP_ROOT in every component that reads
them, so that an agent pointed at the host's /proc and cgroups (a container without hostPID or with its own cgroup
namespace, the host's trees mounted under /host) reads all of them there, not some there and some in its own."""

from __future__ import annotations

import os

import pytest

from podmeter.config import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(ROOT, "pipelines.yaml")
HOST = {"PODMETER_PROC_ROOT": "/host/proc", "PODMETER_CGROUP_ROOT": "/host/sys/fs/cgroup"}
FIELDS = {"proc_root": "PODMETER_PROC_ROOT", "cgroup_root": "PODMETER_CGROUP_ROOT"}


def _host_paths(env: dict) -> dict[str, str]:
    """'kind:id.field' -> value, for every configured component with a host path setting."""
    cfg = load([SHIPPED], env=env)
    out = {}
    for kind in ("receiver", "processor"):
        for cid, model in cfg.section(kind).items():
            for field in FIELDS:
                if field in type(model).model_fields:
                    out[f"{kind}:{cid.type}.{field}"] = getattr(model, field)
    return out


def test_every_host_path_follows_the_variables():
    paths = _host_paths({"K8S_NODE_NAME": "node-1", **HOST})
    # the components that read the host's processes or cgroups: cgroup, nvml, ebpf, k8sattributes
    assert {"receiver:cgroup.cgroup_root", "receiver:cgroup.proc_root", "receiver:nvml.proc_root",
            "receiver:ebpf.cgroup_root", "processor:k8sattributes.proc_root"} <= paths.keys(), paths
    wrong = {k: v for k, v in paths.items() if v != HOST[FIELDS[k.rsplit(".", 1)[1]]]}
    assert not wrong, f"ignore {sorted(HOST)}: {wrong}"


@pytest.mark.parametrize("field,default", [("proc_root", "/proc"), ("cgroup_root", "/sys/fs/cgroup")])
def test_host_paths_default_to_this_host(field, default):
    paths = _host_paths({})
    assert {v for k, v in paths.items() if k.endswith("." + field)} == {default}
