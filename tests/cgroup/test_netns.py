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


def test_a_receiver_reading_only_the_network_reports_it(tmp_path):
    """With every cgroup file group off, pods are still there (discovery listed them) and their network is read."""
    root, proc, pod, procs_file = _node(tmp_path)
    _process(proc, 123, "net:[4026532001]", rx=1000, tx=2000)
    _in_pod(procs_file, 123)
    receiver = make_receiver(cgroup_root=root, proc_root=proc, groups={
        "cpu": False, "memory": False, "io": False, "pids": False, "pressure": False})
    data = receiver.collect()
    assert value(data, "k8s.pod.network.io", {"k8s.pod.uid": pod.uid}, RX) == 1000
    assert receiver.reader.kept() == 0  # no cgroup file was read
    receiver.shutdown()


def test_a_sandbox_made_again_starts_new_network_series(tmp_path):
    """The pod cgroup stays while kubelet makes the pod's sandbox again (its pause container died): the new network
    namespace counts from 0, so the pod's network series get a new start time (OTel's mark of a reset). Another
    process in the same namespace changes nothing."""
    root, proc, pod, procs_file = _node(tmp_path)
    _process(proc, 123, "net:[4026532001]", rx=50_000)
    _in_pod(procs_file, 123)
    receiver = make_receiver(cgroup_root=root, proc_root=proc)
    p = {"k8s.pod.uid": pod.uid}

    def rx_point(data):
        [pt] = [pt for rm in data.resource_metrics if dict(rm.resource.attributes) == {**p, "k8s.pod.qos_class": "Burstable"}
                for sm in rm.scope_metrics for m in sm.metrics if m.name == "k8s.pod.network.io"
                for pt in m.data.data_points if dict(pt.attributes) == RX]
        return pt

    first = rx_point(receiver.collect())
    assert first.value == 50_000 and first.start_time_unix_nano == receiver.start_ns
    # another process of the pod, the same namespace: the same series
    shutil.rmtree(f"{proc}/123")
    _process(proc, 124, "net:[4026532001]", rx=60_000)
    _in_pod(procs_file, 124)
    same = rx_point(receiver.collect())
    assert same.value == 60_000 and same.start_time_unix_nano == first.start_time_unix_nano
    # the sandbox made again: a new namespace, its counters from 0
    shutil.rmtree(f"{proc}/124")
    _process(proc, 456, "net:[4026532002]", rx=700)
    _in_pod(procs_file, 456)
    renewed = rx_point(receiver.collect())
    assert renewed.value == 700 and renewed.start_time_unix_nano >= same.time_unix_nano
    later = rx_point(receiver.collect())
    assert later.start_time_unix_nano == renewed.start_time_unix_nano
    # the pod's cgroup counters go on under their own start time
    mem = [pt for rm in receiver.collect().resource_metrics if rm.resource.attributes.get("k8s.pod.uid") == pod.uid
           and "container.id" not in rm.resource.attributes for sm in rm.scope_metrics for m in sm.metrics
           if m.name == "k8s.pod.cpu.time" for pt in m.data.data_points]
    assert mem and all(pt.start_time_unix_nano == receiver.start_ns for pt in mem)
    receiver.shutdown()


def test_processes_in_a_sub_cgroup_of_the_container_are_found(tmp_path):
    """crun with the systemd driver on cgroup v2 runs a container's processes in `<scope>/container`: the scope's
    own cgroup.procs is empty (cgroup v2 has no processes beside child cgroups), and the pod's network is read
    through a process one level down."""
    layout = next(lay for lay in all_layouts() if lay.name == "v2-systemd-crio")
    root = build(str(tmp_path), layout)
    proc = str(tmp_path / "proc")
    _process(proc, 1, HOST_NETNS)
    _process(proc, 321, "net:[4026532009]", rx=4242)
    pod = layout.pods[0]
    for cdir, _cid, _rt in pod.containers:
        _in_pod(f"{root}{cdir}/cgroup.procs")
        os.makedirs(f"{root}{cdir}/container")
        _in_pod(f"{root}{cdir}/container/cgroup.procs", *([321] if cdir == pod.containers[1][0] else []))
    receiver = make_receiver(cgroup_root=root, proc_root=proc)
    assert value(receiver.collect(), "k8s.pod.network.io", {"k8s.pod.uid": pod.uid}, RX) == 4242
    assert receiver.telemetry.failing() == {}
