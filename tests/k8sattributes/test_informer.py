"""k8sattributes against the API stand-in with the real `kubernetes` client: list/watch sequences, owner chains,
label/annotation rules, the node field selector, and API failures (410, 403, 500, cut connections, slow
responses, outages)."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Mapping

import pytest
from harness import wait_for
from harness.apiserver import owned, pod
from opentelemetry.sdk.resources import Resource

from podmeter.component import Host
from podmeter.metrics import MetricsBuilder, MetricSpec, iter_points

from .conftest import NODE

SPEC = MetricSpec("container.cpu.time", "sum", "s", "test")


def batch(*resources: dict):
    b = MetricsBuilder("podmeter/receiver/test", 1)
    for r in resources:
        b.add(SPEC, 1.0, resource=r)
    return b.build()


def resources(data) -> list[dict]:
    return [dict(rm.resource.attributes) for rm in data.resource_metrics]


def uid() -> str:
    return str(uuid.uuid4())


def test_list_then_add_modify_delete(api, make_processor):
    u1, u2 = uid(), uid()
    api.create("pods", "ml", pod("a", NODE, uid=u1, labels={"app": "a"}))
    p = make_processor(api, extract={"labels": [{"key": "app"}], "annotations": [{"key": "owner", "tag_name": "owner"}]},
                       pod_delete_grace_period="0s")
    assert p.ready(10)
    assert p.attributes_for({"k8s.pod.uid": u1})["k8s.pod.name"] == "a"

    api.create("pods", "ml", pod("b", NODE, uid=u2, annotations={"owner": "ana"}))
    wait_for(lambda: p.cache.get(u2), what="ADDED pod b in the cache")
    assert p.attributes_for({"k8s.pod.uid": u2})["owner"] == "ana"

    api.patch("pods", "ml", "a", {"metadata": {"labels": {"app": "a2"}}})
    wait_for(lambda: p.attributes_for({"k8s.pod.uid": u1}).get("k8s.pod.label.app") == "a2", what="MODIFIED label")

    api.delete("pods", "ml", "b")
    # with no grace period the processor's own sweep may already have removed it
    wait_for(lambda: (rec := p.cache.get(u2)) is None or rec.deleted_at is not None, what="DELETED marks pod b")
    p.cache.sweep()
    assert p.cache.get(u2) is None
    # one list and one watch: no relists in a healthy sequence
    assert len(api.asked("pods", "list")) == 1


def test_deleted_pod_kept_for_grace_period(api, make_processor):
    u = uid()
    api.create("pods", "ml", pod("gone", NODE, uid=u))
    p = make_processor(api, pod_delete_grace_period="1h")
    assert p.ready(10)
    api.delete("pods", "ml", "gone")
    wait_for(lambda: p.cache.get(u).deleted_at is not None, what="deletion seen")
    p.cache.sweep()
    # its last samples are still attributed
    assert p.attributes_for({"k8s.pod.uid": u})["k8s.pod.name"] == "gone"
    assert p.cache.counts() == (0, 1)


def test_node_field_selector_honoured(api, make_processor):
    mine, theirs = uid(), uid()
    api.create("pods", "ml", pod("mine", NODE, uid=mine))
    api.create("pods", "ml", pod("theirs", "node-2", uid=theirs))
    p = make_processor(api)
    assert p.ready(10)
    api.create("pods", "ml", pod("theirs-later", "node-2", uid=uid()))
    api.create("pods", "ml", pod("mine-later", NODE, uid=(later := uid())))
    wait_for(lambda: p.cache.get(later), what="pod of this node added")
    assert set(p.cache.uids()) == {mine, later}
    pod_requests = api.asked("pods")
    assert pod_requests and all(r.query.get("fieldSelector") == f"spec.nodeName={NODE}" for r in pod_requests)
    assert {r.verb for r in pod_requests} == {"list", "watch"}
    # the watch resumes from the list's resourceVersion with bookmarks
    w = api.asked("pods", "watch")[0]
    assert w.query["allowWatchBookmarks"] == "true" and w.query["resourceVersion"] not in ("", "0")


def test_owner_chains(api, make_processor):
    api.create("deployments", "ml", owned("Deployment", "web"))
    api.create("replicasets", "ml", owned("ReplicaSet", "web-5d8f7c", owner=("Deployment", "web")))
    api.create("cronjobs", "ml", owned("CronJob", "nightly"))
    api.create("jobs", "ml", owned("Job", "nightly-29012345", owner=("CronJob", "nightly")))
    uids = {k: uid() for k in ("rs", "job", "sts", "ds", "bare")}
    api.create("pods", "ml", pod("web-5d8f7c-abcde", NODE, uid=uids["rs"], owner=("ReplicaSet", "web-5d8f7c")))
    api.create("pods", "ml", pod("nightly-29012345-x1y2z", NODE, uid=uids["job"], owner=("Job", "nightly-29012345")))
    api.create("pods", "ml", pod("db-0", NODE, uid=uids["sts"], owner=("StatefulSet", "db")))
    api.create("pods", "ml", pod("agent-q9w8e", NODE, uid=uids["ds"], owner=("DaemonSet", "agent")))
    api.create("pods", "ml", pod("bare", NODE, uid=uids["bare"]))
    p = make_processor(api)
    assert p.ready(10)
    got = {k: p.attributes_for({"k8s.pod.uid": u}) for k, u in uids.items()}
    assert got["rs"]["k8s.deployment.name"] == "web" and got["rs"]["k8s.replicaset.name"] == "web-5d8f7c"
    assert got["job"]["k8s.cronjob.name"] == "nightly" and got["job"]["k8s.job.name"] == "nightly-29012345"
    assert got["sts"]["k8s.statefulset.name"] == "db"
    assert got["ds"]["k8s.daemonset.name"] == "agent"
    assert not any(k in got["bare"] for k in ("k8s.deployment.name", "k8s.replicaset.name", "k8s.job.name"))
    # owners are looked up once and cached
    before = len(api.asked("replicasets", "get"))
    api.create("pods", "ml", pod("web-5d8f7c-fghij", NODE, uid=(second := uid()), owner=("ReplicaSet", "web-5d8f7c")))
    wait_for(lambda: p.cache.get(second), what="second replica")
    assert p.attributes_for({"k8s.pod.uid": second})["k8s.deployment.name"] == "web"
    assert len(api.asked("replicasets", "get")) == before


def test_label_and_annotation_rules(api, make_processor):
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid()),
                                 labels={"app": "trainer", "team.example.com/cost-center": "42", "x": "y"},
                                 annotations={"gpu.example.com/profile": "a100", "note": "n"}))
    p = make_processor(api, extract={
        "metadata": ["k8s.pod.name", "k8s.namespace.name"],
        "labels": [{"key": "app"},
                   {"key_regex": "team.example.com/(.*)", "tag_name": "team.$1"},
                   {"key": "team", "from": "namespace", "tag_name": "k8s.namespace.team"}],
        "annotations": [{"key_regex": "gpu\\..*"}],
    })
    assert p.ready(10)
    got = p.attributes_for({"k8s.pod.uid": u})
    assert got == {"k8s.pod.name": "p", "k8s.namespace.name": "ml", "k8s.pod.label.app": "trainer",
                   "team.cost-center": "42", "k8s.namespace.team": "vision",
                   "k8s.pod.annotation.gpu.example.com/profile": "a100"}
    # namespaces are watched because a rule asked for them
    assert api.asked("namespaces", "list")


def test_namespaces_not_watched_unless_asked(api, make_processor):
    p = make_processor(api, extract={"labels": [{"key": "app"}]})
    assert p.ready(10)
    assert not api.asked("namespaces")


def test_association_sources(api, make_processor):
    cid = "a" * 64
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid()), ip="10.1.2.3",
                                 containers={"main": "nvcr.io/nvidia/pytorch:24.01-py3", "side": "busybox"},
                                 container_ids={"main": f"containerd://{cid}"}))
    p = make_processor(api)
    assert p.ready(10)
    by_cid = p.attributes_for({"container.id": cid})
    assert by_cid["k8s.pod.uid"] == u and by_cid["k8s.container.name"] == "main"
    assert by_cid["container.image.name"] == "nvcr.io/nvidia/pytorch" and by_cid["container.image.tag"] == "24.01-py3"
    assert p.attributes_for({"k8s.pod.ip": "10.1.2.3"})["k8s.pod.uid"] == u
    assert p.attributes_for({"k8s.pod.name": "p", "k8s.namespace.name": "ml"})["k8s.pod.uid"] == u
    assert p.attributes_for({"k8s.pod.uid": u, "k8s.container.name": "side"})["container.image.name"] == "busybox"
    # an unknown pod is a counted miss, not an error
    assert p.attributes_for({"k8s.pod.uid": uid()}) == {}
    assert p.m_misses._metric.labels("k8sattributes")._value.get() == 1


def test_process_keeps_existing_values_and_unrelated_resources(api, make_processor):
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid())))
    p = make_processor(api)
    assert p.ready(10)
    out = p.process(batch({"k8s.pod.uid": u, "k8s.pod.name": "given"}, {"hw.id": "GPU-1"}))
    got = resources(out)
    assert got[0]["k8s.pod.name"] == "given" and got[0]["k8s.namespace.name"] == "ml"
    assert got[1] == {"hw.id": "GPU-1"}
    assert sum(1 for _ in iter_points(out)) == 2


def test_relist_after_410(api, make_processor):
    api.create("pods", "ml", pod("p", NODE, uid=uid()))
    p = make_processor(api)
    assert p.ready(10)
    # the watch breaks, history is compacted, and a pod changes meanwhile: resuming gets 410 -> relist
    api.outage()
    u = uid()
    api.create("pods", "ml", pod("while-away", NODE, uid=u))
    api.compact()
    api.clear()
    wait_for(lambda: p.cache.get(u), timeout=15, what="the pod created during the outage, after the relist")
    assert len(api.asked("pods", "list")) >= 2
    assert p.m_restarts._metric.labels("k8sattributes", "pods", "expired")._value.get() >= 1


def test_forbidden_is_reported_once_and_cri_metadata_used(api, make_processor, caplog):
    from podmeter.component import Host

    api.forbid("pods")
    u = uid()
    cri = _Cri({u: {"k8s.pod.uid": u, "k8s.pod.name": "web-7f9c4d5b8-kx2lp", "k8s.namespace.name": "ml"}},
               labels={u: {"pod-template-hash": "7f9c4d5b8", "app": "web"}})
    host = Host()
    host.publish("container_metadata", cri)
    p = make_processor(api, host=host, extract={"labels": [{"key": "app"}]})
    assert p.ready(10) is False  # settled without a sync: nothing to wait for
    wait_for(lambda: len(api.asked("pods", "list")) >= 3, timeout=15, what="background retries")
    warnings = [r for r in caplog.records if "forbids" in r.getMessage()]
    assert len(warnings) == 1
    assert "list on pods" in warnings[0].getMessage() and "grant list and watch on pods" in warnings[0].getMessage()
    got = p.attributes_for({"k8s.pod.uid": u})
    assert got == {"k8s.pod.uid": u, "k8s.pod.name": "web-7f9c4d5b8-kx2lp", "k8s.namespace.name": "ml",
                   "k8s.deployment.name": "web", "k8s.replicaset.name": "web-7f9c4d5b8", "k8s.pod.label.app": "web"}
    # permission granted later: the informer recovers by itself
    api.clear()
    api.create("pods", "ml", pod("late", NODE, uid=(late := uid())))
    wait_for(lambda: p.cache.get(late), timeout=15, what="sync after the permission was granted")


def test_forbidden_replicasets_fall_back_to_template_hash(api, make_processor):
    api.forbid("replicasets")
    api.create("pods", "ml", pod("web-7f9c4d5b8-kx2lp", NODE, uid=(u := uid()), labels={"pod-template-hash": "7f9c4d5b8"},
                                 owner=("ReplicaSet", "web-7f9c4d5b8")))
    p = make_processor(api)
    assert p.ready(10)
    assert p.attributes_for({"k8s.pod.uid": u})["k8s.deployment.name"] == "web"
    assert "forbidden_replicasets" in p.telemetry.failing() and "owner_ReplicaSet" not in p.telemetry.failing()


def test_server_errors_back_off_and_recover(api, make_processor):
    api.fail("pods", "list", code=500, times=3)
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid())))
    p = make_processor(api)
    assert p.ready(15)
    assert p.cache.get(u) is not None
    assert len(api.asked("pods", "list")) == 4
    assert p.m_restarts._metric.labels("k8sattributes", "pods", "error")._value.get() == 3
    assert "api_pods" not in p.telemetry.failing()  # recovered


def test_dropped_watch_resumes_without_relist(api, make_processor):
    p = make_processor(api)
    assert p.ready(10)
    wait_for(lambda: api.open_watches() == 1, what="the watch to be open")
    for _ in range(3):
        api.drop_watches()
    u = uid()
    api.create("pods", "ml", pod("after-drop", NODE, uid=u))
    wait_for(lambda: p.cache.get(u), timeout=15, what="event after dropped connections")
    assert len(api.asked("pods", "list")) == 1  # resumed from the resourceVersion, no relist


def test_slow_responses_time_out_and_retry(api, make_processor):
    api.delay(3.0, "pods", "list", times=1)  # longer than request_timeout (1s)
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid())))
    p = make_processor(api)
    assert p.ready(20)
    assert p.cache.get(u) is not None
    assert len(api.asked("pods", "list")) >= 2


def test_outage_while_processing_keeps_metadata(api, make_processor):
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid())))
    p = make_processor(api)
    assert p.ready(10)
    api.outage()
    # the pipeline keeps going, from the cache, while every API request fails
    for _ in range(20):
        got = resources(p.process(batch({"k8s.pod.uid": u})))
        assert got[0]["k8s.pod.name"] == "p"
    wait_for(lambda: "api_pods" in p.telemetry.failing(), timeout=15, what="the outage to be noticed")
    api.clear()
    api.create("pods", "ml", pod("back", NODE, uid=(back := uid())))
    wait_for(lambda: p.cache.get(back), timeout=15, what="recovery after the outage")


def test_auth_none_uses_cri_only(make_processor):
    from podmeter.component import Host

    u = uid()
    host = Host()
    host.publish("container_metadata", _Cri({u: {"k8s.pod.uid": u, "k8s.pod.name": "p", "k8s.namespace.name": "ml"}},
                                            containers={"c" * 64: {"k8s.pod.uid": u, "k8s.container.name": "main",
                                                                   "container.image.name": "img", "container.id": "c" * 64}}))
    p = make_processor(None, host=host)
    assert p.ready(1)
    got = p.attributes_for({"container.id": "c" * 64})
    assert got["k8s.pod.name"] == "p" and got["k8s.container.name"] == "main" and got["container.image.name"] == "img"


def test_pod_metadata_published(api, make_processor):
    from podmeter.component import Host

    api.create("pods", "ml", pod("p", NODE, uid=(u := uid()), labels={"app": "x"}))
    host = Host()
    p = make_processor(api, host=host)
    assert p.ready(10)
    (provider,) = host.lookup("pod_metadata")
    assert provider.pod(u)["k8s.pod.name"] == "p"
    assert provider.pod_labels(u) == {"app": "x"}
    assert provider.pod(uid()) is None


def test_service_account_auth_with_token_rotation(tmp_path, monkeypatch, make_processor):
    """TLS with the service account CA, the bearer token checked by the stand-in, and a rotated token re-read."""
    from harness.apiserver import ApiServer
    from harness.tls import make_certs

    from processors.k8sattributes import informer

    certs = make_certs(tmp_path / "certs")
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "ca.crt").write_text(open(certs.ca).read())
    (sa / "token").write_text("token-1")
    server = ApiServer(token="token-1", tls_cert=certs.server_cert, tls_key=certs.server_key).start()
    try:
        server.create("namespaces", None, {"metadata": {"name": "ml"}})
        server.create("pods", "ml", pod("p", NODE, uid=(u := uid())))
        monkeypatch.setattr(informer, "SERVICE_ACCOUNT_DIR", str(sa))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        p = make_processor(None, auth_type="serviceAccount")
        assert p.ready(10) and p.cache.get(u) is not None
        # kubelet rotates the token: new file, old token revoked
        (sa / "token.new").write_text("token-2")
        (sa / "token.new").rename(sa / "token")
        server.token = "token-2"
        server.drop_watches()
        # the informer comes back (a new watch, or a re-list when that watch was first refused) with the new token
        wait_for(lambda: any(r.token == "token-2" for r in server.asked("pods")), timeout=15,
                 what="a request with the rotated token")
        # and keeps working: the server rejects token-1 now, and an event made after the rotation arrives
        server.create("pods", "ml", pod("q", NODE, uid=(q := uid())))
        wait_for(lambda: p.cache.get(q), timeout=15, what="sync with the rotated token")
    finally:
        server.stop()


class _Cri:
    """A "container_metadata" provider with fixed content (the CRI receiver's interface; its real cache is
    tested in tests/cri against containerd)."""

    def __init__(self, pods: dict, labels: dict | None = None, containers: dict | None = None) -> None:
        self.pods, self.labels, self.containers = pods, labels or {}, containers or {}

    def pod(self, uid):
        return self.pods.get(uid)

    def pod_labels(self, uid):
        return self.labels.get(uid, {})

    def container(self, cid):
        return self.containers.get(cid)


def test_resource_object_unchanged_when_nothing_matches(make_processor):
    p = make_processor(None)
    data = batch({"hw.id": "GPU-0"})
    assert p.process(data) is data
    assert isinstance(data.resource_metrics[0].resource, Resource)


def test_bookmarks_keep_the_resume_point_fresh(api, make_processor):
    """Bookmarks move the watch's resourceVersion past other resources' changes, so resuming after compaction
    needs no relist."""
    p = make_processor(api)
    assert p.ready(10)
    wait_for(lambda: api.open_watches() == 1, what="the watch to be open")
    for i in range(5):  # changes the pod watch never sees
        api.create("namespaces", None, {"metadata": {"name": f"ns-{i}"}})
    wait_for(lambda: p.pods_reflector.rv == str(api.store.rv), what="a bookmark carrying the latest resourceVersion")
    assert any(r.query.get("allowWatchBookmarks") == "true" for r in api.asked("pods", "watch"))
    api.compact()
    api.drop_watches()
    api.create("pods", "ml", pod("after", NODE, uid=(u := uid())))
    wait_for(lambda: p.cache.get(u), timeout=15, what="the pod created after compaction")
    assert len(api.asked("pods", "list")) == 1


def test_memory_bounded_under_churn(api, make_processor):
    p = make_processor(api, pod_delete_grace_period="0s")
    assert p.ready(10)
    keep = uid()
    api.create("pods", "ml", pod("steady", NODE, uid=keep, ip="10.0.0.1", container_ids={"main": "containerd://" + "e" * 64}))
    last = None
    for i in range(150):
        last = uid()
        api.create("pods", "ml", pod(f"churn-{i}", NODE, uid=last, ip=f"10.0.1.{i}",
                                     container_ids={"main": f"containerd://{i:064x}"}))
        api.delete("pods", "ml", f"churn-{i}")
    wait_for(lambda: p.cache.get(last) is not None and p.cache.get(last).deleted_at is not None,
             timeout=20, what="the last churned pod's deletion")
    p.cache.sweep()
    assert p.cache.uids() == [keep]
    assert len(p.cache._by_name) == len(p.cache._by_ip) == len(p.cache._by_cid) == 1
    assert p.attributes_for({"k8s.pod.ip": "10.0.0.1"})["k8s.pod.name"] == "steady"


def test_self_telemetry_exposed(api, make_processor):
    from prometheus_client import generate_latest

    api.create("pods", "ml", pod("p", NODE, uid=uid()))
    p = make_processor(api)
    assert p.ready(10)
    p.attributes_for({"k8s.pod.uid": uid()})
    text = generate_latest(p.telemetry.telemetry.registry).decode()
    assert 'podmeter_k8sattributes_pods{component="k8sattributes",state="live"} 1.0' in text
    assert 'podmeter_k8sattributes_association_misses_total{component="k8sattributes"} 1.0' in text
    assert 'podmeter_k8sattributes_last_sync_age_seconds{component="k8sattributes",resource="pods"}' in text
    assert "podmeter_k8sattributes_watch_restarts_total" in text or "podmeter_k8sattributes_watch_restarts" in text


def test_namespace_and_label_filters(api, make_processor):
    api.create("pods", "ml", pod("gpu", NODE, uid=(want := uid()), labels={"gpu": "true"}))
    api.create("pods", "ml", pod("cpu", NODE, uid=uid(), labels={"gpu": "false"}))
    api.create("pods", "other", pod("gpu-other-ns", NODE, uid=uid(), labels={"gpu": "true"}))
    p = make_processor(api, filter={"node": NODE, "namespace": "ml",
                                    "labels": [{"key": "gpu", "value": "true"}, {"key": "spot", "op": "does-not-exist"}]})
    assert p.ready(10)
    assert p.cache.uids() == [want]
    for r in api.asked("pods"):
        assert r.path.startswith("/api/v1/namespaces/ml/pods")
        assert r.query["labelSelector"] == "gpu=true,!spot"


def test_wait_for_metadata_blocks_start(api, make_processor):
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid())))
    api.delay(0.5, "pods", "list", times=1)
    p = make_processor(api, wait_for_metadata=True, wait_for_metadata_timeout="10s")
    assert p.cache.get(u) is not None  # start() returned after the first list


def test_wait_for_metadata_times_out_and_runs_on(api, make_processor):
    api.outage()
    p = make_processor(api, wait_for_metadata=True, wait_for_metadata_timeout="300ms")
    assert "metadata_timeout" in p.telemetry.failing()
    api.clear()
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid())))
    wait_for(lambda: p.cache.get(u), timeout=15, what="the informer to keep trying after the timeout")


def test_host_network_pods_not_associated_by_ip(api, make_processor):
    api.create("pods", "ml", pod("node-exporter", NODE, uid=uid(), ip="192.168.1.10", host_network=True))
    api.create("pods", "ml", pod("kube-proxy", NODE, uid=(kp := uid()), ip="192.168.1.10", host_network=True))
    api.create("pods", "ml", pod("app", NODE, uid=(app := uid()), ip="10.1.0.7"))
    p = make_processor(api)
    assert p.ready(10)
    assert p.attributes_for({"k8s.pod.ip": "192.168.1.10"}) == {}
    assert p.attributes_for({"k8s.pod.ip": "10.1.0.7"})["k8s.pod.uid"] == app
    assert p.attributes_for({"k8s.pod.uid": kp})["k8s.pod.name"] == "kube-proxy"


def test_namespace_labels_for_cri_only_pods(api, make_processor):
    from podmeter.component import Host

    api.forbid("pods")
    u = uid()
    host = Host()
    host.publish("container_metadata", _Cri({u: {"k8s.pod.uid": u, "k8s.pod.name": "p", "k8s.namespace.name": "ml"}}))
    p = make_processor(api, host=host, extract={"labels": [{"key": "team", "from": "namespace"}]})
    wait_for(lambda: p.ns_reflector.synced.is_set(), what="the namespace list")
    assert p.attributes_for({"k8s.pod.uid": u})["k8s.namespace.label.team"] == "vision"


def test_recreated_pod_with_the_same_name_keeps_its_own_metadata(api, make_processor):
    """A StatefulSet pod deleted and recreated (same name, new uid): a resource carrying one uid must never get the
    other pod's metadata through the name rule (CRI, nvml and podresources resources carry uid and name)."""
    old, new = uid(), uid()
    api.create("pods", "ml", pod("db-0", NODE, uid=old, labels={"rev": "1"}, owner=("StatefulSet", "db")))
    p = make_processor(api, extract={"labels": [{"key": "rev"}]}, pod_delete_grace_period="1h")
    assert p.ready(10)
    api.outage()  # the informer misses the recreation for now
    api.delete("pods", "ml", "db-0")
    api.create("pods", "ml", pod("db-0", NODE, uid=new, labels={"rev": "2"}, owner=("StatefulSet", "db")))
    # the new pod's first samples, before the informer knows it: nothing rather than the old pod's labels
    assert p.attributes_for({"k8s.pod.uid": new, "k8s.pod.name": "db-0", "k8s.namespace.name": "ml"}) == {}
    api.clear()
    wait_for(lambda: p.cache.get(new), timeout=15, what="the recreated pod")
    assert p.attributes_for({"k8s.pod.uid": new})["k8s.pod.label.rev"] == "2"
    # the old pod's last samples after its grace period: nothing rather than the new pod's labels
    p.cache.sweep(now=float("inf"))
    assert p.cache.get(old) is None
    assert p.attributes_for({"k8s.pod.uid": old, "k8s.pod.name": "db-0", "k8s.namespace.name": "ml"}) == {}
    # a resource with no uid is still associated by name
    assert p.attributes_for({"k8s.pod.name": "db-0", "k8s.namespace.name": "ml"})["k8s.pod.uid"] == new


