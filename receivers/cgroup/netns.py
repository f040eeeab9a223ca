"""Each pod's network counters, read through one of its processes: `/proc/<pid>/net/dev` shows the interfaces of
the process's network namespace, which is the pod's."""

from __future__ import annotations

import errno
import os

from .stats import BUFSIZE, FD_BUDGET, GONE, read_small

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC


class PodNetwork:
    """Finds a process of each pod and reads its `net/dev`.

    Cost model: the process found is kept as an `O_PATH` fd on its `/proc/<pid>` directory, and later collections
    open `net/dev` relative to it: no `cgroup.procs` read, no namespace check, no path walk. The fd names that
    process, not its number: once it exits, opening through it fails (ENOENT, then ESRCH) and another process of
    the pod is found, even if the PID was reused meanwhile. It does not hold the network namespace, as a kept
    `net/dev` fd would: a pod whose sandbox was made again is read in its new namespace once the old processes are
    gone. Whether a process is on the node's network (a hostNetwork pod: skipped, these would be the node's
    counters) is decided once per process. At most one fd per pod, taken from the cgroup readers' FD_BUDGET; none
    with `keep` off.
    """

    def __init__(self, proc_root: str, walk_root: str, errors: list, keep: bool = True) -> None:
        self.proc_root = proc_root
        self.keep = keep  # False (max_open_files: 0): the process is found again on every collection
        self.walk_root = walk_root  # the cgroup hierarchy discovery lists, where cgroup.procs is read
        self.errors = errors  # unreadable cgroup.procs files, reported with the receiver's other read errors
        self.failures: list[str] = []  # this collection's problems with /proc, for the receiver to report
        self._kept: dict[str, tuple[int, bool]] = {}  # pod uid -> (fd of its process's /proc dir, on the node's net)
        self._host: str | None = None
        # pod uid -> the network namespace its counters were last read in; pods read in another one this collection
        # (the sandbox was made again: new interfaces, counters from 0) are in `renewed`
        self._netns: dict[str, str] = {}
        self.renewed: set[str] = set()

    def begin(self, host_netns: str | None) -> None:
        """A collection starts; `host_netns`: the node's network namespace (`net:[...]`), if known."""
        self._host = host_netns
        self.failures.clear()
        self.renewed.clear()

    def read(self, uid: str, container_paths) -> bytes | None:
        """The pod's `net/dev`; None when there is nothing to report (on the node's network, no process, gone)."""
        kept = self._kept.get(uid)
        if kept is not None:
            fd, on_host = kept
            if on_host:
                return None
            data = self._net_dev(fd, uid)
            if data is not None:
                return data
            self._forget(uid)  # the process exited: find another
        for cpath in container_paths:
            pid = self._first_pid(cpath)
            if pid is None:
                continue
            try:
                fd = os.open(f"{self.proc_root}/{pid}", _DIR_FLAGS)
            except OSError as exc:
                if exc.errno in GONE:
                    continue  # exited since listed: try the next container
                self.failures.append(f"cannot open {self.proc_root}/{pid}: {exc.strerror}")
                return None
            try:
                try:
                    netns = os.readlink("ns/net", dir_fd=fd)
                except OSError as exc:
                    if self._host is not None or exc.errno in GONE:
                        raise
                    netns = None  # the node's namespace unknown either: read net/dev all the same, as before
                on_host = netns is not None and netns == self._host
                data = None if on_host else self._net_dev(fd, uid)
            except OSError as exc:
                os.close(fd)
                if exc.errno in GONE:
                    continue
                self.failures.append(f"cannot read the network namespace of pod {uid}'s process {pid} under "
                                     f"{self.proc_root}: {exc.strerror}")
                return None
            if data is None and not on_host:
                os.close(fd)
                continue  # exited while read
            if self._netns.setdefault(uid, netns) != netns:
                self._netns[uid] = netns
                self.renewed.add(uid)
            if self.keep and FD_BUDGET.take():
                self._kept[uid] = (fd, on_host)
            else:
                os.close(fd)
            return data
        return None

    def retain(self, uids) -> None:
        """Let go of the processes of pods no longer listed."""
        for uid in [uid for uid in self._kept if uid not in uids]:
            self._forget(uid)
        if len(self._netns) > len(uids):
            self._netns = {uid: ns for uid, ns in self._netns.items() if uid in uids}

    def close(self) -> None:
        for uid in list(self._kept):
            self._forget(uid)

    def __len__(self) -> int:
        return len(self._kept)

    def _forget(self, uid: str) -> None:
        fd, _on_host = self._kept.pop(uid)
        os.close(fd)
        FD_BUDGET.give()

    def _net_dev(self, fd: int, uid: str) -> bytes | None:
        """`net/dev` through a process's /proc fd; None when the process is gone, b"" when it cannot be read."""
        try:
            dev = os.open("net/dev", _READ_FLAGS, dir_fd=fd)
            try:
                data = chunk = os.read(dev, BUFSIZE)  # one line per interface: a pod has a handful
                while len(chunk) == BUFSIZE:
                    chunk = os.read(dev, BUFSIZE)
                    data += chunk
            finally:
                os.close(dev)
            return data
        except OSError as exc:
            if exc.errno in GONE:
                return None
            self.failures.append(f"cannot read net/dev of pod {uid}'s process under {self.proc_root}: "
                                 f"{exc.strerror}")
            return b""

    def _first_pid(self, cgroup_path: str) -> int | None:
        data = self._procs(f"{self.walk_root}{cgroup_path}")
        if data == b"":
            # no process in the container's cgroup itself: crun with the systemd driver on cgroup v2 (a runtime
            # CRI-O is often run with) puts them in a sub-cgroup of its scope (`crio-<id>.scope/container`), as
            # cgroup v2 allows processes only where there are no child cgroups: look one level down
            try:
                with os.scandir(f"{self.walk_root}{cgroup_path}") as it:
                    subs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                subs = []
            for sub in subs:
                data = self._procs(sub)
                if data:
                    break
        if not data:
            return None
        first = data.split(b"\n", 1)[0]
        return int(first) if first.isdigit() else None

    def _procs(self, cgroup_dir: str) -> bytes | None:
        """A cgroup's cgroup.procs; None when it cannot be read."""
        errors: list = []
        data = read_small(f"{cgroup_dir}/cgroup.procs", errors)
        if errors and errors[0][1].errno != errno.EINVAL:  # EINVAL: a threaded cgroup's cgroup.procs
            self.errors.append(errors[0])
        return data
