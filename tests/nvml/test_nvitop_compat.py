"""Acceptance: `podmeter run` with examples/nvitop-compat.yaml, scraped by a real Prometheus, answers the PromQL
that users of nvitop-exporter's pod monitoring run, with the right per-pod and per-container GPU memory.

The agent runs the real nvidia-ml-py against the fake libnvidia-ml.so.1 (the only double: no GPU here); the GPU
processes are real processes in real pod-shaped cgroups. Pod, namespace and container names come from the real
k8sattributes processor (real `kubernetes` client) over the API stand-in (tests/harness/apiserver.py: no
kube-apiserver can run here).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import yaml
from harness import free_port, require, stop_process
from harness.apiserver import ApiServer
from harness.apiserver import pod as api_pod
from harness.cgroups import PodCgroup
from harness.fake_nvml import GPU, GiB, Process, Scenario
from harness.prometheus import PrometheusServer, prometheus_binary

from podmeter.component import registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "nvitop-compat.yaml")
UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
MiB = 1 << 20


def _config(fake_lib: str, prom_port: int, kubeconfig: str, tmp_path, example: str = EXAMPLE) -> str:
    """The example as shipped, pointed at the fake library, loopback ports and the API stand-in."""
    with open(example) as f:
        cfg = yaml.safe_load(f)
    cfg["receivers"]["nvml"].update({"library_path": fake_lib, "collection_interval": "1s", "initial_delay": "0s"})
    cfg["exporters"]["prometheus"]["endpoint"] = f"127.0.0.1:{prom_port}"
    cfg["service"]["telemetry"] = {"metrics": {"address": f"127.0.0.1:{free_port()}"}}
    cfg["processors"]["k8sattributes"].update({"auth_type": "kubeConfig", "kube_config_path": kubeconfig,
                                               "wait_for_metadata": True})
    path = str(tmp_path / os.path.basename(example))
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def _requirements() -> None:
    require(os.geteuid() == 0, "needs root for pod-shaped cgroups")
    prometheus_binary()
    for kind in ("metricstransform", "k8sattributes"):
        require(registry().get("processor", kind) is not None, f"needs the {kind} processor")
    require(registry().get("exporter", "prometheus") is not None, "needs the prometheus exporter")


@contextlib.contextmanager
def _api(tmp_path, pods: list[tuple[str, str, PodCgroup, dict[str, PodCgroup]]]):
    """The API stand-in with pods on gpu-node-1: (namespace, name, pod cgroup, container name -> its cgroup)."""
    api = ApiServer().start()
    try:
        for ns in sorted({p[0] for p in pods}):
            api.create("namespaces", None, {"metadata": {"name": ns}})
        for ns, name, cg, containers in pods:
            api.create("pods", ns, api_pod(
                name, "gpu-node-1", uid=cg.uid, containers={c: f"{c}:1" for c in containers},
                container_ids={c: f"containerd://{x.container_id}" for c, x in containers.items()}))
        yield api.write_kubeconfig(str(tmp_path))
    finally:
        api.stop()


def _start_agent(config: str, tmp_path) -> subprocess.Popen:
    log = open(tmp_path / "agent.log", "w")
    return subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "podmeter"), "run", "--config", config],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, K8S_NODE_NAME="gpu-node-1"))


def _stop_agent(agent: subprocess.Popen | None, tmp_path) -> None:
    if agent is None:
        return
    stop_process(agent, 15)
    if agent.returncode not in (0, -15):
        print(open(tmp_path / "agent.log").read()[-4000:])


@pytest.mark.slow
def test_nvitop_pod_queries_on_real_prometheus(fake, tmp_path):
    _requirements()

    # pod A: two containers (trainer: 2 processes, sidecar: 1) on GPU 0; pod B (one process) shares GPU 0 and
    # uses GPU 1; one process outside any pod.
    a_main = PodCgroup().create()
    a_side = PodCgroup(uid=a_main.uid).create()
    b = PodCgroup(qos="guaranteed").create()
    outside = subprocess.Popen(["sleep", "300"])
    pods = [a_side, a_main, b]
    agent = None
    stack = contextlib.ExitStack()
    try:
        a1, a2 = a_main.spawn(["sleep", "300"]), a_main.spawn(["sleep", "300"])
        s1 = a_side.spawn(["sleep", "300"])
        b1 = b.spawn(["sleep", "300"])
        fake.write(Scenario(
            gpus=[GPU(uuid=UUID0, mem_used=40 * GiB), GPU(uuid=UUID1, name="NVIDIA A100-SXM4-80GB", mem_used=8 * GiB)],
            processes=[Process(pid=a1.pid, gpu=0, used_mem=10 * GiB, sm=40),
                       Process(pid=a2.pid, gpu=0, used_mem=5 * GiB, sm=10),
                       Process(pid=s1.pid, gpu=0, used_mem=512 * MiB, sm=1),
                       Process(pid=b1.pid, gpu=0, used_mem=20 * GiB, sm=30),
                       Process(pid=b1.pid, gpu=1, used_mem=8 * GiB, sm=90),
                       Process(pid=outside.pid, gpu=1, used_mem=GiB, util=0)]))
        port = free_port()
        kubeconfig = stack.enter_context(_api(tmp_path, [
            ("ml", "train-0", a_main, {"trainer": a_main, "sidecar": a_side}),
            ("serving", "infer-0", b, {"server": b})]))
        name_a, name_b = "train-0", "infer-0"
        agent = _start_agent(_config(fake.lib, port, kubeconfig, tmp_path), tmp_path)
        with PrometheusServer([f"127.0.0.1:{port}"]) as prom:
            by_pod = "sum by (pod_name, pod_namespace) (process_gpu_memory{pod_name!=\"\"})"
            rows = prom.wait_for(by_pod, lambda r: len(r) == 2, timeout=60)
            got = {r["pod_name"]: v for r, v in rows}
            assert got == {name_a: 15 * 1024 + 512, name_b: 20 * 1024 + 8 * 1024}
            top = prom.query(f"topk(10, {by_pod})")
            assert [r["pod_name"] for r, _ in sorted(top, key=lambda x: -x[1])] == [name_b, name_a]
            table = prom.query("sum by (pod_namespace, pod_name, container_name) (process_gpu_memory{pod_name!=\"\"})")
            assert {(r["pod_name"], r["container_name"]): v for r, v in table} == {
                (name_a, "trainer"): 15 * 1024, (name_a, "sidecar"): 512, (name_b, "server"): 28 * 1024}
            assert {r["pod_name"]: r["pod_namespace"] for r, _ in rows} == {name_a: "ml", name_b: "serving"}
            no_pod = prom.query("process_gpu_memory{pod_name=\"\"}")
            assert len(no_pod) == 1
            labels, v = no_pod[0]
            assert v == 1024 and labels["pid"] == str(outside.pid) and labels["uuid"] == UUID1
            assert labels["index"] == "1" and labels["devicename"] == "NVIDIA A100-SXM4-80GB"
            assert labels["hostname"] == "gpu-node-1" and labels["username"] == "root"
            # per-GPU view and utilization series as nvitop names them (percent)
            per_gpu = {r["uuid"]: v for r, v in prom.query("sum by (uuid) (process_gpu_memory)")}
            assert per_gpu == {UUID0: 15 * 1024 + 512 + 20 * 1024, UUID1: 9 * 1024}
            sm = {(r["pid"], r["index"]): v for r, v in prom.query("process_gpu_sm_utilization")}
            assert sm[(str(a1.pid), "0")] == pytest.approx(40) and sm[(str(b1.pid), "1")] == pytest.approx(90)
            for name in ("process_gpu_memory_utilization", "process_gpu_encoder_utilization",
                         "process_gpu_decoder_utilization"):
                assert prom.query(name), name
            # a pod's process exits: its series go at the next collection
            fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)],
                                processes=[Process(pid=b1.pid, gpu=1, used_mem=8 * GiB)]))
            rows = prom.wait_for(by_pod, lambda r: {x["pod_name"] for x, _ in r} == {name_b}, timeout=30)
            assert rows[0][1] == 8 * 1024
    finally:
        _stop_agent(agent, tmp_path)
        stack.close()
        outside.kill()
        outside.wait()
        for p in pods:
            p.destroy()



@pytest.mark.slow
def test_dcgm_compat_series_on_real_prometheus(fake, tmp_path):
    """examples/dcgm-compat.yaml: DCGM_FI_DEV_* names, units and labels; framebuffer per pod from processes."""
    _requirements()
    a, b = PodCgroup().create(), PodCgroup().create()
    agent = None
    stack = contextlib.ExitStack()
    try:
        a1, b1 = a.spawn(["sleep", "300"]), b.spawn(["sleep", "300"])
        fake.write(Scenario(gpus=[GPU(uuid=UUID0, temp=63, mem_temp=71, power_mw=250_500, energy_mj=7_000_000, clock_sm=1410,
                                      mem_used=30 * GiB, mem_reserved=512 * MiB, ecc_corr=4, pcie_replays=5,
                                      remap_corr=3, remap_unc=1,
                                      gpm={1: 90, 2: 40, 3: 25, 5: 20, 10: 30, 11: 0, 12: 5, 13: 10})],
                            processes=[Process(pid=a1.pid, used_mem=6 * GiB, sm=25),
                                       Process(pid=b1.pid, used_mem=2 * GiB, sm=50)]))
        port = free_port()
        kubeconfig = stack.enter_context(_api(tmp_path, [("ml", "pod-a", a, {"main": a}),
                                                         ("ml", "pod-b", b, {"main": b})]))
        config = _config(fake.lib, port, kubeconfig, tmp_path, os.path.join(ROOT, "examples", "dcgm-compat.yaml"))
        agent = _start_agent(config, tmp_path)
        with PrometheusServer([f"127.0.0.1:{port}"]) as prom:
            rows = prom.wait_for("DCGM_FI_DEV_GPU_TEMP", timeout=60)
            (labels, temp), = rows
            assert temp == 63
            assert {k: labels[k] for k in ("gpu", "UUID", "device", "modelName", "Hostname", "pci_bus_id")} == {
                "gpu": "0", "UUID": UUID0, "device": "nvidia0", "modelName": "NVIDIA H100 80GB HBM3",
                "Hostname": "gpu-node-1", "pci_bus_id": "00000000:18:00.0"}
            (labels, mem_temp), = prom.query("DCGM_FI_DEV_MEMORY_TEMP")
            assert mem_temp == 71 and labels["UUID"] == UUID0 and labels["gpu"] == "0"
            assert prom.query("DCGM_FI_DEV_POWER_USAGE")[0][1] == pytest.approx(250.5)
            assert prom.query("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")[0][1] == pytest.approx(7_000_000)
            assert prom.query("DCGM_FI_DEV_SM_CLOCK")[0][1] == pytest.approx(1410)
            assert prom.query("DCGM_FI_DEV_FB_RESERVED")[0][1] == pytest.approx(512)
            assert prom.query("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL")[0][1] == 4
            health = {name: prom.query(name) for name in (
                "DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
                "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_ROW_REMAP_FAILURE")}
            assert {name: [v for _, v in rows] for name, rows in health.items()} == {
                "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": [5], "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": [3],
                "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": [1], "DCGM_FI_DEV_ROW_REMAP_FAILURE": [0]}
            assert health["DCGM_FI_DEV_PCIE_REPLAY_COUNTER"][0][0]["UUID"] == UUID0
            fb = prom.wait_for('sum by (pod) (DCGM_FI_DEV_FB_USED{pod!=""})', lambda r: len(r) == 2)
            assert {r["pod"]: v for r, v in fb} == {"pod-a": 6 * 1024, "pod-b": 2 * 1024}  # split, not copied
            util = {(r["namespace"], r["pod"], r["container"]): v
                    for r, v in prom.query('sum by (namespace, pod, container) (DCGM_FI_DEV_GPU_UTIL{pod!=""})')}
            assert util == {("ml", "pod-a", "main"): pytest.approx(25), ("ml", "pod-b", "main"): pytest.approx(50)}
            # profiling fields from GPM, ratios as DCGM's, with the device labels
            (labels, sm), = prom.wait_for("DCGM_FI_PROF_SM_ACTIVE", timeout=60)
            assert sm == pytest.approx(0.40) and labels["UUID"] == UUID0 and labels["gpu"] == "0"
            prof = {name: prom.query(name)[0][1] for name in (
                "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_SM_OCCUPANCY", "DCGM_FI_PROF_DRAM_ACTIVE",
                "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_PIPE_FP64_ACTIVE", "DCGM_FI_PROF_PIPE_FP32_ACTIVE",
                "DCGM_FI_PROF_PIPE_FP16_ACTIVE")}
            assert prof == pytest.approx({
                "DCGM_FI_PROF_GR_ENGINE_ACTIVE": 0.90, "DCGM_FI_PROF_SM_OCCUPANCY": 0.25, "DCGM_FI_PROF_DRAM_ACTIVE": 0.30,
                "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": 0.20, "DCGM_FI_PROF_PIPE_FP64_ACTIVE": 0.0,
                "DCGM_FI_PROF_PIPE_FP32_ACTIVE": 0.05, "DCGM_FI_PROF_PIPE_FP16_ACTIVE": 0.10})
            assert "hw_gpu_pipe" not in prom.query("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE")[0][0]
    finally:
        _stop_agent(agent, tmp_path)
        stack.close()
        for p in (a, b):
            p.destroy()
