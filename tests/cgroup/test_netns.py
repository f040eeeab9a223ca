"""Pod network counters on a fixture cgroup tree and a procfs-shaped directory (`/proc/<pid>/ns/net` a symlink,
`/proc/<pid>/net/dev` a file): the receiver finds a pod's process through `cgroup.procs`, keeps it, follows a new
one when it goes, skips the node's network, and reports what it cannot read. Runs without root; the real kernel's
namespaces are covered in test_kernel.py and test_fd_cache.py."""

from __future__ import annotations

import os
import shutil

from cgroup.helpers import make_receiver, value
from cgroup.layouts import all_layouts, build

LAYOUT = next(lay for lay in all_layouts() if lay.name == "v2-cgroupfs-containerd")
HOST_NETNS = "net:[4026531840]"
NET_DEV = ("Inter-|   Receive                                                |  Transmit\n"
           " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls "
           "carrier compressed\n"
           "    lo:  {lo} 10 0 0 0 0 0 0 {lo} 10 0 0 0 0 0 0\n"
           "  eth0: {rx} 20 1 2 0 0 0 0 {tx} 30 3 4 0 0 0 0\n")
RX = {"network.interface.name": "eth0", "network.io.direction": "receive"}


def _process(proc: str, pid: int, netns: str, rx: int = 1000, tx: int = 2000) -> None:
    os.makedirs(f"{proc}/{pid}/ns", exist_ok=True)
    os.makedirs(f"{proc}/{pid}/net", exist_ok=True)
    os.symlink(netns, f"{proc}/{pid}/ns/net")
    with open(f"{proc}/{pid}/net/dev", "w") as f:
        f.write(NET_DEV.format(lo=5, rx=rx, tx=tx))


def _node(tmp_path):
    root = build(str(tmp_path), LAYOUT)
    proc = str(tmp_path / "proc")
    _process(proc, 1, HOST_NETNS)  # the node's namespace, as PID 1 has it
    pod = LAYOUT.pods[0]
    cdir = pod.containers[0][0]
    return root, proc, pod, f"{root}{cdir}/cgroup.procs"


def _in_pod(procs_file: str, *pids: int) -> None:
    with open(procs_file, "w") as f:
        f.write("".join(f"{pid}\n" for pid in pids))


def test_the_pods_process_is_found_kept_and_followed(tmp_path):
    root, proc, pod, procs_file = _node(tmp_path)
    _process(proc, 123, "net:[4026532001]", rx=1000, tx=2000)
    _in_pod(procs_file, 123)
    receiver = make_receiver(cgroup_root=root, proc_root=proc)
    p = {"k8s.pod.uid": pod.uid}
    data = receiver.collect()
    assert value(data, "k8s.pod.network.io", p, RX) == 1000
    assert value(data, "k8s.pod.network.errors", p, RX) == 1
    assert value(data, "k8s.pod.network.packet.dropped", p, RX) == 2
    assert value(data, "k8s.pod.network.io", p, {"network.interface.name": "lo"}) is None  # excluded by default
    # kept: the next collection reads net/dev through the process's fd, not cgroup.procs
    os.remove(procs_file)
    assert value(receiver.collect(), "k8s.pod.network.io", p, RX) == 1000
    # the process goes; another of the pod's, in another namespace, is found and read
    shutil.rmtree(f"{proc}/123")
    _process(proc, 456, "net:[4026532002]", rx=7000, tx=8000)
    _in_pod(procs_file, 456)
    assert value(receiver.collect(), "k8s.pod.network.io", p, RX) == 7000
    assert len(receiver.network) == 1
    assert receiver.telemetry.failing() == {}


def test_a_pod_on_the_nodes_network_has_no_network_metrics(tmp_path):
    root, proc, pod, procs_file = _node(tmp_path)
    _process(proc, 123, HOST_NETNS)
    _in_pod(procs_file, 123)
    receiver = make_receiver(cgroup_root=root, proc_root=proc)
    for _ in range(2):
        data = receiver.collect()
        assert value(data, "k8s.pod.network.io", {"k8s.pod.uid": pod.uid}, RX) is None
        assert value(data, "k8s.pod.memory.usage", {"k8s.pod.uid": pod.uid}) is not None


def test_an_unreadable_namespace_is_reported_and_the_rest_goes_on(tmp_path):
    root, proc, pod, procs_file = _node(tmp_path)
    os.makedirs(f"{proc}/123/ns")
    with open(f"{proc}/123/ns/net", "w") as f:  # not a link: readlink fails with EINVAL
        f.write("x")
    _in_pod(procs_file, 123)
    receiver = make_receiver(cgroup_root=root, proc_root=proc)
    data = receiver.collect()
    failing = receiver.telemetry.failing()
    assert "network" in failing and "network namespace" in failing["network"] and pod.uid in failing["network"]
    assert value(data, "k8s.pod.memory.usage", {"k8s.pod.uid": pod.uid}) is not None
    # fixed: the next collection reads it and the failure clears
    shutil.rmtree(f"{proc}/123")
    _process(proc, 123, "net:[4026532001]")
    assert value(receiver.collect(), "k8s.pod.network.io", {"k8s.pod.uid": pod.uid}, RX) == 1000
    assert "network" not in receiver.telemetry.failing()


def test_pods_that_go_let_their_process_go(tmp_path):
    root, proc, pod, procs_file = _node(tmp_path)
    _process(proc, 123, "net:[4026532001]")
    _in_pod(procs_file, 123)
    receiver = make_receiver(cgroup_root=root, proc_root=proc)
    receiver.collect()
    assert pod.uid in receiver.network._kept
    shutil.rmtree(os.path.dirname(procs_file))  # the pod's cgroups go (fixture tree: a plain rmtree)
    shutil.rmtree(f"{root}{pod.dir}")
    receiver.collect()
    assert pod.uid not in receiver.network._kept
