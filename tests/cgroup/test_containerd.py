"""The receiver and attribution on real containerd pods (containerd + runc, kubelet-shaped, cgroupfs driver)."""

from __future__ import annotations

import pytest
from cgroup.helpers import make_receiver, value
from harness import require, wait_for

from podmeter.attribution import ProcessAttributor


@pytest.fixture(scope="module")
def ctrd():
    from harness.containerd import Containerd, available

    ok, why = available()
    require(ok, why)
    with Containerd() as c:
        yield c


def test_containerd_pod_is_measured_and_attributed(ctrd):
    pod = ctrd.run_pod("burner", containers={"main": ["/bin/sh", "-c", "while :; do :; done"]},
                       memory_limit=96 << 20)
    try:
        cid = pod.containers["main"]
        receiver = make_receiver()
        data = receiver.collect()
        c = {"k8s.pod.uid": pod.uid, "container.id": cid}
        assert value(data, "container.memory.limit", c) == 96 << 20
        # runc wrote the CRI request's CPU quota and period (50000 of 100000 us); the pause container has none
        assert value(data, "container.cpu.limit", c) == pytest.approx(0.5)
        assert value(data, "container.cpu.limit", {"container.id": pod.sandbox_id}) is None
        # the sandbox (pause) container is a container of the pod too
        ids = {dict(rm.resource.attributes).get("container.id") for rm in data.resource_metrics
               if rm.resource.attributes.get("k8s.pod.uid") == pod.uid}
        assert {cid, pod.sandbox_id} <= ids
        first = sum(value(data, "container.cpu.time", c, {"cpu.mode": m}) for m in ("user", "system"))
        wait_for(lambda: sum(value(receiver.collect(), "container.cpu.time", c, {"cpu.mode": m})
                             for m in ("user", "system")) > first + 0.2, timeout=20, what="CPU time to grow")
        assert value(receiver.collect(), "k8s.pod.memory.usage", {"k8s.pod.uid": pod.uid}) > 0
        # the container's process is attributed to its pod and container
        info = ProcessAttributor("/proc").lookup(ctrd.container_pid(cid))
        assert info.ref.pod_uid == pod.uid and info.ref.container_id == cid and info.ref.qos_class == "Burstable"
    finally:
        ctrd.stop_pod(pod)
        ctrd.remove_pod(pod)
    # the containers are gone (runc removed their cgroups): so are their series. The pod cgroup itself is
    # kubelet's to remove, as on a real node
    data = make_receiver().collect()
    assert not [rm for rm in data.resource_metrics if rm.resource.attributes.get("k8s.pod.uid") == pod.uid
                and "container.id" in rm.resource.attributes]
