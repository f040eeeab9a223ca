"""nvml receiver: the real nvidia-ml-py against the fake libnvidia-ml.so.1 (see conftest), real PIDs in real
pod-shaped cgroups, injected NVML errors, MIG and driver reloads."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from harness import require
from harness.fake_nvml import (
    GPU,
    GPU_IS_LOST,
    NO_PERMISSION,
    NOT_SUPPORTED,
    THROTTLE_SW_POWER_CAP,
    Fail,
    GiB,
    MigDevice,
    Process,
    Scenario,
    calls,
    field_reads,
    last_seen,
)

from podmeter.component import ComponentUnavailable, Host
from receivers.nvml.receiver import LIB_RM_VERSION_MISMATCH, DriverUpgraded

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
UUID2 = "GPU-22222222-bbbb-cccc-dddd-eeeeeeeeeeee"
MIG1 = "MIG-11111111-2222-3333-4444-555555555555"
MIG2 = "MIG-66666666-7777-8888-9999-000000000000"


def errors(receiver, cause: str) -> float:
    """podmeter_component_errors_total for this receiver and cause."""
    reg = receiver.telemetry.telemetry.registry
    return reg.get_sample_value("podmeter_component_errors_total", {"component": "nvml", "cause": cause}) or 0.0


def points(md, name: str) -> list[tuple[dict, dict, float]]:
    """(resource attributes, point attributes, value) of every point of metric `name`."""
    out = []
    for rm in md.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    out += [(dict(rm.resource.attributes), dict(p.attributes), p.value) for p in m.data.data_points]
    return out


def value(md, name: str, **match):
    """The one value of `name` whose resource/point attributes include `match` (dots spelled as __)."""
    want = {k.replace("__", "."): v for k, v in match.items()}
    found = [v for res, attrs, v in points(md, name) if all({**res, **attrs}.get(k) == x for k, x in want.items())]
    assert len(found) <= 1, f"{name} {want}: {len(found)} points"
    return found[0] if found else None


def test_device_metrics_and_attributes(fake, make_receiver):
    fake.write(Scenario(driver_version="550.90.07", gpus=[
        GPU(uuid=UUID0, name="NVIDIA H100 80GB HBM3", mem_total=80 * GiB, mem_used=30 * GiB, mem_reserved=GiB,
            util_gpu=87, util_mem=40, util_enc=5, util_dec=7, temp=61, power_mw=312_500, power_limit_mw=700_000,
            energy_mj=5_000_000, clock_sm=1755, clock_mem=2619, clock_gfx=1740, throttle=THROTTLE_SW_POWER_CAP,
            ecc_corr=3, ecc_uncorr=1, pcie_tx=1000, pcie_rx=2000, nvlink_links=4, nvlink_tx=400, nvlink_rx=800,
            serial="1654922001234", pci_bus_id="00000000:1B:00.0", minor=3),
        GPU(uuid=UUID1, pcie=0)]))
    md = make_receiver().collect()
    res = next(r for r, _, _ in points(md, "hw.gpu.memory.usage") if r["hw.id"] == UUID0)
    assert res == {"hw.id": UUID0, "hw.type": "gpu", "hw.vendor": "NVIDIA", "hw.model": "NVIDIA H100 80GB HBM3",
                   "hw.name": "nvidia3", "hw.driver_version": "550.90.07", "hw.gpu.index": 0,
                   "hw.gpu.pci_bus_id": "00000000:1B:00.0", "hw.serial_number": "1654922001234"}
    g = {"hw__id": UUID0}
    assert value(md, "hw.gpu.memory.usage", **g) == 30 * GiB
    assert value(md, "hw.gpu.memory.limit", **g) == 80 * GiB
    assert value(md, "hw.gpu.memory.reserved", **g) == GiB
    assert value(md, "hw.gpu.memory.free", **g) == 49 * GiB
    assert value(md, "hw.gpu.memory.utilization", **g) == pytest.approx(30 / 80)
    assert value(md, "hw.gpu.utilization", hw__gpu__task="general", **g) == pytest.approx(0.87)
    assert value(md, "hw.gpu.utilization", hw__gpu__task="encoder", **g) == pytest.approx(0.05)
    assert value(md, "hw.gpu.utilization", hw__gpu__task="decoder", **g) == pytest.approx(0.07)
    assert value(md, "hw.gpu.memory.controller.utilization", **g) == pytest.approx(0.40)
    assert value(md, "hw.gpu.temperature", **g) == 61
    assert value(md, "hw.power", **g) == pytest.approx(312.5)
    assert value(md, "hw.gpu.power.limit", **g) == pytest.approx(700)
    assert value(md, "hw.energy", **g) == pytest.approx(5000)
    assert value(md, "hw.gpu.clock.frequency", hw__gpu__clock__domain="sm", **g) == 1755e6
    assert value(md, "hw.gpu.clock.frequency", hw__gpu__clock__domain="memory", **g) == 2619e6
    assert value(md, "hw.gpu.clock.frequency", hw__gpu__clock__domain="graphics", **g) == 1740e6
    assert value(md, "hw.gpu.throttle", hw__gpu__throttle__reason="sw_power_cap", **g) == 1
    assert value(md, "hw.gpu.throttle", hw__gpu__throttle__reason="hw_slowdown", **g) == 0
    assert value(md, "hw.errors", error__type="corrected", **g) == 3
    assert value(md, "hw.errors", error__type="uncorrected", **g) == 1
    assert value(md, "hw.gpu.io", network__io__direction="transmit", **g) == 1000
    assert value(md, "hw.gpu.io", network__io__direction="receive", **g) == 2000
    assert value(md, "hw.gpu.nvlink.io", network__io__direction="transmit", **g) == 400 * 1024
    assert value(md, "hw.gpu.nvlink.io", network__io__direction="receive", **g) == 800 * 1024
    assert value(md, "hw.status", hw__state="ok", **g) == 1
    assert value(md, "hw.status", hw__state="failed", **g) == 0
    # GPU 1 has no PCIe counters and no NVLink: those values are left out, the rest is there
    assert value(md, "hw.gpu.io", network__io__direction="transmit", hw__id=UUID1) is None
    assert value(md, "hw.gpu.nvlink.io", network__io__direction="transmit", hw__id=UUID1) is None
    assert value(md, "hw.gpu.temperature", hw__id=UUID1) == 40


@pytest.mark.parametrize("key, metrics, nvml_calls", [
    ("energy", ("hw.energy",), ("nvmlDeviceGetTotalEnergyConsumption",)),
    ("ecc", ("hw.errors",), ("nvmlDeviceGetTotalEccErrors",)),
    ("interconnect", ("hw.gpu.io", "hw.gpu.nvlink.io"), ("field 91", "field 138", "field 139", "field 197", "field 198")),
    ("health", ("hw.gpu.memory.remapped_rows", "hw.gpu.pcie.replays"),
     ("nvmlDeviceGetRemappedRows", "nvmlDeviceGetPcieReplayCounter", "nvmlEventSetCreate", "nvmlEventSetWait_v2")),
])
def test_a_metric_group_turned_off_costs_no_nvml_call(fake, make_receiver, key, metrics, nvml_calls):
    # these keys exist for what the driver charges: hw.energy cost about 3 ms of CPU per read on an H200
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, energy_mj=5_000_000, ecc_corr=3, pcie_tx=1000, nvlink_links=2,
                                  nvlink_tx=400)]))
    before = {fn: calls(fake.lib, fn) for fn in nvml_calls}
    md = make_receiver(**{key: False}).collect()
    assert {fn: calls(fake.lib, fn) for fn in nvml_calls} == before
    for name in metrics:
        assert points(md, name) == []
    assert value(md, "hw.power", hw__id=UUID0) is not None  # the rest is collected as before
    md = make_receiver().collect()
    assert all(points(md, name) for name in metrics)


def test_podmeter_collect_once_with_the_nvml_receiver(fake, pods, tmp_path):
    # `collect` waits on every receiver's ready(); the receiver once shadowed that method with a bool (a crash,
    # found on a real GPU)
    pod, (proc,) = pods(1)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=proc.pid, used_mem=GiB)]))
    config = tmp_path / "nvml.yaml"
    config.write_text(f"receivers:\n  nvml: {{library_path: {fake.lib}}}\nexporters:\n  debug: {{}}\n"
                      "service:\n  pipelines:\n    metrics: {receivers: [nvml], exporters: [debug]}\n")
    out = subprocess.run([sys.executable, "-m", "podmeter.cli", "collect", "--once", "--format", "otlp-json",
                          "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    resources = [{a["key"]: next(iter(a["value"].values())) for a in rm["resource"]["attributes"]}
                 for rm in json.loads(out.stdout)["resourceMetrics"]]
    assert any(r.get("hw.id") == UUID0 and "process.pid" not in r for r in resources)
    assert {"hw.id": UUID0, "process.pid": str(proc.pid), "k8s.pod.uid": pod.uid}.items() <= next(
        r for r in resources if r.get("process.pid") == str(proc.pid)).items()


def test_static_info_is_read_once(fake, make_receiver):
    fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)]))
    r = make_receiver()
    before = {fn: calls(fake.lib, fn) for fn in ("nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetPciInfo_v3")}
    temps = calls(fake.lib, "nvmlDeviceGetTemperature")
    for _ in range(3):
        r.collect()
    assert {fn: calls(fake.lib, fn) for fn in before} == before
    assert calls(fake.lib, "nvmlDeviceGetTemperature") == temps + 6


def test_processes_attributed_to_pods_on_a_shared_gpu(fake, make_receiver, pods):
    """Time-slicing: two pods on one GPU get their own processes' memory, never the device total."""
    pod_a, (a1, a2) = pods(2)
    pod_b, (b1,) = pods(1, qos="guaranteed")
    outside = subprocess.Popen(["sleep", "300"])
    try:
        fake.write(Scenario(
            gpus=[GPU(uuid=UUID0, mem_used=60 * GiB, util_gpu=90)],
            processes=[Process(pid=a1.pid, used_mem=10 * GiB, sm=40, mem=20),
                       Process(pid=a2.pid, used_mem=5 * GiB, sm=10, mem=5, type="graphics"),
                       Process(pid=b1.pid, used_mem=20 * GiB, sm=30, enc=12, type="mps"),
                       Process(pid=outside.pid, used_mem=GiB, util=0)]))
        md = make_receiver().collect()
        mem = {res["process.pid"]: (res, v) for res, _, v in points(md, "process.gpu.memory.usage")}
        assert {pid: v for pid, (_, v) in mem.items()} == {
            a1.pid: 10 * GiB, a2.pid: 5 * GiB, b1.pid: 20 * GiB, outside.pid: GiB}
        res = mem[a1.pid][0]
        assert res["k8s.pod.uid"] == pod_a.uid and res["container.id"] == pod_a.container_id
        assert res["hw.id"] == UUID0 and res["hw.gpu.index"] == 0
        assert res["process.executable.name"] == "sleep" and res["process.command"] == "sleep"
        assert res["process.owner"] == "root"
        assert res["process.creation.time"].endswith("Z")
        assert mem[b1.pid][0]["k8s.pod.uid"] == pod_b.uid
        assert "k8s.pod.uid" not in mem[outside.pid][0]
        # per-pod sums come from per-process data
        per_pod: dict = {}
        for res, v in mem.values():
            per_pod[res.get("k8s.pod.uid", "")] = per_pod.get(res.get("k8s.pod.uid", ""), 0) + v
        assert per_pod == {pod_a.uid: 15 * GiB, pod_b.uid: 20 * GiB, "": GiB}
        u = {(res["process.pid"], a["hw.gpu.task"]): v for res, a, v in points(md, "process.gpu.utilization")}
        # NVML's SM utilization is semconv's `general` task; the memory controller's share is its own metric
        assert u[(a1.pid, "general")] == pytest.approx(0.40) and (a1.pid, "sm") not in u
        assert {task for _pid, task in u} == {"general", "encoder", "decoder"}
        mem_ctrl = {res["process.pid"]: v for res, _a, v in points(md, "process.gpu.memory.controller.utilization")}
        assert mem_ctrl[a1.pid] == pytest.approx(0.20)
        assert u[(b1.pid, "encoder")] == pytest.approx(0.12)
        assert u[(outside.pid, "general")] == 0  # listed by NVML with no sample since the last call: idle
    finally:
        outside.kill()
        outside.wait()


