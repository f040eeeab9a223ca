"""Per-container GPU metrics (`per_container`): a container's processes on one GPU or MIG device summed into series
that stay the same while its PIDs come and go. Real processes in real pod-shaped cgroups; NVML is the fake
libnvidia-ml.so.1 (no GPU can run here)."""

from __future__ import annotations

import subprocess

import pytest
from harness.fake_nvml import GPU, GiB, MigDevice, Process, Scenario, calls

from .test_nvml_receiver import MIG1, MIG2, UUID0, UUID1, points

CONTAINER_METRICS = ("container.gpu.memory.usage", "container.gpu.utilization",
                     "container.gpu.memory.controller.utilization")


def by_container(md, name: str, task: str | None = None) -> dict[tuple, float]:
    """(hw.id, pod uid, container id) -> value of `name` (for one hw.gpu.task where given)."""
    out = {}
    for res, attrs, v in points(md, name):
        if task is None or attrs.get("hw.gpu.task") == task:
            key = (res["hw.id"], res.get("k8s.pod.uid"), res.get("container.id"))
            assert key not in out, f"{name}: two points for {key}"
            out[key] = v
    return out


def test_a_containers_processes_are_summed_per_gpu(fake, make_receiver, pods):
    pod_a, (a1, a2) = pods(2)
    pod_b, (b1,) = pods(1, qos="guaranteed")
    outside = subprocess.Popen(["sleep", "300"])
    try:
        fake.write(Scenario(
            gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)],
            processes=[Process(pid=a1.pid, used_mem=10 * GiB, sm=40, mem=20),
                       Process(pid=a2.pid, used_mem=5 * GiB, sm=10, mem=5, enc=3, type="graphics"),
                       Process(pid=a1.pid, gpu=1, used_mem=GiB, sm=7),
                       Process(pid=b1.pid, used_mem=20 * GiB, sm=30, enc=12, type="mps"),
                       Process(pid=outside.pid, used_mem=GiB, sm=5)]))
        md = make_receiver(per_container=True).collect()
        a, b = (pod_a.uid, pod_a.container_id), (pod_b.uid, pod_b.container_id)
        assert by_container(md, "container.gpu.memory.usage") == {
            (UUID0, *a): 15 * GiB, (UUID1, *a): GiB, (UUID0, *b): 20 * GiB}  # not the process outside any pod
        general = by_container(md, "container.gpu.utilization", "general")
        assert general == {(UUID0, *a): pytest.approx(0.50), (UUID1, *a): pytest.approx(0.07),
                           (UUID0, *b): pytest.approx(0.30)}
        assert by_container(md, "container.gpu.utilization", "encoder")[(UUID0, *a)] == pytest.approx(0.03)
        assert by_container(md, "container.gpu.memory.controller.utilization")[(UUID0, *a)] == pytest.approx(0.25)
        # the resource names the container and the device, never a process
        res = next(r for r, _, _ in points(md, "container.gpu.memory.usage") if r.get("k8s.pod.uid") == pod_b.uid)
        assert res["container.id"] == pod_b.container_id and res["k8s.pod.qos_class"] == "Guaranteed"
        assert res["hw.type"] == "gpu" and res["hw.gpu.index"] == 0
        assert not any(k.startswith("process.") for k in res)
        # the per-process series are there as well, by default
        assert len(points(md, "process.gpu.memory.usage")) == 5
        # and the per-container ones only when asked for
        assert not points(make_receiver().collect(), "container.gpu.memory.usage")
    finally:
        outside.kill()
        outside.wait()


