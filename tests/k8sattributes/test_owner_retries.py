"""Owner lookups (ReplicaSet -> Deployment, Job -> CronJob) that fail for a passing reason are retried in the
background, and a blank line in a watch stream is not an error. The real `kubernetes` client against the API
stand-in, as in test_informer.py."""

from __future__ import annotations

import logging
import time
import uuid

from harness import wait_for
from harness.apiserver import owned, pod

from podmeter.metrics import MetricsBuilder, MetricSpec

from .conftest import NODE

SPEC = MetricSpec("container.cpu.time", "sum", "s", "test")
# the retry thread waits at least 30s: the test drives the retry passes itself
MANUAL_RETRIES = {"reconnect": {"initial_interval": "60s", "max_interval": "60s"}}


def uid() -> str:
    return str(uuid.uuid4())


def enriched(p, u: str) -> dict:
    b = MetricsBuilder("podmeter/receiver/test", 1)
    b.add(SPEC, 1.0, resource={"k8s.pod.uid": u})
    return dict(p.process(b.build()).resource_metrics[0].resource.attributes)


def test_cronjob_name_appears_once_the_api_server_answers_again(api, make_processor):
    # an API server restart: the Job's GET fails; the pod has no event for days after (a long training Job)
    api.create("cronjobs", "ml", owned("CronJob", "nightly"))
    api.create("jobs", "ml", owned("Job", "nightly-29012345", owner=("CronJob", "nightly")))
    api.create("pods", "ml", pod("nightly-29012345-x1y2z", NODE, uid=(u := uid()), owner=("Job", "nightly-29012345")))
    failing = api.fail("jobs", "get", code=503)
    p = make_processor(api)
    assert p.ready(10)
    got = enriched(p, u)
    assert got["k8s.job.name"] == "nightly-29012345" and "k8s.cronjob.name" not in got
    wait_for(lambda: len(api.asked("jobs", "get")) >= 2, timeout=15, what="a retry while the API server fails")
    assert "owner_Job" in p.telemetry.failing()
    api.clear(failing)
    # no pod event: the retry brings the name, and the processing path sees it (its cache was dropped)
    wait_for(lambda: enriched(p, u).get("k8s.cronjob.name") == "nightly", timeout=15, what="the CronJob name")
    assert "owner_Job" not in p.telemetry.failing()
    assert p.owners.pending() == 0
    assert len(api.asked("pods", "list")) == 1  # not by relisting


def test_retries_are_bounded_and_not_repeated_per_pod(api, make_processor, caplog):
    api.create("cronjobs", "ml", owned("CronJob", "nightly"))
    for job in ("nightly-1", "nightly-2"):
        api.create("jobs", "ml", owned("Job", job, owner=("CronJob", "nightly")))
    uids = {name: uid() for name in ("a", "b", "c")}
    api.create("pods", "ml", pod("a", NODE, uid=uids["a"], owner=("Job", "nightly-1")))
    api.create("pods", "ml", pod("b", NODE, uid=uids["b"], owner=("Job", "nightly-1")))
    api.create("pods", "ml", pod("c", NODE, uid=uids["c"], owner=("Job", "nightly-2")))
    failing = api.fail("jobs", "get", code=500)
    p = make_processor(api, **MANUAL_RETRIES)
    assert p.ready(10)
    assert len(api.asked("jobs", "get")) == 2  # one per Job, not per pod
    assert p.owners.pending() == 2
    # a new pod of a Job waiting for its retry asks nothing: the retry does
    api.create("pods", "ml", pod("d", NODE, uid=(d := uid()), owner=("Job", "nightly-1")))
    wait_for(lambda: p.cache.get(d), what="the new pod")
    assert len(api.asked("jobs", "get")) == 2
    # a retry pass against a server still failing stops at its first GET
    assert p.owners.retry_pass() is True
    assert len(api.asked("jobs", "get")) == 3
    api.clear(failing)
    assert p.owners.retry_pass() is False
    assert len(api.asked("jobs", "get")) == 5 and p.owners.pending() == 0
    for name in ("a", "b", "c"):
        assert p.attributes_for({"k8s.pod.uid": uids[name]})["k8s.cronjob.name"] == "nightly"
    assert p.attributes_for({"k8s.pod.uid": d})["k8s.cronjob.name"] == "nightly"
    # a 404 is final: the Job is gone
    api.create("pods", "ml", pod("orphan", NODE, uid=(orphan := uid()), owner=("Job", "deleted-job")))
    wait_for(lambda: p.cache.get(orphan), what="the pod of a deleted Job")
    # (looked up on the owner thread, after the pod's record is in)
    wait_for(lambda: p.owners.cached("Job", "ml", "deleted-job")[0], what="the lookup of the deleted Job")
    assert len(api.asked("jobs", "get")) == 6 and p.owners.pending() == 0
    assert "k8s.cronjob.name" not in p.attributes_for({"k8s.pod.uid": orphan})
    assert p.owners.retry_pass() is False and len(api.asked("jobs", "get")) == 6  # nothing left to do