def test_static_pod_found_by_its_cgroup_uid(api, make_processor):
    """A static pod runs under kubelet's uid (the config hash, which its cgroup and CRI sandbox carry); the API
    server's mirror pod has another uid and names the hash in the kubernetes.io/config.mirror annotation."""
    config_hash = "3b2f1e0d9c8b7a695847362514031f2e"
    cid = "d" * 64
    api.create("pods", "ml", pod(
        "etcd-node-1", NODE, uid=(mirror := uid()), owner=("Node", NODE), host_network=True,
        annotations={"kubernetes.io/config.mirror": config_hash, "kubernetes.io/config.hash": config_hash,
                     "kubernetes.io/config.source": "file"},
        containers={"etcd": "registry.k8s.io/etcd:3.5.15-0"}, container_ids={"etcd": f"containerd://{cid}"}))
    host = Host()
    p = make_processor(api, host=host)
    assert p.ready(10)
    got = resources(p.process(batch({"k8s.pod.uid": config_hash, "container.id": cid})))[0]
    assert got["k8s.pod.name"] == "etcd-node-1" and got["k8s.namespace.name"] == "ml"
    assert got["k8s.pod.uid"] == config_hash  # the resource's own value is kept, as for every attribute
    assert got["k8s.container.name"] == "etcd"
    (provider,) = host.lookup("pod_metadata")
    assert provider.pod(config_hash)["k8s.pod.name"] == "etcd-node-1"
    assert p.attributes_for({"k8s.pod.uid": mirror})["k8s.pod.name"] == "etcd-node-1"
    api.delete("pods", "ml", "etcd-node-1")
    wait_for(lambda: p.cache.get(mirror).deleted_at is not None, what="the mirror pod's deletion")
    p.cache.sweep(now=float("inf"))
    assert p.attributes_for({"k8s.pod.uid": config_hash}) == {}


