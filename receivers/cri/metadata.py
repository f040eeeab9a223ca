"""The local container metadata cache: container id -> pod, namespace, uid, container, image, runtime.

Built from `ListPodSandbox` + `ListContainers` (+ one verbose `ContainerStatus` per new container for its host
PID and image tag) and swapped in whole, so containers the runtime no longer lists are evicted at the next
refresh. Published under the Host key "container_metadata"; lookups are dict reads (never an RPC): an unknown
id only *requests* a refresh, which the receiver's refresher thread runs, rate-limited.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType

POD_NAME = "io.kubernetes.pod.name"
POD_NAMESPACE = "io.kubernetes.pod.namespace"
POD_UID = "io.kubernetes.pod.uid"
CONTAINER_NAME = "io.kubernetes.container.name"
KUBELET_LABELS = (POD_NAME, POD_NAMESPACE, POD_UID, CONTAINER_NAME)
NEGATIVE_MAX = 4096


def parse_image(ref: str) -> tuple[str | None, str | None]:
    """`registry:5000/ns/app:1.2@sha256:..` -> ("registry:5000/ns/app", "1.2"); a bare image id -> (None, None)."""
    ref = (ref or "").strip()
    if not ref or ref.startswith("sha256:") or (len(ref) == 64 and all(c in "0123456789abcdef" for c in ref)):
        return None, None
    name, _, _digest = ref.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:]
    return name, None


def normalise_id(container_id: str) -> str:
    """Accept the API server's form too (`containerd://<id>`, `cri-o://<id>`)."""
    return container_id.rpartition("://")[2] if "://" in container_id else container_id


@dataclass(frozen=True)
class PodInfo:
    uid: str
    name: str
    namespace: str
    sandbox_id: str
    labels: MappingProxyType
    annotations: MappingProxyType
    attributes: MappingProxyType


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    sandbox_id: str
    name: str
    pod_uid: str
    state: int
    created_at: int
    attempt: int
    pid: int | None
    attributes: MappingProxyType


@dataclass
class StatusInfo:
    """What one verbose ContainerStatus told us (kept per container id across refreshes)."""

    pid: int | None = None
    image: str = ""


@dataclass
class Snapshot:
    containers: dict[str, ContainerInfo] = field(default_factory=dict)
    pods: dict[str, PodInfo] = field(default_factory=dict)
    sandboxes: dict[str, ContainerInfo] = field(default_factory=dict)  # sandbox ("pause") id -> pod-level info
    by_name: dict[tuple[str, str], str] = field(default_factory=dict)  # (namespace, name) -> uid
    # (pod uid, container name) -> the id of that container (the running one, else the newest listed)
    by_container_name: dict[tuple[str, str], str] = field(default_factory=dict)


