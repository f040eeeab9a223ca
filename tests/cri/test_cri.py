"""The cri receiver against a real containerd + runc running kubelet-shaped busybox pods."""

from __future__ import annotations

import contextlib
import os
import time
from concurrent import futures

import grpc
import pytest
from harness import points, wait_for
from pydantic import ValidationError

from podmeter.metrics import count_points
from receivers.cri import METRICS, factory
from receivers.cri import api_pb2 as pb
from receivers.cri import api_pb2_grpc as pbg
from receivers.cri.metadata import parse_image

pytestmark = pytest.mark.root
ALL = {"metrics": {m.name: {"enabled": True} for m in METRICS}}  # CPU and memory are off by default



@contextlib.contextmanager
def stand_in_runtime(servicer: pbg.RuntimeServiceServicer, tmp_path):
    """A CRI v1 runtime stand-in (behaviour real containerd cannot be made to show on demand) on a unix socket;
    yields its endpoint. Replies of any size are sent, as containerd's are."""
    server = grpc.server(futures.ThreadPoolExecutor(4), options=[("grpc.max_send_message_length", -1)])
    pbg.add_RuntimeServiceServicer_to_server(servicer, server)
    sock = tmp_path / f"{type(servicer).__name__}.sock"
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    try:
        yield f"unix://{sock}"
    finally:
        server.stop(0)


def value_of(data, name: str, **resource):
    for n, res, _attrs, value in points(data):
        if n == name and all(res.get(k) == v for k, v in resource.items()):
            return value
    return None


