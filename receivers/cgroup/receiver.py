"""The cgroup receiver: per container and per pod CPU, memory, IO, PIDs, pressure and network from cgroup files."""

from __future__ import annotations

import os
import resource
import time
from copy import copy
from dataclasses import replace

from opentelemetry.sdk.resources import Resource

from podmeter.attribution import CgroupRef
from podmeter.component import ComponentUnavailable, Receiver
from podmeter.metrics import MetricsBuilder, MetricsData, now_ns

from . import parsers as p
from .config import CgroupReceiverConfig
from .discovery import Discovery, Layout, detect_layout
from .metrics import CONTAINER_METRICS, GROUP_OF, KINDS, POD_METRICS
from .netns import PodNetwork
from .stats import FD_BUDGET, Reader, Reads, Stats, read_small


class CgroupReceiver(Receiver):
    def __init__(self, settings, config: CgroupReceiverConfig) -> None:
        self.settings = settings
        self.config = config
        self.logger = settings.logger
        self.telemetry = settings.telemetry
        self.start_ns = now_ns()
        self.scope = f"podmeter/receiver/{settings.id}"
        toggles = {name: t.enabled for name, t in config.metrics.items()}
        self.container_specs = {k: replace(s, enabled=toggles.get(s.name, s.enabled))
                                for k, s in CONTAINER_METRICS.items()}
        self.pod_specs = {k: replace(s, enabled=toggles.get(s.name, s.enabled)) for k, s in POD_METRICS.items()}
        # What is read of each kind of cgroup, decided here once: the files its own enabled metrics need (a file
        # that only metrics switched off need is never opened; a group switched off reads nothing). Containers also
        # read what the pod metrics that add up need: a pod without a cgroup of its own is the sum of its containers,
        # and on cgroup v1 a pod's OOM kills are its containers' (_SummedPod, _OomKillsV1).
        def wanted(specs: dict, level_on: bool) -> set[str]:
            return {suffix for suffix, s in specs.items()
                    if level_on and s.enabled and getattr(config.groups, GROUP_OF[s.name])}

        pod_wanted = wanted(self.pod_specs, config.per_pod)
        self.pod_reads = Reads(pod_wanted)
        self.container_reads = Reads(wanted(self.container_specs, config.per_container) | pod_wanted & _ADDITIVE)
        self.pod_network = any(GROUP_OF[self.pod_specs[suffix].name] == "network" for suffix in pod_wanted)
        self._container_handles = _Specs(self.container_specs)
        self._pod_handles = _Specs(self.pod_specs)
        self.layout: Layout | None = None
        self.discovery: Discovery | None = None
        self.reader: Reader | None = None
        self.network: PodNetwork | None = None
        self._next_search = 0.0
        self._prev_cpu: dict[tuple, tuple[float, float]] = {}  # cgroup key -> (cpu seconds, monotonic time)
        # cgroup key -> start time of its cumulative series. A cgroup present at the first collection counts since
        # before the receiver started: its series start at the receiver's start. One that appears later, or is made
        # again under the same path (a static pod restarted keeps its uid, so its pod cgroup's path), counts from 0
        # since the previous collection: its series start then, so that a backend sees a new series or a reset
        # (OTel: a cumulative that restarts gets a new start time) instead of a counter going backward.
        self._starts: dict[tuple, int] = {}
        self._last_ns = self.start_ns  # time of the previous collection (before the first: the receiver's start)
        # cgroup key -> (its CgroupRef, its Resource): one Resource object per cgroup for as long as it lives, which
        # the pipeline's caches (enrichment, the prometheus exporter's labels) then find again by identity
        self._resources: dict[tuple, tuple[CgroupRef, Resource]] = {}
        self._dev_names: dict[str, str] = {}
        self._psi_disabled_logged = False
        self._summed: dict[str, _SummedPod] = {}  # pod uid -> its containers' counts, for pods without a cgroup
        self._oom_v1: dict[str, _OomKillsV1] = {}  # pod uid -> its containers' OOM kills, on cgroup v1 memory
        root = config.cgroup_root
        # block device names: from the sysfs beside cgroup_root (/host/sys/dev/block for /host/sys/fs/cgroup) where
        # it is mounted, else this container's own /sys, which lists the host's block devices as well
        sys_root = root[: -len("/fs/cgroup")] if root.endswith("/fs/cgroup") else "/sys"
        self._block_dir = f"{sys_root}/dev/block" if os.path.isdir(f"{sys_root}/dev/block") else "/sys/dev/block"
        self._gauge = self.telemetry.gauge("podmeter_cgroup_discovered", "Pod and container cgroups found", ["kind"])

    # -- lifecycle ----------------------------------------------------------------------------------------------------

    def start(self, host) -> None:
        root = self.config.cgroup_root
        if not os.path.isdir(root):
            raise ComponentUnavailable(f"cgroup_root {root} does not exist: mount the host's /sys/fs/cgroup there "
                                       "or set cgroup_root")
        layout = detect_layout(root)
        if layout is None:
            raise ComponentUnavailable(f"no cgroup hierarchy under {root} (neither cgroup2 nor v1 controllers)")
        self.layout = layout
        self.discovery = Discovery(layout.walk, self.config.max_depth)
        self.reader = Reader(layout, self.container_reads, _fd_budget(self.config.max_open_files),
                             self.config.limits_every)
        self.network = PodNetwork(self.config.proc_root, layout.walk, self.reader.errors,
                                  keep=self.reader.max_open > 0)
        self.logger.info("%s; keeping up to %d cgroup files open", layout.describe(), self.reader.max_open)

    def shutdown(self) -> None:
        if self.reader is not None:
            self.reader.close()
        if self.network is not None:
            self.network.close()

    # -- collection ---------------------------------------------------------------------------------------------------

    def collect(self) -> MetricsData:
        if self.discovery is None:
            self.start(None)
        disc, reader = self.discovery, self.reader
        now = time.monotonic()
        if now >= self._next_search or not disc.anchors and not disc.colon_parents:
            disc.search()
            self._next_search = now + self.config.discovery_interval
            # a major:minor is given to another disk once its own is gone (NVMe and partitions get theirs
            # dynamically, on hot-plug or re-partitioning): names are looked up again at each search
            self._dev_names.clear()
        found, lost = disc.scan()
        if lost:
            self._next_search = 0.0  # a kubepods tree vanished (kubelet restart?): look again next time
        # fds of cgroups discovery no longer lists are closed before anything is read
        reader.retain(found.pods.keys() | found.containers.keys())
        reader.begin()
        collect_ns = now_ns()
        b = MetricsBuilder(self.scope, self.start_ns, time_ns=collect_ns)
        reader.errors.clear()
        seen: set[tuple] = set()

        per_pod_containers: dict[str, list[tuple[str, Stats]]] = {}
        # with per_container off, containers are read only for pods without a cgroup of their own
        with_dir = set() if self.config.per_container else {ref.pod_uid for ref in found.pods.values()}
        for path, ref in found.containers.items():
            if ref.pod_uid in with_dir:
                continue
            s = reader.read(path, self.container_reads)
            if not s.found:
                continue  # removed between listing and reading
            per_pod_containers.setdefault(ref.pod_uid, []).append((path, s))
            if self.config.per_container:
                key = ("c", path)
                seen.add(key)
                self._emit(b, self._container_handles, s, self._resource(key, ref, _container_resource), key,
                           time.monotonic())

        n_pods = 0
        if self.config.per_pod:
            network = self.network if self.pod_network else None
            if network is not None:
                network.begin(self._host_netns())
            pods: dict[str, list[tuple[str | None, CgroupRef]]] = {}
            for path, ref in found.pods.items():
                pods.setdefault(ref.pod_uid, []).append((path, ref))
            for uid, paths in found.containers_of.items():
                # containerd's "slice:prefix:id" form has no pod cgroup: the pod is the sum of its containers
                pods.setdefault(uid, []).append((None, found.containers[paths[0]]))
            summed = self._summed
            self._summed = {}
            oom_v1, self._oom_v1 = self._oom_v1, {}
            # cgroup v1 counts an OOM kill only in the victim's own memory cgroup (memory.oom_control is not
            # hierarchical, unlike cgroup2's memory.events): a pod cgroup's own count stays 0 while its containers'
            # processes are killed, so the pod's is its own plus its containers'
            v1_kills = self.layout.memory is not None and not self.layout.memory.v2 and self.pod_reads.oom_v1
            for uid, candidates in pods.items():
                s, ref = self._read_pod(uid, candidates, per_pod_containers.get(uid, ()), summed, found.containers)
                if s is None:
                    continue
                if v1_kills and s.oom_kills is not None and uid not in self._summed:  # a pod cgroup's own count
                    kills = self._oom_v1[uid] = oom_v1.get(uid) or _OomKillsV1()
                    s.oom_kills += kills.total(found.containers_of.get(uid, ()), per_pod_containers.get(uid, ()),
                                               found.containers, None if self.config.per_container
                                               else self.layout.memory.root)
                n_pods += 1
                key = ("p", uid)
                seen.add(key)
                resource = self._resource(key, ref, _pod_resource)
                self._emit(b, self._pod_handles, s, resource, key, time.monotonic())
                if network is not None:
                    net_dev = network.read(uid, found.containers_of.get(uid, ()))
                    if net_dev:
                        # the pod's network counters restart with its cgroup's, and also when its sandbox is made
                        # again in a new network namespace (the pod cgroup stays)
                        net_key = ("n", uid)
                        seen.add(net_key)
                        net_start = self._starts.get(net_key)
                        if uid in network.renewed:
                            net_start = self._starts[net_key] = self._last_ns
                        elif net_start is None or net_start < self._starts[key]:
                            net_start = self._starts[net_key] = self._starts[key]  # the pod's, as it moves
                        self._network(b, net_dev, resource, net_start)
            if network is not None:
                network.retain(pods)
                if network.failures:
                    self.telemetry.error("network", network.failures[0], count=len(network.failures))
                else:
                    self.telemetry.recovered("network")

        # forget CPU baselines of cgroups that are gone: bounded under churn
        if len(self._prev_cpu) > len(seen):
            self._prev_cpu = {k: v for k, v in self._prev_cpu.items() if k in seen}
        if len(self._resources) > len(seen):
            self._resources = {k: v for k, v in self._resources.items() if k in seen}
        if len(self._starts) > len(seen):
            self._starts = {k: v for k, v in self._starts.items() if k in seen}
        self._last_ns = collect_ns
        if reader.psi_disabled and not self._psi_disabled_logged:
            self._psi_disabled_logged = True
            self.logger.warning("the kernel has pressure stall information (PSI) switched off (its pressure files "
                                "answer 'operation not supported'): no pressure.stall_time; boot it with psi=1 "
                                "to have them")
        if reader.errors:
            path, exc = reader.errors[0]
            self.telemetry.error("read", f"{len(reader.errors)} cgroup files unreadable, first {path}: "
                                         f"{exc.strerror or exc}", count=len(reader.errors))
        else:
            self.telemetry.recovered("read")
        if reader.malformed:
            where = reader.malformed_at or "a pod's net/dev"
            self.telemetry.error("malformed", f"lines that are not what the kernel writes were skipped, first in "
                                              f"{where}: {reader.malformed[0]!r}", count=len(reader.malformed))
        else:
            self.telemetry.recovered("malformed")
        p.report_malformed_to(None)
        self._gauge.labels("pod").set(n_pods)
        self._gauge.labels("container").set(len(found.containers))
        return b.build()

    def _read_pod(self, uid: str, candidates, containers: list[tuple[str, Stats]], summed: dict,
                  listed) -> tuple[Stats | None, CgroupRef | None]:
        """The pod's statistics from the first candidate that can be read (a uid in two trees is a left-over)."""
        for path, ref in candidates:
            if path is not None:
                s = self.reader.read(path, self.pod_reads)
            else:
                pod = self._summed[uid] = summed.get(uid) or _SummedPod()
                s = pod.total(containers, listed)
            if s.found:
                return s, ref
        return None, None

    def _resource(self, key: tuple, ref: CgroupRef, attributes) -> Resource:
        kept = self._resources.get(key)
        if kept is None or kept[0] is not ref and kept[0] != ref:
            kept = self._resources[key] = (ref, Resource(attributes(ref)))
        return kept[1]

    def _emit(self, b: MetricsBuilder, specs: _Specs, s: Stats, resource: Resource, key: tuple, t: float) -> None:
        prev = self._prev_cpu.get(key)
        start = self._starts.get(key)
        if start is None:
            start = self._starts[key] = self._last_ns
        elif s.renewed or prev is not None and s.cpu_total is not None and s.cpu_total < prev[0]:
            # the cgroup was made again under the same path (its kept fds said so, or its CPU time went backward,
            # which a cgroup's never does): its counters restarted, so its series restart with a new start time,
            # and no CPU usage is computed across the two cgroups
            start = self._starts[key] = self._last_ns
            prev = None
        add = b.adder(resource, start)
        if s.cpu_user is not None:
            add(specs.cpu_time, s.cpu_user, {"cpu.mode": "user"})
            add(specs.cpu_time, s.cpu_system, {"cpu.mode": "system"})
        if s.cpu_total is not None:
            self._prev_cpu[key] = (s.cpu_total, t)
            if prev is not None and t > prev[1] and s.cpu_total >= prev[0]:
                cores = (s.cpu_total - prev[0]) / (t - prev[1])
                add(specs.cpu_usage, cores)
                add(specs.cpu_percent, cores * 100.0)
        if s.periods is not None:
            add(specs.periods, s.periods)
            add(specs.throttled_periods, s.throttled_periods)
            add(specs.throttled_time, s.throttled_time)
        add(specs.cpu_limit, s.cpu_limit)
        add(specs.mem_usage, s.mem_usage)
        add(specs.mem_working_set, s.mem_working_set)
        add(specs.mem_rss, s.mem_rss)
        add(specs.mem_cache, s.mem_cache)
        add(specs.mem_kernel_stack, s.mem_kernel_stack)
        add(specs.mem_page_tables, s.mem_page_tables)
        add(specs.mem_swap, s.mem_swap)
        add(specs.mem_limit, s.mem_limit)
        add(specs.oom_events, s.oom_events)
        add(specs.oom_kills, s.oom_kills)
        if s.faults_major is not None:
            add(specs.faults, s.faults_major, {"system.paging.fault.type": "major"})
            add(specs.faults, s.faults_minor, {"system.paging.fault.type": "minor"})
        if s.io:
            for dev, v in s.io.items():
                name = self._device_name(dev)
                add(specs.disk_io, v["read_bytes"], {"disk.io.direction": "read", "system.device": name})
                add(specs.disk_ops, v["read_ops"], {"disk.io.direction": "read", "system.device": name})
                add(specs.disk_io, v["write_bytes"], {"disk.io.direction": "write", "system.device": name})
                add(specs.disk_ops, v["write_ops"], {"disk.io.direction": "write", "system.device": name})
        add(specs.pids, s.pids)
        add(specs.pids_limit, s.pids_limit)
        for (res, kind), seconds in s.psi.items():
            add(specs.stall, seconds, {"pressure.resource": res, "pressure.type": kind})

    # -- network ------------------------------------------------------------------------------------------------------

    def _host_netns(self) -> str | None:
        """The node's network namespace: PID 1's, or (without the privilege to see it) podmeter's own, which is
        the node's when it runs with hostNetwork as the DaemonSet does."""
        for who in ("1", "self"):
            try:
                return os.readlink(f"{self.config.proc_root}/{who}/ns/net")
            except OSError:
                continue
        return None

    def _network(self, b: MetricsBuilder, data: bytes, resource: Resource, start: int) -> None:
        specs = self.pod_specs
        excluded = self.config.exclude_interfaces
        add = b.adder(resource, start)
        for iface, v in p.parse_net_dev(data).items():
            if iface in excluded:
                continue
            for direction, pre in (("receive", "rx"), ("transmit", "tx")):
                attrs = {"network.interface.name": iface, "network.io.direction": direction}
                add(specs["network.io"], v[f"{pre}_bytes"], attrs)
                add(specs["network.packet.count"], v[f"{pre}_packets"], dict(attrs))
                add(specs["network.errors"], v[f"{pre}_errs"], dict(attrs))
                add(specs["network.packet.dropped"], v[f"{pre}_drop"], dict(attrs))

    # -- helpers ------------------------------------------------------------------------------------------------------

    def _device_name(self, dev: str) -> str:
        """`8:0` -> `sda` from sysfs (cached); the major:minor itself if sysfs does not say."""
        name = self._dev_names.get(dev)
        if name is None:
            try:
                name = os.path.basename(os.readlink(f"{self._block_dir}/{dev}"))
            except OSError:
                name = dev
            if len(self._dev_names) < 4096:
                self._dev_names[dev] = name
        return name