def test_a_failed_lookup_no_live_pod_needs_is_dropped(api, make_processor):
    api.create("jobs", "ml", owned("Job", "once-1", owner=("CronJob", "once")))
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid()), owner=("Job", "once-1")))
    api.fail("jobs", "get", code=500)
    p = make_processor(api, **MANUAL_RETRIES)
    assert p.ready(10)
    assert p.owners.pending() == 1
    api.delete("pods", "ml", "p")
    wait_for(lambda: p.cache.get(u).deleted_at is not None, what="the deletion")
    before = len(api.asked("jobs", "get"))
    assert p.owners.retry_pass() is False
    assert len(api.asked("jobs", "get")) == before and p.owners.pending() == 0


def test_forbidden_owner_is_reported_once_and_not_retried(api, make_processor, caplog):
    api.create("jobs", "ml", owned("Job", "a-1", owner=("CronJob", "a")))
    api.create("jobs", "ml", owned("Job", "b-1", owner=("CronJob", "b")))
    api.create("pods", "ml", pod("a", NODE, uid=uid(), owner=("Job", "a-1")))
    api.create("pods", "ml", pod("b", NODE, uid=uid(), owner=("Job", "b-1")))
    api.forbid("jobs", "get")
    with caplog.at_level(logging.WARNING):
        p = make_processor(api, **MANUAL_RETRIES)
        assert p.ready(10)
    assert p.owners.pending() == 0
    assert len([r for r in caplog.records if "forbids get on jobs.batch" in r.getMessage()]) == 1