def cgroup_file(uid: str, cid: str, controller: str, name: str) -> str:
    for base in (f"/sys/fs/cgroup/{controller}", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        path = f"{base}/kubepods/burstable/pod{uid}/{cid}/{name}"
        if os.path.exists(path):
            return path
    raise AssertionError(f"no {name} for container {cid[:12]}")


def read_cpu_ns(uid: str, cid: str) -> int:
    try:
        with open(cgroup_file(uid, cid, "cpuacct", "cpuacct.usage")) as f:
            return int(f.read())
    except AssertionError:  # cgroup v2
        with open(cgroup_file(uid, cid, "", "cpu.stat")) as f:
            return int(dict(line.split() for line in f)["usage_usec"]) * 1000


# ---------------------------------------------------------------------------------------------------------


def test_metadata_matches_runtime_and_kernel(ctrd, make_receiver):
    web = ctrd.run_pod("web-7d9f", "shop", {"app": ["/bin/sleep", "3600"], "sidecar": ["/bin/sleep", "3601"]},
                       labels={"app": "web", "tier": "front"}, annotations={"team": "payments"})
    job = ctrd.run_pod("train-0", "ml", {"trainer": ["/bin/sleep", "3602"]})
    try:
        _, meta, telemetry = make_receiver(ctrd.endpoint)
        for pod in (web, job):
            assert meta.pod(pod.uid) == {"k8s.pod.uid": pod.uid, "k8s.pod.name": pod.name,
                                         "k8s.namespace.name": pod.namespace}
            assert meta.pod_by_name(pod.namespace, pod.name)["k8s.pod.uid"] == pod.uid
            for cname, cid in pod.containers.items():
                attrs = meta.container(cid)
                assert attrs == {
                    "k8s.pod.uid": pod.uid, "k8s.pod.name": pod.name, "k8s.namespace.name": pod.namespace,
                    "k8s.container.name": cname, "container.id": cid,
                    "container.image.name": "localhost/podmeter-busybox", "container.image.tag": "1.36",
                    "container.runtime.name": "containerd",
                }
                # the API server's form of the id works too
                assert meta.container(f"containerd://{cid}") == attrs
                pid = meta.container_pid(cid)
                assert pid == ctrd.container_pid(cid)
                # the kernel agrees: that PID lives in the pod's cgroup under this container id
                with open(f"/proc/{pid}/cgroup") as f:
                    assert f"/kubepods/burstable/pod{pod.uid}/{cid}" in f.read()
            # the pause container's cgroup resolves to its pod
            sandbox = meta.container(pod.sandbox_id)
            assert sandbox["k8s.pod.uid"] == pod.uid and "k8s.container.name" not in sandbox
        assert meta.pod_labels(web.uid) == {"app": "web", "tier": "front"}
        assert meta.pod_annotations(web.uid)["team"] == "payments"
        assert telemetry.failing() == {}
    finally:
        ctrd.remove_pod(web)
        ctrd.remove_pod(job)


def test_stats_match_the_kernel(ctrd, make_receiver):
    pod = ctrd.run_pod("stats", "default", {"worker": ["/bin/sleep", "3600"]})
    cid = pod.containers["worker"]
    try:
        receiver, _, _ = make_receiver(ctrd.endpoint, **ALL)
        first = receiver.collect()
        names = {p[0] for p in points(first) if p[1].get("container.id") == cid}
        assert {"container.cpu.time", "container.memory.working_set"} <= names
        # the runtime's first usage_nano_cores sample is 0 ("not computed yet"): omitted, not emitted as 0
        assert "container.cpu.usage" not in names
        # burn some CPU inside the container, then let it sleep again: the cgroup counter is then static
        ctrd.exec(cid, ["/bin/sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"])
        # writable layer: 512 KiB and one new file (containerd recomputes snapshot usage every second)
        ctrd.exec(cid, ["/bin/dd", "if=/dev/zero", "of=/payload", "bs=1024", "count=512"])

        def grown():
            data = receiver.collect()
            used = value_of(data, "container.filesystem.usage", **{"container.id": cid}) or 0
            return data if used >= 512 * 1024 else None

        data = wait_for(grown, timeout=20, interval=0.5, what="writable layer usage to include the 512 KiB file")
        cpu = value_of(data, "container.cpu.time", **{"container.id": cid})
        kernel_ns = read_cpu_ns(pod.uid, cid)
        assert cpu > 0
        assert abs(cpu * 1e9 - kernel_ns) < 5e6, (cpu, kernel_ns)  # same counter, read a moment apart
        assert value_of(data, "container.filesystem.inodes.usage", **{"container.id": cid}) >= 1
        assert value_of(data, "container.cpu.usage", **{"container.id": cid}) is not None
        ws = value_of(data, "container.memory.working_set", **{"container.id": cid})
        usage = value_of(data, "container.memory.usage", **{"container.id": cid})
        assert 0 < ws <= usage
        try:
            with open(cgroup_file(pod.uid, cid, "memory", "memory.usage_in_bytes")) as f:
                kernel_usage = int(f.read())
        except AssertionError:
            with open(cgroup_file(pod.uid, cid, "", "memory.current")) as f:
                kernel_usage = int(f.read())
        assert abs(usage - kernel_usage) < 4 << 20, (usage, kernel_usage)
        # every container series carries the pod's identity from CRI
        for name, res, _, _ in points(data):
            if res.get("container.id") == cid:
                assert res["k8s.pod.name"] == "stats" and res["k8s.pod.uid"] == pod.uid, name
        pod_cpu = value_of(data, "k8s.pod.cpu.time", **{"k8s.pod.uid": pod.uid})
        assert pod_cpu is not None and pod_cpu >= cpu
        for metric in data.resource_metrics[0].scope_metrics:
            assert metric.scope.name == "podmeter/receiver/cri"
    finally:
        ctrd.remove_pod(pod)


def test_new_container_on_demand_and_removed_container_evicted(ctrd, make_receiver):
    # the periodic refresh is far away: only an on-demand refresh can find the new pod
    receiver, meta, _ = make_receiver(ctrd.endpoint, metadata_refresh_interval="1h",
                                      on_demand_refresh_min_interval="0s", **ALL)
    pod = ctrd.run_pod("late", "default", {"c": ["/bin/sleep", "3600"]})
    cid = pod.containers["c"]
    try:
        assert meta.container(cid) is None  # unknown now; asks the refresher
        attrs = wait_for(lambda: meta.container(cid), timeout=10, what="on-demand refresh to find the container")
        assert attrs["k8s.pod.name"] == "late"
        # stats of a container created after the last refresh still carry its pod (from the stats labels); its
        # cumulative points wait for the refresh (test_cumulative_points_start_at_creation_not_at_first_sight)
        extra = ctrd.add_container(pod, "extra", ["/bin/sleep", "3600"])
        data = receiver.collect()
        assert value_of(data, "container.memory.working_set", **{"container.id": extra, "k8s.pod.name": "late",
                                                                 "k8s.container.name": "extra"}) is not None
    finally:
        ctrd.remove_pod(pod)
    # removed: the next refresh evicts it (an unknown id triggers one; the removed one is simply gone)
    assert meta.container("0" * 64) is None
    wait_for(lambda: meta.container_info(cid) is None, timeout=10, what="removed container to be evicted")
    assert cid not in meta.container_ids() and meta.pod(pod.uid) is None


def test_cache_is_bounded(ctrd, make_receiver):
    pod = ctrd.run_pod("many", "default", {"a": ["/bin/sleep", "3600"], "b": ["/bin/sleep", "3600"]})
    try:
        _, meta, telemetry = make_receiver(ctrd.endpoint, max_containers=1)
        assert len(meta) == 1
        assert "cache_full" in telemetry.failing()
    finally:
        ctrd.remove_pod(pod)


def test_containerd_killed_and_restarted_mid_run(ctrd, make_receiver):
    pod = ctrd.run_pod("survivor", "default", {"c": ["/bin/sleep", "3600"]})
    cid = pod.containers["c"]
    try:
        receiver, meta, telemetry = make_receiver(ctrd.endpoint, metadata_refresh_interval="200ms", **ALL)
        assert value_of(receiver.collect(), "container.cpu.time", **{"container.id": cid}) is not None
        ctrd.kill()
        data = receiver.collect()  # must not raise
        assert value_of(data, "container.cpu.time", **{"container.id": cid}) is None
        assert {"stats", "list", "connect", "socket_absent"} & set(telemetry.failing())
        # the cache keeps serving what it knew while the runtime is away
        assert meta.container(cid)["k8s.pod.name"] == "survivor"
        ctrd.launch()
        wait_for(lambda: value_of(receiver.collect(), "container.cpu.time", **{"container.id": cid}),
                 timeout=30, interval=0.2, what="stats after containerd restarted")
        assert meta.container_pid(cid) == ctrd.container_pid(cid)
        wait_for(lambda: not ({"stats", "list", "connect"} & set(telemetry.failing())), timeout=10,
                 what="errors to recover")
    finally:
        ctrd.remove_pod(pod)


def test_socket_absent_then_appears(ctrd, make_receiver, tmp_path, caplog):
    link = tmp_path / "cri.sock"
    receiver, meta, telemetry = make_receiver(f"unix://{link}")  # absent: start must not raise
    assert count_points(receiver.collect()) == 0
    assert "socket_absent" in telemetry.failing()
    assert receiver.ready(0.1) is False
    pod = ctrd.run_pod("appears", "default", {"c": ["/bin/sleep", "3600"]})
    try:
        os.symlink(ctrd.socket, link)  # the runtime comes up later (or its socket gets mounted)
        wait_for(lambda: meta.container(pod.containers["c"]), timeout=15, what="metadata once the socket appears")
        assert "socket_absent" not in telemetry.failing()
        warnings = [r for r in caplog.records if "does not exist" in r.getMessage() and r.levelname == "WARNING"]
        assert len(warnings) == 1  # said once, not at every retry
    finally:
        ctrd.remove_pod(pod)


class OldRuntime(pbg.RuntimeServiceServicer):
    """A test double of an older CRI runtime (none is installable here): it implements Version and the lists,
    and answers UNIMPLEMENTED (the generated base class's behaviour) for everything else."""

    def Version(self, request, context):
        return pb.VersionResponse(version="0.1.0", runtime_name="oldrt", runtime_version="0.9",
                                  runtime_api_version="v1")

    def ListPodSandbox(self, request, context):
        return pb.ListPodSandboxResponse(items=[pb.PodSandbox(
            id="s" * 64, metadata=pb.PodSandboxMetadata(name="p", uid="u-1", namespace="n"), created_at=1)])

    def ListContainers(self, request, context):
        return pb.ListContainersResponse(containers=[pb.Container(
            id="c" * 64, pod_sandbox_id="s" * 64, metadata=pb.ContainerMetadata(name="main"), state=1,
            image=pb.ImageSpec(image="registry.local:5000/team/app:2.1@sha256:" + "0" * 64), created_at=1)])


def test_unimplemented_rpcs_degrade(make_receiver, tmp_path):
    with stand_in_runtime(OldRuntime(), tmp_path) as endpoint:
        receiver, meta, telemetry = make_receiver(endpoint)
        attrs = meta.container("c" * 64)
        assert attrs["k8s.container.name"] == "main" and attrs["k8s.pod.name"] == "p"
        assert attrs["container.image.name"] == "registry.local:5000/team/app"
        assert attrs["container.image.tag"] == "2.1"
        assert attrs["container.runtime.name"] == "oldrt"
        assert count_points(receiver.collect()) == 0  # no stats RPC: empty, no exception
        assert count_points(receiver.collect()) == 0
        assert "stats" not in telemetry.failing()


class SlowStatusRuntime(pbg.RuntimeServiceServicer):
    """A test double of a runtime whose ContainerStatus hangs (a real containerd cannot be made to): ten running
    containers; its stats list also holds an entry that names no container."""

    def __init__(self) -> None:
        self.status_calls: list[str] = []

    def Version(self, request, context):
        return pb.VersionResponse(version="0.1.0", runtime_name="slowrt", runtime_version="1", runtime_api_version="v1")

    def ListPodSandbox(self, request, context):
        return pb.ListPodSandboxResponse(items=[pb.PodSandbox(
            id=f"s{i:063d}", metadata=pb.PodSandboxMetadata(name=f"p{i}", uid=f"u-{i}", namespace="n"),
            created_at=1) for i in range(10)])

    def ListContainers(self, request, context):
        return pb.ListContainersResponse(containers=[pb.Container(
            id=f"c{i:063d}", pod_sandbox_id=f"s{i:063d}", metadata=pb.ContainerMetadata(name="main"), state=1,
            image=pb.ImageSpec(image="app:1"), created_at=1) for i in range(10)])

    def ContainerStatus(self, request, context):
        self.status_calls.append(request.container_id)
        time.sleep(1.0)  # past the receiver's request_timeout
        return pb.ContainerStatusResponse()

    def ListContainerStats(self, request, context):
        stats = [pb.ContainerStats(attributes=pb.ContainerAttributes(id=f"c{i:063d}"),
                                   cpu=pb.CpuUsage(usage_core_nano_seconds=pb.UInt64Value(value=10**9)))
                 for i in range(10)]
        stats.append(pb.ContainerStats(cpu=pb.CpuUsage(usage_core_nano_seconds=pb.UInt64Value(value=5))))
        return pb.ListContainerStatsResponse(stats=stats)


def test_a_runtime_slow_to_answer_container_status_holds_no_refresh_for_long(make_receiver, tmp_path):
    """ContainerStatus calls of one refresh share a deadline (2 x request_timeout): the rest is left for the next
    refresh, and a container whose call failed is not asked again at every refresh. Before, start-up waited one
    request_timeout per container. A stats entry with no container id is skipped, not a `container.id=""`
    series."""
    runtime = SlowStatusRuntime()
    with stand_in_runtime(runtime, tmp_path) as endpoint:
        receiver, meta, telemetry = make_receiver(endpoint, request_timeout="200ms",
                                                  metrics={"container.cpu.time": {"enabled": True}})
        asked = list(runtime.status_calls)
        assert 1 <= len(asked) < 10, asked  # start-up gave up after the refresh's deadline
        assert {"container_status", "container_status_slow"} <= telemetry.failing().keys()
        assert meta.container(f"c{0:063d}")["k8s.pod.name"] == "p0"  # the listing itself is cached all the same
        receiver._refresh("periodic")
        again = runtime.status_calls[len(asked):]
        assert again and not set(again) & set(asked)  # the others now; the failed ones wait for STATUS_RETRY
        data = receiver.collect()
        ids = {res.get("container.id") for _n, res, _a, _v in points(data)}
        assert "" not in ids and f"c{0:063d}" in ids
        assert "stats_entry" in telemetry.failing()


def test_config_errors_are_clear():
    with pytest.raises(ValidationError, match="must be a unix socket"):
        factory.config_model.model_validate({"endpoint": "tcp://127.0.0.1:1234"})
    with pytest.raises(ValidationError, match="unknown metric container.cpu.tim"):
        factory.config_model.model_validate({"metrics": {"container.cpu.tim": {"enabled": False}}})
    cfg = factory.config_model.model_validate({"endpoint": "/var/run/crio/crio.sock"})
    assert cfg.endpoint == "unix:///var/run/crio/crio.sock"
    # kubelet (Go's url.Parse) also takes the one-slash form: so does podmeter, for one config to copy
    cfg = factory.config_model.model_validate({"endpoint": "unix:/run/containerd/containerd.sock"})
    assert cfg.endpoint == "unix:///run/containerd/containerd.sock"
    with pytest.raises(ValidationError, match="must be absolute"):  # kubelet would dial /containerd/...
        factory.config_model.model_validate({"endpoint": "unix://run/containerd/containerd.sock"})


@pytest.mark.parametrize("ref,expected", [
    ("docker.io/library/nginx:1.25", ("docker.io/library/nginx", "1.25")),
    ("localhost:5000/app", ("localhost:5000/app", None)),
    ("quay.io/x/y:v1@sha256:" + "a" * 64, ("quay.io/x/y", "v1")),
    ("quay.io/x/y@sha256:" + "a" * 64, ("quay.io/x/y", None)),
    ("sha256:" + "a" * 64, (None, None)),
    ("", (None, None)),
])
def test_parse_image(ref, expected):
    assert parse_image(ref) == expected


def test_metric_toggles(ctrd, make_receiver, layers_measured):
    pod = ctrd.run_pod("quiet", "default", {"c": ["/bin/sleep", "3600"]})
    try:
        layers_measured(pod.containers["c"])
        # default: only what the runtime alone knows (the writable layer); no pod metric on, so
        # ListPodSandboxStats is not called at all
        receiver, _, _ = make_receiver(ctrd.endpoint)
        names = {p[0] for p in points(receiver.collect())}
        assert names == {"container.filesystem.usage", "container.filesystem.inodes.usage"}
        assert not receiver._pod_stats
        receiver, _, _ = make_receiver(ctrd.endpoint, metrics={
            "container.memory.working_set": {"enabled": True}, "container.filesystem.usage": {"enabled": False},
            "container.filesystem.inodes.usage": {"enabled": False}, "k8s.pod.memory.usage": {"enabled": True}})
        names = {p[0] for p in points(receiver.collect())}
        assert names == {"container.memory.working_set", "k8s.pod.memory.usage"}
        assert receiver._pod_stats
    finally:
        ctrd.remove_pod(pod)


def test_collect_does_not_block_on_a_hung_runtime(make_receiver, tmp_path):
    """A socket that accepts but never answers: every call has a deadline."""
    import socket

    sock_path = tmp_path / "hung.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))
    listener.listen(8)
    try:
        receiver, _, telemetry = make_receiver(f"unix://{sock_path}", request_timeout="300ms")
        assert count_points(receiver.collect()) == 0
        assert "connect" in telemetry.failing()
    finally:
        listener.close()


def test_harness_runs_one_containerd_at_a_time(ctrd):
    from harness.containerd import Containerd

    with pytest.raises(RuntimeError, match="another containerd harness"):
        Containerd().start(lock_timeout=0.3)


def test_state_stays_bounded_under_churn(ctrd, make_receiver):
    receiver, meta, _ = make_receiver(ctrd.endpoint, metadata_refresh_interval="1h")
    for i in range(5):
        pod = ctrd.run_pod(f"churn-{i}", "default", {"c": ["/bin/sleep", "3600"]})
        receiver._refresh("periodic")
        receiver.collect()
        assert len(meta) == 1 and len(receiver._statuses) == 1
        ctrd.remove_pod(pod)
    receiver._refresh("periodic")
    receiver.collect()
    assert len(meta) == 0 and meta.pod(pod.uid) is None
    assert receiver._statuses == {} and receiver._seen_cpu == {}
    for i in range(10000):  # a flood of unknown ids: the negative cache and pending set stay capped
        meta.container(f"{i:064x}")
    receiver._refresh("on_demand")
    assert len(receiver._pending_misses) <= 4096 and len(meta._negative) <= 4096


def test_a_pods_new_sandbox_wins_over_its_stopped_one(ctrd, make_receiver):
    old = ctrd.run_pod("flaky", "default", {"c": ["/bin/sleep", "3600"]})
    ctrd.stop_pod(old)  # its containers are killed, the NOT_READY sandbox stays listed
    try:
        new = ctrd.run_pod("flaky", "default", {}, uid=old.uid, attempt=1)
        ctrd.add_container(new, "c", ["/bin/sleep", "3600"], attempt=1)  # names are unique per attempt
        _, meta, _ = make_receiver(ctrd.endpoint)
        assert meta._snap.pods[old.uid].sandbox_id == new.sandbox_id
        assert meta.container(new.containers["c"])["k8s.pod.uid"] == old.uid
        assert meta.container(old.sandbox_id)["k8s.pod.uid"] == old.uid  # the old one still resolves
        assert meta.container_pid(new.containers["c"]) == ctrd.container_pid(new.containers["c"])
    finally:
        for pod in list(ctrd.pods):
            if pod.uid == old.uid:
                ctrd.remove_pod(pod)


def test_snapshot_prefers_ready_newest_sandboxes_and_caps_them():
    from receivers.cri.metadata import build_snapshot

    def sandbox(sid, uid, state, created):
        return pb.PodSandbox(id=sid, state=state, created_at=created,
                             metadata=pb.PodSandboxMetadata(name="db-0", namespace="prod", uid=uid))

    # a StatefulSet pod recreated under the same name: the old uid's sandbox is NOT_READY (state 1)
    listed = [sandbox("a" * 64, "old-uid", 1, 100), sandbox("b" * 64, "new-uid", 0, 200)]
    snap, dropped = build_snapshot(listed, [], {}, "containerd", 10)
    assert snap.by_name[("prod", "db-0")] == "new-uid" and dropped == 0
    assert set(snap.pods) == {"old-uid", "new-uid"}
    snap, dropped = build_snapshot(listed, [], {}, "containerd", 1)
    assert set(snap.sandboxes) == {"b" * 64} and dropped == 1


def test_pod_stats_survive_a_stopped_sandbox(ctrd, make_receiver, caplog):
    """containerd 1.6 fails ListPodSandboxStats as a whole (UNKNOWN: "... is not in ready state") while any
    sandbox is NOT_READY, which kubelet keeps around after a pod's sandbox stops. The pod stats of the running
    pods still come, from PodSandboxStats per ready sandbox; a pod with no containers has pod stats too."""
    import logging

    caplog.set_level(logging.INFO)
    running = ctrd.run_pod("running", "default", {"c": ["/bin/sleep", "3600"]})
    bare = ctrd.run_pod("bare", "default", {})  # a sandbox with no containers
    stopped = ctrd.run_pod("stopped", "default", {})
    ctrd.stop_pod(stopped)
    try:
        with pytest.raises(grpc.RpcError) as err:  # the runtime does fail the list: the test exercises it
            ctrd.rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNKNOWN
        receiver, _, telemetry = make_receiver(ctrd.endpoint, metrics={"k8s.pod.cpu.time": {"enabled": True},
                                                                       "k8s.pod.memory.working_set": {"enabled": True}})
        for _ in range(2):
            data = receiver.collect()
            for pod in (running, bare):
                assert (value_of(data, "k8s.pod.cpu.time", **{"k8s.pod.uid": pod.uid}) or 0) > 0, pod.name
                assert (value_of(data, "k8s.pod.memory.working_set", **{"k8s.pod.uid": pod.uid}) or 0) > 0, pod.name
            assert value_of(data, "k8s.pod.cpu.time", **{"k8s.pod.uid": stopped.uid}) is None
            assert "pod_stats" not in telemetry.failing() and "stats_entry" not in telemetry.failing()
        said = [r for r in caplog.records if "ListPodSandboxStats" in r.getMessage()]
        assert len(said) == 1, said  # once, not at every collection
    finally:
        for pod in (running, bare, stopped):
            ctrd.remove_pod(pod)


def test_a_writable_layer_not_measured_yet_is_not_a_zero(ctrd, make_receiver):
    """containerd answers used_bytes 0 and timestamp 0 for a container its snapshot syncer has not measured yet
    (up to stats_collect_period after it was created): omitted, not emitted as an empty layer."""
    receiver, _, _ = make_receiver(ctrd.endpoint, metadata_refresh_interval="1h")
    caught = 0
    for i in range(5):
        pod = ctrd.run_pod(f"fresh-{i}", "default", {"c": ["/bin/sleep", "3600"]})
        cid = pod.containers["c"]
        try:
            data = receiver.collect()
            raw = {s.attributes.id: s for s in ctrd.rt.ListContainerStats(pb.ListContainerStatsRequest(),
                                                                           timeout=10).stats}
            if raw[cid].writable_layer.timestamp == 0:  # still unmeasured now, so it was when collect() asked
                caught += 1
                assert value_of(data, "container.filesystem.usage", **{"container.id": cid}) is None
                assert value_of(data, "container.filesystem.inodes.usage", **{"container.id": cid}) is None
            # once measured, it is emitted (a layer always holds its root directory: an inode at least)
            inodes = wait_for(lambda cid=cid: value_of(receiver.collect(), "container.filesystem.inodes.usage",
                                                       **{"container.id": cid}), timeout=10, interval=0.3,
                              what="the measured writable layer")
            assert inodes >= 1
        finally:
            ctrd.remove_pod(pod)
        if caught >= 2:
            break
    assert caught, "never collected inside containerd's unmeasured window"


def test_a_container_removed_before_its_status_is_no_error(ctrd, make_receiver, caplog):
    """A container removed between ListContainers and its ContainerStatus (NOT_FOUND) is churn, not an error: no
    warning, nothing counted, no retry bookkeeping kept for it."""
    pod = ctrd.run_pod("short", "default", {"keep": ["/bin/sleep", "3600"]})
    try:
        receiver, meta, telemetry = make_receiver(ctrd.endpoint, metadata_refresh_interval="1h")
        doomed = ctrd.add_container(pod, "doomed", ["/bin/sleep", "3600"])
        listed = receiver.client.list_containers

        def list_then_remove():  # the real runtime's list, then the container goes, as kubelet removes it
            containers = listed()
            ctrd.remove_container(doomed)
            return containers

        receiver.client.list_containers = list_then_remove
        receiver._refresh("periodic")
        assert "container_status" not in telemetry.failing()
        assert doomed not in receiver._status_retry and doomed not in receiver._statuses
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        assert meta.container_pid(pod.containers["keep"]) == ctrd.container_pid(pod.containers["keep"])
    finally:
        ctrd.remove_pod(pod)


def test_a_v1alpha2_only_runtime_gets_a_clear_error(make_receiver, tmp_path, caplog):
    """containerd < 1.6 / CRI-O < 1.20 serve only runtime.v1alpha2 (a test double: none is installable here):
    Version on runtime.v1 is UNIMPLEMENTED. One clear warning naming CRI v1, nothing emitted, no traceback."""

    def version(request, context):
        return pb.VersionResponse(version="0.1.0", runtime_name="containerd", runtime_version="1.5.18",
                                  runtime_api_version="v1alpha2")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("runtime.v1alpha2.RuntimeService", {
        "Version": grpc.unary_unary_rpc_method_handler(version, pb.VersionRequest.FromString,
                                                       pb.VersionResponse.SerializeToString)}),))
    sock = tmp_path / "old.sock"
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    try:
        receiver, meta, telemetry = make_receiver(f"unix://{sock}", metrics={"container.cpu.time": {"enabled": True}})
        receiver._refresh("periodic")
        assert count_points(receiver.collect()) == 0
        assert set(telemetry.failing()) == {"cri_v1_unimplemented"}
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "does not serve CRI v1" in warnings[0], warnings
        assert receiver.ready(0.1) is False
    finally:
        server.stop(0)


