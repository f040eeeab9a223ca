"""Pod-shaped cgroups on the real kernel (root only), laid out as kubelet's cgroupfs driver does.

This host is cgroup v1 hybrid: v1 controllers under /sys/fs/cgroup/<controller> and cgroup2 (no controllers)
at /sys/fs/cgroup/unified. A pure v2 host has the same tree directly under /sys/fs/cgroup. `PodCgroup.spawn`
starts a real process inside the container cgroup of every hierarchy.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field

ROOT = "/sys/fs/cgroup"
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "blkio", "systemd")


def hierarchies(root: str = ROOT) -> list[str]:
    """Mounted hierarchy directories to create pod cgroups in (v1 controllers and the v2 tree)."""
    out = []
    if os.path.exists(f"{root}/cgroup.controllers"):
        return [root]  # pure v2
    for ctrl in V1_CONTROLLERS:
        if os.path.isdir(f"{root}/{ctrl}"):
            out.append(f"{root}/{ctrl}")
    if os.path.isdir(f"{root}/unified"):
        out.append(f"{root}/unified")
    return out


def v2_root(root: str = ROOT) -> str | None:
    if os.path.exists(f"{root}/cgroup.controllers"):
        return root
    if os.path.isdir(f"{root}/unified"):
        return f"{root}/unified"
    return None


@dataclass
class PodCgroup:
    """`/kubepods/<qos>/pod<uid>/<container_id>` in every hierarchy."""

    uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    container_id: str = field(default_factory=lambda: uuid.uuid4().hex + uuid.uuid4().hex)
    qos: str = "burstable"  # "guaranteed" sits directly under kubepods
    base: str = "kubepods"
    root: str = ROOT
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def pod_path(self) -> str:
        qos = "" if self.qos == "guaranteed" else f"/{self.qos}"
        return f"/{self.base}{qos}/pod{self.uid}"

    @property
    def container_path(self) -> str:
        return f"{self.pod_path}/{self.container_id}"

    def dirs(self, path: str | None = None) -> list[str]:
        return [h + (path or self.container_path) for h in hierarchies(self.root)]

    def create(self) -> PodCgroup:
        for d in self.dirs():
            os.makedirs(d, exist_ok=True)
        return self

    def set(self, controller: str, file: str, value: str, level: str = "container") -> None:
        path = self.container_path if level == "container" else self.pod_path
        with open(f"{self.root}/{controller}{path}/{file}", "w") as f:
            f.write(value)

    def join(self, pid: int) -> None:
        for d in self.dirs():
            with open(f"{d}/cgroup.procs", "w") as f:
                f.write(str(pid))

    def spawn(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start argv with the process already inside the container cgroup (joined before exec)."""
        dirs = self.dirs()

        def enter() -> None:
            for d in dirs:
                with open(f"{d}/cgroup.procs", "w") as f:
                    f.write("0")

        proc = subprocess.Popen(argv, preexec_fn=enter, **kwargs)
        self.procs.append(proc)
        return proc

    def cgroup_id(self) -> int | None:
        """The cgroup2 id (the directory's inode), what bpf_get_current_cgroup_id() returns."""
        v2 = v2_root(self.root)
        return os.stat(v2 + self.container_path).st_ino if v2 else None

    def destroy(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        for path in (self.container_path, self.pod_path):
            for h in hierarchies(self.root):
                _rmdir_tree(h + path)
        # qos/base dirs are shared between tests and left in place, as kubelet leaves them

    def __enter__(self) -> PodCgroup:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()


def _rmdir_tree(path: str) -> None:
    """Remove a cgroup directory and its children (cgroupfs allows only rmdir), moving stragglers out."""
    if not os.path.isdir(path):
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _rmdir_tree(entry.path)
    for _attempt in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            # processes may linger a moment after SIGKILL; move any left to the hierarchy root
            try:
                with open(f"{path}/cgroup.procs") as f:
                    pids = f.read().split()
                root = path.split("/kubepods")[0]
                for pid in pids:
                    with open(f"{root}/cgroup.procs", "w") as f:
                        f.write(pid)
            except OSError:
                pass
            time.sleep(0.02)
    shutil.rmtree(path, ignore_errors=True)
