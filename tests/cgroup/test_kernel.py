"""The receiver on the real kernel (root): pod-shaped cgroups with a process burning CPU and holding memory.

On this host (cgroup v1 hybrid) the pod exists in every v1 hierarchy and in cgroup2 at /sys/fs/cgroup/unified; on a
pure v2 host in /sys/fs/cgroup. Values are compared with the kernel's own files read just before and after the
collection, and must move as the process works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from cgroup.helpers import make_receiver, value
from harness import require, require_root, wait_for
from harness.cgroups import ROOT, PodCgroup, hierarchies, v2_root

from receivers.cgroup import parsers
from receivers.cgroup.discovery import detect_layout

HOLD = 64 << 20  # the workload holds this much anonymous memory

WORKLOAD = textwrap.dedent(f"""
    import sys, time
    block = bytearray({HOLD})
    for i in range(0, len(block), 4096):
        block[i] = 1  # touch every page: resident, charged to the cgroup
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    while True:
        pass
""")


@pytest.fixture
def pod():
    require_root()
    require(bool(hierarchies()), "needs a mounted cgroup hierarchy")
    cg = PodCgroup(qos="burstable").create()
    proc = cg.spawn([sys.executable, "-c", WORKLOAD], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    try:
        yield cg
    finally:
        cg.destroy()


def kernel_cpu_seconds(cg: PodCgroup, level: str = "container") -> float:
    path = cg.container_path if level == "container" else cg.pod_path
    layout = detect_layout(ROOT)
    if layout.cpu.v2:
        return parsers.parse_flat(open(f"{layout.cpu.root}{path}/cpu.stat").read())["usage_usec"] / 1e6
    user, system = parsers.parse_cpuacct_usage_all(open(f"{layout.cpu.root}{path}/cpuacct.usage_all").read())
    return (user + system) / 1e9


def kernel_memory(cg: PodCgroup) -> int:
    layout = detect_layout(ROOT)
    name = "memory.current" if layout.memory.v2 else "memory.usage_in_bytes"
    return int(open(f"{layout.memory.root}{cg.container_path}/{name}").read())


def cpu_time(data, where) -> float:
    return sum(value(data, "container.cpu.time" if "container.id" in where else "k8s.pod.cpu.time", where,
                     {"cpu.mode": mode}) for mode in ("user", "system"))


def test_values_match_the_kernel_and_move(pod):
    receiver = make_receiver(metrics={"container.cpu.percent": {"enabled": True}})
    c = {"k8s.pod.uid": pod.uid, "container.id": pod.container_id}
    before = kernel_cpu_seconds(pod)
    mem_before = kernel_memory(pod)
    data = receiver.collect()
    after = kernel_cpu_seconds(pod)
    mem_after = kernel_memory(pod)
    got = cpu_time(data, c)
    assert before <= got + 1e-6 and got <= after + 1e-6, (before, got, after)
    usage = value(data, "container.memory.usage", c)
    assert min(mem_before, mem_after) - (1 << 20) <= usage <= max(mem_before, mem_after) + (1 << 20)
    assert value(data, "container.memory.rss", c) >= HOLD
    assert HOLD <= value(data, "container.memory.working_set", c) <= usage
    # no CPU limit: no throttling series (their counters would stay 0), as cAdvisor
    assert value(data, "container.cpu.throttling_data.periods", c) is None
    assert value(data, "container.pids.count", c) == 1
    res = next(dict(rm.resource.attributes) for rm in data.resource_metrics
               if rm.resource.attributes.get("container.id") == pod.container_id)
    assert res == {"k8s.pod.uid": pod.uid, "container.id": pod.container_id, "k8s.pod.qos_class": "Burstable"}
    # the pod's cgroup holds the container: at least as much CPU and memory
    p = {"k8s.pod.uid": pod.uid}
    assert cpu_time(data, p) >= got - 1e-6
    assert value(data, "k8s.pod.memory.usage", p) >= HOLD
    if v2_root() is not None:
        some = value(data, "container.pressure.stall_time", c, {"pressure.resource": "cpu", "pressure.type": "some"})
        assert some is not None and some >= 0
    # it keeps burning: CPU time grows, usage is about one core
    wait_for(lambda: kernel_cpu_seconds(pod) > got + 0.2, timeout=20, what="the workload to burn 0.2 s of CPU")
    data2 = receiver.collect()
    assert cpu_time(data2, c) > got + 0.2
    cores = value(data2, "container.cpu.usage", c)
    assert cores is not None and 0.05 < cores <= os.cpu_count() + 0.5
    assert value(data2, "container.cpu.percent", c) == pytest.approx(cores * 100)


def test_memory_limit_and_throttling_from_the_kernel(pod):
    layout = detect_layout(ROOT)
    if layout.memory.v2:
        # a cgroup2 controller's files exist only where the parents enable it in cgroup.subtree_control
        require(os.path.exists(f"{layout.memory.root}{pod.container_path}/memory.max"),
                "needs the memory controller enabled down to the pod's cgroup2 directory")
        with open(f"{layout.memory.root}{pod.container_path}/memory.max", "w") as f:
            f.write(str(512 << 20))
    else:
        with open(f"{layout.memory.root}{pod.container_path}/memory.limit_in_bytes", "w") as f:
            f.write(str(512 << 20))
    thr = layout.throttle
    require(thr is not None, "needs the cpu controller")
    # a quota of 20% of a CPU: the busy loop is throttled
    if thr.v2:
        require(os.path.exists(f"{thr.root}{pod.container_path}/cpu.max"),
                "needs the cpu controller enabled down to the pod's cgroup2 directory")
        with open(f"{thr.root}{pod.container_path}/cpu.max", "w") as f:
            f.write("20000 100000")
    else:
        with open(f"{thr.root}{pod.container_path}/cpu.cfs_quota_us", "w") as f:
            f.write("20000")
    receiver = make_receiver()
    c = {"container.id": pod.container_id}
    first = receiver.collect()
    assert value(first, "container.memory.limit", c) == 512 << 20
    assert value(first, "container.cpu.limit", c) == pytest.approx(0.2)  # the kernel's own period (100 ms)

    def throttled():
        # the kernel adds throttled time when the cgroup is unthrottled: it may lag the period count
        d = receiver.collect()
        n = value(d, "container.cpu.throttling_data.throttled_periods", c)
        t = value(d, "container.cpu.throttling_data.throttled_time", c)
        return d if n and t else None

    data = wait_for(throttled, timeout=20, what="the cgroup to be throttled")
    assert value(data, "container.cpu.throttling_data.periods", c) >= value(
        data, "container.cpu.throttling_data.throttled_periods", c)
    assert value(data, "container.cpu.throttling_data.throttled_time", c) > 0


def test_network_of_a_pod_with_its_own_namespace():
    require_root()
    unshare = "/usr/bin/unshare"
    require(os.path.exists(unshare), "needs unshare (util-linux)")
    script = textwrap.dedent("""
        import socket, subprocess, sys, time
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(100):
            s.sendto(b"x" * 1000, ("127.0.0.1", 9))
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        time.sleep(60)
    """)
    with PodCgroup() as cg:
        proc = cg.spawn([unshare, "-n", sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        receiver = make_receiver(exclude_interfaces=[])
        data = receiver.collect()
        from receivers.cgroup.parsers import parse_net_dev

        kernel = parse_net_dev(open(f"/proc/{proc.pid}/net/dev", "rb").read())["lo"]
        p = {"k8s.pod.uid": cg.uid}
        lo_tx = {"network.interface.name": "lo", "network.io.direction": "transmit"}
        assert value(data, "k8s.pod.network.io", p, lo_tx) == kernel["tx_bytes"] > 100_000
        assert value(data, "k8s.pod.network.packet.count", p, lo_tx) == kernel["tx_packets"] >= 100
        # the default excludes lo; the node's own interfaces never show for this pod
        data = make_receiver().collect()
        assert value(data, "k8s.pod.network.io", p, lo_tx) is None
        assert not [n for res, n, a, v in _points(data) if res.get("k8s.pod.uid") == cg.uid and ".network." in n]


def test_host_network_pods_have_no_network_metrics(pod):
    data = make_receiver().collect()
    assert not [n for res, n, a, v in _points(data) if res.get("k8s.pod.uid") == pod.uid and ".network." in n]


def _points(data):
    from cgroup.helpers import points

    return points(data)


def _config(tmp_path, **receiver):
    cfg = {"receivers": {"cgroup": {"collection_interval": "1s", **receiver}},
           "exporters": {"debug": {}},
           "service": {"pipelines": {"metrics": {"receivers": ["cgroup"], "exporters": ["debug"]}},
                       "telemetry": {"metrics": {"level": "none"}}}}
    path = tmp_path / "cgroup.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_collect_once_through_the_cli(pod, tmp_path):
    """Acceptance: the process shows under its pod uid and container id with the kernel's CPU time and memory."""
    before, mem_before = kernel_cpu_seconds(pod), kernel_memory(pod)
    out = subprocess.run([sys.executable, "-m", "podmeter.cli", "collect", "--once", "--config", _config(tmp_path),
                          "--format", "otlp-json"], capture_output=True, text=True, timeout=60)
    after, mem_after = kernel_cpu_seconds(pod), kernel_memory(pod)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    doc = json.loads(out.stdout)
    found = None
    for rm in doc.get("resourceMetrics", []):
        attrs = {a["key"]: next(iter(a["value"].values())) for a in rm["resource"].get("attributes", [])}
        if attrs.get("container.id") == pod.container_id:
            found = (attrs, rm)
    assert found is not None, f"container {pod.container_id} not in the output"
    attrs, rm = found
    assert attrs["k8s.pod.uid"] == pod.uid and attrs["k8s.pod.qos_class"] == "Burstable"
    metrics = {m["name"]: m for sm in rm["scopeMetrics"] for m in sm["metrics"]}
    cpu = sum(p.get("asDouble", 0) for p in metrics["container.cpu.time"]["sum"]["dataPoints"])
    assert before - 1e-6 <= cpu <= after + 1e-6
    mem = int(metrics["container.memory.usage"]["gauge"]["dataPoints"][0]["asInt"])
    assert min(mem_before, mem_after) - (1 << 20) <= mem <= max(mem_before, mem_after) + (1 << 20)


