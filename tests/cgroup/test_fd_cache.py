"""The receiver's cost model on the real kernel (root): cgroup files kept open and re-read in place, closed when the
cgroup goes (also in the middle of a collection), a cap on kept fds beyond which files are opened and closed as
before, and limits read on discovery and then every Nth collection. Nothing here measures time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cgroup.helpers import make_receiver, opened_during, value
from harness import require, require_root
from harness.cgroups import ROOT, PodCgroup, hierarchies

from receivers.cgroup import receiver as receiver_module
from receivers.cgroup import stats as stats_module
from receivers.cgroup.discovery import detect_layout


def fds_naming(text: str) -> list[str]:
    """This process's open fds whose target path contains text."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if text in target:
            out.append(target)
    return out


@pytest.fixture
def pod():
    require_root()
    require(bool(hierarchies()), "needs a mounted cgroup hierarchy")
    cg = PodCgroup(qos="burstable").create()
    cg.spawn(["sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        yield cg
    finally:
        cg.destroy()


@pytest.fixture
def receivers():
    made = []

    def make(**config):
        r = make_receiver(**config)
        made.append(r)
        return r

    yield make
    for r in made:
        r.shutdown()


def test_files_are_kept_open_and_reread_in_place(pod, receivers):
    r = receivers()
    c = {"container.id": pod.container_id}
    _, first = opened_during(r.collect)
    assert any(pod.container_id in p for p in first)
    kept = r.reader.kept(pod.container_path)
    assert kept >= 3, "the container's statistics files stay open"
    assert len(fds_naming(pod.container_id)) == kept
    before = dict(r.reader._fds[pod.container_path])
    data, second = opened_during(r.collect)
    # the second collection opens none of the container's files again (limits are not due; the process the network
    # reading found is kept too) and reads new values
    assert [p for p in second if pod.container_id in p] == []
    assert r.reader._fds[pod.container_path] == before
    assert value(data, "container.pids.count", c) == 1
    assert value(data, "container.memory.usage", c) > 0
    # cgroup.procs (network) is not among the kept files: only statistics files are
    assert not [p for p in before if p.endswith("cgroup.procs")]


def test_fds_are_closed_when_the_cgroup_goes(receivers):
    require_root()
    require(bool(hierarchies()), "needs a mounted cgroup hierarchy")
    r = receivers()
    cg = PodCgroup(qos="besteffort").create()
    try:
        r.collect()
        assert r.reader.kept(cg.container_path) > 0 and r.reader.kept(cg.pod_path) > 0
        total = r.reader.kept()
    finally:
        cg.destroy()
    data = r.collect()
    assert r.reader.kept(cg.container_path) == 0 and r.reader.kept(cg.pod_path) == 0
    assert r.reader.kept() < total
    assert fds_naming(cg.uid) == []
    assert value(data, "container.memory.usage", {"container.id": cg.container_id}) is None
    assert r.reader.errors == []


def test_a_cgroup_removed_mid_collection_is_no_error_and_leaks_no_fd(receivers, monkeypatch):
    require_root()
    require(bool(hierarchies()), "needs a mounted cgroup hierarchy")
    r = receivers()
    errors = []
    monkeypatch.setattr(r.telemetry, "error", lambda cause, *a, **k: errors.append((cause, a)))
    cg = PodCgroup(qos="burstable").create()
    try:
        r.collect()
        assert r.reader.kept(cg.container_path) > 0
        scan = r.discovery.scan

        def scan_then_remove():
            found = scan()
            assert cg.container_path in found[0].containers  # listed...
            cg.destroy()  # ...and removed before its files are read: the kept fds now answer ENODEV
            return found

        monkeypatch.setattr(r.discovery, "scan", scan_then_remove)
        data = r.collect()
    finally:
        cg.destroy()
    assert errors == [] and r.reader.errors == []
    assert value(data, "container.memory.usage", {"container.id": cg.container_id}) is None
    assert value(data, "k8s.pod.memory.usage", {"k8s.pod.uid": cg.uid}) is None
    assert r.reader.kept(cg.container_path) == 0 and r.reader.kept(cg.pod_path) == 0
    assert fds_naming(cg.uid) == []


def test_a_cgroup_made_again_under_the_same_name_is_read_anew(receivers):
    require_root()
    require(bool(hierarchies()), "needs a mounted cgroup hierarchy")
    r = receivers()
    cg = PodCgroup(qos="burstable").create()
    try:
        r.collect()
        old = r.reader.kept(cg.container_path)
        assert old > 0
        # removed and made again between two collections with no discovery in between: the kept fds are stale
        for d in cg.dirs():
            os.rmdir(d)
        for d in cg.dirs():
            os.makedirs(d)
        cg.spawn(["sleep", "600"], stdin=subprocess.DEVNULL)
        data = r.collect()
        assert value(data, "container.pids.count", {"container.id": cg.container_id}) == 1
        assert r.reader.errors == []
        # the stale fds are closed, not leaked: every fd naming the container is one kept for the new cgroup (one
        # more than before where exec'ing sleep read the disk: a v1 blkio ops file listing the disk is then kept)
        assert r.reader.kept(cg.container_path) >= old
        assert len(fds_naming(cg.container_id)) == r.reader.kept(cg.container_path)
    finally:
        cg.destroy()


def _set_limits(cg: PodCgroup, path: str, quota: int | None, mem: int, pids: int) -> None:
    """CPU quota (None: no CPU limit), memory and pids limits of one of the pod's cgroups, v1 or v2."""
    layout = detect_layout(ROOT)
    thr, memory, pids_src = layout.throttle, layout.memory, layout.pids
    files = {f"{thr.root}{path}/cpu.max" if thr.v2 else f"{thr.root}{path}/cpu.cfs_quota_us":
             (f"{quota} 100000" if quota else "max 100000") if thr.v2 else str(quota or -1),
             f"{memory.root}{path}/{'memory.max' if memory.v2 else 'memory.limit_in_bytes'}": str(mem),
             f"{pids_src.root}{path}/pids.max": str(pids)}
    for file, text in files.items():
        require(os.path.exists(file), f"needs {os.path.basename(file)} down to the pod's cgroups")
        with open(file, "w") as f:
            f.write(text)


@pytest.mark.parametrize("old_quota,new_quota", [(None, 20000), (20000, None), (20000, 50000)])
def test_a_cgroup_made_again_with_other_limits_shows_its_own_at_once(receivers, old_quota, new_quota):
    """A pod cgroup made again under the same path (a static pod restarted keeps its uid) is a new cgroup: its
    limits, and whether it has a CPU quota (which gates the throttling series), are its own from the first reading
    that sees it, not those remembered of the removed one until limits are next due."""
    require_root()
    layout = detect_layout(ROOT)
    require(layout is not None and layout.throttle is not None and layout.memory is not None
            and layout.pids is not None, "needs the cpu, memory and pids controllers")
    r = receivers(limits_every=100)
    cg = PodCgroup(qos="burstable").create()
    c, p = {"container.id": cg.container_id}, {"k8s.pod.uid": cg.uid}
    try:
        for path in (cg.pod_path, cg.container_path):
            _set_limits(cg, path, old_quota, 512 << 20, 100)
        for _ in range(2):  # the second from the kept fds, with the limits remembered
            data = r.collect()
            assert value(data, "container.memory.limit", c) == 512 << 20
            assert value(data, "k8s.pod.pids.limit", p) == 100
        for d in cg.dirs():
            os.rmdir(d)
        for d in cg.dirs(cg.pod_path):
            os.rmdir(d)
        cg.create()
        for path in (cg.pod_path, cg.container_path):
            _set_limits(cg, path, new_quota, 256 << 20, 50)
        data = r.collect()
        for where, level in ((c, "container"), (p, "k8s.pod")):
            assert value(data, f"{level}.memory.limit", where) == 256 << 20
            assert value(data, f"{level}.pids.limit", where) == 50
            periods = value(data, f"{level}.cpu.throttling_data.periods", where)
            assert (periods is not None) == (new_quota is not None), (level, periods)
        assert r.reader.errors == []
    finally:
        cg.destroy()


def test_beyond_the_fd_cap_files_are_opened_and_read_each_time(pod, receivers):
    capped = receivers(max_open_files=4)
    capped.collect()
    assert capped.reader.kept() == 4
    data, opened = opened_during(capped.collect)
    assert capped.reader.kept() == 4
    assert [p for p in opened if pod.container_id in p and not p.endswith("/cgroup.procs")], \
        "files beyond the cap are opened again"
    c = {"container.id": pod.container_id}
    assert value(data, "container.pids.count", c) == 1
    assert value(data, "container.memory.usage", c) > 0
    assert value(data, "container.cpu.time", c, {"cpu.mode": "user"}) is not None
    capped.shutdown()
    none = receivers(max_open_files=0)
    data = none.collect()
    assert none.reader.kept() == 0 and fds_naming(pod.container_id) == []
    assert len(none.network) == 0  # nor is the pod's process kept: it is found again each time
    assert value(data, "container.pids.count", c) == 1


def test_kept_fds_are_bounded_for_the_whole_process(pod, receivers, monkeypatch):
    """Two cgroup receivers in one process share one budget; what one gives back on shutdown serves the other."""
    budget = stats_module.FdBudget()
    monkeypatch.setattr(stats_module, "FD_BUDGET", budget)
    monkeypatch.setattr(receiver_module, "FD_BUDGET", budget)
    first, second = receivers(max_open_files=6), receivers(max_open_files=6)
    first.collect()
    data = second.collect()
    assert first.reader.kept() == 6 and second.reader.kept() == 0 and budget.used == 6
    assert value(data, "container.pids.count", {"container.id": pod.container_id}) == 1  # read all the same
    first.shutdown()
    assert budget.used == 0
    second.collect()
    assert second.reader.kept() == 6 and budget.used == 6


def test_the_fd_cap_is_at_most_half_the_soft_nofile_limit(monkeypatch):
    calls = []
    monkeypatch.setattr(receiver_module.resource, "getrlimit", lambda _which: (1000, 1000))
    monkeypatch.setattr(receiver_module.resource, "setrlimit", lambda *a: calls.append(a))
    assert receiver_module._fd_budget(16384) == 500
    assert receiver_module._fd_budget(100) == 100
    assert receiver_module._fd_budget(0) == 0
    assert calls == []  # already at the hard limit: nothing to raise
    monkeypatch.setattr(receiver_module.resource, "getrlimit", lambda _which: (1024, 65536))
    assert receiver_module._fd_budget(4096) == 4096  # the soft limit is raised to make room
    assert calls and calls[-1][1][0] >= 2 * 4096


def test_limits_are_read_at_discovery_then_every_nth_collection(pod, receivers):
    layout = detect_layout(ROOT)
    mem_file = "memory.max" if layout.memory.v2 else "memory.limit_in_bytes"
    require(os.path.exists(f"{layout.memory.root}{pod.container_path}/{mem_file}"),
            "needs the memory controller down to the pod's cgroup")
    require(os.path.exists(f"{layout.pids.root}{pod.container_path}/pids.max"), "needs the pids controller")

    def set_limits(mem: int, pids: int) -> None:
        with open(f"{layout.memory.root}{pod.container_path}/{mem_file}", "w") as f:
            f.write(str(mem))
        with open(f"{layout.pids.root}{pod.container_path}/pids.max", "w") as f:
            f.write(str(pids))

    c = {"container.id": pod.container_id}
    set_limits(512 << 20, 100)
    n = 3
    r = receivers(limits_every=n)
    data = r.collect()  # first seen: read
    assert value(data, "container.memory.limit", c) == 512 << 20
    assert value(data, "container.pids.limit", c) == 100
    set_limits(256 << 20, 50)
    seen = []
    for _ in range(n):
        data = r.collect()
        seen.append((value(data, "container.memory.limit", c), value(data, "container.pids.limit", c)))
    # remembered in between (not read every time), and the change shows within N collections
    assert seen[0] == (512 << 20, 100)
    assert seen[-1] == (256 << 20, 50)
    # with limits_every=1 a change shows on the very next collection
    every = receivers(limits_every=1)
    every.collect()
    set_limits(128 << 20, 40)
    data = every.collect()
    assert value(data, "container.memory.limit", c) == 128 << 20
    assert value(data, "container.pids.limit", c) == 40


def test_shutdown_closes_every_kept_fd(pod):
    r = make_receiver()
    r.collect()
    assert fds_naming(pod.uid)
    r.shutdown()
    assert r.reader.kept() == 0
    assert fds_naming(pod.uid) == []


def test_the_pod_network_is_read_through_the_process_found_until_it_exits(receivers):
    """A pod's process is found once (cgroup.procs, its namespace checked) and kept as an fd on its /proc directory:
    later collections open only its net/dev. When it exits, another process of the pod is found, here in a new
    network namespace (a sandbox made again), whose counters are then reported."""
    require_root()
    require(bool(hierarchies()), "needs a mounted cgroup hierarchy")
    unshare = "/usr/bin/unshare"
    require(os.path.exists(unshare), "needs unshare (util-linux)")
    script = ("import socket, sys, time\n"
              "import subprocess; subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              "[s.sendto(b'x' * 1000, ('127.0.0.1', 9)) for _ in range(100)]\n"
              "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)\n")
    r = receivers(exclude_interfaces=[])
    p = {"k8s.pod.uid": None}
    lo_tx = {"network.interface.name": "lo", "network.io.direction": "transmit"}
    with PodCgroup() as cg:
        p["k8s.pod.uid"] = cg.uid
        quiet = cg.spawn([unshare, "-n", sys.executable, "-c", "import sys, time; print('ready', flush=True); "
                          "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        assert quiet.stdout.readline().strip() == "ready"
        data, first = opened_during(r.collect)
        assert any(path.endswith(f"{cg.container_id}/cgroup.procs") for path in first)
        assert value(data, "k8s.pod.network.io", p, lo_tx) == 0  # lo is down in the quiet namespace
        data, second = opened_during(r.collect)
        assert [path for path in second if path.endswith("cgroup.procs") and cg.uid in path] == []
        assert "net/dev" in second and value(data, "k8s.pod.network.io", p, lo_tx) == 0
        assert len(r.network) >= 1
        busy = cg.spawn([unshare, "-n", sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert busy.stdout.readline().strip() == "ready"
        quiet.kill()
        quiet.wait()
        data = r.collect()
        assert value(data, "k8s.pod.network.io", p, lo_tx) > 100_000
    r.collect()  # the pod is gone: its process is let go
    assert cg.uid not in r.network._kept
