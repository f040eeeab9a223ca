from __future__ import annotations

import logging
import sys

import pytest

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.telemetry import null_component_telemetry


def make_receiver(**config):
    from receivers.cgroup import factory

    settings = CreateSettings(id=ComponentID("cgroup"), kind="receiver", logger=logging.getLogger("test.cgroup"),
                              telemetry=null_component_telemetry("cgroup"))
    receiver = factory.create(settings, factory.config_model.model_validate(config))
    receiver.start(Host())
    return receiver


def points(data) -> list[tuple[dict, str, dict, float]]:
    """(resource attributes, metric name, point attributes, value) for every point."""
    out = []
    for rm in data.resource_metrics:
        res = dict(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    out.append((res, m.name, dict(p.attributes), p.value))
    return out


def value(data, name: str, where: dict, attrs: dict | None = None):
    """The one value of `name` on the resource matching `where` (and point attributes `attrs`), or None."""
    hits = [v for res, n, a, v in points(data)
            if n == name and all(res.get(k) == w for k, w in where.items())
            and all(a.get(k) == x for k, x in (attrs or {}).items())]
    assert len(hits) <= 1, f"{name} {where} {attrs}: {len(hits)} points"
    return hits[0] if hits else None


@pytest.fixture
def receiver_factory():
    return make_receiver


_OPENED: list[str] | None = None


def _hook(event: str, args) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str):
        _OPENED.append(args[0])


sys.addaudithook(_hook)  # once per process (this module is imported once)


def opened_during(fn) -> tuple[object, list[str]]:
    """What fn returns and every path opened meanwhile (os.open and open() both raise the `open` audit event)."""
    global _OPENED
    _OPENED = []
    try:
        out = fn()
        return out, _OPENED
    finally:
        _OPENED = None
