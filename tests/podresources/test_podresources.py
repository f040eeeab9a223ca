"""The podresources receiver against a PodResources v1 gRPC server.

No kubelet can run here, so the server is the test's own (a double built on the project's proto, serving over a
real unix socket with real gRPC): it stands in for the kubelet only, the client side is the real receiver.
"""

from __future__ import annotations

import logging
import os
import threading

import grpc
import pytest
from harness import points, wait_for
from pydantic import ValidationError

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.metrics import count_points
from podmeter.telemetry import null_component_telemetry
from receivers.podresources import api_pb2 as pb
from receivers.podresources import api_pb2_grpc as pbg
from receivers.podresources import factory

from .conftest import GPU0, GPU1, GPU2, MIG_A, MIG_B, Kubelet, Server, pod

NODE = [
    pod("train-0", "ml", {"trainer": [("nvidia.com/gpu", [GPU0, GPU1])], "logger": []}),
    pod("infer-a", "serving", {"server": [("nvidia.com/mig-1g.10gb", [MIG_A])]}),
    pod("infer-b", "serving", {"server": [("nvidia.com/mig-1g.10gb", [MIG_B]), ("example.com/nic", ["nic0"])]}),
    pod("web", "shop", {"app": []}),
]
ALLOCATABLE = [("nvidia.com/gpu", [GPU0, GPU1, GPU2]), ("nvidia.com/mig-1g.10gb", [MIG_A, MIG_B]),
               ("example.com/nic", ["nic0", "nic1"])]


def test_gpus_and_mig_devices_map_to_pods(server, make_receiver, tmp_path):
    server.start(Kubelet(NODE, ALLOCATABLE))
    # kubelet_root_dir: the socket is found under a moved kubelet root
    receiver, provider, telemetry = make_receiver(kubelet_root_dir=server.root)
    got = provider.assignments()
    assert set(got) == {GPU0, GPU1, MIG_A, MIG_B}  # example.com/nic is not tracked by default
    assert got[GPU0] == [{"k8s.pod.name": "train-0", "k8s.namespace.name": "ml", "k8s.container.name": "trainer",
                          "k8s.resource.name": "nvidia.com/gpu"}]
    assert got[MIG_B][0]["k8s.pod.name"] == "infer-b" and got[MIG_B][0]["k8s.resource.name"] == "nvidia.com/mig-1g.10gb"
    pts = points(receiver.collect())
    allocated = {(p[2]["hw.id"], p[1]["k8s.pod.name"], p[1]["k8s.container.name"]): p[3]
                 for p in pts if p[0] == "k8s.container.device.allocated"}
    assert allocated == {(GPU0, "train-0", "trainer"): 1, (GPU1, "train-0", "trainer"): 1,
                         (MIG_A, "infer-a", "server"): 1, (MIG_B, "infer-b", "server"): 1}
    node_alloc = {p[2]["k8s.resource.name"]: p[3] for p in pts if p[0] == "k8s.node.device.allocated"}
    assert node_alloc == {"nvidia.com/gpu": 2, "nvidia.com/mig-1g.10gb": 2}
    allocatable = {p[2]["k8s.resource.name"]: p[3] for p in pts if p[0] == "k8s.node.device.allocatable"}
    assert allocatable == {"nvidia.com/gpu": 3, "nvidia.com/mig-1g.10gb": 2}
    assert telemetry.failing() == {}


def test_other_resource_names_are_configurable(server, make_receiver):
    server.start(Kubelet(NODE, ALLOCATABLE))
    _, provider, _ = make_receiver(endpoint=f"unix://{server.path}", resource_names=["example.com/*"])
    assert set(provider.assignments()) == {"nic0"}


def test_time_sliced_replicas_map_to_the_physical_gpu(server, make_receiver):
    shared = [pod("a", "x", {"c": [("nvidia.com/gpu", [f"{GPU2}::0", f"{GPU2}::1"])]}),
              pod("b", "x", {"c": [("nvidia.com/gpu", [f"{GPU2}::2"])]})]
    server.start(Kubelet(shared, [("nvidia.com/gpu", [f"{GPU2}::{i}" for i in range(4)])]))
    receiver, provider, _ = make_receiver(endpoint=f"unix://{server.path}")
    entries = provider.assignments()[GPU2]
    assert sorted(e["k8s.pod.name"] for e in entries) == ["a", "a", "b"]
    assert provider.device(f"{GPU2}::7") == entries
    pts = points(receiver.collect())
    units = {p[1]["k8s.pod.name"]: p[3] for p in pts if p[0] == "k8s.container.device.allocated"}
    assert units == {"a": 2, "b": 1}  # one series per container and GPU, no duplicates
    assert [p[3] for p in pts if p[0] == "k8s.node.device.allocatable"] == [1]


