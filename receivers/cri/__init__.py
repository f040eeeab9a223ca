"""The `cri` receiver: container metadata and stats from the container runtime's CRI v1 gRPC API."""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc

from podmeter.component import Factory, Receiver, Stability
from podmeter.metrics import MetricsBuilder, MetricSpec, now_ns

from .client import CriClient, code_of, describe, is_unimplemented
from .config import CriConfig
from .metadata import (
    CONTAINER_NAME,
    POD_NAME,
    POD_NAMESPACE,
    POD_UID,
    ContainerMetadata,
    StatusInfo,
    build_snapshot,
    status_info,
)

# CPU, memory and pod network are what the cgroup receiver reads from the same cgroup and /proc files: off by
# default so a pipeline with both receivers has one source per series. Turn them on
# (`metrics: {container.cpu.time: {enabled: true}}`) where the agent cannot read cgroups. The writable layer is
# only known to the runtime: on. The same names have the same instruments as the cgroup receiver's (memory:
# gauges), so that a backend sees one type per name whichever receiver sent it.
_DUP = "; the cgroup receiver measures the same"
METRICS = (
    MetricSpec("container.cpu.time", "sum", "s", "CPU time the container used (CRI usage_core_nano_seconds)" + _DUP,
               enabled=False),
    MetricSpec("container.cpu.usage", "gauge", "{cpu}",
               "CPUs the container used, averaged by the runtime between its stats samples (omitted on the "
               "runtime's first sample, where it reads 0)" + _DUP, enabled=False),
    MetricSpec("container.memory.working_set", "gauge", "By",
               "Working set: memory usage minus inactive file cache (what kubelet evicts on)" + _DUP, enabled=False),
    MetricSpec("container.memory.usage", "gauge", "By", "Memory usage including all caches" + _DUP,
               enabled=False),
    MetricSpec("container.memory.rss", "gauge", "By", "Anonymous and swap cache memory" + _DUP,
               enabled=False),
    MetricSpec("container.filesystem.usage", "updowncounter", "By",
               "Bytes used by the container's writable layer"),
    MetricSpec("container.filesystem.inodes.usage", "updowncounter", "{inode}",
               "Inodes used by the container's writable layer"),
    MetricSpec("k8s.pod.cpu.time", "sum", "s", "CPU time the pod sandbox used (pod stats)" + _DUP, enabled=False),
    MetricSpec("k8s.pod.cpu.usage", "gauge", "{cpu}",
               "CPUs the pod used, averaged by the runtime (omitted on the runtime's first sample)" + _DUP,
               enabled=False),
    MetricSpec("k8s.pod.memory.working_set", "gauge", "By", "Pod working set memory" + _DUP, enabled=False),
    MetricSpec("k8s.pod.memory.usage", "gauge", "By", "Pod memory usage including caches" + _DUP,
               enabled=False),
    MetricSpec("k8s.pod.memory.rss", "gauge", "By", "Pod anonymous and swap cache memory" + _DUP,
               enabled=False),
    MetricSpec("k8s.pod.network.io", "sum", "By",
               "Bytes received and sent by the pod, per interface (none for host-network pods)" + _DUP,
               attributes=("network.interface.name", "network.io.direction"), enabled=False),
    MetricSpec("k8s.pod.network.errors", "sum", "{error}", "Receive and transmit errors, per interface" + _DUP,
               attributes=("network.interface.name", "network.io.direction"), enabled=False),
)
METRIC_NAMES = {m.name for m in METRICS}

RESOURCE_ATTRIBUTES = ("k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "k8s.container.name", "container.id",
                       "container.image.name", "container.image.tag", "container.runtime.name")


BACKOFF_MAX = 30.0
# A container whose ContainerStatus failed, or came back without a PID while it runs, is asked again after this
# long rather than at every refresh.
STATUS_RETRY = 60.0


