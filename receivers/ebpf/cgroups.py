"""cgroup v2 id -> cgroup path -> pod uid / container id.

A cgroup v2 id is the inode of the cgroup's directory in the cgroup2 mount (what bpf_get_current_cgroup_id()
returns). Ids are never reused on 64-bit kernels, so a cached mapping stays right for the cgroup's life.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

from podmeter.attribution import CgroupRef, parse_cgroup


def find_cgroup2(root: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The cgroup2 mount at or under `root`: root itself (pure v2), root/unified (hybrid), or any cgroup2 mount
    below root listed in mountinfo. None on a cgroup v1-only host."""
    root = os.path.normpath(root)
    for cand in (root, os.path.join(root, "unified")):
        if os.path.isfile(os.path.join(cand, "cgroup.controllers")):
            return cand
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] != "cgroup2":
                    continue
                point = left.split()[4].replace("\\040", " ")
                if point == root or point.startswith(root + "/"):
                    return point
    except OSError:
        pass
    return None


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint32), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_uint64)]


FILEID_KERNFS = 0xFE
_libc = ctypes.CDLL(None, use_errno=True)


class CgroupPaths:
    """Cached cgroup id -> (path relative to the cgroup2 mount, parsed pod reference).

    A miss is resolved by opening the cgroup by its id (open_by_handle_at with a kernfs file handle, which is
    the id: O(1), needs CAP_DAC_READ_SEARCH) and reading the path back from /proc/self/fd; where that is refused
    the whole tree is walked instead, at most once per `resolve`. Ids that resolve to nothing (the cgroup is gone)
    are remembered for `negative_ttl` seconds so they do not trigger lookups again. `retain` keeps the cache to
    the ids still in the BPF map.
    """

    def __init__(self, mount: str, negative_ttl: float = 600.0, max_negative: int = 65536) -> None:
        self.mount = mount.rstrip("/") or "/"
        self._cache: dict[int, tuple[str, CgroupRef]] = {}
        self._negative: dict[int, float] = {}
        self.negative_ttl = negative_ttl
        self.max_negative = max_negative
        self.walks = 0
        self.handle_lookups = 0
        self._handles = hasattr(_libc, "open_by_handle_at")
        self._mount_fd: int | None = None

    def resolve(self, ids) -> dict[int, tuple[str, CgroupRef] | None]:
        """Each id's (path, ref), or None for ids that are not (or no longer) in the tree."""
        now = time.monotonic()
        misses = [i for i in ids if i not in self._cache and self._negative.get(i, 0) <= now]
        if misses:
            left = [i for i in misses if not self._by_handle(i)] if self._handles else misses
            if left and not self._handles:
                self.refresh()
            for i in left:
                if i not in self._cache:
                    self._negative[i] = now + self.negative_ttl
            if len(self._negative) > self.max_negative:
                self._negative = {i: t for i, t in self._negative.items() if t > now}
                while len(self._negative) > self.max_negative:
                    self._negative.pop(next(iter(self._negative)))
        cache = self._cache
        return {i: cache.get(i) for i in ids}

    def remember(self, cgid: int, path: str) -> tuple[str, CgroupRef]:
        """Cache the path of a cgroup already gone, as its removal gave it (the kernel's cgroup_rmdir): a cgroup
        made and removed between two collections is attributed all the same."""
        self._negative.pop(cgid, None)
        entry = self._cache[cgid] = (path, parse_cgroup(path))
        return entry

    def _by_handle(self, cgid: int) -> bool:
        """Resolve one id through open_by_handle_at; False if it is gone. Turns itself off where refused."""
        if self._mount_fd is None:
            try:
                self._mount_fd = os.open(self.mount, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                self._handles = False
                return False
        fh = _FileHandle(8, FILEID_KERNFS, cgid)
        fd = _libc.open_by_handle_at(self._mount_fd, ctypes.byref(fh), os.O_RDONLY | os.O_PATH | os.O_CLOEXEC)
        self.handle_lookups += 1
        if fd < 0:
            err = ctypes.get_errno()
            if err in (errno.EPERM, errno.EACCES, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                self._handles = False  # fall back to walking the tree
            return False
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        finally:
            os.close(fd)
        if target.endswith(" (deleted)") or not (target == self.mount or target.startswith(self.mount + "/")):
            return False
        path = target[len(self.mount):] or "/"
        self._cache[cgid] = (path, parse_cgroup(path))
        return True

    def refresh(self) -> None:
        """Walk the whole cgroup2 tree. Parsing is kept from the old cache for ids seen before."""
        old = self._cache
        new: dict[int, tuple[str, CgroupRef]] = dict(old)
        try:
            ino = os.stat(self.mount).st_ino
            new[ino] = old.get(ino) or ("/", parse_cgroup("/"))
        except OSError:
            pass
        prefix = len(self.mount)
        stack = [self.mount]
        while stack:
            top = stack.pop()
            try:
                with os.scandir(top) as it:
                    for entry in it:
                        try:
                            if not entry.is_dir(follow_symlinks=False):
                                continue
                            # DirEntry.inode() is the d_ino from readdir: kernfs reports the cgroup id there, so
                            # no stat per directory is needed
                            ino = entry.inode()
                        except OSError:
                            continue
                        stack.append(entry.path)
                        if ino not in new:
                            path = entry.path[prefix:]
                            new[ino] = (path, parse_cgroup(path))
            except OSError:
                continue  # removed while walking
        self._cache = new
        self.walks += 1

    def exists(self, cgid: int) -> bool:
        """Whether a cached cgroup is still there: one stat of its path (the id is its directory's inode)."""
        entry = self._cache.get(cgid)
        if entry is None:
            return False
        try:
            return os.stat(self.mount + entry[0].rstrip("/")).st_ino == cgid
        except OSError:
            return False

    def retain(self, ids) -> None:
        """Keep only these ids (those still in the BPF map): bounds the cache by the map's size."""
        keep = set(ids)
        if len(self._cache) > len(keep):
            self._cache = {i: v for i, v in self._cache.items() if i in keep}

    def forget(self, ids) -> None:
        # removed cgroups never come back (cgroup ids are not reused): drop their negative entries too, so the
        # negative cache stays bounded by what is in the BPF map rather than by churn over negative_ttl
        for i in ids:
            self._cache.pop(i, None)
            self._negative.pop(i, None)

    def close(self) -> None:
        if self._mount_fd is not None:
            os.close(self._mount_fd)
            self._mount_fd = None

    def __len__(self) -> int:
        return len(self._cache)
