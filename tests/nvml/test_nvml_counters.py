"""nvml receiver: cumulative counters across driver reloads and GPU resets, and what the driver gets wrong in
per-process utilization samples. The real nvidia-ml-py against the fake libnvidia-ml.so.1 (see conftest)."""

from __future__ import annotations

import os

import pytest
from harness.fake_nvml import GPU, GPU_IS_LOST, Fail, GiB, Process, Scenario

from .test_nvml_receiver import points

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
COUNTERS = ("hw.energy", "hw.errors", "hw.gpu.io")


def cumulative(md) -> dict[tuple, tuple[int, int, float]]:
    """(metric, sorted point attributes) -> (start time, time, value) of the counters of GPU UUID0."""
    out = {}
    for rm in md.resource_metrics:
        if rm.resource.attributes.get("hw.id") != UUID0:
            continue
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name in COUNTERS:
                    for p in m.data.data_points:
                        key = (m.name, tuple(sorted(p.attributes.items())))
                        out[key] = (p.start_time_unix_nano, p.time_unix_nano, p.value)
    return out


def gpu(**kw) -> GPU:
    return GPU(uuid=UUID0, **{"energy_mj": 5_000_000, "ecc_corr": 7, "ecc_uncorr": 1, "pcie_tx": 10 * GiB,
                              "pcie_rx": 20 * GiB, **kw})


def test_counters_restarted_by_a_driver_reload_get_a_new_start_time(fake, make_receiver):
    """The energy, ECC and PCIe counters count since the driver was loaded: after a reload they start again from
    about 0. Under the same start time that is a counter going backwards (a huge negative rate through OTLP
    cumulative-to-delta); a new start time says the series restarted."""
    s = fake.write(Scenario(gpus=[gpu()]))
    r = make_receiver()
    first = cumulative(r.collect())
    assert len(first) == 5
    s.gpus = [gpu(energy_mj=5_500_000, ecc_corr=8, pcie_tx=11 * GiB, pcie_rx=21 * GiB)]
    fake.write(s)
    second = cumulative(r.collect())
    # growing counters keep their start time
    assert {k: v[0] for k, v in second.items()} == {k: v[0] for k, v in first.items()}
    # the driver is reloaded: its counters restart
    s.generation = 1
    s.gpus = [gpu(energy_mj=20_000, ecc_corr=0, ecc_uncorr=0, pcie_tx=GiB, pcie_rx=GiB)]
    fake.write(s)
    third = cumulative(r.collect())
    assert third[("hw.energy", ())][2] == pytest.approx(20)
    for key, (start, t, _) in third.items():
        assert start > second[key][1], key  # after the last point of the old series
        assert start <= t
    # and then keep that start time while they grow again
    s.gpus = [gpu(energy_mj=30_000, ecc_corr=0, ecc_uncorr=0, pcie_tx=2 * GiB, pcie_rx=2 * GiB)]
    fake.write(s)
    assert {k: v[0] for k, v in cumulative(r.collect()).items()} == {k: v[0] for k, v in third.items()}


def test_counters_reset_with_the_gpu_get_a_new_start_time(fake, make_receiver):
    """A GPU reset (the GPU falls off the bus, then answers again) clears its volatile ECC counters; a counter
    seen lower than before (whatever the reason) restarts its series too."""
    s = fake.write(Scenario(gpus=[gpu()]))
    r = make_receiver()
    first = cumulative(r.collect())
    s.fail = [Fail("*", GPU_IS_LOST, gpu=0)]
    fake.write(s)
    assert cumulative(r.collect()) == {}
    # back after the reset: ECC counted 7 corrected errors before, 7 again since the reset (the same value)
    s.fail = []
    s.gpus = [gpu(energy_mj=5_100_000, pcie_tx=11 * GiB, pcie_rx=21 * GiB)]
    fake.write(s)
    after = cumulative(r.collect())
    key = ("hw.errors", (("error.type", "corrected"),))
    assert after[key][2] == 7
    assert after[key][0] > first[key][1]
    # a counter that goes down without any reload or reset NVML told of: a new series as well
    s.gpus = [gpu(energy_mj=100, pcie_tx=11 * GiB, pcie_rx=21 * GiB)]
    fake.write(s)
    later = cumulative(r.collect())
    assert later[("hw.energy", ())][0] > after[("hw.energy", ())][1]
    assert later[key][0] == after[key][0]  # the others are the same series as before


def test_garbage_utilization_samples_are_left_out(fake, make_receiver):
    """Drivers are known to return per-process samples with values like 2147483632 (nvtop#110, DCGM#83): they
    are not percentages and must not become a utilization of 21 million."""
    pid = os.getpid()
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)],
                        processes=[Process(pid=pid, used_mem=GiB, sm=2147483632, mem=30, enc=101)]))
    md = make_receiver().collect()
    u = {a["hw.gpu.task"]: v for res, a, v in points(md, "process.gpu.utilization") if res["process.pid"] == pid}
    assert u == {"decoder": 0}
    mem_ctrl = [v for res, _a, v in points(md, "process.gpu.memory.controller.utilization") if res["process.pid"] == pid]
    assert mem_ctrl == [pytest.approx(0.30)]
    assert all(0 <= v <= 1 for _, _, v in points(md, "process.gpu.utilization"))


def test_nvlink_bytes_are_not_summed_over_part_of_the_links(fake, make_receiver):
    """A link whose counter cannot be read this time (here: the driver stops answering for links 2 and 3) must
    not make the per-GPU sum drop (a false reset) and jump back by a whole link's bytes later."""
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0, nvlink_links=4, nvlink_tx=400, nvlink_rx=800)]))
    r = make_receiver()
    assert points(r.collect(), "hw.gpu.nvlink.io")[0][2] == 400 * 1024
    s.gpus = [GPU(uuid=UUID0, nvlink_links=2, nvlink_tx=300, nvlink_rx=600)]
    fake.write(s)
    assert points(r.collect(), "hw.gpu.nvlink.io") == []