def test_forbidden_owner_is_its_own_cause_after_a_passing_failure(api, make_processor, caplog):
    """A 403 (RBAC lacks get on jobs) is not one more failure of the kind that passes: it is reported under its own
    cause, naming the permission to grant, even when an API server restart's 503 was being reported for the same
    kind; and it stays reported when another lookup's failure that passes recovers."""
    api.create("jobs", "ml", owned("Job", "a-1", owner=("CronJob", "a")))
    api.create("pods", "ml", pod("a", NODE, uid=(u := uid()), owner=("Job", "a-1")))
    passing = api.fail("jobs", "get", code=503)
    with caplog.at_level(logging.WARNING):
        p = make_processor(api, **MANUAL_RETRIES)
        assert p.ready(10)
        assert "owner_Job" in p.telemetry.failing() and p.owners.pending() == 1
        api.clear(passing)
        api.forbid("jobs", "get")  # the restarted API server runs with the new, narrower ClusterRole
        assert p.owners.retry_pass() is False and p.owners.pending() == 0
    warned = [r.getMessage() for r in caplog.records if "forbids get on jobs.batch" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("forbidden_jobs: ") and "grant get on jobs.batch" in warned[0]
    assert "forbidden_jobs" in p.telemetry.failing()
    assert "k8s.cronjob.name" not in p.attributes_for({"k8s.pod.uid": u})
    assert p.telemetry.telemetry.component_errors.labels("k8sattributes", "forbidden_jobs")._value.get() == 1
    # granted: the next lookup succeeds and the cause recovers
    api.clear()
    api.create("jobs", "ml", owned("Job", "a-2", owner=("CronJob", "a")))
    api.create("pods", "ml", pod("a2", NODE, uid=uid(), owner=("Job", "a-2")))
    wait_for(lambda: "forbidden_jobs" not in p.telemetry.failing(), timeout=15, what="the permission granted")


def test_orphaned_replicaset_gives_no_deployment_name(api, make_processor):
    # `kubectl delete deployment web --cascade=orphan`: the ReplicaSet stays, without ownerReferences. As in the
    # collector, its pods get no k8s.deployment.name (not one derived from the pod-template-hash label)
    api.create("replicasets", "ml", owned("ReplicaSet", "web-7f9c4d5b8"))
    api.create("pods", "ml", pod("web-7f9c4d5b8-kx2lp", NODE, uid=(u := uid()), labels={"pod-template-hash": "7f9c4d5b8"},
                                 owner=("ReplicaSet", "web-7f9c4d5b8")))
    p = make_processor(api)
    assert p.ready(10)
    got = p.attributes_for({"k8s.pod.uid": u})
    assert got["k8s.replicaset.name"] == "web-7f9c4d5b8" and "k8s.deployment.name" not in got


def test_retried_replicaset_lookup_replaces_the_template_hash_guess(api, make_processor):
    api.create("replicasets", "ml", owned("ReplicaSet", "web-7f9c4d5b8"))  # orphaned
    api.create("deployments", "ml", owned("Deployment", "api"))
    api.create("replicasets", "ml", owned("ReplicaSet", "api-5d8f7c", owner=("Deployment", "api")))
    api.create("pods", "ml", pod("web-7f9c4d5b8-kx2lp", NODE, uid=(web := uid()),
                                 labels={"pod-template-hash": "7f9c4d5b8", "app": "web"},
                                 owner=("ReplicaSet", "web-7f9c4d5b8")))
    api.create("pods", "ml", pod("api-5d8f7c-abcde", NODE, uid=(other := uid()), labels={"app": "api"},
                                 owner=("ReplicaSet", "api-5d8f7c")))
    failing = api.fail("replicasets", "get", code=503)
    p = make_processor(api, extract={"labels": [{"key": "app"}]}, **MANUAL_RETRIES)
    assert p.ready(10)
    # while the ReplicaSets cannot be read: the pod-template-hash guess, where there is a hash
    assert p.attributes_for({"k8s.pod.uid": web})["k8s.deployment.name"] == "web"
    assert "k8s.deployment.name" not in p.attributes_for({"k8s.pod.uid": other})
    api.clear(failing)
    assert p.owners.retry_pass() is False
    got_web, got_other = p.attributes_for({"k8s.pod.uid": web}), p.attributes_for({"k8s.pod.uid": other})
    assert "k8s.deployment.name" not in got_web and got_web["k8s.pod.label.app"] == "web"
    assert got_other["k8s.deployment.name"] == "api" and got_other["k8s.pod.label.app"] == "api"


def test_blank_line_in_a_watch_stream_is_ignored(api, make_processor, caplog):
    p = make_processor(api, watch_timeout="30s")
    assert p.ready(10)
    wait_for(lambda: api.open_watches() == 1, what="the watch to be open")
    watches = len(api.asked("pods", "watch"))
    with caplog.at_level(logging.WARNING):
        assert api.blank_line() == 1
        api.create("pods", "ml", pod("after-blank", NODE, uid=(u := uid())))
        wait_for(lambda: p.cache.get(u), timeout=15, what="the event after the blank line")
    assert len(api.asked("pods", "watch")) == watches  # the same watch brought it
    assert p.m_restarts._metric.labels("k8sattributes", "pods", "error")._value.get() == 0
    assert "api_pods" not in p.telemetry.failing()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_relist_while_owner_lookups_fail_keeps_the_names_read_before(api, make_processor):
    # an API server restart after owner_lookup_ttl: the relist remakes every record while GETs still fail
    api.create("cronjobs", "ml", owned("CronJob", "nightly"))
    api.create("jobs", "ml", owned("Job", "nightly-1", owner=("CronJob", "nightly")))
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid()), owner=("Job", "nightly-1")))
    p = make_processor(api, owner_lookup_ttl="50ms")
    assert p.ready(10)
    assert p.attributes_for({"k8s.pod.uid": u})["k8s.cronjob.name"] == "nightly"
    gets = len(api.asked("jobs", "get"))
    time.sleep(0.2)  # the cached answer expires
    outage = api.outage()
    api.create("pods", "ml", pod("while-away", NODE, uid=(away := uid())))
    api.compact()  # resuming the watch gets 410: relist
    api.fail("jobs", "get", code=503)
    api.clear(outage)
    wait_for(lambda: p.cache.get(away), timeout=15, what="the relist")
    # the cached answer had expired: asked again (on the owner thread, after the relist's records), and failed
    wait_for(lambda: p.owners.pending() == 1, what="the failed lookup waiting for its retry")
    assert len(api.asked("jobs", "get")) > gets
    assert p.attributes_for({"k8s.pod.uid": u})["k8s.cronjob.name"] == "nightly"


# The interleavings below are forced with the stand-in's hold() (a GET kept unanswered until released), not sleeps.
HELD = {**MANUAL_RETRIES, "request_timeout": "30s"}  # a held GET must not time out on a slow machine


def _retry_pass_in_thread(p):
    import threading

    out: list = []
    t = threading.Thread(target=lambda: out.append(p.owners.retry_pass()), daemon=True)
    t.start()
    return t, out