@pytest.mark.parametrize("util_buffer", [0, 72], ids=["exact-size-query", "size-query-as-driver-580"])
def test_process_utilization_uses_a_last_seen_timestamp(fake, make_receiver, pods, util_buffer):
    # util_buffer=72: the size query asks for the whole buffer whatever the timestamp and only the read says
    # NOT_FOUND, as driver 580 answered on an H200
    _, (p1, p2) = pods(2)
    old = int((time.time() - 3600) * 1e6)  # a sample from an hour ago: in the driver buffer, not in this interval
    fake.write(Scenario(util_buffer=util_buffer, gpus=[GPU(uuid=UUID0)], processes=[
        Process(pid=p1.pid, used_mem=GiB, sm=70, ts=old), Process(pid=p2.pid, used_mem=GiB, sm=20)]))
    r = make_receiver(collection_interval="10s")
    md = r.collect()
    first = last_seen(fake.lib, 0)
    assert first != 0 and abs(first / 1e6 - (time.time() - 10)) < 60  # one interval back, not 0
    u = {res["process.pid"]: v for res, a, v in points(md, "process.gpu.utilization") if a["hw.gpu.task"] == "general"}
    assert u == {p1.pid: 0, p2.pid: pytest.approx(0.20)}  # the old sample is not averaged in
    r.collect()
    second = last_seen(fake.lib, 0)
    assert second > first  # the newest sample seen, never 0 again
    # a new sample for p1 newer than the cursor is reported
    fake.write(Scenario(util_buffer=util_buffer, gpus=[GPU(uuid=UUID0)], processes=[
        Process(pid=p1.pid, used_mem=GiB, sm=55), Process(pid=p2.pid, used_mem=GiB, util=0)]))
    md = r.collect()
    u = {res["process.pid"]: v for res, a, v in points(md, "process.gpu.utilization") if a["hw.gpu.task"] == "general"}
    assert u == {p1.pid: pytest.approx(0.55), p2.pid: 0}
    assert last_seen(fake.lib, 0) >= second
    # no sample newer than the cursor at all (NOT_FOUND): every process idle, not an error
    fake.write(Scenario(util_buffer=util_buffer, gpus=[GPU(uuid=UUID0)], processes=[
        Process(pid=p1.pid, used_mem=GiB, sm=55, ts=old), Process(pid=p2.pid, used_mem=GiB, util=0)]))
    md = r.collect()
    u = {res["process.pid"]: v for res, a, v in points(md, "process.gpu.utilization") if a["hw.gpu.task"] == "general"}
    assert u == {p1.pid: 0, p2.pid: 0}
    assert not r.telemetry.failing()