class ContainerMetadata:
    """The "container_metadata" provider. Thread-safe: readers see one whole snapshot or the next."""

    def __init__(self, runtime_name: str = "", on_miss: Callable[[str], None] | None = None) -> None:
        self._snap = Snapshot()
        self._on_miss = on_miss
        self._negative: set[str] = set()
        self._neg_lock = threading.Lock()
        self.synced = threading.Event()
        self.runtime_name = runtime_name

    # -- provider interface (podmeter.component.Host docstring) -------------------------------------------

    def container(self, container_id: str) -> dict | None:
        """OTel resource attributes of a container (or of a pod sandbox's pause container), None if unknown."""
        cid = normalise_id(container_id)
        snap = self._snap
        info = snap.containers.get(cid) or snap.sandboxes.get(cid)
        if info is not None:
            return dict(info.attributes)
        self._miss(cid)
        return None

    def pod(self, pod_uid: str) -> dict | None:
        info = self._snap.pods.get(pod_uid)
        return dict(info.attributes) if info else None

    # -- extras for processors that want more ---------------------------------------------------------------

    def pod_by_name(self, namespace: str, name: str) -> dict | None:
        snap = self._snap
        uid = snap.by_name.get((namespace, name))
        info = snap.pods.get(uid) if uid else None
        return dict(info.attributes) if info else None

    def pod_labels(self, pod_uid: str) -> dict[str, str]:
        """The pod's labels as kubelet copies them onto the sandbox (kubelet's io.kubernetes.* ones removed)."""
        info = self._snap.pods.get(pod_uid)
        return dict(info.labels) if info else {}

    def pod_annotations(self, pod_uid: str) -> dict[str, str]:
        info = self._snap.pods.get(pod_uid)
        return dict(info.annotations) if info else {}

    def container_id(self, pod_uid: str, name: str) -> str | None:
        """The id of the pod's container of that name (APIs that name containers only: PodResources)."""
        return self._snap.by_container_name.get((pod_uid, name))

    def container_pid(self, container_id: str) -> int | None:
        info = self._snap.containers.get(normalise_id(container_id))
        return info.pid if info else None

    def container_info(self, container_id: str) -> ContainerInfo | None:
        return self._snap.containers.get(normalise_id(container_id))

    def sandbox_info(self, sandbox_id: str) -> ContainerInfo | None:
        """The sandbox's pod-level info; None if unknown (which asks for a refresh, as container() does)."""
        info = self._snap.sandboxes.get(sandbox_id)
        if info is None:
            self._miss(sandbox_id)
        return info

    def pod_sandbox_id(self, pod_uid: str) -> str | None:
        """The pod's current sandbox: the READY one, else the newest."""
        info = self._snap.pods.get(pod_uid)
        return info.sandbox_id if info else None

    def pod_ready(self, pod_uid: str) -> bool | None:
        """Whether the pod has a READY sandbox: False when every sandbox of it the runtime lists is stopped
        (its pod ended, or the sandbox is being recreated); None when the cache knows no sandbox of it."""
        snap = self._snap  # one snapshot: the pod's current sandbox is its READY one, if it has one
        pod = snap.pods.get(pod_uid)
        sandbox = snap.sandboxes.get(pod.sandbox_id) if pod else None
        return None if sandbox is None else sandbox.state == 0

    def container_ids(self) -> list[str]:
        return list(self._snap.containers)

    def ready_sandbox_ids(self) -> list[str]:
        """The sandboxes the last refresh saw READY (the ones a runtime has stats for)."""
        return [sid for sid, info in self._snap.sandboxes.items() if info.state == 0]

    def __len__(self) -> int:
        return len(self._snap.containers)

    # -- maintenance (the receiver's refresher thread) ------------------------------------------------------

    def _miss(self, cid: str) -> None:
        with self._neg_lock:
            if cid in self._negative:
                return
        if self._on_miss is not None:
            self._on_miss(cid)

    def mark_unknown(self, ids: set[str]) -> None:
        """Ids still unknown after a refresh: stop them from triggering refreshes until the next periodic one."""
        with self._neg_lock:
            for cid in ids:
                if len(self._negative) >= NEGATIVE_MAX:
                    break
                self._negative.add(cid)

    def clear_unknown(self) -> None:
        with self._neg_lock:
            self._negative.clear()

    def known(self, cid: str) -> bool:
        snap = self._snap
        return cid in snap.containers or cid in snap.sandboxes

    def replace(self, snap: Snapshot) -> None:
        self._snap = snap
        self.synced.set()


