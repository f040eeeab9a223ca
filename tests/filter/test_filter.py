from __future__ import annotations

import logging

import pytest
from harness.validate import validate_cli
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


# -- configurations copied from the collector (processor/filterprocessor README and testdata) --------------------


def test_collector_readme_resource_attributes_with_capitalised_keys(tmp_path):
    """The collector's own README writes `Key:` / `Value:` (its keys match regardless of case); they were refused
    as unknown keys with "Field required" for key and value."""
    snippet = """
filter/1:
  metrics:
    include:
      match_type: regexp
      metric_names:
        - container\\.cpu\\..*
      resource_attributes:
        - Key: k8s.namespace.name
          Value: m.*
"""
    rc, err = validate_cli(tmp_path, snippet)
    assert rc == 0, err
    import yaml

    out = make(yaml.safe_load(snippet)["filter/1"]["metrics"], PODS).process(data())
    assert kept(out) == {("u-train", "container.cpu.time")}


def test_resource_attribute_values_that_yaml_reads_as_numbers_or_booleans():
    """`value: 0` or `value: true` (the collector takes any YAML scalar) was refused as "not a valid string";
    they match the attribute's text, a boolean as true/false."""
    b = MetricsBuilder("podmeter/receiver/test", 1)
    b.add(GPU, 1.0, resource={"hw.id": "GPU-0", "hw.gpu.index": 0, "mig": False})
    b.add(GPU, 1.0, resource={"hw.id": "GPU-1", "hw.gpu.index": 1, "mig": True})
    out = make({"include": {"resource_attributes": [{"key": "hw.gpu.index", "value": 0}]}}).process(b.build())
    assert kept(out) == {("GPU-0", "hw.gpu.utilization")}
    out = make({"exclude": {"resource_attributes": [{"key": "mig", "value": True}]}}).process(b.build())
    assert kept(out) == {("GPU-0", "hw.gpu.utilization")}


def test_exclude_with_names_and_resource_attributes_is_refused(tmp_path):
    """The collector's README example: its exclude drops every metric of the matching resources and the named
    metrics everywhere (two separate checks); podmeter's block dropped only the named metrics of the matching
    resources. It was accepted and applied the other way."""
    rc, err = validate_cli(tmp_path, """
filter:
  metrics:
    exclude:
      match_type: strict
      metric_names:
        - hello_world
        - hello/world
      resource_attributes:
        - Key: container.name
          Value: app_container_1
""")
    assert rc == 2 and "processors::filter::metrics: exclude with both metric_names and resource_attributes is " \
                      "ambiguous" in err and "two filter processors" in err, err
    # include has one meaning in both: the resource and the name must match
    assert make({"include": {"metric_names": ["container.cpu.time"], "resource_attributes": [
        {"key": "k8s.namespace.name", "value": "ml"}]}}).process(data()) is not None


@pytest.mark.parametrize("snippet, messages", [
    # testdata/config_ottl.yaml and the README's OTTL form
    ("filter/ottl:\n  error_mode: ignore\n  metrics:\n    metric:\n      - 'name == \"k8s.pod.phase\"'\n"
     "    datapoint:\n      - 'attributes[\"test\"] == \"pass\"'\n",
     ["processors::filter/ottl::error_mode: applies to OTTL conditions",
      "processors::filter/ottl::metrics::metric: OTTL conditions are not supported by podmeter's filter; write it "
      "as metrics: include/exclude with metric_names",
      "processors::filter/ottl::metrics::datapoint: OTTL conditions are not supported",
      "delete_label_value"]),
    # testdata/config_expr.yaml
    ("filter/include:\n  metrics:\n    include:\n      match_type: expr\n      expressions:\n"
     "        - Label(\"foo\") == \"bar\"\n",
     ["processors::filter/include::metrics::include::expressions: match_type expr (expr-lang expressions) is not "
      "supported"]),
    # testdata/config_regexp.yaml
    ("filter/unlimitedcache:\n  metrics:\n    include:\n      match_type: regexp\n      regexp:\n"
     "        cacheenabled: true\n      metric_names: [prefix/.*]\n",
     ["processors::filter/unlimitedcache::metrics::include::regexp: the collector's regexp cache settings have no "
      "meaning here"]),
    ("filter:\n  logs:\n    include:\n      match_type: strict\n",
     ["processors::filter::logs: podmeter carries metrics only: remove this section"]),
])
def test_collector_features_podmeter_has_not_are_refused_with_a_hint(tmp_path, snippet, messages):
    rc, err = validate_cli(tmp_path, snippet)
    assert rc == 2, err
    for message in messages:
        assert message in err, err


def test_collector_strict_and_regexp_testdata_behave_as_documented(tmp_path):
    """testdata/config_strict.yaml: include then exclude (only hello/world passes), and an include with no names
    passes everything (the collector builds no matcher for it)."""
    snippet = """
filter/includeexclude:
  metrics:
    include:
      match_type: strict
      metric_names: [container.cpu.time, container.memory.usage]
    exclude:
      match_type: strict
      metric_names: [container.cpu.time]
filter/empty:
  metrics:
    include:
      match_type: strict
"""
    rc, err = validate_cli(tmp_path, snippet)
    assert rc == 0, err
    import yaml

    cfg = yaml.safe_load(snippet)
    assert kept(make(cfg["filter/includeexclude"]["metrics"]).process(data())) == {
        ("u-train", "container.memory.usage"), ("u-web", "container.memory.usage")}
    d = data()
    assert make(cfg["filter/empty"]["metrics"]).process(d) is d