def test_completed_pod_does_not_keep_its_released_ip(api, make_processor):
    """A completed Job pod stays in the API with its podIP, which the CNI has given to a new pod: the IP rule must
    find the new pod, whatever order list or update events come in."""
    done, fresh = uid(), uid()
    api.create("pods", "ml", pod("zz-report-29012345-abcde", NODE, uid=done, ip="10.1.0.9", phase="Succeeded",
                                 owner=("Job", "report-29012345")))
    api.create("pods", "ml", pod("aa-web", NODE, uid=fresh, ip="10.1.0.9"))
    p = make_processor(api)
    assert p.ready(10)
    assert p.attributes_for({"k8s.pod.ip": "10.1.0.9"})["k8s.pod.uid"] == fresh
    api.patch("pods", "ml", "zz-report-29012345-abcde", {"metadata": {"labels": {"late": "update"}}})
    wait_for(lambda: p.cache.get(done).labels.get("late"), what="the completed pod's late update")
    assert p.attributes_for({"k8s.pod.ip": "10.1.0.9"})["k8s.pod.uid"] == fresh


def test_old_pods_late_update_does_not_take_the_ip_of_a_newer_pod(api, make_processor):
    """As the collector does: an IP goes to the pod that started last, not to the one updated last."""
    old, new = uid(), uid()
    older = pod("old", NODE, uid=old, ip="10.1.0.8")
    older["status"]["startTime"] = "2026-11-24T17:00:00Z"
    api.create("pods", "ml", older)
    p = make_processor(api)
    assert p.ready(10)
    newer = pod("new", NODE, uid=new, ip="10.1.0.8")
    newer["status"]["startTime"] = "2026-11-24T18:30:00Z"
    api.create("pods", "ml", newer)
    wait_for(lambda: p.cache.get(new), what="the new pod")
    api.patch("pods", "ml", "old", {"metadata": {"labels": {"terminating": "yes"}}})
    wait_for(lambda: p.cache.get(old).labels.get("terminating"), what="the old pod's late update")
    assert p.attributes_for({"k8s.pod.ip": "10.1.0.8"})["k8s.pod.uid"] == new
    gen = p.cache.generation
    api.patch("pods", "ml", "old", {"metadata": {"labels": {"terminating": "yes"}}})  # a no-op update
    api.create("pods", "ml", pod("marker", NODE, uid=(marker := uid())))
    wait_for(lambda: p.cache.get(marker), what="a later event")
    assert p.cache.generation == gen + 1  # only the marker: the unchanged old pod is not re-indexed every time