class _OomKillsV1:
    """The OOM kills of a pod's containers on cgroup v1, where each is counted in the victim's cgroup alone. What a
    container counted stays counted once it is gone (kubelet restarts an OOM-killed container under a new id), as
    cgroup2's hierarchical count keeps it: the last count read of a container no longer listed is kept in `gone`.
    A container killed and removed between two collections is never read, so not counted (the ebpf receiver's OOM
    kills see every one)."""

    __slots__ = ("members", "gone")

    def __init__(self) -> None:
        self.members: dict[str, int] = {}  # container cgroup -> its last count
        self.gone = 0

    def total(self, paths, read: list[tuple[str, Stats]], listed, memory_root: str | None) -> int:
        """`read`: the pod's containers as read this collection; `memory_root`: where to read their kills instead
        (per_container off: containers of a pod with a cgroup are not read, only this one file of theirs)."""
        counts = {path: cs.oom_kills for path, cs in read if cs.oom_kills is not None}
        if memory_root is not None:
            for path in paths:
                n = p.parse_flat(read_small(f"{memory_root}{path}/memory.oom_control")).get(b"oom_kill")
                if n is not None:
                    counts[path] = n
        for path, last in self.members.items():
            if path not in counts:
                if path in listed:
                    counts[path] = last  # listed but not readable this time
                else:
                    self.gone += last  # gone for good (container ids are not reused)
        self.members = counts
        return self.gone + sum(counts.values())


