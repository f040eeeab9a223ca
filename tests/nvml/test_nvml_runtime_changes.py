"""nvml receiver: what changes under a running agent and what the driver does between calls: MIG mode toggled at
runtime, per-process utilization samples racing the two-call size protocol. The real nvidia-ml-py against the fake
libnvidia-ml.so.1 (see conftest: the only test double, no NVIDIA GPU can run here)."""

from __future__ import annotations

import os
import time

import pytest
from harness.fake_nvml import (
    DRIVER_NOT_LOADED,
    GPU,
    INSUFFICIENT_SIZE,
    NOT_SUPPORTED,
    Fail,
    GiB,
    MigDevice,
    Process,
    Scenario,
    calls,
    last_seen,
)

from .test_nvml_receiver import errors, points, value

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
MIG1 = "MIG-11111111-2222-3333-4444-555555555555"


def rediscover_now(r) -> None:
    """As if discovery_interval had passed (the receiver re-enumerates at its next collection)."""
    r.discovered_at = float("-inf")


def test_mig_mode_toggled_at_runtime_does_not_lose_utilization(fake, make_receiver):
    """MIG mode enabled under the running agent (nvidia-smi -mig 1), then disabled again. Until the next discovery
    the receiver still takes the GPU for a whole one, and the driver answers NOT_SUPPORTED to device and process
    utilization: that is the mode, not what the GPU lacks, so once MIG is off again both are reported again."""
    pid = os.getpid()
    whole = Scenario(gpus=[GPU(uuid=UUID0, util_gpu=60)], processes=[Process(pid=pid, used_mem=GiB, sm=40)])
    fake.write(whole)
    r = make_receiver()  # discovery_interval 60s: the toggle is seen at the next discovery, not at once
    md = r.collect()
    assert value(md, "hw.gpu.utilization", hw__id=UUID0, hw__gpu__task="general") == pytest.approx(0.60)
    # MIG on: one GPU instance, the process in it
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, util_gpu=60, mig=1)],
                        mig=[MigDevice(gpu=0, gi=1, ci=0, uuid=MIG1)],
                        processes=[Process(pid=pid, used_mem=GiB, sm=40, gi=1, ci=0)]))
    r.collect()  # before the next discovery: NOT_SUPPORTED from the GPU now in MIG mode
    rediscover_now(r)
    md = r.collect()
    assert value(md, "process.gpu.memory.usage", hw__id=MIG1, process__pid=pid) == GiB
    assert value(md, "hw.gpu.utilization", hw__id=UUID0, hw__gpu__task="general") is None
    # MIG off again
    fake.write(whole)
    rediscover_now(r)
    md = r.collect()
    assert value(md, "hw.gpu.utilization", hw__id=UUID0, hw__gpu__task="general") == pytest.approx(0.60)
    assert value(md, "process.gpu.utilization", hw__id=UUID0, process__pid=pid,
                 hw__gpu__task="general") == pytest.approx(0.40)
    assert errors(r, "nvmlDeviceGetUtilizationRates: NOT_SUPPORTED") == 1  # said once, when it happened


def test_what_discovery_finds_unsupported_is_counted_once(fake, make_receiver):
    """NOT_SUPPORTED from a call made at discovery (the minor number on a vGPU, field values on older boards) is
    what the board lacks: counted once and not asked again at every discovery_interval, like the value calls."""
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], fail=[Fail("nvmlDeviceGetMinorNumber", NOT_SUPPORTED),
                                                      Fail("nvmlDeviceGetFieldValues", NOT_SUPPORTED)]))
    before = {fn: calls(fake.lib, fn) for fn in ("nvmlDeviceGetMinorNumber", "nvmlDeviceGetFieldValues")}
    r = make_receiver(discovery_interval="1ns")  # rediscover at every collection
    for _ in range(3):
        md = r.collect()
    assert value(md, "hw.gpu.memory.limit", hw__id=UUID0, hw__name="nvidia0") == 80 * GiB  # the index stands in
    assert errors(r, "nvmlDeviceGetMinorNumber: NOT_SUPPORTED") == 1
    assert errors(r, "nvmlDeviceGetFieldValues: NOT_SUPPORTED") == 1
    assert {fn: calls(fake.lib, fn) - n for fn, n in before.items()} == {
        "nvmlDeviceGetMinorNumber": 1, "nvmlDeviceGetFieldValues": 1}