def test_replies_over_4_mib(server, make_receiver):
    # ~6 MiB: 20,000 pods with a device each, as on nodes with many device-plugin resources
    big = [pod(f"pod-{i:05d}-" + "x" * 200, "batch", {"main": [("nvidia.com/gpu", [f"GPU-{i:036d}"])]})
           for i in range(20000)]
    size = pb.ListPodResourcesResponse(pod_resources=big).ByteSize()
    assert size > 4 << 20
    server.start(Kubelet(big))
    # a client with gRPC's default limit fails: the test does exercise the limit
    with grpc.insecure_channel(f"unix://{server.path}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            pbg.PodResourcesListerStub(channel).List(pb.ListPodResourcesRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}")
    assert len(provider.assignments()) == 20000
    assert telemetry.failing() == {}


def test_kubelet_restart_is_survived(server, make_receiver):
    server.start(Kubelet(NODE, ALLOCATABLE))
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}", refresh_interval="100ms")
    assert provider.assignments()[GPU0][0]["k8s.pod.name"] == "train-0"
    server.stop()  # gRPC removes the socket, as a stopping kubelet leaves none behind
    wait_for(lambda: {"list", "socket_absent"} & set(telemetry.failing()), timeout=10, what="the outage noticed")
    # what was allocated stays allocated while the kubelet restarts
    assert GPU0 in provider.assignments()
    assert receiver.collect().resource_metrics
    moved = [pod("train-1", "ml", {"trainer": [("nvidia.com/gpu", [GPU0])]})]
    server.start(Kubelet(moved, ALLOCATABLE))
    wait_for(lambda: provider.assignments().get(GPU0, [{}])[0].get("k8s.pod.name") == "train-1", timeout=20,
             what="allocations from the restarted kubelet")
    assert set(provider.assignments()) == {GPU0}
    wait_for(lambda: not ({"list", "socket_absent"} & set(telemetry.failing())), timeout=10, what="recovery")


def test_socket_absent_is_said_once_and_retried(make_receiver, tmp_path, caplog):
    server = Server(tmp_path / "later")
    os.rmdir(f"{server.root}/pod-resources")
    receiver, provider, telemetry = make_receiver(kubelet_root_dir=server.root)  # must not raise
    assert provider.assignments() == {}
    assert count_points(receiver.collect()) == 0
    assert "socket_absent" in telemetry.failing()
    assert receiver.ready(0.1) is False
    os.makedirs(f"{server.root}/pod-resources")
    server.start(Kubelet(NODE, ALLOCATABLE))
    try:
        wait_for(lambda: provider.assignments(), timeout=15, what="allocations once the kubelet socket appears")
    finally:
        server.stop()
    warnings = [r for r in caplog.records if "does not exist" in r.getMessage()]
    assert len(warnings) == 1


def test_older_kubelet_without_allocatable(server, make_receiver, caplog):
    caplog.set_level(logging.INFO)
    server.start(Kubelet(NODE, implement_allocatable=False))
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}")
    assert GPU0 in provider.assignments()
    names = {p[0] for p in points(receiver.collect())}
    assert names == {"k8s.container.device.allocated", "k8s.node.device.allocated"}
    assert telemetry.failing() == {}
    assert any("GetAllocatableResources" in r.getMessage() for r in caplog.records)


def test_allocatable_is_asked_again_after_unimplemented(server, make_receiver):
    """A kubelet upgraded (or restarted with the feature gate on) is found again without restarting podmeter."""
    kubelet = Kubelet(NODE, ALLOCATABLE, implement_allocatable=False)
    server.start(kubelet)
    receiver, _, _ = make_receiver(endpoint=f"unix://{server.path}")
    assert "k8s.node.device.allocatable" not in {p[0] for p in points(receiver.collect())}
    kubelet.implement_allocatable = True
    receiver._refresh()
    assert "k8s.node.device.allocatable" not in {p[0] for p in points(receiver.collect())}  # not at every refresh
    receiver._allocatable_retry_at = 0.0  # ALLOCATABLE_RETRY has passed
    receiver._refresh()
    assert "k8s.node.device.allocatable" in {p[0] for p in points(receiver.collect())}


