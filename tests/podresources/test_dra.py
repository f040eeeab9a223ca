"""Devices claimed through DRA: named by the kubelet as their driver names them, reported under their UUID from
this node's ResourceSlices.

Two stand-ins, as in test_podresources.py and the k8sattributes tests (no kubelet or kube-apiserver can run here):
the kubelet's PodResources server is the test's own gRPC server on the project's proto, and the API server is the
loopback stand-in of tests/harness/apiserver.py; the receiver, its gRPC client and the real `kubernetes` client
are the real ones.
"""

from __future__ import annotations

import pytest
from harness import points, wait_for
from harness.apiserver import ApiServer

from receivers.podresources import api_pb2 as pb
from receivers.podresources import slices

from .conftest import GPU0, GPU1, GPU2, MIG_A, Kubelet, pod

NODE = "node-a"
DRIVER = "gpu.nvidia.com"


def claimed(name, namespace, container, *devices):
    """A pod whose container holds DRA claim `<name>-claim` with devices (driver, pool, device)."""
    return pb.PodResources(name=name, namespace=namespace, containers=[pb.ContainerResources(
        name=container, dynamic_resources=[pb.DynamicResource(
            claim_name=f"{name}-claim", claim_namespace=namespace, claim_resources=[
                pb.ClaimResource(driver_name=d, pool_name=p, device_name=n, cdi_devices=[pb.CDIDevice(
                    name=f"k8s.{d}/claim={n}")]) for d, p, n in devices])])])


def resource_slice(name, node, driver, devices, generation=1, beta1=False):
    """A ResourceSlice as the driver publishes it: devices (name, uuid); v1beta1 nests attributes under `basic`
    and this one qualifies the attribute with the driver's domain."""
    out = []
    for dev, uuid in devices:
        if beta1:
            out.append({"name": dev, "basic": {"attributes": {f"{driver}/uuid": {"string": uuid},
                                                              "index": {"int": 0}}}})
        else:
            out.append({"name": dev, "attributes": {"uuid": {"string": uuid}, "productName": {"string": "H100"},
                                                    "index": {"int": 0}}})
    return {"metadata": {"name": name}, "spec": {"driver": driver, "nodeName": node,
                                                 "pool": {"name": node, "generation": generation,
                                                          "resourceSliceCount": 1}, "devices": out}}


# a pod holding a claimed GPU beside one holding a device plugin GPU; allocated() of it while the claimed GPU's UUID
# is not known
MIXED = [claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-1")),
         pod("infer", "serving", {"server": [("nvidia.com/gpu", [GPU0])]})]
MIXED_BY_NAME = [(GPU0, "nvidia.com/gpu", "infer", 1), (f"{DRIVER}/{NODE}/gpu-1", DRIVER, "train-0", 1)]


@pytest.fixture
def api(tmp_path):
    with ApiServer() as a:
        a.create("resourceslices", None, resource_slice("node-a-gpu", NODE, DRIVER, [("gpu-0", GPU0),
                                                                                     ("gpu-1", GPU1)]))
        # another node's pool (same device names) and another driver on this node: neither may be used
        a.create("resourceslices", None, resource_slice("node-b-gpu", "node-b", DRIVER, [("gpu-1", GPU2)]))
        a.create("resourceslices", None, resource_slice("node-a-nic", NODE, "nic.example.com", [("gpu-1", "NIC")]))
        yield a


def dra(api, tmp_path, **extra):
    return {"auth_type": "kubeConfig", "kube_config_path": api.write_kubeconfig(tmp_path), "node_name": NODE,
            **extra}


def allocated(receiver):
    return sorted((p[2]["hw.id"], p[2]["k8s.resource.name"], p[1].get("k8s.pod.name"), p[3])
                  for p in points(receiver.collect()) if p[0] == "k8s.container.device.allocated")


def slice_lists(api):
    return [r for r in api.requests if r.resource == "resourceslices" or "resourceslices" in r.path]


