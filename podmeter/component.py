"""The component model: factories, base classes and the host that components start in.

Every receiver, processor, exporter and extension type registers a `Factory` through a Python entry point
(`podmeter.receivers`, `podmeter.processors`, `podmeter.exporters`, `podmeter.extensions`); built-ins do it
the same way third parties do. Data flows one way: receiver -> processors (one instance per pipeline) ->
exporters, as opentelemetry-sdk `MetricsData`.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from pydantic import BaseModel

if TYPE_CHECKING:
    from podmeter.metrics import MetricSpec
    from podmeter.telemetry import ComponentTelemetry

Kind = Literal["receiver", "processor", "exporter", "extension"]
KINDS: tuple[Kind, ...] = ("receiver", "processor", "exporter", "extension")
ENTRY_POINT_GROUPS: dict[Kind, str] = {k: f"podmeter.{k}s" for k in KINDS}
# The collector's rules: a type is a letter then letters, digits or _; a name (after /) is 1-1024 characters, none
# of them whitespace (Z), control or other non-characters (C), symbols (S) or /.
_TYPE = re.compile(r"[a-zA-Z][0-9a-zA-Z_]{0,62}")


class Stability(enum.StrEnum):
    DEVELOPMENT = "development"
    ALPHA = "alpha"
    BETA = "beta"
    STABLE = "stable"


class RestartRequired(Exception):
    """Raised from `collect()` when only a new process can recover: the NVIDIA driver was replaced under the agent
    and the library it loaded cannot be swapped. The component is failing (readiness) and the health_check's
    liveness path fails too, so kubelet restarts the agent. Every other error fails readiness only: a restart
    would not bring back a dead socket or a hung device, and would cost every other receiver's data."""


class ComponentUnavailable(Exception):
    """Raised from `start()` when the component cannot run on this host (no GPU, no socket, no privilege).

    The runtime reports it once and runs on without the component, unless started with `--strict`.
    """


@dataclass(frozen=True)
class ComponentID:
    type: str
    name: str = ""

    @classmethod
    def parse(cls, text: str) -> ComponentID:
        """`type` or `type/name` by the collector's rules (nothing is stripped); ValueError says what is wrong."""
        type_, sep, name = text.partition("/")
        if not _TYPE.fullmatch(type_):
            raise ValueError(f"the type {type_!r} must start with a letter and hold only letters, digits and _ "
                             "(at most 63 characters)" if type_ else "the type before / is empty")
        if sep:
            if not name:
                raise ValueError(f"the name after / is empty; write {type_} or {type_}/<name>")
            if len(name) > 1024:
                raise ValueError("the name is longer than 1024 characters")
            bad = next((c for c in name if c == "/" or unicodedata.category(c)[0] in "ZCS"), None)
            if bad is not None:
                raise ValueError(f"the name must not contain {bad!r} (no /, whitespace, control characters or "
                                 "symbols)")
        return cls(type_, name)

    def __str__(self) -> str:
        return f"{self.type}/{self.name}" if self.name else self.type


@dataclass
class CreateSettings:
    """What a factory gets besides its config."""

    id: ComponentID
    kind: Kind
    logger: logging.Logger
    telemetry: ComponentTelemetry
    # For processors: the pipeline this instance belongs to ("metrics", "metrics/gpu").
    pipeline: str = ""


@dataclass(frozen=True)
class Factory:
    kind: Kind
    type: str
    config_model: type[BaseModel]
    create: Callable[[CreateSettings, Any], Any]
    stability: Stability = Stability.ALPHA
    description: str = ""
    # The metrics this component emits: the one source its README's metric table is generated from.
    metrics: tuple[MetricSpec, ...] = ()
    # Resource attributes this component sets on what it emits.
    resource_attributes: tuple[str, ...] = ()


