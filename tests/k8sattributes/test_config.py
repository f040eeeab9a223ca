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
    ({"pod_association": [{"sources": [{"from": "connection"}]}]}, "receives no network connections"),
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