def test_container_series_stay_while_pids_churn_and_go_with_the_container(fake, make_receiver, pods):
    pod, (p1, p2, p3) = pods(3)
    other, (o1,) = pods(1)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[
        Process(pid=p1.pid, used_mem=GiB, sm=20), Process(pid=o1.pid, used_mem=GiB)]))
    r = make_receiver(per_process=False, per_container=True)
    md = r.collect()
    assert points(md, "process.gpu.memory.usage") == []  # per_process: false
    first = {rm.resource.attributes.get("container.id"): rm.resource for rm in md.resource_metrics}
    # the container's first process is replaced by two others: the same series, the same Resource object (what the
    # pipeline's per-resource caches find again)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[
        Process(pid=p2.pid, used_mem=2 * GiB, sm=30), Process(pid=p3.pid, used_mem=3 * GiB, sm=40),
        Process(pid=o1.pid, used_mem=GiB)]))
    md = r.collect()
    assert by_container(md, "container.gpu.memory.usage") == {
        (UUID0, pod.uid, pod.container_id): 5 * GiB, (UUID0, other.uid, other.container_id): GiB}
    assert by_container(md, "container.gpu.utilization", "general")[(UUID0, pod.uid, pod.container_id)] == \
        pytest.approx(0.70)
    again = {rm.resource.attributes.get("container.id"): rm.resource for rm in md.resource_metrics}
    assert again[pod.container_id] is first[pod.container_id]
    # the other pod's processes leave the GPU: its series go at once, and so does what the receiver kept of it
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=p2.pid, used_mem=2 * GiB)]))
    md = r.collect()
    assert set(by_container(md, "container.gpu.memory.usage")) == {(UUID0, pod.uid, pod.container_id)}
    assert len(r._container_resources) == 1


def test_utilization_summed_over_overlapping_samples_is_at_most_the_whole_gpu(fake, make_receiver, pods):
    # MPS clients run kernels at the same time: each one's samples can say 70% of the SMs' time
    pod, (p1, p2) = pods(2)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[
        Process(pid=p1.pid, used_mem=GiB, sm=70, type="mps"), Process(pid=p2.pid, used_mem=GiB, sm=70, type="mps")]))
    md = make_receiver(per_process=False, per_container=True).collect()
    assert by_container(md, "container.gpu.utilization", "general") == {(UUID0, pod.uid, pod.container_id): 1.0}


def test_mig_devices_have_memory_per_container_and_no_utilization(fake, make_receiver, pods):
    pod_a, (a1, a2) = pods(2)
    pod_b, (b1,) = pods(1)
    fake.write(Scenario(
        gpus=[GPU(uuid=UUID0, mig=1)],
        mig=[MigDevice(gpu=0, gi=1, ci=0, uuid=MIG1, profile="1g.10gb", mem_total=10 * GiB),
             MigDevice(gpu=0, gi=2, ci=0, uuid=MIG2, profile="3g.40gb", mem_total=40 * GiB)],
        processes=[Process(pid=a1.pid, used_mem=3 * GiB, gi=1, ci=0, sm=50),
                   Process(pid=a2.pid, used_mem=2 * GiB, gi=1, ci=0, sm=50),
                   Process(pid=b1.pid, used_mem=7 * GiB, gi=2, ci=0, sm=50)]))
    md = make_receiver(per_process=False, per_container=True).collect()
    assert by_container(md, "container.gpu.memory.usage") == {
        (MIG1, pod_a.uid, pod_a.container_id): 5 * GiB, (MIG2, pod_b.uid, pod_b.container_id): 7 * GiB}
    res = next(r for r, _, _ in points(md, "container.gpu.memory.usage") if r["hw.id"] == MIG2)
    assert res["hw.parent"] == UUID0 and res["hw.gpu.mig.profile"] == "3g.40gb"
    # NVML has no per-process utilization under MIG: left out, never zero
    assert points(md, "container.gpu.utilization") == []
    assert points(md, "container.gpu.memory.controller.utilization") == []


def test_without_per_process_nor_per_container_no_process_is_asked_for(fake, make_receiver, pods):
    _pod, (p1,) = pods(1)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=p1.pid, used_mem=GiB, sm=20)]))
    asked = ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetProcessUtilization")
    before = {fn: calls(fake.lib, fn) for fn in asked}
    md = make_receiver(per_process=False, per_container=False).collect()
    assert {fn: calls(fake.lib, fn) for fn in asked} == before
    assert not any(points(md, name) for name in CONTAINER_METRICS + ("process.gpu.memory.usage",))
    assert points(md, "hw.gpu.memory.usage")  # the device's own metrics as before
    # per_container alone asks NVML as per_process does, and reports only containers
    md = make_receiver(per_process=False, per_container=True).collect()
    assert all(calls(fake.lib, fn) > before[fn] for fn in asked)
    assert all(points(md, name) for name in CONTAINER_METRICS)
    assert points(md, "process.gpu.memory.usage") == []