def test_claimed_gpu_is_reported_under_its_uuid(server, make_receiver, api, tmp_path):
    server.start(Kubelet(MIXED))
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path))
    assert allocated(receiver) == [(GPU0, "nvidia.com/gpu", "infer", 1), (GPU1, DRIVER, "train-0", 1)]
    (entry,) = provider.device(GPU1)  # what nvml attributes an idle GPU by
    assert (entry["k8s.pod.name"], entry["k8s.namespace.name"], entry["k8s.container.name"]) == \
        ("train-0", "ml", "trainer")
    node = {p[2]["k8s.resource.name"]: p[3] for p in points(receiver.collect()) if p[0] == "k8s.node.device.allocated"}
    assert node == {DRIVER: 1, "nvidia.com/gpu": 1}
    (req,) = slice_lists(api)
    assert req.query.get("fieldSelector") == f"spec.nodeName={NODE}"
    assert telemetry.failing() == {}


def test_node_without_claims_never_asks_the_api_server(server, make_receiver, api, tmp_path):
    server.start(Kubelet([pod("infer", "serving", {"server": [("nvidia.com/gpu", [GPU0])]}),
                          claimed("nic-user", "net", "app", ("nic.example.com", NODE, "gpu-1"))]))
    receiver, provider, _ = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path))
    receiver._refresh()
    # the NIC driver's claim is not tracked (dra.drivers): no device, no listing
    assert allocated(receiver) == [(GPU0, "nvidia.com/gpu", "infer", 1)]
    assert set(provider.assignments()) == {GPU0}
    assert slice_lists(api) == []


def test_older_api_server_serves_v1beta1(server, make_receiver, tmp_path):
    with ApiServer(served={"resourceslices": "resource.k8s.io/v1beta1"}) as api:
        api.create("resourceslices", None, resource_slice("s", NODE, DRIVER, [("gpu-0", GPU0),
                                                                                ("gpu-0-mig-1", MIG_A)], beta1=True))
        server.start(Kubelet([claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-0-mig-1"))]))
        receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path))
        assert allocated(receiver) == [(MIG_A, DRIVER, "train-0", 1)]
        assert [r.path.split("?")[0] for r in slice_lists(api)] == [
            "/apis/resource.k8s.io/v1/resourceslices", "/apis/resource.k8s.io/v1beta2/resourceslices",
            "/apis/resource.k8s.io/v1beta1/resourceslices"]
        assert telemetry.failing() == {}


def test_refused_listing_keeps_the_drivers_names(server, make_receiver, api, tmp_path, caplog):
    api.forbid("resourceslices")
    server.start(Kubelet(MIXED))
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path))
    # nothing is lost: the claimed GPU is there under its driver's name, the device plugin's as before
    assert allocated(receiver) == MIXED_BY_NAME
    assert "grant the agent's ClusterRole list on resourceslices" in telemetry.failing()["resourceslices"]
    assert sum("ResourceSlices was refused" in r.getMessage() for r in caplog.records) == 1