def test_a_lookup_that_fails_during_a_retry_pass_is_not_dropped_by_it(api, make_processor):
    # a retry pass takes the owners live pods need, then GETs; a pod arriving meanwhile whose own lookup fails is
    # not among them, but needs its retry all the same
    api.create("cronjobs", "ml", owned("CronJob", "nightly"))
    for job in ("nightly-1", "nightly-2"):
        api.create("jobs", "ml", owned("Job", job, owner=("CronJob", "nightly")))
    api.create("pods", "ml", pod("a", NODE, uid=(a := uid()), owner=("Job", "nightly-1")))
    api.fail("jobs", "get", code=500, times=1)
    p = make_processor(api, **HELD)
    assert p.ready(10) and p.owners.pending() == 1
    hold = api.hold("jobs", "get")
    t, out = _retry_pass_in_thread(p)
    wait_for(lambda: hold.held == 1, what="the retry pass's GET")
    api.fail("jobs", "get", code=500, times=1)
    api.create("pods", "ml", pod("b", NODE, uid=(b := uid()), owner=("Job", "nightly-2")))
    wait_for(lambda: p.cache.get(b) and p.owners.pending() == 2, what="the new pod's failed lookup")
    hold.release()
    t.join(30)
    assert out == [False] and p.owners.pending() == 0
    assert p.attributes_for({"k8s.pod.uid": a})["k8s.cronjob.name"] == "nightly"
    assert p.attributes_for({"k8s.pod.uid": b})["k8s.cronjob.name"] == "nightly"


def test_a_retry_pass_asks_nothing_more_after_shutdown(api, make_processor):
    api.create("cronjobs", "ml", owned("CronJob", "nightly"))
    for job in ("nightly-1", "nightly-2"):
        api.create("jobs", "ml", owned("Job", job, owner=("CronJob", "nightly")))
        api.create("pods", "ml", pod(job + "-x", NODE, uid=uid(), owner=("Job", job)))
    api.fail("jobs", "get", code=500, times=2)
    p = make_processor(api, **HELD)
    assert p.ready(10) and p.owners.pending() == 2
    hold = api.hold("jobs", "get")
    t, out = _retry_pass_in_thread(p)
    wait_for(lambda: hold.held == 1, what="the retry pass's GET")
    p.shutdown()  # while the pass waits for its GET
    hold.release()
    t.join(30)
    assert out and len(api.asked("jobs", "get")) == 3  # the GET in flight, not the other Job's


def test_retry_list_overflowing_during_a_retry_pass(api, tmp_path):
    # the retry list is bounded: a lookup failing while it is full drops the oldest, which may be the one the
    # retry thread is asking for just then. The thread must go on (it is the only one retrying)
    import threading

    from podmeter.telemetry import null_component_telemetry
    from processors.k8sattributes.informer import OwnerResolver, build_api_client
    from processors.k8sattributes.kube import Api

    for job in ("j-1", "j-2"):
        api.create("jobs", "ml", owned("Job", job, owner=("CronJob", "c")))
    client = build_api_client("kubeConfig", api.write_kubeconfig(tmp_path))
    r = OwnerResolver(Api(client), 60.0, null_component_telemetry("k8sattributes"), 30.0, max_entries=1,
                      backoff=(60.0, 60.0))
    try:
        api.fail("jobs", "get", code=500, times=1)
        assert r.owner("Job", "ml", "j-1") is None and r.pending() == 1
        hold = api.hold("jobs", "get", code=503)  # held, then failing again
        out: list = []

        def run() -> None:
            try:
                out.append(r.retry_pass())
            except Exception as exc:  # noqa: BLE001 - the failure this test is about
                out.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        wait_for(lambda: hold.held == 1, what="the retry pass's GET")
        api.fail("jobs", "get", code=500, times=1)
        assert r.owner("Job", "ml", "j-2") is None  # j-1, being retried, is dropped for it
        hold.release()
        t.join(30)
        assert out == [True] and r.pending() == 1
    finally:
        r.stop()
        client.close()


def test_owner_retries_wait_for_retry_after(api, make_processor):
    # a 429 (API Priority and Fairness) says when to come back: the retries do not ask sooner, however short the
    # backoff (a lower bound only)
    api.create("cronjobs", "ml", owned("CronJob", "nightly"))
    api.create("jobs", "ml", owned("Job", "nightly-1", owner=("CronJob", "nightly")))
    api.create("pods", "ml", pod("p", NODE, uid=(u := uid()), owner=("Job", "nightly-1")))
    api.fail("jobs", "get", code=429, times=2, retry_after=1)
    p = make_processor(api, reconnect={"initial_interval": "50ms", "max_interval": "5s"})
    assert p.ready(10)
    wait_for(lambda: p.attributes_for({"k8s.pod.uid": u}).get("k8s.cronjob.name") == "nightly", timeout=20,
             what="the CronJob name")
    first, second, third = api.asked("jobs", "get")[:3]
    assert second.at - first.at >= 1.0  # the informer's lookup was answered 429
    assert third.at - second.at >= 1.0  # the retry thread's