def test_pod_start_time_is_its_creation_time_as_in_the_collector(api, make_processor):
    """`k8s.pod.start_time` is the pod's `metadata.creationTimestamp` (RFC 3339), as the collector's k8sattributes
    sets it, not `status.startTime`: the two differ by as long as the pod waited to be scheduled."""
    created = api.create("pods", "ml", pod("waited", NODE, uid=(u := uid())))
    assert created["status"]["startTime"] != created["metadata"]["creationTimestamp"]
    p = make_processor(api)
    assert p.ready(10)
    assert p.attributes_for({"k8s.pod.uid": u})["k8s.pod.start_time"] == created["metadata"]["creationTimestamp"]


def test_unextracted_annotations_are_not_kept(api, make_processor):
    """kubectl's last-applied-configuration and other annotations can be hundreds of KiB per pod: only what a rule
    extracts is kept, and a change of an annotation nobody extracts changes nothing readers see."""
    big = "x" * 200_000
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid()), annotations={
        "kubectl.kubernetes.io/last-applied-configuration": big, "owner": "ana"}))
    p = make_processor(api, extract={"annotations": [{"key": "owner"}]})
    assert p.ready(10)
    rec = p.cache.get(u)
    assert rec.attrs["k8s.pod.annotation.owner"] == "ana"
    assert not any(isinstance(v, Mapping) and big in v.values()
                   for v in (getattr(rec, f.name) for f in dataclasses.fields(rec)))
    gen = p.cache.generation
    api.patch("pods", "ml", "p", {"metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "y"}}})
    api.create("pods", "ml", pod("marker", NODE, uid=(marker := uid())))
    wait_for(lambda: p.cache.get(marker), what="a later event")
    assert p.cache.generation == gen + 1


def test_node_from_env_var(api, make_processor, monkeypatch):
    """The collector's filter.node_from_env_var: configurations written for it keep their node filter."""
    monkeypatch.setenv("KUBE_NODE_NAME", NODE)
    api.create("pods", "ml", pod("mine", NODE, uid=(mine := uid())))
    api.create("pods", "ml", pod("theirs", "node-2", uid=uid()))
    p = make_processor(api, filter={"node_from_env_var": "KUBE_NODE_NAME"})
    assert p.ready(10)
    assert p.cache.uids() == [mine]
    assert all(r.query.get("fieldSelector") == f"spec.nodeName={NODE}" for r in api.asked("pods"))


def test_lists_are_served_from_the_api_servers_cache(api, make_processor):
    """As client-go's reflector: the first list asks for resourceVersion 0 (the API server's watch cache), a relist
    after a 410 for the last version seen; without one, every node's agent makes etcd read all of the cluster's pods
    (the field selector filters afterwards) at once after an API server restart."""
    api.create("pods", "ml", pod("p", NODE, uid=uid()))
    p = make_processor(api)
    assert p.ready(10)
    assert api.asked("pods", "list")[0].query.get("resourceVersion") == "0"
    wait_for(lambda: api.open_watches() == 1, what="the watch to be open")
    api.outage()
    api.create("pods", "ml", pod("while-away", NODE, uid=(u := uid())))
    api.compact()
    api.clear()
    wait_for(lambda: p.cache.get(u), timeout=15, what="the relist after 410")
    relist = api.asked("pods", "list")[1]
    assert int(relist.query.get("resourceVersion", "0")) > 0


def test_list_refused_for_its_resource_version_reads_from_etcd(api, make_processor):
    api.fail("pods", "list", code=410, times=1)
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid())))
    p = make_processor(api)
    assert p.ready(10) and p.cache.get(u) is not None
    first, second = api.asked("pods", "list")[:2]
    assert first.query.get("resourceVersion") == "0" and "resourceVersion" not in second.query


