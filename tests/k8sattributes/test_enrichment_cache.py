"""k8sattributes' enrichment cache: a resource seen before is enriched from the cache, and the cache follows every
change of the pod table (labels, deletion) and stays bounded."""

from __future__ import annotations

import uuid

from harness import wait_for
from harness.apiserver import pod
from opentelemetry.sdk.metrics.export import MetricsData

from podmeter.metrics import MetricsBuilder, MetricSpec
from processors.k8sattributes.informer import PodCache, PodRecord

from .conftest import NODE

SPEC = MetricSpec("process.gpu.memory.usage", "updowncounter", "By", "test")


def batch(*resources: dict) -> MetricsData:
    b = MetricsBuilder("podmeter/receiver/test", 1)
    for r in resources:
        b.add(SPEC, 1, resource=r)
    return b.build()


def names(data: MetricsData) -> list[dict]:
    return [dict(rm.resource.attributes) for rm in data.resource_metrics]


def misses(p) -> float:
    reg = p.telemetry.telemetry.registry
    return reg.get_sample_value("podmeter_k8sattributes_association_misses_total",
                                {"component": "k8sattributes"}) or 0.0


def counting(p) -> list:
    """Count calls of p.attributes_for (the uncached path)."""
    calls: list = []
    real = p.attributes_for

    def spy(attrs):
        calls.append(dict(attrs))
        return real(attrs)

    p.attributes_for = spy
    return calls


def test_repeated_resources_come_from_the_cache_until_labels_change(api, make_processor):
    u = str(uuid.uuid4())
    api.create("pods", "ml", pod("a", NODE, uid=u, labels={"app": "v1"}))
    p = make_processor(api, extract={"labels": [{"key": "app"}]})
    assert p.ready(10)
    data = batch({"k8s.pod.uid": u, "process.pid": 1}, {"k8s.pod.uid": u, "process.pid": 2})
    calls = counting(p)
    first = p.process(data)
    assert [r["k8s.pod.label.app"] for r in names(first)] == ["v1", "v1"]
    assert len(calls) == 2
    again = p.process(data)  # the same Resource objects: no association work at all
    assert names(again) == names(first)
    assert again.resource_metrics[0].resource is first.resource_metrics[0].resource
    # equal resources in new objects (a receiver that builds new ones each collection): cached by attributes
    assert names(p.process(batch({"k8s.pod.uid": u, "process.pid": 1}))) == names(first)[:1]
    assert len(calls) == 2

    api.patch("pods", "ml", "a", {"metadata": {"labels": {"app": "v2"}}})
    wait_for(lambda: p.cache.get(u).labels.get("app") == "v2", what="MODIFIED label in the pod cache")
    assert [r["k8s.pod.label.app"] for r in names(p.process(data))] == ["v2", "v2"]
    assert len(calls) == 4


def test_deleted_pod_is_no_longer_served_from_the_cache(api, make_processor):
    u = str(uuid.uuid4())
    api.create("pods", "ml", pod("gone", NODE, uid=u))
    p = make_processor(api, pod_delete_grace_period="0s")
    assert p.ready(10)
    data = batch({"k8s.pod.uid": u})
    assert names(p.process(data))[0]["k8s.pod.name"] == "gone"
    assert names(p.process(data))[0]["k8s.pod.name"] == "gone"
    api.delete("pods", "ml", "gone")
    wait_for(lambda: (rec := p.cache.get(u)) is None or rec.deleted_at is not None, what="DELETED seen")
    p.cache.sweep()
    assert p.cache.get(u) is None
    before = misses(p)
    out = p.process(data)
    assert "k8s.pod.name" not in names(out)[0]
    assert out is data  # nothing added
    p.process(data)
    assert misses(p) == before + 2  # a miss counts every time, cached or not


def test_cache_is_bounded_under_resource_churn(make_processor):
    p = make_processor(None)  # auth none, no CRI: every resource is a cacheable miss or pass-through
    sizes = []
    for i in range(200):
        p.process(batch(*({"k8s.pod.uid": f"{i:08d}-0000-0000-0000-{j:012d}"} for j in range(10))))
        sizes.append(len(p._hot) + len(p._cold))
    # each process() call brings 10 new resources (x2 keys at most): only the last two rotations are kept
    assert max(sizes[50:]) <= 2 * 2 * 10 * 16
    assert max(sizes[100:]) <= max(sizes[50:100])


def test_process_pid_association_is_not_cached(make_processor, tmp_path):
    p = make_processor(None, proc_root=str(tmp_path))
    data = batch({"process.pid": 12345})
    p.process(data)
    p.process(data)
    assert not p._hot and not p._cold  # /proc says which pod a PID is in, and a PID can be reused


def _rec(uid: str, labels: dict) -> PodRecord:
    from types import MappingProxyType as M
    return PodRecord(uid, "n", "ns", "", M(dict(labels)), M({"k8s.pod.uid": uid}), M({}), M({}))


def test_pod_cache_generation():
    c = PodCache(grace=0.0)
    g = c.generation
    c.upsert(_rec("u1", {"a": "1"}))
    assert c.generation > g
    g = c.generation
    c.upsert(_rec("u1", {"a": "1"}))  # a resync: nothing changed
    assert c.generation == g
    c.upsert(_rec("u1", {"a": "2"}))
    assert c.generation > g
    g = c.generation
    c.delete("u1")
    assert c.generation > g
    g = c.generation
    assert c.sweep() == 1
    assert c.generation > g
    g = c.generation
    assert c.sweep() == 0
    assert c.generation == g