class DenseRuntime(pbg.RuntimeServiceServicer):
    """A test double of a dense node's runtime (a real containerd cannot run thousands of pods here): replies over
    gRPC's default 4 MiB receive limit; kubelet reads up to 16 MiB, containerd sends up to 16 MiB."""

    N = 6000
    LABELS = {"io.kubernetes.pod.namespace": "batch", "annotation-ish": "x" * 800}

    def Version(self, request, context):
        return pb.VersionResponse(version="0.1.0", runtime_name="dense", runtime_version="1", runtime_api_version="v1")

    def ListPodSandbox(self, request, context):
        return pb.ListPodSandboxResponse(items=[pb.PodSandbox(
            id=f"s{i:063d}", metadata=pb.PodSandboxMetadata(name=f"p{i}", uid=f"u-{i}", namespace="batch"),
            labels=self.LABELS, created_at=1) for i in range(self.N)])

    def ListContainers(self, request, context):
        return pb.ListContainersResponse(containers=[pb.Container(
            id=f"c{i:063d}", pod_sandbox_id=f"s{i:063d}", metadata=pb.ContainerMetadata(name="main"), state=1,
            labels=self.LABELS, image=pb.ImageSpec(image="app:1"), created_at=1) for i in range(self.N)])

    def ListContainerStats(self, request, context):
        return pb.ListContainerStatsResponse(stats=[pb.ContainerStats(
            attributes=pb.ContainerAttributes(id=f"c{i:063d}", labels=self.LABELS),
            cpu=pb.CpuUsage(timestamp=1, usage_core_nano_seconds=pb.UInt64Value(value=i))) for i in range(self.N)])


