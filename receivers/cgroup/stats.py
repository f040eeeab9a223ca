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


@dataclass
class Stats:
    """What was read of one cgroup. Absent values stay None (the metric is then not emitted)."""

    cpu_user: float | None = None  # seconds
    cpu_system: float | None = None
    cpu_total: float | None = None
    periods: int | None = None
    throttled_periods: int | None = None
    throttled_time: float | None = None  # seconds
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

    # values that add up across containers (for pods that have no cgroup of their own); limits and PSI do not
    ADDITIVE = ("cpu_user", "cpu_system", "cpu_total", "periods", "throttled_periods", "throttled_time",
                "mem_usage", "mem_working_set", "mem_rss", "mem_cache", "mem_kernel_stack", "mem_page_tables",
                "mem_swap", "oom_events", "oom_kills", "faults_major", "faults_minor", "pids")

    def add(self, other: Stats) -> None:
        for name in self.ADDITIVE:
            theirs = getattr(other, name)
            if theirs is not None:
                mine = getattr(self, name)
                setattr(self, name, theirs if mine is None else mine + theirs)
        for dev, values in other.io.items():
            mine = self.io.setdefault(dev, {})
            for k, v in values.items():
                mine[k] = mine.get(k, 0) + v
        self.found = self.found or other.found


BUFSIZE = 65536  # larger than any cgroup file read here; a file that fills it is read on, never cut short
# a kept fd whose cgroup was removed answers ENODEV (kernfs); ESTALE and ENOENT mean the same on other filesystems
VANISHED = (errno.ENODEV, errno.ESTALE, errno.ENOENT)
_O_FLAGS = os.O_RDONLY | os.O_CLOEXEC


