"""Cumulative series on the real kernel (root): start times stay put while counts grow, and a series whose counts
restart (its cgroup made again under the same resource, or its map entry evicted by the LRU) gets a new start time
instead of going backward, as OTel wants of a cumulative sum."""

from __future__ import annotations

import pytest
from harness.cgroups import PodCgroup

pytestmark = pytest.mark.root

SYSCALLS = "container.syscalls"


def point(md, pod: PodCgroup, name: str = SYSCALLS):
    """The pod container's data point of metric `name`, or None."""
    for rm in md.resource_metrics:
        res = dict(rm.resource.attributes)
        if res.get("k8s.pod.uid") != pod.uid or res.get("container.id") != pod.container_id:
            continue
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    return metric.data.data_points[0]
    return None


def test_start_time_stable_then_new_when_the_cgroup_is_made_again(receiver_factory, workload):
    r = receiver_factory(profile="standard", tracked_syscalls=["getppid"])
    pod = PodCgroup().create()
    try:
        workload(pod, "syscalls", 50_000, 0)
        first = point(r.collect(), pod)
        workload(pod, "syscalls", 1_000, 0)
        second = point(r.collect(), pod)
        # a live series keeps its start time (the receiver's start: the maps count from there)
        assert first.start_time_unix_nano == second.start_time_unix_nano == r.start_ns
        assert second.value > first.value
        calls = point(r.collect(), pod, "container.syscall.calls")
        assert calls.start_time_unix_nano == r.start_ns
    finally:
        pod.destroy()
    last = point(r.collect(), pod)  # the removed cgroup's last sample
    assert last.value >= second.value and last.start_time_unix_nano == r.start_ns
    between = r.collect()  # the series is gone
    assert point(between, pod) is None

    # the same pod uid and container id again (a static pod keeps its uid): its counters start from 0, so its
    # series restart with a new start time rather than go backward from `last`
    again = PodCgroup(uid=pod.uid, container_id=pod.container_id).create()
    try:
        workload(again, "syscalls", 1_000, 0)
        md = r.collect()
        p = point(md, again)
        assert p.value < last.value
        assert p.start_time_unix_nano > last.time_unix_nano
        assert p.start_time_unix_nano <= p.time_unix_nano
        calls = point(md, again, "container.syscall.calls")
        assert calls.value == 1_000 and calls.start_time_unix_nano == p.start_time_unix_nano
        switches = point(md, again, "container.context_switches")
        assert switches.start_time_unix_nano == p.start_time_unix_nano
        # and then stays put
        assert point(r.collect(), again).start_time_unix_nano == p.start_time_unix_nano
    finally:
        again.destroy()


def test_lru_eviction_is_reported_and_restarts_the_series(receiver_factory, workload):
    r = receiver_factory(profile="minimal", max_cgroups=16)
    reg = r.settings.telemetry.telemetry.registry
    pod = PodCgroup().create()
    flood: list[PodCgroup] = []
    try:
        workload(pod, "syscalls", 50_000, 0)
        cgid = pod.cgroup_id()
        before = point(r.collect(), pod)
        assert before.value >= 50_000

        # new cgroups push the pod's entry out of the 16-entry LRU map (the kernel evicts silently)
        while cgid in r.programs.read_counters():
            assert len(flood) < 200, "the pod's entry was never evicted"
            flood.append(PodCgroup().create())
            flood[-1].spawn(["/bin/true"]).wait()
        workload(pod, "syscalls", 1_000, 0)  # counted again from 0 in a new entry
        after = point(r.collect(), pod)
        assert after.value < before.value
        # the new series starts where the last point of the old one ended
        assert after.start_time_unix_nano >= before.time_unix_nano > before.start_time_unix_nano

        # entries there at the last collection and gone now were evicted: counted and reported
        for _ in range(40):
            flood.append(PodCgroup().create())
            flood[-1].spawn(["/bin/true"]).wait()
        r.collect()
        evicted = reg.get_sample_value("podmeter_ebpf_map_evictions_total", {"component": "ebpf", "map": "counters"})
        assert evicted and evicted >= 1
        assert "counters_map_full" in r.settings.telemetry.failing()
        assert "max_cgroups" in r.settings.telemetry.failing()["counters_map_full"]
    finally:
        pod.destroy()
        for p in flood:
            p.destroy()
