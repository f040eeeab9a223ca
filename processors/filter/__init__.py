"""filter: keeps or drops metrics by metric name, namespace, pod label selector and resource attributes, with the
collector's filter processor's include/exclude layout (`metrics: {include: ..., exclude: ...}`).

Namespace and pod labels come from the resource (`k8s.namespace.name`) or, by `k8s.pod.uid`, from the
k8sattributes informer ("pod_metadata") or the CRI cache ("container_metadata"): put k8sattributes first.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
from opentelemetry.sdk.resources import Resource
from pydantic import Field, field_validator, model_validator

from podmeter.component import Factory, Host, Processor, Stability
from podmeter.config import ComponentConfig
from podmeter.patterns import compile_pattern
from processors._collector import refuse_keys

_TERM_SET = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_TERM_EQ = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|!=|=)\s*([A-Za-z0-9_.-]*)\s*$")
_TERM_EXISTS = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*$")


def parse_selector(text: str) -> Callable[[dict], bool]:
    """A Kubernetes label selector (`app=a,tier!=b,env in (x,y),gpu,!spot`) -> predicate on a labels dict."""
    preds: list[Callable[[dict], bool]] = []
    for term in re.split(r",(?![^(]*\))", text):
        if not term.strip():
            raise ValueError(f"label selector {text!r} has an empty term")
        if m := _TERM_SET.match(term):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            preds.append(lambda labels, k=key, vs=values, inside=(op == "in"): (labels.get(k) in vs) == inside
                         if inside else labels.get(k) not in vs)
        elif m := _TERM_EQ.match(term):
            key, op, value = m.groups()
            preds.append(lambda labels, k=key, v=value, eq=(op != "!="): (labels.get(k) == v) == eq)
        elif m := _TERM_EXISTS.match(term):
            neg, key = m.group(1) == "!", m.group(2)
            preds.append(lambda labels, k=key, neg=neg: (k in labels) != neg)
        else:
            raise ValueError(f"label selector term {term.strip()!r} is not key=value, key!=value, key in (a,b), "
                             "key notin (a,b), key or !key")
    return lambda labels: all(p(labels) for p in preds)


def attribute_text(value) -> str:
    """An attribute value as text to match: a boolean as YAML and the collector write it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


class ResourceAttribute(ComponentConfig):
    key: str = Field(min_length=1, description="Resource attribute key")
    value: str = Field(description="Value (a regular expression with match_type regexp)")

    @model_validator(mode="before")
    @classmethod
    def _collector_form(cls, value):
        if not isinstance(value, dict):
            return value
        # the collector's README writes `Key:` and `Value:` (its config keys are matched regardless of case)
        value = {k.lower() if k in ("Key", "Value") and k.lower() not in value else k: v for k, v in value.items()}
        # `value: 0` or `value: true` in YAML: matched against the attribute's text
        if isinstance(value.get("value"), bool | int | float):
            value["value"] = attribute_text(value["value"])
        return value


