"""Reading one cgroup's statistics from whichever hierarchy holds each controller."""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field

from . import parsers as p
from .discovery import Layout

# errors that mean "the cgroup (or process) went away while we read": pod churn, not trouble
GONE = (errno.ENOENT, errno.ENODEV, errno.ESRCH, errno.ENOTDIR)


@dataclass(init=False)
class Stats:
    """What was read of one cgroup. Absent values stay None (the metric is then not emitted).

    Values are class defaults and set only when read: a cgroup's reading sets a third of them, and building
    all 23 fields for each of the hundreds of cgroups per collection cost more than reading some files."""

    cpu_user: float | None = None  # seconds
    cpu_system: float | None = None
    cpu_total: float | None = None
    periods: int | None = None
    throttled_periods: int | None = None
    throttled_time: float | None = None  # seconds
    cpu_limit: float | None = None  # CPUs: the CFS quota over its period
    mem_usage: int | None = None
    mem_working_set: int | None = None
    mem_rss: int | None = None
    mem_cache: int | None = None
    mem_kernel_stack: int | None = None
    mem_page_tables: int | None = None
    mem_swap: int | None = None
    mem_limit: int | None = None
    oom_events: int | None = None
    oom_kills: int | None = None
    faults_major: int | None = None
    faults_minor: int | None = None
    io: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> read_bytes/write_bytes/read_ops/write_ops
    pids: int | None = None
    pids_limit: int | None = None
    psi: dict[tuple[str, str], float] = field(default_factory=dict)  # (resource, some|full) -> seconds
    found: bool = False  # at least one file was read: the cgroup exists
    # a kept fd said the cgroup was removed and a cgroup of the same path answered instead: its counters started
    # again from 0 (the receiver gives its series a new start time)
    renewed: bool = False

    # values that add up across containers (for pods that have no cgroup of their own); limits and PSI do not
    ADDITIVE = ("cpu_user", "cpu_system", "cpu_total", "periods", "throttled_periods", "throttled_time",
                "mem_usage", "mem_working_set", "mem_rss", "mem_cache", "mem_kernel_stack", "mem_page_tables",
                "mem_swap", "oom_events", "oom_kills", "faults_major", "faults_minor", "pids")

    def __init__(self) -> None:
        self.io = {}
        self.psi = {}

    # the cumulative ones among them: what a container counted stays counted after it is gone
    COUNTERS = ("cpu_user", "cpu_system", "cpu_total", "periods", "throttled_periods", "throttled_time",
                "oom_events", "oom_kills", "faults_major", "faults_minor")

    def add(self, other: Stats, names: tuple[str, ...] = ADDITIVE) -> None:
        """Add `other`'s values of `names` (and its IO counters) to these."""
        for name in names:
            theirs = getattr(other, name)
            if theirs is not None:
                mine = getattr(self, name)
                setattr(self, name, theirs if mine is None else mine + theirs)
        for dev, values in other.io.items():
            mine = self.io.setdefault(dev, {})
            for k, v in values.items():
                mine[k] = mine.get(k, 0) + v
        self.found = self.found or other.found