class _SummedPod:
    """A pod without a cgroup of its own (containerd's `slice:prefix:id` form) is the sum of its containers. A pod
    cgroup's counters keep what its removed containers counted (the kernel has charged it to the parent), so the
    sum does too: the last counters read of a container no longer listed are kept in `gone`, and the pod's CPU
    time, faults, OOM and IO counters do not go backward when a container exits or restarts. Gauges (memory,
    PIDs) are those of the containers there now."""

    __slots__ = ("members", "gone")

    def __init__(self) -> None:
        self.members: dict[str, Stats] = {}  # container cgroup -> its last reading
        self.gone = Stats()

    def total(self, current: list[tuple[str, Stats]], listed) -> Stats:
        s = Stats()
        members = {}
        for path, cs in current:
            last = self.members.get(path)
            if cs.periods is None and last is not None and last.periods is not None:
                # its CPU limit was removed (in-place resize): its throttling counters are no longer read (the
                # kernel keeps them, and counts on from them if a limit comes back), so the pod's sums keep what
                # they were instead of going backward, which would read as a reset
                cs = copy(cs)
                cs.periods, cs.throttled_periods, cs.throttled_time = \
                    last.periods, last.throttled_periods, last.throttled_time
            s.add(cs)
            members[path] = cs
        for path, last in self.members.items():
            if path in members:
                continue
            if path in listed:  # listed but not readable this time: its last counters still count
                members[path] = last
                if s.found:
                    s.add(last, Stats.COUNTERS)
            else:
                self.gone.add(last, Stats.COUNTERS)  # gone for good (container ids are not reused)
        self.members = members
        if s.found:
            s.add(self.gone, Stats.COUNTERS)
        return s