def test_mig(fake, make_receiver, pods):
    pod_a, (a1,) = pods(1)
    pod_b, (b1,) = pods(1)
    fake.write(Scenario(
        gpus=[GPU(uuid=UUID0, mig=1, mem_used=12 * GiB)],
        mig=[MigDevice(gpu=0, gi=1, ci=0, uuid=MIG1, profile="1g.10gb", mem_total=10 * GiB, mem_used=4 * GiB),
             MigDevice(gpu=0, gi=2, ci=0, uuid=MIG2, profile="3g.40gb", mem_total=40 * GiB, mem_used=8 * GiB)],
        processes=[Process(pid=a1.pid, used_mem=3 * GiB, gi=1, ci=0, sm=50),
                   Process(pid=b1.pid, used_mem=7 * GiB, gi=2, ci=0, sm=50)]))
    r = make_receiver()
    md = r.collect()
    assert value(md, "hw.gpu.memory.usage", hw__id=MIG1) == 4 * GiB
    assert value(md, "hw.gpu.memory.limit", hw__id=MIG2) == 40 * GiB
    mig_res = next(res for res, _, _ in points(md, "hw.gpu.memory.usage") if res["hw.id"] == MIG2)
    assert mig_res["hw.parent"] == UUID0 and mig_res["hw.gpu.mig.gpu_instance_id"] == 2
    assert mig_res["hw.gpu.mig.compute_instance_id"] == 0 and mig_res["hw.gpu.mig.profile"] == "3g.40gb"
    # memory per process per GPU instance, on the MIG device's resource
    mem = {res["process.pid"]: res for res, _, _ in points(md, "process.gpu.memory.usage")}
    assert mem[a1.pid]["hw.id"] == MIG1 and mem[a1.pid]["k8s.pod.uid"] == pod_a.uid
    assert mem[b1.pid]["hw.id"] == MIG2 and mem[b1.pid]["k8s.pod.uid"] == pod_b.uid
    assert value(md, "process.gpu.memory.usage", process__pid=b1.pid) == 7 * GiB
    # NVML has no per-process utilization under MIG: left out, never reported as zero
    assert points(md, "process.gpu.utilization") == []
    # nor device utilization of a GPU in MIG mode; the GPU's other metrics are there
    assert value(md, "hw.gpu.utilization", hw__id=UUID0, hw__gpu__task="general") is None
    assert value(md, "hw.gpu.temperature", hw__id=UUID0) == 40
    assert errors(r, "nvmlDeviceGetUtilizationRates: NOT_SUPPORTED") == 0  # known, not asked


