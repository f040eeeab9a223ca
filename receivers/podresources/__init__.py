"""The `podresources` receiver: which pod and container each device (GPU, MIG device, ...) is allocated to,
from the kubelet's PodResources v1 gRPC API, shared with other components as "device_assignments"."""

from __future__ import annotations

import fnmatch
import os
import threading
import time

import grpc

from podmeter.component import Factory, Receiver, Stability
from podmeter.metrics import MetricsBuilder, MetricSpec, now_ns

from . import api_pb2 as pb
from . import api_pb2_grpc as pbg
from .config import PodResourcesConfig
from .slices import ResourceSlices

METRICS = (
    MetricSpec("k8s.container.device.allocated", "gauge", "{device}",
               "Allocation units of a device the kubelet gave the container: 1 for a whole device or MIG "
               "device; the number of replicas for a time-sliced or MPS-shared GPU", attributes=("hw.id", "k8s.resource.name")),
    MetricSpec("k8s.node.device.allocated", "gauge", "{device}",
               "Distinct devices of a resource allocated to some container on this node",
               attributes=("k8s.resource.name",)),
    MetricSpec("k8s.node.device.allocatable", "gauge", "{device}",
               "Devices of a resource the kubelet can allocate on this node (GetAllocatableResources)",
               attributes=("k8s.resource.name",)),
)
ALLOCATED, NODE_ALLOCATED, ALLOCATABLE = METRICS
BACKOFF_MAX = 30.0
ALLOCATABLE_RETRY = 600.0  # seconds between asks of GetAllocatableResources after UNIMPLEMENTED


def device_key(device_id: str) -> str:
    """The device behind a plugin id: time-slicing/MPS replicas are `<GPU UUID>::<n>` (NVIDIA's device plugin) or
    `nvidia<minor>/vgpu<n>` and `nvidia<minor>/gi<n>/vgpu<m>` (GKE's, which names devices by device node)."""
    key = device_id.split("::", 1)[0]
    base, sep, replica = key.rpartition("/vgpu")
    return base if sep and base and replica.isdigit() else key


class DeviceAssignments:
    """The "device_assignments" provider: device id -> the pods/containers it is allocated to."""

    def __init__(self) -> None:
        self._map: dict[str, tuple[dict, ...]] = {}
        self.synced = threading.Event()

    def assignments(self) -> dict[str, list[dict]]:
        return {dev: [dict(e) for e in entries] for dev, entries in self._map.items()}

    def device(self, device_id: str) -> list[dict]:
        return [dict(e) for e in self._map.get(device_key(device_id), ())]

    def replace(self, mapping: dict[str, tuple[dict, ...]]) -> None:
        self._map = mapping
        self.synced.set()


