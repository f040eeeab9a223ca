from __future__ import annotations

import logging

import pytest
from harness.validate import validate_cli
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
    ({"key": "a", "value": "v", "action": "hash"}, "takes no value"),
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


# -- configurations copied from the collector (processor/resourceprocessor README, attributesprocessor actions) ---


HASH_EXTRACT_CONVERT = r"""
resource:
  attributes:
    - key: user.email
      action: hash
    - key: http.url
      pattern: ^(?P<http_protocol>.*):\/\/(?P<http_domain>[^/]*)\/(?P<http_path>.*)
      action: extract
    - key: gpu.count
      action: convert
      converted_type: int
    - key: ratio
      action: convert
      converted_type: string
    - pattern: ^k8s\.pod\.label\.
      action: delete
"""


def test_hash_extract_convert_and_delete_by_pattern(tmp_path):
    """The collector's attribute actions hash, extract and convert, and delete by key pattern: they were refused
    ("Input should be 'insert', 'update', 'upsert' or 'delete'")."""
    import hashlib

    import yaml

    rc, err = validate_cli(tmp_path, HASH_EXTRACT_CONVERT)
    assert rc == 0, err
    p = make(yaml.safe_load(HASH_EXTRACT_CONVERT)["resource"]["attributes"])
    got = run(p, {"user.email": "a@b.c", "http.url": "https://example.com/a/b", "gpu.count": "8",
                  "ratio": 1e21, "k8s.pod.label.app": "x", "k8s.pod.label.tier": "y", "k8s.pod.name": "p"})
    assert got == {"user.email": hashlib.sha256(b"a@b.c").hexdigest(), "http.url": "https://example.com/a/b",
                   "http_protocol": "https", "http_domain": "example.com", "http_path": "a/b", "gpu.count": 8,
                   "ratio": "1e+21", "k8s.pod.name": "p"}


def test_hash_and_convert_follow_the_collector_per_type():
    import hashlib
    import struct

    p = make([{"key": k, "action": "hash"} for k in ("i", "b", "f")])
    got = run(p, {"i": 5, "b": True, "f": 0.5})
    assert got == {"i": hashlib.sha256(struct.pack("<q", 5)).hexdigest(), "b": hashlib.sha256(b"\x01").hexdigest(),
                   "f": hashlib.sha256(struct.pack("<d", 0.5)).hexdigest()}
    p = make([{"key": k, "action": "convert", "converted_type": t}
              for k, t in (("a", "int"), ("b", "int"), ("c", "int"), ("d", "double"), ("e", "double"),
                           ("f", "string"), ("g", "string"), ("h", "int"))])
    got = run(p, {"a": -2.9, "b": "1.5", "c": True, "d": 3, "e": "x", "f": False, "g": 7, "h": "+42"})
    assert got == {"a": -2, "b": "1.5", "c": 1, "d": 3.0, "e": "x", "f": "false", "g": "7", "h": 42}


def test_convert_to_string_writes_values_as_the_collectors_as_string():
    """convert to string is pcommon's Value.AsString: a double in encoding/json's form (1, not 1.0; 1e+21; 1e-7),
    an array as compact UTF-8 JSON (["a","b"], with <, > and & escaped). A double beyond int64 converted to int
    stays a double: a Python int out of range made the OTLP encoder log a traceback and drop the attribute."""
    keys = ("one", "big", "small", "half", "tags", "nums", "inf")
    p = make([{"key": k, "action": "convert", "converted_type": "string"} for k in keys]
             + [{"key": "huge", "action": "convert", "converted_type": "int"}])
    got = run(p, {"one": 1.0, "big": 1e21, "small": 1.5e-7, "half": -0.5, "tags": ["v1", "ünï", "a<b&c"],
                  "nums": [1.0, 2, True], "inf": float("inf"), "huge": 1e19})
    assert got == {"one": "1", "big": "1e+21", "small": "1.5e-7", "half": "-0.5",
                   "tags": '["v1","ünï","a\\u003cb\\u0026c"]', "nums": "[1,2,true]",
                   "inf": "json: unsupported value: +Inf", "huge": 1e19}


@pytest.mark.parametrize("bad, message", [
    ({"key": "a", "action": "extract", "pattern": "(?P<x>.)(.)"}, "every group of pattern must be named"),
    ({"key": "a", "action": "extract"}, "needs pattern"),
    ({"key": "a", "action": "convert"}, "needs converted_type"),
    ({"key": "a", "action": "convert", "converted_type": "float"}, "Input should be"),
    ({"key": "a", "value": "v", "action": "upsert", "pattern": "x"}, "takes no pattern"),
    ({"key": "a", "action": "delete", "converted_type": "int"}, "takes no converted_type"),
    ({"action": "delete"}, "needs key or pattern"),
    ({"action": "hash", "pattern": "("}, "not a valid regular expression"),
    ({"key": "a", "action": "insert", "from_context": "metadata.tenant"}, "no client context"),
])
def test_invalid_collector_actions(bad, message):
    with pytest.raises(ValidationError, match=message):
        factory.config_model.model_validate({"attributes": [bad]})