def test_replies_over_4_mib(make_receiver, tmp_path):
    with stand_in_runtime(DenseRuntime(), tmp_path) as endpoint:
        with grpc.insecure_channel(endpoint) as channel:  # gRPC's default limit fails: the test exercises it
            with pytest.raises(grpc.RpcError) as err:
                pbg.RuntimeServiceStub(channel).ListContainers(pb.ListContainersRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        receiver, meta, telemetry = make_receiver(endpoint, request_timeout="20s",
                                                  metrics={"container.cpu.time": {"enabled": True}})
        assert len(meta) == DenseRuntime.N
        assert count_points(receiver.collect()) == DenseRuntime.N
        assert not {"list", "stats", "connect"} & set(telemetry.failing())


class HungStatsRuntime(OldRuntime):
    """A test double of a runtime that lists but whose stats calls hang (a real containerd stopped mid-call
    cannot be arranged deterministically)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def ListContainerStats(self, request, context):
        self.calls.append("ListContainerStats")
        time.sleep(1.0)
        return pb.ListContainerStatsResponse()

    def ListPodSandboxStats(self, request, context):
        self.calls.append("ListPodSandboxStats")
        time.sleep(1.0)
        return pb.ListPodSandboxStatsResponse()


def test_a_hung_runtime_costs_one_deadline_per_collection(make_receiver, tmp_path):
    """Once ListContainerStats has run past its deadline the runtime is not asked ListPodSandboxStats in the same
    collection: a collection stays within one request_timeout instead of two (the default request_timeout, 5 s,
    is half the default collection_interval)."""
    runtime = HungStatsRuntime()
    with stand_in_runtime(runtime, tmp_path) as endpoint:
        receiver, _, telemetry = make_receiver(endpoint, request_timeout="200ms", **ALL)
        assert count_points(receiver.collect()) == 0
        assert runtime.calls == ["ListContainerStats"]
        assert "stats" in telemetry.failing()


class SlowPodStatsRuntime(pbg.RuntimeServiceServicer):
    """A test double of containerd 1.6 on a busy node (no real runtime answers this slowly on demand): the pod
    stats list fails as a whole (a NOT_READY sandbox), and each PodSandboxStats takes a while."""

    N = 8

    def Version(self, request, context):
        return pb.VersionResponse(version="0.1.0", runtime_name="containerd", runtime_version="1.6.20",
                                  runtime_api_version="v1")

    def ListPodSandbox(self, request, context):
        return pb.ListPodSandboxResponse(items=[pb.PodSandbox(
            id=f"s{i:063d}", metadata=pb.PodSandboxMetadata(name=f"p{i}", uid=f"u-{i}", namespace="n"),
            created_at=1) for i in range(self.N)])

    def ListContainers(self, request, context):
        return pb.ListContainersResponse()

    def ListPodSandboxStats(self, request, context):
        context.abort(grpc.StatusCode.UNKNOWN, "failed to decode sandbox container metrics: sandbox is not in ready "
                                               "state")

    def PodSandboxStats(self, request, context):
        time.sleep(0.3)
        i = int(request.pod_sandbox_id[1:])
        return pb.PodSandboxStatsResponse(stats=pb.PodSandboxStats(
            attributes=pb.PodSandboxAttributes(id=request.pod_sandbox_id, metadata=pb.PodSandboxMetadata(
                name=f"p{i}", uid=f"u-{i}", namespace="n")),
            linux=pb.LinuxPodSandboxStats(cpu=pb.CpuUsage(timestamp=time.time_ns(),
                                                          usage_core_nano_seconds=pb.UInt64Value(value=10**9)))))


def test_pod_stats_per_sandbox_keep_what_came_before_the_deadline(make_receiver, tmp_path):
    """Asking PodSandboxStats per sandbox shares one request_timeout; the call in flight when it runs out gets the
    rest of it and fails DEADLINE_EXCEEDED. The pods answered before that are emitted (and the shortfall said),
    not thrown away with it, which on a slow runtime lost every pod's stats at every collection."""
    with stand_in_runtime(SlowPodStatsRuntime(), tmp_path) as endpoint:
        receiver, _, telemetry = make_receiver(endpoint, request_timeout="1s",
                                               metrics={"k8s.pod.cpu.time": {"enabled": True}})
        data = receiver.collect()
        got = [p for p in points(data) if p[0] == "k8s.pod.cpu.time"]
        assert 1 <= len(got) < SlowPodStatsRuntime.N, got  # the ones answered in time, not none, not all
        assert "pod_stats" in telemetry.failing()


def start_times(data, name: str, **resource) -> list[int]:
    return [p.start_time_unix_nano for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
            if m.name == name and all(rm.resource.attributes.get(k) == v for k, v in resource.items())
            for p in m.data.data_points]


def test_cumulative_points_start_at_creation_not_at_first_sight(ctrd, make_receiver):
    """A container (pod) created since the last metadata refresh is not cached yet. Its CPU time used to go out
    once with the receiver's start as start time, then with its creation time once cached: a start time that
    changes tells a backend the counter was reset. Its cumulative points now wait for the refresh."""
    receiver, meta, _ = make_receiver(ctrd.endpoint, metadata_refresh_interval="1h",
                                      on_demand_refresh_min_interval="1h", **ALL)
    pod = ctrd.run_pod("fresh-start", "default", {"c": ["/bin/sleep", "3600"]})
    cid = pod.containers["c"]
    try:
        data = receiver.collect()
        assert value_of(data, "container.memory.working_set", **{"container.id": cid}) is not None
        assert start_times(data, "container.cpu.time", **{"container.id": cid}) == []
        assert start_times(data, "k8s.pod.cpu.time", **{"k8s.pod.uid": pod.uid}) == []
        receiver._refresh("on_demand")
        data = receiver.collect()
        created = ctrd.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=10).status.created_at
        assert start_times(data, "container.cpu.time", **{"container.id": cid}) == [created]
        sandbox_created = ctrd.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id),
                                                   timeout=10).status.created_at
        assert start_times(data, "k8s.pod.cpu.time", **{"k8s.pod.uid": pod.uid}) == [sandbox_created]
    finally:
        ctrd.remove_pod(pod)


