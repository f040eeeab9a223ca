"""resource: insert, update, upsert or delete resource attributes (e.g. k8s.cluster.name), as the collector's
resource processor does."""

from __future__ import annotations

from typing import Literal

from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics
from pydantic import Field, model_validator

from podmeter.component import Factory, Processor, Stability
from podmeter.config import ComponentConfig
from podmeter.metrics import PerResource, with_resource


class AttributeAction(ComponentConfig):
    key: str = Field(min_length=1, description="The resource attribute to act on")
    action: Literal["insert", "update", "upsert", "delete"] = Field(
        description="insert: add if absent; update: change if present; upsert: set either way; delete: remove")
    value: str | int | float | bool | None = Field(None, description="The value to set")
    from_attribute: str = Field("", description="Set the value of this other resource attribute instead")

    @model_validator(mode="after")
    def _check(self) -> AttributeAction:
        has_value, has_from = self.value is not None, bool(self.from_attribute)
        if self.action == "delete":
            if has_value or has_from:
                raise ValueError(f"action delete of {self.key!r} takes no value or from_attribute")
        elif has_value == has_from:
            raise ValueError(f"action {self.action} of {self.key!r} needs exactly one of value or from_attribute")
        return self


class ResourceConfig(ComponentConfig):
    attributes: list[AttributeAction] = Field(default_factory=list, description="Actions, applied in order")


class ResourceProcessor(Processor):
    def __init__(self, settings, config: ResourceConfig) -> None:
        self.actions = config.attributes
        # input Resource -> the Resource made from it. Receivers (cgroup, nvml) and k8sattributes hand the same
        # Resource object on while nothing changed, and exporters keep their work per Resource object (rendered
        # labels, encoded attributes): a new object for each resource in each batch would have them redo it all,
        # every collection. Entries go with their input Resource (weak references), so it holds only live ones.
        self._made = PerResource()

    def apply(self, attrs: dict) -> dict:
        for a in self.actions:
            present = a.key in attrs
            if a.action == "delete":
                attrs.pop(a.key, None)
                continue
            if a.from_attribute:
                if a.from_attribute not in attrs:
                    continue  # nothing to copy, as in the collector
                value = attrs[a.from_attribute]
            else:
                value = a.value
            if (a.action == "insert" and not present) or (a.action == "update" and present) or a.action == "upsert":
                attrs[a.key] = value
        return attrs

    def process(self, data: MetricsData) -> MetricsData:
        if not self.actions:
            return data
        out = []
        for rm in data.resource_metrics:
            resource = self._made.get(rm.resource)
            if resource is None:  # actions depend on the attributes only, and a Resource's never change
                resource = with_resource(rm, self.apply(dict(rm.resource.attributes))).resource
                self._made.put(rm.resource, resource)
            out.append(ResourceMetrics(resource=resource, scope_metrics=rm.scope_metrics, schema_url=rm.schema_url))
        return MetricsData(resource_metrics=out)


factory = Factory(
    kind="processor",
    type="resource",
    config_model=ResourceConfig,
    create=ResourceProcessor,
    stability=Stability.ALPHA,
    description="Inserts, updates, upserts or deletes resource attributes (e.g. k8s.cluster.name)",
)