def read_small(path: str, errors: list | None = None) -> str | None:
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
    return data.decode("ascii", "replace")


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
    is what a fresh open would read, at a fifth of the cost (no path walk, no open/close). Fds are closed when
    discovery no longer lists the cgroup, and as soon as one answers ENODEV (the cgroup was removed: it is
    then opened once more by path, in case a cgroup of the same name was made since). At most `max_open` fds
    are kept; files beyond that are opened, read and closed as before. Limits (memory.limit_in_bytes /
    memory.max, pids.max) change rarely: they are read when a cgroup is first seen and then on every
    `limits_every`-th collection, without keeping an fd. `max_open` bounds this reader and FD_BUDGET the whole
    process.
    """

    def __init__(self, layout: Layout, groups, max_open: int = 0, limits_every: int = 1) -> None:
        self.layout = layout
        self.groups = groups
        self.errors: list[tuple[str, OSError]] = []
        self.max_open = max_open
        self.limits_every = max(1, limits_every)
        self.open_count = 0  # fds kept, over all cgroups
        self._fds: dict[str, dict[str, int]] = {}  # cgroup (relative path) -> file path -> fd kept open
        self._cur: dict[str, int] | None = None  # the fds of the cgroup being read
        self._vanished = False  # a kept fd of the cgroup being read said it was removed
        self._limits: dict[str, tuple[int | None, int | None]] = {}  # cgroup -> (memory limit, pids limit)
        self._collections = 0
        self._refresh_limits = True

    # -- kept fds -----------------------------------------------------------------------------------------------

    def begin(self) -> None:
        """A collection starts: decides whether limits are read again this time."""
        self._refresh_limits = self._collections % self.limits_every == 0
        self._collections += 1

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

    def text(self, path: str) -> str | None:
        fds = self._cur
        if fds is not None:
            fd = fds.get(path)
            if fd is not None:
                try:
                    data = os.pread(fd, BUFSIZE, 0)
                    if len(data) == BUFSIZE:
                        data = _read_rest(fd, data)
                    return data.decode("ascii", "replace")
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
        return read_small(path, self.errors)

    def _open_kept(self, path: str, fds: dict[str, int], reopening: bool) -> str | None:
        """Open a file, read it and keep its fd; read and closed as before when the process's budget is spent.
        `reopening`: its kept fd said the cgroup was removed, so not finding it now means the cgroup is gone."""
        if not FD_BUDGET.take():
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
        return self._first_read(path, fd, fds)

    def _first_read(self, path: str, fd: int, fds: dict[str, int]) -> str | None:
        """Read a file just opened and keep its fd (closed instead when it cannot be read)."""
        try:
            data = os.read(fd, BUFSIZE)
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
        return data.decode("ascii", "replace")

    # -- one cgroup ---------------------------------------------------------------------------------------------

    def read(self, rel: str) -> Stats:
        fds = self._fds.get(rel)
        if fds is None and self.max_open > 0:
            fds = self._fds[rel] = {}
        self._cur, self._vanished = fds, False
        try:
            s = self._read(rel)
        finally:
            self._cur = None
        if self._vanished or not s.found:
            self._close(rel)  # removed while read: nothing kept for it
            self._limits.pop(rel, None)
        elif fds is not None and not fds:
            del self._fds[rel]
        return s

    def _read(self, rel: str) -> Stats:
        s = Stats()
        lay, g = self.layout, self.groups
        text = self.text
        v2_cpu_stat: dict[str, int] | None = None
        if g.cpu and lay.cpu is not None:
            base = lay.cpu.root + rel
            if lay.cpu.v2:
                v2_cpu_stat = p.parse_flat(text(f"{base}/cpu.stat"))
                if "usage_usec" in v2_cpu_stat:
                    s.found = True
                    s.cpu_total = v2_cpu_stat["usage_usec"] / 1e6
                    s.cpu_user = v2_cpu_stat.get("user_usec", 0) / 1e6
                    s.cpu_system = v2_cpu_stat.get("system_usec", 0) / 1e6
            else:
                # usage_all: per-CPU user and system nanoseconds in one read; they add up to cpuacct.usage
                both = p.parse_cpuacct_usage_all(text(f"{base}/cpuacct.usage_all"))
                if both is None:
                    user, system = p.parse_int(text(f"{base}/cpuacct.usage_user")), \
                        p.parse_int(text(f"{base}/cpuacct.usage_sys"))
                    both = (user, system) if user is not None and system is not None else None
                if both is not None:
                    s.found = True
                    s.cpu_user, s.cpu_system = both[0] / 1e9, both[1] / 1e9
                    s.cpu_total = s.cpu_user + s.cpu_system
                else:
                    # old kernels: only the total in ns and user/system in USER_HZ ticks
                    total = p.parse_int(text(f"{base}/cpuacct.usage"))
                    if total is not None:
                        s.found = True
                        s.cpu_total = total / 1e9
                        ticks = p.parse_flat(text(f"{base}/cpuacct.stat"))
                        hz = _user_hz()
                        if "user" in ticks and "system" in ticks:
                            s.cpu_user, s.cpu_system = ticks["user"] / hz, ticks["system"] / hz
            thr = lay.throttle
            if thr is not None:
                if thr.v2 and lay.cpu.v2 and thr.root == lay.cpu.root:
                    stat = v2_cpu_stat or {}
                else:
                    stat = p.parse_flat(text(f"{thr.root}{rel}/cpu.stat"))
                if "nr_periods" in stat:
                    s.periods = stat["nr_periods"]
                    s.throttled_periods = stat.get("nr_throttled")
                    if "throttled_usec" in stat:
                        s.throttled_time = stat["throttled_usec"] / 1e6
                    elif "throttled_time" in stat:  # v1: nanoseconds
                        s.throttled_time = stat["throttled_time"] / 1e9
        limits = self._limits.get(rel) if not self._refresh_limits else None
        mem_limit = pids_limit = None
        if g.memory and lay.memory is not None:
            mem_limit = self._memory(lay.memory.root + rel, lay.memory.v2, s, limits)
        if g.io and lay.io is not None:
            self._io(lay.io.root + rel, lay.io.v2, s)
        if g.pids and lay.pids is not None:
            base = lay.pids.root + rel
            s.pids = p.parse_int(text(f"{base}/pids.current"))
            if limits is None:
                pids_limit = p.parse_int(read_small(f"{base}/pids.max", self.errors))  # "max" -> None
            else:
                pids_limit = limits[1]
            s.pids_limit = pids_limit
            s.found = s.found or s.pids is not None
        if limits is None and s.found:
            self._limits[rel] = (mem_limit, pids_limit)
        if g.pressure and lay.psi is not None:
            base = lay.psi + rel
            for res in ("cpu", "memory", "io"):
                for kind, total_us in p.parse_psi(text(f"{base}/{res}.pressure")).items():
                    s.psi[(res, kind)] = total_us / 1e6
        return s

    def _memory(self, base: str, v2: bool, s: Stats, limits: tuple | None) -> int | None:
        """Memory statistics into `s`; returns the limit as read (or as remembered in `limits`)."""
        text = self.text
        if v2:
            usage = p.parse_int(text(f"{base}/memory.current"))
            stat = p.parse_flat(text(f"{base}/memory.stat"))
            s.mem_rss, s.mem_cache = stat.get("anon"), stat.get("file")
            s.mem_kernel_stack, s.mem_page_tables = stat.get("kernel_stack"), stat.get("pagetables")
            inactive_file = stat.get("inactive_file")
            s.faults_major = stat.get("pgmajfault")
            faults = stat.get("pgfault")
            s.mem_limit = p.parse_int(read_small(f"{base}/memory.max", self.errors)) if limits is None \
                else limits[0]
            s.mem_swap = p.parse_int(text(f"{base}/memory.swap.current"))
            events = p.parse_flat(text(f"{base}/memory.events"))
            s.oom_events, s.oom_kills = events.get("oom"), events.get("oom_kill")
        else:
            usage = p.parse_int(text(f"{base}/memory.usage_in_bytes"))
            # total_* are hierarchical (they include sub-cgroups); the plain keys count this cgroup alone
            stat = p.parse_flat(text(f"{base}/memory.stat"))
            s.mem_rss, s.mem_cache = stat.get("total_rss"), stat.get("total_cache")
            s.mem_swap = stat.get("total_swap")
            inactive_file = stat.get("total_inactive_file")
            s.faults_major = stat.get("total_pgmajfault")
            faults = stat.get("total_pgfault")
            if limits is None:
                limit = p.parse_int(read_small(f"{base}/memory.limit_in_bytes", self.errors))
                s.mem_limit = limit if limit is not None and limit < p.V1_UNLIMITED else None
            else:
                s.mem_limit = limits[0]
            s.oom_kills = p.parse_flat(text(f"{base}/memory.oom_control")).get("oom_kill")
        if usage is not None:
            s.found = True
            s.mem_usage = usage
            # cAdvisor's working set: usage minus inactive file pages, never negative
            if inactive_file is not None:
                s.mem_working_set = max(0, usage - inactive_file)
        if faults is not None and s.faults_major is not None:
            s.faults_minor = max(0, faults - s.faults_major)
        return s.mem_limit

    def _io(self, base: str, v2: bool, s: Stats) -> None:
        if v2:
            for dev, v in p.parse_io_stat(self.text(f"{base}/io.stat")).items():
                s.io[dev] = {"read_bytes": v.get("rbytes", 0), "write_bytes": v.get("wbytes", 0),
                             "read_ops": v.get("rios", 0), "write_ops": v.get("wios", 0)}
            return
        # the _recursive files include sub-cgroups; older kernels only have the plain ones
        for suffix in ("_recursive", ""):
            by_bytes = self.text(f"{base}/blkio.throttle.io_service_bytes{suffix}")
            if by_bytes is not None:
                ops = p.parse_blkio(self.text(f"{base}/blkio.throttle.io_serviced{suffix}"))
                for dev, v in p.parse_blkio(by_bytes).items():
                    o = ops.get(dev, {})
                    s.io[dev] = {"read_bytes": v.get("read", 0), "write_bytes": v.get("write", 0),
                                 "read_ops": o.get("read", 0), "write_ops": o.get("write", 0)}
                return


_HZ: list[int] = []


def _user_hz() -> int:
    if not _HZ:
        try:
            _HZ.append(os.sysconf("SC_CLK_TCK") or 100)
        except (ValueError, OSError):
            _HZ.append(100)
    return _HZ[0]