def test_no_false_idle_cpu_after_a_quick_runtime_restart(ctrd, make_receiver):
    """The runtime computes usage_nano_cores from its previous sample, which a restart loses: its first answer
    after it is 0. A restart between two collections goes unnoticed by the receiver (no call fails), so that 0
    was emitted as "idle" for a container busy all along."""
    pod = ctrd.run_pod("busy", "default", {"c": ["/bin/sh", "-c", "while :; do :; done"]})
    cid = pod.containers["c"]
    try:
        receiver, _, _ = make_receiver(ctrd.endpoint, metadata_refresh_interval="1h",
                                       metrics={"container.cpu.time": {"enabled": True},
                                                "container.cpu.usage": {"enabled": True}})
        receiver.collect()
        time.sleep(0.2)
        assert (value_of(receiver.collect(), "container.cpu.usage", **{"container.id": cid}) or 0) > 0
        ctrd.restart()

        def answered():
            data = receiver.collect()
            return data if value_of(data, "container.cpu.time", **{"container.id": cid}) else None

        data = wait_for(answered, timeout=30, interval=0.2, what="stats after containerd restarted")
        assert value_of(data, "container.cpu.usage", **{"container.id": cid}) != 0
        time.sleep(0.2)
        assert (value_of(receiver.collect(), "container.cpu.usage", **{"container.id": cid}) or 0) > 0
    finally:
        ctrd.remove_pod(pod)