# the metrics whose values add up across containers (Stats.ADDITIVE); limits and pressure do not
_ADDITIVE = frozenset(k.suffix for k in KINDS if k.group in ("cpu", "memory", "io", "pids")
                      and k.suffix not in ("cpu.limit", "memory.limit", "pids.limit"))


class _Specs:
    """The metric specs of one level (container or pod) resolved once, for the per point hot path."""

    __slots__ = ("cpu_time", "cpu_usage", "cpu_percent", "periods", "throttled_periods", "throttled_time",
                 "cpu_limit", "mem_usage", "mem_working_set", "mem_rss", "mem_cache", "mem_kernel_stack", "mem_page_tables",
                 "mem_swap", "mem_limit", "oom_events", "oom_kills", "faults", "disk_io", "disk_ops", "pids",
                 "pids_limit", "stall")

    def __init__(self, specs: dict) -> None:
        for attr, suffix in zip(self.__slots__, (
                "cpu.time", "cpu.usage", "cpu.percent", "cpu.throttling_data.periods",
                "cpu.throttling_data.throttled_periods", "cpu.throttling_data.throttled_time", "cpu.limit",
                "memory.usage",
                "memory.working_set", "memory.rss", "memory.cache", "memory.kernel_stack", "memory.page_tables",
                "memory.swap", "memory.limit", "memory.oom.events", "memory.oom.kills", "memory.paging.faults",
                "disk.io", "disk.operations", "pids.count", "pids.limit", "pressure.stall_time"), strict=True):
            setattr(self, attr, specs[suffix])