def test_qos_class_and_runtime_added_to_every_receivers_resources(api, make_processor):
    """The cgroup receiver says a pod's QoS class and (under the systemd driver) the runtime from the cgroup path;
    the cri, nvml and podresources receivers, or cgroupfs paths, do not. k8sattributes adds both from the pod object
    (status.qosClass, the scheme of its containers' ids) wherever they are missing, so that one container is one
    resource whichever receiver describes it; a value the receiver gave is kept."""
    cid = "e" * 64
    obj = pod("web-1", NODE, uid=(u := uid()), containers={"app": "nginx:1.27"},
              container_ids={"app": f"cri-o://{cid}"})
    obj["status"]["qosClass"] = "Guaranteed"
    api.create("pods", "ml", obj)
    p = make_processor(api)
    assert p.ready(10)
    got = resources(p.process(batch({"k8s.pod.uid": u, "container.id": cid}, {"k8s.pod.uid": u})))
    assert got[0]["k8s.pod.qos_class"] == "Guaranteed" and got[0]["container.runtime.name"] == "cri-o"
    assert got[1]["k8s.pod.qos_class"] == "Guaranteed" and "container.runtime.name" not in got[1]  # the pod's own
    kept = resources(p.process(batch({"k8s.pod.uid": u, "container.id": cid, "k8s.pod.qos_class": "Burstable",
                                      "container.runtime.name": "crio"})))[0]
    assert (kept["k8s.pod.qos_class"], kept["container.runtime.name"]) == ("Burstable", "crio")


