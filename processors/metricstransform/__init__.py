"""metricstransform processor: rename metrics and reshape their data point attributes, as the collector's.

Transforms run in order, each on the result of the previous one, within one batch (nothing is carried between
batches). Per-batch trouble (a histogram asked for a max aggregation, metrics of different types combined) is
counted and logged once; the metric concerned passes unchanged.
"""

from __future__ import annotations

import math
import re
from collections import Counter
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

from .config import GROUP_REFERENCE, MetricsTransformConfig, Operation, Transform, group_key


class TransformError(Exception):
    """An operation cannot apply to this metric (counted; the metric passes unchanged)."""


def _go_template(new_name: str) -> str:
    """new_name as Go's Regexp.Expand reads it (the collector's), in Python's match.expand syntax: `$1`, `${1}`,
    `$name`, `${name}` refer to groups (`$name` as long as possible: `$1x` is group `1x`, write `${1}x`), `$$` is
    a `$`, and a `$` starting none of these stays as it is."""
    def part(m: re.Match) -> str:
        ref = m.group(1) or m.group(2)
        return "$" if ref is None else f"\\g<{group_key(ref)}>"  # None: $$
    return GROUP_REFERENCE.sub(part, new_name.replace("\\", "\\\\"))


class _Compiled:
    def __init__(self, t: Transform) -> None:
        self.t = t
        self.pattern = re.compile(t.include) if t.match_type == "regexp" else None
        self.template = _go_template(t.new_name) if (t.new_name and self.pattern) else None
        regexp = t.match_type == "regexp"
        self.labels = [(k, re.compile(v).search if regexp else v.__eq__) for k, v in t.experimental_match_labels.items()]

    def point_matches(self, p) -> bool:
        """experimental_match_labels, as the collector: an absent attribute counts as "" (so {k: ""} selects
        points without k), a regexp is searched in the value."""
        for key, test in self.labels:
            value = p.attributes.get(key)
            if not test("" if value is None else str(value).lower() if isinstance(value, bool) else str(value)):
                return False
        return True

    def select(self, metric: Metric) -> tuple[Metric | None, bool]:
        """(the metric with only its points that experimental_match_labels selects, or None if none is; whether
        that is all of them). A metric without points is selected whole, as in the collector."""
        if not self.labels or not metric.data.data_points:
            return metric, True
        points = [p for p in metric.data.data_points if self.point_matches(p)]
        if not points:
            return None, False
        if len(points) == len(metric.data.data_points):
            return metric, True
        return replace(metric, data=replace(metric.data, data_points=points)), False

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
        # Names still to come and names already out: a rename onto a name another metric of the scope has would
        # give two metrics one name (two TYPE lines, duplicate series). As the collector documents, a rename
        # collision leaves the metric unchanged, and is counted and logged.
        pending, produced = Counter(mm.name for mm in metrics), set()
        for metric in metrics:
            pending[metric.name] -= 1
            m = ct.match(metric.name)
            selected, whole = ct.select(metric) if m else (None, False)
            if selected is None:
                result.append(metric)
                produced.add(metric.name)
                continue
            try:
                if t.action == "update" and not whole:
                    # some points match experimental_match_labels, some not: as in the collector, the metric keeps
                    # its name and only the operations that work point by point change the matching points
                    changed = self._operate_points(ct, metric, resource)
                    result.append(changed)
                    produced.add(changed.name)
                    continue
                new_name = ct.rename(metric.name, m)
                taken = pending[new_name] > 0 or new_name in produced
                if (new_name == metric.name or taken) if t.action == "insert" else (new_name != metric.name and taken):
                    raise TransformError(f"renaming to {new_name} would give two metrics that name")
                changed = self._operate(replace(selected, name=new_name), t.operations, resource,
                                        _has_duplicates(selected))
            except TransformError as exc:
                self.telemetry.error("transform", f"{t.include} on {metric.name}: {exc}")
                result.append(metric)
                produced.add(metric.name)
                continue
            if t.action == "insert":
                result.append(metric)
                produced.add(metric.name)
            if _emptied(selected, changed):
                continue  # every point deleted: the metric goes (the collector's), not on as one without points
            result.append(changed)
            produced.add(changed.name)
        return result

    def _combine(self, ct: _Compiled, metrics: list[Metric], resource: dict) -> list[Metric]:
        t = ct.t
        matched, rest = [], []
        for metric in metrics:
            m = ct.match(metric.name)
            selected = ct.select(metric)[0] if m else None
            # a matched metric goes whole into the combination, less its points experimental_match_labels leaves out
            if selected is not None:
                matched.append((selected, m))
            else:
                rest.append((metric, m))
        if not matched:
            return metrics
        if any(mm.name == t.new_name for mm, _ in rest):
            self.telemetry.error("transform", f"combine {t.include}: a metric named {t.new_name} is already there; "
                                 "left as they are")
            return metrics
        first = matched[0][0]
        # as the collector's canBeCombined: a cumulative and a delta sum (or histogram) merged would give points
        # that mean different things under one temporality
        kinds = {(type(mm.data), getattr(mm.data, "is_monotonic", None),
                  getattr(mm.data, "aggregation_temporality", None), mm.unit) for mm, _ in matched}
        if len(kinds) > 1:
            self.telemetry.error("transform", f"combine {t.include}: the matched metrics differ in type, temporality "
                                 f"or unit ({', '.join(mm.name for mm, _ in matched)}); left as they are")
            return metrics
        points = []
        for metric, m in matched:
            # as the collector: a group that matched nothing sets nothing (an empty value would overwrite the one
            # the points have, and is no label value for Prometheus)
            labels = {k: v for k, v in m.groupdict().items() if v}
            if t.submatch_case == "lower":
                labels = {k: v.lower() for k, v in labels.items()}
            elif t.submatch_case == "upper":
                labels = {k: v.upper() for k, v in labels.items()}
            points.extend(replace(p, attributes={**p.attributes, **labels}) for p in metric.data.data_points)
        combined = replace(first, name=t.new_name, data=replace(first.data, data_points=points))
        try:
            if t.aggregation_type:  # the collector's: points of the matched metrics with equal attributes merge
                combined = _aggregate(combined, None, t.aggregation_type, only_if_duplicates=True)
            combined = self._operate(combined, t.operations, resource, any(_has_duplicates(mm) for mm, _ in matched))
        except TransformError as exc:
            self.telemetry.error("transform", f"combine {t.include}: {exc}; left as they are")
            return metrics
        emptied = bool(points) and not combined.data.data_points  # every point deleted: dropped, as in _apply
        return [m for m, _ in rest] + ([] if emptied else [combined])

    def _operate_points(self, ct: _Compiled, metric: Metric, resource: dict) -> Metric:
        """update of a metric only some of whose points match experimental_match_labels: the operations that act
        point by point apply to those points; renaming and the operations on the whole metric (add_label,
        delete_label_value, aggregations, delete_label) do not, as in the collector."""
        points = metric.data.data_points
        sub = replace(metric, data=replace(metric.data, data_points=[p for p in points if ct.point_matches(p)]))
        for op in ct.t.operations:
            if op.action in _POINTWISE:
                sub = _OPS[op.action](sub, op, resource)
        changed = replace(metric, data=replace(metric.data, data_points=[
            *(p for p in points if not ct.point_matches(p)), *sub.data.data_points]))
        if not _has_duplicates(metric) and _has_duplicates(changed):
            raise TransformError("the result has several points with the same attributes (duplicate series)")
        return changed

    def _operate(self, metric: Metric, operations: list[Operation], resource: dict, had_duplicates: bool) -> Metric:
        for op in operations:
            metric = _OPS[op.action](metric, op, resource)
        # add_label / copy_label / copy_resource_attribute overwriting an attribute the points differ by, or a
        # combine whose metrics' points end up alike, would give two series with the same name and attributes
        # (an exporter keeps one at random, a backend rejects them): a collision, left unchanged
        if not had_duplicates and _has_duplicates(metric):
            raise TransformError("the result has several points with the same attributes (duplicate series)")
        return metric


