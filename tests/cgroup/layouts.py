"""Fixture cgroup trees for every layout, built from tests/fixtures/cgroup/ with what the receiver must find."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "cgroup")
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio")

U1 = "0f1c2d3e-4a5b-4c6d-8e9f-0123456789ab"
U2 = "11111111-2222-4333-8444-555555555555"
U3 = "a2b3c4d5-e6f7-4809-9a1b-2c3d4e5f6a7b"
STATIC = "6d5a1c3b9e8f7a6b5c4d3e2f1a0b9c8d"  # a static pod's uid: 32 hex, no dashes
C1, C2, C3, C4 = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)
PAUSE = "f" * 64


def sd(uid: str) -> str:
    """A pod uid as the systemd driver writes it in slice names."""
    return uid.replace("-", "_")


@dataclass
class Pod:
    uid: str
    qos: str
    dir: str | None  # None: the layout has no pod cgroup (containerd's "slice:prefix:id" form)
    containers: list[tuple[str, str, str | None]] = field(default_factory=list)  # (dir, id, runtime)


@dataclass
class Layout:
    name: str
    version: str  # v1, v2, hybrid; v1-comount: cpu and cpuacct mounted together as `cpu,cpuacct` (with symlinks)
    pods: list[Pod]
    decoys: list[str] = field(default_factory=list)  # directories that are not pods or containers
    sub_cgroups: list[str] = field(default_factory=list)  # made inside containers; must not be reported


def _cgroupfs(base: str = "/kubepods", runtime_prefix: str = "", runtime: str | None = None) -> list[Pod]:
    def c(pod_dir: str, cid: str) -> tuple[str, str, str | None]:
        return f"{pod_dir}/{runtime_prefix}{cid}", cid, runtime

    b, g, e = f"{base}/burstable/pod{U1}", f"{base}/pod{U2}", f"{base}/besteffort/pod{U3}"
    return [Pod(U1, "Burstable", b, [c(b, C1), c(b, C2)]), Pod(U2, "Guaranteed", g, [c(g, C3)]),
            Pod(U3, "BestEffort", e, [c(e, C4)])]


def _systemd(scope: str, runtime: str, base: str = "/kubepods.slice", prefix: str = "kubepods") -> list[Pod]:
    def c(pod_dir: str, cid: str) -> tuple[str, str, str | None]:
        return f"{pod_dir}/{scope}-{cid}.scope", cid, runtime

    b = f"{base}/{prefix}-burstable.slice/{prefix}-burstable-pod{sd(U1)}.slice"
    g = f"{base}/{prefix}-pod{sd(U2)}.slice"
    e = f"{base}/{prefix}-besteffort.slice/{prefix}-besteffort-pod{sd(U3)}.slice"
    return [Pod(U1, "Burstable", b, [c(b, C1), c(b, C2)]), Pod(U2, "Guaranteed", g, [c(g, C3)]),
            Pod(U3, "BestEffort", e, [c(e, C4)])]


def all_layouts() -> list[Layout]:
    host = ["/system.slice", "/system.slice/sshd.service", "/user.slice", "/init.scope"]
    out = [
        Layout("v1-cgroupfs-containerd", "v1", _cgroupfs(), ["/docker", "/kubepods/burstable"] + host[:2]),
        Layout("v2-cgroupfs-containerd", "v2", _cgroupfs(), host),
        Layout("hybrid-cgroupfs-containerd", "hybrid", _cgroupfs(), host),
        Layout("v1-cgroupfs-crio", "v1", _cgroupfs(runtime_prefix="crio-", runtime="cri-o"), host),
        Layout("v2-systemd-containerd", "v2", _systemd("cri-containerd", "containerd"), host),
        Layout("v1-systemd-containerd", "v1", _systemd("cri-containerd", "containerd"), host),
        Layout("hybrid-systemd-containerd", "hybrid", _systemd("cri-containerd", "containerd"), host),
        Layout("v2-systemd-crio", "v2", _systemd("crio", "cri-o"), host),
        Layout("v2-systemd-docker", "v2", _systemd("docker", "docker"), host),
        Layout("v1-systemd-docker", "v1", _systemd("docker", "docker"), host),
        # kind: the node's kubelet nests its tree in kubelet.slice; seen from the host, inside the node container
        Layout("v2-kind-nested", "v2", _systemd("cri-containerd", "containerd", "/kubelet.slice/kubelet-kubepods.slice",
                                                "kubelet-kubepods"), host),
        Layout("v2-kind-from-host", "v2",
               _systemd("cri-containerd", "containerd",
                        "/system.slice/docker-" + "9" * 64 + ".scope/kubelet.slice/kubelet-kubepods.slice",
                        "kubelet-kubepods"), host),
        Layout("v1-static-pod", "v1",
               [Pod(STATIC, "Guaranteed", f"/kubepods/pod{STATIC}", [(f"/kubepods/pod{STATIC}/{C1}", C1, None)])],
               host),
    ]
    # CRI-O's conmon scope beside each container: counted in the pod, never reported as a container
    crio = out[7]
    for pod in crio.pods:
        crio.decoys = crio.decoys + [f"{pod.dir}/crio-conmon-{cid}.scope" for _d, cid, _r in pod.containers]
    # containerd with the systemd driver outside systemd: pod slice and container in one directory name
    colon = "/system.slice/containerd.service"
    out.append(Layout("v2-containerd-colon-form", "v2", [
        Pod(U1, "Burstable", None, [(f"{colon}/kubepods-burstable-pod{sd(U1)}.slice:cri-containerd:{C1}", C1,
                                      "containerd"),
                                     (f"{colon}/kubepods-burstable-pod{sd(U1)}.slice:cri-containerd:{C2}", C2,
                                      "containerd")]),
        Pod(U3, "BestEffort", None, [(f"{colon}/kubepods-besteffort-pod{sd(U3)}.slice:cri-containerd:{C4}", C4,
                                      "containerd")]),
    ], [*host, colon]))
    # sub-cgroups made inside a container (systemd or a nested runtime in the pod)
    sub = Layout("v2-sub-cgroups", "v2", _systemd("cri-containerd", "containerd"), host)
    first = sub.pods[0].containers[0][0]
    sub.sub_cgroups = [f"{first}/init.scope", f"{first}/payload", f"{first}/payload/{C3}"]
    out.append(sub)
    v1sub = Layout("v1-sub-cgroups", "v1", _cgroupfs(), host)
    v1sub.sub_cgroups = [f"{v1sub.pods[0].containers[0][0]}/nested"]
    out.append(v1sub)
    # cpu and cpuacct co-mounted (most distributions' v1 layout), the systemd driver
    out.append(Layout("v1-comounted-systemd-containerd", "v1-comount", _systemd("cri-containerd", "containerd"), host))
    # pods with a pause (sandbox) container as containerd creates it
    pause = Layout("v1-cgroupfs-with-pause", "v1", _cgroupfs(), host)
    pause.pods[0].containers.append((f"{pause.pods[0].dir}/{PAUSE}", PAUSE, None))
    out.append(pause)
    return out


# -- building --------------------------------------------------------------------------------------------------------

POD_LIMIT = 268435456
POD_PIDS_LIMIT = 1000


def _copy_files(src: str, dst: str, overrides: dict[str, str] | None = None) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    for name, text in (overrides or {}).items():
        if os.path.exists(os.path.join(dst, name)):
            with open(os.path.join(dst, name), "w") as f:
                f.write(text)


def _write_dir(root: str, version: str, rel: str, overrides: dict[str, str] | None = None) -> None:
    if version == "v2":
        _copy_files(os.path.join(FIXTURES, "v2"), root + rel, overrides)
        return
    for ctrl in V1_CONTROLLERS:
        where = "cpu,cpuacct" if version == "v1-comount" and ctrl in ("cpu", "cpuacct") else ctrl
        _copy_files(os.path.join(FIXTURES, "v1", ctrl), f"{root}/{where}{rel}", overrides)
    if version == "hybrid":
        _copy_files(os.path.join(FIXTURES, "v1", "unified"), f"{root}/unified{rel}", overrides)


def build(base: str, layout: Layout) -> str:
    """Lay the tree out under base/sys/fs/cgroup; returns that cgroup_root."""
    root = os.path.join(base, "sys", "fs", "cgroup")
    os.makedirs(root, exist_ok=True)
    if layout.version == "v2":
        with open(f"{root}/cgroup.controllers", "w") as f:
            f.write("cpuset cpu io memory hugetlb pids rdma misc\n")
    if layout.version == "hybrid":
        os.makedirs(f"{root}/unified", exist_ok=True)
        with open(f"{root}/unified/cgroup.controllers", "w") as f:
            f.write("\n")  # hybrid: every controller is on v1
    _write_dir(root, layout.version, "")
    if layout.version == "v1-comount":
        os.symlink("cpu,cpuacct", f"{root}/cpu")
        os.symlink("cpu,cpuacct", f"{root}/cpuacct")
    for decoy in layout.decoys:
        _write_dir(root, layout.version, decoy)
    pod_over = {"memory.max": f"{POD_LIMIT}\n", "memory.limit_in_bytes": f"{POD_LIMIT}\n",
                "pids.max": f"{POD_PIDS_LIMIT}\n"}
    for pod in layout.pods:
        if pod.dir:
            _write_dir(root, layout.version, pod.dir, pod_over)
        for cdir, _cid, _rt in pod.containers:
            _write_dir(root, layout.version, cdir)
    # sub-cgroups hold values a reader must never report as the container's
    for sub in layout.sub_cgroups:
        _write_dir(root, layout.version, sub, {"memory.current": "1\n", "memory.usage_in_bytes": "1\n"})
    # the device behind 8:0 in this fixture's sysfs
    os.makedirs(os.path.join(base, "sys", "dev", "block"), exist_ok=True)
    os.symlink("../../devices/pci0000:00/0000:00:04.0/virtio1/block/vda",
               os.path.join(base, "sys", "dev", "block", "8:0"))
    return root
