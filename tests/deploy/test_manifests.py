"""k8s/ renders with the real kubectl (kustomize), every object validates against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors), the security posture holds in every variant, and the
agent configuration each variant ships passes `podmeter validate`.

ServiceMonitor, PodMonitor and PrometheusRule are Prometheus Operator CRDs, for which kubernetes-validate has no
schema: they are checked against PROMETHEUS_OPERATOR_SUBSET below, our own structural schema of the fields we use
(names, types and patterns as in the operator's monitoring.coreos.com/v1 API), with unknown fields rejected.
"""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess
import sys
import threading

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy.k8s import K8S, SCHEMA_VERSIONS, VARIANTS, config_files, kubectl, objects, one, pod_specs, render
from harness import require

ALLOWED_CAPS = {"BPF", "PERFMON"}
# No /sys/kernel/btf: the container's own sysfs shows the node's BTF, and a hostPath of it would keep the pod in
# ContainerCreating on a kernel without BTF instead of the ebpf receiver reporting itself unavailable.
HOST_MOUNTS = {  # host path -> where the agent sees it
    "/proc": "/host/proc",
    "/sys/fs/cgroup": "/host/sys/fs/cgroup",
    "/run/containerd": "/host/run/containerd",
    "/var/lib/kubelet/pod-resources": "/host/var/lib/kubelet/pod-resources",
}
# exactly the requests k8sattributes makes (processors/k8sattributes/kube.py): list/watch of this node's pods, GET of
# one ReplicaSet or Job by name
ALLOWED_VERBS = {("", "pods"): {"list", "watch"}, ("apps", "replicasets"): {"get"}, ("batch", "jobs"): {"get"},
                 ("resource.k8s.io", "resourceslices"): {"list"}}
ALLOWED_RESOURCES = set(ALLOWED_VERBS)

_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_LABEL = r"^[a-zA-Z_][a-zA-Z0-9_]*$"
_RELABEL = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": _LABEL}},
        "targetLabel": {"type": "string"}, "regex": {"type": "string"}, "replacement": {"type": "string"},
        "separator": {"type": "string"},
        "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "labelmap", "LabelMap",
                            "labeldrop", "LabelDrop", "labelkeep", "LabelKeep"]},
    },
}
_ENDPOINT = {
    "type": "object", "additionalProperties": False, "required": ["port"],
    "properties": {
        "port": {"type": "string", "minLength": 1}, "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": _DURATION}, "scrapeTimeout": {"type": "string", "pattern": _DURATION},
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array", "items": _RELABEL}, "metricRelabelings": {"type": "array", "items": _RELABEL},
    },
}
_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                   "matchExpressions": {"type": "array"}},
}
_META = {"type": "object", "required": ["name", "namespace"],
         "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}}}}
PROMETHEUS_OPERATOR_SUBSET = {
    "ServiceMonitor": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
            "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                     "properties": {"selector": _SELECTOR, "jobLabel": {"type": "string"},
                                    "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}},
        },
    },
    "PrometheusRule": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
            "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
                "groups": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["name", "rules"], "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": {"type": "string", "pattern": _DURATION},
                        "rules": {"type": "array", "minItems": 1, "items": {
                            "type": "object", "additionalProperties": False, "required": ["expr"],
                            "oneOf": [{"required": ["alert"]}, {"required": ["record"]}], "properties": {
                                "alert": {"type": "string", "pattern": _LABEL},
                                "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                                "expr": {"type": "string", "minLength": 1},
                                "for": {"type": "string", "pattern": _DURATION},
                                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                            }}},
                    }}},
            }},
        },
    },
    "PodMonitor": {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
            "metadata": _META,
            "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
                     "properties": {"selector": _SELECTOR, "jobLabel": {"type": "string"},
                                    "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT}}},
        },
    },
}


def agent(docs):
    ds = one(docs, "DaemonSet", "podmeter")
    return ds, ds["spec"]["template"]["spec"]