class AllSandboxStatsRuntime(OldRuntime):
    """A test double of CRI-O (not installable here), whose ListPodSandboxStats answers for every sandbox, a pod's
    stopped one included; containerd answers for READY ones only (1.7) or fails the list (1.6)."""

    OLD, NEW = "o" * 64, "n" * 64

    def ListPodSandbox(self, request, context):
        meta = pb.PodSandboxMetadata(name="p", uid="u-1", namespace="n")
        return pb.ListPodSandboxResponse(items=[pb.PodSandbox(id=self.OLD, metadata=meta, state=1, created_at=100),
                                                pb.PodSandbox(id=self.NEW, metadata=meta, state=0, created_at=200)])

    def ListContainers(self, request, context):
        return pb.ListContainersResponse()

    def ListPodSandboxStats(self, request, context):
        meta = pb.PodSandboxMetadata(name="p", uid="u-1", namespace="n")
        return pb.ListPodSandboxStatsResponse(stats=[pb.PodSandboxStats(
            attributes=pb.PodSandboxAttributes(id=sid, metadata=meta),
            linux=pb.LinuxPodSandboxStats(memory=pb.MemoryUsage(timestamp=time.time_ns(),
                                                                working_set_bytes=pb.UInt64Value(value=value))))
            for sid, value in ((self.OLD, 0), (self.NEW, 5 << 20))])


