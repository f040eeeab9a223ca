"""Collector-style configuration: load, expand, merge, validate (reporting every problem at once).

Problems are reported as `key::path: message`, the collector's wording, and the CLI exits 2 on any.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
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

# ASCII digits only: \d would take other scripts' digits ("١٠s"). Microseconds as Go writes them: us, µs (U+00B5), μs (U+03BC).
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_DURATION = 87600 * 3600.0
"""The longest duration a config may give: 87600h (10 years). Longer ones overflow timers at run time."""


def parse_duration(value: Any) -> float:
    """Go-style durations ("10s", "1m30s", "250ms") to seconds, at most MAX_DURATION. 0 may be given bare."""
    shown = _shorten(repr(value))
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {shown}: expected a duration like 10s, 500ms or 1m")
    if isinstance(value, int | float):
        if value == 0:
            return 0.0
        raise ValueError(f"invalid duration {shown}: a duration needs a unit, like {value}s")
    text = str(value).strip()
    if text.startswith("-"):
        raise ValueError(f"invalid duration {shown}: must not be negative")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if text == "0":
        return 0.0
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {shown}: expected a duration like 10s, 500ms or 1m")
    if not math.isfinite(total) or total > MAX_DURATION:
        raise ValueError(f"invalid duration {shown}: longer than the maximum, 87600h (10 years)")
    return total


def format_duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds, written in config as "10s", "500ms", "1m30s"; at most 87600h (10 years)."""


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _host_problem(host: str) -> str | None:
    """Why `host` is not empty, an RFC 1123 hostname, an IPv4 address or a bracketed IPv6 address; None if it is."""
    if not host:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host} is not an IPv6 address"
        return None
    if ":" in host or "[" in host or "]" in host:
        return "an IPv6 host must be in brackets, like [::1]:9464"
    labels = host.split(".")
    if all(label.isascii() and label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"host {host!r} is not an IPv4 address"
        return None
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return f"host {host!r} is not a hostname, an IPv4 address or a bracketed IPv6 address"
    return None


def _parse_endpoint(value: Any) -> str:
    text = str(value).strip()
    if "://" in text:
        raise ValueError(f"invalid endpoint {text!r}: a listen address has no scheme; drop "
                         f"{text.partition('://')[0]}://, like 127.0.0.1:9464")
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ValueError(f"invalid endpoint {text!r}: expected host:port, like 0.0.0.0:9464 or :9464")
    if not 0 < int(port) < 65536:
        raise ValueError(f"invalid endpoint {text!r}: port {port} is out of range 1-65535")
    problem = _host_problem(host)
    if problem:
        raise ValueError(f"invalid endpoint {text!r}: {problem}")
    return text


Endpoint = Annotated[str, BeforeValidator(_parse_endpoint)]
"""A listen address `host:port`: host is empty (":8888"), a hostname, an IPv4 address or [an IPv6 address]. Empty
and `0.0.0.0` listen on IPv4 and IPv6 (podmeter.httpserve), as the collector's listeners do."""


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


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class TelemetryLogsConfig(ComponentConfig):
    # any case, as the collector's (zap's) levels: collector configs write INFO and WARN as often as info and warn
    level: Annotated[Literal["debug", "info", "warn", "warning", "error"], BeforeValidator(_lower)] = "info"
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
MAX_DEPTH = 128
"""The deepest nesting a config file may have (real ones stay under ten); deeper is a ConfigError, not a crash."""
MAX_VALUES = 1_000_000
"""The most values a config file may hold once YAML aliases are expanded: a few lines of aliases can hold billions."""
_MERGE_TAG = "tag:yaml.org,2002:merge"


def default_config_path() -> str:
    from importlib.resources import files

    return str(files("podmeter") / "pipelines.yaml")


class _TooDeep(yaml.MarkedYAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader that bounds nesting: the composer recurses, so a deep document would be a RecursionError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(problem=f"the document nests deeper than {MAX_DEPTH} levels",
                               problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# Plain scalars resolved as the collector's YAML library (go-yaml v3) does, not by YAML 1.1's wider rules: `on`, `off`,
# `yes`, `no` (and `NO`, Norway's country code) are strings, not booleans; `12:30` is a string, not the sexagesimal
# 750; `2024-01-01` is a string, not a date. A value typed on the collector came out differently here, silently where
# the field takes several types (a resource attribute's `value: on` became the boolean true). Fields that want a bool
# still take "on" or "yes": pydantic converts them.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float", "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _duplicate_keys(root: yaml.Node, name: str) -> list[str]:
    """Keys given twice in one mapping, as problems: the collector rejects them, PyYAML would keep the last."""
    problems: list[str] = []
    seen: set[int] = set()  # aliased nodes are walked once

    def walk(node: yaml.Node, path: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if key.tag == _MERGE_TAG:  # `<<: *anchor`: its keys may be overridden here
                    walk(value, path)
                    continue
                text = key.value if isinstance(key, yaml.ScalarNode) else "?"
                child = f"{path}::{text}" if path else text
                if isinstance(key, yaml.ScalarNode):
                    line = key.start_mark.line + 1
                    if (key.tag, key.value) in first:
                        problems.append(f"{child}: duplicate key in {name} at line {line} "
                                        f"(first at line {first[key.tag, key.value]}); a key may appear only once")
                    first.setdefault((key.tag, key.value), line)
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}::{i}" if path else str(i))

    walk(root, "")
    return problems


def _parse_yaml(text: str, name: str) -> Any:
    """One YAML document. Raises yaml.YAMLError, or ConfigError for duplicate keys."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicates = _duplicate_keys(node, name)
        if duplicates:
            raise ConfigError(duplicates)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expanded_size(doc: Any, name: str, base: str = "") -> None:
    """Refuse a document that contains itself or is too large with its aliases expanded, before anything copies it.

    Sizes are memoized per shared list or mapping, so an alias bomb is measured without being expanded.
    """
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: dict | list, path: str) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise ConfigError([f"{path}: contains itself (a YAML alias to an enclosing anchor) in {name}"])
        open_.add(id(node))
        total = 1
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            total += size(v, f"{path}::{k}" if path else str(k)) if isinstance(v, dict | list) else 1
            if total > MAX_VALUES:
                raise ConfigError([f"{name}: the document is too large after expanding YAML aliases "
                                   f"(more than {MAX_VALUES:,} values)"])
        open_.discard(id(node))
        sizes[id(node)] = total
        return total

    if isinstance(doc, dict | list):
        size(doc, base)


MAX_CONFIG_BYTES = 16 << 20  # a collector config is kilobytes; the largest seen in the wild is well under 1 MiB


def read_yaml(path: str) -> Any:
    """One file's YAML, or a ConfigError naming the file (and line/column for syntax errors)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # bounded: `--config /dev/zero` must not take all memory
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; is this the configuration file?"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}: not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}); "
                           "save the file as UTF-8"]) from None
    return _document(text, path)


def read_source(source: str, env: Mapping[str, str]) -> Any:
    """One `--config` value, as the collector takes them: a file path, `file:PATH`, `env:VAR` (the YAML held by an
    environment variable) or `yaml:...` (inline YAML whose keys may be `::` paths: `yaml:exporters::debug::
    verbosity: detailed`)."""
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in ("file", "env", "yaml"):
        return read_yaml(source)
    if not rest.strip():
        raise ConfigError([f"{source}: nothing after {scheme}: (expected {_SOURCE_FORMS[scheme]})"])
    if scheme == "file":
        return read_yaml(rest)
    if scheme == "env":
        if rest not in env:
            raise ConfigError([f"{source}: the environment variable {rest} is not set"])
        return _document(env[rest], source)
    return _nest_key_paths(_document(rest, source))


_SOURCE_FORMS = {"file": "file:/path/to/config.yaml", "env": "env:VARIABLE", "yaml": "yaml:key::path: value"}


def _nest_key_paths(doc: dict) -> dict:
    """`a::b::c: v` as {a: {b: {c: v}}} (the collector's confmap key delimiter), merged with the keys around it."""
    out: dict = {}
    for key, value in doc.items():
        value = _nest_key_paths(value) if isinstance(value, dict) else value
        parts = key.split("::") if isinstance(key, str) else [key]
        for part in reversed(parts[1:]):
            value = {part: value}
        out = merge_maps(out, {parts[0]: value})
    return out


def _document(text: str, path: str) -> dict:
    """A configuration document's text as a mapping, or a ConfigError naming where it came from."""
    if not text.strip():
        raise ConfigError([f"{path}: the file is empty; expected receivers, exporters and service::pipelines"])
    try:
        doc = _parse_yaml(text, path)
    except _TooDeep as exc:
        mark = exc.problem_mark
        raise ConfigError([f"{path}: at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: YAML syntax error{where}: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML error: {exc}"]) from None
    except RecursionError:  # e.g. a merge key `<<` that refers to its own mapping
        raise ConfigError([f"{path}: the document refers to itself or nests too deeply to read"]) from None
    if doc is None:
        raise ConfigError([f"{path}: the file holds no configuration (only comments?)"])
    if not isinstance(doc, dict):
        raise ConfigError([f"{path}: the top level must be a mapping, not {type(doc).__name__}"])
    _check_expanded_size(doc, path)
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


_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(?!-)")


class _BadReference(ValueError):
    pass


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _closing_brace(text: str, start: int) -> int:
    """Index of the `}` closing the `${` at `start` (a default may hold references: they nest), or -1."""
    depth, i = 0, start
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
        elif text.startswith("${", i):
            depth += 1
            i += 2
        else:
            if text[i] == "}":
                depth -= 1
                if depth == 0:
                    return i
            i += 1
    return -1


def _expand_text(text: str, env: Mapping[str, str], undefined: list[str]) -> str:
    """`text` with $$ and every reference expanded; names of undefined variables go to `undefined`."""
    out, i = [], 0
    while (j := text.find("$", i)) >= 0:
        out.append(text[i:j])
        if text.startswith("$$", j):
            out.append("$")
            i = j + 2
        elif text.startswith("${", j):
            end = _closing_brace(text, j)
            if end < 0:
                raise _BadReference(f"invalid reference {_shorten(text[j:])}: it has no closing }}")
            out.append(_resolve(text[j:end + 1], env, undefined))
            i = end + 1
        else:  # a lone $ ("$1", "$HOME", "x$") is literal, as in the collector
            out.append("$")
            i = j + 1
    out.append(text[i:])
    return "".join(out)


def _resolve(ref: str, env: Mapping[str, str], undefined: list[str]) -> str:
    """The value of one `${...}`: ${env:NAME}, ${env:NAME:-default} or ${NAME} (env is the default scheme)."""
    inner = ref[2:-1]
    shown = _shorten(ref)
    if inner.startswith("env:"):
        body = inner[4:]
    elif scheme := _SCHEME.match(inner):
        raise _BadReference(f"invalid reference {shown}: unsupported scheme \"{scheme.group(1)}\"; podmeter "
                            "supports env only: ${env:NAME} or ${env:NAME:-default}")
    else:
        body = inner
    name = m.group(0) if (m := _VAR_NAME.match(body)) else ""
    rest = body[len(name):]
    if not name or rest and not rest.startswith(":-"):
        if name and rest.startswith(":"):
            why = f"write a default as ${{env:{name}:-default}}"
        elif not body:
            why = "it names no variable"
        else:
            why = f"{_shorten(body, 40)!r} is not a variable name (letters, digits and _, not starting with a digit)"
        raise _BadReference(f"invalid reference {shown}: {why}")
    if not rest:
        if name in env:
            return env[name]
        undefined.append(name)
        return ""
    # the default is checked even when the variable is set, so a mistake in it does not wait for that to change
    default_undefined: list[str] = []
    default = _expand_text(rest[2:], env, default_undefined)
    if name in env:
        return env[name]
    undefined.extend(default_undefined)
    return default


def _structured(text: str, path: str, problems: list[str]) -> Any:
    """A whole-value reference whose text is a YAML list or mapping (flow, or block on several lines) becomes that
    structure, as in the collector. Anything else stays a string: "0755" or "1:30" must not turn into numbers, and
    pydantic converts "10", "0.5" or "true" itself where a field wants a number or boolean."""
    if not (text.lstrip().startswith(("[", "{")) or "\n" in text.strip()):
        return text
    try:
        value = _parse_yaml(text, f"the value of {path}")
    except (yaml.YAMLError, ConfigError, RecursionError):
        return text
    if not isinstance(value, dict | list):
        return text
    try:
        _check_expanded_size(value, f"the value of {path}", path)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return text
    return value


def expand_env(node: Any, path: str, problems: list[str], env: Mapping[str, str]) -> Any:
    """Expand ${env:NAME}, ${env:NAME:-default} and ${NAME} in string values; $$ is a literal $.

    A default may hold references. Any other `${` is a problem at its key path.
    """
    if isinstance(node, dict):
        return {k: expand_env(v, f"{path}::{k}" if path else str(k), problems, env) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, f"{path}::{i}", problems, env) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node
    undefined: list[str] = []
    try:
        expanded = _expand_text(node, env, undefined)
    except _BadReference as exc:
        problems.append(f"{path}: {exc} (write $$ for a literal $)")
        return node
    for name in undefined:
        problems.append(f"{path}: environment variable {name} is not defined and has no default "
                        f"(write ${{env:{name}:-default}} to give one)")
    if node.startswith("${") and _closing_brace(node, 0) == len(node) - 1:
        return _structured(expanded, path, problems)
    return expanded


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


# How pydantic tags the branches of a union in an error's location: "str", "int", "list[str]", ... or the name of a
# model class (told apart from a user's mapping key by being one of the config's own models)
_UNION_TAG = re.compile(r"str|int|float|bool|none|bytes|[a-z][a-z-]*\[.*\]", re.S)
_TAG_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "none": "null",
              "bytes": "string"}