def test_odd_replies_are_not_passed_through(server, make_receiver):
    """A whole device listed twice for one container is one device; an empty device id or pod name names
    nothing and is skipped."""
    odd = [pod("a", "x", {"c": [("nvidia.com/gpu", [GPU0, GPU0, ""])]}),
           pod("", "x", {"c": [("nvidia.com/gpu", [GPU1])]})]
    server.start(Kubelet(odd, ALLOCATABLE))
    receiver, provider, _ = make_receiver(endpoint=f"unix://{server.path}")
    assert set(provider.assignments()) == {GPU0}
    pts = points(receiver.collect())
    assert [p[3] for p in pts if p[0] == "k8s.container.device.allocated"] == [1]
    assert all(p[2].get("hw.id") != "" and p[1].get("hw.id") != "" for p in pts)


def test_pod_uid_from_the_cri_cache(server, make_receiver):
    class Cri:  # what the cri receiver publishes; its real behaviour is tested in tests/cri
        def pod_by_name(self, namespace, name):
            return {"k8s.pod.uid": "0f0e0d0c-0000-4000-8000-000000000001"} if name == "train-0" else None

    host = Host()
    host.publish("container_metadata", Cri())
    server.start(Kubelet(NODE, ALLOCATABLE))
    receiver, provider, _ = make_receiver(host=host, endpoint=f"unix://{server.path}")
    assert provider.assignments()[GPU0][0]["k8s.pod.uid"] == "0f0e0d0c-0000-4000-8000-000000000001"
    assert "k8s.pod.uid" not in provider.assignments()[MIG_A][0]


def test_config_errors_are_clear():
    with pytest.raises(ValidationError, match="not both"):
        factory.config_model.model_validate({"endpoint": "unix:///x.sock", "kubelet_root_dir": "/var/lib/k"})
    with pytest.raises(ValidationError, match="must be an absolute path"):
        factory.config_model.model_validate({"kubelet_root_dir": "var/lib/kubelet"})
    with pytest.raises(ValidationError, match="must be a unix socket"):
        factory.config_model.model_validate({"endpoint": "localhost:10250"})
    cfg = factory.config_model.model_validate({})
    assert cfg.endpoint == "unix:///var/lib/kubelet/pod-resources/kubelet.sock"


def test_concurrent_readers_see_whole_snapshots(server, make_receiver):
    server.start(Kubelet(NODE, ALLOCATABLE))
    receiver, provider, _ = make_receiver(endpoint=f"unix://{server.path}", refresh_interval="10ms")
    bad = []

    def read():
        for _ in range(300):
            got = provider.assignments()
            if set(got) != {GPU0, GPU1, MIG_A, MIG_B}:
                bad.append(got)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def test_gke_time_sharing_replicas_map_to_their_device(server, make_receiver):
    # GKE's device plugin names devices by device node, and its time-sharing replicas "<device>/vgpu<n>"
    # (container-engine-accelerators' gpusharing): one GPU, or one MIG device, however many replicas
    shared = [pod("a", "x", {"c": [("nvidia.com/gpu", ["nvidia0/vgpu0", "nvidia0/vgpu1"])]}),
              pod("b", "x", {"c": [("nvidia.com/gpu", ["nvidia1/gi2/vgpu3"])]})]
    server.start(Kubelet(shared, [("nvidia.com/gpu", ["nvidia0/vgpu0", "nvidia0/vgpu1", "nvidia1/gi2/vgpu3"])]))
    receiver, provider, _ = make_receiver(endpoint=f"unix://{server.path}")
    table = provider.assignments()
    assert set(table) == {"nvidia0", "nvidia1/gi2"}
    assert sorted(e["k8s.device.id"] for e in table["nvidia0"]) == ["nvidia0/vgpu0", "nvidia0/vgpu1"]
    pts = points(receiver.collect())
    assert {p[1]["k8s.pod.name"]: p[3] for p in pts if p[0] == "k8s.container.device.allocated"} == {"a": 2, "b": 1}
    assert [p[3] for p in pts if p[0] == "k8s.node.device.allocated"] == [2]
    assert [p[3] for p in pts if p[0] == "k8s.node.device.allocatable"] == [2]


