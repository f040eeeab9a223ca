"""Loader and reader for podmeter.bpf.o: which programs to load for the enabled features, the attach fallback
chain (fentry -> tp_btf -> raw_tp, adjusted by the kernel's BTF: see order_variants and oom_hook_problem), and
decoding the maps (layouts in podmeter.h)."""

from __future__ import annotations

import errno
import os
import re
import struct
from dataclasses import dataclass, field

from . import libbpf as lb

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OBJECT = os.path.join(HERE, "podmeter.bpf.o")

LAT_SLOTS = 27
WATCH_MAX = 512

# struct cg_counters, in order
COUNTER_FIELDS = (
    "switches_voluntary", "switches_involuntary", "syscalls", "syscall_errors", "tcp_tx_bytes", "tcp_rx_bytes",
    "tcp_retrans_segs", "tcp_conn_outbound", "tcp_conn_inbound", "oom_kills", "major_faults", "removed_ns",
    "runq_count", "runq_sum_ns",
)
N_COUNTERS = len(COUNTER_FIELDS)
COUNTERS_WORDS = N_COUNTERS + LAT_SLOTS
IDX = {name: i for i, name in enumerate(COUNTER_FIELDS)}
RUNQ_SLOTS = slice(N_COUNTERS, COUNTERS_WORDS)
# struct sc_counters
SC_FIELDS = ("calls", "errors", "lat_count", "lat_sum_ns")
SC_WORDS = len(SC_FIELDS) + LAT_SLOTS
SC_KEY = struct.Struct("=QII")
DIAG_SLOTS = ("counters_full", "syscalls_full", "task_storage_failed", "counters_added", "syscalls_added")

# Features a profile turns on -> the logical hooks they need.
FEATURES = ("context_switches", "runqueue_latency", "syscalls", "syscall_latency", "tcp", "oom_kills", "page_faults")


@dataclass(frozen=True)
class Variant:
    kind: str  # "fentry", "tp_btf", "raw_tp", "perf_event"
    programs: tuple[str, ...]
    counts_latency: bool = True  # raw_tp variants cannot use task storage
    task_storage: bool = False  # uses the task-local storage maps (TASK_STORAGE_MAPS): kernel 5.11+


TASK_STORAGE_MAPS = ("wakeup_ts", "sys_enter_ts")
NO_TASK_STORAGE = "needs task-local storage maps (kernel 5.11+)"


# Each hook's variants, most capable first; `attach_order` in the config filters and orders the kinds.
HOOKS: dict[str, tuple[Variant, ...]] = {
    "sched_switch": (Variant("tp_btf", ("switch_btf",), task_storage=True), Variant("raw_tp", ("switch_raw",), False)),
    "sched_wakeup": (Variant("tp_btf", ("wakeup_btf", "wakeup_new_btf"), task_storage=True),),
    "sys_enter": (Variant("tp_btf", ("sys_enter_btf",), task_storage=True),),
    "sys_exit": (Variant("tp_btf", ("sys_exit_btf",), task_storage=True),
                 Variant("raw_tp", ("sys_exit_raw",), False)),
    "tcp_bytes": (Variant("fentry", ("send_fexit", "recv_fentry")), Variant("tp_btf", ("send_btf", "recv_btf")),
                  Variant("raw_tp", ("send_raw", "recv_raw"))),
    "tcp_retransmit": (Variant("tp_btf", ("retrans_btf",)), Variant("raw_tp", ("retrans_raw",))),
    "tcp_state": (Variant("tp_btf", ("state_btf",)), Variant("raw_tp", ("state_raw",))),
    "oom": (Variant("tp_btf", ("oom_btf",)), Variant("raw_tp", ("oom_raw",))),
    "major_fault": (Variant("perf_event", ("major_fault",)),),
    "cgroup_rmdir": (Variant("tp_btf", ("rmdir_btf",)), Variant("raw_tp", ("rmdir_raw",))),
}


OOM_FALLBACK = ("per-container OOM kills still come from the cgroup receiver (container.memory.oom.kills, from "
                "memory.events oom_kill / memory.oom_control)")


def oom_hook_problem(btf: lb.BTF) -> str | None:
    """Why the mark_victim programs cannot attribute OOM kills on the kernel `btf` describes, None when they can.
    They read the victim's cgroup from arg 0 as a task_struct *: kernels before 6.8 (Ubuntu 22.04/24.04, Debian 12,
    RHEL 9) pass the victim's pid there instead, and every kill would land on cgroup id 0. Checked from the
    tracepoint's prototype, btf_trace_mark_victim = void (*)(void *ctx, <arg 0>, ...)."""
    tid = btf.find("btf_trace_mark_victim", lb.BTF_KIND_TYPEDEF)
    if tid is None:
        return f"the kernel's BTF has no oom/mark_victim tracepoint; {OOM_FALLBACK}"
    proto = btf.resolve(tid)
    if proto is not None and btf.kind(proto) == lb.BTF_KIND_PTR:
        proto = btf.resolve(btf.target(proto))
    params = btf.params(proto) if proto is not None and btf.kind(proto) == lb.BTF_KIND_FUNC_PROTO else []
    arg0 = btf.resolve(params[1]) if len(params) > 1 else None
    if arg0 is None or btf.kind(arg0) != lb.BTF_KIND_PTR:
        return ("oom/mark_victim passes the victim's pid, not its task, on this kernel (before 6.8): OOM kills cannot "
                f"be attributed to cgroups, the hook is not attached; {OOM_FALLBACK}")
    return None