def test_a_pods_stopped_sandbox_listed_in_pod_stats_makes_no_second_series(make_receiver, tmp_path):
    with stand_in_runtime(AllSandboxStatsRuntime(), tmp_path) as endpoint:
        receiver, _, _ = make_receiver(endpoint, metrics={"k8s.pod.memory.working_set": {"enabled": True}})
        got = [p[3] for p in points(receiver.collect()) if p[0] == "k8s.pod.memory.working_set"]
        assert got == [5 << 20]  # the running sandbox's, not also the stopped one's 0 under the same pod


def test_an_exited_container_has_no_pid(ctrd, make_receiver):
    """A container's host PID dies with it and may be reused by any process: container_pid() of an exited
    container (kubelet keeps them listed until garbage collection) is None, not the PID it once had."""
    pod = ctrd.run_pod("exits", "default", {"c": ["/bin/sleep", "3600"]})
    cid = pod.containers["c"]
    try:
        receiver, meta, _ = make_receiver(ctrd.endpoint, metadata_refresh_interval="1h")
        assert meta.container_pid(cid) == ctrd.container_pid(cid)
        ctrd.stop_pod(pod)  # its containers are killed and stay listed as EXITED
        receiver._refresh("periodic")
        assert meta.container_info(cid).state == pb.CONTAINER_EXITED
        assert meta.container_pid(cid) is None
    finally:
        ctrd.remove_pod(pod)