def test_relist_refused_as_too_large_reads_from_etcd(api, make_processor):
    """After a 410 the relist asks for the last resourceVersion seen, from the API server's watch cache. An API server
    whose cache has not reached it (another replica's bookmark carried it; the cache only moves with changes of that
    resource) answers 504 "Too large resource version" until it does, possibly for good in a quiet cluster: as
    client-go (kubernetes#91073, #92537) the relist then reads from etcd instead of retrying the same version."""
    api.create("pods", "ml", pod("p", NODE, uid=uid()))
    p = make_processor(api)
    assert p.ready(10)
    wait_for(lambda: api.open_watches() == 1, what="the watch to be open")
    outage = api.outage()
    wait_for(lambda: "api_pods" in p.telemetry.failing(), what="the outage to be noticed")  # no event in flight
    # the last resourceVersion seen came from a replica further ahead than the one the agent reaches next
    ahead = str(api.store.rv + 1000)
    p.pods_reflector.rv = ahead
    api.fail("pods", "watch", code=410, times=1)
    api.create("pods", "ml", pod("while-away", NODE, uid=(u := uid())))
    api.clear(outage)
    wait_for(lambda: p.cache.get(u), timeout=15, what="the relist after the too-large resourceVersion")
    relists = [r.query.get("resourceVersion") for r in api.asked("pods", "list")[1:]]
    assert relists == [ahead, None]  # the last version seen, then a consistent read
    assert "api_pods" not in p.telemetry.failing()


