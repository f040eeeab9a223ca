from __future__ import annotations

import pytest
from pydantic import ValidationError

from podmeter.component import ComponentUnavailable
from processors.k8sattributes import factory


@pytest.mark.parametrize("bad, message", [
    ({"extract": {"metadata": ["k8s.pod.nam"]}}, "unknown metadata k8s.pod.nam"),
    ({"extract": {"labels": [{"key": "a", "key_regex": "b"}]}}, "exactly one of key or key_regex"),
    ({"extract": {"labels": [{"key_regex": "("}]}}, "not a valid regular expression"),
    ({"extract": {"labels": [{"key_regex": "x{99999999999}"}]}}, "not a valid regular expression"),
    ({"extract": {"labels": [{"key": "a", "from": "node"}]}}, "Input should be 'pod' or 'namespace'"),
    ({"pod_association": [{"sources": [{"name": "host.name"}]}]}, "unsupported association attribute"),
    ({"pod_association": [{"sources": [{"name": "k8s.pod.name"}]}]}, "only together"),
    ({"auth_type": "serviceaccount"}, "Input should be"),
    ({"wait_for_metadata_timeout": "10"}, "invalid duration"),
])
def test_invalid(bad, message):
    with pytest.raises(ValidationError, match=message):
        factory.config_model.model_validate(bad)


def test_defaults_work_with_podmeter_receivers():
    cfg = factory.config_model.model_validate({})
    names = [tuple(s.name for s in r.sources) for r in cfg.association()]
    assert names[:3] == [("k8s.pod.uid",), ("container.id",), ("process.pid",)]
    assert "k8s.deployment.name" in cfg.extract.metadata and "k8s.container.name" in cfg.extract.metadata


def test_missing_kubeconfig_is_unavailable_not_a_traceback(tmp_path, make_processor):
    p = make_processor(None, start=False, auth_type="kubeConfig", kube_config_path=str(tmp_path / "nope.yaml"))
    from podmeter.component import Host

    with pytest.raises(ComponentUnavailable, match="cannot load kubeconfig"):
        p.start(Host())


def test_service_account_outside_a_pod(monkeypatch, make_processor):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    p = make_processor(None, start=False, auth_type="serviceAccount")
    from podmeter.component import Host

    with pytest.raises(ComponentUnavailable, match="not running in a pod"):
        p.start(Host())


# -- configurations copied from the collector and the OpenTelemetry Helm chart ------------------------------------

HELM_PRESET = {  # the opentelemetry-collector chart's kubernetesAttributes preset
    "filter": {"node_from_env_var": "K8S_NODE_NAME"},
    "passthrough": False,
    "pod_association": [{"sources": [{"from": "resource_attribute", "name": "k8s.pod.ip"}]},
                        {"sources": [{"from": "resource_attribute", "name": "k8s.pod.uid"}]},
                        {"sources": [{"from": "connection"}]}],
    "extract": {
        "metadata": ["k8s.namespace.name", "k8s.deployment.name", "k8s.statefulset.name", "k8s.daemonset.name",
                     "k8s.cronjob.name", "k8s.job.name", "k8s.node.name", "k8s.pod.name", "k8s.pod.uid",
                     "k8s.pod.start_time"],
        # in the chart's YAML `tag_name: $$1`, which the file's $$ escape makes $1
        "labels": [{"tag_name": "$1", "key_regex": "(.*)", "from": "pod"}],
        "annotations": [{"tag_name": "$1", "key_regex": "(.*)", "from": "pod"}],
    },
}


def test_helm_chart_preset_names_labels_as_the_collector(api, make_processor, monkeypatch, caplog):
    """`passthrough: false` (the collector's default) was refused as an unknown key; `$1` of key_regex works. The
    preset's last rule, `from: connection`, was refused too: it matches data a pod pushes over a connection, so it
    never matches what is collected on the node, in the collector as here; it is accepted and said once."""
    import logging
    import uuid

    from harness.apiserver import pod

    from .conftest import NODE

    monkeypatch.setenv("K8S_NODE_NAME", NODE)
    u = str(uuid.uuid4())
    api.create("pods", "ml", pod("p", NODE, uid=u, ip="10.1.2.3", labels={"app.kubernetes.io/name": "trainer"},
                                 annotations={"note": "n"}))
    with caplog.at_level(logging.INFO, "test.k8sattributes"):
        p = make_processor(api, **{k: v for k, v in HELM_PRESET.items() if k != "filter"})
    assert p.ready(10)
    assert p.associations == [("k8s.pod.ip",), ("k8s.pod.uid",)]
    assert sum("from: connection never match" in r.getMessage() for r in caplog.records) == 1
    got = p.attributes_for({"k8s.pod.ip": "10.1.2.3"})
    assert got["k8s.pod.uid"] == u and got["app.kubernetes.io/name"] == "trainer" and got["note"] == "n"
    assert p.attributes_for({"k8s.pod.uid": u})["k8s.pod.name"] == "p"