def test_injected_errors_are_counted_and_the_rest_continues(fake, make_receiver):
    fake.write(Scenario(
        gpus=[GPU(uuid=UUID0, temp=50), GPU(uuid=UUID1, temp=60)],
        fail=[Fail("nvmlDeviceGetTemperature", NOT_SUPPORTED, gpu=0),
              Fail("nvmlDeviceGetPowerUsage", NO_PERMISSION),
              Fail("nvmlDeviceGetTotalEccErrors", 999, gpu=1)]))
    r = make_receiver()
    md = r.collect()
    assert value(md, "hw.gpu.temperature", hw__id=UUID0) is None
    assert value(md, "hw.gpu.temperature", hw__id=UUID1) == 60
    assert points(md, "hw.power") == []
    assert value(md, "hw.errors", hw__id=UUID0, error__type="corrected") == 0
    assert value(md, "hw.errors", hw__id=UUID1, error__type="corrected") is None
    assert value(md, "hw.gpu.memory.limit", hw__id=UUID1) == 80 * GiB
    temps = calls(fake.lib, "nvmlDeviceGetTemperature")
    r.collect()
    # NOT_SUPPORTED is counted once and not asked again; other errors are counted every time, per GPU
    assert errors(r, "nvmlDeviceGetTemperature: NOT_SUPPORTED") == 1
    assert calls(fake.lib, "nvmlDeviceGetTemperature") == temps + 1  # only GPU 1 asked
    assert errors(r, f"nvmlDeviceGetPowerUsage: NO_PERMISSION {UUID0}") == 2
    assert errors(r, f"nvmlDeviceGetPowerUsage: NO_PERMISSION {UUID1}") == 2
    assert errors(r, f"nvmlDeviceGetTotalEccErrors(corrected): UNKNOWN {UUID1}") == 2


def test_rediscovery_keeps_what_is_unsupported(fake, make_receiver):
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], fail=[Fail("nvmlDeviceGetTemperature", NOT_SUPPORTED)]))
    r = make_receiver(discovery_interval="1ns")  # rediscover at every collection
    names = calls(fake.lib, "nvmlDeviceGetName")
    for _ in range(3):
        md = r.collect()
    assert calls(fake.lib, "nvmlDeviceGetName") == names + 3
    assert value(md, "hw.gpu.memory.limit", hw__id=UUID0) == 80 * GiB
    assert errors(r, "nvmlDeviceGetTemperature: NOT_SUPPORTED") == 1


def test_older_driver_without_v3_process_calls(fake, make_receiver, pods):
    pod, (p1,) = pods(1)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=p1.pid, used_mem=3 * GiB)],
                        fail=[Fail("nvmlDeviceGetComputeRunningProcesses_v3", 13)]))  # FUNCTION_NOT_FOUND
    r = make_receiver()
    for _ in range(2):
        md = r.collect()
        assert value(md, "process.gpu.memory.usage", process__pid=p1.pid, k8s__pod__uid=pod.uid) == 3 * GiB
    assert errors(r, "nvmlDeviceGetComputeRunningProcesses_v3: FUNCTION_NOT_FOUND") == 1


def test_gpu_lost_is_reported_and_skipped(fake, make_receiver, pods):
    _, (p1,) = pods(1)
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)],
                            processes=[Process(pid=p1.pid, gpu=1, used_mem=GiB)]))
    r = make_receiver()
    assert value(r.collect(), "hw.status", hw__id=UUID1, hw__state="ok") == 1
    s.fail = [Fail("*", GPU_IS_LOST, gpu=1)]
    fake.write(s)
    md = r.collect()
    assert value(md, "hw.status", hw__id=UUID1, hw__state="failed") == 1
    assert value(md, "hw.status", hw__id=UUID1, hw__state="ok") == 0
    assert value(md, "hw.gpu.memory.usage", hw__id=UUID1) is None
    assert points(md, "process.gpu.memory.usage") == []
    assert value(md, "hw.gpu.memory.usage", hw__id=UUID0) == 0
    assert errors(r, f"gpu_lost {UUID1}") == 1
    s.fail = []
    fake.write(s)  # back on the bus (after a reset)
    md = r.collect()
    assert value(md, "hw.status", hw__id=UUID1, hw__state="ok") == 1
    assert value(md, "process.gpu.memory.usage", process__pid=p1.pid) == GiB


