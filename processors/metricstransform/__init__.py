"""metricstransform processor: rename metrics and reshape their data point attributes, as the collector's.

Transforms run in order, each on the result of the previous one, within one batch (nothing is carried between
batches). Per-batch trouble (a histogram asked for a max aggregation, metrics of different types combined) is
counted and logged once; the metric concerned passes unchanged.
"""

from __future__ import annotations

import re
from dataclasses import replace

from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)

from podmeter.component import Factory, Processor, Stability

from .config import MetricsTransformConfig, Operation, Transform


class TransformError(Exception):
    """An operation cannot apply to this metric (counted; the metric passes unchanged)."""


def _go_template(new_name: str) -> str:
    """Collector-style `$1`, `${1}`, `${name}` to Python's match.expand syntax."""
    escaped = new_name.replace("\\", "\\\\")
    return re.sub(r"\$\{(\w+)\}|\$(\d+)", lambda m: f"\\g<{m.group(1) or m.group(2)}>", escaped)


class _Compiled:
    def __init__(self, t: Transform) -> None:
        self.t = t
        self.pattern = re.compile(t.include) if t.match_type == "regexp" else None
        self.template = _go_template(t.new_name) if (t.new_name and self.pattern) else None

    def match(self, name: str):
        if self.pattern is None:
            return name == self.t.include or None
        return self.pattern.search(name)

    def rename(self, name: str, m) -> str:
        if not self.t.new_name:
            return name
        if self.template is not None and m is not True:
            return m.expand(self.template)
        return self.t.new_name


class MetricsTransformProcessor(Processor):
    def __init__(self, settings, config: MetricsTransformConfig) -> None:
        self.telemetry = settings.telemetry
        self.transforms = [_Compiled(t) for t in config.transforms]

    def process(self, data: MetricsData) -> MetricsData:
        if not self.transforms:
            return data
        out = []
        for rm in data.resource_metrics:
            resource = dict(rm.resource.attributes)
            scopes = []
            for sm in rm.scope_metrics:
                metrics = list(sm.metrics)
                for ct in self.transforms:
                    metrics = self._apply(ct, metrics, resource)
                scopes.append(ScopeMetrics(scope=sm.scope, metrics=metrics, schema_url=sm.schema_url))
            out.append(ResourceMetrics(resource=rm.resource, scope_metrics=scopes, schema_url=rm.schema_url))
        return MetricsData(resource_metrics=out)

    def _apply(self, ct: _Compiled, metrics: list[Metric], resource: dict) -> list[Metric]:
        t = ct.t
        if t.action == "combine":
            return self._combine(ct, metrics, resource)
        result = []
        for metric in metrics:
            m = ct.match(metric.name)
            if not m:
                result.append(metric)
                continue
            try:
                changed = self._operate(replace(metric, name=ct.rename(metric.name, m)), t.operations, resource)
            except TransformError as exc:
                self.telemetry.error("transform", f"{t.include} on {metric.name}: {exc}")
                result.append(metric)
                continue
            if t.action == "insert":
                result.append(metric)
            result.append(changed)
        return result

    def _combine(self, ct: _Compiled, metrics: list[Metric], resource: dict) -> list[Metric]:
        t = ct.t
        matched, rest = [], []
        for metric in metrics:
            m = ct.match(metric.name)
            (matched if m else rest).append((metric, m))
        if not matched:
            return metrics
        first = matched[0][0]
        kinds = {(type(mm.data), getattr(mm.data, "is_monotonic", None), mm.unit) for mm, _ in matched}
        if len(kinds) > 1:
            self.telemetry.error("transform", f"combine {t.include}: the matched metrics differ in type or unit "
                                 f"({', '.join(mm.name for mm, _ in matched)}); left as they are")
            return metrics
        points = []
        for metric, m in matched:
            labels = {k: v for k, v in m.groupdict().items() if v is not None}
            if t.submatch_case == "lower":
                labels = {k: v.lower() for k, v in labels.items()}
            elif t.submatch_case == "upper":
                labels = {k: v.upper() for k, v in labels.items()}
            points.extend(replace(p, attributes={**p.attributes, **labels}) for p in metric.data.data_points)
        combined = replace(first, name=t.new_name, data=replace(first.data, data_points=points))
        try:
            combined = self._operate(combined, t.operations, resource)
        except TransformError as exc:
            self.telemetry.error("transform", f"combine {t.include}: {exc}")
        return [m for m, _ in rest] + [combined]

    def _operate(self, metric: Metric, operations: list[Operation], resource: dict) -> Metric:
        for op in operations:
            metric = _OPS[op.action](metric, op, resource)
        return metric


# -- operations: each takes (metric, op, resource attributes) and returns the new metric ------------------------


def _map_points(metric: Metric, fn) -> Metric:
    points = [q for q in (fn(p) for p in metric.data.data_points) if q is not None]
    return replace(metric, data=replace(metric.data, data_points=points))


def _with_attrs(p, attrs: dict):
    return replace(p, attributes=attrs)


def _add_label(metric, op, resource):
    return _map_points(metric, lambda p: _with_attrs(p, {**p.attributes, op.new_label: op.new_value}))


def _update_label(metric, op, resource):
    renames = {va.value: va.new_value for va in op.value_actions}

    def fn(p):
        if op.label not in p.attributes:
            return p
        attrs = dict(p.attributes)
        value = attrs.pop(op.label)
        value = renames.get(value, value) if isinstance(value, str) else value
        attrs[op.new_label or op.label] = value
        return _with_attrs(p, attrs)

    metric = _map_points(metric, fn)
    if renames:  # two values renamed to one: merge those points, as the collector does (sum)
        metric = _aggregate(metric, None, "sum", only_if_duplicates=True)
    return metric