# What each metric (by its suffix, the same for containers and pods) needs read. Files: cpu = the CPU time file(s)
# (v2 cpu.stat, v1 cpuacct.usage_all or its fallbacks); throttle = the CPU quota (cpu.max / cpu.cfs_quota_us) and,
# where the CFS counters are not in the cpu.stat already read, their cpu.stat; cpu_limit = the CPU quota and its
# period (v2 cpu.max, v1 cpu.cfs_quota_us and cpu.cfs_period_us); mem_usage = memory.current /
# memory.usage_in_bytes; mem_stat / mem_stat_v1 = memory.stat on cgroup v2 / v1 (v1 has swap there, not kernel
# stacks nor page tables); mem_limit = memory.max / memory.limit_in_bytes; swap = memory.swap.current (v2);
# oom_v2 = memory.events; oom_v1 = memory.oom_control (kills only); io = io.stat / blkio; pids_count =
# pids.current; pids_limit = pids.max; pressure = the three PSI files. The network is the receiver's (not here).
READS_OF: dict[str, tuple[str, ...]] = {
    "cpu.time": ("cpu",),
    "cpu.usage": ("cpu",),
    "cpu.percent": ("cpu",),
    "cpu.throttling_data.periods": ("cpu", "throttle"),
    "cpu.throttling_data.throttled_periods": ("cpu", "throttle"),
    "cpu.throttling_data.throttled_time": ("cpu", "throttle"),
    "cpu.limit": ("cpu_limit",),
    "memory.usage": ("mem_usage",),
    "memory.working_set": ("mem_usage", "mem_stat", "mem_stat_v1"),
    "memory.rss": ("mem_stat", "mem_stat_v1"),
    "memory.cache": ("mem_stat", "mem_stat_v1"),
    "memory.kernel_stack": ("mem_stat",),
    "memory.page_tables": ("mem_stat",),
    "memory.paging.faults": ("mem_stat", "mem_stat_v1"),
    "memory.swap": ("swap", "mem_stat_v1"),
    "memory.limit": ("mem_limit",),
    "memory.oom.events": ("oom_v2",),
    "memory.oom.kills": ("oom_v2", "oom_v1"),
    "disk.io": ("io",),
    "disk.operations": ("io",),
    "pids.count": ("pids_count",),
    "pids.limit": ("pids_limit",),
    "pressure.stall_time": ("pressure",),
}
_FLAGS = ("cpu", "throttle", "cpu_limit", "mem_usage", "mem_stat", "mem_stat_v1", "mem_limit", "swap", "oom_v2",
          "oom_v1", "io", "pids_count", "pids_limit", "pressure")
_MEMORY_READS = ("mem_usage", "mem_stat", "mem_stat_v1", "mem_limit", "swap", "oom_v2", "oom_v1")


class Reads:
    """What is read of one kind of cgroup (containers, pods): the files the metrics wanted at that level need, and
    no other. Decided once, when the receiver is made, from the metric switches: one boolean per file (or group
    of files), checked once per cgroup as it is read, never a lookup per file."""

    __slots__ = (*_FLAGS, "memory", "pids", "limits", "listed", "nothing", "listed_but_psi", "nothing_but_psi")

    def __init__(self, metrics=READS_OF) -> None:
        """`metrics`: the suffixes of the metrics wanted (`cpu.time`, `memory.limit`...); by default all."""
        flags = {f for suffix in metrics for f in READS_OF.get(suffix, ())}
        for name in _FLAGS:
            setattr(self, name, name in flags)
        self.memory = any(name in flags for name in _MEMORY_READS)
        self.pids = self.pids_count or self.pids_limit
        # limits: read when a cgroup is first seen and every limits_every-th collection, remembered in between (the
        # CPU quota too when only the throttling counters want it, but those read the CPU files anyway)
        self.limits = self.mem_limit or self.pids_limit or self.cpu_limit
        # nothing but limits is read: on the collections that take the limits from what was read before, no file
        # is read and the cgroup is there as discovery listed it; `nothing`: no file at all (the pod's network)
        self.listed = not (self.cpu or self.mem_usage or self.mem_stat or self.mem_stat_v1 or self.swap
                           or self.oom_v2 or self.oom_v1 or self.io or self.pids_count or self.pressure)
        self.nothing = self.listed and not self.limits
        # the same where no pressure file can be read (no cgroup2, or PSI switched off at boot): a cgroup read for
        # pressure and nothing else (but limits, or the pod's network) is then there as discovery listed it
        self.listed_but_psi = not (self.cpu or self.mem_usage or self.mem_stat or self.mem_stat_v1 or self.swap
                                   or self.oom_v2 or self.oom_v1 or self.io or self.pids_count)
        self.nothing_but_psi = self.listed_but_psi and not self.limits

    def __repr__(self) -> str:
        return f"Reads({', '.join(n for n in _FLAGS if getattr(self, n))})"


BUFSIZE = 65536  # larger than any cgroup file read here; a file that fills it is read on, never cut short
# a kept fd whose cgroup was removed answers ENODEV (kernfs); ESTALE and ENOENT mean the same on other filesystems
VANISHED = (errno.ENODEV, errno.ESTALE, errno.ENOENT)
_O_FLAGS = os.O_RDONLY | os.O_CLOEXEC