def test_pod_names_do_not_wait_for_owner_lookups_that_hang(api, make_processor):
    # an API server that answers nothing to ReplicaSet and Job GETs (no error: they hang until request_timeout):
    # the pods' own metadata comes in at once, at start and from later events, and the workload names follow once
    # the GETs are answered. The Deployments are not named as their ReplicaSets' hash says, to tell the two apart
    pods = {}
    for i in range(3):
        api.create("replicasets", "ml", owned("ReplicaSet", f"web-{i}-7f9c4d5b8", owner=("Deployment", f"trainer-{i}")))
        api.create("jobs", "ml", owned("Job", f"nightly-{i}", owner=("CronJob", "nightly")))
        api.create("pods", "ml", pod(f"web-{i}-7f9c4d5b8-abcde", NODE, uid=(u := uid()),
                                     labels={"pod-template-hash": "7f9c4d5b8"}, owner=("ReplicaSet", f"web-{i}-7f9c4d5b8")))
        pods[u] = ("deployment", f"trainer-{i}", f"web-{i}")
        api.create("pods", "ml", pod(f"nightly-{i}-x1y2z", NODE, uid=(u := uid()), owner=("Job", f"nightly-{i}")))
        pods[u] = ("cronjob", "nightly", None)
    held = [api.hold("replicasets", "get", times=None), api.hold("jobs", "get", times=None)]
    try:
        p = make_processor(api, request_timeout="20s", **MANUAL_RETRIES)
        wait_for(lambda: all(p.attributes_for({"k8s.pod.uid": u}).get("k8s.pod.name") for u in pods), timeout=10,
                 what="the pod names, while every owner GET hangs")
        wait_for(p.pods_reflector.synced.is_set, what="the first sync")  # (set just after the table went in)
        wait_for(lambda: held[0].held + held[1].held >= 1, what="the first owner GET")
        for u, (kind, _, guess) in pods.items():
            got = p.attributes_for({"k8s.pod.uid": u})
            if kind == "deployment":  # meanwhile, the pod-template-hash label's guess
                assert got["k8s.deployment.name"] == guess and got["k8s.replicaset.name"].startswith(guess)
            else:
                assert got["k8s.job.name"].startswith("nightly-") and "k8s.cronjob.name" not in got
        # a new pod's event is not held up behind the lookups either
        api.create("replicasets", "ml", owned("ReplicaSet", "late-5d8f7c", owner=("Deployment", "late")))
        api.create("pods", "ml", pod("late-5d8f7c-abcde", NODE, uid=(late := uid()), owner=("ReplicaSet", "late-5d8f7c")))
        wait_for(lambda: p.cache.get(late), timeout=10, what="the new pod, while every owner GET hangs")
        assert held[0].held + held[1].held == 1  # one GET in flight: the others wait behind it, not each its own
    finally:
        for h in held:
            h.release()
    pods[late] = ("deployment", "late", None)
    wait_for(lambda: all(p.attributes_for({"k8s.pod.uid": u}).get(f"k8s.{kind}.name") == name
                         for u, (kind, name, _) in pods.items()), timeout=15, what="the workload names")


def test_wait_for_metadata_is_not_held_up_by_owner_lookups_that_hang(api, make_processor):
    # the first list's owner lookups are waited for only in the time left: start() returns with the pods' metadata,
    # and no metadata_timeout (there was a pod list)
    api.create("replicasets", "ml", owned("ReplicaSet", "web-7f9c4d5b8", owner=("Deployment", "web")))
    api.create("pods", "ml", pod("web-7f9c4d5b8-abcde", NODE, uid=(u := uid()), labels={"pod-template-hash": "7f9c4d5b8"},
                                 owner=("ReplicaSet", "web-7f9c4d5b8")))
    held = api.hold("replicasets", "get", times=None)
    try:
        p = make_processor(api, request_timeout="20s", wait_for_metadata=True, wait_for_metadata_timeout="1s",
                           **MANUAL_RETRIES)
        assert p.cache.get(u) is not None and "metadata_timeout" not in p.telemetry.failing()
        assert p.attributes_for({"k8s.pod.uid": u})["k8s.deployment.name"] == "web"  # (from the hash, meanwhile)
    finally:
        held.release()
