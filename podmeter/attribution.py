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
# `pod<uid>` as a cgroupfs directory or at the end of a systemd slice name (kubepods-burstable-pod<uid>.slice)
_POD = re.compile(rf"(?:^|-)pod({_UID})(?:\.slice)?$")
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


def runtime_name(prefix: str) -> str | None:
    """container.runtime.name of a runtime's prefix: a cgroup name's (`cri-containerd`, `crio`), or a container id
    scheme in a pod's status (`containerd://`, `cri-o://`, `docker://`)."""
    return _RUNTIME_PREFIX.get(prefix)


# systemd scopes (`cri-containerd-<id>.scope`) and CRI-O's cgroupfs names (`crio-<id>`)
_SCOPE = re.compile(r"^(cri-containerd|crio-conmon|crio|docker)-([0-9a-f]{64})(?:\.scope)?$")
_LINE = re.compile(r"^\d+:[^:]*:(/.*)$")
# the kernel appends this to the v2 path of a process whose cgroup was removed (a zombie, or a race with rmdir)
_DELETED = " (deleted)"


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
    path = m.group(1) if m else text
    if path.endswith(_DELETED):
        path = path[: -len(_DELETED)]
    return path


def pod_uid_of(name: str) -> str | None:
    """The pod uid if one cgroup directory name is a pod's (`pod<uid>`, `kubepods-<qos>-pod<uid_>.slice`)."""
    m = _POD.search(name)
    return _normalise_uid(m.group(1)) if m else None


def container_of(name: str) -> tuple[str, str | None] | None:
    """(container id, runtime or None) if one directory name below a pod is a container's; else None.

    `<64 hex>` (cgroupfs driver: containerd, Docker; runtime not named), `crio-<id>`, `cri-containerd-<id>.scope`,
    `crio-<id>.scope`, `crio-conmon-<id>.scope` (CRI-O's monitor process of that container), `docker-<id>.scope`,
    `<prefix>:<id>` (containerd's form with the systemd driver outside systemd).
    """
    m = _SCOPE.match(name)
    if m:
        return m.group(2), _RUNTIME_PREFIX[m.group(1)]
    if _HEX64.fullmatch(name):
        return name, None
    if ":" in name:
        prefix, _, cid = name.rpartition(":")
        if _HEX64.fullmatch(cid):
            return cid, _RUNTIME_PREFIX.get(prefix.rpartition(":")[2])
    return None


def parse_cgroup(line_or_path: str) -> CgroupRef:
    """Pod uid, container id, runtime and QoS class from a cgroup line or path; None where it does not say.

    Never raises: anything that is not a kubelet pod cgroup (host services, the root, garbage) is `NOT_A_POD`.
    """
    if not isinstance(line_or_path, str):
        return NOT_A_POD
    path = cgroup_path_of(line_or_path)
    parts = [p for p in path.split("/") if p]
    # read from a cgroup namespace of its own (a pod's, the default on cgroup v2, so podmeter's), another cgroup's
    # path is relative to that namespace's root: `/../../pod<uid>/<id>`. The levels that said `kubepods` (and,
    # with the cgroupfs driver, the QoS) are hidden above the `..`s, so a pod there is taken as kubelet's.
    relative = bool(parts) and parts[0] == ".."
    if "kubepods" not in path and not relative:
        return NOT_A_POD
    for i, part in enumerate(parts):
        # containerd with the systemd driver outside systemd puts pod slice and container in one segment:
        # `kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`
        head, sep, tail = part.partition(":")
        uid = pod_uid_of(head)
        if uid is None:
            continue
        # a `pod<uid>` outside a kubepods tree is not kubelet's
        in_kubepods = "kubepods" in head or any("kubepods" in p for p in parts[:i])
        if not in_kubepods and not relative:
            continue
        qos = _qos_from(parts[:i] + [head])
        if qos == "Guaranteed" and not in_kubepods:
            qos = None  # kubepods and any QoS level are hidden above the `..`s: Guaranteed is not known
        container = None
        if sep:
            container = container_of(tail)
        else:
            # the first container-looking segment below the pod; deeper ones are sub-cgroups made inside it
            for below in parts[i + 1:]:
                container = container_of(below)
                if container:
                    break
        cid, runtime = container if container else (None, None)
        return CgroupRef(uid, cid, runtime, qos)
    return NOT_A_POD


def _normalise_uid(uid: str) -> str:
    return uid.replace("_", "-").lower()


def _qos_from(parts: list[str]) -> str:
    """kubelet puts Burstable and BestEffort pods under their QoS level and Guaranteed pods directly below kubepods."""
    joined = "/".join(parts).lower()
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
    uid: int | None = None  # the real uid (`Uid:` in /proc/<pid>/status); None where status has no such line

    def attributes(self) -> dict:
        """OTel resource attributes this process contributes."""
        attrs: dict = {"process.pid": self.pid}
        if self.ref.pod_uid:
            attrs["k8s.pod.uid"] = self.ref.pod_uid
        if self.ref.container_id:
            attrs["container.id"] = self.ref.container_id
        if self.ref.runtime:
            attrs["container.runtime.name"] = self.ref.runtime
        if self.ref.qos_class:  # as the cgroup receiver says of the pod
            attrs["k8s.pod.qos_class"] = self.ref.qos_class
        return attrs


def read_start_time(proc_root: str, pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); None if the process is gone."""
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
    uid = None
    try:
        with open(f"{proc_root}/{pid}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):  # real, effective, saved, filesystem
                    fields = line.split()
                    uid = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None
                elif line.startswith("NSpid:"):  # (after Uid:)
                    nspid = tuple(int(x) for x in line.split()[1:] if x.isdigit())
                    break
    except (OSError, ValueError):
        pass
    # the PID may have been reused while we read: the files then describe another process
    if read_start_time(proc_root, pid) != start:
        return None
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
    return ProcessInfo(pid, start, lines, best_path, best_ref, nspid, uid)


class ProcessAttributor:
    """Cached PID -> ProcessInfo, safe against PID reuse (keyed by start time) and bounded (LRU)."""

    def __init__(self, proc_root: str = "/proc", max_entries: int = 16384) -> None:
        self.proc_root = proc_root.rstrip("/") or "/"
        self.max_entries = max(1, int(max_entries))
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
        with self._lock:
            return len(self._cache)