def _tag_name(tag: str) -> str:
    """What a union branch's tag means to someone writing YAML."""
    if tag in _TAG_NAMES:
        return _TAG_NAMES[tag]
    if "parse_duration" in tag:
        return "duration"
    if tag.startswith("literal["):
        return tag[len("literal["):-1].replace(",", ", ")
    if tag.startswith(("list[", "set[", "tuple[", "frozenset[")):
        return "list"
    if tag.startswith("dict[") or tag[:1].isupper():
        return "mapping"
    if tag.startswith(("function-", "constrained-", "nullable[")):  # function-after[check(), str]: its type
        inner = tag[tag.find("[") + 1:-1].rsplit(", ", 1)[-1]
        return _tag_name(inner) if inner != tag else tag
    return tag


def _union_tag_at(loc: tuple, models: set[str]) -> int | None:
    for i, part in enumerate(loc):
        if isinstance(part, str) and (_UNION_TAG.fullmatch(part) or part in models):
            return i
    return None


def _model_names(model: type[BaseModel]) -> set[str]:
    """Names of the model classes a config model holds, itself included."""
    names: set[str] = set()
    todo: list[Any] = [model]
    while todo:
        annotation = todo.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation.__name__ not in names:
                names.add(annotation.__name__)
                todo.extend(f.annotation for f in annotation.model_fields.values())
        else:
            todo.extend(getattr(annotation, "__args__", ()) or ())
    return names


