"""PID -> cgroup -> pod: real processes in pod-shaped cgroups, and a procfs fixture for PID reuse and the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from harness import require_root
from harness.cgroups import PodCgroup, hierarchies, v2_root

from podmeter.attribution import ProcessAttributor, read_process, read_start_time

CID = "8a797c5477284c0ebabd61b1f221c63609ba76952a1b41759201d8231b7ab340"
UID = "0f1c2d3e-4a5b-4c6d-8e9f-0123456789ab"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fake_proc(root, pid: int, start: int, cgroup: str, comm: str = "python3", nspid: str = "") -> None:
    """One process's files as procfs shows them (this is a fixture tree; the kernel's procfs is used below)."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 30  # state is field 3, starttime field 22
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    (d / "cgroup").write_text(cgroup)
    (d / "status").write_text(f"Name:\t{comm}\nPid:\t{pid}\n" + (f"NSpid:\t{nspid}\n" if nspid else ""))


def test_real_process_in_a_pod_cgroup():
    require_root()
    with PodCgroup() as cg:
        proc = cg.spawn(["sleep", "60"])
        attributor = ProcessAttributor("/proc")
        info = attributor.lookup(proc.pid)
        assert info is not None
        assert info.ref.pod_uid == cg.uid and info.ref.container_id == cg.container_id
        assert info.ref.qos_class == "Burstable"
        assert info.cgroup_path == cg.container_path
        assert info.nspid[0] == proc.pid
        assert info.attributes() == {"process.pid": proc.pid, "k8s.pod.uid": cg.uid, "container.id": cg.container_id,
                                     "k8s.pod.qos_class": "Burstable"}
        assert attributor.lookup(proc.pid) is info and attributor.hits == 1
        proc.kill()
        proc.wait()
        # exited: lookups say so and the entry is dropped
        assert attributor.lookup(proc.pid) is None
        assert len(attributor) == 0


def test_process_outside_pods():
    require_root()
    info = read_process("/proc", os.getpid())
    assert info is not None and not info.ref.in_pod and info.ref.pod_uid is None


def test_hybrid_v1_only_membership_is_found():
    """A process in the pod cgroup on v1 hierarchies only (cgroup2 left at /): the v1 lines attribute it."""
    require_root()
    cg = PodCgroup()
    v1 = [h for h in hierarchies() if not h.endswith("/unified")]
    for h in v1:
        os.makedirs(h + cg.container_path, exist_ok=True)

    def enter() -> None:
        for h in v1:
            with open(f"{h}{cg.container_path}/cgroup.procs", "w") as f:
                f.write("0")

    proc = subprocess.Popen(["sleep", "60"], preexec_fn=enter)
    cg.procs.append(proc)
    try:
        info = read_process("/proc", proc.pid)
        assert info.ref.pod_uid == cg.uid and info.ref.container_id == cg.container_id
    finally:
        cg.destroy()


def test_process_seen_from_a_cgroup_namespace_of_its_own():
    """podmeter in a pod on cgroup v2 has a cgroup namespace of its own: the kernel shows other pods' processes
    relative to its root (`0::/../../pod<uid>/<id>`, no `kubepods` in sight); they are still attributed."""
    require_root()
    if v2_root() is None:
        pytest.fail("no cgroup2 hierarchy mounted")
    with PodCgroup() as target, PodCgroup() as agent:
        proc = target.spawn(["sleep", "60"])

        def enter() -> None:  # the agent's container cgroup (every hierarchy), then a cgroup namespace rooted there
            for d in agent.dirs():
                with open(f"{d}/cgroup.procs", "w") as f:
                    f.write("0")

        script = ("import json, sys; from podmeter.attribution import read_process; "
                  f"i = read_process('/proc', {proc.pid}); "
                  "print(json.dumps([list(i.cgroup_lines), i.ref.pod_uid, i.ref.container_id]))")
        out = subprocess.run(["unshare", "--cgroup", sys.executable, "-c", script], preexec_fn=enter,
                             capture_output=True, text=True, check=True, cwd=ROOT)
        lines, uid, cid = json.loads(out.stdout)
        # the kernel's relative form, in every hierarchy: `kubepods` is nowhere in sight
        assert f"0::/../../pod{target.uid}/{target.container_id}" in lines
        assert not [line for line in lines if "kubepods" in line], lines
        assert (uid, cid) == (target.uid, target.container_id)


def test_pid_reuse_gives_the_new_process(tmp_path):
    fake_proc(tmp_path, 4242, 1000, f"0::/kubepods/burstable/pod{UID}/{CID}\n", nspid="4242\t7")
    attributor = ProcessAttributor(str(tmp_path))
    first = attributor.lookup(4242)
    assert first.ref.pod_uid == UID and first.nspid == (4242, 7)
    # the process exits and its PID is given to a process of another cgroup: the start time differs
    fake_proc(tmp_path, 4242, 2000, "0::/system.slice/cron.service\n")
    second = attributor.lookup(4242)
    assert second.start_time == 2000 and not second.ref.in_pod


def test_cache_is_bounded_and_swept(tmp_path):
    for pid in range(100, 150):
        fake_proc(tmp_path, pid, pid, f"0::/kubepods/pod{UID}/{CID}\n")
    attributor = ProcessAttributor(str(tmp_path), max_entries=10)
    for pid in range(100, 150):
        assert attributor.lookup(pid).ref.container_id == CID
    assert len(attributor) == 10
    for pid in range(140, 145):
        for f in (tmp_path / str(pid)).iterdir():
            f.unlink()
        (tmp_path / str(pid)).rmdir()
    assert attributor.sweep() == 5
    assert len(attributor) == 5


@pytest.mark.parametrize("stat", [b"", b"42 (x", b"42 (a) b) S 1 2", b"\xff\xfe", b"42 (cmd with ) paren) S" + b" 1" * 30])
def test_malformed_stat_never_raises(tmp_path, stat):
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "stat").write_bytes(stat)
    (tmp_path / "42" / "cgroup").write_text("0::/\n")
    start = read_start_time(str(tmp_path), 42)
    assert start is None or isinstance(start, int)
    info = ProcessAttributor(str(tmp_path)).lookup(42)
    assert info is None or not info.ref.in_pod


def test_missing_status_and_garbage_cgroup(tmp_path):
    fake_proc(tmp_path, 7, 5, "\x00garbage\n::\n12:memory\n")
    (tmp_path / "7" / "status").unlink()
    info = read_process(str(tmp_path), 7)
    assert info is not None and info.nspid == () and not info.ref.in_pod
    assert read_process(str(tmp_path), 8) is None