def test_allocatable_behind_its_feature_gate_is_no_error_storm(server, make_receiver, caplog):
    """Kubelet 1.21-1.22 has GetAllocatableResources but, with its feature gate off (the default until 1.23),
    answers UNKNOWN "... disabled" rather than UNIMPLEMENTED: one log line, no error at every refresh."""
    caplog.set_level(logging.INFO)
    kubelet = Kubelet(NODE, ALLOCATABLE, allocatable_gate=False)
    server.start(kubelet)
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}")
    for _ in range(3):
        receiver._refresh()
    assert kubelet.allocatable_calls == 1  # asked again only after ALLOCATABLE_RETRY
    assert GPU0 in provider.assignments()
    assert "k8s.node.device.allocatable" not in {p[0] for p in points(receiver.collect())}
    assert telemetry.failing() == {}
    said = [r for r in caplog.records if "GetAllocatableResources" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO", said


def test_a_node_with_no_allocations_reports_zero_allocated(server, make_receiver):
    """When the last GPU pod ends, k8s.node.device.allocated is 0 (not a series that stops, which a backend
    keeps showing at its last value) for every resource the node can allocate."""
    kubelet = Kubelet(NODE, ALLOCATABLE)
    server.start(kubelet)
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}")
    kubelet.pods = [pod("web", "shop", {"app": []})]  # the GPU pods are gone
    receiver._refresh()
    assert provider.assignments() == {}
    pts = points(receiver.collect())
    assert not [p for p in pts if p[0] == "k8s.container.device.allocated"]
    node_alloc = {p[2]["k8s.resource.name"]: p[3] for p in pts if p[0] == "k8s.node.device.allocated"}
    assert node_alloc == {"nvidia.com/gpu": 0, "nvidia.com/mig-1g.10gb": 0}
    kubelet.pods = []  # an empty node: List answers no pods at all
    receiver._refresh()
    assert {p[2]["k8s.resource.name"]: p[3] for p in points(receiver.collect())
            if p[0] == "k8s.node.device.allocated"} == node_alloc
    assert telemetry.failing() == {}


def test_topology_and_dynamic_resources_decode(server, make_receiver):
    """A current kubelet's reply with NUMA topology, CPU ids, memory and DRA claims decodes; the device plugin
    devices are mapped as before, and the claimed GPU (no API server to name its UUID: auth_type none) under its
    driver's name (test_dra.py has the rest)."""
    numa = pb.TopologyInfo(nodes=[pb.NUMANode(ID=1)])
    rich = [pb.PodResources(name="train-0", namespace="ml", containers=[pb.ContainerResources(
        name="trainer", cpu_ids=[2, 3],
        devices=[pb.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=[GPU0], topology=numa)],
        memory=[pb.ContainerMemory(memory_type="memory", size=1 << 30, topology=numa)],
        dynamic_resources=[pb.DynamicResource(claim_name="gpu-claim", claim_namespace="ml", claim_resources=[
            pb.ClaimResource(driver_name="gpu.nvidia.com", pool_name="node-a", device_name="gpu-1",
                             cdi_devices=[pb.CDIDevice(name="nvidia.com/gpu=gpu-1")])])])])]
    server.start(Kubelet(rich, ALLOCATABLE))
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}", dra={"auth_type": "none"})
    assert set(provider.assignments()) == {GPU0, "gpu.nvidia.com/node-a/gpu-1"}
    assert telemetry.failing() == {}


def test_renamed_shared_gpus_are_tracked_by_default(server, make_receiver):
    """The NVIDIA device plugin with `renameByDefault: true` advertises time-sliced (or MPS-shared) GPUs as
    nvidia.com/gpu.shared: the default resource_names track them like nvidia.com/gpu."""
    shared = [pod("a", "x", {"c": [("nvidia.com/gpu.shared", [f"{GPU2}::0"])]}),
              pod("b", "x", {"c": [("nvidia.com/gpu.shared", [f"{GPU2}::1"])]})]
    server.start(Kubelet(shared, [("nvidia.com/gpu.shared", [f"{GPU2}::{i}" for i in range(4)])]))
    receiver, provider, _ = make_receiver(endpoint=f"unix://{server.path}")
    assert sorted(e["k8s.pod.name"] for e in provider.assignments()[GPU2]) == ["a", "b"]
    pts = points(receiver.collect())
    assert [p[3] for p in pts if p[0] == "k8s.node.device.allocatable"] == [1]