class PodResourcesReceiver(Receiver):
    def __init__(self, settings, config: PodResourcesConfig) -> None:
        self.settings, self.config = settings, config
        self.log, self.tel = settings.logger, settings.telemetry
        self.start_ns = now_ns()
        self.path = config.endpoint[len("unix://"):]
        self.provider = DeviceAssignments()
        self._patterns = list(config.resource_names)
        self._allocations: dict[tuple, int] = {}  # (container resource items, device id, resource name) -> units
        self._allocatable: dict[str, int] = {}
        # when GetAllocatableResources may next be asked after answering UNIMPLEMENTED: a kubelet upgraded or
        # restarted with the feature on is found again without restarting podmeter
        self._allocatable_retry_at: float | None = None
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: pbg.PodResourcesListerStub | None = None
        self._host = None
        self._terminated = self.tel.gauge(
            "podmeter_podresources_terminated_pods",
            "Pods the kubelet still lists with devices although the runtime reports their sandbox stopped (left out)")
        self._terminated_seen: set[tuple[str, str, str]] = set()  # (namespace, name, uid) left out at the last refresh
        self._slices = ResourceSlices(config.dra, self.tel, self.log, config.request_timeout)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self, host) -> None:
        self._host = host
        host.publish("device_assignments", self.provider)
        ok = self._refresh()  # one synchronous sync: `collect --once` and nvml see allocations at once
        self._thread = threading.Thread(target=self._run, args=(ok,), name=f"podresources-{self.settings.id}",
                                        daemon=True)
        self._thread.start()

    def ready(self, timeout: float) -> bool:
        if not os.path.exists(self.path):
            return False
        return self.provider.synced.wait(timeout)

    def shutdown(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self._reset()

    def _run(self, last_ok: bool) -> None:
        backoff = 1.0
        wait = self.config.refresh_interval if last_ok else backoff
        while not self._stop.wait(wait):
            try:
                ok = self._refresh()
                self.tel.recovered("refresh")
            except Exception as exc:  # noqa: BLE001 - the refresh thread must outlive any one refresh
                self.tel.error("refresh", f"refreshing device assignments failed: {type(exc).__name__}: {exc}")
                ok = False
            if ok:
                backoff, wait = 1.0, self.config.refresh_interval
            else:
                wait, backoff = backoff, min(backoff * 2, BACKOFF_MAX)

    # -- gRPC -----------------------------------------------------------------------------------------------

    def _get_stub(self) -> pbg.PodResourcesListerStub:
        with self._lock:
            if self._stub is None:
                size = self.config.max_recv_msg_size_mib << 20
                self._channel = grpc.insecure_channel(self.config.endpoint, options=[
                    ("grpc.max_receive_message_length", size),
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 5000),
                ])
                self._stub = pbg.PodResourcesListerStub(self._channel)
            return self._stub

    def _reset(self) -> None:
        """Drop the channel: a restarted kubelet recreates its socket, and a fresh dial finds it at once."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None

    def _call(self, name: str, request):
        try:
            return getattr(self._get_stub(), name)(request, timeout=self.config.request_timeout)
        except grpc.RpcError:
            self._reset()
            raise

    # -- refresh --------------------------------------------------------------------------------------------

    def _wanted(self, resource_name: str) -> bool:
        return _matches(resource_name, self._patterns)

    def _refresh(self) -> bool:
        if not os.path.exists(self.path):
            self.tel.error("socket_absent", f"{self.path} does not exist (is this a Kubernetes node, is the "
                                            "pod-resources directory mounted, or does kubelet_root_dir need "
                                            "setting?); retrying with backoff")
            return False
        self.tel.recovered("socket_absent")
        try:
            listed = self._call("List", pb.ListPodResourcesRequest())
        except grpc.RpcError as exc:
            self.tel.error("list", f"PodResources List at {self.config.endpoint} failed: {_describe(exc)}")
            return False
        self.tel.recovered("list")
        uids, container_ids, ended = self._cri_lookup()
        # the pods held, with each container's devices as (device id or DRA (driver, pool, device), resource name)
        held: list[tuple[pb.PodResources, str | None, pb.ContainerResources, dict[tuple, None]]] = []
        claimed: set[tuple[str, str, str]] = set()
        terminated: set[tuple[str, str, str]] = set()
        for pod in listed.pod_resources:
            if not pod.name:  # nothing to attribute its devices to
                continue
            pod_uid = uids(pod.namespace, pod.name)
            containers = [(c, self._held(c)) for c in pod.containers]
            # kubelets before the fix of kubernetes#119423/#132028 keep listing an ended pod's devices (a completed
            # Job, an evicted pod) until the pod object is deleted, and the device plugin hands them to new pods
            if pod_uid and ended(pod_uid):
                if any(devices for _c, devices in containers):
                    terminated.add((pod.namespace, pod.name, pod_uid))
                continue
            for container, devices in containers:
                if devices:
                    claimed.update(d for d, _r in devices if isinstance(d, tuple))
                    held.append((pod, pod_uid, container, devices))
        try:
            uuids = self._slices.resolve(claimed) if claimed else {}
        except Exception as exc:  # noqa: BLE001 - a UUID lookup must never cost the device map
            self.tel.error("resourceslices", f"looking up DRA device UUIDs failed: {type(exc).__name__}: {exc}")
            uuids = {}
        # (container, device, resource) -> allocation units: time-sliced replicas of one GPU given to one
        # container add up instead of making duplicate series
        allocations: dict[tuple, int] = {}
        mapping: dict[str, list[dict]] = {}
        for pod, pod_uid, container, devices in held:
            res = {"k8s.pod.name": pod.name, "k8s.namespace.name": pod.namespace, "k8s.container.name": container.name}
            if pod_uid:
                res["k8s.pod.uid"] = pod_uid
            # the container's id as every other receiver's container series carry it (promoted to a label by the
            # prometheus exporter): `on (container_id)` joins find these series too
            cid = container_ids(pod_uid, container.name) if pod_uid else None
            items = tuple(sorted({**res, "container.id": cid}.items() if cid else res.items()))
            for device, resource_name in devices:
                if isinstance(device, tuple):  # a DRA device: its UUID, or its driver's name for it
                    device_id = key = uuids.get(device) or "/".join(device)
                else:
                    device_id, key = device, device_key(device)
                akey = (items, key, resource_name)
                allocations[akey] = allocations.get(akey, 0) + 1
                entry = {**res, "k8s.resource.name": resource_name}
                if key != device_id:
                    entry["k8s.device.id"] = device_id  # the plugin's replica id
                mapping.setdefault(key, []).append(entry)
        allocatable = self._fetch_allocatable()
        self._terminated.set(len(terminated))
        for ns, name, uid in sorted(terminated - self._terminated_seen):
            self.log.debug("pod %s/%s (uid %s) has ended (its sandbox is stopped) but the kubelet still lists its "
                           "devices: left out", ns, name, uid)
        self._terminated_seen = terminated
        self._allocations = allocations
        if allocatable is not None:
            self._allocatable = allocatable
        self.provider.replace({k: tuple(v) for k, v in mapping.items()})
        return True

    def _held(self, container) -> dict[tuple, None]:
        """A container's tracked devices, each once: (device plugin id, resource name), and (DRA (driver, pool,
        device), driver) for devices claimed from a tracked DRA driver."""
        out: dict[tuple, None] = {}
        for devices in container.devices:
            if self._wanted(devices.resource_name):
                # a device listed twice for one container is one device (replicas have ids of their own)
                out.update(((d, devices.resource_name), None) for d in devices.device_ids if d)
        for claim in container.dynamic_resources:
            for r in claim.claim_resources:
                if r.device_name and _matches(r.driver_name, self.config.dra.drivers):
                    out[(r.driver_name, r.pool_name, r.device_name), r.driver_name] = None
        return out

    def _fetch_allocatable(self) -> dict[str, int] | None:
        if not self.config.allocatable:
            return None
        retry_at = self._allocatable_retry_at
        if retry_at is not None and time.monotonic() < retry_at:
            return None
        try:
            resp = self._call("GetAllocatableResources", pb.AllocatableResourcesRequest())
        except grpc.RpcError as exc:
            if _not_served(exc):
                # kubelet < 1.21, or the KubeletPodResourcesGetAllocatable gate off: List still works
                if retry_at is None:
                    self.log.info("the kubelet does not serve GetAllocatableResources (%s): "
                                  "k8s.node.device.allocatable is off (asked again every %gs)", _describe(exc),
                                  ALLOCATABLE_RETRY)
                self._allocatable_retry_at = time.monotonic() + ALLOCATABLE_RETRY
                # a kubelet restarted without it (downgraded, gate turned off): what it last said no longer holds
                return {}
            else:
                self.tel.error("allocatable", f"GetAllocatableResources failed: {_describe(exc)}")
            return None
        self.tel.recovered("allocatable")
        if retry_at is not None:
            self.log.info("the kubelet now implements GetAllocatableResources: k8s.node.device.allocatable is on")
            self._allocatable_retry_at = None
        counts: dict[str, set[str]] = {}
        for devices in resp.devices:
            if self._wanted(devices.resource_name):
                counts.setdefault(devices.resource_name, set()).update(device_key(d) for d in devices.device_ids)
        return {name: len(ids) for name, ids in counts.items()}

    def _cri_lookup(self):
        """PodResources names pods and containers but gives no uid or container id: borrow them from the CRI cache
        when one runs, and whether the pod has ended."""
        providers = [p for p in (self._host.lookup("container_metadata") if self._host else [])
                     if hasattr(p, "pod_by_name")]

        def uid(namespace: str, name: str) -> str | None:
            for p in providers:
                attrs = p.pod_by_name(namespace, name)
                if attrs and attrs.get("k8s.pod.uid"):
                    return attrs["k8s.pod.uid"]
            return None

        def container_id(pod_uid: str, name: str) -> str | None:
            for p in providers:
                found = p.container_id(pod_uid, name) if hasattr(p, "container_id") else None
                if found:
                    return found
            return None

        def ended(pod_uid: str) -> bool:
            """The runtime knows the pod's sandboxes and none is READY. A pod it does not know (yet: just admitted,
            or listed since the cache's last refresh) has not ended."""
            states = [p.pod_ready(pod_uid) for p in providers if hasattr(p, "pod_ready")]
            return False in states and True not in states

        return uid, container_id, ended

    # -- collection -----------------------------------------------------------------------------------------

    def collect(self):
        b = MetricsBuilder(f"podmeter/receiver/{self.settings.id}", self.start_ns)
        per_resource: dict[str, set[str]] = {}
        for (res, device, resource_name), units in self._allocations.items():
            b.add(ALLOCATED, units, {"hw.id": device, "k8s.resource.name": resource_name}, dict(res))
            per_resource.setdefault(resource_name, set()).add(device)
        # a resource the node has but nobody holds is 0 allocated, not a series that stops at its last value
        for resource_name in self._allocatable.keys() - per_resource.keys():
            per_resource[resource_name] = set()
        for resource_name, devices in per_resource.items():
            b.add(NODE_ALLOCATED, len(devices), {"k8s.resource.name": resource_name})
        for resource_name, count in self._allocatable.items():
            b.add(ALLOCATABLE, count, {"k8s.resource.name": resource_name})
        return b.build()