class Host:
    """Shared state between components of one running service (like the collector's `component.Host`).

    Components publish providers under well-known keys at start and look them up lazily when they need
    them, since start order puts receivers last. Keys in use:
      - "container_metadata": objects with `container(container_id) -> dict | None` and
        `pod(pod_uid) -> dict | None`, returning OTel resource attributes (the CRI receiver).
      - "device_assignments": objects with `assignments() -> dict[str, list[dict]]`, device id (GPU UUID or
        MIG device UUID) -> attribute dicts of the pods/containers it is allocated to (podresources).
      - "pod_metadata": objects with `pod(pod_uid) -> dict | None` (k8sattributes' informer cache).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._providers: dict[str, list[Any]] = {}

    def publish(self, key: str, provider: Any) -> None:
        with self._lock:
            self._providers.setdefault(key, []).append(provider)

    def lookup(self, key: str) -> list[Any]:
        with self._lock:
            return list(self._providers.get(key, ()))


class Component:
    """Lifecycle shared by every component. `start` may raise `ComponentUnavailable`."""

    def start(self, host: Host) -> None:  # noqa: B027 - optional hook
        pass

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        pass

    def ready(self, timeout: float) -> bool:
        """Block until the component has what it needs to do useful work (e.g. a first metadata sync)."""
        return True


class Receiver(Component):
    """A scraping receiver: the runtime calls `collect()` every `collection_interval`.

    `collect` must be cheap to call concurrently with nothing else of its own (the runtime never overlaps
    two collections of one receiver) and must not raise for per-item trouble: count it and go on.
    """

    # Event-counting receivers (eBPF) need one interval between start and a meaningful collection;
    # `podmeter collect --once` waits for it.
    counts_events: bool = False

    def collect(self) -> MetricsData:
        raise NotImplementedError


class Processor(Component):
    def process(self, data: MetricsData) -> MetricsData | None:
        """Return the transformed data; None or empty drops the batch."""
        raise NotImplementedError


class Exporter(Component, MetricExporter):
    """podmeter exporters are opentelemetry-sdk `MetricExporter`s, so any SDK exporter works as one.

    `export` is called from the exporter's own worker thread; it may block (the runtime isolates it).
    """

    def __init__(self) -> None:
        MetricExporter.__init__(self)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        raise NotImplementedError

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:  # type: ignore[override]
        pass


class Extension(Component):
    """Extensions run beside pipelines (health_check). `set_status` gets component status changes."""

    def set_status(self, statuses: dict[str, ComponentStatus]) -> None:  # noqa: B027
        pass


@dataclass
class ComponentStatus:
    id: str
    kind: Kind
    state: Literal["starting", "ok", "unavailable", "error", "stopped"] = "starting"
    message: str = ""
    pipelines: list[str] = field(default_factory=list)
    restart: bool = False  # its error is one only a restart recovers from (RestartRequired)


# ---------------------------------------------------------------------------------------------------------
# Registry


@dataclass
class Registry:
    """Factories by kind and type. Entry points are imported when a type is first asked for, so an agent pays
    (in start time and RSS) only for the components its configuration names: importing every one costs tens of
    MiB (`kubernetes` and `grpc` alone are more than half of it)."""

    factories: dict[Kind, dict[str, Factory]] = field(default_factory=lambda: {k: {} for k in KINDS})
    # entry points that failed to load: (kind, type) -> error text. Reported, never fatal.
    broken: dict[tuple[Kind, str], str] = field(default_factory=dict)
    pending: dict[tuple[Kind, str], EntryPoint] = field(default_factory=dict)

    def register(self, factory: Factory) -> None:
        self.factories[factory.kind][factory.type] = factory
        self.pending.pop((factory.kind, factory.type), None)

    def get(self, kind: Kind, type_: str) -> Factory | None:
        factory = self.factories[kind].get(type_)
        if factory is None and (kind, type_) in self.pending:
            with _registry_lock:
                ep = self.pending.pop((kind, type_), None)
                if ep is not None:
                    self._load(kind, ep)
            factory = self.factories[kind].get(type_)
        return factory

    def types(self, kind: Kind) -> list[str]:
        """Every registered type of a kind, loaded or not (a broken one is not listed once it failed)."""
        return sorted(set(self.factories[kind]) | {t for k, t in self.pending if k == kind})

    def load_all(self) -> Registry:
        for kind, type_ in list(self.pending):
            self.get(kind, type_)
        return self

    def _load(self, kind: Kind, ep: EntryPoint) -> None:
        try:
            factory = ep.load()
        except Exception as exc:  # a broken plug-in must not take the agent down
            self.broken[(kind, ep.name)] = f"{type(exc).__name__}: {exc}"
            return
        if not isinstance(factory, Factory) or factory.kind != kind or factory.type != ep.name:
            self.broken[(kind, ep.name)] = f"entry point {ep.value} is not a {kind} Factory named {ep.name}"
            return
        self.factories[kind][ep.name] = factory


_registry: Registry | None = None
_registry_lock = threading.RLock()


def registry() -> Registry:
    """The factories of every installed entry point, each imported on first use."""
    global _registry
    with _registry_lock:
        if _registry is None:
            reg = Registry()
            for kind, group in ENTRY_POINT_GROUPS.items():
                for ep in entry_points(group=group):
                    reg.pending.setdefault((kind, ep.name), ep)
            _registry = reg
        return _registry