def test_failed_listing_is_tried_again_backing_off(server, make_receiver, api, tmp_path):
    """A refused (or failed) listing is tried again after RELIST_MIN, then twice as long each time up to
    refresh_interval: thousands of nodes do not ask every refresh while RBAC is missing; once granted, the UUIDs
    come back without a restart."""
    fault = api.forbid("resourceslices")
    server.start(Kubelet([claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-1"))]))
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path))
    state = receiver._slices

    def after(seconds):  # the last listing `seconds` earlier, then a refresh
        state._listed_at -= seconds
        receiver._refresh()
        return len(slice_lists(api))

    assert len(slice_lists(api)) == 1
    assert after(0) == 1
    assert after(slices.RELIST_MIN + 1) == 2
    assert after(slices.RELIST_MIN + 1) == 2  # backed off to twice RELIST_MIN
    assert after(slices.RELIST_MIN) == 3
    api.clear(fault)
    assert after(4 * slices.RELIST_MIN + 1) == 4
    assert set(provider.assignments()) == {GPU1} and "resourceslices" not in telemetry.failing()
    assert after(slices.RELIST_MIN + 1) == 4  # listed: the next one at refresh_interval
    assert after(300) == 5


def test_device_the_slices_do_not_name_is_not_looked_up_every_time(server, make_receiver, api, tmp_path,
                                                                   monkeypatch):
    """A tracked driver that publishes no UUID attribute: its devices keep their names until the regular listing,
    without a listing at every refresh; a device claimed since is looked up at once."""
    monkeypatch.setattr(slices, "RELIST_MIN", 0.0)
    kubelet = Kubelet([claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-9"))])
    server.start(kubelet)
    receiver, provider, _ = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path))
    receiver._refresh()
    receiver._refresh()
    assert len(slice_lists(api)) == 1 and set(provider.assignments()) == {f"{DRIVER}/{NODE}/gpu-9"}
    api.create("resourceslices", None, resource_slice("node-a-gpu-2", NODE, DRIVER, [("gpu-2", GPU2)]))
    kubelet.pods = [claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-9"), (DRIVER, NODE, "gpu-2"))]
    receiver._refresh()
    assert len(slice_lists(api)) == 2 and set(provider.assignments()) == {f"{DRIVER}/{NODE}/gpu-9", GPU2}


def test_malformed_listing_is_counted_and_the_rest_runs(server, make_receiver, api, tmp_path):
    """A listing that is not what the API server serves (a proxy's answer: a generation that is no number) is
    reported, and the receiver goes on: device plugin GPUs as before, the claimed one under its driver's name."""
    bad = resource_slice("node-a-bad", NODE, DRIVER, [("gpu-5", GPU2)])
    bad["spec"]["pool"]["generation"] = "seven"
    api.create("resourceslices", None, bad)
    server.start(Kubelet(MIXED))
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path))
    assert allocated(receiver) == MIXED_BY_NAME
    assert "malformed" in telemetry.failing()["resourceslices"]
    assert receiver._refresh()  # the refresh itself goes on


