"""GPUs in trouble: one that falls off the bus or fails enumeration is reported failed under the identity it was known
by (alerts key on hw.id), each GPU's problem is logged once and recovered when that GPU answers again, and GPUs that
leave NVML's enumeration stop being reported. Rediscovery is forced as if discovery_interval had passed."""

from __future__ import annotations

import logging

import pytest
from harness.fake_nvml import GPU, GPU_IS_LOST, UNKNOWN, Fail, GiB, Process, Scenario, calls

from .test_nvml_receiver import errors, points, value

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
UUID2 = "GPU-99999999-8888-7777-6666-555555555555"


def rediscover(r) -> None:
    r.discovered_at = float("-inf")  # as when discovery_interval has passed


def status(md) -> dict[str, tuple[dict, dict[str, float]]]:
    """hw.id -> (its resource, {hw.state: value}) from hw.status."""
    out: dict = {}
    for res, attrs, v in points(md, "hw.status"):
        out.setdefault(res["hw.id"], (res, {}))[1][attrs["hw.state"]] = v
    return out


def warnings(caplog, *words: str) -> int:
    return sum(1 for rec in caplog.records
               if rec.levelno == logging.WARNING and all(w in rec.getMessage() for w in words))


def all_errors(r, word: str) -> float:
    reg = r.telemetry.telemetry.registry
    return sum(s.value for m in reg.collect() if m.name == "podmeter_component_errors" for s in m.samples
               if s.name.endswith("_total") and word in s.labels.get("cause", ""))


OK, FAILED = {"ok": 1, "failed": 0}, {"ok": 0, "failed": 1}


@pytest.mark.parametrize("noticed_at", ["collection", "discovery"])
def test_a_lost_gpu_keeps_its_identity_until_it_comes_back(fake, make_receiver, caplog, noticed_at):
    """Items 1 and 2: same hw.id and attributes while lost (through rediscovery), ok again when it is back, and the
    next fall-off of that GPU is logged again."""
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1, serial="1320", pci_bus_id="00000000:3B:00.0",
                                                       minor=5)]))
    r = make_receiver(discovery_interval="60s" if noticed_at == "collection" else "1ns")
    known = status(r.collect())
    assert known[UUID1][1] == OK
    for _ in range(2):
        s.gpus[1].lost = 1
        fake.write(s)
        for _ in range(3):  # the collection that notices, then collections after rediscovery while it stays lost
            md = r.collect()
            got = status(md)
            assert set(got) == {UUID0, UUID1}  # no nvidia-index-1 series
            assert got[UUID1] == (known[UUID1][0], FAILED)  # hw.id, hw.name, PCI bus id, serial... unchanged
            assert got[UUID0][1] == OK
            assert value(md, "hw.gpu.memory.usage", hw__id=UUID1) is None
            rediscover(r)
        assert f"gpu_lost {UUID1}" in r.telemetry.failing()
        s.gpus[1].lost = 0
        fake.write(s)
        got = status(r.collect())
        assert got[UUID1] == (known[UUID1][0], OK)
        r.collect()  # its static facts are read again
        assert not [c for c in r.telemetry.failing() if UUID1 in c or "nvidia-index" in c]
    assert warnings(caplog, f"gpu_lost {UUID1}") == 2  # each fall-off logged once
    assert not all_errors(r, "nvidia-index")


def test_gpus_leaving_the_enumeration_stop_being_reported(fake, make_receiver, caplog):
    """Item 1: when nvmlDeviceGetCount shrinks, a lost GPU keeps its identity while it is still enumerated (NVML's
    order is kept: the lost GPU is matched among its neighbours); a GPU no longer enumerated is logged once and its
    series stop."""
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1), GPU(uuid=UUID2)]))
    r = make_receiver()
    known = status(r.collect())
    s.gpus[1].lost = 1
    fake.write(s)
    assert status(r.collect())[UUID1][1] == FAILED
    rediscover(r)
    assert status(r.collect())[UUID1] == (known[UUID1][0], FAILED)
    # GPU 0 is taken off the bus: the lost GPU is now index 0, GPU 2 index 1
    s.gpus = s.gpus[1:]
    fake.write(s)
    rediscover(r)
    got = status(r.collect())
    assert set(got) == {UUID1, UUID2}
    assert got[UUID1] == (known[UUID1][0], FAILED)
    assert got[UUID2][1] == OK and got[UUID2][0]["hw.gpu.index"] == 1
    assert warnings(caplog, UUID0, "no longer") == 1
    # the lost GPU leaves the enumeration too: nothing is reported for it any more
    s.gpus = [GPU(uuid=UUID2)]
    fake.write(s)
    rediscover(r)
    for _ in range(2):
        got = status(r.collect())
        rediscover(r)
    assert set(got) == {UUID2} and got[UUID2][1] == OK
    assert warnings(caplog, UUID1, "no longer") == 1
    # GPU 0 is back (say, after maintenance): reported again, its removal recovered
    s.gpus = [GPU(uuid=UUID0), GPU(uuid=UUID2)]
    fake.write(s)
    rediscover(r)
    assert status(r.collect())[UUID0][1] == OK
    assert not [c for c in r.telemetry.failing() if UUID0 in c]