def test_driver_reload_reinitialises(fake, make_receiver):
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0, temp=41)]))
    r = make_receiver()
    assert value(r.collect(), "hw.gpu.temperature", hw__id=UUID0) == 41
    # the driver is unloaded: NVML answers UNINITIALIZED, then nvmlInit fails until it is back
    s.loaded, s.generation = 0, 1
    fake.write(s)
    assert r.collect().resource_metrics == []
    assert errors(r, "nvml_reinit") >= 1
    assert errors(r, "nvmlInit") >= 1
    # the new driver has a second GPU: it is rediscovered
    s.loaded = 1
    s.gpus = [GPU(uuid=UUID0, temp=45), GPU(uuid=UUID1, temp=46)]
    fake.write(s)
    md = r.collect()
    assert value(md, "hw.gpu.temperature", hw__id=UUID0) == 45
    assert value(md, "hw.gpu.temperature", hw__id=UUID1) == 46
    # a reload while the receiver keeps its session (generation changes, driver stays): one collection re-inits
    s.generation = 2
    fake.write(s)
    assert value(r.collect(), "hw.gpu.temperature", hw__id=UUID1) == 46


def test_driver_upgraded_under_the_agent_fails_the_collection(fake, make_receiver):
    """A driver upgrade replaces the kernel module under a running agent: the library it loaded answers
    LIB_RM_VERSION_MISMATCH from then on, and only a restart loads the new one. The collection fails (component
    error, health 503, the liveness probe restarts the agent) rather than returning nothing forever."""
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0, temp=41)]))
    r = make_receiver()
    assert value(r.collect(), "hw.gpu.temperature", hw__id=UUID0) == 41
    s.generation, s.fail = 1, [Fail("nvmlInit", LIB_RM_VERSION_MISMATCH)]
    fake.write(s)
    for _ in range(2):  # whether the session is found lost in this collection or was already
        with pytest.raises(DriverUpgraded, match="restart podmeter"):
            r.collect()


def test_version_mismatch_from_the_first_init_is_only_reported(fake, make_receiver):
    """A mounted library that never fitted the node's driver: restarting would not help, so the agent keeps
    running its other receivers and the nvml receiver reports the cause."""
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], fail=[Fail("nvmlInit", LIB_RM_VERSION_MISMATCH)]))
    r = make_receiver()
    assert r.collect().resource_metrics == []
    assert errors(r, "nvmlInit") >= 1


def test_driver_not_loaded_at_start_is_retried(fake, make_receiver):
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0)], loaded=0, generation=7))
    r = make_receiver()  # the library is there: start succeeds and keeps trying
    assert r.collect().resource_metrics == []
    s.loaded = 1
    fake.write(s)
    assert value(r.collect(), "hw.gpu.memory.limit", hw__id=UUID0) == 80 * GiB


def test_vanished_processes_are_fine(fake, make_receiver, pods):
    pod, (p1, p2, p3) = pods(3)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[
        Process(pid=p1.pid, used_mem=GiB), Process(pid=p2.pid, used_mem=2 * GiB)]))
    r = make_receiver()
    r.collect()
    for p in (p2, p3):
        p.kill()
        p.wait()
    # NVML still lists the exited PIDs for a moment; p3 exited before it was ever seen
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[
        Process(pid=p1.pid, used_mem=GiB), Process(pid=p2.pid, used_mem=2 * GiB), Process(pid=p3.pid)]))
    for _ in range(2):
        md = r.collect()
        res = {res["process.pid"]: res for res, _, _ in points(md, "process.gpu.memory.usage")}
        assert res[p1.pid]["k8s.pod.uid"] == pod.uid
        # what was attributed stays its pod's while NVML lists it: not GPU memory of a process outside any pod
        assert res[p2.pid]["k8s.pod.uid"] == pod.uid and res[p2.pid]["process.executable.name"] == "sleep"
        assert "k8s.pod.uid" not in res[p3.pid]  # never seen: nothing to say about it
    assert errors(r, "process_not_visible") == 2  # p3, once per collection
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=p1.pid, used_mem=GiB)]))
    r.collect()
    assert set(r._procs) == {p1.pid}  # caches follow the processes on GPUs: bounded under churn
    assert len(r.attributor) == 1


def test_pod_allocation_from_podresources(fake, make_receiver):
    class Assignments:  # the podresources receiver's provider interface (podmeter.component.Host docs)
        def assignments(self):
            return {UUID0: [{"k8s.pod.uid": "uid-a", "k8s.pod.name": "train-0", "k8s.namespace.name": "ml",
                             "k8s.container.name": "main"}],
                    f"{UUID1}::1": [{"k8s.pod.uid": "uid-b", "k8s.pod.name": "infer-0", "k8s.namespace.name": "ml",
                                     "k8s.container.name": "main"}],
                    f"{UUID1}::2": [{"k8s.pod.uid": "uid-c", "k8s.pod.name": "infer-1", "k8s.namespace.name": "ml",
                                     "k8s.container.name": "main"}]}

    fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)]))
    host = Host()
    r = make_receiver(host=host)
    assert points(r.collect(), "hw.gpu.allocation") == []
    host.publish("device_assignments", Assignments())  # looked up lazily: it may start after us
    got = {(res["hw.id"], a["k8s.pod.name"]) for res, a, v in points(r.collect(), "hw.gpu.allocation") if v == 1}
    assert got == {(UUID0, "train-0"), (UUID1, "infer-0"), (UUID1, "infer-1")}