def build_snapshot(sandboxes: list, containers: list, statuses: dict[str, StatusInfo], runtime_name: str,
                   max_containers: int) -> tuple[Snapshot, int]:
    """A new snapshot from the runtime's lists; returns it and how many containers and sandboxes did not fit
    (each kind is capped at max_containers; sorted so the newest READY sandboxes and running containers stay)."""
    snap = Snapshot()
    runtime = {"container.runtime.name": runtime_name} if runtime_name else {}
    by_sandbox: dict[str, PodInfo] = {}
    # kubelet keeps old NOT_READY sandboxes of a pod around for a while: READY (state 0) first, then newest
    dropped = 0
    for sb in sorted(sandboxes, key=lambda s: (s.state == 0, s.created_at), reverse=True):
        if len(snap.sandboxes) >= max_containers:
            dropped += 1
            continue
        labels = dict(sb.labels)
        uid = labels.get(POD_UID) or sb.metadata.uid
        name = labels.get(POD_NAME) or sb.metadata.name
        namespace = labels.get(POD_NAMESPACE) or sb.metadata.namespace
        if not uid:
            continue
        attrs = {"k8s.pod.uid": uid}
        if name:
            attrs["k8s.pod.name"] = name
        if namespace:
            attrs["k8s.namespace.name"] = namespace
        pod = PodInfo(uid=uid, name=name, namespace=namespace, sandbox_id=sb.id,
                      labels=MappingProxyType({k: v for k, v in labels.items() if k not in KUBELET_LABELS}),
                      annotations=MappingProxyType(dict(sb.annotations)), attributes=MappingProxyType(attrs))
        by_sandbox[sb.id] = pod
        if uid not in snap.pods:  # the first seen is the READY / newest one
            snap.pods[uid] = pod
            if name and namespace:
                snap.by_name.setdefault((namespace, name), uid)
        snap.sandboxes[sb.id] = ContainerInfo(
            id=sb.id, sandbox_id=sb.id, name="", pod_uid=uid, state=sb.state, created_at=sb.created_at, attempt=0,
            pid=None, attributes=MappingProxyType({**attrs, "container.id": sb.id, **runtime}))
    # running containers first, so a full cache keeps what is being measured
    for c in sorted(containers, key=lambda c: c.state != 1):
        if len(snap.containers) >= max_containers:
            dropped += 1
            continue
        labels = c.labels
        pod = by_sandbox.get(c.pod_sandbox_id)
        uid = labels.get(POD_UID) or (pod.uid if pod else "")
        attrs: dict = {}
        if uid:
            attrs["k8s.pod.uid"] = uid
        pod_name = labels.get(POD_NAME) or (pod.name if pod else "")
        namespace = labels.get(POD_NAMESPACE) or (pod.namespace if pod else "")
        cname = labels.get(CONTAINER_NAME) or c.metadata.name
        if pod_name:
            attrs["k8s.pod.name"] = pod_name
        if namespace:
            attrs["k8s.namespace.name"] = namespace
        if cname:
            attrs["k8s.container.name"] = cname
        attrs["container.id"] = c.id
        status = statuses.get(c.id)
        image_name, image_tag = None, None
        # ContainerStatus resolves the image to a repo tag; ListContainers often carries only the image id
        for ref in ((status.image if status else ""), c.image.user_specified_image, c.image.image, c.image_ref):
            image_name, image_tag = parse_image(ref)
            if image_name:
                break
        if image_name:
            attrs["container.image.name"] = image_name
        if image_tag:
            attrs["container.image.tag"] = image_tag
        attrs.update(runtime)
        if uid and cname:
            snap.by_container_name.setdefault((uid, cname), c.id)  # running containers come first
        snap.containers[c.id] = ContainerInfo(
            id=c.id, sandbox_id=c.pod_sandbox_id, name=cname, pod_uid=uid, state=c.state, created_at=c.created_at,
            # the PID of a container that has exited is dead, and the kernel may have given it to another process
            attempt=c.metadata.attempt, pid=status.pid if status and c.state == 1 else None,
            attributes=MappingProxyType(attrs))
    return snap, dropped


def status_info(resp) -> StatusInfo:
    """PID and image from a verbose ContainerStatus. containerd and CRI-O both put JSON with "pid" in info."""
    pid = None
    raw = resp.info.get("info") if resp.info else None
    if raw:
        try:
            value = json.loads(raw).get("pid")
            pid = int(value) if value else None
        except (ValueError, TypeError, AttributeError):
            pid = None
    if pid is None and resp.info.get("pid"):  # some runtimes put it at the top level
        try:
            pid = int(resp.info["pid"])
        except ValueError:
            pid = None
    return StatusInfo(pid=pid, image=resp.status.image.image if resp.status else "")
