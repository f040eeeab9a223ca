"""GPM (GPU performance metrics: SM activity and occupancy, pipes, memory bandwidth) through the real nvidia-ml-py
against the fake libnvidia-ml.so.1 (no NVIDIA GPU can run here). The fake answers, per GPU or MIG GPU instance,
the percentages its scenario gives, from two samples taken in order on the same source in one driver session, as
NVML computes them; other pairs it refuses."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace

import pytest
from harness.fake_nvml import GPU, UNKNOWN, Fail, MigDevice, Scenario, calls, gpm_samples

from .test_nvml_receiver import UUID0, UUID1, errors, points, value

MIG1 = "MIG-11111111-2222-3333-4444-555555555555"
MIG2 = "MIG-66666666-7777-8888-9999-000000000000"
MIG3 = "MIG-77777777-8888-9999-aaaa-bbbbbbbbbbbb"
# NVML_GPM_METRIC_*: GRAPHICS_UTIL, SM_UTIL, SM_OCCUPANCY, INTEGER_UTIL, ANY_TENSOR_UTIL, DRAM_BW_UTIL, FP64/32 (no FP16)
BUSY = {1: 87.5, 2: 71, 3: 40, 4: 8, 5: 55, 10: 62, 11: 0, 12: 12}
GPM_NAMES = ("hw.gpu.engine.utilization", "hw.gpu.sm.utilization", "hw.gpu.sm.occupancy", "hw.gpu.pipe.utilization",
             "hw.gpu.memory.bandwidth.utilization")
GPM_CALLS = ("nvmlGpmQueryDeviceSupport", "nvmlGpmSampleAlloc", "nvmlGpmSampleGet", "nvmlGpmMigSampleGet",
             "nvmlGpmMetricsGet")


def gpm_points(md) -> list:
    return [p for name in GPM_NAMES for p in points(md, name)]


def counts(lib: str) -> dict[str, int]:
    return {fn: calls(lib, fn) for fn in GPM_CALLS}


def grew(before: dict, lib: str) -> dict[str, int]:
    return {fn: n - before[fn] for fn, n in counts(lib).items() if n != before[fn]}


def gpm_errors(receiver) -> dict[str, float]:
    reg = receiver.telemetry.telemetry.registry
    return {s.labels["cause"]: s.value for m in reg.collect() for s in m.samples
            if s.name == "podmeter_component_errors_total" and s.labels["cause"].startswith("nvmlGpm")}


def test_gpu_metrics_come_from_two_samples_of_that_gpu(fake, make_receiver):
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, gpm=BUSY)]))
    live, before = gpm_samples(fake.lib), counts(fake.lib)
    r = make_receiver(gpm=True)
    # the first sample is taken when the GPU is discovered (at start): the first collection has the figures since
    md = r.collect()
    g = {"hw__id": UUID0}
    assert value(md, "hw.gpu.engine.utilization", **g) == 0.875
    assert value(md, "hw.gpu.sm.utilization", **g) == 0.71
    assert value(md, "hw.gpu.sm.occupancy", **g) == 0.40
    assert value(md, "hw.gpu.memory.bandwidth.utilization", **g) == 0.62
    pipes = {attrs["hw.gpu.pipe"]: v for _, attrs, v in points(md, "hw.gpu.pipe.utilization")}
    # fp16 answered NOT_SUPPORTED in its slot: left out, never zero; fp64 really is 0
    assert pipes == {"tensor": 0.55, "fp64": 0.0, "fp32": 0.12, "integer": 0.08}
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, gpm={**BUSY, 2: 20})]))
    assert value(r.collect(), "hw.gpu.sm.utilization", **g) == 0.20  # the newer sample's figures
    # two samples for the GPU, reused: three taken (at discovery and at each collection), two compared, none
    # allocated per collection
    assert grew(before, fake.lib) == {"nvmlGpmQueryDeviceSupport": 1, "nvmlGpmSampleAlloc": 2,
                                      "nvmlGpmSampleGet": 3, "nvmlGpmMetricsGet": 2}
    assert gpm_samples(fake.lib) - live == 2
    r.shutdown()
    assert gpm_samples(fake.lib) == live


def test_each_mig_device_reports_its_gpu_instance(fake, make_receiver):
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, mig=1, gpm={})], mig=[
        MigDevice(gpu=0, gi=1, ci=0, uuid=MIG1, gpm={1: 30, 2: 25}),
        MigDevice(gpu=0, gi=2, ci=0, uuid=MIG2, profile="3g.40gb", gpm={1: 90, 2: 80}),
        MigDevice(gpu=0, gi=2, ci=1, uuid=MIG3, profile="3g.40gb"),  # a second compute instance of instance 2
    ]))
    before = counts(fake.lib)
    r = make_receiver(gpm=True)
    md = r.collect()
    # device utilization is not available in MIG mode; GPM gives each instance's
    assert value(md, "hw.gpu.utilization", hw__gpu__task="general", hw__id=UUID0) is None
    assert value(md, "hw.gpu.engine.utilization", hw__id=MIG1) == 0.30
    assert value(md, "hw.gpu.sm.utilization", hw__id=MIG1) == 0.25
    assert value(md, "hw.gpu.sm.utilization", hw__id=MIG2) == 0.80
    assert value(md, "hw.gpu.sm.utilization", hw__id=MIG3) == 0.80  # the instance's figure, on both its devices
    assert value(md, "hw.gpu.sm.utilization", hw__id=UUID0) is None
    # one sample per instance per collection, none of the whole GPU
    assert grew(before, fake.lib) == {"nvmlGpmQueryDeviceSupport": 1, "nvmlGpmSampleAlloc": 4,
                                      "nvmlGpmMigSampleGet": 4, "nvmlGpmMetricsGet": 2}


def test_gpus_without_gpm_are_said_once_not_counted(fake, make_receiver, caplog):
    # GPU 0 predates Hopper; GPU 1 has GPM. A driver older than GPM lacks the symbol: FUNCTION_NOT_FOUND
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, name="NVIDIA A100-SXM4-80GB"), GPU(uuid=UUID1, gpm=BUSY)]))
    before = counts(fake.lib)
    with caplog.at_level(logging.INFO, logger="podmeter.nvml.test"):
        r = make_receiver(gpm=True, discovery_interval="1ns")  # rediscover at every collection
        for _ in range(3):
            md = r.collect()
    said = [rec.getMessage() for rec in caplog.records if "has no GPM" in rec.getMessage()]
    assert len(said) == 1 and UUID0 in said[0] and "A100" in said[0], said
    assert all(p[0]["hw.id"] == UUID1 for p in gpm_points(md)) and value(md, "hw.gpu.sm.utilization", hw__id=UUID1)
    assert grew(before, fake.lib)["nvmlGpmSampleGet"] == 4  # GPU 1's only: at its discovery, then each collection
    assert errors(r, "nvmlGpmQueryDeviceSupport: NOT_SUPPORTED") == 0

    fake.write(Scenario(gpus=[GPU(uuid=UUID0, gpm=BUSY)], fail=[Fail("nvmlGpmQueryDeviceSupport", 13)]))
    before = counts(fake.lib)
    r = make_receiver(gpm=True)
    r.collect()
    assert gpm_points(r.collect()) == [] and grew(before, fake.lib) == {"nvmlGpmQueryDeviceSupport": 1}
    assert value(r.collect(), "hw.power", hw__id=UUID0) is not None  # the rest as before


def test_gpm_is_off_by_default_and_then_costs_no_nvml_call(fake, make_receiver):
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, gpm=BUSY)]))
    before = counts(fake.lib)
    r = make_receiver()
    r.collect()
    assert gpm_points(r.collect()) == [] and grew(before, fake.lib) == {}


def test_a_failed_sample_is_counted_and_the_next_one_pairs_with_the_last_good_one(fake, make_receiver):
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, gpm=BUSY)]))
    r = make_receiver(gpm=True)
    r.collect()
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, gpm=BUSY)], fail=[Fail("nvmlGpmSampleGet", UNKNOWN, times=1)]))
    md = r.collect()
    assert gpm_points(md) == [] and value(md, "hw.power", hw__id=UUID0) is not None
    assert errors(r, f"nvmlGpmSampleGet: UNKNOWN {UUID0}") == 1
    assert value(r.collect(), "hw.gpu.sm.utilization", hw__id=UUID0) == 0.71


def ids(md) -> set[str]:
    return {res["hw.id"] for res, _, _ in gpm_points(md)}


@pytest.mark.parametrize("change", ["gpu_lost", "driver_reload", "gpu_removed", "mig_reconfigured"])
def test_samples_are_freed_and_never_paired_across_a_change(fake, make_receiver, change):
    """A sample from before a GPU fell off the bus, a driver reload or a MIG reconfiguration is not compared with one
    after it (the fake refuses such pairs, as a rate across them means nothing); the samples of a GPU or instance
    that went away are freed."""
    mig = [MigDevice(gpu=1, gi=1, uuid=MIG1, gpm=BUSY)]
    gpus = [GPU(uuid=UUID0, gpm=BUSY), GPU(uuid=UUID1, mig=1, gpm={})]
    before = Scenario(gpus=gpus, mig=mig)
    fake.write(before)
    live = gpm_samples(fake.lib)
    # a GPU lost is noticed by a collection; the others by a discovery (here at every collection)
    r = make_receiver(gpm=True, discovery_interval="60s" if change == "gpu_lost" else "1ns")
    assert ids(r.collect()) == {UUID0, MIG1}
    assert gpm_samples(fake.lib) - live == 4  # two per source: GPU 0, and GPU 1's instance 1
    after = {
        "gpu_lost": Scenario(gpus=[replace(gpus[0], lost=1), gpus[1]], mig=mig),
        "driver_reload": Scenario(gpus=gpus, mig=mig, generation=1),
        "gpu_removed": Scenario(gpus=gpus[1:], mig=[replace(mig[0], gpu=0)]),
        "mig_reconfigured": Scenario(gpus=gpus, mig=[MigDevice(gpu=1, gi=1, uuid=MIG2, profile="2g.20gb", gpm=BUSY)]),
    }[change]
    fake.write(after)
    md = r.collect()
    # what went away is freed; what was found again starts over with a sample at its discovery
    assert ids(md) == {"gpu_lost": {MIG1}, "driver_reload": {UUID0, MIG1}, "gpu_removed": {MIG1},
                       "mig_reconfigured": {UUID0, MIG2}}[change]
    assert gpm_samples(fake.lib) - live == {"gpu_lost": 2, "driver_reload": 4, "gpu_removed": 2,
                                            "mig_reconfigured": 4}[change]
    if change in ("gpu_lost", "gpu_removed"):
        fake.write(before)  # GPU 0 is back: after a fall off the bus it starts over at the collection that sees it
        assert ids(r.collect()) == ({MIG1} if change == "gpu_lost" else {UUID0, MIG1})
    assert ids(r.collect()) == {UUID0, MIG2 if change == "mig_reconfigured" else MIG1}
    assert gpm_errors(r) == {}  # no pair the library refused
    r.shutdown()
    assert gpm_samples(fake.lib) == live


def test_podmeter_collect_once_waits_one_interval_for_the_gpm_figures(fake, tmp_path):
    fake.write(Scenario(gpus=[GPU(uuid=UUID0, gpm=BUSY)]))
    config = tmp_path / "nvml.yaml"
    config.write_text(f"receivers:\n  nvml: {{library_path: {fake.lib}, gpm: true, collection_interval: 1s}}\n"
                      "exporters:\n  debug: {}\n"
                      "service:\n  pipelines:\n    metrics: {receivers: [nvml], exporters: [debug]}\n")
    out = subprocess.run([sys.executable, "-m", "podmeter.cli", "collect", "--once", "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hw.gpu.sm.utilization = 0.71" in out.stdout, out.stdout[-3000:]