def test_pod_allocation_with_gke_device_ids(fake, make_receiver):
    """GKE's device plugin names devices by their /dev node, not by UUID: "nvidia<minor>", time-sharing replicas
    "nvidia<minor>/vgpu<n>", MIG devices "nvidia<minor>/gi<gpu instance>" (dcgm-exporter's gkeMigDeviceIDRegex)."""
    def pod(name):
        return [{"k8s.pod.uid": f"uid-{name}", "k8s.pod.name": name, "k8s.namespace.name": "ml",
                 "k8s.container.name": "main", "k8s.resource.name": "nvidia.com/gpu"}]

    class Assignments:
        def assignments(self):
            return {"nvidia0": pod("train-0"), "nvidia1/vgpu0": pod("infer-0"), "nvidia1/vgpu3": pod("infer-1"),
                    "nvidia2/gi1": pod("mig-a"), "nvidia2/gi2/vgpu1": pod("mig-b")}

    fake.write(Scenario(
        gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1), GPU(uuid="GPU-22222222-2222-2222-2222-222222222222", mig=1)],
        mig=[MigDevice(gpu=2, gi=1, ci=0, uuid=MIG1), MigDevice(gpu=2, gi=2, ci=0, uuid=MIG2)]))
    host = Host()
    host.publish("device_assignments", Assignments())
    got = {(res["hw.id"], a["k8s.pod.name"], a.get("k8s.device.id"))
           for res, a, v in points(make_receiver(host=host).collect(), "hw.gpu.allocation") if v == 1}
    assert got == {(UUID0, "train-0", None), (UUID1, "infer-0", "nvidia1/vgpu0"), (UUID1, "infer-1", "nvidia1/vgpu3"),
                   (MIG1, "mig-a", None), (MIG2, "mig-b", "nvidia2/gi2/vgpu1")}


