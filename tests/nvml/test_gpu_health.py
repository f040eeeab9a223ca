"""GPU health signals (`health`, on by default): XID errors from NVML events, remapped memory rows, PCIe replays;
the real nvidia-ml-py against the fake libnvidia-ml.so.1 (no NVIDIA GPU can run here), whose event sets deliver
each XID line of the scenario once, as the driver queues each XID once per event set."""

from __future__ import annotations

from harness.fake_nvml import GPU, UNKNOWN, Fail, Scenario, Xid, calls, event_sets

from .test_nvml_receiver import UUID0, UUID1, errors, points, value


def xids(md) -> dict[tuple[str, int], float]:
    return {(res["hw.id"], attrs["hw.gpu.xid"]): v for res, attrs, v in points(md, "hw.gpu.xid.errors")}


def test_xid_errors_are_counted_per_gpu_and_xid_from_the_moment_podmeter_watches(fake, make_receiver):
    gpus = [GPU(uuid=UUID0), GPU(uuid=UUID1)]
    past = [Xid(gpu=0, code=31)]  # before the receiver started: the driver does not replay it
    fake.write(Scenario(gpus=gpus, xids=past))
    r = make_receiver()
    assert xids(r.collect()) == {}
    fake.write(Scenario(gpus=gpus, xids=[*past, Xid(0, 79), Xid(0, 79), Xid(1, 48)]))
    assert xids(r.collect()) == {(UUID0, 79): 2, (UUID1, 48): 1}
    fake.write(Scenario(gpus=gpus, xids=[*past, Xid(0, 79), Xid(0, 79), Xid(1, 48), Xid(0, 13)]))
    md = r.collect()
    assert xids(md) == {(UUID0, 79): 2, (UUID0, 13): 1, (UUID1, 48): 1}  # cumulative, each event once
    (res, attrs, _), = [p for p in points(md, "hw.gpu.xid.errors") if p[1]["hw.gpu.xid"] == 13]
    assert isinstance(attrs["hw.gpu.xid"], int) and res["hw.name"] == "nvidia0"
    assert xids(r.collect()) == xids(md)  # nothing new queued


def test_the_event_set_is_one_per_session_freed_at_a_reload_and_at_shutdown(fake, make_receiver):
    gpus = [GPU(uuid=UUID0), GPU(uuid=UUID1)]
    fake.write(Scenario(gpus=gpus))
    live, registered = event_sets(fake.lib), calls(fake.lib, "nvmlDeviceRegisterEvents")
    r = make_receiver(discovery_interval="1ns")  # rediscover at every collection
    for _ in range(3):
        r.collect()
    # one set, each GPU registered once however often the GPUs are enumerated again
    assert event_sets(fake.lib) - live == 1
    assert calls(fake.lib, "nvmlDeviceRegisterEvents") - registered == 2
    fake.write(Scenario(gpus=gpus, xids=[Xid(0, 79)]))
    assert xids(r.collect()) == {(UUID0, 79): 1}
    # a driver reload: a new set, the GPUs registered on it; podmeter's counts go on
    fake.write(Scenario(gpus=gpus, xids=[Xid(0, 79)], generation=1))
    assert xids(r.collect()) == {(UUID0, 79): 1}
    assert event_sets(fake.lib) - live == 1
    fake.write(Scenario(gpus=gpus, xids=[Xid(0, 79), Xid(0, 79)], generation=1))
    assert xids(r.collect()) == {(UUID0, 79): 2}
    r.shutdown()
    assert event_sets(fake.lib) == live


def test_a_failed_event_read_is_counted_and_the_events_wait_for_the_next_collection(fake, make_receiver):
    gpus = [GPU(uuid=UUID0)]
    fake.write(Scenario(gpus=gpus))
    r = make_receiver()
    r.collect()
    fake.write(Scenario(gpus=gpus, xids=[Xid(0, 94)], fail=[Fail("nvmlEventSetWait_v2", UNKNOWN, times=1)]))
    md = r.collect()
    assert xids(md) == {} and value(md, "hw.power", hw__id=UUID0) is not None  # the rest as usual
    assert errors(r, "nvmlEventSetWait: UNKNOWN") == 1
    assert xids(r.collect()) == {(UUID0, 94): 1}


def test_remapped_rows_and_pcie_replays(fake, make_receiver):
    fake.write(Scenario(gpus=[
        GPU(uuid=UUID0, remap_corr=2, remap_unc=1, remap_pending=1, pcie_replays=17),
        GPU(uuid=UUID1, name="NVIDIA T4", remap=0, pcie=0),  # no row remapping, no PCIe counters
    ]))
    r = make_receiver()
    md = r.collect()
    g = {"hw__id": UUID0}
    assert value(md, "hw.gpu.memory.remapped_rows", hw__gpu__memory__remap__cause="correctable", **g) == 2
    assert value(md, "hw.gpu.memory.remapped_rows", hw__gpu__memory__remap__cause="uncorrectable", **g) == 1
    assert value(md, "hw.gpu.memory.remap.pending", **g) == 1
    assert value(md, "hw.gpu.memory.remap.failed", **g) == 0
    assert value(md, "hw.gpu.pcie.replays", **g) == 17
    # what a GPU does not have is left out, never zero; said once, not asked again
    for name in ("hw.gpu.memory.remapped_rows", "hw.gpu.memory.remap.pending", "hw.gpu.pcie.replays"):
        assert all(res["hw.id"] != UUID1 for res, _, _ in points(md, name)), name
    asked = calls(fake.lib, "nvmlDeviceGetRemappedRows")
    md = r.collect()
    assert calls(fake.lib, "nvmlDeviceGetRemappedRows") - asked == 1  # GPU 0 only
    assert errors(r, "nvmlDeviceGetRemappedRows: NOT_SUPPORTED") == 1


def test_a_driver_that_cannot_read_events_is_said_once_and_the_counts_stay(fake, make_receiver):
    gpus = [GPU(uuid=UUID0, pcie_replays=3)]
    fake.write(Scenario(gpus=gpus))
    r = make_receiver()
    r.collect()
    fake.write(Scenario(gpus=gpus, xids=[Xid(0, 79)]))
    assert xids(r.collect()) == {(UUID0, 79): 1}
    # FUNCTION_NOT_FOUND from then on: not asked again, said once; what was counted is still reported
    fake.write(Scenario(gpus=gpus, xids=[Xid(0, 79)], fail=[Fail("nvmlEventSetWait_v2", 13)]))
    waits = calls(fake.lib, "nvmlEventSetWait_v2")
    for _ in range(3):
        md = r.collect()
    assert calls(fake.lib, "nvmlEventSetWait_v2") - waits == 1
    assert errors(r, "nvmlEventSetWait: FUNCTION_NOT_FOUND") == 1
    assert xids(md) == {(UUID0, 79): 1} and value(md, "hw.gpu.pcie.replays", hw__id=UUID0) == 3
    # a driver reloaded (another driver) is asked again
    fake.write(Scenario(gpus=gpus, xids=[Xid(0, 79)], generation=1))
    r.collect()
    fake.write(Scenario(gpus=gpus, xids=[Xid(0, 79), Xid(0, 31)], generation=1))
    assert xids(r.collect()) == {(UUID0, 79): 1, (UUID0, 31): 1}
