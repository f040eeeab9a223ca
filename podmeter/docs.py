"""Generates the config and metrics tables in each component's README from its factory (one source of truth).

    python -m podmeter.docs          rewrite the generated blocks
    python -m podmeter.docs --check  exit 1 listing READMEs whose blocks are stale
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from podmeter.component import KINDS, Factory, registry
from podmeter.metrics import MetricSpec, metrics_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"(<!-- generated:(config|metrics) -->\n).*?(<!-- end:\2 -->)", re.S)


def _default(field) -> str:
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "-"
        if isinstance(value, BaseModel):
            return "(see below)"
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, float) and _is_duration(field):
        from podmeter.config import format_duration

        return f"`{format_duration(value)}`"
    return f"`{value!r}`" if not isinstance(value, str) else f'`"{value}"`' if value else '`""`'


def _is_duration(field) -> bool:
    from podmeter.config import parse_duration

    return any(getattr(m, "func", None) is parse_duration for m in field.metadata)


def _nested_model(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def config_rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_model(field.annotation)
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        if nested is not None and field.default_factory is not None:
            rows.append(f"| `{key}` | | {description} |")
            rows.extend(config_rows(nested, key + "."))
        else:
            rows.append(f"| `{key}` | {_default(field)} | {description} |")
    return rows


def config_table(model: type[BaseModel]) -> str:
    rows = config_rows(model)
    if not rows:
        return "No settings."
    return "\n".join(["| key | default | description |", "| --- | --- | --- |", *rows])


def prometheus_name(spec: MetricSpec) -> str:
    """The metric's family name on the prometheus exporter with its default settings (suffixes added, no namespace);
    a histogram's series add `_bucket`, `_sum` and `_count` to it."""
    from exporters.prometheus.translate import metric_name

    kind = "counter" if spec.instrument == "sum" else spec.instrument
    return metric_name(spec.name, spec.unit, kind, True)


def readme_path(factory: Factory) -> str:
    module = importlib.import_module(factory.create.__module__)
    folder = os.path.dirname(module.__file__)
    return os.path.join(folder, "README.md")


def render(factory: Factory, text: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(2) == "config":
            body = config_table(factory.config_model)
        else:
            body = (metrics_table(factory.metrics, prometheus_name) if factory.metrics
                    else "This component emits no metrics of its own.")
            if factory.resource_attributes:
                body += "\n\nResource attributes: " + ", ".join(f"`{a}`" for a in factory.resource_attributes) + "."
        return f"{m.group(1)}{body}\n{m.group(3)}"

    return BLOCK.sub(sub, text)


def run(check: bool) -> int:
    stale = []
    seen = set()
    reg = registry().load_all()
    for kind in KINDS:
        for type_ in reg.types(kind):
            factory = reg.get(kind, type_)
            path = readme_path(factory)
            if path in seen or not os.path.exists(path) or not path.startswith(ROOT):
                continue
            # several factories may share a README (otlp and otlphttp): render each in turn
            seen.add(path)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            new = render(factory, text)
            if new != text:
                stale.append(path)
                if not check:
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(new)
    if check and stale:
        print("stale generated README blocks (run `make docs`):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    for path in stale if not check else ():
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    sys.exit(run("--check" in sys.argv[1:]))
