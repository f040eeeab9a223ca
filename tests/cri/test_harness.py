"""The containerd harness cleans up after itself even when containerd was SIGKILLed with pods running."""

from __future__ import annotations

import glob
import os

import pytest
from harness import require
from harness.containerd import Containerd, available

pytestmark = pytest.mark.root


def test_teardown_survives_a_sigkilled_containerd():
    ok, why = available()
    require(ok, why)
    c = Containerd().start()
    try:
        pod = c.run_pod("doomed", "default", {"a": ["/bin/sleep", "3600"], "b": ["/bin/sleep", "3600"]})
        pids = [c.container_pid(cid) for cid in pod.containers.values()]
        shims = [int(p.split("/")[2]) for p in glob.glob("/proc/[0-9]*/cmdline")
                 if b"containerd-shim" in _reads(p).split(b"\0")[0] and c.socket.encode() in _reads(p)]
        assert shims and all(os.path.exists(f"/proc/{pid}") for pid in pids)
        work = c.work
        c.kill()
        # containers and shims outlive containerd, as on a real node
        assert all(_running(pid) for pid in pids + shims)
    finally:
        c.close()
    assert not any(_running(pid) for pid in pids + shims)
    with open("/proc/self/mountinfo") as f:
        assert work not in f.read()
    assert not glob.glob(f"/sys/fs/cgroup/*/kubepods/burstable/pod{pod.uid}")
    assert not os.path.exists(work)
    # the lock is released: the next instance starts
    Containerd().start(lock_timeout=5).close()


def _reads(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