def test_no_library(tmp_path, make_receiver):
    with pytest.raises(ComponentUnavailable, match="does not exist"):
        make_receiver(library_path=str(tmp_path / "libnvidia-ml.so.1"))
    # a fresh interpreter with no libnvidia-ml.so.1 anywhere: unavailable, said plainly, no traceback
    code = ("import logging\n"
            "from podmeter.component import *\n"
            "from podmeter.telemetry import null_component_telemetry\n"
            "from receivers.nvml import factory\n"
            "t = null_component_telemetry('nvml')\n"
            "s = CreateSettings(id=ComponentID('nvml'), kind='receiver', logger=t.logger, telemetry=t)\n"
            "r = factory.create(s, factory.config_model.model_validate({}))\n"
            "try:\n    r.start(Host())\nexcept ComponentUnavailable as e:\n    print('UNAVAILABLE', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("UNAVAILABLE no NVML library on this host"), out.stdout


def test_config_errors_are_clear():
    from podmeter.config import ConfigError, load

    path = "/tmp/podmeter-nvml-bad.yaml"
    with open(path, "w") as f:
        f.write("receivers:\n  nvml:\n    library_path: lib/libnvidia-ml.so.1\n    collection_interval: 5\n"
                "exporters:\n  debug: {}\nservice:\n  pipelines:\n    metrics:\n"
                "      receivers: [nvml]\n      exporters: [debug]\n")
    with pytest.raises(ConfigError) as exc:
        load([path])
    text = str(exc.value)
    assert "receivers::nvml::library_path: library_path must be absolute" in text
    assert "receivers::nvml::collection_interval" in text


_NS_CHILD = r"""
import json, logging, os, subprocess, sys
sys.path.insert(0, sys.argv[1])
from harness.cgroups import PodCgroup
from harness.fake_nvml import GPU, GiB, Process, Scenario
from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.telemetry import null_component_telemetry
from receivers.nvml import factory

proc_root = sys.argv[5]
if sys.argv[6] == "high":
    # the host's /proc is this process's /proc: PIDs in this namespace far above the host's pid_max, so that
    # they cannot be mistaken for host PIDs
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write("999990")
# else: this namespace's own /proc is mounted, and its PIDs are small, as in a pod: the same numbers under the
# host's /proc are other processes (kthreadd is 2)
pod = PodCgroup(uid=sys.argv[3], container_id=sys.argv[4])
proc = pod.spawn(["sleep", "60"])
Scenario(gpus=[GPU(uuid="GPU-ns")], processes=[Process(pid=proc.pid, used_mem=GiB)]).write(os.environ["FAKE_NVML_SCENARIO"])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
t = null_component_telemetry("nvml", logging.getLogger("nvml"))
r = factory.create(CreateSettings(id=ComponentID("nvml"), kind="receiver", logger=t.logger, telemetry=t),
                   factory.config_model.model_validate({"library_path": sys.argv[2], "proc_root": proc_root}))
r.start(Host())
md = r.collect()
res = [dict(rm.resource.attributes) for rm in md.resource_metrics
       if any(m.name == "process.gpu.memory.usage" for sm in rm.scope_metrics for m in sm.metrics)]
# the host PID found independently: the process in the pod's cgroup, as the host's /proc lists it
host = [int(d) for d in os.listdir(proc_root) if d.isdigit() and sys.argv[4] in open(f"{proc_root}/{d}/cgroup").read()]
proc.kill()
proc.wait()
Scenario(gpus=[GPU(uuid="GPU-ns")]).write(os.environ["FAKE_NVML_SCENARIO"])
r.collect()  # the process left the GPU: nothing of it is kept
print(json.dumps({"ns_pid": proc.pid, "host_pids": host, "resources": res, "procs": len(r._procs),
                  "attributor": len(r.attributor)}))
"""


@pytest.mark.parametrize("mode", ["host-proc", "own-proc-host-proc-root", "own-proc-only"])
def test_pids_of_podmeters_own_namespace_are_translated_through_nspid(fake, pods, tmp_path, mode):
    """podmeter in its own PID namespace (hostPID off), run under `unshare --pid`:
    - host-proc: its /proc is the host's; a PID NVML reports in podmeter's namespace maps to the host PID through
      NSpid;
    - own-proc-host-proc-root: as in a pod, the namespace's own /proc mounted, its PIDs small, the host's /proc at
      proc_root: translated too (on a real H200 the small PID was once attributed to the host's process of that
      number);
    - own-proc-only: only the namespace's own /proc: NVML's PIDs are found there as they are."""
    require(shutil.which("unshare") is not None, "needs unshare (util-linux)")
    pod, _ = pods(0)
    script = tmp_path / "child.py"
    script.write_text(_NS_CHILD)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc_root = "/proc"
    unshare = ["unshare", "--pid", "--fork"]
    if mode != "host-proc":
        unshare.append("--mount-proc")
    if mode == "own-proc-host-proc-root":
        proc_root = str(tmp_path / "host-proc")
        os.mkdir(proc_root)
        subprocess.run(["mount", "--bind", "/proc", proc_root], check=True)
    try:
        out = subprocess.run([*unshare, sys.executable, str(script), tests_dir, fake.lib, pod.uid, pod.container_id,
                              proc_root, "high" if mode == "host-proc" else "low"],
                             capture_output=True, text=True, timeout=60)
    finally:
        if mode == "own-proc-host-proc-root":
            subprocess.run(["umount", proc_root], check=False)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    (pid_under_proc_root,) = got["host_pids"]
    (res,) = got["resources"]
    assert res["process.pid"] == pid_under_proc_root
    assert res["k8s.pod.uid"] == pod.uid and res["container.id"] == pod.container_id
    assert res["process.executable.name"] == "sleep"
    assert "is not in the host's PID namespace" in out.stderr
    if mode == "own-proc-only":
        assert pid_under_proc_root == got["ns_pid"]
        assert "is this namespace's own /proc" in out.stderr
    else:
        assert pid_under_proc_root != got["ns_pid"]
        assert f"{proc_root} shows the host PID namespace" in out.stderr
    assert got["procs"] == 0 and got["attributor"] == 0  # bounded under churn: the host PID's entry is gone too


@contextlib.contextmanager
def podresources_on(kubelet, tmp_path, **config):
    """The real podresources receiver, started on a Host, reading `kubelet` (a PodResources servicer: the stand-in
    for the kubelet, served over real gRPC on a unix socket); yields the Host."""
    from concurrent import futures

    import grpc

    from podmeter.component import ComponentID, CreateSettings
    from podmeter.telemetry import null_component_telemetry
    from receivers import podresources
    from receivers.podresources import api_pb2_grpc as pbg

    sock = str(tmp_path / "kubelet.sock")
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pbg.add_PodResourcesListerServicer_to_server(kubelet, server)
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    host = Host()
    t = null_component_telemetry("podresources")
    pr = podresources.factory.create(
        CreateSettings(id=ComponentID("podresources"), kind="receiver", logger=t.logger, telemetry=t),
        podresources.factory.config_model.model_validate({"endpoint": f"unix://{sock}", **config}))
    try:
        pr.start(host)
        yield host
    finally:
        pr.shutdown()
        server.stop(0).wait()


def test_allocation_with_the_real_podresources_receiver(fake, make_receiver, tmp_path):
    """The podresources receiver (real, over real gRPC on a unix socket) feeds hw.gpu.allocation; the kubelet side
    is a stand-in server on the project's proto (no kubelet can run here)."""
    from receivers.podresources import api_pb2 as pb
    from receivers.podresources import api_pb2_grpc as pbg

    class Kubelet(pbg.PodResourcesListerServicer):
        def List(self, request, context):
            def pod(name, ids, resource="nvidia.com/gpu"):
                return pb.PodResources(name=name, namespace="ml", containers=[pb.ContainerResources(
                    name="main", devices=[pb.ContainerDevices(resource_name=resource, device_ids=ids)])])
            return pb.ListPodResourcesResponse(pod_resources=[
                pod("train-0", [UUID0]), pod("infer-0", [f"{UUID1}::0"]), pod("infer-1", [f"{UUID1}::3"]),
                pod("mig-0", [MIG1], "nvidia.com/mig-1g.10gb")])

        def GetAllocatableResources(self, request, context):
            return pb.AllocatableResourcesResponse()

    with podresources_on(Kubelet(), tmp_path) as host:
        fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1), GPU(uuid="GPU-mig", mig=1)],
                            mig=[MigDevice(gpu=2, gi=1, uuid=MIG1)]))
        r = make_receiver(host=host)
        (provider,) = host.lookup("device_assignments")
        provider.synced.wait(10)
        got = {(res["hw.id"], a["k8s.pod.name"]) for res, a, v in points(r.collect(), "hw.gpu.allocation")}
        assert got == {(UUID0, "train-0"), (UUID1, "infer-0"), (UUID1, "infer-1"), (MIG1, "mig-0")}