class MatchProperties(ComponentConfig):
    match_type: Literal["strict", "regexp"] = Field("strict", description="How metric_names, namespaces and "
                                                                          "resource attribute values match")
    metric_names: list[str] = Field(default_factory=list, description="Metric names (any of them)")
    namespaces: list[str] = Field(default_factory=list, description="Pod namespaces (any of them)")
    pod_selector: str = Field("", description="Kubernetes label selector on the pod's labels, e.g. "
                                              "\"app=trainer,tier in (gpu,cpu)\"")
    resource_attributes: list[ResourceAttribute] = Field(default_factory=list,
                                                         description="Resource attributes (all of them)")

    @model_validator(mode="before")
    @classmethod
    def _collector_keys(cls, value):
        hints = dict(_MATCH_HINTS)
        if isinstance(value, dict) and value.get("match_type") == "expr":
            hints["match_type"] = _MATCH_HINTS["expressions"]
        return refuse_keys(value, hints, cls.__name__)

    @model_validator(mode="after")
    def _compile(self) -> MatchProperties:
        if self.match_type == "regexp":
            for pattern in [*self.metric_names, *self.namespaces, *(a.value for a in self.resource_attributes)]:
                compile_pattern(pattern, "pattern")
        return self

    @field_validator("pod_selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        if value.strip():
            parse_selector(value)
        return value

    def empty(self) -> bool:
        return not (self.metric_names or self.namespaces or self.pod_selector.strip() or self.resource_attributes)


_INSTEAD = ("write it as metrics: include/exclude with metric_names (match_type strict or regexp), "
            "resource_attributes, namespaces or pod_selector")
# The collector's filter keys podmeter's has not, with what to write instead
_MATCH_HINTS = {
    "expressions": "match_type expr (expr-lang expressions) is not supported; " + _INSTEAD
                   + "; to drop data points by an attribute value use metricstransform's delete_label_value",
    "regexp": "the collector's regexp cache settings have no meaning here (podmeter compiles each pattern once); "
              "remove them",
}
_OTTL = "OTTL conditions are not supported by podmeter's filter; " + _INSTEAD
_METRICS_HINTS = {
    "metric": _OTTL,
    "datapoint": _OTTL + "; to drop data points by an attribute value use metricstransform's delete_label_value",
    "resource": _OTTL,
}
_FILTER_HINTS = {
    "error_mode": "applies to OTTL conditions, which podmeter's filter has not; remove it and " + _INSTEAD,
    "metric_conditions": _OTTL,
    **{signal: "podmeter carries metrics only: remove this section" for signal in ("logs", "spans", "traces",
                                                                                   "profiles")},
}


class MetricsFilter(ComponentConfig):
    include: MatchProperties | None = Field(None, description="Keep only metrics matching all of these criteria")
    exclude: MatchProperties | None = Field(None, description="Drop metrics matching all of these criteria")

    @model_validator(mode="before")
    @classmethod
    def _collector_keys(cls, value):
        return refuse_keys(value, _METRICS_HINTS, cls.__name__)

    @model_validator(mode="after")
    def _exclude_both(self) -> MetricsFilter:
        # The collector drops a metric when its resource matches exclude's resource_attributes OR its name matches
        # metric_names (two separate checks); podmeter's block needs all its criteria to match. Either reading,
        # taken silently, drops what the other would keep.
        if self.exclude is not None and self.exclude.metric_names and self.exclude.resource_attributes:
            raise ValueError(
                "exclude with both metric_names and resource_attributes is ambiguous: the collector drops every "
                "metric of the matching resources and the named metrics of every resource, podmeter would drop "
                "only the named metrics of the matching resources. For the collector's meaning use two filter "
                "processors (one exclude with resource_attributes, one with metric_names); for the other, "
                "select the resources with namespaces or pod_selector instead of resource_attributes")
        return self


class FilterConfig(ComponentConfig):
    metrics: MetricsFilter = Field(default_factory=MetricsFilter, description="Metric include/exclude rules")

    @model_validator(mode="before")
    @classmethod
    def _collector_keys(cls, value):
        # the metrics section's too: all of them at once, not one after another
        return refuse_keys(value, {**_FILTER_HINTS, **{("metrics", k): h for k, h in _METRICS_HINTS.items()}},
                           cls.__name__)


class _Matcher:
    def __init__(self, props: MatchProperties) -> None:
        regexp = props.match_type == "regexp"

        def one_of(values: list[str]) -> Callable[[str], bool] | None:
            if not values:
                return None
            if regexp:
                compiled = [re.compile(v) for v in values]
                return lambda s: any(c.search(s) for c in compiled)  # unanchored, as the collector's regexp
            allowed = frozenset(values)
            return lambda s: s in allowed

        self.names = one_of(props.metric_names)
        self.namespaces = one_of(props.namespaces)
        self.selector = parse_selector(props.pod_selector) if props.pod_selector.strip() else None
        self.attrs = [(a.key, one_of([a.value])) for a in props.resource_attributes]
        self.needs_pod = self.namespaces is not None or self.selector is not None

    def resource_matches(self, attrs, pod: _PodView) -> bool:
        for key, test in self.attrs:
            value = attrs.get(key)
            if value is None or not test(attribute_text(value)):
                return False
        if self.namespaces is not None:
            ns = pod.namespace()
            if ns is None or not self.namespaces(ns):
                return False
        if self.selector is not None:
            labels = pod.labels()
            if labels is None or not self.selector(labels):
                return False
        return True

    def name_matches(self, name: str) -> bool:
        return self.names is None or self.names(name)


class _PodView:
    """Namespace and labels of one resource's pod, looked up lazily (only when a rule needs them)."""

    def __init__(self, attrs, host: Host | None) -> None:
        self.attrs, self.host = attrs, host

    def _providers(self, key: str) -> list:
        return self.host.lookup(key) if self.host is not None else []

    def namespace(self) -> str | None:
        ns = self.attrs.get("k8s.namespace.name")
        if ns:
            return str(ns)
        uid = self.attrs.get("k8s.pod.uid")
        if not uid:
            return None
        for key in ("pod_metadata", "container_metadata"):
            for p in self._providers(key):
                found = p.pod(str(uid))
                if found and found.get("k8s.namespace.name"):
                    return str(found["k8s.namespace.name"])
        return None

    def labels(self) -> dict | None:
        uid = self.attrs.get("k8s.pod.uid")
        if not uid:
            return None
        for key in ("pod_metadata", "container_metadata"):
            for p in self._providers(key):
                fn = getattr(p, "pod_labels", None)
                found = fn(str(uid)) if fn else None
                if found is not None and (found or key == "pod_metadata"):
                    return dict(found)
        return None


class FilterProcessor(Processor):
    def __init__(self, settings, config: FilterConfig) -> None:
        inc, exc = config.metrics.include, config.metrics.exclude
        self.include = _Matcher(inc) if inc is not None and not inc.empty() else None
        self.exclude = _Matcher(exc) if exc is not None and not exc.empty() else None
        self.host: Host | None = None

    def start(self, host: Host) -> None:
        self.host = host

    def process(self, data: MetricsData) -> MetricsData | None:
        if self.include is None and self.exclude is None:
            return data
        out = []
        emptied: dict[str, ScopeMetrics] = {}  # scope name -> a scope of the batch none of whose metrics were kept
        kept_scopes: set[str] = set()
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                emptied.setdefault(_scope_name(sm), sm)
            attrs = rm.resource.attributes
            pod = _PodView(attrs, self.host)
            inc_res = self.include.resource_matches(attrs, pod) if self.include else True
            exc_res = self.exclude.resource_matches(attrs, pod) if self.exclude else False
            if not inc_res:
                continue  # nothing of this resource can be included
            scopes = []
            for sm in rm.scope_metrics:
                kept = [m for m in sm.metrics
                        if (self.include is None or self.include.name_matches(m.name))
                        and not (exc_res and self.exclude.name_matches(m.name))]
                if kept:
                    scopes.append(ScopeMetrics(scope=sm.scope, metrics=kept, schema_url=sm.schema_url))
                    kept_scopes.add(_scope_name(sm))
            if scopes:
                out.append(ResourceMetrics(resource=rm.resource, scope_metrics=scopes, schema_url=rm.schema_url))
        # A receiver's batch replaces its scope's previous series downstream (the prometheus exporter): a scope left
        # with nothing still goes on, empty, as MetricsBuilder sends it when a receiver has nothing. Dropped
        # entirely, the batch would stop here and the series of the last matching pod (or all of them, when the
        # receiver's batch was already that empty marker) would stay exposed until metric_expiration.
        for name, sm in emptied.items():
            if name not in kept_scopes:
                out.append(ResourceMetrics(resource=Resource({}), schema_url="", scope_metrics=[
                    ScopeMetrics(scope=sm.scope, metrics=[], schema_url=sm.schema_url)]))
        return MetricsData(resource_metrics=out)


def _scope_name(sm: ScopeMetrics) -> str:
    return sm.scope.name if sm.scope else ""


factory = Factory(
    kind="processor",
    type="filter",
    config_model=FilterConfig,
    create=FilterProcessor,
    stability=Stability.ALPHA,
    description="Keeps or drops metrics by metric name, pod namespace, pod label selector and resource attributes",
)
