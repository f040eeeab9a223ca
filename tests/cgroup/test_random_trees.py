"""Random cgroup trees with random file contents: discovery and collection never raise."""

from __future__ import annotations

import os
import tempfile

from cgroup.helpers import make_receiver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

UID = "0f1c2d3e-4a5b-4c6d-8e9f-0123456789ab"
CID = "a" * 64
SEGMENTS = st.sampled_from([
    "kubepods", "kubepods.slice", "burstable", "besteffort", "kubepods-burstable.slice", f"pod{UID}",
    f"kubepods-burstable-pod{UID.replace('-', '_')}.slice", CID, f"cri-containerd-{CID}.scope", f"crio-{CID}",
    f"crio-conmon-{CID}.scope", f"kubepods-pod{UID.replace('-', '_')}.slice:cri-containerd:{CID}", "system.slice",
    "kubelet.slice", "kubelet-kubepods.slice", "x", "pod", "kubepods-",
])
FILES = st.sampled_from([
    "cpu.stat", "memory.current", "memory.stat", "memory.max", "memory.events", "io.stat", "pids.current",
    "pids.max", "cpu.pressure", "memory.swap.current", "cpuacct.usage_all", "memory.usage_in_bytes",
    "memory.limit_in_bytes", "memory.oom_control", "blkio.throttle.io_service_bytes_recursive",
])
CONTENT = st.one_of(st.text(max_size=60), st.sampled_from([
    "usage_usec 10\nuser_usec 5\nsystem_usec 5\n", "max\n", "12\n", "-1\n", "anon x\nfile 3\n",
    "8:0 rbytes=1 wbytes=x\n", "some total=\n", "cpu user system\n0 1\n", "oom_kill 1", "99999999999999999999999\n",
]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(version=st.sampled_from(["v1", "v2", "hybrid"]),
       dirs=st.lists(st.lists(SEGMENTS, min_size=1, max_size=6), max_size=10),
       files=st.lists(st.tuples(st.integers(0, 9), FILES, CONTENT), max_size=30))
def test_random_trees_never_raise(version, dirs, files):
    with tempfile.TemporaryDirectory() as base:
        root = os.path.join(base, "cgroup")
        roots = [root] if version == "v2" else [f"{root}/{c}" for c in ("cpu", "cpuacct", "memory", "pids", "blkio")]
        if version == "hybrid":
            roots.append(f"{root}/unified")
        for r in roots:
            os.makedirs(r, exist_ok=True)
        if version == "v2":
            open(f"{root}/cgroup.controllers", "w").write("cpu io memory pids\n")
        if version == "hybrid":
            open(f"{root}/unified/cgroup.controllers", "w").write("\n")
        paths = ["/" + "/".join(d) for d in dirs]
        for r in roots:
            for p in paths:
                try:
                    os.makedirs(r + p, exist_ok=True)
                except OSError:
                    pass  # ".." and friends: not a tree we can make
        for i, name, text in files:
            if paths:
                target = roots[i % len(roots)] + paths[i % len(paths)]
                if os.path.isdir(target):
                    with open(os.path.join(target, name), "w") as f:
                        f.write(text)
        receiver = make_receiver(cgroup_root=root, proc_root=os.path.join(base, "proc"))
        receiver.collect()
        receiver.collect()