def test_allocatable_stops_when_a_restarted_kubelet_no_longer_serves_it(server, make_receiver):
    """A kubelet restarted with GetAllocatableResources off (downgraded, gate turned off): its last answer is not
    reported on forever, nor used to report 0 allocated for resources the node may no longer have."""
    kubelet = Kubelet(NODE, ALLOCATABLE)
    server.start(kubelet)
    receiver, _, telemetry = make_receiver(endpoint=f"unix://{server.path}")
    assert "k8s.node.device.allocatable" in {p[0] for p in points(receiver.collect())}
    kubelet.allocatable_gate = False
    kubelet.pods = []
    receiver._refresh()
    pts = points(receiver.collect())
    assert "k8s.node.device.allocatable" not in {p[0] for p in pts}
    assert not [p for p in pts if p[0] == "k8s.node.device.allocated"]
    assert telemetry.failing() == {}


@pytest.fixture(scope="module")
def ctrd():
    from harness.containerd import running

    with running() as c:
        yield c


def test_ended_pods_that_the_kubelet_still_lists_are_left_out(ctrd, server, make_receiver):
    """Kubelets before kubernetes#132028 keep listing the devices of a pod that has ended (a completed Job, an
    evicted pod) until the pod object is deleted, while the device plugin gives them to a new pod. With the cri
    receiver's cache (a real containerd here; the kubelet is the test's stand-in), a pod whose sandboxes are all
    stopped is left out; a running pod, a pod whose sandbox is being recreated and a pod the runtime does not know
    yet (just admitted) keep their devices."""
    import receivers.cri

    done = ctrd.run_pod("job-1-abcde", "batch", {"main": ["/bin/sleep", "3600"]})
    running = ctrd.run_pod("trainer", "ml", {"main": ["/bin/sleep", "3600"]})
    flaky = ctrd.run_pod("flaky", "ml", {"main": ["/bin/sleep", "3600"]})
    try:
        ctrd.stop_pod(flaky)  # an old NOT_READY sandbox next to the pod's new READY one: it runs
        ctrd.run_pod("flaky", "ml", {}, uid=flaky.uid, attempt=1)
        host = Host()
        telemetry = null_component_telemetry("cri", logging.getLogger("test.cri"))
        cri = receivers.cri.factory.create(
            CreateSettings(id=ComponentID("cri"), kind="receiver", logger=telemetry.logger, telemetry=telemetry),
            receivers.cri.factory.config_model.model_validate({"endpoint": ctrd.endpoint,
                                                               "metadata_refresh_interval": "1h"}))
        cri.start(host)
        try:
            kubelet = Kubelet([pod("job-1-abcde", "batch", {"main": [("nvidia.com/gpu", [GPU0])]}),
                               pod("trainer", "ml", {"main": [("nvidia.com/gpu", [GPU1])]}),
                               pod("flaky", "ml", {"main": [("nvidia.com/gpu", [MIG_A])]})], ALLOCATABLE)
            server.start(kubelet)
            receiver, provider, ptel = make_receiver(host=host, endpoint=f"unix://{server.path}",
                                                     refresh_interval="1h")
            assert provider.assignments()[GPU0][0]["k8s.pod.uid"] == done.uid  # while it runs, it holds GPU0

            ctrd.stop_pod(done)  # the Job completed: kubelet stops its sandbox but keeps listing its devices
            cri._refresh("periodic")
            # the device plugin gives GPU0 to the next pod, which the runtime does not know yet (just admitted)
            kubelet.pods = [*kubelet.pods, pod("job-2-fghij", "batch", {"main": [("nvidia.com/gpu", [GPU0])]})]
            receiver._refresh()
            got = provider.assignments()
            assert [e["k8s.pod.name"] for e in got[GPU0]] == ["job-2-fghij"]
            assert "k8s.pod.uid" not in got[GPU0][0]
            assert [(e["k8s.pod.name"], e["k8s.pod.uid"]) for e in got[GPU1]] == [("trainer", running.uid)]
            assert [(e["k8s.pod.name"], e["k8s.pod.uid"]) for e in got[MIG_A]] == [("flaky", flaky.uid)]
            pts = points(receiver.collect())
            holders = {(p[2]["hw.id"], p[1]["k8s.pod.name"]) for p in pts if p[0] == "k8s.container.device.allocated"}
            assert holders == {(GPU0, "job-2-fghij"), (GPU1, "trainer"), (MIG_A, "flaky")}
            assert ptel.telemetry.registry.get_sample_value(
                "podmeter_podresources_terminated_pods", {"component": "podresources"}) == 1
            assert ptel.failing() == {}
        finally:
            cri.shutdown()
    finally:
        for p in list(ctrd.pods):
            if p.uid in (done.uid, running.uid, flaky.uid):
                ctrd.remove_pod(p)
