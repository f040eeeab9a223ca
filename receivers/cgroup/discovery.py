"""Where the cgroup files are (v1, v2 or hybrid) and which cgroups are pods and containers.

Discovery is two-tier to stay cheap: a bounded search for kubelet's `kubepods` trees (rare: at start, then every
`discovery_interval`, or while none is found), and on every collection one listing per tree, QoS level and pod
directory. Only pod-shaped directories are descended; sub-cgroups made inside a container are not listed, since
the container's own files already count them (cgroup statistics are hierarchical).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from podmeter.attribution import CgroupRef, container_of, parse_cgroup, pod_uid_of

_QOS_DIRS = ("burstable", "besteffort")


@dataclass(frozen=True)
class Source:
    """One controller's files: the hierarchy root they live under and whether it is cgroup2."""

    root: str
    v2: bool


@dataclass
class Layout:
    kind: str  # "v2", "v1" or "hybrid"
    walk: str  # the hierarchy discovery lists; the same relative paths are read in every other one
    cpu: Source | None = None  # CPU time
    throttle: Source | None = None  # CFS throttling (cpu controller)
    memory: Source | None = None
    io: Source | None = None
    pids: Source | None = None
    psi: str | None = None  # the cgroup2 root, where pressure files live

    def describe(self) -> str:
        parts = [f"{name}={src.root}{' (v2)' if src.v2 else ''}" for name in ("cpu", "throttle", "memory", "io", "pids")
                 if (src := getattr(self, name)) is not None]
        return f"cgroup {self.kind}: " + ", ".join(parts) + (f", pressure={self.psi}" if self.psi else "")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def detect_layout(root: str) -> Layout | None:
    """The layout under `root`, judged from the files present (so it works on fixture trees as on the kernel).

    Pure v2 has `cgroup.controllers` at the root. Otherwise v1 controllers are directories named after them
    (`cpu,cpuacct` combined or split) and a hybrid host adds cgroup2 at `unified`: a controller enabled there is
    read there, every other one from v1.
    """
    root = root.rstrip("/") or "/"
    if os.path.isfile(f"{root}/cgroup.controllers"):
        v2 = Source(root, True)
        return Layout("v2", root, v2, v2, v2, v2, v2, root)

    def v1(*names: str) -> Source | None:
        for name in names:
            if os.path.isdir(f"{root}/{name}"):
                return Source(f"{root}/{name}", False)
        return None

    unified = f"{root}/unified" if os.path.isfile(f"{root}/unified/cgroup.controllers") else None
    enabled = set((_read(f"{unified}/cgroup.controllers") or "").split()) if unified else set()

    def pick(v2_name: str, *v1_names: str) -> Source | None:
        if unified and v2_name in enabled:
            return Source(unified, True)
        return v1(*v1_names)

    cpu = pick("cpu", "cpuacct", "cpu,cpuacct", "cpuacct,cpu")
    if cpu is None and unified:
        cpu = Source(unified, True)  # cgroup2 always has cpu.stat usage, even without the cpu controller
    layout = Layout("hybrid" if unified else "v1", "", cpu, pick("cpu", "cpu", "cpu,cpuacct", "cpuacct,cpu"),
                    pick("memory", "memory"), pick("io", "blkio"), pick("pids", "pids"), unified)
    for candidate in (layout.memory, layout.cpu, layout.pids, v1("systemd")):
        if candidate is not None:
            layout.walk = candidate.root
            break
    if not layout.walk and unified:
        layout.walk = unified
    if not layout.walk:
        return None
    return layout


@dataclass
class Found:
    """One discovery pass: pod and container cgroups by path relative to the hierarchy root."""

    pods: dict[str, CgroupRef] = field(default_factory=dict)  # pod dir -> ref (pod uid, qos)
    containers: dict[str, CgroupRef] = field(default_factory=dict)  # container dir -> ref
    containers_of: dict[str, list[str]] = field(default_factory=dict)  # pod uid -> its container dirs


class Discovery:
    def __init__(self, root: str, max_depth: int = 8) -> None:
        self.root = root.rstrip("/") or "/"
        self.max_depth = max_depth
        self.anchors: list[str] = []  # kubepods trees (relative paths)
        self.colon_parents: list[str] = []  # directories holding containerd's `<pod slice>:<prefix>:<id>` cgroups
        self.searches = 0
        self._refs: dict[str, CgroupRef] = {}  # path -> parsed ref, kept for paths still present

    # -- the rare, bounded search --------------------------------------------------------------------------------

    def search(self) -> None:
        """Find kubepods trees up to max_depth below the root, without descending into them."""
        anchors, colon = [], set()
        level = [""]
        for _depth in range(self.max_depth):
            below = []
            for rel in level:
                for name in _subdirs(self.root + rel):
                    if "kubepods" in name:
                        if ":" in name:
                            colon.add(rel)
                        else:
                            anchors.append(f"{rel}/{name}")
                        continue
                    below.append(f"{rel}/{name}")
            if not below:
                break
            level = below
        self.anchors = anchors
        self.colon_parents = sorted(colon)
        self.searches += 1

    # -- every collection ----------------------------------------------------------------------------------------

    def scan(self) -> tuple[Found, bool]:
        """Pods and containers now; the flag says a tree vanished (so the caller searches again)."""
        found = Found()
        lost = False
        for anchor in self.anchors:
            if not self._scan_level(anchor, found, 0):
                lost = True
        for parent in self.colon_parents:
            names = _subdirs(self.root + parent, missing=None)
            if names is None:
                lost = True
                continue
            for name in names:
                if ":" in name and "kubepods" in name:
                    self._add_container(f"{parent}/{name}", found)
        # forget parsed refs of cgroups that are gone: memory stays bounded under pod churn
        live = found.pods.keys() | found.containers.keys()
        if len(self._refs) > len(live):
            self._refs = {k: v for k, v in self._refs.items() if k in live}
        return found, lost

    def _scan_level(self, rel: str, found: Found, depth: int) -> bool:
        names = _subdirs(self.root + rel, missing=None)
        if names is None:
            return False
        for name in names:
            path = f"{rel}/{name}"
            if pod_uid_of(name) is not None:
                ref = self._ref(path)
                if ref.in_pod:
                    found.pods[path] = ref
                    self._scan_pod(path, ref, found)
            elif depth < 2 and (name in _QOS_DIRS or "kubepods" in name):
                self._scan_level(path, found, depth + 1)
        return True

    def _scan_pod(self, pod_path: str, pod_ref: CgroupRef, found: Found) -> None:
        for name in _subdirs(self.root + pod_path):
            hit = container_of(name)
            # crio-conmon-<id> holds CRI-O's monitor of container <id>: the pod's totals count it, but it is not
            # the container (reporting it would give two series the same container.id)
            if hit is None or name.startswith("crio-conmon-"):
                continue
            self._add_container(f"{pod_path}/{name}", found)

    def _add_container(self, path: str, found: Found) -> None:
        ref = self._ref(path)
        if ref.container_id is None:
            return
        found.containers[path] = ref
        found.containers_of.setdefault(ref.pod_uid, []).append(path)

    def _ref(self, path: str) -> CgroupRef:
        ref = self._refs.get(path)
        if ref is None:
            ref = self._refs[path] = parse_cgroup(path)
        return ref


def _subdirs(path: str, missing: list | None = ()) -> list[str] | None:
    """Names of the subdirectories of path; `missing` (default: empty) when the directory is gone."""
    try:
        with os.scandir(path) as it:
            out = []
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        out.append(entry.name)
                except OSError:
                    continue
            return out
    except OSError:
        return None if missing is None else list(missing)
