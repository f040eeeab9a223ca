from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.config import ConfigError, load
from podmeter.metrics import MetricsBuilder, MetricSpec
from podmeter.telemetry import null_component_telemetry
from processors.resource import factory

SPEC = MetricSpec("k8s.pod.cpu.time", "sum", "s", "test")


def make(attributes):
    settings = CreateSettings(id=ComponentID("resource"), kind="processor", logger=logging.getLogger("t"),
                              telemetry=null_component_telemetry("resource"))
    p = factory.create(settings, factory.config_model.model_validate({"attributes": attributes}))
    p.start(Host())
    return p


def run(p, resource):
    b = MetricsBuilder("podmeter/receiver/test", 1)
    b.add(SPEC, 1.0, resource=resource)
    (rm,) = p.process(b.build()).resource_metrics
    return dict(rm.resource.attributes)


def test_actions():
    p = make([
        {"key": "k8s.cluster.name", "value": "prod", "action": "insert"},
        {"key": "env", "value": "x", "action": "insert"},  # present: unchanged
        {"key": "team", "value": "t2", "action": "update"},
        {"key": "absent", "value": "v", "action": "update"},  # absent: not added
        {"key": "region", "value": "eu", "action": "upsert"},
        {"key": "pod", "from_attribute": "k8s.pod.name", "action": "upsert"},
        {"key": "secret", "action": "delete"},
        {"key": "replicas", "value": 3, "action": "insert"},
    ])
    got = run(p, {"k8s.pod.name": "p", "env": "dev", "team": "t1", "secret": "s", "region": "us"})
    assert got == {"k8s.pod.name": "p", "env": "dev", "team": "t2", "region": "eu", "pod": "p",
                   "k8s.cluster.name": "prod", "replicas": 3}


@pytest.mark.parametrize("bad, message", [
    ({"key": "a", "action": "insert"}, "exactly one of value or from_attribute"),
    ({"key": "a", "value": "v", "from_attribute": "b", "action": "upsert"}, "exactly one"),
    ({"key": "a", "value": "v", "action": "delete"}, "takes no value"),
    ({"key": "a", "value": "v", "action": "hash"}, "Input should be"),
])
def test_invalid_config(bad, message):
    with pytest.raises(ValidationError, match=message):
        factory.config_model.model_validate({"attributes": [bad]})


def test_config_errors_through_loader(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("""
receivers: {cgroup: {}}
processors:
  resource:
    attributes:
      - {key: k8s.cluster.name, action: upsert}
exporters: {debug: {}}
service: {pipelines: {metrics: {receivers: [cgroup], processors: [resource], exporters: [debug]}}}
""")
    with pytest.raises(ConfigError) as err:
        load([str(f)])
    assert any(p.startswith("processors::resource::attributes::0") and "exactly one" in p for p in err.value.problems)


def test_same_resource_in_gives_same_resource_out():
    """Receivers and k8sattributes pass one Resource object on while nothing changed, and exporters keep their
    per-resource work by that object: the processor hands back one Resource per input Resource, not a new one per
    batch, and holds it no longer than the input lives."""
    import gc

    from opentelemetry.sdk.resources import Resource

    p = make([{"key": "k8s.cluster.name", "value": "prod", "action": "upsert"}])
    kept = Resource({"k8s.pod.uid": "u1"})

    def batch(resource):
        b = MetricsBuilder("podmeter/receiver/test", 1)
        b.adder(resource)(SPEC, 1.0)
        return b.build()

    (first,), (second,) = p.process(batch(kept)).resource_metrics, p.process(batch(kept)).resource_metrics
    assert first.resource is second.resource
    assert dict(first.resource.attributes) == {"k8s.pod.uid": "u1", "k8s.cluster.name": "prod"}
    assert dict(kept.attributes) == {"k8s.pod.uid": "u1"}  # the input is never changed
    del kept, first, second
    gc.collect()
    assert len(p._made) == 0