def agents(docs) -> list[tuple[dict, dict]]:
    """Every agent DaemonSet (overlays/all-nodes has two: podmeter and podmeter-gpu)."""
    return [(ds, ds["spec"]["template"]["spec"]) for ds in objects(docs, "DaemonSet")
            if ds["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "agent"]


def agent_monitors(docs) -> list[dict]:
    pod_labels = one(docs, "DaemonSet", "podmeter")["spec"]["template"]["metadata"]["labels"]
    return [m for m in objects(docs, "ServiceMonitor") + objects(docs, "PodMonitor")
            if _matches(m["spec"]["selector"], pod_labels)]


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _bytes(quantity: str) -> int:
    for suffix, factor in _UNITS.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# ------------------------------------------------------------------------------------------------------------
# rendering and schemas


@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_and_every_object_is_schema_valid(variant):
    docs = render(variant)
    assert docs, "nothing rendered"
    crds = 0
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # no schema for CRDs in kubernetes-validate: our structural subset of the operator's API
            jsonschema.validate(doc, PROMETHEUS_OPERATOR_SUBSET[doc["kind"]])
            crds += 1
            continue
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name} is invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")
    assert crds >= 1
    assert len(agent_monitors(docs)) == 1, "one ServiceMonitor or PodMonitor for the agents per variant"


def test_the_validator_rejects_a_misspelt_field():
    """The schema check has teeth: a typo in the security context fails it."""
    ds = copy.deepcopy(one(render("base"), "DaemonSet"))
    ctx = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    ctx["readOnlyRootFileSystem"] = ctx.pop("readOnlyRootFilesystem")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, SCHEMA_VERSIONS[-1], strict=True)
    sm = copy.deepcopy(one(render("base"), "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, PROMETHEUS_OPERATOR_SUBSET["ServiceMonitor"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_everything_is_namespaced_in_podmeter(variant):
    for doc in render(variant):
        if doc["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            continue
        assert doc["metadata"].get("namespace") == "podmeter", doc["metadata"]


# ------------------------------------------------------------------------------------------------------------
# security posture


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_container_is_privileged_and_all_are_locked_down(variant):
    docs = render(variant)
    agent_names = {f"DaemonSet/{ds['metadata']['name']}" for ds, _ in agents(docs)}
    for workload, spec in pod_specs(docs):
        assert not spec.get("hostNetwork"), workload
        assert spec.get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault", workload
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{workload} container {c['name']}"
            ctx = c.get("securityContext", {})
            assert ctx.get("privileged") is not True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            caps = ctx.get("capabilities", {})
            assert caps.get("drop") == ["ALL"], where
            added = set(caps.get("add", []))
            assert "SYS_ADMIN" not in added and "CAP_SYS_ADMIN" not in added, where
            assert added <= ALLOWED_CAPS, f"{where} adds {added - ALLOWED_CAPS}"
            if workload not in agent_names:
                assert not added, where
            res = c.get("resources", {})
            for kind in ("cpu", "memory"):
                assert kind in res.get("requests", {}) and kind in res.get("limits", {}), f"{where}: {kind}"
            assert c.get("livenessProbe") and c.get("readinessProbe"), where


@pytest.mark.parametrize("variant,caps", [("base", ALLOWED_CAPS), ("overlays/gpu-nodes", ALLOWED_CAPS),
                                          ("overlays/no-ebpf", set())])
def test_agent_capabilities(variant, caps):
    _, spec = agent(render(variant))
    assert set(spec["containers"][0]["securityContext"]["capabilities"].get("add", [])) == caps


@pytest.mark.parametrize("variant", VARIANTS)
def test_agent_host_access_is_read_only_and_minimal(variant):
    for ds, spec in agents(render(variant)):
        assert spec["hostPID"] is True  # NVML and eBPF report host PIDs
        container = spec["containers"][0]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        host = {}
        for vol in spec["volumes"]:
            if "hostPath" in vol:
                m = mounts.get(vol["name"])
                assert m is not None, f"hostPath volume {vol['name']} is not mounted"
                assert m.get("readOnly") is True, f"hostPath {vol['hostPath']['path']} is mounted writable"
                # readOnly alone leaves the mounts below a hostPath writable (cgroup v1 controllers, containers'
                # root filesystems under /run/containerd): see test_read_only_bind_mount_is_not_recursive
                assert m.get("recursiveReadOnly") == "IfPossible", \
                    f"hostPath {vol['hostPath']['path']}: the mounts below it stay writable"
                host[vol["hostPath"]["path"]] = m["mountPath"]
        assert host == HOST_MOUNTS, ds["metadata"]["name"]
        # the only writable mounts are pod-local emptyDirs
        kinds = {v["name"]: next(k for k in v if k != "name") for v in spec["volumes"]}
        for m in container["volumeMounts"]:
            if not m.get("readOnly"):
                assert kinds[m["name"]] == "emptyDir", m


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_agent_is_node_critical(variant):
    """Full GPU nodes: without a priority the agent stays Pending there, or is the first preempted."""
    found = agents(render(variant))
    assert found
    for ds, spec in found:
        assert spec.get("priorityClassName") == "system-node-critical", ds["metadata"]["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_agent_memory_covers_what_it_is_charged(variant):
    """daemonset.yaml's sum: ~91 MiB RSS + ~20 MiB gRPC + ~18 MB eBPF maps + ~33 MiB cgroup fds + the in-memory
    /tmp up to its sizeLimit; the request holds that with room, the limit bounds a leak."""
    for ds, spec in agents(render(variant)):
        res = spec["containers"][0]["resources"]
        request, limit = _bytes(res["requests"]["memory"]), _bytes(res["limits"]["memory"])
        in_memory = sum(_bytes(v["emptyDir"].get("sizeLimit", "0")) for v in spec["volumes"]
                        if v.get("emptyDir", {}).get("medium") == "Memory")
        assert request >= (91 + 20 + 18 + 33) * 2**20 + in_memory, ds["metadata"]["name"]
        assert request >= 256 * 2**20 and limit >= 2 * request, res


@pytest.mark.parametrize("variant", VARIANTS)
def test_agent_env_is_used(variant):
    """Every downward-API variable the agent gets is read by its configuration (${env:NAME})."""
    docs = render(variant)
    for ds, spec in agents(docs):
        text = "\n".join(config_files(docs, spec).values())
        for e in spec["containers"][0]["env"]:
            if "valueFrom" in e:
                assert f"${{env:{e['name']}}}" in text, f"{ds['metadata']['name']}: {e['name']} is read by nothing"


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_network_counters_only_with_ptrace(variant):
    """/proc/<pid>/ns/net is shown only to a process that may ptrace the target: without CAP_SYS_PTRACE the cgroup
    receiver cannot read pod network counters and would warn at every start, so the shipped configuration has them
    off."""
    docs = render(variant)
    for ds, spec in agents(docs):
        merged: dict = {}
        for text in config_files(docs, spec).values():
            merged = _merge(merged, yaml.safe_load(text))
        network = merged["receivers"]["cgroup"].get("groups", {}).get("network", True)
        caps = set(spec["containers"][0]["securityContext"]["capabilities"].get("add", []))
        assert not network or "SYS_PTRACE" in caps, ds["metadata"]["name"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_agent_node_name_probes_and_tolerations(variant):
    docs = render(variant)
    _, spec = agent(docs)
    c = spec["containers"][0]
    env = {e["name"]: e for e in c["env"]}
    assert env["K8S_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == 9464 and ports["health"] == 13133
    for probe in ("livenessProbe", "readinessProbe"):
        port = c[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 13133, probe
    # liveness on the path that fails only when a restart recovers; readiness on the one every failure fails
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez" and c["readinessProbe"]["httpGet"]["path"] == "/"
    # the health_check extension serves the port the probes use
    for text in config_files(docs, spec).values():
        cfg = yaml.safe_load(text)
        if "health_check" in (cfg.get("extensions") or {}):
            assert cfg["extensions"]["health_check"]["endpoint"].endswith(":13133")
            assert "health_check" in cfg["service"]["extensions"]
    tolerations = spec.get("tolerations", [])
    assert any(t.get("key") == "nvidia.com/gpu" and t.get("operator") == "Exists" and "effect" not in t
               for t in tolerations), tolerations


@pytest.mark.parametrize("variant", VARIANTS)
def test_rbac_only_reads_pods_replicasets_jobs_resourceslices(variant):
    docs = render(variant)
    assert not objects(docs, "Role") and not objects(docs, "RoleBinding")
    role = one(docs, "ClusterRole", "podmeter")
    granted = set()
    verbs: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["resources"] and "*" not in rule["apiGroups"] and "*" not in rule["verbs"], rule
        assert not rule.get("nonResourceURLs") and not rule.get("resourceNames"), rule
        for key in ((g, r) for g in rule["apiGroups"] for r in rule["resources"]):
            assert set(rule["verbs"]) <= ALLOWED_VERBS.get(key, set()), f"{key}: {rule['verbs']}"
            verbs.setdefault(key, set()).update(rule["verbs"])
            granted.add(key)
    assert granted == ALLOWED_RESOURCES
    assert verbs == ALLOWED_VERBS
    binding = one(docs, "ClusterRoleBinding", "podmeter")
    assert binding["roleRef"]["name"] == "podmeter"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "podmeter", "namespace": "podmeter"}]
    for _, spec in agents(docs):
        assert spec["serviceAccountName"] == "podmeter"
    _, spec = agent(docs)
    # namespaces would be needed only for labels taken from namespaces: the shipped configuration asks for none
    for text in config_files(docs, spec).values():
        assert "from: namespace" not in text


@pytest.mark.parametrize("variant", VARIANTS)
def test_scrape_objects_point_at_the_agent(variant):
    docs = render(variant)
    _, spec = agent(docs)
    pod_labels = one(docs, "DaemonSet", "podmeter")["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in spec["containers"][0]["ports"]}
    monitors = agent_monitors(docs)
    assert len(monitors) == 1
    mon = monitors[0]
    if mon["kind"] == "ServiceMonitor":
        svc = one(docs, "Service", "podmeter")
        assert svc["spec"]["clusterIP"] == "None"  # headless: every agent is its own target
        assert _matches(svc["spec"]["selector"], pod_labels)
        assert _matches(mon["spec"]["selector"], svc["metadata"]["labels"])
        svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
        for ep in mon["spec"]["endpoints"]:
            assert ep["port"] in svc_ports, ep
            assert svc_ports[ep["port"]]["targetPort"] in port_names
        endpoints = mon["spec"]["endpoints"]
    else:
        assert not [s for s in objects(docs, "Service") if s["metadata"]["name"] == "podmeter"]
        assert _matches(mon["spec"]["selector"], pod_labels)
        endpoints = mon["spec"]["podMetricsEndpoints"]
        assert {ep["port"] for ep in endpoints} <= port_names
    assert "metrics" in {ep["port"] for ep in endpoints}
    for ep in endpoints:  # the dashboard's node variable
        assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node",
                "action": "replace"} in ep["relabelings"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policy_admits_only_the_monitoring_namespace(variant):
    docs = render(variant)
    _, spec = agent(docs)
    pod_labels = one(docs, "DaemonSet", "podmeter")["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["containerPort"] for p in spec["containers"][0]["ports"]}
    policies = [p for p in objects(docs, "NetworkPolicy") if _matches(p["spec"]["podSelector"], pod_labels)]
    assert len(policies) == 1
    pol = policies[0]["spec"]
    assert "Ingress" in pol["policyTypes"]
    allowed = set()
    for rule in pol["ingress"]:
        assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        allowed |= {p["port"] for p in rule["ports"]}
    assert allowed == container_ports == {9464, 8888, 13133}


def test_gateway_overlay_wires_agents_to_the_collector():
    docs = render("overlays/gateway")
    _, spec = agent(docs)
    files = config_files(docs, spec)
    merged: dict = {}
    for text in files.values():
        merged = _merge(merged, yaml.safe_load(text))
    assert merged["service"]["pipelines"]["metrics"]["exporters"] == ["prometheus", "otlp"]
    host, port = merged["exporters"]["otlp"]["endpoint"].rsplit(":", 1)
    svc = one(docs, "Service", "podmeter-gateway")
    assert host.split(".")[:2] == [svc["metadata"]["name"], svc["metadata"]["namespace"]]
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    gw = one(docs, "Deployment", "podmeter-gateway")
    assert _matches(svc["spec"]["selector"], gw["spec"]["template"]["metadata"]["labels"])
    pdb = one(docs, "PodDisruptionBudget", "podmeter-gateway")["spec"]
    assert _matches(pdb["selector"], gw["spec"]["template"]["metadata"]["labels"])
    assert pdb["minAvailable"] < gw["spec"]["replicas"]  # a drain can still move one
    gw_spec = gw["spec"]["template"]["spec"]
    assert gw_spec["securityContext"]["runAsNonRoot"] is True
    # the collector's own config (no otelcol binary here to validate it: checked for consistency only)
    cm = {c["metadata"]["name"]: c for c in objects(docs, "ConfigMap")}
    col_cm = cm[gw_spec["volumes"][0]["configMap"]["name"]]
    col = yaml.safe_load(col_cm["data"]["collector.yaml"])
    assert "--config=/etc/otelcol/collector.yaml" in gw_spec["containers"][0]["args"]
    for pid, pipe in col["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for ref in pipe.get(kind, []):
                assert ref in col[kind], f"{pid} references {kind} {ref} which is not configured"
    assert col["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(f":{port}")
    assert col["extensions"]["health_check"]["endpoint"].endswith(":13133")
    own = col["service"]["telemetry"]["metrics"]["readers"][0]["pull"]["exporter"]["prometheus"]
    gw_ports = {p["name"]: p["containerPort"] for p in gw_spec["containers"][0]["ports"]}
    assert own["host"] == "0.0.0.0" and own["port"] == gw_ports["telemetry"]
    # only the agents may push to the gateway
    pol = one(docs, "NetworkPolicy", "podmeter-gateway")["spec"]
    agent_labels = one(docs, "DaemonSet", "podmeter")["spec"]["template"]["metadata"]["labels"]
    pushers = [r for r in pol["ingress"] if int(port) in {p["port"] for p in r["ports"]}]
    assert len(pushers) == 1 and len(pushers[0]["from"]) == 1
    assert _matches(pushers[0]["from"][0]["podSelector"], agent_labels)


def test_gateway_telemetry_is_scraped():
    """The collector's own metrics (:8888, which its NetworkPolicy opens to the monitoring namespace) have a Service
    port and a ServiceMonitor of their own; the agents' monitor does not pick up the gateway."""
    docs = render("overlays/gateway")
    gw = one(docs, "Deployment", "podmeter-gateway")
    gw_ports = {p["name"]: p["containerPort"] for p in gw["spec"]["template"]["spec"]["containers"][0]["ports"]}
    svc = one(docs, "Service", "podmeter-gateway")
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert gw_ports[svc_ports["telemetry"]["targetPort"]] == svc_ports["telemetry"]["port"] == 8888
    mon = one(docs, "ServiceMonitor", "podmeter-gateway")
    assert _matches(mon["spec"]["selector"], svc["metadata"]["labels"])
    assert not _matches(mon["spec"]["selector"], one(docs, "Service", "podmeter")["metadata"]["labels"])
    assert [ep["port"] for ep in mon["spec"]["endpoints"]] == ["telemetry"]
    assert agent_monitors(docs) == [one(docs, "ServiceMonitor", "podmeter")]
    assert not _matches(one(docs, "ServiceMonitor", "podmeter")["spec"]["selector"], svc["metadata"]["labels"])
    pol = one(docs, "NetworkPolicy", "podmeter-gateway")["spec"]
    monitoring = [r for r in pol["ingress"] if "namespaceSelector" in r["from"][0]]
    assert 8888 in {p["port"] for r in monitoring for p in r["ports"]}


def test_all_nodes_runs_one_agent_per_node_kind():
    """gpu-nodes alone leaves CPU nodes without an agent; all-nodes runs the base there and gpu-nodes' DaemonSet
    (podmeter-gpu) on GPU nodes, with disjoint node sets and pod selectors, sharing RBAC, Service and monitor."""
    docs = render("overlays/all-nodes")
    found = {ds["metadata"]["name"]: (ds, spec) for ds, spec in agents(docs)}
    assert set(found) == {"podmeter", "podmeter-gpu"}
    (cpu, cpu_spec), (gpu, gpu_spec) = found["podmeter"], found["podmeter-gpu"]
    assert gpu_spec["runtimeClassName"] == "nvidia" and "runtimeClassName" not in cpu_spec
    [(key, value)] = gpu_spec["nodeSelector"].items()
    terms = cpu_spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": key, "operator": "NotIn", "values": [value]}]}]
    # neither DaemonSet's selector matches the other's pods
    assert not _matches(cpu["spec"]["selector"], gpu["spec"]["template"]["metadata"]["labels"])
    assert not _matches(gpu["spec"]["selector"], cpu["spec"]["template"]["metadata"]["labels"])
    assert cpu_spec["serviceAccountName"] == gpu_spec["serviceAccountName"] == "podmeter"
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "NetworkPolicy", "Namespace"):
        assert len(objects(docs, kind)) == 1, kind
    # the one Service (and so the one ServiceMonitor) and NetworkPolicy cover both
    svc = one(docs, "Service", "podmeter")
    pol = one(docs, "NetworkPolicy", "podmeter")
    for ds in (cpu, gpu):
        labels = ds["spec"]["template"]["metadata"]["labels"]
        assert _matches(svc["spec"]["selector"], labels) and _matches(pol["spec"]["podSelector"], labels)


def test_gpu_overlay_uses_the_nvidia_runtime():
    _, spec = agent(render("overlays/gpu-nodes"))
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"
    # it observes: it must not hold (and so take from workloads) any GPU
    assert "nvidia.com/gpu" not in str(spec["containers"][0]["resources"])


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ------------------------------------------------------------------------------------------------------------
# the shipped agent configuration


@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_agent_configuration_validates(variant, tmp_path):
    """`podmeter validate` on exactly the files the DaemonSet passes with --config, as the pod would see them."""
    docs = render(variant)
    for n, (_, spec) in enumerate(agents(docs)):
        files = config_files(docs, spec)
        args = []
        for i, (path, text) in enumerate(files.items()):
            local = tmp_path / f"{n}-{i}-{os.path.basename(path)}"
            local.write_text(text)
            args += ["--config", str(local)]
        env = dict(os.environ, K8S_NODE_NAME="node-1")
        proc = subprocess.run([sys.executable, "-m", "podmeter.cli", "validate", *args], capture_output=True,
                              text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("variant", ["base", "overlays/no-ebpf"])
def test_configured_paths_lie_in_the_mounts(variant):
    """Every host path the configuration reads is under a read-only host mount; the queue under an emptyDir."""
    docs = render(variant)
    _, spec = agent(docs)
    merged: dict = {}
    for text in config_files(docs, spec).values():
        merged = _merge(merged, yaml.safe_load(text))
    mounts = {m["mountPath"]: m for m in spec["containers"][0]["volumeMounts"]}
    host_mounts = [p for p in mounts if p in HOST_MOUNTS.values()]

    def under(path: str, candidates) -> bool:
        return any(path == m or path.startswith(m.rstrip("/") + "/") for m in candidates)

    r = merged["receivers"]
    paths = [r["cgroup"]["cgroup_root"], r["cgroup"]["proc_root"], r["nvml"]["proc_root"],
             merged["processors"]["k8sattributes"]["proc_root"],
             r["cri"]["endpoint"].removeprefix("unix://"), r["podresources"]["endpoint"].removeprefix("unix://")]
    if "ebpf" in r:
        paths.append(r["ebpf"]["cgroup_root"])
    for p in paths:
        assert under(p, host_mounts), f"{p} is not under a host mount {host_mounts}"
    queue = merged["exporters"]["otlp"]["sending_queue"]
    storage = queue["storage"]
    writable = [p for p, m in mounts.items() if not m.get("readOnly")]
    assert under(storage, writable), storage
    # the persistent queue fits its emptyDir: a pod over an emptyDir's sizeLimit is evicted
    volume = next(v for v in spec["volumes"] if v["name"] == next(
        m["name"] for p, m in mounts.items() if under(storage, [p]) and not m.get("readOnly")))
    assert _bytes(str(queue["max_bytes"]).replace("MiB", "Mi")) < _bytes(volume["emptyDir"]["sizeLimit"])


# ------------------------------------------------------------------------------------------------------------
# the design choice the read-only socket mounts rely on


def test_unix_socket_on_a_read_only_bind_mount_accepts_connections(tmp_path):
    """The CRI and kubelet sockets are reached through read-only hostPath mounts of their directories: connect()
    to a socket on a read-only mount works (EROFS applies to writes of files, not to sockets). Real kernel."""
    require(os.geteuid() == 0, "needs root to make a read-only bind mount")
    require(subprocess.run(["unshare", "--help"], capture_output=True).returncode == 0, "needs unshare (util-linux)")
    src, dst = tmp_path / "run", tmp_path / "host-run"
    src.mkdir()
    dst.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(src / "x.sock"))
    server.listen(1)

    def serve():
        conn, _ = server.accept()
        conn.sendall(b"ok")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    script = (f"mount --bind {src} {dst} && mount -o remount,bind,ro {dst} && "
              f"(touch {dst}/f 2>/dev/null && echo writable || echo read-only) && "
              f"{sys.executable} -c \"import socket; s=socket.socket(socket.AF_UNIX); s.connect('{dst}/x.sock'); "
              f"print(s.recv(2).decode())\"")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                          text=True, timeout=30)
    server.close()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["read-only", "ok"]


def test_read_only_bind_mount_is_not_recursive(tmp_path):
    """Why every hostPath mount has `recursiveReadOnly`: the runtime bind-mounts a hostPath with everything mounted
    below it (rbind), and `readOnly: true` alone remounts only the top read-only, as done here. A mount below it (a
    cgroup v1 controller under /sys/fs/cgroup, a container's root filesystem under /run/containerd) stays
    writable to the agent, UID 0 with no capability at all: it owns those files. Made read-only recursively, as a
    runtime does for recursiveReadOnly, it is not. Real kernel; a tmpfs stands in for the mount below."""
    require(os.geteuid() == 0, "needs root to make bind mounts")
    for tool in ("unshare", "setpriv", "findmnt", "mount"):
        require(shutil.which(tool) is not None, f"needs {tool} (util-linux)")
    src, dst = tmp_path / "host-run", tmp_path / "mnt"
    (src / "task" / "rootfs").mkdir(parents=True)
    dst.mkdir()
    results = {}
    for mode, remount in (("readOnly", f"mount -o remount,bind,ro {dst}"),
                          ("recursiveReadOnly", f'for m in $(findmnt -rn -o TARGET -R {dst}); do '
                                                f'mount -o remount,bind,ro "$m"; done')):
        script = (f"set -e; mount -t tmpfs -o mode=0755 t {src}/task/rootfs; echo v1 > {src}/task/rootfs/f; "
                  f"mount --rbind {src} {dst}; {remount}; "
                  f"exec setpriv --bounding-set -all --inh-caps -all --nnp -- sh -c "
                  f"'(echo changed > {dst}/task/rootfs/f) 2>/dev/null && echo writable || echo read-only'")
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        results[mode] = proc.stdout.strip()
    assert results == {"readOnly": "writable", "recursiveReadOnly": "read-only"}


def test_overlays_compose_into_one(tmp_path):
    """docs/deploy.md tells users to combine overlays by copying their patches and generator entries into one
    overlay: gpu-nodes + gateway + no-ebpf together render, keep the posture and validate."""

    combined: dict = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                      "namespace": "podmeter", "resources": [os.path.relpath(os.path.join(K8S, "base"), tmp_path)],
                      "configMapGenerator": [], "patches": [], "images": []}
    for overlay in ("gpu-nodes", "gateway", "no-ebpf"):
        src = os.path.join(K8S, "overlays", overlay)
        for name in os.listdir(src):
            if name != "kustomization.yaml":
                shutil.copy(os.path.join(src, name), tmp_path / name)
        with open(os.path.join(src, "kustomization.yaml")) as f:
            k = yaml.safe_load(f)
        combined["resources"] += [r for r in k.get("resources", []) if not r.startswith("..")]
        combined["patches"] += k.get("patches", [])
        combined["images"] += k.get("images", [])
        if k.get("labels"):
            combined["labels"] = k["labels"]
        for gen in k.get("configMapGenerator", []):
            same = [g for g in combined["configMapGenerator"] if g["name"] == gen["name"]]
            if same:
                same[0]["files"] += gen["files"]
            else:
                combined["configMapGenerator"].append(dict(gen, files=list(gen["files"])))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(combined))
    proc = subprocess.run([kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for doc in docs:
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(doc, SCHEMA_VERSIONS[-1], strict=True)
    _, spec = agent(docs)
    assert spec["runtimeClassName"] == "nvidia"
    assert "add" not in spec["containers"][0]["securityContext"]["capabilities"]
    assert one(docs, "Deployment", "podmeter-gateway")
    files = config_files(docs, spec)
    assert [os.path.basename(p) for p in files] == ["pipelines.yaml", "gateway.yaml", "no-ebpf.yaml"]
    merged: dict = {}
    for text in files.values():
        merged = _merge(merged, yaml.safe_load(text))
    pipe = merged["service"]["pipelines"]["metrics"]
    assert pipe["exporters"] == ["prometheus", "otlp"] and "ebpf" not in pipe["receivers"]
    args = []
    for i, text in enumerate(files.values()):
        (tmp_path / f"cfg-{i}.yaml").write_text(text)
        args += ["--config", str(tmp_path / f"cfg-{i}.yaml")]
    out = subprocess.run([sys.executable, "-m", "podmeter.cli", "validate", *args], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, K8S_NODE_NAME="node-1"))
    assert out.returncode == 0, out.stderr