def test_retry_after_of_a_429_is_honoured(api, make_processor):
    """API Priority and Fairness (and max-inflight) answer 429 with Retry-After: the next try waits at least that
    long, as client-go's REST client does, instead of the usual (here 50 ms) backoff; bounded by
    reconnect.max_interval."""
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid())))
    api.fail("pods", "list", code=429, times=1, retry_after=1)
    p = make_processor(api, reconnect={"initial_interval": "50ms", "max_interval": "5s"})
    assert p.ready(15) and p.cache.get(u) is not None
    first, second = api.asked("pods", "list")[:2]
    assert second.at - first.at >= 1.0  # a lower bound only: the server asked for it
    assert p.m_restarts._metric.labels("k8sattributes", "pods", "error")._value.get() == 1


def test_relist_while_a_processing_thread_sweeps():
    """A relist (informer thread) looks for the pods it no longer lists while process() (a pipeline thread) may be
    sweeping deleted pods whose grace period ended. The thread switch is forced here at the one point it matters (a
    stand-in for the scheduler; the real race is rare): the relist must neither fail nor lose the live pod."""
    import threading

    from processors.k8sattributes.informer import EMPTY, PodCache, PodRecord

    def rec(u: str) -> PodRecord:
        return PodRecord(u, u, "ml", "", EMPTY, EMPTY, EMPTY, EMPTY)

    cache = PodCache(grace=0.0)
    cache.upsert(rec("gone"))
    cache.upsert(rec("live"))
    cache.delete("gone")
    sweeper = threading.Thread(target=cache.sweep, kwargs={"now": float("inf")})
    started: list = []

    class Pods(dict):
        def __iter__(self):
            for i, key in enumerate(dict.__iter__(self)):
                if i == 0 and not started:  # the other thread runs now, for as long as it can
                    started.append(True)
                    sweeper.start()
                    sweeper.join(0.3)
                yield key

    cache._pods = Pods(cache._pods)
    cache.replace([rec("live")])
    sweeper.join()
    assert cache.uids() == ["live"] and cache.get("live").deleted_at is None


