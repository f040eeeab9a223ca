"""Collector-style configuration: load, expand, merge, validate (reporting every problem at once).

Problems are reported as `key::path: message`, the collector's wording, and the CLI exits 2 on any.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from podmeter.component import KINDS, ComponentID, Factory, Kind, registry

# ---------------------------------------------------------------------------------------------------------
# Types components use in their config models

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Go-style durations ("10s", "1m30s", "250ms") to seconds. 0 may be given bare."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected a duration like 10s, 500ms or 1m")
    if isinstance(value, int | float):
        if value == 0:
            return 0.0
        raise ValueError(f"invalid duration {value!r}: a duration needs a unit, like {value}s")
    text = str(value).strip()
    if text.startswith("-"):
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if text == "0":
        return 0.0
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {value!r}: expected a duration like 10s, 500ms or 1m")
    return total


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds, written in config as "10s", "500ms", "1m30s"."""


def _parse_endpoint(value: Any) -> str:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"invalid endpoint {text!r}: expected host:port, like 0.0.0.0:9464 or :9464")
    if not 0 < int(port) < 65536:
        raise ValueError(f"invalid endpoint {text!r}: port {port} is out of range 1-65535")
    return text


Endpoint = Annotated[str, BeforeValidator(_parse_endpoint)]
"""A listen address `host:port` (host may be empty: ":8888")."""


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class ComponentConfig(BaseModel):
    """Base of every component config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ScraperConfig(ComponentConfig):
    """Settings every scraping receiver has, as the collector's scraperhelper."""

    collection_interval: Duration = Field(10.0, gt=0, description="How often to collect")
    initial_delay: Duration = Field(1.0, description="Wait before the first collection")
    timeout: Duration = Field(0.0, description="Deadline of one collection; 0 means the collection interval")


# ---------------------------------------------------------------------------------------------------------
# Service section


class PipelineConfig(ComponentConfig):
    receivers: list[str] = Field(default_factory=list)
    processors: list[str] = Field(default_factory=list)
    exporters: list[str] = Field(default_factory=list)


class TelemetryMetricsConfig(ComponentConfig):
    address: Endpoint = ":8888"
    level: Literal["none", "basic", "normal", "detailed"] = "normal"


class TelemetryLogsConfig(ComponentConfig):
    level: Literal["debug", "info", "warn", "warning", "error"] = "info"
    encoding: Literal["console", "json"] = "console"


class TelemetryConfig(ComponentConfig):
    metrics: TelemetryMetricsConfig = Field(default_factory=TelemetryMetricsConfig)
    logs: TelemetryLogsConfig = Field(default_factory=TelemetryLogsConfig)


class ServiceConfig(ComponentConfig):
    extensions: list[str] = Field(default_factory=list)
    pipelines: dict[str, PipelineConfig] = Field(default_factory=dict)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    shutdown_timeout: Duration = Field(10.0, description="Deadline for flushing exporters on SIGTERM")


# ---------------------------------------------------------------------------------------------------------
# Loading


class ConfigError(Exception):
    """Every problem found in a configuration, each as `key::path: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Config:
    receivers: dict[ComponentID, BaseModel] = field(default_factory=dict)
    processors: dict[ComponentID, BaseModel] = field(default_factory=dict)
    exporters: dict[ComponentID, BaseModel] = field(default_factory=dict)
    extensions: dict[ComponentID, BaseModel] = field(default_factory=dict)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    sources: list[str] = field(default_factory=list)

    def section(self, kind: Kind) -> dict[ComponentID, BaseModel]:
        return getattr(self, kind + "s")


TOP_LEVEL = ("receivers", "processors", "exporters", "extensions", "service", "connectors")
_ENV = re.compile(r"\$\$|\$\{(?:env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def default_config_path() -> str:
    from importlib.resources import files

    return str(files("podmeter") / "pipelines.yaml")


def read_yaml(path: str) -> Any:
    """One file's YAML, or a ConfigError naming the file (and line/column for syntax errors)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if not text.strip():
        raise ConfigError([f"{path}: the file is empty; expected receivers, exporters and service::pipelines"])
    try:
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: YAML syntax error{where}: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML error: {exc}"]) from None
    if doc is None:
        raise ConfigError([f"{path}: the file holds no configuration (only comments?)"])
    if not isinstance(doc, dict):
        raise ConfigError([f"{path}: the top level must be a mapping, not {type(doc).__name__}"])
    return doc