class HugeListRuntime(OldRuntime):
    """A test double of a node whose container list is over the receiver's 64 MiB limit (a real containerd cannot
    hold that many containers here); its stats still fit."""

    def ListContainers(self, request, context):
        big = {"blob": "x" * (1 << 20)}
        return pb.ListContainersResponse(containers=[pb.Container(
            id=f"c{i:063d}", pod_sandbox_id="s" * 64, metadata=pb.ContainerMetadata(name="main"), state=1,
            annotations=big) for i in range(70)])

    def ListContainerStats(self, request, context):
        return pb.ListContainerStatsResponse(stats=[pb.ContainerStats(
            attributes=pb.ContainerAttributes(id="c" * 64, labels={"io.kubernetes.pod.uid": "u-1"}),
            memory=pb.MemoryUsage(timestamp=1, working_set_bytes=pb.UInt64Value(value=4096)))])


def test_a_container_list_over_the_receive_limit_does_not_stop_stats(make_receiver, tmp_path):
    with stand_in_runtime(HugeListRuntime(), tmp_path) as endpoint:
        receiver, _, telemetry = make_receiver(endpoint, metadata_refresh_interval="1h",
                                               metrics={"container.memory.working_set": {"enabled": True}})
        assert "list" in telemetry.failing()  # RESOURCE_EXHAUSTED: counted and said
        data = receiver.collect()
        assert value_of(data, "container.memory.working_set", **{"container.id": "c" * 64}) == 4096


class UpgradedRuntime(OldRuntime):
    """The same test double after an in-place upgrade: it now serves the stats RPCs."""

    def ListContainerStats(self, request, context):
        return pb.ListContainerStatsResponse(stats=[pb.ContainerStats(
            attributes=pb.ContainerAttributes(id="c" * 64),
            writable_layer=pb.FilesystemUsage(timestamp=1, used_bytes=pb.UInt64Value(value=8192)))])

    def ListPodSandboxStats(self, request, context):
        return pb.ListPodSandboxStatsResponse(stats=[pb.PodSandboxStats(
            attributes=pb.PodSandboxAttributes(id="s" * 64, metadata=pb.PodSandboxMetadata(
                name="p", uid="u-1", namespace="n")),
            linux=pb.LinuxPodSandboxStats(memory=pb.MemoryUsage(timestamp=1, usage_bytes=pb.UInt64Value(value=7))))])


def test_stats_rpcs_are_asked_again_after_the_runtime_is_replaced(make_receiver, tmp_path):
    """UNIMPLEMENTED stats RPCs turned container and pod stats off for good: a runtime upgraded in place (the
    agent keeps running) was never asked again. A new handshake (the runtime came back) asks again, as a
    failed ListPodSandboxStats already is."""
    sock = tmp_path / "rt.sock"

    def serve(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pbg.add_RuntimeServiceServicer_to_server(servicer, server)
        server.add_insecure_port(f"unix://{sock}")
        server.start()
        return server

    server = serve(OldRuntime())
    try:
        receiver, meta, telemetry = make_receiver(f"unix://{sock}",
                                                  metrics={"k8s.pod.memory.usage": {"enabled": True}})
        assert count_points(receiver.collect()) == 0  # both stats RPCs UNIMPLEMENTED: off
    finally:
        server.stop(None)
    receiver._refresh("periodic")  # the runtime is gone: the next refresh handshakes again
    server = serve(UpgradedRuntime())
    try:
        assert receiver._refresh("periodic")
        data = receiver.collect()
        assert value_of(data, "container.filesystem.usage", **{"container.id": "c" * 64}) == 8192
        assert value_of(data, "k8s.pod.memory.usage", **{"k8s.pod.uid": "u-1"}) == 7
    finally:
        server.stop(None)