def has_sock_length_tracepoints(btf: lb.BTF) -> bool:
    """sock:sock_send_length / sock_recv_length exist (kernel 6.3+)."""
    return all(btf.find(f"btf_trace_sock_{d}_length", lb.BTF_KIND_TYPEDEF) is not None for d in ("send", "recv"))


def order_variants(hook: str, variants: list[Variant], sock_length_tracepoints: bool) -> list[Variant]:
    """`variants` (attach_order applied) with kernel-dependent preferences: where the sock_*_length tracepoints
    exist, TCP bytes use them before fentry, since fentry/tcp_cleanup_rbuf overcounts receives (it runs several
    times per MSG_WAITALL / SO_RCVLOWAT receive, with the running total, and for MSG_PEEK); fentry stays the
    fallback for older kernels."""
    if hook == "tcp_bytes" and sock_length_tracepoints:
        return sorted(variants, key=lambda v: v.kind == "fentry")  # stable: the rest keep attach_order's order
    return variants


def hooks_for(features: set[str]) -> list[str]:
    hooks = ["cgroup_rmdir"]  # cleanup of removed cgroups, whatever is measured
    if features & {"context_switches", "runqueue_latency"}:
        hooks.append("sched_switch")
    if "runqueue_latency" in features:
        hooks.append("sched_wakeup")
    if "syscalls" in features:
        hooks.append("sys_exit")
        if "syscall_latency" in features:
            hooks.append("sys_enter")
    if "tcp" in features:
        hooks += ["tcp_bytes", "tcp_retransmit", "tcp_state"]
    if "oom_kills" in features:
        hooks.append("oom")
    if "page_faults" in features:
        hooks.append("major_fault")
    return hooks


@dataclass
class LoadResult:
    attached: dict[str, str] = field(default_factory=dict)  # hook -> variant kind in use
    unavailable: dict[str, str] = field(default_factory=dict)  # hook -> why (every variant failed)
    fallbacks: list[str] = field(default_factory=list)  # one line per variant that failed and was replaced