def _emptied(before: Metric, after: Metric) -> bool:
    """The operations deleted every point (delete_label_value): as in the collector, such a metric is dropped, not
    sent on as a metric with no points (OTLP would carry it so; a metric that had none to begin with stays)."""
    return bool(before.data.data_points) and not after.data.data_points


def _has_duplicates(metric: Metric) -> bool:
    seen = set()
    for p in metric.data.data_points:
        key = tuple(sorted((k, str(v)) for k, v in p.attributes.items()))
        if key in seen:
            return True
        seen.add(key)
    return False


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
        if op.new_label and op.new_label != op.label and op.new_label in p.attributes:
            # the collector's documented rule: renaming onto an existing label is a collision, not an overwrite
            raise TransformError(f"update_label: {op.new_label} is already an attribute of the points")
        attrs = dict(p.attributes)
        value = attrs.pop(op.label)
        value = renames.get(value, value) if isinstance(value, str) else value
        attrs[op.new_label or op.label] = value
        return _with_attrs(p, attrs)

    # two values renamed to one: merge those points (aggregation_type if given, else sum) rather than emit two
    # series with equal attributes
    return _aggregate(_map_points(metric, fn), None, op.aggregation_type or "sum", only_if_duplicates=True)


def _delete_label_value(metric, op, resource):
    return _map_points(metric, lambda p: None if p.attributes.get(op.label) == op.label_value else p)