def _matches(name: str, patterns) -> bool:
    """Whether `name` matches one of the shell-style `patterns` (resource_names, dra.drivers)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _not_served(exc: grpc.RpcError) -> bool:
    """UNIMPLEMENTED (kubelet < 1.21), or the kubelet's answer while the method's feature gate is off (1.21-1.22
    by default): a plain Go error, so UNKNOWN, "PodResources API GetAllocatableResources disabled"."""
    code = exc.code()
    return code == grpc.StatusCode.UNIMPLEMENTED or (
        code == grpc.StatusCode.UNKNOWN and (exc.details() or "").rstrip().endswith("disabled"))


def _describe(exc: grpc.RpcError) -> str:
    details = (exc.details() or "").splitlines()[0] if exc.details() else ""
    return f"{exc.code().name}: {details}" if details else exc.code().name


factory = Factory(
    kind="receiver", type="podresources", config_model=PodResourcesConfig, create=PodResourcesReceiver,
    stability=Stability.ALPHA, metrics=METRICS,
    resource_attributes=("k8s.pod.name", "k8s.namespace.name", "k8s.container.name", "k8s.pod.uid", "container.id"),
    description="Device allocations (GPUs, MIG devices, other device plugin resources) per pod and container "
                "from the kubelet's PodResources API, shared with nvml as device_assignments",
)