def _got(inp: Any) -> str:
    text = repr(inp)
    return f" (got {text if len(text) <= 80 else text[:77] + '...'})"


def _pydantic_problems(prefix: str, exc: ValidationError, model: type[BaseModel]) -> list[str]:
    errors = exc.errors(include_url=False)
    models = _model_names(model)
    # Errors of a union's branches share the location up to the branch tag; several tags at one location (with the
    # same input) are one union: report it once, not once per branch at paths like `value::str` that do not exist.
    branches: dict[tuple, list[tuple[int, dict]]] = {}
    for err in errors:
        i = _union_tag_at(err["loc"], models)
        if i is not None:
            branches.setdefault(tuple(err["loc"][:i]), []).append((i, err))
    unions = {}
    for at, group in branches.items():
        tags = {err["loc"][i] for i, err in group}
        shallow = [err for i, err in group if len(err["loc"]) == i + 1]
        if len(tags) > 1 and all(err["input"] is shallow[0]["input"] for err in shallow):
            unions[at] = group
    problems: list[str] = []
    reported: set[tuple] = set()
    for err in errors:
        i = _union_tag_at(err["loc"], models)
        at = tuple(err["loc"][:i]) if i is not None else None
        if at not in unions:
            problems.extend(_pydantic_problem(prefix, err, model))
            continue
        if at in reported:  # with the first error of its union
            continue
        reported.add(at)
        group = unions[at]
        deep = [(i, err) for i, err in group if len(err["loc"]) > i + 1]
        if deep:  # the input had the shape of a branch (a mapping for a model): what is wrong inside it
            for i, err in deep:
                problems.extend(_pydantic_problem(prefix, {**err, "loc": err["loc"][:i] + err["loc"][i + 1:]}, model))
            continue
        names = list(dict.fromkeys(_tag_name(err["loc"][i]) for i, err in group))
        key = "::".join([prefix, *map(str, at)])
        inp = group[0][1]["input"]
        problems.append(f"{key}: expected one of {', '.join(names)}" + ("" if isinstance(inp, dict | list) else _got(inp)))
    return problems