def test_driver_coming_up_after_nvml_init_is_retried_at_the_next_collection(fake, make_receiver):
    """nvmlInit succeeds while the driver is still coming up (the GPU operator's driver container loading the
    module) and enumeration answers DRIVER_NOT_LOADED: the next collection tries again, not a discovery_interval
    later."""
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0)], fail=[Fail("nvmlDeviceGetCount_v2", DRIVER_NOT_LOADED)]))
    r = make_receiver()  # discovery_interval 60s
    assert points(r.collect(), "hw.gpu.memory.limit") == []
    assert errors(r, "nvmlInit") >= 1
    s.fail = []
    fake.write(s)
    assert value(r.collect(), "hw.gpu.memory.limit", hw__id=UUID0) == 80 * GiB


def test_memory_not_available_and_a_pid_in_both_lists(fake, make_receiver):
    """usedGpuMemory NVML_VALUE_NOT_AVAILABLE (pynvml: None) leaves the memory point out, never 0 nor 2^64-1; a
    process with compute and graphics contexts is one process with the memory NVML gives in either list."""
    na = (1 << 64) - 1
    p1, p2 = os.getpid(), os.getppid()
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[
        Process(pid=p1, used_mem=3 * GiB, sm=30), Process(pid=p1, used_mem=na, type="graphics", util=0),
        Process(pid=p2, used_mem=na, sm=10)]))
    md = make_receiver().collect()
    assert [(res["process.pid"], v) for res, _, v in points(md, "process.gpu.memory.usage")] == [(p1, 3 * GiB)]
    sm = {res["process.pid"]: v for res, a, v in points(md, "process.gpu.utilization") if a["hw.gpu.task"] == "general"}
    assert sm == {p1: pytest.approx(0.30), p2: pytest.approx(0.10)}


def test_process_samples_growing_between_the_size_query_and_the_read(fake, make_receiver):
    """nvmlDeviceGetProcessUtilization is two calls (size, then fill) and a sample may arrive between them: the
    fill then answers INSUFFICIENT_SIZE (pynvml does not oversize this buffer). That is a race, not an error of the
    GPU: asked again, the utilization is reported and nothing is counted."""
    pid = os.getpid()
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=pid, used_mem=GiB, sm=40)],
                        fail=[Fail("nvmlDeviceGetProcessUtilization", INSUFFICIENT_SIZE, times=1)]))
    r = make_receiver()
    md = r.collect()
    assert value(md, "process.gpu.utilization", process__pid=pid, hw__gpu__task="general") == pytest.approx(0.40)
    assert errors(r, f"nvmlDeviceGetProcessUtilization: INSUFFICIENT_SIZE {UUID0}") == 0


def test_process_utilization_survives_the_clock_stepping_back(fake, make_receiver):
    """Sample timestamps are wall-clock microseconds. When the clock steps back (NTP's first sync at boot, a VM
    resumed) the cursor, the newest sample seen, is in the future: asking for samples newer than it would hide
    every process's utilization (NOT_FOUND, read as idle) until the clock caught up, an hour later here."""
    pid = os.getpid()
    ahead = int((time.time() + 3600) * 1e6)  # samples stamped before the clock went back an hour
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=pid, used_mem=GiB, sm=40, ts=ahead)]))
    r = make_receiver()
    r.collect()
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=pid, used_mem=GiB, sm=55)]))  # stamped now
    md = r.collect()
    assert value(md, "process.gpu.utilization", process__pid=pid, hw__gpu__task="general") == pytest.approx(0.55)
    assert last_seen(fake.lib, 0) < ahead
