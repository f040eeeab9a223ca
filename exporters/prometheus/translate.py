"""OTel metrics -> Prometheus series, following the OTel "Prometheus and OpenMetrics compatibility" spec.

Names: invalid characters become `_`; with suffixes on, the unit is appended as a word (By -> bytes,
s -> seconds, 1 -> ratio for gauges, `a/b` -> `a_per_b`, `{annotations}` dropped) unless the name already has it,
and monotonic sums end in `_total`. Histograms become `_bucket{le}`, `_sum`, `_count`. Attributes become labels
(`.` -> `_`); identifying resource attributes are promoted to labels and every resource gets a `target_info`.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from operator import itemgetter
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    Metric,
    ResourceMetrics,
    Sum,
)
from prometheus_client.utils import floatToGoString

from podmeter.metrics import PerResource, utf8_safe

# The collector's table (prometheus/otlptranslator, which its prometheus exporter uses), no more: a unit not in it is
# used as written (`bit` stays `bit`), so that a metric gets the name the collector would give it.
UNIT_WORDS = {
    # time
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds", "us": "microseconds",
    "ns": "nanoseconds",
    # bytes
    "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes", "TiBy": "tibibytes",
    "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes", "TBy": "terabytes",
    # SI
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius",
    "Hz": "hertz", "%": "percent",
}
PER_UNIT_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}

_INVALID_NAME = re.compile(r"[^a-zA-Z0-9_:]+")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]+")
_ANNOTATION = re.compile(r"\{[^}]*\}")
_UNDERSCORES = re.compile(r"__+")


def sanitize_name(name: str) -> str:
    out = _INVALID_NAME.sub("_", name)
    out = _UNDERSCORES.sub("_", out)
    if not out:
        return "_"
    if out[0].isdigit():
        out = "_" + out
    return out


# Memo caches for the per-point helpers: label keys and values are a small vocabulary (attribute names, pod and
# container names, ids) repeated on every point of every collection. Module-level (shared by every exporter, read
# and written from their threads: a dict's get/set are atomic) and bounded: cleared whole when they pass MEMO_CAP,
# so churning values (pids, pod uids) cannot grow them without limit.
MEMO_CAP = 32_768
_label_memo: dict[str, str] = {}
_value_memo: dict[str, str] = {}
_name_memo: dict[tuple, str] = {}


def _remember(memo: dict, key, value):
    if len(memo) >= MEMO_CAP:
        memo.clear()
    memo[key] = value
    return value


def sanitize_label(name: str) -> str:
    """A valid Prometheus label name for an attribute key (memoized)."""
    hit = _label_memo.get(name)
    if hit is None:
        hit = _remember(_label_memo, name, _sanitize_label(name))
    return hit


def _sanitize_label(name: str) -> str:
    out = _INVALID_LABEL.sub("_", name)
    if not out:
        return "_"
    if out[0].isdigit():
        out = "key_" + out
    elif out.startswith("__"):
        out = "key" + out  # __ is reserved for Prometheus' own labels
    return out


def unit_words(unit: str) -> tuple[str, str]:
    """(main word, per word) for an OTel unit; ("", "") where it adds nothing."""
    unit = _ANNOTATION.sub("", unit or "").strip()
    main, _, per = unit.partition("/")
    main_word = UNIT_WORDS.get(main, main if main and main != "1" else "")
    per_word = PER_UNIT_WORDS.get(per, per)
    clean = lambda w: _INVALID_LABEL.sub("_", w).strip("_")  # noqa: E731
    return clean(main_word), clean(per_word)


def metric_name(name: str, unit: str, kind: str, add_suffixes: bool, namespace: str = "") -> str:
    """The Prometheus family name. kind: counter, updowncounter (a non-monotonic sum, exposed as a gauge), gauge,
    histogram (memoized: asked once per metric per resource)."""
    key = (name, unit, kind, add_suffixes, namespace)
    hit = _name_memo.get(key)
    if hit is None:
        hit = _remember(_name_memo, key, _metric_name(name, unit, kind, add_suffixes, namespace))
    return hit


def _metric_name(name: str, unit: str, kind: str, add_suffixes: bool, namespace: str) -> str:
    base = sanitize_name(name)
    if add_suffixes:
        if kind == "counter" and base.endswith("_total"):
            base = base[: -len("_total")]
        main, per = unit_words(unit)
        tokens = base.split("_")
        if main and main not in tokens:
            base += "_" + main
        if per and not base.endswith("_per_" + per):
            base += "_per_" + per
        # `_ratio` only for OTel gauges, as the collector's translation: a sum in unit "1" counts things
        if kind == "gauge" and (unit or "").strip() == "1" and "ratio" not in tokens:
            base += "_ratio"
        if kind == "counter":
            base += "_total"
    if namespace:
        base = f"{namespace}_{base}"
    # the spec's "consecutive `_` become one" holds for the whole name: a name ending in `_` followed by a suffix,
    # or a namespace followed by a name that starts with `_` (`_2fast`), would otherwise join with `__`
    return _UNDERSCORES.sub("_", base)


def label_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return float_attribute(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, Iterable):
        # compact and UTF-8, as the collector renders an array attribute (pcommon's AsString), so the same tags
        # make the same label value whichever of the two exposes them
        return "[" + ",".join(map(_array_item, value)) + "]"
    return str(value)


def _array_item(v: Any) -> str:
    if isinstance(v, float) and math.isfinite(v):
        return float_attribute(v)
    return json.dumps(v if isinstance(v, str | int | float | bool) else str(v), ensure_ascii=False)


def float_attribute(v: float) -> str:
    """A double attribute as the collector writes it in a label (pcommon's AsString, JSON's number form): `1` and
    `0.5`, exponents only below 1e-6 and from 1e21 (`1e-7`, `1e+21`), where Python writes `1.0` and `1e-05`."""
    if not math.isfinite(v):
        return "json: unsupported value: " + ("NaN" if math.isnan(v) else "+Inf" if v > 0 else "-Inf")
    a = abs(v)
    if a != 0 and (a < 1e-6 or a >= 1e21):
        text = repr(v)  # shortest digits, exponent form
        mantissa, _, exp = text.partition("e")
        sign, digits = exp[0], exp[1:].lstrip("0") or "0"
        return f"{mantissa}e{sign}{digits}"
    if v == int(v):
        return "-0" if v == 0 and math.copysign(1.0, v) < 0 else str(int(v))
    return format(Decimal(repr(v)), "f")  # the shortest digits, positional


def labels_from(attributes: Mapping[str, Any], into: dict[str, str] | None = None) -> dict[str, str]:
    """Sanitized labels, added over `into`; attributes that collide after sanitizing have their values joined
    with `;` (as the collector does)."""
    out = {} if into is None else into
    seen: set[str] = set()
    for key in sorted(attributes):
        name = sanitize_label(key)
        value = label_value(attributes[key])
        if name in seen:
            out[name] = f"{out[name]};{value}"
        else:
            out[name] = value
            seen.add(name)
    return out


def promoter(patterns: Iterable[str], all_attributes: bool):
    """A predicate on resource attribute keys: glob patterns (`k8s.*`); one starting with `!` excludes."""
    if all_attributes:
        return lambda key: True
    import fnmatch

    include = [re.compile(fnmatch.translate(p)) for p in patterns if not p.startswith("!")]
    exclude = [re.compile(fnmatch.translate(p[1:])) for p in patterns if p.startswith("!")]
    cache: dict[str, bool] = {}

    def promote(key: str) -> bool:
        hit = cache.get(key)
        if hit is None:
            hit = any(r.match(key) for r in include) and not any(r.match(key) for r in exclude)
            if len(cache) < 4096:  # keys are a small, fixed vocabulary; the bound guards against odd input
                cache[key] = hit
        return hit

    return promote


def escape_value(v: str) -> str:
    """A label value escaped for both exposition formats (memoized)."""
    hit = _value_memo.get(v)
    if hit is None:
        hit = v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        # a lone surrogate cannot be encoded as UTF-8: the whole exposition would fail to render (the collector
        # drops a series whose label value is not UTF-8)
        hit = utf8_safe(hit)
        if len(v) <= 256:  # long values are rare and would mostly fill the cache
            _remember(_value_memo, v, hit)
    return hit


def format_value(v: float) -> str:
    return floatToGoString(v)


@dataclass
class Family:
    """One metric family: its name, type and help, and its samples as {series key: formatted value}.

    A sample's exposition line is `<family name><key> <value>`: the key is the rest of its series, e.g.
    `{a="1",b="2"}`, `""` (no labels), or `_bucket{le="1.0"}` in a histogram. It is also the sample's identity in
    the family: a second point with the same key replaces the first (the last point wins; `duplicates` counts
    them). Keys are not built per point: they are the label strings a resource's LabelSet keeps (rendered once
    for as long as the Resource lives), so a batch's samples cost a dict entry and a value each, not a new
    series string each (at 250 pods that was about 6 MiB more at every export, in many small objects).
    """

    name: str
    type: str  # counter | gauge | histogram | unknown
    help: str
    samples: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    # target_info only: promoted labels' key -> the resource's target_info (see add_info)
    infos: dict[str, tuple] | None = None

    def add(self, key: str, value: str) -> None:
        if key in self.samples:
            self.duplicates += 1
        self.samples[key] = value

    def add_info(self, info: tuple[str, tuple[tuple[str, str], ...], str]) -> None:
        """A resource's target_info, `info` = (its promoted labels' key, every label's (name, rendered pair), every
        label's key): one per set of promoted labels, the entity its series are keyed by. Receivers
        describing one container (cgroup, cri, ebpf) may know different things of it (the QoS class, the runtime);
        one target_info each would make `* on (container_id) group_left(...) target_info` many-to-many. Their
        labels are merged instead; where two disagree on a label, the one added later wins."""
        if self.infos is None:
            self.infos = {}
        base = info[0]
        have = self.infos.get(base)
        if have is None:
            self.infos[base] = info  # as rendered once per Resource: the usual case, nothing to merge
        else:
            merged = dict(have[1])
            merged.update(info[1])
            pairs = tuple(sorted(merged.items()))
            self.infos[base] = (base, pairs, _braced(list(pairs)))

    def info_lines(self) -> str:
        return "".join([s for _, _, key in (self.infos or {}).values() for s in (self.name, key, " 1.0\n")])


@dataclass
class Translator:
    namespace: str = ""
    const_labels: Mapping[str, str] = field(default_factory=dict)
    add_suffixes: bool = True
    promote: Any = None  # key -> bool
    target_info: bool = True
    resources: PerResource | None = None  # the exporter's translations per Resource, kept across exports
    # counts of what could not be translated, by cause (read by the exporter for telemetry)
    skipped: dict[str, int] = field(default_factory=dict)

    def _skip(self, cause: str, n: int = 1) -> None:
        self.skipped[cause] = self.skipped.get(cause, 0) + n

    def resource_metrics(self, rm: ResourceMetrics, families: dict[str, Family]) -> None:
        """Translate one ResourceMetrics into `families` (family name -> Family)."""
        cache = self.resources
        hit = cache.get(rm.resource) if cache is not None else None
        if hit is None:
            hit = self._resource(rm.resource)
            if cache is not None:
                cache.put(rm.resource, hit)
        info, rendered = hit
        if info is not None:
            fam = families.get("target_info")
            if fam is None:
                fam = families["target_info"] = Family("target_info", "gauge", "Target metadata")
            fam.add_info(info)
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                self.metric(metric, rendered, families)

    def _resource(self, resource) -> tuple[tuple | None, LabelSet]:
        """(the resource's target_info: its promoted labels' key and all its label pairs, or None; its promoted
        labels rendered once for all its points)."""
        attrs = dict(resource.attributes)
        promoted = {k: v for k, v in attrs.items() if self.promote(k)}
        base = labels_from(promoted)
        for k, v in self.const_labels.items():
            base.setdefault(k, v)
        info = None
        promoted_labels = LabelSet(base)
        if self.target_info and attrs:
            labels = labels_from({k: v for k, v in attrs.items() if k not in promoted})
            labels.update(base)
            every = LabelSet(labels)
            info = (promoted_labels.key, tuple(every.pairs), every.key)
        return info, promoted_labels

    def metric(self, metric: Metric, base: LabelSet, families: dict[str, Family]) -> None:
        data = metric.data
        if isinstance(data, Sum):
            if data.aggregation_temporality == AggregationTemporality.DELTA:
                # Prometheus is cumulative; podmeter's receivers emit cumulative sums.
                self._skip("delta_temporality", len(data.data_points))
                return
            kind = "counter" if data.is_monotonic else "updowncounter"
        elif isinstance(data, Gauge):
            kind = "gauge"
        elif isinstance(data, Histogram):
            if data.aggregation_temporality == AggregationTemporality.DELTA:
                self._skip("delta_temporality", len(data.data_points))
                return
            kind = "histogram"
        else:
            self._skip("unsupported_type", len(getattr(data, "data_points", ())))
            return
        name = metric_name(metric.name, metric.unit or "", kind, self.add_suffixes, self.namespace)
        ftype = "gauge" if kind == "updowncounter" else kind
        if kind == "counter" and not name.endswith("_total"):
            # Both exposition formats tie the counter type to a `_total` sample name; a counter kept under its
            # exact name (add_metric_suffixes: false) is exposed untyped instead of as a malformed counter.
            ftype = "unknown"
        fam = families.get(name)
        if fam is None:
            fam = families[name] = Family(name, ftype, (metric.description or metric.name).strip())
        elif fam.type != ftype:
            self._skip("type_conflict", len(data.data_points))
            return
        if kind == "histogram":
            for point in data.data_points:
                # the point's attributes override resource labels of the same name
                pairs = base.merged(point_pairs(point.attributes)) if point.attributes else base.pairs
                self._histogram(fam, name, pairs, point)
            return
        samples, before = fam.samples, len(fam.samples)
        for point in data.data_points:  # (Family.add, inlined: the loop runs once per point)
            samples[base.key_with(point.attributes) if point.attributes else base.key] = format_value(point.value)
        fam.duplicates += before + len(data.data_points) - len(samples)

    @staticmethod
    def _histogram(fam: Family, name: str, pairs: list[tuple[str, str]], point) -> None:
        add = fam.add
        # `le` is the bucket's bound: an attribute of that name is dropped from every series of the histogram (on
        # `_sum` and `_count` it would break both parsers), and `le` goes in its sorted place among the others
        i = bisect.bisect_left(pairs, "le", key=itemgetter(0))
        if i < len(pairs) and pairs[i][0] == "le":
            pairs = [*pairs[:i], *pairs[i + 1:]]
        body = ",".join([p[1] for p in pairs])
        after = ",".join([p[1] for p in pairs[i:]])
        before = ",".join([p[1] for p in pairs[:i]])
        head = f"_bucket{{{before}{',' if before else ''}le=\""
        tail = f"\"{',' if after else ''}{after}}}"
        cumulative = 0
        bounds = list(point.explicit_bounds)
        counts = list(point.bucket_counts)
        for i, bound in enumerate(bounds):
            cumulative += counts[i] if i < len(counts) else 0
            add(f"{head}{escape_value(_float_str(bound))}{tail}", format_value(cumulative))
        add(f"{head}+Inf{tail}", format_value(point.count))
        add(f"_sum{{{body}}}" if body else "_sum", format_value(point.sum))
        add(f"_count{{{body}}}" if body else "_count", format_value(point.count))


_point_memo: dict[tuple, tuple[tuple[str, str], ...]] = {}


def point_pairs(attributes: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """A point's attributes as sorted (label name, `name="escaped value"`) pairs. Memoized when every value is a
    string (points repeat a few attribute sets, like cpu.mode=user; other types are left out of the memo because
    1, 1.0 and True are equal keys with different renderings)."""
    key = tuple(attributes.items())
    try:
        hit = _point_memo.get(key)  # only all-string keys are stored, and no other key equals one of them
    except TypeError:  # an unhashable value (a list)
        hit = key = None
    if hit is not None:
        return hit
    pairs = tuple(sorted([(k, f'{k}="{escape_value(v)}"') for k, v in labels_from(attributes).items()]))
    if key is not None and all(type(v) is str for _, v in key):
        _remember(_point_memo, key, pairs)
    return pairs


class LabelSet:
    """Labels (names already sanitized) rendered once: (name, `name="escaped value"`) pairs sorted by name, and
    the series key they make (`{a="1",b="2"}`, or "" without labels: see Family). A resource's labels are shared
    by all its points, and the exporter keeps a resource's LabelSet while the Resource lives: the key with each set
    of point attributes is built once, then looked up."""

    __slots__ = ("labels", "pairs", "key", "_keys")
    MAX_KEYS = 256  # point attribute sets per resource are few (cpu modes, devices x directions); a bound anyway

    def __init__(self, labels: Mapping[str, str]) -> None:
        self.labels = labels
        self.pairs = sorted([(k, f'{k}="{escape_value(v)}"') for k, v in labels.items()])
        self.key = _braced(self.pairs)
        self._keys: dict[tuple, str] = {}

    def merged(self, extra: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        """Sorted pairs of these labels with the `extra` pairs added (an extra label replaces one of the same
        name)."""
        names = [k for k, _ in extra]
        if not self.labels.keys().isdisjoint(names):
            pairs = [p for p in self.pairs if p[0] not in names]
        else:
            pairs = self.pairs.copy()
        pairs.extend(extra)
        pairs.sort()
        return pairs

    def key_with(self, attributes: Mapping[str, Any]) -> str:
        """The series key of a point with `attributes` on this resource."""
        extra = point_pairs(attributes)
        key = self._keys.get(extra)
        if key is None:
            key = _braced(self.merged(extra))
            if len(self._keys) < self.MAX_KEYS:
                self._keys[extra] = key
        return key


def _braced(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join([p[1] for p in pairs]) + "}" if pairs else ""


def _float_str(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))