def test_watch_refused_as_too_large_in_its_stream_relists_from_etcd(api, make_processor):
    """An API server's watch cache answers a watch from a resourceVersion it has not reached (another replica's)
    with an ERROR event in the accepted stream, not an HTTP status: 504 Timeout, cause ResourceVersionTooLarge,
    retryAfterSeconds 1. As client-go, that is not retried from the same version (it would be refused forever in a
    quiet cluster): the pods are listed again from etcd, and watched from there."""
    api.create("pods", "ml", pod("p", NODE, uid=uid()))
    p = make_processor(api)
    assert p.ready(10)
    wait_for(lambda: api.open_watches() == 1, what="the watch to be open")
    refused = api.watch_error("pods", code=504, reason="Timeout", message="Too large resource version: 9999, current: 4",
                              details={"causes": [{"reason": "ResourceVersionTooLarge",
                                                   "message": "Too large resource version"}]}, retry_after=1)
    api.drop_watches()  # the next watch is the refused one
    wait_for(lambda: refused.times == 0, what="the refused watch")
    api.create("pods", "ml", pod("while-away", NODE, uid=(u := uid())))
    wait_for(lambda: p.cache.get(u), timeout=15, what="the relist after the too-large resourceVersion")
    assert [r.query.get("resourceVersion") for r in api.asked("pods", "list")[1:]][:1] == [None]  # from etcd
    assert p.m_restarts._metric.labels("k8sattributes", "pods", "expired")._value.get() == 1


def test_watches_refused_as_too_large_again_and_again_back_off_between_lists(api, make_processor):
    """An API server whose watch cache stays behind refuses every watch as too large: each refusal lists from etcd
    again, but a round refused soon after its list waits (with backoff) before the next list, as client-go waits
    between list-and-watch rounds, instead of having every node list its pods from etcd back to back."""
    api.create("pods", "ml", pod("p", NODE, uid=uid()))
    api.watch_error("pods", code=504, reason="Timeout", message="Too large resource version: 9999, current: 1",
                    details={"causes": [{"reason": "ResourceVersionTooLarge",
                                         "message": "Too large resource version"}]}, times=None)
    p = make_processor(api, reconnect={"initial_interval": "200ms", "max_interval": "5s"})
    assert p.ready(10)
    wait_for(lambda: len(api.asked("pods", "list")) >= 4, timeout=30, what="lists after refused watches")
    lists = api.asked("pods", "list")
    # the first refusal after the initial list waits at least half the initial interval; each next one more
    assert all(b.at - a.at >= 0.1 for a, b in zip(lists[1:], lists[2:], strict=False))


def test_retry_after_in_a_watch_error_event_is_honoured(api, make_processor):
    """A Status sent as an ERROR event inside a watch stream may say when to come back (details.retryAfterSeconds,
    e.g. a 429 from API Priority and Fairness): the next watch waits at least that long, as after an HTTP 429, and
    resumes from the last resourceVersion (no relist)."""
    api.create("pods", "ml", pod("p", NODE, uid=uid()))
    api.watch_error("pods", code=429, reason="TooManyRequests", message="Too many requests, please try again later.",
                    retry_after=1)
    p = make_processor(api, reconnect={"initial_interval": "50ms", "max_interval": "5s"})
    assert p.ready(10)
    wait_for(lambda: len(api.asked("pods", "watch")) >= 2, timeout=15, what="the watch after the ERROR event")
    first, second = api.asked("pods", "watch")[:2]
    assert second.at - first.at >= 1.0  # a lower bound only: the server asked for it
    assert second.query.get("resourceVersion") == first.query.get("resourceVersion")
    assert len(api.asked("pods", "list")) == 1
    assert p.m_restarts._metric.labels("k8sattributes", "pods", "error")._value.get() == 1


@pytest.mark.parametrize("refusal", ["forbidden", "unauthorized"])
def test_wait_for_metadata_reports_a_refusal_as_such(api, make_processor, refusal, caplog):
    # a 403 or 401 settles the wait at once: reported as what it is, not as a timeout it never waited for
    p = make_processor(api, start=False, wait_for_metadata=True, wait_for_metadata_timeout="30s")
    if refusal == "forbidden":
        api.forbid("pods")
    else:
        api.token = "rotated"  # the kubeconfig's token (written before) is refused
    with caplog.at_level(logging.WARNING):
        p.start(Host())
    failing = p.telemetry.failing()
    assert "metadata_timeout" not in failing
    assert ("forbidden_pods" if refusal == "forbidden" else "unauthorized") in failing
    assert not [r for r in caplog.records if "within 30s" in r.getMessage()]


@pytest.mark.parametrize("body", ["null", "[]", '"Service Unavailable"'])
def test_an_error_body_that_is_not_a_status_is_reported_and_retried(api, make_processor, body, caplog):
    # a proxy in front of the API server (or a broken one) answers an error with JSON that is not a Status: the
    # failure is reported with its HTTP status and retried, for the pod list as for an owner lookup
    api.create("jobs", "ml", owned("Job", "nightly-1", owner=("CronJob", "nightly")))
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid()), owner=("Job", "nightly-1")))
    api.fail("pods", "list", code=503, times=1, body=body)
    api.fail("jobs", "get", code=503, times=1, body=body)
    with caplog.at_level(logging.WARNING):
        p = make_processor(api)
        assert p.ready(10)
        wait_for(lambda: p.attributes_for({"k8s.pod.uid": u}).get("k8s.cronjob.name") == "nightly", timeout=15,
                 what="the CronJob name, after the owner lookup's retry")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("api_pods: list pods failed: HTTP 503") for m in messages), messages
    assert any(m.startswith("owner_Job: get jobs.batch ml/nightly-1 failed: HTTP 503") for m in messages), messages
    assert not [r for r in caplog.records if r.exc_info]
