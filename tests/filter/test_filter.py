from __future__ import annotations

import logging

import pytest
from pydantic import ValidationError

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.metrics import MetricsBuilder, MetricSpec
from podmeter.telemetry import null_component_telemetry
from processors.filter import factory

CPU = MetricSpec("container.cpu.time", "sum", "s", "t")
MEM = MetricSpec("container.memory.usage", "updowncounter", "By", "t")
GPU = MetricSpec("hw.gpu.utilization", "gauge", "1", "t")


class PodMetadata:
    """A "pod_metadata" provider with fixed content (the k8sattributes informer's interface, tested against the
    API stand-in in tests/k8sattributes)."""

    def __init__(self, pods):
        self.pods = pods

    def pod(self, uid):
        p = self.pods.get(uid)
        return {"k8s.namespace.name": p[0]} if p else None

    def pod_labels(self, uid):
        p = self.pods.get(uid)
        return p[1] if p else None


def make(metrics, pods=None):
    settings = CreateSettings(id=ComponentID("filter"), kind="processor", logger=logging.getLogger("t"),
                              telemetry=null_component_telemetry("filter"))
    p = factory.create(settings, factory.config_model.model_validate({"metrics": metrics}))
    host = Host()
    host.publish("pod_metadata", PodMetadata(pods or {}))
    p.start(host)
    return p


def data():
    b = MetricsBuilder("podmeter/receiver/test", 1)
    for uid, ns in (("u-train", "ml"), ("u-web", "web")):
        b.add(CPU, 1.0, resource={"k8s.pod.uid": uid, "k8s.namespace.name": ns})
        b.add(MEM, 1.0, resource={"k8s.pod.uid": uid, "k8s.namespace.name": ns})
    b.add(CPU, 1.0, resource={"k8s.pod.uid": "u-nons"})  # namespace only through pod_metadata
    b.add(GPU, 1.0, resource={"hw.id": "GPU-0"})  # not a pod
    return b.build()


def kept(out):
    if out is None:
        return set()
    return {(rm.resource.attributes.get("k8s.pod.uid") or rm.resource.attributes.get("hw.id"), m.name)
            for rm in out.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


PODS = {"u-train": ("ml", {"app": "trainer", "tier": "gpu"}), "u-web": ("web", {"app": "web"}),
        "u-nons": ("ml", {"app": "batch"})}


def test_no_rules_passes_everything():
    d = data()
    assert make({}).process(d) is d


def test_include_namespace():
    out = make({"include": {"namespaces": ["ml"]}}, PODS).process(data())
    assert kept(out) == {("u-train", "container.cpu.time"), ("u-train", "container.memory.usage"),
                         ("u-nons", "container.cpu.time")}


def test_exclude_namespace_keeps_non_pod_series():
    out = make({"exclude": {"namespaces": ["ml"]}}, PODS).process(data())
    assert kept(out) == {("u-web", "container.cpu.time"), ("u-web", "container.memory.usage"),
                         ("GPU-0", "hw.gpu.utilization")}


def test_pod_selector():
    out = make({"include": {"pod_selector": "app in (trainer,batch),tier!=cpu"}}, PODS).process(data())
    assert {k[0] for k in kept(out)} == {"u-train", "u-nons"}
    out = make({"exclude": {"pod_selector": "tier"}}, PODS).process(data())
    assert {k[0] for k in kept(out)} == {"u-web", "u-nons", "GPU-0"}


def test_metric_names_strict_and_regexp():
    out = make({"include": {"metric_names": ["container.cpu.time"]}}).process(data())
    assert {k[1] for k in kept(out)} == {"container.cpu.time"}
    out = make({"exclude": {"match_type": "regexp", "metric_names": ["^container\\.memory"]}}).process(data())
    assert {k[1] for k in kept(out)} == {"container.cpu.time", "hw.gpu.utilization"}


def test_include_and_exclude_combine():
    out = make({"include": {"namespaces": ["ml", "web"]},
                "exclude": {"metric_names": ["container.memory.usage"], "namespaces": ["web"]}}, PODS).process(data())
    assert kept(out) == {("u-train", "container.cpu.time"), ("u-train", "container.memory.usage"),
                         ("u-web", "container.cpu.time"), ("u-nons", "container.cpu.time")}


def test_resource_attributes():
    out = make({"include": {"match_type": "regexp", "resource_attributes": [{"key": "hw.id", "value": "GPU-"}]}}).process(data())
    assert kept(out) == {("GPU-0", "hw.gpu.utilization")}


def test_everything_filtered_gives_empty():
    out = make({"include": {"namespaces": ["nowhere"]}}, PODS).process(data())
    assert kept(out) == set()
    # the receiver's scope still goes on, empty (see the next test)
    assert [sm.scope.name for rm in out.resource_metrics for sm in rm.scope_metrics] == ["podmeter/receiver/test"]


def test_last_matching_pod_gone_its_series_go_at_once():
    """Through the real prometheus exporter: a receiver's batch replaces its series. When the filter leaves nothing
    of a batch (the last pod of the namespace went away, or the receiver sent its empty marker), the empty scope
    must still reach the exporter, or the gone pod's series stay exposed until metric_expiration (5 minutes)."""
    import urllib.request

    from harness import free_port

    from exporters.prometheus import factory as prom_factory
    from podmeter.telemetry import ComponentTelemetry, Telemetry

    port = free_port()
    logger = logging.getLogger("test.prometheus")
    settings = CreateSettings(id=ComponentID("prometheus"), kind="exporter", logger=logger,
                              telemetry=ComponentTelemetry(Telemetry(), "prometheus", logger))
    exp = prom_factory.create(settings, prom_factory.config_model.model_validate({"endpoint": f"127.0.0.1:{port}"}))
    exp.start(Host())

    def scrape():
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()

    try:
        for rules in ({"include": {"namespaces": ["ml"]}}, {"exclude": {"namespaces": ["web"]}}):
            proc = make(rules, PODS)
            exp.export(proc.process(data()))
            assert "u-train" in scrape()
            b = MetricsBuilder("podmeter/receiver/test", 1)  # the ml pods are gone: only the web pod is left
            b.add(CPU, 1.0, resource={"k8s.pod.uid": "u-web", "k8s.namespace.name": "web"})
            exp.export(proc.process(b.build()))
            assert "u-train" not in scrape()
            exp.export(proc.process(data()))
            assert "u-train" in scrape()
            exp.export(proc.process(MetricsBuilder("podmeter/receiver/test", 1).build()))  # no pods at all
            assert "u-train" not in scrape()
    finally:
        exp.shutdown()


@pytest.mark.parametrize("bad, message", [
    ({"include": {"pod_selector": "app in trainer"}}, "label selector term"),
    ({"include": {"match_type": "regexp", "metric_names": ["("]}}, "not a valid regular expression"),
    # beyond the regex engine's limits: a bad setting too, not an internal error
    ({"include": {"match_type": "regexp", "metric_names": ["a{4294967296}"]}}, "not a valid regular expression"),
    ({"include": {"match_type": "regexp", "namespaces": ["(" * 2000 + ")" * 2000]}}, "not a valid regular"),
    ({"include": {"metric_name": ["x"]}}, "Extra inputs"),
])
def test_invalid_config(bad, message):
    with pytest.raises(ValidationError, match=message):
        factory.config_model.model_validate({"metrics": bad})
