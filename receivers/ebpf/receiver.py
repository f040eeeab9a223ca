"""The ebpf receiver: loads podmeter.bpf.o at start, reads its maps once per collection and emits per-container
metrics attributed through the cgroup2 tree."""

from __future__ import annotations

import operator
import os
import time
from dataclasses import replace
from itertools import chain

from opentelemetry.sdk.metrics.export import MetricsData

from podmeter.component import ComponentUnavailable, CreateSettings, Host, Receiver
from podmeter.metrics import MetricsBuilder

from . import libbpf as lb
from . import metrics as m
from .cgroups import CgroupPaths, find_cgroup2
from .config import EbpfConfig
from .programs import COUNTERS_WORDS, DEFAULT_OBJECT, IDX, LAT_SLOTS, N_COUNTERS, SC_WORDS, Programs

# Exported histogram bounds: powers of 4 from 1 us to ~1.05 s (12 buckets). The kernel side keeps log2 slots;
# each slot k (values below 2^k us) folds into the first bound >= 2^k us, so the fold is exact.
BOUNDS_US = [4 ** j for j in range(11)]
BOUNDS_S = [b / 1e6 for b in BOUNDS_US]


def _slot_to_bucket() -> list[int]:
    out = []
    for k in range(LAT_SLOTS):
        upper = 1 if k == 0 else 2 ** k  # slot values are < upper us
        j = next((i for i, b in enumerate(BOUNDS_US) if b >= upper), len(BOUNDS_US))
        out.append(j)
    out[-1] = len(BOUNDS_US)  # the last slot is open-ended
    return out


SLOT_TO_BUCKET = _slot_to_bucket()
REMOVED = IDX["removed_ns"]

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def fold(slots: list[int]) -> list[int]:
    buckets = [0] * (len(BOUNDS_US) + 1)
    for j, n in zip(SLOT_TO_BUCKET, slots, strict=True):
        if n:
            buckets[j] += n
    return buckets


def effective_caps() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def _add(into: list[int], words: list[int]) -> None:
    for i, v in enumerate(words):
        if v:
            into[i] += v