def test_api_server_without_dra(server, make_receiver, tmp_path):
    with ApiServer(served={"resourceslices": None}) as api:
        server.start(Kubelet([claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-1"))]))
        receiver, _, telemetry = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path))
        assert allocated(receiver) == [(f"{DRIVER}/{NODE}/gpu-1", DRIVER, "train-0", 1)]
        assert "serves no ResourceSlices" in telemetry.failing()["resourceslices"]


def test_unknown_claimed_device_lists_again(server, make_receiver, api, tmp_path, monkeypatch):
    """A device the last listing did not have (the driver published it since) is looked up again, no sooner than
    RELIST_MIN; devices already known cost no listing until refresh_interval."""
    kubelet = Kubelet([claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-1"))])
    server.start(kubelet)
    receiver, provider, _ = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path))
    receiver._refresh()
    receiver._refresh()
    assert len(slice_lists(api)) == 1  # known: no listing

    kubelet.pods = [claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-1")),
                    claimed("train-1", "ml", "trainer", (DRIVER, NODE, "gpu-2"))]
    api.create("resourceslices", None, resource_slice("node-a-gpu-2", NODE, DRIVER, [("gpu-2", GPU2)],
                                                      generation=1))
    receiver._refresh()  # within RELIST_MIN of the last listing: by name for now
    assert f"{DRIVER}/{NODE}/gpu-2" in provider.assignments()
    assert len(slice_lists(api)) == 1
    monkeypatch.setattr(slices, "RELIST_MIN", 0.0)
    receiver._refresh()
    assert set(provider.assignments()) == {GPU1, GPU2}
    assert len(slice_lists(api)) == 2


def test_only_the_newest_generation_of_a_pool_counts(server, make_receiver, api, tmp_path):
    """While a driver republishes its pool (a MIG reconfiguration), slices of the old generation are still there."""
    api.create("resourceslices", None, resource_slice("node-a-gpu-new", NODE, DRIVER, [("gpu-3", GPU2)],
                                                      generation=1))
    api.create("resourceslices", None, resource_slice("node-a-gpu-old", NODE, DRIVER, [("gpu-3", "GPU-old")],
                                                      generation=0))
    server.start(Kubelet([claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-3"))]))
    receiver, _, _ = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path))
    assert allocated(receiver) == [(GPU2, DRIVER, "train-0", 1)]


def test_auth_type_none_reports_the_drivers_names(server, make_receiver, api, tmp_path):
    server.start(Kubelet([claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-1"))]))
    receiver, _, telemetry = make_receiver(endpoint=f"unix://{server.path}", dra={"auth_type": "none"})
    assert allocated(receiver) == [(f"{DRIVER}/{NODE}/gpu-1", DRIVER, "train-0", 1)]
    assert slice_lists(api) == [] and telemetry.failing() == {}


def test_drivers_empty_ignores_claims(server, make_receiver, api, tmp_path):
    server.start(Kubelet([claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-1"))]))
    receiver, provider, _ = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path, drivers=[]))
    assert allocated(receiver) == [] and provider.assignments() == {}
    assert slice_lists(api) == []


def test_outside_a_pod_says_so_once(server, make_receiver, monkeypatch, caplog):
    """The default auth_type (serviceAccount) where podmeter does not run in a pod (make run on a workstation)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    server.start(Kubelet([claimed("train-0", "ml", "trainer", (DRIVER, NODE, "gpu-1"))]))
    receiver, _, telemetry = make_receiver(endpoint=f"unix://{server.path}")
    receiver._refresh()
    assert allocated(receiver) == [(f"{DRIVER}/{NODE}/gpu-1", DRIVER, "train-0", 1)]
    assert sum("not running in a pod" in r.getMessage() for r in caplog.records) == 1


def test_bad_dra_config_names_the_key():
    from pydantic import ValidationError

    from receivers.podresources import factory
    with pytest.raises(ValidationError) as info:
        factory.config_model.model_validate({"dra": {"auth_type": "token"}})
    assert info.value.errors()[0]["loc"] == ("dra", "auth_type")
    with pytest.raises(ValidationError) as info:
        factory.config_model.model_validate({"dra": {"driver": ["x"]}})
    assert info.value.errors()[0]["loc"] == ("dra", "driver")


def test_a_failing_lookup_never_costs_the_device_map(server, make_receiver, api, tmp_path, monkeypatch, caplog):
    """Whatever goes wrong in the UUID lookup (here: it raises, a stand-in for a bug), the device plugin GPUs and the
    claimed ones (by name) are mapped, and the refresh thread keeps running after a refresh that raised."""
    server.start(Kubelet(MIXED))

    def broken(self, devices):
        raise RuntimeError("bug")

    monkeypatch.setattr(slices.ResourceSlices, "resolve", broken)
    receiver, provider, telemetry = make_receiver(endpoint=f"unix://{server.path}", dra=dra(api, tmp_path),
                                                  refresh_interval="50ms")
    assert set(provider.assignments()) == {GPU0, f"{DRIVER}/{NODE}/gpu-1"}
    assert "RuntimeError: bug" in telemetry.failing()["resourceslices"]

    calls = []
    real = type(receiver)._refresh

    def refresh_raising_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("refresh bug")
        return real(self)

    monkeypatch.setattr(type(receiver), "_refresh", refresh_raising_once)
    wait_for(lambda: len(calls) >= 3, what="refreshes after one that raised")
    assert sum("refresh bug" in r.getMessage() for r in caplog.records) == 1  # logged once, then recovered
    assert "refresh" not in telemetry.failing()