@pytest.mark.parametrize("fn", ["*", "nvmlDeviceGetUUID"])
def test_a_gpu_that_fails_enumeration_is_failed_and_not_called(fake, make_receiver, caplog, fn):
    """Item 3: a GPU without a handle (or without an identity) is reported failed, no value calls are made on it,
    one log line says why, and it is retried at the next discovery."""
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)], fail=[Fail(fn, UNKNOWN, gpu=1)]))
    r = make_receiver()
    temps = calls(fake.lib, "nvmlDeviceGetTemperature")
    for i in range(4):
        got = status(r.collect())
        assert set(got) == {UUID0, "nvidia-index-1"}  # nothing else is known of it
        assert got["nvidia-index-1"][1] == FAILED and got[UUID0][1] == OK
        assert got["nvidia-index-1"][0]["hw.gpu.index"] == 1
        if i == 1:
            rediscover(r)  # still failing at the next discovery
    assert calls(fake.lib, "nvmlDeviceGetTemperature") == temps + 4  # GPU 0 only
    assert not all_errors(r, "INVALID_ARGUMENT")
    assert warnings(caplog) == 1 and warnings(caplog, "UNKNOWN", "GPU 1") == 1
    s.fail = []
    fake.write(s)
    rediscover(r)
    got = status(r.collect())
    assert set(got) == {UUID0, UUID1} and got[UUID1][1] == OK
    assert r.telemetry.failing() == {}


def test_a_known_gpu_that_fails_rediscovery_keeps_its_identity(fake, make_receiver):
    """Item 3 with item 1: a GPU known by UUID that fails enumeration later is failed under that UUID."""
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)]))
    r = make_receiver()
    known = status(r.collect())
    s.fail = [Fail("*", UNKNOWN, gpu=1)]
    fake.write(s)
    rediscover(r)
    temps = calls(fake.lib, "nvmlDeviceGetTemperature")
    for _ in range(2):
        got = status(r.collect())
        assert set(got) == {UUID0, UUID1} and got[UUID1] == (known[UUID1][0], FAILED)
    assert calls(fake.lib, "nvmlDeviceGetTemperature") == temps + 2
    s.fail = []
    fake.write(s)
    rediscover(r)
    assert status(r.collect())[UUID1] == (known[UUID1][0], OK)
    assert r.telemetry.failing() == {}


def test_errors_are_logged_once_per_gpu_and_recovered_per_gpu(fake, make_receiver, caplog):
    """Item 4: the same failing call on two GPUs is two causes, each logged once, each recovered when that GPU's call
    succeeds again (and logged again when it fails again)."""
    temp = "nvmlDeviceGetTemperature"
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)], fail=[Fail(temp, UNKNOWN, gpu=1)]))
    r = make_receiver()
    r.collect()
    r.collect()
    s.fail.append(Fail(temp, UNKNOWN, gpu=0))
    fake.write(s)
    for _ in range(3):
        r.collect()
    assert warnings(caplog, temp, UUID1) == 1
    assert warnings(caplog, temp, UUID0) == 1
    assert errors(r, f"{temp}: UNKNOWN {UUID0}") == 3
    assert errors(r, f"{temp}: UNKNOWN {UUID1}") == 5
    s.fail = [Fail(temp, UNKNOWN, gpu=1)]  # GPU 0's temperature answers again
    fake.write(s)
    md = r.collect()
    assert value(md, "hw.gpu.temperature", hw__id=UUID0) == 40
    assert list(r.telemetry.failing()) == [f"{temp}: UNKNOWN {UUID1}"]
    s.fail.append(Fail(temp, UNKNOWN, gpu=0))
    fake.write(s)
    r.collect()
    assert warnings(caplog, temp, UUID0) == 2  # a new occurrence is logged again
    assert warnings(caplog, temp, UUID1) == 1


def test_enumeration_failing_keeps_the_gpus_known(fake, make_receiver):
    """nvmlDeviceGetCount failing at a rediscovery keeps the GPUs known (collected as before), counted and logged
    once, recovered when enumeration works again."""
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0, temp=45)]))
    r = make_receiver()
    r.collect()
    s.fail = [Fail("nvmlDeviceGetCount_v2", UNKNOWN)]
    fake.write(s)
    rediscover(r)
    md = r.collect()
    assert value(md, "hw.gpu.temperature", hw__id=UUID0) == 45
    assert errors(r, "nvmlDeviceGetCount: UNKNOWN") == 1
    s.fail = []
    fake.write(s)
    rediscover(r)
    assert value(r.collect(), "hw.gpu.temperature", hw__id=UUID0) == 45
    assert r.telemetry.failing() == {}


