"""Build podmeter components the way the runtime does (factory from the registry, validated config), for the
synthetic node. A component that is not installed yet, or cannot start here, is reported and skipped."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from podmeter.component import ComponentID, ComponentUnavailable, CreateSettings, Host, registry
from podmeter.telemetry import ComponentTelemetry, Telemetry

LOG = logging.getLogger("bench")


@dataclass
class Built:
    components: dict[str, Any] = field(default_factory=dict)   # type -> started component
    missing: dict[str, str] = field(default_factory=dict)      # type -> why it is not measured
    host: Host = field(default_factory=Host)
    telemetry: Telemetry = field(default_factory=Telemetry)

    def get(self, type_: str):
        return self.components.get(type_)

    def shutdown(self) -> None:
        for comp in reversed(list(self.components.values())):
            try:
                comp.shutdown()
            except Exception as exc:  # noqa: BLE001 - teardown goes on
                LOG.debug("shutdown of %s failed: %s", comp, exc)


def create(built: Built, kind: str, type_: str, cfg: dict, name: str = "") -> Any | None:
    """A component of `type_` (named `type_/name` when name is given) or None, with the reason in built.missing."""
    reg = registry()
    factory = reg.get(kind, type_)
    key = f"{type_}/{name}" if name else type_
    if factory is None:
        built.missing[key] = reg.broken.get((kind, type_), "not installed")
        return None
    logger = logging.getLogger(f"bench.{key}")
    settings = CreateSettings(id=ComponentID(type_, name), kind=kind, logger=logger,
                              telemetry=ComponentTelemetry(built.telemetry, key, logger),
                              pipeline="metrics" if kind == "processor" else "")
    try:
        config = factory.config_model.model_validate(cfg)
        comp = factory.create(settings, config)
    except Exception as exc:  # noqa: BLE001 - a component whose config changed under us is reported, not fatal
        built.missing[key] = f"cannot create: {type(exc).__name__}: {str(exc)[:300]}"
        return None
    return comp


def start_all(built: Built, pending: list[tuple[str, str, Any]]) -> None:
    """Start (kind, type, component) in the runtime's order, exporters, processors, then receivers, so that
    providers are published before anyone looks them up."""
    order = {"exporter": 0, "processor": 1, "receiver": 2}
    for _kind, type_, comp in sorted(pending, key=lambda x: order[x[0]]):
        try:
            comp.start(built.host)
        except ComponentUnavailable as exc:
            built.missing[type_] = f"unavailable: {exc}"
            continue
        except Exception as exc:  # noqa: BLE001
            built.missing[type_] = f"start failed: {type(exc).__name__}: {str(exc)[:300]}"
            continue
        built.components[type_] = comp