def _copy_label(metric, op, resource):
    return _map_points(metric, lambda p: _with_attrs(p, {**p.attributes, op.new_label: p.attributes[op.label]})
                       if op.label in p.attributes else p)


def _delete_label(metric, op, resource):
    metric = _map_points(metric, lambda p: _with_attrs(p, {k: v for k, v in p.attributes.items() if k != op.label}))
    return _aggregate(metric, None, op.aggregation_type or "sum", only_if_duplicates=True)  # e.g. max for a gauge


def _copy_resource_attribute(metric, op, resource):
    if op.resource_attribute not in resource:
        return metric
    value = resource[op.resource_attribute]
    name = op.new_label or op.resource_attribute
    return _map_points(metric, lambda p: _with_attrs(p, {**p.attributes, name: value}))


def _scale(metric, op, resource):
    factor = op.experimental_scale
    _check_type(metric, "experimental_scale_value")

    def fn(p):
        if isinstance(p, HistogramDataPoint):
            return replace(p, sum=p.sum * factor, explicit_bounds=[b * factor for b in p.explicit_bounds],
                           min=p.min * factor, max=p.max * factor)
        value = p.value * factor
        if isinstance(p.value, int):
            if not math.isfinite(value):  # int(inf) raises: out of an integer's range
                raise TransformError(f"{p.value} scaled by {factor} is no integer")
            # truncated toward zero, as the collector's int64(): 1.9 MiB is 1, as dcgm-exporter's integer MiB
            value = int(value)
        return replace(p, value=value)

    return _map_points(metric, fn)


def _toggle(metric, op, resource):
    if not isinstance(metric.data, Sum | Gauge):
        # a histogram has no scalar type to toggle: nothing to do, as in the collector, and no reason to leave the
        # rest of the transform (a regexp rename of a family of metrics, say) undone for it
        return metric

    def fn(p):
        if isinstance(p.value, int):
            return replace(p, value=float(p.value))
        if not math.isfinite(p.value):  # NaN (a gauge with no reading) or inf has no integer value
            raise TransformError(f"{p.value} cannot be an integer")
        return replace(p, value=int(p.value))  # truncated toward zero, as the collector's int64()

    return _map_points(metric, fn)


def _aggregate_labels(metric, op, resource):
    return _aggregate(metric, set(op.label_set or ()), op.aggregation_type)


def _aggregate_label_values(metric, op, resource):
    values = set(op.aggregated_values or ())

    def fn(p):
        value = p.attributes.get(op.label)
        if isinstance(value, str) and value in values:  # a list-valued attribute is no label value (and unhashable)
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
    _check_type(metric, "aggregation")  # before reading values: other point types have none
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
        min=_extreme(min, [p.min for p in ps]), max=_extreme(max, [p.max for p in ps]))


def _extreme(fn, values: list[float]) -> float:
    # NaN is "not recorded" (MetricsBuilder's default): the merged extreme is then unknown too. min()/max() over a
    # list with NaN answer by position (min([nan, 0.1]) is nan, min([0.1, nan]) is 0.1).
    return float("nan") if any(math.isnan(v) for v in values) else fn(values)


def _check_type(metric: Metric, what: str) -> None:
    if not isinstance(metric.data, Sum | Gauge | Histogram):
        raise TransformError(f"{what} applies to sums, gauges and histograms, not a {type(metric.data).__name__}")


# operations that change each point by itself (the collector applies these to the points experimental_match_labels
# selects even when it leaves the rest of the metric alone)
_POINTWISE = {"update_label", "experimental_scale_value", "toggle_scalar_data_type", "copy_label",
              "copy_resource_attribute"}

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