def _pydantic_problem(prefix: str, err: Any, model: type[BaseModel]) -> list[str]:
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"]
    if loc and loc[-1] == "[key]":  # a mapping's key, not a key path element
        loc = loc[:-1]
        if err["type"] == "string_type":
            msg = "keys must be strings"
    key = "::".join([prefix, *loc]) if loc else prefix
    if err["type"] == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        return [f"{key}: unknown key{_did_you_mean(loc[-1], fields)}"
                + (f"; valid keys: {', '.join(sorted(fields))}" if fields else "")]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    inp = err.get("input")
    if err["type"] not in ("missing",) and not isinstance(inp, dict | list):
        msg += _got(inp)
    return [f"{key}: {msg}"]


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
            raw = merge_maps(raw, read_source(path, env))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    try:
        raw = expand_env(raw, "", problems, env)
    except RecursionError:  # not expected below MAX_DEPTH, but never a traceback
        raise ConfigError([f"{', '.join(paths)}: the configuration nests too deeply to expand"]) from None
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
        section = raw.get(section_key)
        if section is None:  # `exporters:` with nothing under it
            continue
        if not isinstance(section, dict):
            problems.append(f"{section_key}: must be a mapping of component id to settings, not "
                            f"{type(section).__name__} ({_shorten(repr(section))})")
            continue
        for id_text, settings in section.items():
            path = f"{section_key}::{id_text}"
            if not isinstance(id_text, str):
                problems.append(f"{path}: invalid component id: must be a string like type or type/name, "
                                f"not {type(id_text).__name__}")
                continue
            try:
                cid = ComponentID.parse(id_text)
            except ValueError as exc:
                problems.append(f"{path}: invalid component id: {exc}")
                continue
            factory = reg.get(kind, cid.type)
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
        else:
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
    except Exception as exc:  # a validator that raised something else (OverflowError, RecursionError): still bad input
        problems.append(f"{path}: invalid settings: {type(exc).__name__}: {_shorten(str(exc), 200)}")
    return None


def _check_service(config: Config, raw: dict, problems: list[str], strict_refs: bool) -> None:
    declared = {kind: {str(k) for k in (raw.get(kind + "s") or {})} if isinstance(raw.get(kind + "s"), dict) else set()
                for kind in KINDS}
    seen_ext: set[str] = set()
    for i, ext in enumerate(config.service.extensions):
        if ext in seen_ext:
            problems.append(f"service::extensions::{i}: extension \"{ext}\" is listed twice")
        seen_ext.add(ext)
        if ext not in declared["extension"]:
            problems.append(f"service::extensions::{i}: references extension \"{ext}\" which is not configured"
                            f"{_did_you_mean(ext, declared['extension'])}")
    if not config.service.pipelines:
        problems.append("service::pipelines: no pipelines; define at least one, e.g. metrics")
    for pid, pipeline in config.service.pipelines.items():
        path = f"service::pipelines::{pid}"
        try:
            signal = ComponentID.parse(pid).type
        except ValueError as exc:
            problems.append(f"{path}: invalid pipeline id: {exc}")
            continue
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
                    problems.append(f"{path}::{kind}s::{i}: references {kind} \"{ref}\" which is not configured"
                                    f"{_did_you_mean(ref, declared[kind])}")
