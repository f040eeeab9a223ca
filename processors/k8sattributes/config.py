"""k8sattributes configuration, keyed like the OTel Collector's k8sattributes processor."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from podmeter.config import ComponentConfig, Duration
from podmeter.patterns import compile_pattern

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
# Resource attributes an association source may name.
ASSOCIATION_NAMES = ("k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "k8s.pod.ip", "container.id", "process.pid")


class FieldExtract(ComponentConfig):
    tag_name: str = Field("", description="Resource attribute to write; default "
                                          "k8s.<pod|namespace>.<label|annotation>.<key> (semantic conventions)")
    key: str = Field("", description="Label or annotation key to extract")
    key_regex: str = Field("", description="Regular expression of keys to extract (full match); "
                                          "tag_name may use $1 for the first capture group")
    from_: Literal["pod", "namespace"] = Field("pod", alias="from", description="Take it from the pod or its namespace")

    model_config = ComponentConfig.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _one_of(self) -> FieldExtract:
        if bool(self.key) == bool(self.key_regex):
            raise ValueError("give exactly one of key or key_regex")
        if self.key_regex:
            compile_pattern(self.key_regex, "key_regex")
        return self


class ExtractConfig(ComponentConfig):
    metadata: list[str] = Field(default_factory=lambda: list(DEFAULT_METADATA),
                                description="Resource attributes to add from the pod and its owners")
    labels: list[FieldExtract] = Field(default_factory=list, description="Pod or namespace labels to add: "
                                                            "{key or key_regex, tag_name, from: pod|namespace}")
    annotations: list[FieldExtract] = Field(default_factory=list, description="Pod or namespace annotations to add: "
                                                                 "{key or key_regex, tag_name, from: pod|namespace}")

    @field_validator("metadata")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if v not in METADATA_KEYS]
        if bad:
            raise ValueError(f"unknown metadata {', '.join(bad)}; valid: {', '.join(METADATA_KEYS)}")
        return value


class AssociationSource(ComponentConfig):
    from_: Literal["resource_attribute", "connection"] = Field("resource_attribute", alias="from",
                                                               description="Where the identifier comes from")
    name: str = Field("", description="The resource attribute holding it")

    model_config = ComponentConfig.model_config | {"populate_by_name": True}

    @model_validator(mode="after")
    def _check(self) -> AssociationSource:
        if self.from_ == "connection":
            raise ValueError("podmeter receives no network connections (it scrapes locally); "
                             "use from: resource_attribute, e.g. name: k8s.pod.ip")
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


class ReconnectConfig(ComponentConfig):
    initial_interval: Duration = Field(1.0, gt=0, description="First wait before retrying a failed list or watch")
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