def test_a_gpu_lost_during_discovery(fake, make_receiver):
    """GPU_IS_LOST from a discovery-time call after its identity was read: no exception out of start or collect,
    the GPU is failed under its UUID."""
    fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)],
                        fail=[Fail("nvmlDeviceGetFieldValues", GPU_IS_LOST, gpu=1)]))
    r = make_receiver()
    got = status(r.collect())
    assert got[UUID1][1] == FAILED and got[UUID0][1] == OK
    assert got[UUID1][0]["hw.gpu.pci_bus_id"] == "00000000:19:00.0"


@pytest.mark.parametrize("fn", ["nvmlDeviceGetTemperature", "nvmlDeviceGetProcessUtilization"])
def test_a_gpu_lost_part_way_through_a_collection_reports_nothing_but_failed(fake, make_receiver, fn):
    """GPU_IS_LOST from a call after the GPU already answered others in the same collection (memory, utilization,
    its processes' memory): what it answered before is left out with the rest, as the README says; the other GPU
    keeps reporting everything. (PID 4242 is only a number NVML lists: not attributed, reported with process.pid.)"""
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0, mem_used=5 * GiB), GPU(uuid=UUID1, mem_used=7 * GiB)],
                            processes=[Process(pid=4242, gpu=0, used_mem=GiB), Process(pid=4242, gpu=1, used_mem=GiB)]))
    r = make_receiver()
    assert value(r.collect(), "hw.gpu.memory.usage", hw__id=UUID1) == 7 * GiB
    s.fail = [Fail(fn, GPU_IS_LOST, gpu=1)]
    fake.write(s)
    md = r.collect()
    got = status(md)
    assert got[UUID1][1] == FAILED and got[UUID0][1] == OK
    lost = [(name, attrs) for name in ("hw.gpu.memory.usage", "hw.gpu.utilization", "process.gpu.memory.usage",
                                       "hw.power", "hw.energy")
            for res, attrs, _ in points(md, name) if res["hw.id"] == UUID1]
    assert lost == []
    assert value(md, "hw.gpu.memory.usage", hw__id=UUID0) == 5 * GiB
    assert value(md, "process.gpu.memory.usage", hw__id=UUID0) == GiB
    assert value(md, "hw.gpu.temperature", hw__id=UUID0) == 40
    s.fail = []
    fake.write(s)
    md = r.collect()
    assert status(md)[UUID1][1] == OK and value(md, "hw.gpu.memory.usage", hw__id=UUID1) == 7 * GiB


def test_a_lost_gpu_keeps_its_identity_through_a_driver_reload(fake, make_receiver):
    """Item 1: the identity is remembered across NVML sessions (handles are not)."""
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1, minor=7)]))
    r = make_receiver()
    known = status(r.collect())
    s.gpus[1].lost = 1
    s.generation = 1  # a driver reload while it is lost
    fake.write(s)
    got = status(r.collect())
    assert set(got) == {UUID0, UUID1} and got[UUID1] == (known[UUID1][0], FAILED)


def test_line_up():
    """Unidentified indices are matched to the GPUs known before by their place in the enumeration."""
    from receivers.nvml.receiver import Device, _line_up

    def gpus(*ids, failing=()):
        return [Device(i, None if u in failing else object(), {"hw.id": u}) for i, u in enumerate(ids)]

    def ids(before, now):
        return {i: d.uuid for i, d in _line_up(before, now).items()}

    assert ids(gpus("a", "b", "c"), ["a", None, "c"]) == {1: "b"}
    assert ids(gpus("a", "b", "c"), [None, None, "c"]) == {0: "a", 1: "b"}
    assert ids(gpus("a", "b", "c"), ["a", "b", None]) == {2: "c"}
    assert ids(gpus("a", "b", "c"), ["a", "x", None, "c"]) == {2: "b"}  # x joined: b is still between a and c
    # a left the enumeration, b is failing: b is the one failing now (it was already)
    assert ids(gpus("a", "b", "c", failing=("b",)), [None, "c"]) == {0: "b"}
    assert ids(gpus("a", "b", "c"), [None, "c"]) == {}  # a or b: cannot tell, neither is guessed
    assert ids(gpus("a", "b"), [None, None, None]) == {}  # more unidentified than known: cannot tell
    assert ids(gpus("a", "b", "c"), ["c", None, "a"]) == {}  # order changed: no guess
