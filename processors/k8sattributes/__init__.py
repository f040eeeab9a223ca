"""k8sattributes: adds pod, namespace, container, workload and node metadata to resources.

Sources: an API-server informer on this node's pods (plus cached ReplicaSet/Job owner lookups and, only when
namespace labels or annotations are asked, a namespace informer) and the CRI receiver's local cache
("container_metadata"). Association: `pod_association` rules over k8s.pod.uid, container.id, process.pid
(through the cgroup attribution module), k8s.pod.name + k8s.namespace.name and k8s.pod.ip.
The processing path never calls the API server: it reads caches the informer threads keep current, and caches
its result per resource for as long as the pod table (its generation counter) and namespaces stay the same.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics
from opentelemetry.sdk.resources import Resource as OtelResource

from podmeter.attribution import ProcessAttributor, runtime_name
from podmeter.component import ComponentUnavailable, Factory, Host, Processor, Stability

from .config import K8sAttributesConfig, expand_tag
from .informer import (
    EMPTY,
    Api,
    ConfigurationError,
    OwnerResolver,
    PodCache,
    PodRecord,
    Reflector,
    Resource,
    _replace,
    build_api_client,
    client,
    controller_of,
    deployment_from_hash,
    normalise_container_id,
    parse_image,
)

POD_LEVEL = ("k8s.pod.name", "k8s.pod.uid", "k8s.pod.start_time", "k8s.pod.ip", "k8s.namespace.name", "k8s.node.name",
             "k8s.deployment.name", "k8s.replicaset.name", "k8s.statefulset.name", "k8s.daemonset.name",
             "k8s.job.name", "k8s.cronjob.name", "k8s.pod.qos_class")
SWEEP_INTERVAL = 5.0  # the attribution cache's sweep, at most; a shorter pod_delete_grace_period sweeps as often
# (deleted pods leave the pod table as soon as their grace period is over: PodCache.sweep is O(1) until then)
# The enrichment cache (resource -> enriched resource) keeps what was used in the last ENRICH_ROTATE_CALLS to
# 2 x ENRICH_ROTATE_CALLS process() calls, at most ENRICH_MAX_ENTRIES entries per half
ENRICH_ROTATE_CALLS = 16
ENRICH_MAX_ENTRIES = 65536


@dataclass
class _Rule:
    """A compiled label/annotation extraction rule."""

    tag_name: str
    key: str
    regex: re.Pattern | None
    kind: str  # "labels" | "annotations"
    source: str  # "pod" | "namespace"

    def apply(self, values: dict, out: dict) -> None:
        # default names as the semantic conventions give them: k8s.pod.label.<key>, k8s.namespace.annotation.<key>
        # (the collector's legacy plural form, k8s.pod.labels.<key>, is one tag_name away)
        prefix = f"k8s.{self.source}.{self.kind[:-1]}."
        if self.regex is None:
            if self.key in values:
                out[self.tag_name or prefix + self.key] = values[self.key]
            return
        for k, v in values.items():
            m = self.regex.fullmatch(k)
            if m:
                out[expand_tag(self.tag_name, m) if self.tag_name else prefix + k] = v


class _Match:
    __slots__ = ("record", "cri_pod", "uid", "container_id", "container_name")

    def __init__(self, record: PodRecord | None = None, cri_pod: dict | None = None, uid: str | None = None,
                 container_id: str | None = None, container_name: str | None = None) -> None:
        self.record, self.cri_pod, self.uid = record, cri_pod, uid
        self.container_id, self.container_name = container_id, container_name


class PodMetadataProvider:
    """Published under the Host key "pod_metadata"."""

    def __init__(self, processor: K8sAttributesProcessor) -> None:
        self._p = processor

    def pod(self, pod_uid: str) -> dict | None:
        rec = self._p.cache.get(pod_uid)
        if rec is None:
            return None
        out = dict(rec.attrs)
        out.update(self._p._namespace_attrs(rec.namespace))
        return out

    def pod_labels(self, pod_uid: str) -> dict[str, str] | None:
        rec = self._p.cache.get(pod_uid)
        return dict(rec.labels) if rec is not None else None

    def synced(self) -> bool:
        return self._p.pods_reflector is not None and self._p.pods_reflector.synced.is_set()


class K8sAttributesProcessor(Processor):
    def __init__(self, settings, config: K8sAttributesConfig) -> None:
        self.settings, self.config = settings, config
        self.telemetry = settings.telemetry
        meta = set(config.extract.metadata)
        self.pod_keys = tuple(k for k in POD_LEVEL if k in meta)
        self.want_container = {k for k in ("k8s.container.name", "container.image.name", "container.image.tag",
                                           "container.id", "container.runtime.name", "k8s.pod.qos_class") if k in meta}
        self.rules: list[_Rule] = []
        for kind, entries in (("labels", config.extract.labels), ("annotations", config.extract.annotations)):
            for e in entries:
                self.rules.append(_Rule(e.tag_name, e.key, re.compile(e.key_regex) if e.key_regex else None, kind,
                                        e.from_))
        self.pod_rules = [r for r in self.rules if r.source == "pod"]
        self.ns_rules = [r for r in self.rules if r.source == "namespace"]
        rules = config.association()
        self.associations = [tuple(s.name for s in rule.sources) for rule in rules
                             if all(s.from_ == "resource_attribute" for s in rule.sources)]
        if len(self.associations) < len(rules):
            settings.logger.info("pod_association: the rules with from: connection never match here: podmeter "
                                 "collects on the node and receives nothing over connections (as for the "
                                 "collector's own scrapers)")
        self.cache = PodCache(config.pod_delete_grace_period)
        self.namespaces: dict[str, MappingProxyType] = {}  # name -> extracted namespace attributes
        self.attributor = ProcessAttributor(config.proc_root)
        self.api_client: client.ApiClient | None = None
        self.owners: OwnerResolver | None = None
        self.pods_reflector: Reflector | None = None
        self.ns_reflector: Reflector | None = None
        self.host: Host | None = None
        self._last_sweep = time.monotonic()
        self._sweep_every = min(SWEEP_INTERVAL, max(config.pod_delete_grace_period, 0.1))
        self._cri_providers: list = []
        self._cri_at = float("-inf")
        self._sweep_lock = threading.Lock()
        # making a pod's record and storing it, on the informer thread, against the owner thread's updates of records
        self._records_lock = threading.Lock()
        self._owners_listed = threading.Event()  # the first pod list's owner lookups were made (see ready())
        # Enrichment results per resource, valid for one (pod cache, namespaces, CRI providers) generation: a
        # resource seen before costs a dict lookup. Keyed by its attributes, and by the Resource object itself once
        # the same object comes back (receivers that keep theirs across collections; the entry holds it, so its id
        # is not reused). Two halves rotated every ENRICH_ROTATE_CALLS calls: what is not used any more goes.
        self._ns_gen = 0
        self._enrich_gen: tuple = ()
        self._hot: dict = {}
        self._cold: dict = {}
        self._calls = 0
        self._tl = threading.local()  # per processing thread: did this association read volatile state
        t = self.telemetry
        self.m_pods = t.gauge("podmeter_k8sattributes_pods", "Pods in the metadata table, live or deleted "
                                                             "(kept for pod_delete_grace_period)", ["state"])
        self.m_misses = t.counter("podmeter_k8sattributes_association_misses",
                                  "Resources with pod identifiers that matched no known pod")
        self.m_restarts = t.counter("podmeter_k8sattributes_watch_restarts",
                                    "List/watch restarts by resource and reason (error, expired, forbidden, unauthorized)",
                                    ["resource", "reason"])
        self.m_sync_age = t.gauge("podmeter_k8sattributes_last_sync_age_seconds",
                                  "Seconds since the API server last confirmed the pod cache (list, event or bookmark); "
                                  "-1 before the first sync", ["resource"])

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self, host: Host) -> None:
        self.host = host
        self.m_pods.labels("live").set_function(lambda: self.cache.counts()[0])
        self.m_pods.labels("deleted").set_function(lambda: self.cache.counts()[1])
        host.publish("pod_metadata", PodMetadataProvider(self))
        if self.config.auth_type == "none":
            return
        try:
            self.api_client = build_api_client(self.config.auth_type, self.config.kube_config_path, self.config.context)
        except ConfigurationError as exc:
            raise ComponentUnavailable(f"no Kubernetes API access: {exc}") from None
        cfg = self.config
        api = Api(self.api_client)
        self.owners = OwnerResolver(api, cfg.owner_lookup_ttl, self.telemetry, cfg.request_timeout,
                                    backoff=(cfg.reconnect.initial_interval, cfg.reconnect.max_interval),
                                    on_resolved=self._owners_resolved, in_use=self._owners_in_use)
        kwargs: dict[str, Any] = {}
        node = cfg.filter.node
        env_var = cfg.filter.node_from_env_var
        if not node and env_var:  # configurations written for the collector name the variable, not the node
            node = os.environ.get(env_var, "").strip()
        if node:
            kwargs["field_selector"] = f"spec.nodeName={node}"
        else:
            empty = f"the environment variable {env_var} (filter.node_from_env_var) is empty or unset" if env_var \
                else "filter.node is empty"
            self.settings.logger.warning(f"{empty}: watching every pod of the cluster (memory and API load grow with "
                                         "the cluster); set filter.node to ${env:K8S_NODE_NAME} in a DaemonSet")
        if cfg.filter.labels:
            kwargs["label_selector"] = ",".join(f.selector() for f in cfg.filter.labels)
        if cfg.filter.namespace:
            kwargs["namespace"] = cfg.filter.namespace
        common = dict(telemetry=self.telemetry, restarts=self.m_restarts, request_timeout=cfg.request_timeout,
                      watch_timeout=cfg.watch_timeout, backoff=(cfg.reconnect.initial_interval, cfg.reconnect.max_interval))
        self.pods_reflector = Reflector(Resource("pods", "", api.list_pods, kwargs), self._pods_replaced, self._pod_event,
                                        **common)
        self.m_sync_age.labels("pods").set_function(lambda: self._age(self.pods_reflector))
        if self.ns_rules:
            self.ns_reflector = Reflector(Resource("namespaces", "", api.list_namespaces), self._namespaces_replaced,
                                          self._namespace_event, **common)
            self.m_sync_age.labels("namespaces").set_function(lambda: self._age(self.ns_reflector))
            self.ns_reflector.start()
        self.pods_reflector.start()
        if cfg.wait_for_metadata and not self.ready(cfg.wait_for_metadata_timeout):
            refused = [r.verb_resource for r in (self.pods_reflector, self.ns_reflector)
                       if r is not None and r.settled.is_set() and not r.synced.is_set()]
            if refused:
                # a 403 or 401 ended the wait at once: its own cause (forbidden_pods, unauthorized) says why, with
                # what to grant; a timeout here would send the user looking for a slow or unreachable API server
                self.settings.logger.info(f"wait_for_metadata: the API server refused the list of "
                                          f"{', '.join(refused)}; going on with CRI metadata while the informer "
                                          "keeps trying")
            else:
                self.telemetry.error("metadata_timeout", f"no pod list from the API server within "
                                                         f"{cfg.wait_for_metadata_timeout:g}s (wait_for_metadata); "
                                                         "going on with CRI metadata while the informer keeps trying")

    def ready(self, timeout: float) -> bool:
        """True once the first pod list (and namespace list, when asked) arrived, after waiting in the time left
        for that list's owner lookups; False on timeout or on a failure waiting does not fix (403, 401)."""
        deadline = time.monotonic() + timeout
        for r in (self.pods_reflector, self.ns_reflector):
            if r is None:
                continue
            if not r.settled.wait(max(0.0, deadline - time.monotonic())) or not r.synced.is_set():
                return False
        if self.pods_reflector is not None:
            # and, in the time left, the first list's owner lookups: workload names from the start when the API
            # server answers them (the pods' own metadata is in already and does not wait for them)
            self._owners_listed.wait(max(0.0, deadline - time.monotonic()))
        return True

    def shutdown(self) -> None:
        for r in (self.pods_reflector, self.ns_reflector):
            if r is not None:
                r.stop()
        if self.owners is not None:
            self.owners.stop()
        if self.api_client is not None:
            try:
                self.api_client.close()
            except Exception:  # closing a pool must not fail shutdown
                pass

    @staticmethod
    def _age(r: Reflector | None) -> float:
        return time.monotonic() - r.last_sync if r is not None and r.last_sync else -1.0

    # -- informer callbacks (informer threads) -------------------------------------------------------------------

    # The pods' records are stored with the owners' answers cached (or known last); the owners not cached are
    # looked up after, on the owner thread, which then redoes their pods' workload names (_owners_resolved): an
    # API server slow or hanging on ReplicaSet/Job GETs must not hold back the pods' own metadata or the watch

    def _pods_replaced(self, items: list[dict]) -> None:
        missing: dict = {}
        with self._records_lock:
            records = [r for r in (self._record(o, missing) for o in items) if r is not None]
            self.cache.replace(records)
        if self.owners is not None:
            self.owners.submit(missing, done=self._owners_listed)

    def _pod_event(self, etype: str, obj: dict) -> None:
        self._maybe_sweep()  # before the event: a pod deleted now stays at least until the next event or batch
        missing: dict = {}
        with self._records_lock:
            if etype == "DELETED":
                uid = (obj.get("metadata") or {}).get("uid")
                if uid:
                    self.cache.delete(uid)
            else:
                rec = self._record(obj, missing)
                if rec is not None:
                    self.cache.upsert(rec)
        if missing and self.owners is not None:
            self.owners.submit(missing)

    # -- owner retries (the owner lookups' retry thread) -------------------------------------------------------

    def _owners_in_use(self) -> set:
        """(kind, namespace, name) of the owners live pods have: a failed lookup no pod needs is not retried."""
        with self._records_lock:  # (not while a list's records are being made: its pods are not in the cache yet)
            out = set()
            for uid in self.cache.uids():
                rec = self.cache.get(uid)
                if rec is not None and rec.owner and rec.deleted_at is None:
                    out.add((rec.owner[0], rec.namespace, rec.owner[1]))
            return out

    def _owners_resolved(self, keys: list[tuple[str, str, str]]) -> None:
        """Owners read after their pods' records were stored (a first lookup, or a retry after a failure): give
        those pods the workload names they lacked (on the owner thread)."""
        keys_set = set(keys)
        # under the lock, a pod event's record was either stored before this (and is updated here) or is made after
        # the owner was cached (and has it)
        with self._records_lock:
            for uid in self.cache.uids():
                rec = self.cache.get(uid)
                if rec is None or rec.deleted_at is not None or not rec.owner or \
                        (rec.owner[0], rec.namespace, rec.owner[1]) not in keys_set:
                    continue
                attrs = {k: v for k, v in rec.attrs.items() if k not in rec.workload_keys}
                workload = {k: v for k, v in self._workload(rec.owner, rec.namespace, rec.labels).items()
                            if k in self.pod_keys and k not in attrs}  # (a rule's tag_name still wins)
                attrs.update(workload)
                self.cache.upsert(_replace(rec, attrs=MappingProxyType(attrs), workload_keys=frozenset(workload)))

    def _namespaces_replaced(self, items: list[dict]) -> None:
        fresh = {}
        for o in items:
            name = (o.get("metadata") or {}).get("name")
            if name:
                fresh[name] = self._ns_attrs(o)
        self.namespaces = fresh  # swapped whole: readers see one or the other
        self._ns_gen += 1

    def _namespace_event(self, etype: str, obj: dict) -> None:
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            return
        fresh = dict(self.namespaces)
        if etype == "DELETED":
            fresh.pop(name, None)
        else:
            fresh[name] = self._ns_attrs(obj)
        self.namespaces = fresh
        self._ns_gen += 1

    def _ns_attrs(self, obj: dict) -> MappingProxyType:
        md = obj.get("metadata") or {}
        out: dict = {}
        for rule in self.ns_rules:
            rule.apply(md.get(rule.kind) or {}, out)
        return MappingProxyType(out)

    def _record(self, obj: dict, missing: dict | None = None) -> PodRecord | None:
        """Everything the processing path needs from a pod object, computed once per event; the owner lookups it
        needs that are not cached are added to `missing`."""
        md, spec, status = obj.get("metadata") or {}, obj.get("spec") or {}, obj.get("status") or {}
        uid, name, ns = md.get("uid"), md.get("name"), md.get("namespace", "")
        if not uid or not name:
            return None
        labels, annotations = md.get("labels") or {}, md.get("annotations") or {}
        ip = status.get("podIP") or ""
        # host-network pods share the node's IP: it identifies none of them. A completed pod (a Job's, kept for
        # hours) still shows the podIP its sandbox released, which the CNI gives to new pods: not its IP any more
        index_ip = "" if spec.get("hostNetwork") or status.get("phase") in ("Succeeded", "Failed") else ip
        attrs: dict[str, Any] = {"k8s.pod.name": name, "k8s.pod.uid": uid, "k8s.namespace.name": ns}
        if spec.get("nodeName"):
            attrs["k8s.node.name"] = spec["nodeName"]
        if md.get("creationTimestamp"):
            # the collector's source: a backend fed by both sees one value (status.startTime is later, by hours
            # for a GPU pod that waited in Pending, and missing until the kubelet takes the pod)
            attrs["k8s.pod.start_time"] = md["creationTimestamp"]
        if status.get("qosClass"):
            attrs["k8s.pod.qos_class"] = status["qosClass"]
        if ip:
            attrs["k8s.pod.ip"] = ip
        owner = controller_of({"metadata": md})
        workload = self._workload(owner, ns, labels, missing) if owner is not None else {}
        attrs.update(workload)
        attrs = {k: v for k, v in attrs.items() if k in self.pod_keys}
        ruled: dict[str, Any] = {}
        for rule in self.pod_rules:
            rule.apply(labels if rule.kind == "labels" else annotations, ruled)
        attrs.update(ruled)
        # which attributes came from the owners, so a late owner lookup can redo them (rules win, as here)
        workload_keys = frozenset(k for k in workload if k in attrs and k not in ruled)
        images = {}
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []) + \
                 (spec.get("ephemeralContainers") or []):
            if c.get("name"):
                images[c["name"]] = parse_image(c.get("image", ""))
        cids = {}
        runtime = ""
        for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
            for cs in status.get(key) or []:
                if cs.get("containerID") and cs.get("name"):
                    cids[normalise_container_id(cs["containerID"])] = cs["name"]
                    runtime = runtime or runtime_name(cs["containerID"].partition("://")[0]) or ""
                # the previous instance's id (a restarted container's last samples)
                last = ((cs.get("lastState") or {}).get("terminated") or {}).get("containerID")
                if last and cs.get("name"):
                    cids[normalise_container_id(last)] = cs["name"]
        return PodRecord(uid, name, ns, index_ip, MappingProxyType(dict(labels)), MappingProxyType(attrs),
                         MappingProxyType(images), MappingProxyType(cids), started=status.get("startTime") or "",
                         mirror_uid=str(annotations.get("kubernetes.io/config.mirror") or ""), runtime=runtime,
                         owner=owner, workload_keys=workload_keys)

    def _workload(self, owner: tuple[str, str], ns: str, labels, missing: dict | None = None) -> dict:
        """The workload attributes of a pod whose controller is `owner` (kind, name), from the owner lookups'
        cache; a lookup not cached is added to `missing`."""
        out: dict[str, str] = {}
        kind, name = owner
        if kind == "ReplicaSet":
            out["k8s.replicaset.name"] = name
            parent = self._owner(kind, ns, name, missing) if "k8s.deployment.name" in self.pod_keys else None
            if parent is not None and parent[0] == "Deployment":
                out["k8s.deployment.name"] = parent[1]
            elif parent is None:
                # the ReplicaSet could not be read (no permission, the API server failing: then it is retried);
                # one read and found without a Deployment (orphaned) has none, as in the collector
                dep = deployment_from_hash(name, labels)
                if dep:
                    out["k8s.deployment.name"] = dep
        elif kind == "StatefulSet":
            out["k8s.statefulset.name"] = name
        elif kind == "DaemonSet":
            out["k8s.daemonset.name"] = name
        elif kind == "Job":
            out["k8s.job.name"] = name
            parent = self._owner(kind, ns, name, missing) if "k8s.cronjob.name" in self.pod_keys else None
            if parent is not None and parent[0] == "CronJob":
                out["k8s.cronjob.name"] = parent[1]
        return out

    def _owner(self, kind: str, ns: str, name: str, missing: dict | None) -> tuple[str, str] | None:
        """The cached answer (or the last one known, or None): never a GET, which the owner thread makes."""
        if self.owners is None:
            return None
        current, answer = self.owners.cached(kind, ns, name)
        if not current and missing is not None:
            missing[(kind, ns, name)] = None
        return answer

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        self.cache.sweep(now)  # deleted pods whose time is over (one comparison while none is)
        if now - self._last_sweep < self._sweep_every or not self._sweep_lock.acquire(blocking=False):
            return
        try:
            self._last_sweep = now
            self.attributor.sweep()
        finally:
            self._sweep_lock.release()

    # -- processing ------------------------------------------------------------------------------------------------

    def process(self, data: MetricsData) -> MetricsData:
        self._maybe_sweep()
        # read before any metadata: a change after this makes the next call's generation differ
        gen = (self.cache.generation, self._ns_gen, tuple(self._cri()))
        if gen != self._enrich_gen:
            self._hot, self._cold, self._calls = {}, {}, 0
            self._enrich_gen = gen
        else:
            self._calls += 1
            if self._calls >= ENRICH_ROTATE_CALLS or len(self._hot) > ENRICH_MAX_ENTRIES:
                self._hot, self._cold, self._calls = {}, self._hot, 0
        out = []
        changed = False
        for rm in data.resource_metrics:
            res = self._enriched(rm.resource, gen)
            if res is not None:
                rm = ResourceMetrics(resource=res, scope_metrics=rm.scope_metrics, schema_url=rm.schema_url)
                changed = True
            out.append(rm)
        return MetricsData(resource_metrics=out) if changed else data

    def _enriched(self, resource, gen: tuple):
        """The resource with this processor's attributes added, or None when it adds nothing (cached)."""
        hot, cold = self._hot, self._cold
        key = id(resource)
        entry = hot.get(key)
        if entry is None:
            entry = cold.get(key)
            if entry is not None and entry[1] is resource:
                hot[key] = entry
        if entry is not None and entry[1] is resource and entry[0] == gen:
            if entry[3]:
                self.m_misses.inc()
            return entry[2]
        attrs = resource.attributes
        try:
            akey = (resource.schema_url, *attrs.items())
            hash(akey)
        except TypeError:  # a list value: not cached
            akey = None
        if akey is not None:
            entry = hot.get(akey)
            if entry is None:
                entry = cold.get(akey)
                if entry is not None:
                    hot[akey] = entry
            if entry is not None and entry[0] == gen:
                if entry[1] is resource:  # the receiver keeps its Resource objects: find it by identity next
                    hot[key] = entry
                if entry[3]:
                    self.m_misses.inc()
                return entry[2]
        tl = self._tl
        tl.volatile = tl.missed = False
        extra = self.attributes_for(attrs)
        add = {k: v for k, v in extra.items() if attrs.get(k) in (None, "")}
        res = OtelResource({**attrs, **add}, resource.schema_url) if add else None
        # what came from /proc (process.pid: the PID may be reused) or a CRI cache (no change signal) is not kept
        if not tl.volatile and akey is not None:
            hot[akey] = (gen, resource, res, tl.missed)
        return res

    def attributes_for(self, attrs) -> dict:
        """The attributes to add to a resource with these attributes (empty when no pod matches)."""
        match = self._associate(attrs)
        if match is None:
            return {}
        out: dict[str, Any] = {}
        rec = match.record
        if rec is not None:
            out.update(rec.attrs)
            out.update(self._namespace_attrs(rec.namespace))
        elif match.cri_pod is not None:
            out.update(self._cri_pod_attrs(match))
            if match.cri_pod.get("k8s.namespace.name"):
                out.update(self._namespace_attrs(str(match.cri_pod["k8s.namespace.name"])))
        if self.want_container:
            out.update(self._container_attrs(match, attrs))
        return out

    def _namespace_attrs(self, namespace: str):
        return self.namespaces.get(namespace, EMPTY) if self.ns_rules else EMPTY

    def _associate(self, attrs) -> _Match | None:
        tried = False
        for names in self.associations:
            values = [attrs.get(n) for n in names]
            if any(v in (None, "") for v in values):
                continue
            tried = True
            found = self._lookup(names, values)
            if found is not None and self._same_pod(found, attrs.get("k8s.pod.uid")):
                return found
        if tried:
            self.m_misses.inc()
            self._tl.missed = True
        return None

    @staticmethod
    def _same_pod(found: _Match, uid) -> bool:
        """A resource that names its pod uid gets no other pod's metadata from a later rule: a StatefulSet pod
        recreated under the same name (new uid) must not take the old one's labels by name, nor the reverse."""
        if uid in (None, "") or found.uid in (None, "", uid):
            return True
        rec = found.record
        return rec is not None and uid in (rec.uid, rec.mirror_uid)

    def _lookup(self, names: tuple[str, ...], values: list) -> _Match | None:
        if len(names) == 2:  # k8s.pod.name + k8s.namespace.name (validated as a pair)
            given = dict(zip(names, values, strict=True))
            ns, name = str(given["k8s.namespace.name"]), str(given["k8s.pod.name"])
            rec = self.cache.by_name(ns, name)
            if rec is not None:
                return _Match(rec, uid=rec.uid)
            for cri in self._cri():
                fn = getattr(cri, "pod_by_name", None)
                found = fn(ns, name) if fn else None
                if found:
                    return _Match(cri_pod=found, uid=found.get("k8s.pod.uid"))
            return None
        name, value = names[0], values[0]
        if name == "k8s.pod.uid":
            return self._by_uid(str(value))
        if name == "container.id":
            return self._by_container(normalise_container_id(str(value)))
        if name == "process.pid":
            self._tl.volatile = True
            try:
                info = self.attributor.lookup(int(value))
            except (TypeError, ValueError):
                return None
            if info is None or not info.ref.pod_uid:
                return None
            found = self._by_uid(info.ref.pod_uid)
            if found is not None and info.ref.container_id:
                found.container_id = info.ref.container_id
            return found
        if name == "k8s.pod.ip":
            rec = self.cache.by_ip(str(value))
            return _Match(rec, uid=rec.uid) if rec is not None else None
        return None

    def _by_uid(self, uid: str) -> _Match | None:
        rec = self.cache.get(uid)
        if rec is not None:
            return _Match(rec, uid=uid)
        for cri in self._cri():
            found = cri.pod(uid)
            if found:
                return _Match(cri_pod=found, uid=uid)
        return None

    def _by_container(self, cid: str) -> _Match | None:
        rec = self.cache.by_container(cid)
        if rec is not None:
            return _Match(rec, uid=rec.uid, container_id=cid, container_name=rec.container_ids.get(cid))
        for cri in self._cri():
            found = cri.container(cid)
            if found and found.get("k8s.pod.uid"):
                uid = found["k8s.pod.uid"]
                rec = self.cache.get(uid)
                return _Match(rec, cri_pod=None if rec else (cri.pod(uid) or found), uid=uid, container_id=cid,
                              container_name=found.get("k8s.container.name"))
        return None

    def _cri(self) -> list:
        # providers are published as receivers start (after processors): look up lazily, at most once a second
        now = time.monotonic()
        if now - self._cri_at > 1.0 and self.host is not None:
            self._cri_providers = self.host.lookup("container_metadata")
            self._cri_at = now
        if self._cri_providers:
            self._tl.volatile = True
        return self._cri_providers

    def _cri_pod_attrs(self, match: _Match) -> dict:
        """CRI metadata (no API server, or it forbids us): names from kubelet's sandbox labels."""
        found = match.cri_pod or {}
        out = {k: v for k, v in found.items() if k in self.pod_keys}
        labels: dict = {}
        for cri in self._cri():
            fn = getattr(cri, "pod_labels", None)
            if fn and match.uid:
                labels = fn(match.uid) or {}
                if labels:
                    break
        if "k8s.deployment.name" in self.pod_keys and labels.get("pod-template-hash") and found.get("k8s.pod.name"):
            # <deployment>-<hash>-<5 chars>: the pod's ReplicaSet is its name without the random suffix
            rs = re.sub(r"-[a-z0-9]{5}$", "", found["k8s.pod.name"])
            dep = deployment_from_hash(rs, labels)
            if dep:
                out["k8s.deployment.name"] = dep
                if "k8s.replicaset.name" in self.pod_keys:
                    out["k8s.replicaset.name"] = rs
        for rule in self.pod_rules:
            if rule.kind == "labels":
                rule.apply(labels, out)
        return out

    def _qos_of(self, cid: str) -> str | None:
        for cri in self._cri():
            fn = getattr(cri, "container_pid", None)
            pid = fn(cid) if fn else None
            if pid:
                info = self.attributor.lookup(pid)
                return info.ref.qos_class if info is not None else None
        return None

    def _container_attrs(self, match: _Match, attrs) -> dict:
        out: dict[str, Any] = {}
        cid = attrs.get("container.id") or match.container_id
        cid = normalise_container_id(str(cid)) if cid else None
        name = attrs.get("k8s.container.name") or match.container_name
        rec = match.record
        if not name and cid and rec is not None:
            name = rec.container_ids.get(cid)
        cri_attrs = None
        want_runtime = "container.runtime.name" in self.want_container and not attrs.get("container.runtime.name")
        if cid and (not name or rec is None or want_runtime and not rec.runtime):
            for cri in self._cri():
                cri_attrs = cri.container(cid)
                if cri_attrs:
                    name = name or cri_attrs.get("k8s.container.name")
                    break
        if name and "k8s.container.name" in self.want_container:
            out["k8s.container.name"] = name
        if cid and "container.id" in self.want_container:
            out["container.id"] = cid
        if cid and want_runtime:
            runtime = (rec.runtime if rec is not None else "") or (cri_attrs or {}).get("container.runtime.name")
            if runtime:
                out["container.runtime.name"] = runtime
        if cid and rec is None and "k8s.pod.qos_class" in self.want_container and not attrs.get("k8s.pod.qos_class"):
            # no pod object (CRI metadata only): the QoS class is in the path of the container's cgroup
            qos = self._qos_of(cid)
            if qos:
                out["k8s.pod.qos_class"] = qos
        image = rec.images.get(name) if rec is not None and name else None
        if image is None and cri_attrs:
            image = (cri_attrs.get("container.image.name"), cri_attrs.get("container.image.tag"))
        if image:
            if image[0] and "container.image.name" in self.want_container:
                out["container.image.name"] = image[0]
            if image[1] and "container.image.tag" in self.want_container:
                out["container.image.tag"] = image[1]
        return out


factory = Factory(
    kind="processor",
    type="k8sattributes",
    config_model=K8sAttributesConfig,
    create=K8sAttributesProcessor,
    stability=Stability.ALPHA,
    description="Adds pod, namespace, container, workload and node metadata from the API server (this node's pods) "
                "and CRI; associates by pod uid, container id, process id (cgroup), pod name or IP",
    resource_attributes=("k8s.pod.name", "k8s.pod.uid", "k8s.pod.start_time", "k8s.namespace.name", "k8s.node.name",
                         "k8s.container.name", "container.image.name", "container.image.tag", "k8s.deployment.name",
                         "k8s.replicaset.name", "k8s.statefulset.name", "k8s.daemonset.name", "k8s.job.name",
                         "k8s.cronjob.name", "k8s.pod.qos_class", "container.runtime.name"),
)