class CriReceiver(Receiver):
    def __init__(self, settings, config: CriConfig) -> None:
        self.settings, self.config = settings, config
        self.log = settings.logger
        self.tel = settings.telemetry
        self.start_ns = now_ns()
        self.specs = {m.name: dataclasses.replace(m, enabled=config.metrics[m.name].enabled)
                      if m.name in config.metrics else m for m in METRICS}
        self.client = CriClient(config.endpoint, config.request_timeout)
        self.cache = ContainerMetadata(on_miss=self._on_miss)
        self.runtime_name = ""
        self.runtime_version = ""
        self._connected = False
        self._statuses: dict[str, StatusInfo] = {}
        self._status_retry: dict[str, float] = {}  # container id -> when to ask its status again (monotonic)
        # ids whose first (zero) usage_nano_cores sample has passed -> their CPU time then (ns; None if not given)
        self._seen_cpu: dict[str, int | None] = {}
        self._stats_unimplemented = False
        # ListPodSandboxStats failed as a whole (containerd 1.6 does while any sandbox is NOT_READY): ask
        # PodSandboxStats per READY sandbox until the next handshake (a restarted runtime may be a fixed one)
        self._pod_stats_each = False
        # each stats RPC only when one of its metrics is on (ListPodSandboxStats is slow in containerd 1.6)
        self._container_stats = any(m.enabled for n, m in self.specs.items() if n.startswith("container."))
        self._pod_stats = any(m.enabled for n, m in self.specs.items() if n.startswith("k8s.pod."))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._demand_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._pending_misses: set[str] = set()
        self._thread: threading.Thread | None = None
        self._refreshes = self.tel.counter("podmeter_cri_metadata_refreshes",
                                           "Metadata cache refreshes by trigger and outcome", ["trigger", "outcome"])
        self._size = self.tel.gauge("podmeter_cri_cache_containers", "Containers in the CRI metadata cache")

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self, host) -> None:
        host.publish("container_metadata", self.cache)
        self._size.set_function(lambda: len(self.cache))
        # One synchronous sync so that `collect --once` and processors see metadata at once; when the socket
        # is absent or the runtime down this returns quickly and the refresher thread keeps trying.
        ok = self._refresh("start")
        self._thread = threading.Thread(target=self._run, args=(ok,), name=f"cri-refresh-{self.settings.id}",
                                        daemon=True)
        self._thread.start()

    def ready(self, timeout: float) -> bool:
        if not self.client.socket_exists():
            return False
        return self.cache.synced.wait(timeout)

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        self.client.close()

    # -- metadata -------------------------------------------------------------------------------------------

    def _on_miss(self, cid: str) -> None:
        """An unknown container id was asked for: ask the refresher for an early refresh (it rate-limits)."""
        with self._demand_lock:
            if cid in self._pending_misses or len(self._pending_misses) >= 4096:
                return
            self._pending_misses.add(cid)
        self._wake.set()

    def _run(self, ok: bool) -> None:
        """Refresh every metadata_refresh_interval; earlier on demand, but not more often than
        on_demand_refresh_min_interval. While the runtime is unreachable, exponential backoff rules alone."""
        backoff, last = 1.0, time.monotonic()
        while not self._stop.is_set():
            due = last + (self.config.metadata_refresh_interval if ok else backoff)
            trigger = "periodic"
            while (remaining := due - time.monotonic()) > 0:
                if self._wake.wait(remaining):
                    if self._stop.is_set():
                        return
                    self._wake.clear()
                    if ok:
                        due = min(due, last + self.config.on_demand_refresh_min_interval)
                        trigger = "on_demand"
            if self._stop.is_set():
                return
            if trigger == "periodic":
                self.cache.clear_unknown()
            ok = self._refresh(trigger)
            last = time.monotonic()
            backoff = 1.0 if ok else min(backoff * 2, BACKOFF_MAX)

    def _handshake(self) -> bool:
        try:
            v = self.client.version()
        except Exception as exc:
            if is_unimplemented(exc):
                self.tel.error("cri_v1_unimplemented",
                               f"the runtime at {self.config.endpoint} does not serve CRI v1 (runtime.v1); "
                               "containerd >= 1.6 and CRI-O >= 1.20 do; retrying")
            else:
                self.tel.error("connect", f"CRI Version handshake with {self.config.endpoint} failed "
                                          f"({describe(exc)}); retrying with backoff")
            return False
        self.tel.recovered("cri_v1_unimplemented")
        self.runtime_name = v.runtime_name or "unknown"
        self.runtime_version = v.runtime_version
        self.cache.runtime_name = self.runtime_name
        # the runtime computes usage_nano_cores from its own previous sample: after it restarts, 0 again
        self._seen_cpu.clear()
        self._pod_stats_each = False
        # a runtime that did not implement a stats RPC may have been upgraded in place: ask it again
        self._stats_unimplemented = False
        self._pod_stats = any(m.enabled for n, m in self.specs.items() if n.startswith("k8s.pod."))
        self.log.info("connected to %s %s (CRI %s) at %s", self.runtime_name, v.runtime_version,
                      v.runtime_api_version, self.config.endpoint)
        return True

    def _refresh(self, trigger: str) -> bool:
        with self._refresh_lock:  # start() and the refresher thread never overlap; this keeps it so
            return self._refresh_locked(trigger)

    def _refresh_locked(self, trigger: str) -> bool:
        if not self.client.socket_exists():
            self._connected = False
            self.tel.error("socket_absent", f"{self.client.path} does not exist (is the container runtime running, "
                                            "and is the socket mounted?); retrying with backoff")
            self._refreshes.labels(trigger, "error").inc()
            return False
        self.tel.recovered("socket_absent")
        if not self._connected:
            if not self._handshake():
                self._refreshes.labels(trigger, "error").inc()
                return False
            self._connected = True
        with self._demand_lock:
            asked, self._pending_misses = self._pending_misses, set()
        try:
            sandboxes = self.client.list_pod_sandboxes()
            containers = self.client.list_containers()
        except Exception as exc:
            self._refreshes.labels(trigger, "error").inc()
            self.tel.error("list", f"listing pods and containers at {self.config.endpoint} failed: {describe(exc)}")
            # handshake again when the runtime may have restarted or been replaced. Not on a list too big for the
            # receive limit (or too slow): the runtime is there, and stats do not wait on the metadata lists.
            if code_of(exc) not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._connected = False
            return False
        self.tel.recovered("list")
        self.tel.recovered("connect")
        statuses = self._update_statuses(containers)
        snap, dropped = build_snapshot(sandboxes, containers, statuses, self.runtime_name, self.config.max_containers)
        if dropped:
            # one error per refresh, not per container: the backlog is in the message, the rate stays meaningful
            self.tel.error("cache_full", f"{dropped} containers beyond max_containers={self.config.max_containers} "
                                         "are not cached")
        else:
            self.tel.recovered("cache_full")
        self.cache.replace(snap)
        self.cache.mark_unknown({cid for cid in asked if not self.cache.known(cid)})
        self._refreshes.labels(trigger, "ok").inc()
        return True

    def _update_statuses(self, containers: list) -> dict[str, StatusInfo]:
        """Verbose ContainerStatus once per new container (and again once it runs, for its PID); pruned to the
        containers listed now, so removed ones are forgotten."""
        old, retry = self._statuses, self._status_retry
        new: dict[str, StatusInfo] = {}
        new_retry: dict[str, float] = {}
        # One refresh's status calls share a deadline: a runtime that answers slowly (or not at all) leaves the
        # remaining containers to the next refresh, instead of holding start-up and every refresh for one
        # request_timeout per container.
        deadline = time.monotonic() + 2 * self.config.request_timeout
        failed = left = 0
        for c in containers[: self.config.max_containers]:
            known = old.get(c.id)
            if known is not None and (known.pid or c.state != 1):
                new[c.id] = known
                continue
            if not self.config.container_pids:
                continue
            if known is not None:
                new[c.id] = known
            due = retry.get(c.id)
            now = time.monotonic()
            if due is not None and now < due:
                new_retry[c.id] = due
                continue
            if now >= deadline:
                left += 1
                continue
            try:
                info = status_info(self.client.container_status(c.id))
            except Exception as exc:
                if code_of(exc) == grpc.StatusCode.NOT_FOUND:
                    # removed since ListContainers (churn, not an error): the next refresh no longer lists it
                    new.pop(c.id, None)
                    continue
                failed += 1
                new_retry[c.id] = time.monotonic() + STATUS_RETRY
                self.tel.error("container_status", f"ContainerStatus {c.id[:13]} failed: {describe(exc)}; asked "
                                                   f"again in {STATUS_RETRY:g}s")
                if is_unimplemented(exc):
                    break
                continue
            new[c.id] = info
            if not info.pid and c.state == 1:  # running without a PID the runtime will tell: not at every refresh
                new_retry[c.id] = time.monotonic() + STATUS_RETRY
        if not failed:
            self.tel.recovered("container_status")
        if left:
            self.tel.error("container_status_slow", f"the runtime answered ContainerStatus slowly: {left} containers "
                                                    "are left for the next refresh")
        else:
            self.tel.recovered("container_status_slow")
        self._statuses, self._status_retry = new, new_retry
        return new

    # -- stats ----------------------------------------------------------------------------------------------

    def collect(self):
        b = MetricsBuilder(f"podmeter/receiver/{self.settings.id}", self.start_ns)
        if not self._connected:
            return b.build()  # the refresher says why (once); an empty batch keeps health neutral
        seen: dict[str, int | None] = {}
        answering = True
        if self._container_stats and not self._stats_unimplemented:
            answering = self._collect_containers(b, seen)
        # a runtime that just timed out (or went away) is not asked again in this collection: one request_timeout,
        # not two, before the collection returns (the default request_timeout is half the default interval)
        if self._pod_stats and answering:
            self._collect_pods(b, seen)
        self._seen_cpu = seen
        return b.build()

    def _collect_containers(self, b: MetricsBuilder, seen: dict) -> bool:
        """Container stats into b; False when the runtime did not answer (unreachable, or past the deadline)."""
        try:
            stats = self.client.list_container_stats()
        except Exception as exc:
            if is_unimplemented(exc):
                self._stats_unimplemented = True
                self.log.info("%s does not implement ListContainerStats: container stats are off, metadata "
                              "still works", self.runtime_name)
                return True
            self.tel.error("stats", f"ListContainerStats failed: {describe(exc)}")
            self._wake.set()  # let the refresher notice a restarted runtime soon
            return code_of(exc) not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.tel.recovered("stats")
        for s in stats:
            try:
                self._container_points(b, s, seen)
            except Exception as exc:  # one odd entry must not cost the others
                self.tel.error("stats_entry", f"container stats entry skipped: {type(exc).__name__}: {exc}")
        return True

    def _container_resource(self, a) -> dict:
        attrs = self.cache.container(a.id)
        if attrs is not None:
            return attrs
        # not cached yet (created since the last refresh): the stats entry carries kubelet's labels
        labels = a.labels
        attrs = {"container.id": a.id}
        for key, label in (("k8s.pod.uid", POD_UID), ("k8s.pod.name", POD_NAME),
                           ("k8s.namespace.name", POD_NAMESPACE), ("k8s.container.name", CONTAINER_NAME)):
            if labels.get(label):
                attrs[key] = labels[label]
        if "k8s.container.name" not in attrs and a.metadata.name:
            attrs["k8s.container.name"] = a.metadata.name
        if self.runtime_name:
            attrs["container.runtime.name"] = self.runtime_name
        return attrs

    def _container_points(self, b: MetricsBuilder, s, seen: dict) -> None:
        cid = s.attributes.id
        if not cid:  # an entry naming no container: nothing to attribute it to
            raise ValueError("no container id")
        res = self._container_resource(s.attributes)
        info = self.cache.container_info(cid)
        # Cumulative points start at the container's creation. A container created since the last refresh is
        # not cached yet: its cumulative points wait for the refresh its lookup asked for, rather than go out
        # once with another start time (a start time that changes tells a backend the counter was reset).
        start = None if info is None else info.created_at
        sp = self.specs
        if s.HasField("cpu"):
            self._cpu(b, s.cpu, cid, res, start, seen, sp["container.cpu.time"], sp["container.cpu.usage"])
        if s.HasField("memory"):
            self._memory(b, s.memory, res, sp["container.memory.working_set"], sp["container.memory.usage"],
                         sp["container.memory.rss"])
        # containerd answers zeros with timestamp 0 until its snapshot syncer (every stats_collect_period) has
        # measured a new container's layer: "not measured yet", not an empty layer
        if s.HasField("writable_layer") and s.writable_layer.timestamp:
            wl = s.writable_layer
            ts = wl.timestamp
            if wl.HasField("used_bytes"):
                b.add(sp["container.filesystem.usage"], wl.used_bytes.value, resource=res, time_ns=ts)
            if wl.HasField("inodes_used"):
                b.add(sp["container.filesystem.inodes.usage"], wl.inodes_used.value, resource=res, time_ns=ts)

    def _cpu(self, b, cpu, key, res, start, seen, time_spec, usage_spec) -> None:
        """`start`: creation time of the container (pod) in ns, 0 if the runtime does not say; None when it is
        not known yet, and then the cumulative point is left out."""
        ts = cpu.timestamp or None
        total = cpu.usage_core_nano_seconds.value if cpu.HasField("usage_core_nano_seconds") else None
        if total is not None and start is not None:
            b.add(time_spec, total / 1e9, resource=res, start_time_ns=start or None, time_ns=ts)
        if cpu.HasField("usage_nano_cores"):
            cores = cpu.usage_nano_cores.value
            # 0 on the runtime's first sample of a container means "not computed yet", not idle. The runtime
            # also starts afresh after it restarts, which this receiver does not always see (a quick restart
            # between two calls): a 0 while the CPU time grew since our last sample is that, not idleness.
            if cores > 0 or (key in self._seen_cpu and (total is None or self._seen_cpu[key] in (None, total))):
                b.add(usage_spec, cores / 1e9, resource=res, time_ns=ts)
        seen[key] = total

    @staticmethod
    def _memory(b, mem, res, ws_spec, usage_spec, rss_spec) -> None:
        ts = mem.timestamp or None
        for spec, field in ((ws_spec, "working_set_bytes"), (usage_spec, "usage_bytes"), (rss_spec, "rss_bytes")):
            if mem.HasField(field):
                b.add(spec, getattr(mem, field).value, resource=res, time_ns=ts)

    def _collect_pods(self, b: MetricsBuilder, seen: dict) -> None:
        stats = None
        if not self._pod_stats_each:
            try:
                stats = self.client.list_pod_sandbox_stats()
            except Exception as exc:
                if is_unimplemented(exc):
                    self._pod_stats = False
                    self.log.info("%s %s does not implement ListPodSandboxStats: pod-level stats are off",
                                  self.runtime_name, self.runtime_version)
                    return
                if code_of(exc) != grpc.StatusCode.UNKNOWN:  # unreachable or too slow: not the list's own fault
                    self.tel.error("pod_stats", f"ListPodSandboxStats failed: {describe(exc)}")
                    return
                # containerd 1.6 fails the whole list while any sandbox is NOT_READY, and kubelet keeps stopped
                # sandboxes around for a while: on a real node, nearly always
                self._pod_stats_each = True
                self.log.info("%s %s failed ListPodSandboxStats (%s): asking PodSandboxStats per ready sandbox "
                              "instead", self.runtime_name, self.runtime_version, describe(exc))
        if stats is None:
            stats = self._pod_stats_per_sandbox()  # says itself how it went
        else:
            self.tel.recovered("pod_stats")
        for s in stats:
            try:
                self._pod_points(b, s, seen)
            except Exception as exc:  # one odd entry must not cost the others
                self.tel.error("stats_entry", f"pod stats entry skipped: {type(exc).__name__}: {exc}")

    def _pod_stats_per_sandbox(self) -> list:
        """PodSandboxStats of every sandbox the cache knows READY, within one request_timeout in all (what the
        list call would have had): those answered by then, the runtime's silence or slowness said."""
        deadline = time.monotonic() + self.config.request_timeout
        stats = []
        ids = self.cache.ready_sandbox_ids()
        for i, sid in enumerate(ids):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.tel.error("pod_stats", f"PodSandboxStats answered slowly: {len(ids) - i} of {len(ids)} pods "
                                            "skipped in this collection")
                return stats
            try:
                stats.append(self.client.pod_sandbox_stats(sid, remaining))
            except Exception as exc:
                code = code_of(exc)
                if code == grpc.StatusCode.NOT_FOUND or "not in ready state" in describe(exc):
                    continue  # stopped or removed since the last metadata refresh
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    # the call in flight when the time runs out gets what is left of it and fails: the pods that
                    # answered before are kept
                    self.tel.error("pod_stats", f"PodSandboxStats failed: {describe(exc)}; {len(ids) - i} of "
                                                f"{len(ids)} pods skipped in this collection")
                    return stats
                self.tel.error("stats_entry", f"pod stats of sandbox {sid[:13]} skipped: {describe(exc)}")
        self.tel.recovered("pod_stats")
        return stats

    def _pod_points(self, b: MetricsBuilder, s, seen: dict) -> None:
        sp = self.specs
        md = s.attributes.metadata
        uid = s.attributes.labels.get(POD_UID) or md.uid
        if not uid or not s.HasField("linux"):
            return
        res = self.cache.pod(uid) or {"k8s.pod.uid": uid, "k8s.pod.name": md.name,
                                      "k8s.namespace.name": md.namespace}
        lin = s.linux
        # the start of the pod's cumulative points is its sandbox's creation: this entry's sandbox (a pod's new
        # sandbox has a new network namespace, whose counters start at 0), None while it is not cached yet
        sandbox = self.cache.sandbox_info(s.attributes.id)
        start = None if sandbox is None else sandbox.created_at
        # CRI-O lists the stats of every sandbox, a pod's stopped ones too: one pod, two sets of points under one
        # identity. As kubelet does, only the pod's current sandbox (READY, else newest) counts.
        current = self.cache.pod_sandbox_id(uid)
        if current is not None and current != s.attributes.id:
            return
        if lin.HasField("cpu"):
            self._cpu(b, lin.cpu, "pod:" + s.attributes.id, res, start, seen, sp["k8s.pod.cpu.time"],
                      sp["k8s.pod.cpu.usage"])
        if lin.HasField("memory"):
            self._memory(b, lin.memory, res, sp["k8s.pod.memory.working_set"], sp["k8s.pod.memory.usage"],
                         sp["k8s.pod.memory.rss"])
        if lin.HasField("network") and start is not None:
            ifaces = ([lin.network.default_interface] if lin.network.HasField("default_interface") else [])
            ifaces += list(lin.network.interfaces)
            ts = lin.network.timestamp or None
            for iface in ifaces:
                for direction, io_field, err_field in (("receive", "rx_bytes", "rx_errors"),
                                                       ("transmit", "tx_bytes", "tx_errors")):
                    attrs = {"network.interface.name": iface.name, "network.io.direction": direction}
                    if iface.HasField(io_field):
                        b.add(sp["k8s.pod.network.io"], getattr(iface, io_field).value, attrs, res, start, ts)
                    if iface.HasField(err_field):
                        b.add(sp["k8s.pod.network.errors"], getattr(iface, err_field).value, attrs, res, start,
                              ts)


factory = Factory(
    kind="receiver", type="cri", config_model=CriConfig, create=CriReceiver, stability=Stability.ALPHA,
    metrics=METRICS, resource_attributes=RESOURCE_ATTRIBUTES,
    description="Container and pod metadata (a local cache for k8sattributes) and stats from the CRI v1 API "
                "of containerd or CRI-O",
)