def test_table_output_names_the_pod(pod, tmp_path):
    out = subprocess.run([sys.executable, "-m", "podmeter.cli", "collect", "--once", "--config", _config(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"uid={pod.uid}" in out.stdout and pod.container_id[:12] in out.stdout
    assert "container.memory.working_set" in out.stdout


def test_inspect_pid_through_the_cli(pod):
    pid = pod.procs[0].pid
    out = subprocess.run([sys.executable, "-m", "podmeter.cli", "inspect", "pid", str(pid)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["pod_uid"] == pod.uid and doc["container_id"] == pod.container_id
    assert doc["qos_class"] == "Burstable" and doc["nspid"][0] == pid
    assert any(line.startswith("0::") or "memory" in line for line in doc["cgroup_lines"])
    # the same answer from the process's cgroup file given line by line
    for line in open(f"/proc/{pid}/cgroup").read().splitlines():
        if pod.uid in line:
            res = subprocess.run([sys.executable, "-m", "podmeter.cli", "inspect", "cgroup", line],
                                 capture_output=True, text=True, timeout=60)
            assert json.loads(res.stdout)["container_id"] == pod.container_id
            break
    time.sleep(0)


def test_inspect_pid_with_pod_metadata_from_k8sattributes(pod, tmp_path):
    """`inspect pid --config` with k8sattributes: the pod's names from the API server (the loopback stand-in)."""
    from harness.apiserver import ApiServer
    from harness.apiserver import pod as api_pod

    api = ApiServer().start()
    try:
        api.create("namespaces", None, {"metadata": {"name": "ml"}})
        api.create("pods", "ml", api_pod("trainer-0", "node-a", uid=pod.uid,
                                         container_ids={"main": f"containerd://{pod.container_id}"}))
        cfg = {"receivers": {"cgroup": {}}, "exporters": {"debug": {}},
               "processors": {"k8sattributes": {"auth_type": "kubeConfig",
                                                 "kube_config_path": api.write_kubeconfig(tmp_path),
                                                 "filter": {"node": "node-a"}}},
               "service": {"pipelines": {"metrics": {"receivers": ["cgroup"], "processors": ["k8sattributes"],
                                                     "exporters": ["debug"]}}}}
        path = tmp_path / "k8s.yaml"
        path.write_text(json.dumps(cfg))
        out = subprocess.run([sys.executable, "-m", "podmeter.cli", "inspect", "pid", str(pod.procs[0].pid),
                              "--config", str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["pod_uid"] == pod.uid
        assert doc["pod_metadata"], doc.get("pod_metadata_note")
        assert doc["pod_metadata"].get("k8s.pod.name") == "trainer-0"
        assert doc["pod_metadata"].get("k8s.namespace.name") == "ml"
    finally:
        api.stop()