class Programs:
    """Open, configure, load and attach podmeter.bpf.o; read its maps."""

    def __init__(self, path: str, features: set[str], *, max_cgroups: int, syscall_entries: int,
                 tracked: list[int], attach_order: list[str], max_attempts: int = 12,
                 btf_path: str | None = None) -> None:
        self.path = path
        self.btf_path = btf_path  # whose BTF decides hook prototypes: None for the running kernel's
        self.features = set(features)
        self.max_cgroups = max_cgroups
        self.syscall_entries = syscall_entries
        self.tracked = [n for n in tracked if 0 <= n < WATCH_MAX]
        self.attach_order = attach_order
        self.max_attempts = max_attempts
        self.obj: lb.BPFObject | None = None
        self.counters: lb.Map | None = None
        self.syscalls: lb.Map | None = None
        self.diag: lb.Map | None = None
        self.removed_paths: lb.Map | None = None
        self.result = LoadResult()

    def _variants(self, hook: str, sock_length_tracepoints: bool = False) -> list[Variant]:
        order = {k: i for i, k in enumerate(self.attach_order)}
        # perf_event has no alternative and is not an ordering choice
        vs = sorted((v for v in HOOKS[hook] if v.kind == "perf_event" or v.kind in order),
                    key=lambda v: order.get(v.kind, -1))
        return order_variants(hook, vs, sock_length_tracepoints)

    def _kernel_checks(self) -> tuple[str | None, bool]:
        """(why the OOM hook cannot run or None, whether the sock_*_length tracepoints exist), from kernel BTF."""
        try:
            with lb.BTF(self.btf_path) as btf:
                return oom_hook_problem(btf), has_sock_length_tracepoints(btf)
        except lb.BPFError as exc:
            # without readable BTF the OOM prototype cannot be checked: do not risk counting every kill as cgroup 0
            return f"cannot check the mark_victim prototype ({exc.strerror}); {OOM_FALLBACK}", False

    def _open(self, chosen: dict[str, Variant]) -> lb.BPFObject:
        obj = lb.BPFObject(self.path)
        try:
            obj.only_load(p for v in chosen.values() for p in v.programs)
            if not any(v.task_storage for v in chosen.values()):
                obj.skip_maps(TASK_STORAGE_MAPS)  # nothing loaded uses them (and 5.8-5.10 cannot make them)
            obj.set_max_entries("counters", self.max_cgroups)
            # no breakdown: do not preallocate the per-syscall map
            breakdown = bool(self.tracked) and "syscalls" in self.features
            obj.set_max_entries("syscalls", self.syscall_entries if breakdown else 1)
            ro = obj.rodata()
            f = self.features
            # struct pm_cfg: switches, runq_latency, syscalls, syscall_latency, breakdown, pad[3], watch[512]
            if len(ro) < 8 + WATCH_MAX:
                raise lb.BPFError(errno.EINVAL, f"{self.path}: .rodata is {len(ro)} bytes, expected "
                                  f"{8 + WATCH_MAX}: the object does not match this podmeter (run make bpf)")
            sched = chosen.get("sched_switch")
            wake = chosen.get("sched_wakeup")
            runq = "runqueue_latency" in f and sched is not None and sched.counts_latency and wake is not None
            sc_lat = "syscall_latency" in f and "sys_enter" in chosen and chosen["sys_exit"].counts_latency \
                if "sys_exit" in chosen else False
            flags = ("context_switches" in f, runq, "syscalls" in f, sc_lat, bool(self.tracked))
            for i, on in enumerate(flags):
                ro[i] = bytes([1 if on else 0])
            for nr in self.tracked:
                ro[8 + nr] = b"\x01"
        except BaseException:
            obj.close()
            raise
        return obj

    def start(self) -> LoadResult:
        """Load with every enabled hook's best variant; a variant that fails to load, or loads but cannot attach, is
        replaced by the next one and the object reloaded; hooks with no variant left are reported unavailable.
        Raises BPFError when the object cannot load for a reason not tied to one program."""
        res = self.result = LoadResult()
        hooks = hooks_for(self.features)
        oom_problem, sock_tps = self._kernel_checks() if {"oom", "tcp_bytes"} & set(hooks) else (None, False)
        pending = {h: self._variants(h, sock_tps) for h in hooks}
        if not lb.map_type_supported(lb.BPF_MAP_TYPE_TASK_STORAGE):
            # 5.8-5.10: a map the kernel cannot make fails the whole object at load, not one program: the variants
            # that use one are left out beforehand (scheduler and syscall counts go on, without latencies)
            for hook in list(pending):
                vs = pending[hook]
                kept = [v for v in vs if not v.task_storage]
                if len(kept) == len(vs):
                    continue
                if not kept:
                    res.unavailable[hook] = f"{vs[0].kind} {NO_TASK_STORAGE}"
                    del pending[hook]
                    continue
                if vs[0].task_storage:
                    res.fallbacks.append(f"{hook}: {vs[0].kind} {NO_TASK_STORAGE}, using {kept[0].kind}")
                pending[hook] = kept
        for hook, vs in list(pending.items()):
            if hook == "oom" and oom_problem:
                res.unavailable[hook] = oom_problem
                del pending[hook]
            elif not vs:
                res.unavailable[hook] = f"no variant allowed by attach_order {self.attach_order}"
                del pending[hook]
        for _ in range(self.max_attempts):
            chosen = {h: vs[0] for h, vs in pending.items()}
            obj = self._open(chosen)
            try:
                obj.load()
            except lb.BPFError as exc:
                obj.close()
                failed = set(re.findall(r"prog '(\w+)'", exc.log))
                bad_hooks = [h for h, v in chosen.items() if failed & set(v.programs)]
                if not bad_hooks:
                    raise
                for hook in bad_hooks:
                    v = pending[hook].pop(0)
                    why = _reason(exc.log, v.programs) or exc.strerror
                    if pending[hook]:
                        res.fallbacks.append(f"{hook}: {v.kind} not loadable ({why}), trying {pending[hook][0].kind}")
                    else:
                        res.unavailable[hook] = f"{v.kind} not loadable ({why})"
                        del pending[hook]
                continue
            refused = self._attach(obj, chosen, res)
            # a kernel can refuse at attach what it loaded (fentry on arm64 before 6.0, which has no trampolines):
            # the next variant of such a hook needs its own load (.rodata depends on the variants), so the object
            # is made again, its links going with it
            retry = [h for h in refused if len(pending[h]) > 1]
            for hook, exc in refused.items():
                v = pending[hook][0]
                if hook in retry:
                    pending[hook].pop(0)
                    res.fallbacks.append(f"{hook}: {v.kind} not attachable ({exc.strerror}), trying "
                                         f"{pending[hook][0].kind}")
                else:
                    res.unavailable[hook] = f"{v.kind} attach failed: {exc.strerror}"
                    if retry:
                        del pending[hook]
            if retry:
                obj.close()
                res.attached.clear()
                continue
            self.obj = obj
            break
        else:
            raise lb.BPFError(errno.ELOOP, f"load {self.path}: gave up after {self.max_attempts} attempts")

        try:
            self.counters = obj.map("counters")
            self.syscalls = obj.map("syscalls")
            self.diag = obj.map("diag")
            self.removed_paths = obj.map("removed_paths")
            if self.counters.value_size != 8 * COUNTERS_WORDS or self.syscalls.value_size != 8 * SC_WORDS:
                raise lb.BPFError(errno.EINVAL, f"{self.path}: map layout differs from this podmeter (run make bpf)")
        except BaseException:
            self.close()  # attached already: a receiver that does not start must leave nothing running
            raise
        return res

    def _attach(self, obj: lb.BPFObject, chosen: dict[str, Variant], res: LoadResult) -> dict[str, lb.BPFError]:
        """Attach every chosen variant; the hooks whose attach failed, with why (their programs' links undone)."""
        refused = {}
        for hook, v in chosen.items():
            try:
                for prog in v.programs:
                    if v.kind == "perf_event":
                        obj.attach_perf_sw(prog, lb.PERF_COUNT_SW_PAGE_FAULTS_MAJ)
                    else:
                        obj.attach(prog)
                res.attached[hook] = v.kind
            except lb.BPFError as exc:
                # drop the hook (its other programs too): half a hook would count half its events
                for prog in v.programs:
                    for link in obj.links.pop(prog, []):
                        obj._lib.bpf_link__destroy(link)
                refused[hook] = exc
        return refused

    # ---- reading ------------------------------------------------------------------------------------------

    def read_counters(self) -> dict[int, list[int]]:
        """cgroup id -> the COUNTERS_WORDS u64s of struct cg_counters."""
        keys, vals, n = self.counters.items()
        ids = memoryview(keys).cast("Q").tolist()
        words = memoryview(vals).cast("Q").tolist()
        w = COUNTERS_WORDS
        return {ids[i]: words[i * w:(i + 1) * w] for i in range(n)}

    def read_syscalls(self) -> dict[tuple[int, int], list[int]]:
        """(cgroup id, syscall nr) -> the SC_WORDS u64s of struct sc_counters."""
        keys, vals, n = self.syscalls.items()
        words = memoryview(vals).cast("Q").tolist()
        w = SC_WORDS
        out = {}
        for i, (cgid, nr, _) in enumerate(SC_KEY.iter_unpack(keys)):
            out[(cgid, nr)] = words[i * w:(i + 1) * w]
        return out

    def read_diag(self) -> dict[str, int]:
        out = {}
        for i, name in enumerate(DIAG_SLOTS):
            raw = self.diag.lookup(struct.pack("=I", i))
            out[name] = struct.unpack("=Q", raw)[0] if raw else 0
        return out

    def removed_path(self, cgroup_id: int) -> str | None:
        """The path cgroup_rmdir gave for a removed cgroup with counts (relative to the cgroup2 root); None if none
        was kept or it was cut at REMOVED_PATH_LEN."""
        try:
            raw = self.removed_paths.lookup(struct.pack("=Q", cgroup_id))
        except lb.BPFError:
            return None  # the cgroup is then counted as unattributed, as before this map existed
        path = raw[:raw.find(b"\0")] if raw else b""
        if not path or len(path) >= len(raw) - 1:  # none, or as long as the buffer holds: cut
            return None
        return path.decode(errors="surrogateescape")

    def forget(self, cgroup_ids: list[int], syscall_keys: list[tuple[int, int]]) -> tuple[int, int]:
        """Delete entries of removed cgroups; how many were deleted from (counters, syscalls)."""
        if cgroup_ids:
            self.removed_paths.delete(struct.pack("=Q", c) for c in cgroup_ids)
        n_cg = self.counters.delete(struct.pack("=Q", c) for c in cgroup_ids) if cgroup_ids else 0
        n_sc = self.syscalls.delete(SC_KEY.pack(c, nr, 0) for c, nr in syscall_keys) if syscall_keys else 0
        return n_cg, n_sc

    def close(self) -> None:
        if self.obj is not None:
            self.obj.close()
            self.obj = None


def _reason(log: str, programs: tuple[str, ...]) -> str:
    """The most telling libbpf line about one of `programs` (e.g. 'failed to attach ... Permission denied')."""
    lines = [ln.strip() for ln in log.splitlines() if any(f"'{p}'" in ln for p in programs)]
    for ln in lines:
        m = re.search(r"(-?\d+)\s*$", ln)
        if "failed to load" in ln and m:
            try:
                return os.strerror(abs(int(m.group(1))))
            except ValueError:
                pass
    return lines[-1][:200] if lines else ""