def test_allocation_of_a_gpu_claimed_through_dra(fake, make_receiver, tmp_path):
    """A GPU handed out by a DRA ResourceClaim (NVIDIA's DRA driver): the kubelet names it `gpu-1` in pool `node-a`,
    the podresources receiver finds its UUID in the node's ResourceSlices (real `kubernetes` client against the
    API stand-in), and nvml attributes the idle GPU to the claiming pod. The kubelet side is a stand-in server on
    the project's proto (no kubelet or API server can run here)."""
    from harness.apiserver import ApiServer

    from receivers.podresources import api_pb2 as pb
    from receivers.podresources import api_pb2_grpc as pbg

    class Kubelet(pbg.PodResourcesListerServicer):
        def List(self, request, context):
            return pb.ListPodResourcesResponse(pod_resources=[pb.PodResources(
                name="train-0", namespace="ml", containers=[pb.ContainerResources(
                    name="main", dynamic_resources=[pb.DynamicResource(
                        claim_name="gpu", claim_namespace="ml", claim_resources=[pb.ClaimResource(
                            driver_name="gpu.nvidia.com", pool_name="node-a", device_name="gpu-1")])])])])

        def GetAllocatableResources(self, request, context):
            return pb.AllocatableResourcesResponse()

    with ApiServer() as api:
        api.create("resourceslices", None, {"metadata": {"name": "node-a-gpu"}, "spec": {
            "driver": "gpu.nvidia.com", "nodeName": "node-a", "pool": {"name": "node-a", "generation": 1},
            "devices": [{"name": f"gpu-{i}", "attributes": {"uuid": {"string": u}}}
                        for i, u in enumerate((UUID0, UUID1))]}})
        dra = {"auth_type": "kubeConfig", "kube_config_path": api.write_kubeconfig(tmp_path), "node_name": "node-a"}
        with podresources_on(Kubelet(), tmp_path, dra=dra) as host:
            fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)]))
            got = {(res["hw.id"], a["k8s.pod.name"], a["k8s.resource.name"])
                   for res, a, v in points(make_receiver(host=host).collect(), "hw.gpu.allocation") if v == 1}
            assert got == {(UUID1, "train-0", "gpu.nvidia.com")}


def test_memory_temperature_where_the_gpu_has_a_sensor(fake, make_receiver):
    """hw.gpu.memory.temperature from field value 82 (DCGM's DCGM_FI_DEV_MEMORY_TEMP), asked in the one field-values
    call with the PCIe and NVLink counters; a GPU without the sensor is not asked again until the next discovery."""
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, mem_temp=52, pcie_tx=1000), GPU(uuid=UUID1),
                              GPU(uuid=UUID2, mem_temp=-1)]))
    r = make_receiver()
    md = r.collect()
    assert value(md, "hw.gpu.memory.temperature", hw__id=UUID0) == 52
    assert value(md, "hw.gpu.memory.temperature", hw__id=UUID1) is None  # no sensor: left out, never 0
    assert value(md, "hw.gpu.memory.temperature", hw__id=UUID2) is None  # answered 0: no reading either
    assert value(md, "hw.gpu.temperature", hw__id=UUID1) == 40  # its die temperature as before
    assert value(md, "hw.gpu.io", hw__id=UUID0, network__io__direction="transmit") == 1000
    asked, made = field_reads(fake.lib, 82), calls(fake.lib, "nvmlDeviceGetFieldValues")
    r.collect()
    assert field_reads(fake.lib, 82) == asked + 2  # GPUs 0 and 2: GPU 1 answered NOT_SUPPORTED once
    assert calls(fake.lib, "nvmlDeviceGetFieldValues") == made + 3  # one call per GPU for all its fields
    assert not r.telemetry.failing()
    # with the interconnect counters off, the memory temperature is still read, alone
    before = {f: field_reads(fake.lib, f) for f in (82, 197)}
    md = make_receiver(interconnect=False).collect()
    assert value(md, "hw.gpu.memory.temperature", hw__id=UUID0) == 52
    assert field_reads(fake.lib, 197) == before[197] and field_reads(fake.lib, 82) > before[82]


def test_temperature_limits_are_read_at_discovery(fake, make_receiver):
    """The die's slowdown, highest operating and shutdown temperatures and the memory's highest operating one, as
    semconv's hw.limit_type (what a panel or an alert compares hw.gpu.temperature and hw.gpu.memory.temperature
    with); static, so asked once per discovery; a GPU that knows none has none."""
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, temp=61, mem_temp=70, temp_shutdown=92, temp_slowdown=89,
                                  temp_gpu_max=87, temp_mem_max=95), GPU(uuid=UUID1)]))
    r = make_receiver()
    md = r.collect()
    die = {a["hw.limit_type"]: v for res, a, v in points(md, "hw.gpu.temperature.limit") if res["hw.id"] == UUID0}
    assert die == {"throttled": 89, "max": 87, "high.critical": 92}
    assert value(md, "hw.gpu.memory.temperature.limit", hw__id=UUID0, hw__limit_type="max") == 95
    assert [res["hw.id"] for res, _, _ in points(md, "hw.gpu.temperature.limit")].count(UUID1) == 0
    made = calls(fake.lib, "nvmlDeviceGetTemperatureThreshold")
    md = r.collect()
    assert calls(fake.lib, "nvmlDeviceGetTemperatureThreshold") == made  # not asked again until the next discovery
    assert value(md, "hw.gpu.temperature.limit", hw__id=UUID0, hw__limit_type="throttled") == 89
    assert not r.telemetry.failing()  # a GPU without limits is not an error