class EbpfReceiver(Receiver):
    counts_events = True

    def __init__(self, settings: CreateSettings, config: EbpfConfig) -> None:
        self.settings = settings
        self.config = config
        self.log = settings.logger
        self.tel = settings.telemetry
        self.start_ns = time.time_ns()
        self.features = config.features()
        self.tracked = config.syscall_numbers()
        self.programs: Programs | None = None
        self.paths: CgroupPaths | None = None
        # resource key -> counters of removed cgroups of a resource that still has live cgroups (so a removed
        # sub-cgroup does not make a container's cumulative counters go backwards)
        self._carry: dict[tuple, list[int]] = {}
        self._carry_sc: dict[tuple, dict[int, list[int]]] = {}
        self._diag_seen: dict[str, int] = {}
        # resource key -> start time of its cumulative series. Resources at the first collection count since the
        # receiver started. One that appears later (or comes back: a static pod's cgroup made again under the same
        # uid, a systemd unit restarted with non_pod_cgroups: keep) starts at the previous collection, and so does
        # one whose counts went down (an LRU-evicted cgroup entry starts again from 0): OTel wants a new start time
        # where a cumulative restarts, not a counter going backward.
        self._starts: dict[tuple, int] = {}
        self._last_ns = self.start_ns
        self._prev_totals: dict[tuple, list[int]] = {}
        self._prev_sc: dict[tuple, dict[int, list[int]]] = {}
        # entries each map lost to LRU eviction, and those we deleted (see _diagnostics)
        self._evicted = {"counters": 0, "syscalls": 0}
        self._deleted = {"counters": 0, "syscalls": 0}
        self._enabled = {s.name: (config.metrics[s.name].enabled if s.name in config.metrics else s.enabled)
                         for s in m.METRICS}
        self._specs = {s.name: replace(s, enabled=self._enabled[s.name]) for s in m.METRICS}
        self._entries = self.tel.gauge("podmeter_ebpf_map_entries", "Entries in a BPF map at the last collection",
                                       ["map"])
        self._capacity = self.tel.gauge("podmeter_ebpf_map_capacity", "Capacity (max_entries) of a BPF map", ["map"])
        self._update_errors = self.tel.counter(
            "podmeter_ebpf_map_update_errors", "BPF-side failures to add an entry (map full, no memory)", ["map"])
        self._evictions = self.tel.counter(
            "podmeter_ebpf_map_evictions", "Entries the kernel evicted from an LRU map to make room (their cgroups' "
                                           "counters restarted)", ["map"])
        self._unattributed = self.tel.counter(
            "podmeter_ebpf_unattributed_cgroups", "Map entries whose cgroup was gone before it could be resolved")
        self._hooks = self.tel.gauge("podmeter_ebpf_hooks", "Hooks by state (1 = in this state)",
                                     ["hook", "kind", "state"])

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self, host: Host) -> None:
        path = self.config.bpf_object or DEFAULT_OBJECT
        if not os.path.isfile(path):
            raise ComponentUnavailable(f"eBPF object {path} is missing: run `make bpf` (needs clang, bpftool and "
                                       f"libbpf-dev) or set bpf_object")
        if not os.path.exists("/sys/kernel/btf/vmlinux"):
            raise ComponentUnavailable("the kernel has no BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF=y "
                                       "needed): CO-RE programs cannot load")
        mount = find_cgroup2(self.config.cgroup_root)
        if mount is None:
            raise ComponentUnavailable(f"no cgroup2 hierarchy at or under {self.config.cgroup_root} (cgroup v1 "
                                       f"only?): eBPF counters are keyed by cgroup v2 id")
        caps = effective_caps()
        has = lambda bit: bool(caps >> bit & 1)  # noqa: E731
        if not (has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))):
            raise ComponentUnavailable("missing capabilities: loading tracing programs needs CAP_BPF and "
                                       "CAP_PERFMON (or CAP_SYS_ADMIN)")
        if not self.features:
            raise ComponentUnavailable(f"profile {self.config.profile} with these program switches enables nothing")
        entries = self.config.max_syscall_entries or self.config.max_cgroups * 4
        progs = Programs(path, self.features, max_cgroups=self.config.max_cgroups, syscall_entries=entries,
                         tracked=list(self.tracked), attach_order=list(self.config.attach_order))
        try:
            res = progs.start()
        except lb.LibbpfMissing as exc:
            raise ComponentUnavailable(str(exc)) from None
        except KeyError as exc:
            raise ComponentUnavailable(f"{path} lacks program or map {exc}: it does not match this podmeter "
                                       f"(run make bpf)") from None
        except lb.BPFError as exc:
            tail = " | ".join(ln.strip() for ln in exc.log.splitlines()[-3:] if ln.strip())
            raise ComponentUnavailable(f"cannot load {path}: {exc.strerror or exc}"
                                       + (f" (libbpf: {tail})" if tail else "")) from None
        for line in res.fallbacks:
            self.log.info("hook fallback: %s", line)
        for hook, why in res.unavailable.items():
            self.tel.error(f"hook_unavailable:{hook}", f"hook {hook} cannot run on this kernel, its metrics are "
                                                       f"missing: {why}")
            self._hooks.labels(hook, "", "unavailable").set(1)
        for hook, kind in res.attached.items():
            self._hooks.labels(hook, kind, "attached").set(1)
        if not set(res.attached) - {"cgroup_rmdir"}:
            progs.close()
            raise ComponentUnavailable(f"no hook could attach: {res.unavailable}")
        if "runqueue_latency" in self.features and res.attached.get("sched_switch") == "raw_tp":
            self.tel.error("hook_degraded:runqueue_latency", "sched_switch runs as raw_tp: run-queue latency needs "
                                                             "tp_btf and is not measured")
        self.programs = progs
        self.paths = CgroupPaths(mount)
        self.start_ns = self._last_ns = time.time_ns()  # the maps count from here
        self.hooks = res
        self._capacity.labels("counters").set(progs.counters.max_entries)
        self._capacity.labels("syscalls").set(progs.syscalls.max_entries)
        self.log.info("ebpf: profile %s, %d hooks attached (%s), cgroup2 at %s", self.config.profile,
                      len(res.attached), ", ".join(f"{h}={k}" for h, k in sorted(res.attached.items())), mount)

    def shutdown(self) -> None:
        if self.paths is not None:
            self.paths.close()
        if self.programs is not None:
            self.programs.close()
            self.programs = None

    # ---- collection ---------------------------------------------------------------------------------------

    def _resource(self, entry) -> tuple | None:
        """Resource key (sorted attribute pairs) of a resolved cgroup, or None to drop it."""
        path, ref = entry
        if ref.pod_uid:
            attrs = [("k8s.pod.uid", ref.pod_uid)]
            if ref.container_id:
                attrs.append(("container.id", ref.container_id))
            if ref.runtime:
                attrs.append(("container.runtime.name", ref.runtime))
            if ref.qos_class:  # as the cgroup receiver's resources: one container, one resource
                attrs.append(("k8s.pod.qos_class", ref.qos_class))
            return tuple(sorted(attrs))
        policy = self.config.non_pod_cgroups
        if policy == "keep":
            return (("cgroup.path", path),)
        if policy == "aggregate":
            return (("podmeter.cgroup.scope", "host"),)
        return None

    def collect(self) -> MetricsData:
        progs, paths = self.programs, self.paths
        now = time.time_ns()
        b = MetricsBuilder(f"podmeter/receiver/{self.settings.id}", self.start_ns, time_ns=now)
        if progs is None or paths is None:
            return b.build()
        try:
            # before the maps: the additions counted then are all in the map or gone from it when it is read
            diag = progs.read_diag()
            counters = progs.read_counters()
            sc = progs.read_syscalls() if self.tracked and "syscalls" in self.features else {}
            self.tel.recovered("map_read")
        except lb.BPFError as exc:
            self.tel.error("map_read", f"reading BPF maps failed: {exc}")
            return b.build()
        self._diagnostics(progs, diag, counters, sc)

        ids = set(counters) | {cg for cg, _ in sc}
        resolved = paths.resolve(ids)
        gone = []
        for cg in [cg for cg, e in resolved.items() if e is None]:
            # gone before it was first looked up: its removal left its path, if it had counts
            path = progs.removed_path(cg) if cg in counters else None
            if path is None:
                gone.append(cg)
            else:
                resolved[cg] = paths.remember(cg, path)
        removed = [cg for cg, words in counters.items() if words[REMOVED]]
        # A cgroup's syscall entries without its counters entry: that was evicted, so the cgroup's removal marked
        # nothing and its entries (and series) would stay for good. Such cgroups (rare: the map was full) are
        # checked, and the removed ones get their last sample and cleanup as if marked.
        removed += [cg for cg in ids if cg not in counters and resolved.get(cg) is not None and not paths.exists(cg)]
        if gone:
            # removed before they could be resolved (or outside this cgroup namespace): nothing to attribute to
            self._unattributed.inc(len(gone))

        totals: dict[tuple, list[int]] = {}
        sc_totals: dict[tuple, dict[int, list[int]]] = {}
        live: set[tuple] = set()
        removed_set = set(removed)
        for cg, words in counters.items():
            entry = resolved.get(cg)
            if entry is None:
                continue
            res = self._resource(entry)
            if res is None:
                continue
            _add(totals.setdefault(res, [0] * COUNTERS_WORDS), words)
            if cg not in removed_set:
                live.add(res)
        for (cg, nr), words in sc.items():
            entry = resolved.get(cg)
            res = self._resource(entry) if entry is not None else None
            if res is not None:
                _add(sc_totals.setdefault(res, {}).setdefault(nr, [0] * SC_WORDS), words)
        for res, words in self._carry.items():
            if res in totals:
                _add(totals[res], words)
        for res, per_nr in self._carry_sc.items():
            if res in sc_totals or res in totals:
                for nr, words in per_nr.items():
                    _add(sc_totals.setdefault(res, {}).setdefault(nr, [0] * SC_WORDS), words)

        for words in totals.values():
            words[REMOVED] = 0  # a timestamp, not a count: kept out of the backward check

        starts = self._restarts(totals, sc_totals)
        for res, words in totals.items():
            self._emit(b, dict(res), words, starts[res])
        for res, per_nr in sc_totals.items():
            self._emit_syscalls(b, dict(res), per_nr, starts[res])

        self._cleanup(progs, paths, counters, sc, resolved, removed, gone, live)
        paths.retain(ids)
        self._last_ns = now
        return b.build()

    def _restarts(self, totals: dict, sc_totals: dict) -> dict[tuple, int]:
        """Each resource's start time (see _starts): kept while its counts only grow; the previous collection's
        time for a resource new since then, or one with a count (or histogram bucket, or per-syscall series) that
        went down."""
        starts: dict[tuple, int] = {}
        prev_t, prev_sc, known, lt = self._prev_totals, self._prev_sc, self._starts, operator.lt
        for res in totals.keys() | sc_totals.keys():
            start = known.get(res)
            if start is not None:
                old = prev_t.get(res)
                new = totals.get(res)
                back = old is not None and (new is None or any(map(lt, new, old)))
                old_sc = prev_sc.get(res)
                if not back and old_sc:
                    # one pass over all of the resource's per-syscall words (a series that vanished went back too)
                    new_sc = sc_totals.get(res, {})
                    back = not old_sc.keys() <= new_sc.keys() or any(map(
                        lt, chain.from_iterable(map(new_sc.__getitem__, old_sc)), chain.from_iterable(old_sc.values())))
                if back:
                    start = None
            starts[res] = self._last_ns if start is None else start
        # resources not reported now are forgotten: if they come back, they start again
        self._starts, self._prev_totals, self._prev_sc = starts, totals, sc_totals
        return starts

    def _cleanup(self, progs, paths, counters, sc, resolved, removed, gone, live) -> None:
        """Delete entries of removed cgroups (after this last sample) and carry their counts while the resource
        they belonged to lives on."""
        dead = set(removed) | set(gone)
        if not dead:
            self._carry = {r: w for r, w in self._carry.items() if r in live}
            self._carry_sc = {r: w for r, w in self._carry_sc.items() if r in live}
            return
        for cg in removed:
            entry = resolved.get(cg)
            res = self._resource(entry) if entry is not None else None
            if res is not None and res in live and cg in counters:
                _add(self._carry.setdefault(res, [0] * COUNTERS_WORDS), counters[cg])
        dead_sc = [key for key in sc if key[0] in dead]
        for cg, nr in dead_sc:
            entry = resolved.get(cg)
            res = self._resource(entry) if entry is not None else None
            if res is not None and res in live:
                _add(self._carry_sc.setdefault(res, {}).setdefault(nr, [0] * SC_WORDS), sc[(cg, nr)])
        self._carry = {r: w for r, w in self._carry.items() if r in live}
        self._carry_sc = {r: w for r, w in self._carry_sc.items() if r in live}
        for w in self._carry.values():
            w[REMOVED] = 0
        try:
            n_cg, n_sc = progs.forget(sorted(dead), dead_sc)
            self._deleted["counters"] += n_cg
            self._deleted["syscalls"] += n_sc
        except lb.BPFError as exc:
            self.tel.error("map_delete", f"deleting entries of removed cgroups failed: {exc}")
        paths.forget(dead)

    def _emit(self, b: MetricsBuilder, resource: dict, w: list[int], start: int) -> None:
        f, s = self.features, self._specs
        add = b.adder(resource, start)
        if "context_switches" in f:
            add(s[m.CONTEXT_SWITCHES.name], w[IDX["switches_voluntary"]], {"process.context_switch.type": "voluntary"})
            add(s[m.CONTEXT_SWITCHES.name], w[IDX["switches_involuntary"]],
                {"process.context_switch.type": "involuntary"})
        # The count is the buckets' sum, not the kernel's count word: the map is read while the programs add to
        # it (count, sum and slot are three separate atomic adds), so the two can differ by an event in flight, and
        # a point whose count is not the sum of its buckets is invalid (Prometheus: _count != le="+Inf").
        if "runqueue_latency" in f and w[IDX["runq_count"]]:
            b.add_histogram(s[m.RUNQUEUE_LATENCY.name], fold(w[N_COUNTERS:]), BOUNDS_S,
                            w[IDX["runq_sum_ns"]] / 1e9, resource=resource, start_time_ns=start)
        if "syscalls" in f:
            add(s[m.SYSCALLS.name], w[IDX["syscalls"]])
            add(s[m.SYSCALL_ERRORS.name], w[IDX["syscall_errors"]])
        if "tcp" in f:
            add(s[m.TCP_IO.name], w[IDX["tcp_tx_bytes"]], {"network.io.direction": "transmit"})
            add(s[m.TCP_IO.name], w[IDX["tcp_rx_bytes"]], {"network.io.direction": "receive"})
            add(s[m.TCP_RETRANSMITS.name], w[IDX["tcp_retrans_segs"]])
            add(s[m.TCP_CONNECTIONS.name], w[IDX["tcp_conn_outbound"]], {"network.connection.direction": "outbound"})
            add(s[m.TCP_CONNECTIONS.name], w[IDX["tcp_conn_inbound"]], {"network.connection.direction": "inbound"})
        if "oom_kills" in f:
            add(s[m.OOM_KILLS.name], w[IDX["oom_kills"]])
        if "page_faults" in f:
            add(s[m.MAJOR_FAULTS.name], w[IDX["major_faults"]])

    def _emit_syscalls(self, b: MetricsBuilder, resource: dict, per_nr: dict[int, list[int]], start: int) -> None:
        s = self._specs
        add = b.adder(resource, start)
        latency = "syscall_latency" in self.features
        for nr, w in sorted(per_nr.items()):
            name = self.tracked.get(nr)
            if name is None:
                continue
            add(s[m.SYSCALL_CALLS.name], w[0], {"syscall.name": name})
            add(s[m.SYSCALL_FAILURES.name], w[1], {"syscall.name": name})
            if latency and w[2]:
                # count = the buckets' sum, as for run-queue latency (see _emit)
                b.add_histogram(s[m.SYSCALL_DURATION.name], fold(w[4:]), BOUNDS_S, w[3] / 1e9,
                                attributes={"syscall.name": name}, resource=resource, start_time_ns=start)

    def _diagnostics(self, progs: Programs, diag: dict[str, int], counters: dict, sc: dict) -> None:
        # An LRU map evicts silently, and well before it is full (the kernel keeps free entries on per-CPU lists).
        # The map starts empty and only we delete, so entries now = added - deleted - evicted: this also finds
        # entries added and evicted between two collections (a new cgroup whose counts were lost whole), which a
        # comparison of the keys seen at each collection misses.
        for name, keys, setting, cap in (("counters", counters, "max_cgroups", progs.counters.max_entries),
                                         ("syscalls", sc, "max_syscall_entries", progs.syscalls.max_entries)):
            n = len(keys)
            self._entries.labels(name).set(n)
            evicted = diag[f"{name}_added"] - self._deleted[name] - n - self._evicted[name]
            # (below 0 when entries were added between reading diag and the map: counted at the next collection)
            evicted = max(evicted, 0)
            failed = max(diag[f"{name}_full"] - self._diag_seen.get(name, 0), 0)
            self._diag_seen[name] = diag[f"{name}_full"]
            self._evicted[name] += evicted
            if evicted:
                self._evictions.labels(name).inc(evicted)
            if failed:
                self._update_errors.labels(name).inc(failed)
            if evicted or failed:
                what = " and ".join(([f"{evicted} entries were evicted from"] if evicted else [])
                                    + ([f"{failed} entries could not be added to"] if failed else []))
                self.tel.error(f"{name}_map_full", f"{what} the {name} map ({n} of {cap} in use; an LRU map evicts "
                                                   f"before it is full): those cgroups' counts were lost or "
                                                   f"restarted; raise {setting}")
            elif n >= cap * 0.9:
                self.tel.error(f"{name}_map_full", f"the {name} map holds {n} of {cap} entries: raise {setting}")
            else:
                self.tel.recovered(f"{name}_map_full")
        failed = diag["task_storage_failed"] - self._diag_seen.get("task_storage", 0)
        if failed > 0:
            self._update_errors.labels("task_storage").inc(failed)
        self._diag_seen["task_storage"] = diag["task_storage_failed"]