def _delete_label_value(metric, op, resource):
    return _map_points(metric, lambda p: None if p.attributes.get(op.label) == op.label_value else p)


def _copy_label(metric, op, resource):
    return _map_points(metric, lambda p: _with_attrs(p, {**p.attributes, op.new_label: p.attributes[op.label]})
                       if op.label in p.attributes else p)


def _delete_label(metric, op, resource):
    metric = _map_points(metric, lambda p: _with_attrs(p, {k: v for k, v in p.attributes.items() if k != op.label}))
    return _aggregate(metric, None, "sum", only_if_duplicates=True)


def _copy_resource_attribute(metric, op, resource):
    if op.resource_attribute not in resource:
        return metric
    value = resource[op.resource_attribute]
    name = op.new_label or op.resource_attribute
    return _map_points(metric, lambda p: _with_attrs(p, {**p.attributes, name: value}))


def _scale(metric, op, resource):
    factor = op.experimental_scale

    def fn(p):
        if isinstance(p, HistogramDataPoint):
            return replace(p, sum=p.sum * factor, explicit_bounds=[b * factor for b in p.explicit_bounds],
                           min=p.min * factor, max=p.max * factor)
        value = p.value * factor
        return replace(p, value=int(round(value)) if isinstance(p.value, int) else value)

    return _map_points(metric, fn)


def _toggle(metric, op, resource):
    if isinstance(metric.data, Histogram):
        raise TransformError("toggle_scalar_data_type applies to sums and gauges, not histograms")
    return _map_points(metric, lambda p: replace(p, value=float(p.value) if isinstance(p.value, int)
                                                 else int(round(p.value))))


def _aggregate_labels(metric, op, resource):
    return _aggregate(metric, set(op.label_set or ()), op.aggregation_type)


def _aggregate_label_values(metric, op, resource):
    values = set(op.aggregated_values or ())

    def fn(p):
        if p.attributes.get(op.label) in values:
            return _with_attrs(p, {**p.attributes, op.label: op.new_value})
        return p

    return _aggregate(_map_points(metric, fn), None, op.aggregation_type, only_if_duplicates=True)


def _aggregate(metric: Metric, keep: set | None, how: str, only_if_duplicates: bool = False) -> Metric:
    """Merge points whose (kept) attributes are equal. keep None keeps every attribute."""
    groups: dict[tuple, list] = {}
    for p in metric.data.data_points:
        attrs = p.attributes if keep is None else {k: v for k, v in p.attributes.items() if k in keep}
        groups.setdefault(tuple(sorted((k, str(v)) for k, v in attrs.items())), []).append((attrs, p))
    if only_if_duplicates and all(len(g) == 1 for g in groups.values()):
        return metric
    points = []
    for members in groups.values():
        attrs = members[0][0]
        ps = [p for _, p in members]
        if isinstance(metric.data, Histogram):
            points.append(_merge_histograms(ps, attrs, how))
            continue
        values = [p.value for p in ps]
        if how == "sum":
            value = sum(values)
        elif how == "mean":
            value = sum(values) / len(values)
        elif how == "max":
            value = max(values)
        else:
            value = min(values)
        starts = [p.start_time_unix_nano for p in ps if p.start_time_unix_nano]
        points.append(NumberDataPoint(attributes=dict(attrs), start_time_unix_nano=min(starts) if starts else 0,
                                      time_unix_nano=max(p.time_unix_nano for p in ps), value=value))
    if not isinstance(metric.data, Sum | Gauge | Histogram):
        raise TransformError(f"cannot aggregate a {type(metric.data).__name__}")
    return replace(metric, data=replace(metric.data, data_points=points))


def _merge_histograms(ps: list, attrs: dict, how: str) -> HistogramDataPoint:
    if len(ps) == 1:
        return replace(ps[0], attributes=dict(attrs))
    if how != "sum":
        raise TransformError(f"histograms can only be aggregated with sum, not {how}")
    bounds = list(ps[0].explicit_bounds)
    if any(list(p.explicit_bounds) != bounds for p in ps):
        raise TransformError("histograms with different bucket bounds cannot be aggregated")
    counts = [sum(c) for c in zip(*(p.bucket_counts for p in ps), strict=True)]
    return HistogramDataPoint(
        attributes=dict(attrs), start_time_unix_nano=min(p.start_time_unix_nano for p in ps),
        time_unix_nano=max(p.time_unix_nano for p in ps), count=sum(p.count for p in ps),
        sum=sum(p.sum for p in ps), bucket_counts=counts, explicit_bounds=bounds,
        min=min(p.min for p in ps), max=max(p.max for p in ps))


_OPS = {
    "add_label": _add_label,
    "update_label": _update_label,
    "delete_label_value": _delete_label_value,
    "aggregate_labels": _aggregate_labels,
    "aggregate_label_values": _aggregate_label_values,
    "experimental_scale_value": _scale,
    "toggle_scalar_data_type": _toggle,
    "copy_resource_attribute": _copy_resource_attribute,
    "copy_label": _copy_label,
    "delete_label": _delete_label,
}

factory = Factory(
    kind="processor", type="metricstransform", config_model=MetricsTransformConfig,
    create=MetricsTransformProcessor, stability=Stability.BETA,
    description="Renames metrics and adds, renames, copies, deletes, scales or aggregates data point attributes")
