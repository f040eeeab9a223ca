"""Configuration of the metricstransform processor: the collector's schema (transforms, operations, key names)
plus podmeter's `copy_resource_attribute`, `copy_label` and `delete_label` operations."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from podmeter import __version__
from podmeter.config import ComponentConfig
from podmeter.patterns import compile_pattern
from processors._collector import refuse_keys

REQUIRED = {
    "add_label": ("new_label", "new_value"),
    "update_label": ("label",),
    "delete_label_value": ("label", "label_value"),
    "aggregate_labels": ("label_set", "aggregation_type"),
    "aggregate_label_values": ("label", "aggregated_values", "new_value", "aggregation_type"),
    "experimental_scale_value": ("experimental_scale",),
    "toggle_scalar_data_type": (),
    "copy_resource_attribute": ("resource_attribute",),
    "copy_label": ("label", "new_label"),
    "delete_label": ("label",),
}


class ValueAction(ComponentConfig):
    value: str = Field(description="A label value to rename")
    new_value: str = Field(description="What it becomes")


class Operation(ComponentConfig):
    action: Literal["add_label", "update_label", "delete_label_value", "aggregate_labels", "aggregate_label_values",
                    "experimental_scale_value", "toggle_scalar_data_type", "copy_resource_attribute", "copy_label",
                    "delete_label"] = Field(description="What to do to the matched metric's points")
    label: str | None = Field(None, description="The data point attribute operated on")
    new_label: str | None = Field(None, description="New attribute name (add_label, update_label, copy_label, "
                                                    "copy_resource_attribute)")
    new_value: str | None = Field(None, description="New value (add_label, aggregate_label_values)")
    label_value: str | None = Field(None, description="delete_label_value: points with this value are deleted")
    value_actions: list[ValueAction] = Field(default_factory=list, description="update_label: value renames")
    label_set: list[str] | None = Field(None, description="aggregate_labels: the attributes kept")
    aggregated_values: list[str] | None = Field(None, description="aggregate_label_values: values merged")
    aggregation_type: Literal["sum", "mean", "max", "min"] | None = Field(None, description="How points merge")
    experimental_scale: float | None = Field(None, description="experimental_scale_value: the factor")
    resource_attribute: str | None = Field(None, description="copy_resource_attribute: the resource attribute")

    @field_validator("experimental_scale")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        # NaN or inf would turn every value into NaN/inf, and fail on every integer point
        if v is not None and not math.isfinite(v):
            raise ValueError(f"experimental_scale must be a finite number, not {v}")
        return v

    @model_validator(mode="after")
    def _required(self):
        missing = [k for k in REQUIRED[self.action] if getattr(self, k) is None]
        if missing:
            raise ValueError(f"action {self.action} needs {', '.join(missing)}")
        if self.action == "update_label" and self.new_label is None and not self.value_actions:
            raise ValueError("action update_label needs new_label or value_actions")
        # as in the collector: {{version}} in a new value is this agent's version
        if self.new_value is not None:
            self.new_value = self.new_value.replace("{{version}}", __version__)
        for va in self.value_actions:
            va.new_value = va.new_value.replace("{{version}}", __version__)
        return self


# The collector's keys and actions podmeter has not, with what to write instead
_TRANSFORM_HINTS = {
    "metric_name": "the collector's deprecated form of include: write include: <name> (match_type: strict)",
    "group_resource_labels": "action group is not supported: podmeter's receivers already give each pod, "
                             "container and GPU its own resource; use the resource processor to add attributes",
}


class Transform(ComponentConfig):
    include: str = Field(description="Metric name (strict) or regular expression (regexp) to match")
    match_type: Literal["strict", "regexp"] = Field("strict", description="strict or regexp")
    experimental_match_labels: dict[str, str] = Field(
        default_factory=dict, description="Only data points whose attributes have these values (regexp: searched "
                                          "in the value; an absent attribute counts as \"\"), as in the collector")
    action: Literal["update", "insert", "combine"] = Field(
        description="update: change the metric in place; insert: add a changed copy; combine: merge the matched "
                    "metrics into new_name, named regexp groups becoming attributes")
    new_name: str | None = Field(
        None, description="The new name; with regexp, $1 / ${1} / $name / ${name} expand groups")
    aggregation_type: Literal["sum", "mean", "max", "min"] | None = Field(
        None, description="combine: how points left with equal attributes merge (else they are a collision)")
    submatch_case: Literal["lower", "upper", ""] = Field("", description="combine: case of the attribute values")
    operations: list[Operation] = Field(default_factory=list, description="Operations applied in order")

    @model_validator(mode="before")
    @classmethod
    def _collector_keys(cls, value):
        hints = dict(_TRANSFORM_HINTS)
        if isinstance(value, dict) and value.get("action") == "group":
            hints["action"] = _TRANSFORM_HINTS["group_resource_labels"]
        return refuse_keys(value, hints, cls.__name__)

    @field_validator("include")
    @classmethod
    def _include(cls, v: str) -> str:
        if not v:
            raise ValueError("include must name a metric")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.match_type == "regexp":
            pattern = compile_pattern(self.include, "include")
            if self.action == "combine" and not pattern.groupindex:
                raise ValueError("action combine needs named groups in include, like ^disk\\.(?P<direction>.*)$")
            if self.new_name and self.action != "combine":
                # a reference to a group include does not have would fail on every matching metric
                for braced, bare in GROUP_REFERENCE.findall(self.new_name):
                    written = braced or bare
                    if not written:
                        continue  # $$
                    ref = group_key(written)
                    if not (ref <= pattern.groups if isinstance(ref, int) else ref in pattern.groupindex):
                        names = f", named {', '.join(pattern.groupindex)}" if pattern.groupindex else ""
                        raise ValueError(f"new_name refers to group {written}, which include does not have "
                                         f"({pattern.groups} groups{names})")
        if self.action == "combine":
            if self.match_type != "regexp":
                raise ValueError("action combine needs match_type: regexp")
            if not self.new_name:
                raise ValueError("action combine needs new_name")
        if self.action == "insert" and not self.new_name:
            raise ValueError("action insert needs new_name (the copy's name)")
        if self.aggregation_type and self.action != "combine":
            # the collector ignores it there; taken silently it would look as if it did something
            raise ValueError(f"aggregation_type of a transform applies to action combine only; for {self.action}, "
                             "give it to an aggregate_labels or aggregate_label_values operation")
        if self.match_type == "regexp":
            for label, pattern in self.experimental_match_labels.items():
                compile_pattern(pattern, f"experimental_match_labels {label}")
        return self


# what a `$` starts in new_name, as Go's Regexp.Expand (the collector's) reads it: `$$`, a braced group reference
# `${1}` / `${name}`, or a bare one `$1` / `$name` taken as long as possible
GROUP_REFERENCE = re.compile(r"\$(?:\$|\{(\w+)\}|(\w+))")


def group_key(ref: str) -> int | str:
    """A group reference's number, or its name: Go reads `$01` as group 1."""
    return int(ref) if ref.isascii() and ref.isdigit() else ref


class MetricsTransformConfig(ComponentConfig):
    transforms: list[Transform] = Field(default_factory=list, description="Transforms applied in order")