def read_small(path: str, errors: list | None = None) -> bytes | None:
    """A small kernel file in as few syscalls as possible (no Python file object).

    None when it cannot be read; errors other than "it went away" are appended to `errors`.
    """
    try:
        fd = os.open(path, _O_FLAGS)
    except OSError as exc:
        if errors is not None and exc.errno not in GONE:
            errors.append((path, exc))
        return None
    try:
        data = os.read(fd, BUFSIZE)
        if len(data) == BUFSIZE:
            data = _read_rest(fd, data)
    except OSError as exc:
        if errors is not None and exc.errno not in GONE:
            errors.append((path, exc))
        return None
    finally:
        os.close(fd)
    return data


def _read_rest(fd: int, data: bytes) -> bytes:
    chunks = [data]
    offset = len(data)
    while chunk := os.pread(fd, BUFSIZE, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class FdBudget:
    """The fds every Reader of this process may keep open together: one receiver instance or several (two
    configured cgroup receivers, tests that build many), the process stays within the budget its first receiver
    set, and what a closed receiver gave back serves the others."""

    def __init__(self) -> None:
        self.limit = 0
        self.used = 0
        self._lock = threading.Lock()

    def raise_to(self, limit: int) -> None:
        with self._lock:
            self.limit = max(self.limit, limit)

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def give(self, n: int = 1) -> None:
        with self._lock:
            self.used = max(0, self.used - n)


FD_BUDGET = FdBudget()


class Reader:
    """Reads files of one cgroup across hierarchies; counts unexpected read errors for the receiver to report.

    Cost model (see the README): the statistics files of a cgroup are opened once and kept open, one fd each,
    and re-read with `pread(fd, n, 0)`: kernfs regenerates a file's content when it is read at offset 0, so this
    is what a fresh open would read, at a fifth of the cost (no path walk, no open/close). A cgroup whose files
    are all kept is read in one pass over its fds, and its contents are then parsed from memory: no call per
    file. Fds are closed when discovery no longer lists the cgroup, and as soon as one answers ENODEV (the
    cgroup was removed: it is then opened once more by path, in case a cgroup of the same name was made since).
    At most `max_open` fds are kept; files beyond that are opened, read and closed as before. Limits
    (memory.limit_in_bytes / memory.max, pids.max, the CPU quota) change rarely: they are read when a cgroup is
    first seen and then on every `limits_every`-th collection, without keeping an fd. `max_open` bounds this
    reader and FD_BUDGET the whole process. What is read of a cgroup is what its `Reads` say: a file that only
    metrics switched off need is never opened (nor kept).
    """

    def __init__(self, layout: Layout, reads: Reads | None = None, max_open: int = 0, limits_every: int = 1) -> None:
        self.layout = layout
        self.reads = reads if reads is not None else Reads()
        self.errors: list[tuple[str, OSError]] = []
        # lines the parsers skipped as malformed this collection (the first MALFORMED_KEPT), and the first cgroup
        # that had one
        self.malformed: list[bytes] = []
        self.malformed_at: str | None = None
        self.max_open = max_open
        self.limits_every = max(1, limits_every)
        self.open_count = 0  # fds kept, over all cgroups
        self._fds: dict[str, dict[str, int]] = {}  # cgroup (relative path) -> file path -> fd kept open
        # cgroup -> (paths, fds) when every file its last reading read is kept: the next is one pass over the fds
        self._whole: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
        self._cur: dict[str, int] | None = None  # the fds of the cgroup being read by path
        self._vanished = False  # a kept fd of the cgroup being read said it was removed
        self._renewed = False  # ...and the file opened again by path: a new cgroup of the same name
        self._partial = False  # a file of the cgroup being read by path was read without keeping its fd
        # cgroup -> (memory limit, pids limit, CPU quota in CPUs: 0.0 none, None not read or unreadable)
        self._limits: dict[str, tuple[int | None, int | None, float | None]] = {}
        self._collections = 0
        self._refresh_limits = True
        self.psi_disabled = False  # the kernel answers EOPNOTSUPP to pressure files: PSI is off (see _psi_errors)
        self._one_pass: str | None = None  # the cgroup being read in one pass over its kept fds

    # -- kept fds -----------------------------------------------------------------------------------------------

    def begin(self) -> None:
        """A collection starts: decides whether limits are read again this time."""
        self._refresh_limits = self._collections % self.limits_every == 0
        self._collections += 1
        self.malformed.clear()
        self.malformed_at = None
        p.report_malformed_to(self.malformed)  # collection runs on this thread

    def retain(self, live) -> None:
        """Close the fds and forget the limits of cgroups no longer listed (`live`: relative paths)."""
        for rel in [rel for rel in self._fds if rel not in live]:
            self._close(rel)
        if len(self._limits) > len(live) or any(rel not in live for rel in self._limits):
            self._limits = {k: v for k, v in self._limits.items() if k in live}

    def close(self) -> None:
        for rel in list(self._fds):
            self._close(rel)
        self._limits.clear()

    def kept(self, rel: str | None = None) -> int:
        """Fds kept open: of one cgroup, or in all."""
        return self.open_count if rel is None else len(self._fds.get(rel, ()))

    def _close(self, rel: str) -> None:
        self._whole.pop(rel, None)
        fds = self._fds.pop(rel, None)
        if not fds:
            return
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.open_count -= len(fds)
        FD_BUDGET.give(len(fds))

    def text(self, path: str) -> bytes | None:
        """One file of the cgroup being read by path, through its kept fd, or opened (and kept while the budget
        allows)."""
        fds = self._cur
        if fds is not None:
            fd = fds.get(path)
            if fd is not None:
                try:
                    data = os.pread(fd, BUFSIZE, 0)
                    if len(data) == BUFSIZE:
                        data = _read_rest(fd, data)
                    return data
                except OSError as exc:
                    del fds[path]
                    self.open_count -= 1
                    FD_BUDGET.give()
                    os.close(fd)
                    if exc.errno not in VANISHED:
                        self.errors.append((path, exc))
                        return None
                # the cgroup was removed (and maybe made again under the same name): open it by path
                return self._open_kept(path, fds, reopening=True)
            if self.open_count < self.max_open:
                return self._open_kept(path, fds, reopening=False)
        self._partial = True
        return read_small(path, self.errors)

    def _open_kept(self, path: str, fds: dict[str, int], reopening: bool) -> bytes | None:
        """Open a file, read it and keep its fd; read and closed as before when the process's budget is spent.
        `reopening`: its kept fd said the cgroup was removed, so not finding it now means the cgroup is gone."""
        if not FD_BUDGET.take():
            self._partial = True
            return read_small(path, self.errors)
        try:
            fd = os.open(path, _O_FLAGS)
        except OSError as exc:
            FD_BUDGET.give()
            if reopening and (exc.errno in GONE or exc.errno == errno.ESTALE):
                self._vanished = True
            elif exc.errno not in GONE:
                self.errors.append((path, exc))
            return None
        if reopening:
            self._renewed = True
        return self._first_read(path, fd, fds)

    def _first_read(self, path: str, fd: int, fds: dict[str, int]) -> bytes | None:
        """Read a file just opened and keep its fd (closed instead when it cannot be read)."""
        try:
            data = os.pread(fd, BUFSIZE, 0)
            if len(data) == BUFSIZE:
                data = _read_rest(fd, data)
        except OSError as exc:
            os.close(fd)
            FD_BUDGET.give()
            if exc.errno not in GONE:
                self.errors.append((path, exc))
            return None
        fds[path] = fd
        self.open_count += 1
        return data

    # -- one cgroup ---------------------------------------------------------------------------------------------

    def read(self, rel: str, reads: Reads | None = None) -> Stats:
        """One cgroup's statistics: the files `reads` says (default: the reader's). A cgroup is to be read with the
        same `reads` every time (its kept fds and remembered limits are those of one)."""
        n_malformed = len(self.malformed)
        s = self._read_cgroup(rel, reads or self.reads)
        if len(self.malformed) != n_malformed and self.malformed_at is None:
            self.malformed_at = rel
        return s

    def _read_cgroup(self, rel: str, reads: Reads) -> Stats:
        # the one-pass reading covers the files the cgroup had when last read by path; when limits are due (every
        # Nth collection) it is read by path again, so a file that appeared since is found (on cgroup v2 a
        # controller's files appear in a cgroup made before its parent enabled the controller)
        whole = None if self._refresh_limits else self._whole.get(rel)
        if whole is not None:
            paths, fds = whole
            try:
                contents = [_pread(fd, BUFSIZE, 0) for fd in fds]
            except OSError:
                contents = None  # removed (ENODEV) or worse: read by path below, which sorts it out
            if contents is not None and BUFSIZE not in map(len, contents):
                self._one_pass = rel
                try:
                    return self._read(rel, dict(zip(paths, contents, strict=True)).get, reads)
                finally:
                    self._one_pass = None
            del self._whole[rel]
        return self._read_by_path(rel, reads)

    def _read_by_path(self, rel: str, reads: Reads) -> Stats:
        """Open what is not kept yet, re-read what is: a cgroup's first reading, or one after a kept fd failed."""
        fds = self._fds.get(rel)
        if fds is None and self.max_open > 0:
            fds = self._fds[rel] = {}
        # this reading may close kept fds (a failed read): the one-pass tuple is made again below only when every
        # file is kept, never left naming fds closed here (their numbers are soon another file's)
        self._whole.pop(rel, None)
        self._cur, self._vanished, self._partial, self._renewed = fds, False, False, False
        n_errors = len(self.errors)
        remembered = not self._refresh_limits and rel in self._limits  # limits not read this time, but recalled
        try:
            s = self._read(rel, self.text, reads)
            if self._renewed and not self._vanished and remembered:
                # the limits (and whether it has a CPU quota, which gates the throttling counters) just used were
                # remembered of the removed cgroup, not this new one's: read it again with its own (rare: a static
                # pod restarted, once); its files are all open by now, and what the first reading found unreadable
                # is not counted twice
                del self.errors[n_errors:]
                del self._limits[rel]
                s = self._read(rel, self.text, reads)
        finally:
            self._cur = None
        if self._renewed and not self._vanished:
            # the cgroup was made again under the same name (a static pod restarted keeps its uid): a new cgroup
            s.renewed = True
        if self._vanished or not s.found:
            self._close(rel)  # removed while read: nothing kept for it
            self._limits.pop(rel, None)
        elif fds is not None and not fds:
            del self._fds[rel]
        elif fds is not None and not self._partial and len(self.errors) == n_errors:
            # every file read is kept (a file that does not exist was not read, and is not looked for again)
            self._whole[rel] = (tuple(fds), tuple(fds.values()))
        return s

    def _read(self, rel: str, text, w: Reads) -> Stats:
        """Statistics of one cgroup from `text(path)`: the file's content, or None when it cannot be read; `w`: what
        is read. The cgroup is found when at least one file was read (or, reading nothing but limits it already
        has, as discovery listed it)."""
        s = Stats()
        lay = self.layout
        limits = self._limits.get(rel) if not self._refresh_limits else None
        v2_cpu_stat: dict[bytes, int] | None = None
        if w.cpu and lay.cpu is not None:
            base = lay.cpu.root + rel
            if lay.cpu.v2:
                v2_cpu_stat = p.parse_flat(text(base + "/cpu.stat"))
                if b"usage_usec" in v2_cpu_stat:
                    s.found = True
                    s.cpu_total = v2_cpu_stat[b"usage_usec"] / 1e6
                    s.cpu_user = v2_cpu_stat.get(b"user_usec", 0) / 1e6
                    s.cpu_system = v2_cpu_stat.get(b"system_usec", 0) / 1e6
            else:
                # usage_all: per-CPU user and system nanoseconds in one read; they add up to cpuacct.usage
                both = p.parse_cpuacct_usage_all(text(base + "/cpuacct.usage_all"))
                if both is None:
                    user, system = p.parse_int(text(base + "/cpuacct.usage_user")), \
                        p.parse_int(text(base + "/cpuacct.usage_sys"))
                    both = (user, system) if user is not None and system is not None else None
                if both is not None:
                    s.found = True
                    s.cpu_user, s.cpu_system = both[0] / 1e9, both[1] / 1e9
                    s.cpu_total = s.cpu_user + s.cpu_system
                else:
                    # old kernels: only the total in ns and user/system in USER_HZ ticks
                    total = p.parse_int(text(base + "/cpuacct.usage"))
                    if total is not None:
                        s.found = True
                        s.cpu_total = total / 1e9
                        ticks = p.parse_flat(text(base + "/cpuacct.stat"))
                        hz = _user_hz()
                        if b"user" in ticks and b"system" in ticks:
                            s.cpu_user, s.cpu_system = ticks[b"user"] / hz, ticks[b"system"] / hz
        # the CPU quota, in CPUs (0.0: none; None: not read, or unreadable), read with the other limits: for the
        # limit itself, and to gate the throttling counters. CFS counters mean something only under a CPU limit
        # (without one they stay 0 forever): they are read and emitted only for a cgroup with a quota, as cAdvisor
        # emits them only with one (and read as they come when the quota could not be read)
        quota = None
        thr = lay.throttle if w.throttle or w.cpu_limit else None
        if thr is not None:
            if limits is None:
                quota = self._cpu_quota(thr.root + rel, thr.v2, in_cpus=w.cpu_limit)
                if quota is not None and w.cpu_limit:
                    s.found = True
            else:
                quota = limits[2]
            if w.cpu_limit and quota:
                s.cpu_limit = quota
        if w.throttle and thr is not None and quota != 0.0 and lay.cpu is not None:
            if thr.v2 and lay.cpu.v2 and thr.root == lay.cpu.root:
                stat = v2_cpu_stat or {}
            else:
                stat = p.parse_flat(text(thr.root + rel + "/cpu.stat"))
            if b"nr_periods" in stat:
                s.periods = stat[b"nr_periods"]
                s.throttled_periods = stat.get(b"nr_throttled")
                if b"throttled_usec" in stat:
                    s.throttled_time = stat[b"throttled_usec"] / 1e6
                elif b"throttled_time" in stat:  # v1: nanoseconds
                    s.throttled_time = stat[b"throttled_time"] / 1e9
        mem_limit = pids_limit = None
        if w.memory and lay.memory is not None:
            mem_limit = self._memory(lay.memory.root + rel, lay.memory.v2, s, limits, text, w)
        if w.io and lay.io is not None:
            self._io(lay.io.root + rel, lay.io.v2, s, text)
        if w.pids and lay.pids is not None:
            base = lay.pids.root + rel
            if w.pids_count:
                s.pids = p.parse_int(text(base + "/pids.current"))
                if s.pids is not None:
                    s.found = True
            if w.pids_limit:
                if limits is None:
                    data = read_small(base + "/pids.max", self.errors)
                    if data is not None:
                        s.found = True
                    pids_limit = p.parse_int(data)  # "max" -> None
                else:
                    pids_limit = limits[1]
                s.pids_limit = pids_limit
        if w.pressure and lay.psi is not None and not self.psi_disabled:
            base = lay.psi + rel
            psi = s.psi
            n_errors = len(self.errors)
            for res, path in (("cpu", "/cpu.pressure"), ("memory", "/memory.pressure"), ("io", "/io.pressure")):
                data = text(base + path)
                if data is not None:
                    s.found = True  # a receiver reading only pressure (or IO) reports it all the same
                for kind, total_us in p.parse_psi(data).items():
                    psi[_PSI_KEYS[res, kind]] = total_us / 1e6
            if len(self.errors) != n_errors:
                self._psi_errors(n_errors)
        # no pressure file can be read (no cgroup2 here, or PSI off: known once the first read answered EOPNOTSUPP)
        psi_off = lay.psi is None or self.psi_disabled
        if limits is None:
            if s.found:
                self._limits[rel] = (mem_limit, pids_limit, quota)
            elif w.nothing or psi_off and w.nothing_but_psi:
                s.found = True  # nothing to read here (the pod's network only): the cgroup is there, as listed
        elif w.listed or psi_off and w.listed_but_psi:
            s.found = True  # only limits are read, and they are those read before: the cgroup is there, as listed
        return s

    def _psi_errors(self, since: int) -> None:
        """PSI switched off at boot (`psi=0`, or a kernel built with CONFIG_PSI_DEFAULT_DISABLED booted without
        `psi=1`, as CentOS Stream 9's): the pressure files are there, but every read of them answers
        EOPNOTSUPP, on every cgroup, until a reboot. That is no read error: pressure is not read again (runc, and
        so cAdvisor, report no pressure there either)."""
        unsupported = [e for e in self.errors[since:] if e[1].errno == errno.EOPNOTSUPP]
        if unsupported:
            self.errors[since:] = [e for e in self.errors[since:] if e[1].errno != errno.EOPNOTSUPP]
            self.psi_disabled = True

    def _cpu_quota(self, base: str, v2: bool, in_cpus: bool) -> float | None:
        """The cgroup's CPU limit in CPUs, its CFS quota over its period (v2 cpu.max `quota period`, v1
        cpu.cfs_quota_us and cpu.cfs_period_us); 0.0 when it has none (`max`, -1); None when it cannot be read.
        Without `in_cpus` only whether there is one matters: v1's period is not read, and a quota answers 1.0."""
        if v2:
            return p.parse_cpu_max(read_small(base + "/cpu.max", self.errors))
        quota = p.parse_int(read_small(base + "/cpu.cfs_quota_us", self.errors))
        if quota is None or quota <= 0:
            return None if quota is None else 0.0
        if not in_cpus:
            return 1.0
        period = p.parse_int(read_small(base + "/cpu.cfs_period_us", self.errors))
        return quota / period if period else None

    def _memory(self, base: str, v2: bool, s: Stats, limits: tuple | None, text, w: Reads) -> int | None:
        """Memory statistics into `s`, of the files `w` says; returns the limit as read (or as remembered in
        `limits`)."""
        usage = inactive_file = faults = None
        if w.mem_usage:
            usage = p.parse_int(text(base + ("/memory.current" if v2 else "/memory.usage_in_bytes")))
        if v2:
            if w.mem_stat:
                data = text(base + "/memory.stat")
                if data is not None:
                    s.found = True
                    stat = p.parse_flat(data, _V2_MEMORY_KEYS)
                    s.mem_rss, s.mem_cache = stat.get(b"anon"), stat.get(b"file")
                    s.mem_kernel_stack, s.mem_page_tables = stat.get(b"kernel_stack"), stat.get(b"pagetables")
                    inactive_file = stat.get(b"inactive_file")
                    s.faults_major = stat.get(b"pgmajfault")
                    faults = stat.get(b"pgfault")
        elif w.mem_stat_v1:
            # total_* are hierarchical (they include sub-cgroups); the plain keys count this cgroup alone
            data = text(base + "/memory.stat")
            if data is not None:
                s.found = True
                stat = p.parse_flat(data, _V1_MEMORY_KEYS)
                s.mem_rss, s.mem_cache = stat.get(b"total_rss"), stat.get(b"total_cache")
                s.mem_swap = stat.get(b"total_swap")
                inactive_file = stat.get(b"total_inactive_file")
                s.faults_major = stat.get(b"total_pgmajfault")
                faults = stat.get(b"total_pgfault")
        if w.mem_limit:
            if limits is None:
                data = read_small(base + ("/memory.max" if v2 else "/memory.limit_in_bytes"), self.errors)
                if data is not None:
                    s.found = True
                limit = p.parse_int(data)  # v2's "max" -> None; v1 says unlimited with a huge number
                s.mem_limit = limit if limit is not None and limit < p.V1_UNLIMITED else None
            else:
                s.mem_limit = limits[0]
        if v2:
            if w.swap:
                data = text(base + "/memory.swap.current")
                if data is not None:
                    s.found = True
                    s.mem_swap = p.parse_int(data)
            if w.oom_v2:
                data = text(base + "/memory.events")
                if data is not None:
                    s.found = True
                    events = p.parse_flat(data)
                    s.oom_events, s.oom_kills = events.get(b"oom"), events.get(b"oom_kill")
        elif w.oom_v1:
            data = text(base + "/memory.oom_control")
            if data is not None:
                s.found = True
                s.oom_kills = p.parse_flat(data).get(b"oom_kill")
        if usage is not None:
            s.found = True
            s.mem_usage = usage
            # cAdvisor's working set: usage minus inactive file pages, never negative
            if inactive_file is not None:
                s.mem_working_set = max(0, usage - inactive_file)
        if faults is not None and s.faults_major is not None:
            s.faults_minor = max(0, faults - s.faults_major)
        return s.mem_limit

    def _io(self, base: str, v2: bool, s: Stats, text) -> None:
        if v2:
            data = text(base + "/io.stat")
            if data is not None:
                s.found = True  # an idle cgroup's io.stat is empty, and there all the same
            for dev, v in p.parse_io_stat(data).items():
                s.io[dev] = {"read_bytes": v.get(b"rbytes", 0), "write_bytes": v.get(b"wbytes", 0),
                             "read_ops": v.get(b"rios", 0), "write_ops": v.get(b"wios", 0)}
            return
        # cgroup v1 counts IO in the files of the IO scheduler in use (BFQ, or CFQ before kernel 5.0), for the
        # devices that use it, and in blk-throttle's, which since kernel 6.10 count only on devices where a throttle
        # rule was ever set (before, on every device): a device is taken from the first file that lists it, the
        # scheduler's first, as runc (so cAdvisor) does. The _recursive files include sub-cgroups; older kernels
        # have only the plain throttle ones.
        found = False
        for by_bytes, by_ops in _V1_IO_FILES:
            if self._blkio(s.io, text(base + by_bytes), text, base + by_ops):
                found = True
        if self._blkio(s.io, text(base + "/blkio.throttle.io_service_bytes_recursive"), text,
                       base + "/blkio.throttle.io_serviced_recursive") or \
                self._blkio(s.io, text(base + "/blkio.throttle.io_service_bytes"), text,
                            base + "/blkio.throttle.io_serviced"):
            found = True
        if found:
            s.found = True

    def _blkio(self, io: dict, by_bytes: bytes | None, text, ops_path: str) -> bool:
        """The devices of one v1 `io_service_bytes` file (and its `io_serviced` twin) that `io` has not yet; False
        when the file could not be read. A file that lists no device (`Total 0`) costs no second read."""
        if by_bytes is None:
            return False
        devices = p.parse_blkio(by_bytes)
        if devices:
            ops = text(ops_path)
            if ops is None and self._one_pass is not None:
                # the cgroup had no IO there when last read by path, so this file was not read (nor kept) then:
                # read it now, and by path next time, which keeps it
                ops = read_small(ops_path, self.errors)
                self._whole.pop(self._one_pass, None)
            ops = p.parse_blkio(ops)
            for dev, v in devices.items():
                if dev not in io:
                    o = ops.get(dev, {})
                    io[dev] = {"read_bytes": v.get(b"read", 0), "write_bytes": v.get(b"write", 0),
                               "read_ops": o.get(b"read", 0), "write_ops": o.get(b"write", 0)}
        return True


_pread = os.pread
# the memory.stat keys read (of 40 to 60)
_V2_MEMORY_KEYS = (b"anon", b"file", b"kernel_stack", b"pagetables", b"inactive_file", b"pgmajfault", b"pgfault")
# cgroup v1 IO schedulers' counters (bytes, operations), read before blk-throttle's
_V1_IO_FILES = (("/blkio.bfq.io_service_bytes_recursive", "/blkio.bfq.io_serviced_recursive"),
                ("/blkio.io_service_bytes_recursive", "/blkio.io_serviced_recursive"))
_V1_MEMORY_KEYS = (b"total_rss", b"total_cache", b"total_swap", b"total_inactive_file", b"total_pgmajfault",
                   b"total_pgfault")
# the (resource, kind) keys of Stats.psi, made once rather than per cgroup
_PSI_KEYS = {(res, kind): (res, kind) for res in ("cpu", "memory", "io") for kind in ("some", "full")}


_HZ: list[int] = []


def _user_hz() -> int:
    if not _HZ:
        try:
            _HZ.append(os.sysconf("SC_CLK_TCK") or 100)
        except (ValueError, OSError):
            _HZ.append(100)
    return _HZ[0]