def _fd_budget(configured: int) -> int:
    """How many cgroup files may be kept open: `max_open_files`, at most half the soft RLIMIT_NOFILE (raised
    towards the hard limit first, as far as needed), so the rest of the process keeps fds to spare; the process's
    FD_BUDGET, shared by all cgroup receivers, is the largest of these."""
    if configured <= 0:
        return 0
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 2 * configured + 1024
        if soft != resource.RLIM_INFINITY and soft < want:
            target = want if hard == resource.RLIM_INFINITY else min(want, hard)
            if target > soft:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                    soft = target
                except (ValueError, OSError):
                    pass
    except (ValueError, OSError):
        return 0
    budget = configured if soft == resource.RLIM_INFINITY else max(0, min(configured, soft // 2))
    FD_BUDGET.raise_to(budget)  # for every cgroup receiver of this process together
    return budget


def _container_resource(ref: CgroupRef) -> dict:
    r = {"k8s.pod.uid": ref.pod_uid, "container.id": ref.container_id}
    if ref.runtime:
        r["container.runtime.name"] = ref.runtime
    if ref.qos_class:
        r["k8s.pod.qos_class"] = ref.qos_class
    return r


def _pod_resource(ref: CgroupRef) -> dict:
    r = {"k8s.pod.uid": ref.pod_uid}
    if ref.qos_class:
        r["k8s.pod.qos_class"] = ref.qos_class
    return r