@pytest.mark.parametrize("tag_name, key_regex, labels, expected", [
    # Go's Regexp.Expand, as the collector: ${1} is group 1 (it was written literally as "\{1}")
    ("k8s.pod.labels.${1}", r"app\.kubernetes\.io/(.*)", {"app.kubernetes.io/name": "a"},
     {"k8s.pod.labels.name": "a"}),
    # $0 is the whole key (it was a NUL character)
    ("copy.$0", "team.*", {"team-x": "c"}, {"copy.team-x": "c"}),
    ("$name.v", "(?P<name>[a-z]+)-.*", {"gpu-kind": "h100"}, {"gpu.v": "h100"}),
    ("cost$$.${1}x", "cost/(.*)", {"cost/center": "42"}, {"cost$.centerx": "42"}),
    ("opt.$1", "(a)?b", {"b": "v"}, {"opt.": "v"}),  # a group that did not take part is empty
])
def test_tag_name_expands_groups_as_go_does(tag_name, key_regex, labels, expected):
    import re

    from processors.k8sattributes import _Rule

    cfg = factory.config_model.model_validate({"extract": {"labels": [{"tag_name": tag_name, "key_regex": key_regex}]}})
    e = cfg.extract.labels[0]
    out: dict = {}
    _Rule(e.tag_name, e.key, re.compile(e.key_regex), "labels", "pod").apply(labels, out)
    assert out == expected


@pytest.mark.parametrize("bad, message", [
    # each matching label would have raised re.error ("invalid group reference") while processing
    ({"extract": {"labels": [{"tag_name": "x.$1", "key_regex": "nogroup"}]}},
     r"tag_name refers to group 1, which key_regex does not have \(0 groups\)"),
    ({"extract": {"labels": [{"tag_name": "x.$1a", "key_regex": "(a)"}]}}, r"write \$\{1\}a"),
    ({"passthrough": True}, "passthrough: true .* is not supported"),
    ({"filter": {"fields": [{"key": "k", "value": "v"}]}}, "field selectors are not supported"),
    ({"exclude": {"pods": [{"name": "jaeger-agent"}]}}, "no list of pods left unenriched"),
    ({"extract": {"otel_annotations": True}}, r"key_regex: resource\\\.opentelemetry"),
    ({"extract": {"deployment_name_from_replicaset": True}}, "already names the Deployment"),
    ({"extract": {"metadata": ["k8s.cluster.uid", "k8s.pod.nam"]}},
     "k8s.cluster.uid: the collector's k8sattributes extracts this, podmeter's does not; remove it; unknown "
     "metadata k8s.pod.nam"),
    ({"watch_sync_period": "20s"}, "does not resync"),
])
def test_collector_features_podmeter_has_not_are_refused_with_a_hint(bad, message):
    with pytest.raises(ValidationError, match=message):
        factory.config_model.model_validate(bad)


def test_collector_testdata_is_refused_at_each_key_path(tmp_path):
    """testdata/config.yaml's k8s_attributes/2, through `podmeter validate`: exit 2, every collector key podmeter
    has not named at its path with what to do, no traceback."""
    import subprocess
    import sys

    f = tmp_path / "c.yaml"
    f.write_text("""
receivers: {cgroup: {}}
processors:
  k8sattributes/2:
    passthrough: false
    auth_type: "kubeConfig"
    filter:
      namespace: ns2
      node: ip-111.us-west-2.compute.internal
      labels:
        - {key: key1, value: value1}
        - {key: key2, value: value2, op: not-equals}
      fields:
        - {key: key1, value: value1}
    exclude:
      pods:
        - name: jaeger-agent
exporters: {debug: {}}
service: {pipelines: {metrics: {receivers: [cgroup], processors: [k8sattributes/2], exporters: [debug]}}}
""")
    proc = subprocess.run([sys.executable, "-m", "podmeter.cli", "validate", "--config", str(f)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "processors::k8sattributes/2::exclude: podmeter has no list of pods" in proc.stderr
    assert "processors::k8sattributes/2::filter::fields: field selectors are not supported" in proc.stderr