def merge_maps(base: dict, override: Mapping) -> dict:
    """Deep merge like the collector's: maps merge key by key, anything else (lists too) is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_maps(dict(out[key]), value)
        else:
            out[key] = value
    return out


def expand_env(node: Any, path: str, problems: list[str], env: Mapping[str, str]) -> Any:
    """Expand ${env:VAR}, ${env:VAR:-default} and ${VAR} in string values; $$ is a literal $."""
    if isinstance(node, dict):
        return {k: expand_env(v, f"{path}::{k}" if path else str(k), problems, env) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, f"{path}::{i}", problems, env) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not defined and has no default "
                        f"(write ${{env:{name}:-default}} to give one)")
        return ""

    expanded = _ENV.sub(sub, node)
    # A whole-value substitution may be a number or boolean, as in the collector.
    if expanded != node and node != "$$" and _ENV.fullmatch(node):
        try:
            value = yaml.safe_load(expanded)
            if isinstance(value, int | float | bool):
                return value
        except yaml.YAMLError:
            pass
    return expanded


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _pydantic_problems(prefix: str, exc: ValidationError, model: type[BaseModel]) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        key = "::".join([prefix, *loc]) if loc else prefix
        if err["type"] == "extra_forbidden":
            fields = _fields_at(model, loc[:-1])
            problems.append(f"{key}: unknown key{_did_you_mean(loc[-1], fields)}"
                            + (f"; valid keys: {', '.join(sorted(fields))}" if fields else ""))
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        inp = err.get("input")
        if err["type"] not in ("missing",) and not isinstance(inp, dict | list):
            msg += f" (got {inp!r})"
        problems.append(f"{key}: {msg}")
    return problems


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the (nested) model at `loc`, for "did you mean" hints."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        f = current.model_fields.get(part)
        if f is None:
            # a dict[str, Model] or list[Model] level: step into its value type
            return []
        current = _model_of(f.annotation)
        if current is None:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def load(paths: list[str], env: Mapping[str, str] | None = None, strict_refs: bool = True) -> Config:
    """Read, merge, expand and validate config files; raise ConfigError with every problem found."""
    env = os.environ if env is None else env
    raw: dict = {}
    problems: list[str] = []
    for path in paths:
        try:
            raw = merge_maps(raw, read_yaml(path))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    raw = expand_env(raw, "", problems, env)
    config = Config(sources=list(paths))
    reg = registry()

    for key in raw:
        if key not in TOP_LEVEL:
            problems.append(f"{key}: unknown top-level key{_did_you_mean(key, TOP_LEVEL)}; "
                            f"valid keys: {', '.join(TOP_LEVEL[:-1])}")
    if raw.get("connectors"):
        problems.append("connectors: podmeter has no connectors; a pipeline's exporters fan out directly")

    for kind in KINDS:
        section_key = kind + "s"
        section = raw.get(section_key) or {}
        if not isinstance(section, dict):
            problems.append(f"{section_key}: must be a mapping of component id to settings, not {type(section).__name__}")
            continue
        for id_text, settings in section.items():
            path = f"{section_key}::{id_text}"
            cid = ComponentID.parse(str(id_text))
            factory = reg.get(kind, cid.type)
            if not cid.type or "/" in cid.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", cid.type):
                problems.append(f"{path}: invalid component id; expected type or type/name")
                continue
            if factory is None:
                broken = reg.broken.get((kind, cid.type))
                if broken:
                    problems.append(f"{path}: the {kind} type \"{cid.type}\" failed to load: {broken}")
                else:
                    problems.append(f"{path}: unknown {kind} type \"{cid.type}\"{_did_you_mean(cid.type, reg.types(kind))}; "
                                    f"known: {', '.join(reg.types(kind)) or 'none'}")
                continue
            model = validate_component(factory, settings, path, problems)
            if model is not None:
                config.section(kind)[cid] = model

    service_raw = raw.get("service")
    if service_raw is None:
        problems.append("service: missing; it must define at least one pipeline under service::pipelines")
    elif not isinstance(service_raw, dict):
        problems.append(f"service: must be a mapping, not {type(service_raw).__name__}")
    else:
        try:
            config.service = ServiceConfig.model_validate(service_raw)
        except ValidationError as exc:
            problems.extend(_pydantic_problems("service", exc, ServiceConfig))
            config.service = None  # type: ignore[assignment]
    if config.service is not None and service_raw is not None:
        _check_service(config, raw, problems, strict_refs)
    if problems:
        raise ConfigError(problems)
    return config


def validate_component(factory: Factory, settings: Any, path: str, problems: list[str]) -> BaseModel | None:
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        problems.append(f"{path}: settings must be a mapping, not {type(settings).__name__} ({settings!r})")
        return None
    try:
        return factory.config_model.model_validate(settings)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(path, exc, factory.config_model))
        return None


def _check_service(config: Config, raw: dict, problems: list[str], strict_refs: bool) -> None:
    declared = {kind: {str(k) for k in (raw.get(kind + "s") or {})} if isinstance(raw.get(kind + "s"), dict) else set()
                for kind in KINDS}
    for i, ext in enumerate(config.service.extensions):
        if ext not in declared["extension"]:
            problems.append(f"service::extensions::{i}: references extension \"{ext}\" which is not configured"
                            f"{_did_you_mean(ext, declared['extension'])}")
    if not config.service.pipelines:
        problems.append("service::pipelines: no pipelines; define at least one, e.g. metrics")
    for pid, pipeline in config.service.pipelines.items():
        path = f"service::pipelines::{pid}"
        signal = pid.partition("/")[0]
        if signal in ("traces", "logs", "profiles"):
            problems.append(f"{path}: podmeter carries metrics only; a {signal} pipeline is not supported "
                            "(name it metrics or metrics/<name>)")
            continue
        if signal != "metrics":
            problems.append(f"{path}: invalid pipeline id; expected metrics or metrics/<name>")
            continue
        for kind, refs in (("receiver", pipeline.receivers), ("processor", pipeline.processors),
                           ("exporter", pipeline.exporters)):
            if kind != "processor" and not refs:
                problems.append(f"{path}: must have at least one {kind}")
            seen = set()
            for i, ref in enumerate(refs):
                if ref in seen:
                    problems.append(f"{path}::{kind}s::{i}: {kind} \"{ref}\" is listed twice")
                seen.add(ref)
                if ref not in declared[kind]:
                    problems.append(f"{path}: references {kind} \"{ref}\" which is not configured"
                                    f"{_did_you_mean(ref, declared[kind])}")
