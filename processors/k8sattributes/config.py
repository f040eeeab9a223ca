"""k8sattributes configuration, keyed like the OTel Collector's k8sattributes processor."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from podmeter.config import ComponentConfig, Duration
from podmeter.patterns import compile_pattern
from processors._collector import refuse_keys

# What extract.metadata may name (the collector's names).
METADATA_KEYS = (
    "k8s.pod.name", "k8s.pod.uid", "k8s.pod.start_time", "k8s.pod.ip", "k8s.namespace.name", "k8s.node.name",
    "k8s.container.name", "container.id", "container.image.name", "container.image.tag",
    "k8s.deployment.name", "k8s.replicaset.name", "k8s.statefulset.name", "k8s.daemonset.name",
    "k8s.job.name", "k8s.cronjob.name", "k8s.pod.qos_class", "container.runtime.name",
)
DEFAULT_METADATA = [
    "k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.pod.start_time", "k8s.node.name",
    "k8s.container.name", "container.image.name", "container.image.tag", "k8s.deployment.name",
    "k8s.replicaset.name", "k8s.statefulset.name", "k8s.daemonset.name", "k8s.job.name", "k8s.cronjob.name",
    # what the cgroup receiver tells of every pod and container where the cgroup path says it: added to the other
    # receivers' resources too, so that one container is one resource whichever receiver describes it
    "k8s.pod.qos_class", "container.runtime.name",
]
# What the collector's extract.metadata may name that podmeter does not extract
COLLECTOR_ONLY_METADATA = (
    "k8s.pod.hostname", "k8s.deployment.uid", "k8s.replicaset.uid", "k8s.daemonset.uid", "k8s.statefulset.uid",
    "k8s.job.uid", "k8s.cronjob.uid", "k8s.node.uid", "k8s.namespace.uid", "k8s.cluster.uid", "k8s.cluster.name",
    "container.image.repo_digests", "container.image.tags", "k8s.container.restart_count", "service.namespace",
    "service.name", "service.version", "service.instance.id",
)
# The collector's keys podmeter's k8sattributes has not, with what to write instead
_CONFIG_HINTS = {
    "exclude": "podmeter has no list of pods left unenriched (the collector's default names only jaeger-agent and "
               "jaeger-collector); remove it, and drop such pods' metrics with the filter processor "
               "(exclude: pod_selector or namespaces)",
    "watch_sync_period": "podmeter's informer does not resync: it renews its watch every watch_timeout and relists "
                         "after a 410 Gone; remove it",
}
_EXTRACT_HINTS = {
    "deployment_name_from_replicaset": "podmeter already names the Deployment from the ReplicaSet's owner (or, "
                                       "from CRI metadata, from the pod-template-hash label); remove it",
    "otel_annotations": "not supported; for the same attributes write annotations: [{key_regex: "
                        "resource\\.opentelemetry\\.io/(.*), tag_name: $$1}]",
}
_FILTER_HINTS = {
    "fields": "field selectors are not supported (podmeter watches its node's pods: filter.node); remove it, and "
              "drop pods' metrics with the filter processor (exclude: pod_selector or namespaces)",
}
# Resource attributes an association source may name.
ASSOCIATION_NAMES = ("k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "k8s.pod.ip", "container.id", "process.pid")


# Go's Regexp.Expand, which the collector's tag_name goes through: $$, ${name}, $name (the longest run of letters,
# digits and _), where a name may be a group's number
_TEMPLATE = re.compile(r"\$(?:(\$)|\{(\w+)\}|(\w+))")


def expand_tag(template: str, m: re.Match) -> str:
    """tag_name with the groups of key_regex's match put in, as Go's Regexp.Expand does ($1, ${1}, $name,
    ${name}, $$; $0 is the whole match; a group that did not take part gives "")."""
    def one(ref: re.Match) -> str:
        if ref.group(1):
            return "$"
        name = ref.group(2) or ref.group(3)
        group = int(name) if name.isascii() and name.isdigit() else name
        return m.group(group) or ""

    return _TEMPLATE.sub(one, template)


def _template_problem(template: str, pattern: re.Pattern) -> str | None:
    for ref in _TEMPLATE.finditer(template):
        name = ref.group(2) or ref.group(3)
        if name is None:
            continue
        if name.isascii() and name.isdigit() and int(name) <= pattern.groups or name in pattern.groupindex:
            continue
        hint = f" (for group {name[0]} followed by {name[1:]!r} write ${{{name[0]}}}{name[1:]})" \
            if name[0].isdigit() and not name.isdigit() else ""
        return (f"tag_name refers to group {name}, which key_regex does not have ({pattern.groups} groups"
                + (f", named {', '.join(pattern.groupindex)}" if pattern.groupindex else "") + f"){hint}")
    return None


class FieldExtract(ComponentConfig):
    tag_name: str = Field("", description="Resource attribute to write; default "
                                          "k8s.<pod|namespace>.<label|annotation>.<key> (semantic conventions)")
    key: str = Field("", description="Label or annotation key to extract")
    key_regex: str = Field("", description="Regular expression of keys to extract (full match); tag_name may use "
                                          "its groups as the collector: $1, ${1}, $name, ${name} (in a file "
                                          "written $$1, as ${...} is environment expansion there)")
    from_: Literal["pod", "namespace"] = Field("pod", alias="from", description="Take it from the pod or its namespace")

    model_config = ComponentConfig.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _one_of(self) -> FieldExtract:
        if bool(self.key) == bool(self.key_regex):
            raise ValueError("give exactly one of key or key_regex")
        if self.key_regex:
            problem = _template_problem(self.tag_name, compile_pattern(self.key_regex, "key_regex"))
            if problem:  # each matching label would get a name with a hole in it
                raise ValueError(problem)
        return self


class ExtractConfig(ComponentConfig):
    metadata: list[str] = Field(default_factory=lambda: list(DEFAULT_METADATA),
                                description="Resource attributes to add from the pod and its owners")
    labels: list[FieldExtract] = Field(default_factory=list, description="Pod or namespace labels to add: "
                                                            "{key or key_regex, tag_name, from: pod|namespace}")
    annotations: list[FieldExtract] = Field(default_factory=list, description="Pod or namespace annotations to add: "
                                                                 "{key or key_regex, tag_name, from: pod|namespace}")

    @model_validator(mode="before")
    @classmethod
    def _collector_keys(cls, value):
        return refuse_keys(value, _EXTRACT_HINTS, cls.__name__)

    @field_validator("metadata")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        problems = []
        collectors = [v for v in value if v in COLLECTOR_ONLY_METADATA]
        if collectors:
            problems.append(f"{', '.join(collectors)}: the collector's k8sattributes extracts "
                            f"{'these' if len(collectors) > 1 else 'this'}, podmeter's does not; remove "
                            f"{'them' if len(collectors) > 1 else 'it'}"
                            + ("; set k8s.cluster.name with the resource processor" if "k8s.cluster.name" in
                               collectors else ""))
        bad = [v for v in value if v not in METADATA_KEYS and v not in COLLECTOR_ONLY_METADATA]
        if bad:
            problems.append(f"unknown metadata {', '.join(bad)}")
        if problems:
            raise ValueError("; ".join(problems) + f"; valid: {', '.join(METADATA_KEYS)}")
        return value


class AssociationSource(ComponentConfig):
    from_: Literal["resource_attribute", "connection"] = Field("resource_attribute", alias="from",
                                                               description="Where the identifier comes from")
    name: str = Field("", description="The resource attribute holding it")

    model_config = ComponentConfig.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _check(self) -> AssociationSource:
        if self.from_ == "connection":
            # the collector's rule for data pushed from a pod (its client's IP): it never matches what is collected
            # on the node, in the collector as here; accepted so that a copied configuration (the Helm chart's
            # preset ends with it) behaves as it does there, and said once at start
            return self
        if self.name not in ASSOCIATION_NAMES:
            raise ValueError(f"unsupported association attribute {self.name!r}; valid: {', '.join(ASSOCIATION_NAMES)}")
        return self


class AssociationRule(ComponentConfig):
    sources: list[AssociationSource] = Field(min_length=1, description="Identifiers that together name one pod")

    @model_validator(mode="after")
    def _pairs(self) -> AssociationRule:
        names = {s.name for s in self.sources}
        if ("k8s.pod.name" in names) != ("k8s.namespace.name" in names):
            raise ValueError("k8s.pod.name and k8s.namespace.name identify a pod only together; list both")
        return self


DEFAULT_ASSOCIATION = [
    {"sources": [{"from": "resource_attribute", "name": "k8s.pod.uid"}]},
    {"sources": [{"from": "resource_attribute", "name": "container.id"}]},
    {"sources": [{"from": "resource_attribute", "name": "process.pid"}]},
    {"sources": [{"from": "resource_attribute", "name": "k8s.pod.name"},
                 {"from": "resource_attribute", "name": "k8s.namespace.name"}]},
    {"sources": [{"from": "resource_attribute", "name": "k8s.pod.ip"}]},
]


class LabelFilter(ComponentConfig):
    key: str = Field(min_length=1, description="Pod label key")
    value: str = Field("", description="Value to compare with (equals, not-equals)")
    op: Literal["equals", "not-equals", "exists", "does-not-exist"] = Field("equals", description="Comparison")

    def selector(self) -> str:
        return {"equals": f"{self.key}={self.value}", "not-equals": f"{self.key}!={self.value}",
                "exists": self.key, "does-not-exist": f"!{self.key}"}[self.op]


class FilterConfig(ComponentConfig):
    node: str = Field("", description="Watch only pods on this node (sent as the spec.nodeName field selector); "
                                      "typically ${env:K8S_NODE_NAME}. Empty watches every pod of the cluster")
    node_from_env_var: str = Field("", description="The collector's way to give node: the name of an environment "
                                                   "variable holding it (e.g. K8S_NODE_NAME); node wins when both are set")
    namespace: str = Field("", description="Watch only pods of this namespace")
    labels: list[LabelFilter] = Field(default_factory=list, description="Watch only pods with these labels "
                                                                        "(sent as a label selector): {key, value, op}")

    @model_validator(mode="before")
    @classmethod
    def _collector_keys(cls, value):
        return refuse_keys(value, _FILTER_HINTS, cls.__name__)


class ReconnectConfig(ComponentConfig):
    initial_interval: Duration = Field(1.0, gt=0, description="First wait before retrying a failed list, watch or owner lookup")
    max_interval: Duration = Field(30.0, gt=0, description="Longest wait between retries (doubling with jitter)")


class K8sAttributesConfig(ComponentConfig):
    auth_type: Literal["serviceAccount", "kubeConfig", "none"] = Field(
        "serviceAccount", description="serviceAccount (in a pod: token and CA of the pod's service account, the token "
                                      "re-read when it rotates), kubeConfig (KUBECONFIG or ~/.kube/config), or none "
                                      "(CRI and local sources only)")
    kube_config_path: str = Field("", description="With kubeConfig: the file (default: $KUBECONFIG, then ~/.kube/config)")
    context: str = Field("", description="With kubeConfig: the context to use (default: the current one)")
    filter: FilterConfig = Field(default_factory=FilterConfig, description="Which pods to watch")
    extract: ExtractConfig = Field(default_factory=ExtractConfig, description="What to add")
    pod_association: list[AssociationRule] = Field(
        default_factory=list,
        description="Rules ({sources: [{from: resource_attribute, name}]}) tried in order to find the pod of a "
                    "resource; the first whose sources are all present and match wins. Empty: k8s.pod.uid, "
                    "container.id, process.pid, k8s.pod.name + k8s.namespace.name, k8s.pod.ip")

    @model_validator(mode="before")
    @classmethod
    def _collector_keys(cls, value):
        # the sections' collector keys too, so that all of them are reported at once
        hints = {**_CONFIG_HINTS, **{("extract", k): h for k, h in _EXTRACT_HINTS.items()},
                 **{("filter", k): h for k, h in _FILTER_HINTS.items()}}
        if isinstance(value, dict) and "passthrough" in value:
            if value["passthrough"] is False:  # the collector's default: look the pods up, as podmeter does
                value = {k: v for k, v in value.items() if k != "passthrough"}
            else:
                hints["passthrough"] = ("passthrough: true (only tag the pod IP, for a gateway collector to enrich) "
                                        "is not supported: podmeter runs on the pods' node and enriches itself; "
                                        "remove it or set false")
        return refuse_keys(value, hints, cls.__name__)

    def association(self) -> list[AssociationRule]:
        return self.pod_association or [AssociationRule.model_validate(r) for r in DEFAULT_ASSOCIATION]
    wait_for_metadata: bool = Field(False, description="Block start until the first pod list arrived (or the timeout)")
    wait_for_metadata_timeout: Duration = Field(10.0, gt=0, description="Longest wait of wait_for_metadata")
    pod_delete_grace_period: Duration = Field(120.0, description="How long a deleted pod's metadata stays, so its last "
                                                                 "samples are still attributed")
    owner_lookup_ttl: Duration = Field(600.0, gt=0, description="How long a ReplicaSet's or Job's owner stays cached")
    request_timeout: Duration = Field(30.0, gt=0, description="Deadline of one list or get request")
    watch_timeout: Duration = Field(300.0, gt=0, description="Server-side length of one watch request before it is "
                                                             "renewed from the last resourceVersion")
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig, description="Backoff after API errors")
    proc_root: str = Field("/proc", description="procfs to resolve process.pid to its pod (the host's /proc)")
