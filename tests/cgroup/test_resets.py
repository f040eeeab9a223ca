"""Cumulative series across cgroups that go and come back, on the real kernel (root).

A static pod restarted keeps its uid, so its pod cgroup is made again under the same path and its counters start
again from 0. OTel's data model requires a cumulative series that restarts to carry a new start time; a series
that appears after the receiver started starts when it appeared, not when the receiver did."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cgroup.helpers import make_receiver
from harness import require, require_root
from harness.cgroups import ROOT, PodCgroup, hierarchies

from receivers.cgroup.discovery import detect_layout

BURN = ("import sys, time\n"
        "t = time.process_time()\n"
        "while time.process_time() - t < 0.3: pass\n"
        "print('ready', flush=True); time.sleep(600)\n")
IDLE = "print('ready', flush=True); import time; time.sleep(600)\n"


def point(data, name: str, where: dict, attrs: dict | None = None):
    """The one data point of `name` on the resource matching `where` (and point attributes `attrs`), or None."""
    hits = [p for rm in data.resource_metrics if all(rm.resource.attributes.get(k) == v for k, v in where.items())
            for sm in rm.scope_metrics for m in sm.metrics if m.name == name for p in m.data.data_points
            if all(p.attributes.get(k) == v for k, v in (attrs or {}).items())]
    assert len(hits) <= 1
    return hits[0] if hits else None


def start(cg: PodCgroup, program: str) -> None:
    proc = cg.spawn([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"


@pytest.mark.parametrize("old,new,max_open_files", [
    (BURN, IDLE, 16384),  # counters go backward; the kept fds also say the cgroup was removed
    (BURN, IDLE, 0),  # nothing kept: the CPU time going backward says it
    (IDLE, BURN, 16384),  # the new cgroup already counts more than the old one did: only the kept fds can tell
], ids=["backward-kept", "backward-unkept", "forward-kept"])
def test_a_pod_cgroup_made_again_under_the_same_path_starts_new_series(old, new, max_open_files):
    require_root()
    require(bool(hierarchies()), "needs a mounted cgroup hierarchy")
    r = make_receiver(max_open_files=max_open_files, limits_every=1000)
    first = PodCgroup(qos="burstable").create()
    again = PodCgroup(uid=first.uid, qos="burstable")  # the static pod restarted: same uid, a new container id
    pod = {"k8s.pod.uid": first.uid}
    user = {"cpu.mode": "user"}
    try:
        start(first, old)
        data1 = r.collect()
        p1 = point(data1, "k8s.pod.cpu.time", pod, user)
        assert p1.start_time_unix_nano == r.start_ns  # there before the receiver's first collection
        first.destroy()
        again.create()
        start(again, new)
        data2 = r.collect()
        p2 = point(data2, "k8s.pod.cpu.time", pod, user)
        assert (p2.value < p1.value) == (old is BURN)  # the scenario: counters restarted from 0
        # a new start time, after the previous point: a reset a backend can see, whichever way the values went
        assert p2.start_time_unix_nano >= p1.time_unix_nano > p1.start_time_unix_nano
        # no CPU usage computed across the two cgroups
        assert point(data2, "k8s.pod.cpu.usage", pod) is None
        # the new container's series start no earlier than the previous collection either
        c2 = point(data2, "container.cpu.time", {"container.id": again.container_id}, user)
        assert c2.start_time_unix_nano >= p1.time_unix_nano
        # and then stay put while the cgroup lives
        data3 = r.collect()
        p3 = point(data3, "k8s.pod.cpu.time", pod, user)
        assert p3.start_time_unix_nano == p2.start_time_unix_nano and p3.value >= p2.value
        assert point(data3, "k8s.pod.cpu.usage", pod) is not None
        assert point(data3, "container.cpu.time", {"container.id": again.container_id},
                     user).start_time_unix_nano == c2.start_time_unix_nano
        # gauges carry no start time
        assert point(data3, "k8s.pod.memory.usage", pod).start_time_unix_nano == 0
    finally:
        r.shutdown()
        first.destroy()
        again.destroy()


ALLOC = "b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n"


def _limit_memory(cg: PodCgroup, layout, limit: int) -> None:
    name = "memory.max" if layout.memory.v2 else "memory.limit_in_bytes"
    path = f"{layout.memory.root}{cg.container_path}/{name}"
    require(os.path.exists(path), "needs the memory controller down to the container's cgroup")
    with open(path, "w") as f:
        f.write(str(limit))


def test_a_pods_oom_kills_count_its_containers_and_keep_them_when_they_go():
    """cgroup v1 counts an OOM kill in the victim's own cgroup only (memory.oom_control); cgroup2's memory.events
    counts it in every ancestor too. Either way the pod's count is its containers' kills, and a container that goes
    (kubelet restarts an OOM-killed container under a new id) takes none of them away."""
    require_root()
    require(bool(hierarchies()), "needs a mounted cgroup hierarchy")
    layout = detect_layout(ROOT)
    require(layout.memory is not None, "needs the memory controller")
    r = make_receiver()
    first = PodCgroup(qos="burstable").create()
    second = PodCgroup(uid=first.uid, qos="burstable").create()
    pod = {"k8s.pod.uid": first.uid}
    try:
        for cg in (first, second):
            _limit_memory(cg, layout, 32 << 20)
            # a worker is OOM-killed; the container's main process lives on
            sh = cg.spawn(["sh", "-c", f"{sys.executable} -c '{ALLOC}'; echo done; exec sleep 600"],
                          stdout=subprocess.PIPE, text=True)
            assert sh.stdout.readline().strip() == "done"
        data = r.collect()
        for cg in (first, second):
            assert point(data, "container.memory.oom.kills", {"container.id": cg.container_id}).value == 1
        assert point(data, "k8s.pod.memory.oom.kills", pod).value == 2
        for proc in second.procs:  # the second container goes: its processes, then its cgroup (not the pod's)
            proc.kill()
            proc.wait()
        for d in second.dirs():
            os.rmdir(d)
        data = r.collect()
        assert point(data, "container.memory.oom.kills", {"container.id": second.container_id}) is None
        assert point(data, "k8s.pod.memory.oom.kills", pod).value == 2
        # containers not read (per_container off): the pod's count is its containers' all the same
        pods_only = make_receiver(per_container=False)
        try:
            assert point(pods_only.collect(), "k8s.pod.memory.oom.kills", pod).value >= 1
        finally:
            pods_only.shutdown()
    finally:
        r.shutdown()
        second.destroy()
        first.destroy()
