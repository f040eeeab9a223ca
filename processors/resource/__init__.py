"""resource: insert, update, upsert, delete, hash, extract or convert resource attributes (e.g. k8s.cluster.name),
as the collector's resource processor does (its attribute actions)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from decimal import Decimal
from typing import Literal

from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics
from pydantic import Field, model_validator

from podmeter.component import Factory, Processor, Stability
from podmeter.config import ComponentConfig
from podmeter.metrics import PerResource, with_resource
from podmeter.patterns import compile_pattern
from processors._collector import refuse_keys


class AttributeAction(ComponentConfig):
    key: str = Field("", description="The resource attribute to act on (delete and hash: or those matching pattern)")
    action: Literal["insert", "update", "upsert", "delete", "hash", "extract", "convert"] = Field(
        description="insert: add if absent; update: change if present; upsert: set either way; delete: remove; "
                    "hash: replace by its SHA-256 (hex); extract: pattern's named groups become attributes; "
                    "convert: to converted_type")
    value: str | int | float | bool | None = Field(None, description="The value to set")
    from_attribute: str = Field("", description="Set the value of this other resource attribute instead")
    pattern: str = Field("", description="delete, hash: also the attributes whose key matches this regular "
                                         "expression; extract: the expression, with named groups")
    converted_type: Literal["int", "double", "string", ""] = Field("", description="convert: int, double or string")

    @model_validator(mode="before")
    @classmethod
    def _collector_keys(cls, value):
        return refuse_keys(value, {"from_context": "podmeter receives no requests, so there is no client context to "
                                                   "take a value from; use value or from_attribute"}, cls.__name__)

    @model_validator(mode="after")
    def _check(self) -> AttributeAction:
        # the collector's rules (attraction.NewAttrProc): each action takes only its own keys
        what = f"action {self.action}" + (f" of {self.key!r}" if self.key else "")
        has_value, has_from = self.value is not None, bool(self.from_attribute)
        if self.action in ("insert", "update", "upsert"):
            if has_value == has_from:
                raise ValueError(f"{what} needs exactly one of value or from_attribute")
        elif has_value or has_from:
            raise ValueError(f"{what} takes no value or from_attribute")
        if self.pattern and self.action not in ("delete", "hash", "extract"):
            raise ValueError(f"{what} takes no pattern (only delete, hash and extract do)")
        if self.converted_type and self.action != "convert":
            raise ValueError(f"{what} takes no converted_type (only convert does)")
        if not self.key and not (self.pattern and self.action in ("delete", "hash")):
            raise ValueError(f"action {self.action} needs key" + (" or pattern" if self.action in ("delete", "hash")
                                                                   else ""))
        if self.action == "extract":
            if not self.pattern:
                raise ValueError(f"{what} needs pattern, a regular expression with named groups")
            compiled = compile_pattern(self.pattern, "pattern")
            if not compiled.groupindex or len(compiled.groupindex) != compiled.groups:
                raise ValueError(f"{what}: every group of pattern must be named, like (?P<name>...): each names "
                                 "the attribute its match goes to")
        elif self.pattern:
            compile_pattern(self.pattern, "pattern")
        if self.action == "convert" and not self.converted_type:
            raise ValueError(f"{what} needs converted_type: int, double or string")
        return self


class ResourceConfig(ComponentConfig):
    attributes: list[AttributeAction] = Field(default_factory=list, description="Actions, applied in order")


def _sha256(value) -> str:
    """The collector's hash: SHA-256 (hex) of a string's bytes, of a boolean as one byte, of a number's 8
    little-endian bytes; "" for another value (a list), as the collector sets it."""
    if isinstance(value, str):
        data = value.encode()
    elif isinstance(value, bool):
        data = b"\x01" if value else b"\x00"
    elif isinstance(value, int):
        data = struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
    elif isinstance(value, float):
        data = struct.pack("<d", value)
    else:
        return ""
    return hashlib.sha256(data).hexdigest()


def _go_float(value: float) -> str:
    """A double as pcommon's AsString writes it (float64AsString, encoding/json's form): the shortest digits that
    read back the same, in plain notation (1, not 1.0), exponent form from 1e21 and below 1e-6 (1e+21, 1e-7)."""
    if not math.isfinite(value):  # AsString returns json.Marshal's error text
        return "json: unsupported value: " + ("NaN" if math.isnan(value) else "+Inf" if value > 0 else "-Inf")
    d = Decimal(repr(value))
    if value and not 1e-6 <= abs(value) < 1e21:
        digits = "".join(map(str, d.as_tuple().digits)).rstrip("0") or "0"
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return ("-" if value < 0 else "") + f"{mantissa}e{d.adjusted():+d}"
    return format(d.normalize(), "f")


def _go_json(values) -> str:
    """An array as pcommon's AsString writes it (Go's json.Marshal): compact, UTF-8 with <, > and & escaped,
    doubles as _go_float."""
    text = "[" + ",".join(_go_float(v) if isinstance(v, float) else json.dumps(v, ensure_ascii=False)
                          for v in values) + "]"
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _convert(value, to: str):
    """The collector's convert: the value as `to`, or unchanged where it has no such form ("abc" as an int)."""
    if to == "string":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return _go_float(value)
        if isinstance(value, list | tuple):
            return _go_json(value)
        return value if isinstance(value, str) else str(value)
    if isinstance(value, bool):
        return int(value) if to == "int" else float(value)
    if to == "int":
        if isinstance(value, float):
            # truncated toward zero, as Go's int64(); beyond int64 Go's result is the platform's, and an int out of
            # range would fail the OTLP encoding of the whole attribute: left as it is
            return int(value) if math.isfinite(value) and -2**63 <= int(value) < 2**63 else value
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value) and -2**63 <= int(value) < 2**63:
            return int(value)  # Go's ParseInt: decimal digits within int64, else unchanged
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


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
            if a.action in ("delete", "hash"):
                keys = [a.key] if a.key in attrs else []
                if a.pattern:
                    keys += [k for k in attrs if k != a.key and re.search(a.pattern, k)]
                for k in keys:
                    if a.action == "delete":
                        del attrs[k]
                    else:
                        attrs[k] = _sha256(attrs[k])
                continue
            present = a.key in attrs
            if a.action == "extract":
                value = attrs.get(a.key)
                m = re.search(a.pattern, value) if isinstance(value, str) else None  # strings only, as the collector
                if m:
                    attrs.update(m.groupdict(""))
                continue
            if a.action == "convert":
                if present:
                    attrs[a.key] = _convert(attrs[a.key], a.converted_type)
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
    description="Inserts, updates, upserts, deletes, hashes, extracts or converts resource attributes "
                "(e.g. k8s.cluster.name)",
)
