"""PID -> cgroup -> pod uid and container id, shared by the cgroup, nvml and ebpf receivers and k8sattributes.

Parses every cgroup layout users run: cgroup v1 and v2; kubelet's cgroupfs driver
(`/kubepods/<qos>/pod<uid>/<id>`, Guaranteed pods directly under `kubepods`) and systemd driver
(`/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_with_underscores>.slice/<runtime>-<id>.scope`);
runtimes containerd (`cri-containerd-`), CRI-O (`crio-`, `crio-conmon-`) and Docker (`docker-`);
containerd's `...slice:cri-containerd:<id>` form; kind's nested `kubelet.slice/kubelet-kubepods-...`;
static pods (32-hex uids) and sub-cgroups created inside a container.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass

_UID = r"[0-9a-fA-F]{8}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{4}[-_][0-9a-fA-F]{12}|[0-9a-fA-F]{32}"
# `pod<uid>` as a cgroupfs directory or inside a systemd slice name (kubepods-burstable-pod<uid>.slice)
_POD = re.compile(rf"(?:^|[-/])pod({_UID})(?:\.slice)?$")
_HEX64 = re.compile(r"[0-9a-f]{64}")
# runtime prefixes of systemd scopes and of containerd's "slice:prefix:id" form
_RUNTIME_PREFIX = {
    "cri-containerd": "containerd",
    "crio-conmon": "cri-o",
    "crio": "cri-o",
    "docker": "docker",
    "cri-o": "cri-o",
    "containerd": "containerd",
}
_SCOPE = re.compile(r"^(cri-containerd|crio-conmon|crio|docker)-([0-9a-f]{64})(?:\.scope)?$")
_LINE = re.compile(r"^\d+:[^:]*:(/.*)$")


@dataclass(frozen=True)
class CgroupRef:
    pod_uid: str | None = None
    container_id: str | None = None
    runtime: str | None = None
    qos_class: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def in_pod(self) -> bool:
        return self.pod_uid is not None


NOT_A_POD = CgroupRef()


def cgroup_path_of(line_or_path: str) -> str:
    """The path part of a `/proc/<pid>/cgroup` line (`12:memory:/x`, `0::/x`), or the input itself."""
    text = line_or_path.strip()
    m = _LINE.match(text)
    return m.group(1) if m else text


def parse_cgroup(line_or_path: str) -> CgroupRef:
    """Pod uid, container id, runtime and QoS class from a cgroup line or path; None where it does not say."""
    path = cgroup_path_of(line_or_path)
    parts = [p for p in path.split("/") if p]
    pod_uid = qos = container_id = runtime = None
    pod_index = None
    for i, part in enumerate(parts):
        m = _POD.search(part)
        if m and ("kubepods" in path):
            pod_uid = _normalise_uid(m.group(1))
            pod_index = i
            qos = _qos_from(parts[:i + 1])
            break
    if pod_index is None:
        # containerd with the systemd driver may put the pod slice and the id in one segment
        for part in parts:
            if ":" in part and "kubepods" in part:
                slice_, _, rest = part.partition(":")
                m = _POD.search(slice_)
                if m:
                    pod_uid = _normalise_uid(m.group(1))
                    qos = _qos_from(slice_.split("-"))
                    prefix, _, cid = rest.partition(":")
                    if _HEX64.fullmatch(cid):
                        container_id, runtime = cid, _RUNTIME_PREFIX.get(prefix)
                    break
        if pod_uid is None:
            return NOT_A_POD
        return CgroupRef(pod_uid, container_id, runtime, qos)
    # the first container-looking segment below the pod; deeper segments are sub-cgroups of that container
    for part in parts[pod_index + 1:]:
        m = _SCOPE.match(part)
        if m:
            container_id, runtime = m.group(2), _RUNTIME_PREFIX[m.group(1)]
            break
        if ":" in part:
            prefix, _, cid = part.rpartition(":")[0].rpartition(":")[2], None, part.rpartition(":")[2]
            if _HEX64.fullmatch(cid):
                container_id, runtime = cid, _RUNTIME_PREFIX.get(prefix)
                break
        if _HEX64.fullmatch(part):
            container_id = part
            break
    return CgroupRef(pod_uid, container_id, runtime, qos)


def _normalise_uid(uid: str) -> str:
    return uid.replace("_", "-").lower()


def _qos_from(parts: list[str]) -> str:
    joined = "/".join(parts)
    if "besteffort" in joined:
        return "BestEffort"
    if "burstable" in joined:
        return "Burstable"
    return "Guaranteed"


# ---------------------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    start_time: int  # clock ticks since boot (/proc/<pid>/stat field 22): with pid, a unique process key
    cgroup_lines: tuple[str, ...]
    cgroup_path: str  # the v2 path when there is one, else the first v1 path naming a pod, else the first
    ref: CgroupRef
    nspid: tuple[int, ...] = ()  # NSpid from /proc/<pid>/status: host PID first, innermost last

    def attributes(self) -> dict:
        """OTel resource attributes this process contributes."""
        attrs: dict = {"process.pid": self.pid}
        if self.ref.pod_uid:
            attrs["k8s.pod.uid"] = self.ref.pod_uid
        if self.ref.container_id:
            attrs["container.id"] = self.ref.container_id
        if self.ref.runtime:
            attrs["container.runtime.name"] = self.ref.runtime
        return attrs


def read_start_time(proc_root: str, pid: int) -> int | None:
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command may hold spaces and parentheses: fields start after the last ')'
    try:
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def read_process(proc_root: str, pid: int) -> ProcessInfo | None:
    """Read one process's cgroup membership; None if it vanished or is unreadable."""
    start = read_start_time(proc_root, pid)
    if start is None:
        return None
    try:
        with open(f"{proc_root}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            lines = tuple(line.rstrip("\n") for line in f if line.strip())
    except OSError:
        return None
    nspid: tuple[int, ...] = ()
    try:
        with open(f"{proc_root}/{pid}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    nspid = tuple(int(x) for x in line.split()[1:] if x.isdigit())
                    break
    except OSError:
        pass
    best_path, best_ref = "", NOT_A_POD
    v2 = next((cgroup_path_of(line) for line in lines if line.startswith("0::")), None)
    candidates = ([v2] if v2 else []) + [cgroup_path_of(line) for line in lines]
    for path in candidates:
        ref = parse_cgroup(path)
        if ref.in_pod:
            best_path, best_ref = path, ref
            if ref.container_id:
                break
    if not best_path and candidates:
        best_path = candidates[0]
    return ProcessInfo(pid, start, lines, best_path, best_ref, nspid)


class ProcessAttributor:
    """Cached PID -> ProcessInfo, safe against PID reuse (keyed by start time) and bounded (LRU)."""

    def __init__(self, proc_root: str = "/proc", max_entries: int = 16384) -> None:
        self.proc_root = proc_root.rstrip("/") or "/"
        self.max_entries = max_entries
        self._cache: OrderedDict[int, ProcessInfo] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def lookup(self, pid: int) -> ProcessInfo | None:
        start = read_start_time(self.proc_root, pid)
        if start is None:
            self.forget(pid)
            return None
        with self._lock:
            info = self._cache.get(pid)
            if info is not None and info.start_time == start:
                self._cache.move_to_end(pid)
                self.hits += 1
                return info
        info = read_process(self.proc_root, pid)
        with self._lock:
            self.misses += 1
            if info is None:
                self._cache.pop(pid, None)
                return None
            self._cache[pid] = info
            self._cache.move_to_end(pid)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return info

    def forget(self, pid: int) -> None:
        with self._lock:
            self._cache.pop(pid, None)

    def sweep(self) -> int:
        """Drop entries of processes that exited; returns how many were dropped."""
        with self._lock:
            pids = list(self._cache)
        gone = [pid for pid in pids if not os.path.exists(f"{self.proc_root}/{pid}")]
        with self._lock:
            for pid in gone:
                self._cache.pop(pid, None)
        return len(gone)

    def __len__(self) -> int:
        return len(self._cache)
