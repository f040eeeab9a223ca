"""A synthetic Kubernetes node: pods as pod-shaped cgroups, GPUs on the fake NVML library, pods in the API stand-in.

Real cgroups on this kernel (root) up to `real_max` pods, a fixture tree with the same file layout beyond it (the
files copied from a real container cgroup of this kernel, so the receiver reads exactly what it would read here).
GPU processes are real `sleep` processes inside the pods' container cgroups, so PID -> cgroup -> pod attribution
runs for real.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field

from harness import cgroups
from harness.fake_nvml import GPU, MiB, Process, Scenario, build_fake_nvml

NODE_NAME = "bench-node"
NAMESPACES = ("bench-a", "bench-b", "bench-c")
QOS = ("burstable", "besteffort", "guaranteed")
# Guaranteed pods have CPU limits: kubelet writes a CFS quota on their pod and container cgroups (one CPU here)
CPU_QUOTA = {"cpu.cfs_quota_us": b"100000\n", "cpu.max": b"100000 100000\n"}


@dataclass
class BenchPod:
    index: int
    uid: str
    name: str
    namespace: str
    qos: str
    deployment: str
    containers: list[tuple[str, str]]  # (name, container id)
    cgroups: list[cgroups.PodCgroup] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    @property
    def replicaset(self) -> str:
        return f"{self.deployment}-7d9f8b6c5"

    def api_object(self, node: str = NODE_NAME) -> dict:
        """The pod as the API server returns it (only the fields an agent reads)."""
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name, "namespace": self.namespace, "uid": self.uid,
                "labels": {"app": self.deployment, "team": "bench", "pod-template-hash": "7d9f8b6c5"},
                "annotations": {"bench/index": str(self.index)},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": self.replicaset,
                                     "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.replicaset)),
                                     "controller": True}],
            },
            "spec": {
                "nodeName": node,
                "containers": [{"name": n, "image": f"registry.example/{n}:1.{self.index % 7}"}
                               for n, _ in self.containers],
            },
            "status": {
                "phase": "Running",
                "qosClass": self.qos.capitalize() if self.qos != "besteffort" else "BestEffort",
                "podIP": f"10.{(self.index >> 16) & 255}.{(self.index >> 8) & 255}.{self.index & 255}",
                "startTime": "2026-01-01T00:00:00Z",
                "containerStatuses": [{"name": n, "containerID": f"containerd://{cid}", "ready": True,
                                       "image": f"registry.example/{n}:1.{self.index % 7}",
                                       "imageID": "", "restartCount": 0}
                                      for n, cid in self.containers],
            },
        }


def make_pod(index: int, containers: int = 2, tag: str = "") -> BenchPod:
    deployment = f"app{index % 40:02d}{tag}"
    return BenchPod(
        index=index,
        uid=str(uuid.uuid4()),
        name=f"{deployment}-7d9f8b6c5-{index:05d}",
        namespace=NAMESPACES[index % len(NAMESPACES)],
        qos=QOS[index % len(QOS)],
        deployment=deployment,
        containers=[(("main", "sidecar", "init-proxy")[c % 3] + (str(c // 3) if c >= 3 else ""),
                     uuid.uuid4().hex + uuid.uuid4().hex) for c in range(containers)],
    )


def can_make_real_cgroups() -> bool:
    return os.geteuid() == 0 and bool(cgroups.hierarchies())


class SyntheticNode:
    """Build with `start()`, tear down with `stop()` (also on errors: use it as a context manager)."""

    def __init__(self, pods: int, gpus: int = 8, procs_per_gpu: int = 32, containers_per_pod: int = 2,
                 real_max: int = 400, workdir: str | None = None) -> None:
        self.n_pods = pods
        self.n_gpus = gpus
        self.procs_per_gpu = procs_per_gpu
        self.containers_per_pod = containers_per_pod
        self.real = can_make_real_cgroups() and pods <= real_max
        self.workdir = workdir or tempfile.mkdtemp(prefix="podmeter-bench-")
        self.pods: list[BenchPod] = []
        self.procs: list[subprocess.Popen] = []
        self.gpu_procs: list[tuple[int, BenchPod, int]] = []  # (pid, pod, gpu index)
        self.cgroup_root = cgroups.ROOT
        self.scenario_path = os.path.join(self.workdir, "nvml-scenario.tsv")
        self.nvml_lib = ""
        self.scenario = Scenario()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> SyntheticNode:
        if not can_make_real_cgroups():
            raise RuntimeError("the synthetic node needs root and a mounted cgroup hierarchy (run make bench as root)")
        self.pods = [make_pod(i, self.containers_per_pod) for i in range(self.n_pods)]
        gpu_pods = self._gpu_pod_indexes()
        for pod in self.pods:
            if self.real or pod.index in gpu_pods:
                self._create_cgroups(pod)
        if not self.real:
            self.cgroup_root = os.path.join(self.workdir, "cgroup-fixture")
            build_fixture(self.cgroup_root, self.pods)
        self._spawn_gpu_processes()
        self.nvml_lib = build_fake_nvml()
        self.write_scenario()
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        for pod in self.pods:
            for cg in pod.cgroups:
                cg.destroy()
            pod.cgroups.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> SyntheticNode:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- parts -------------------------------------------------------------------------------------------------

    def _gpu_pod_indexes(self) -> set[int]:
        n = self.n_gpus * self.procs_per_gpu
        return {i % self.n_pods for i in range(n)} if self.n_pods else set()

    def _create_cgroups(self, pod: BenchPod) -> None:
        for _name, cid in pod.containers:
            cg = cgroups.PodCgroup(uid=pod.uid, container_id=cid, qos=pod.qos).create()
            pod.cgroups.append(cg)
            if pod.qos == "guaranteed":
                for path in (cg.pod_path, cg.container_path):
                    _limit_cpu(path)

    def _spawn_gpu_processes(self) -> None:
        total = self.n_gpus * self.procs_per_gpu
        own_netns = bool(shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip"))
        for i in range(total):
            pod = self.pods[i % self.n_pods]
            cg = pod.cgroups[0]
            proc = cg.spawn(_pod_process(pod) if own_netns else ["sleep", "infinity"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            pod.pids.append(proc.pid)
            self.gpu_procs.append((proc.pid, pod, i % self.n_gpus if self.n_gpus else 0))

    def write_scenario(self) -> None:
        gpus = [GPU(uuid=f"GPU-{uuid.uuid5(uuid.NAMESPACE_DNS, f'bench-gpu-{g}')}", util_gpu=50 + g, util_mem=30,
                    mem_used=(4 + g) << 30, temp=40 + g, power_mw=300_000 + g * 1000, pcie_tx=1 << 30,
                    pcie_rx=1 << 29, ecc_corr=g)
                for g in range(self.n_gpus)]
        procs = [Process(pid=pid, gpu=g, used_mem=(256 + i) * MiB, sm=(i * 7) % 100, mem=(i * 3) % 100,
                         enc=0, dec=0)
                 for i, (pid, _pod, g) in enumerate(self.gpu_procs)]
        self.scenario = Scenario(gpus=gpus, processes=procs)
        self.scenario.write(self.scenario_path)

    def nvml_env(self) -> dict[str, str]:
        """Environment for a process that should see the fake GPUs."""
        env = dict(os.environ)
        env["FAKE_NVML_SCENARIO"] = self.scenario_path
        env["LD_LIBRARY_PATH"] = os.path.dirname(self.nvml_lib) + (
            ":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        return env

    def pid_to_pod(self) -> dict[int, BenchPod]:
        return {pid: pod for pid, pod, _g in self.gpu_procs}


def _pod_process(pod: BenchPod) -> list[str]:
    """A pod process in the pod's own network namespace, as on a CNI network: its first process makes the namespace
    with an `eth0` whose veth peer sits on the node, the others join it. The cgroup receiver then reads the pod's
    network counters as on a real node (pods that share the node's namespace are skipped). The PID stays the
    process's: unshare, nsenter and sh exec."""
    if pod.pids:
        return ["nsenter", f"--net=/proc/{pod.pids[0]}/ns/net", "sleep", "infinity"]
    setup = f"ip link add eth0 type veth peer name pmb{pod.index} netns 1 && ip link set eth0 up"
    return ["unshare", "--net", "sh", "-c", f"{setup}; exec sleep infinity"]


# -- fixture trees ------------------------------------------------------------------------------------------------

def _snapshot_dir(path: str) -> dict[str, bytes]:
    """Readable regular files of one cgroup directory (write-only control files are skipped)."""
    out = {}
    try:
        entries = list(os.scandir(path))
    except OSError:
        return out
    for e in entries:
        if not e.is_file(follow_symlinks=False):
            continue
        try:
            with open(e.path, "rb") as f:
                out[e.name] = f.read()
        except OSError:
            continue
    return out


def build_fixture(root: str, pods: list[BenchPod]) -> None:
    """A cgroup_root with the layout of this host (same hierarchies, same file names and contents per level),
    copied from a throw-away real pod cgroup, for node sizes beyond what the bench creates on the kernel."""
    template = cgroups.PodCgroup(qos="burstable").create()
    try:
        levels = {}
        for h in cgroups.hierarchies():
            rel = os.path.relpath(h, cgroups.ROOT)
            levels[rel] = {
                "root": _snapshot_dir(h),
                "pod": _snapshot_dir(h + template.pod_path),
                "container": _snapshot_dir(h + template.container_path),
            }
    finally:
        template.destroy()
    for rel, files in levels.items():
        base = root if rel == "." else os.path.join(root, rel)
        _write_files(base, files["root"])
        for pod in pods:
            qos = "" if pod.qos == "guaranteed" else f"/{pod.qos}"
            pod_dir = f"{base}/kubepods{qos}/pod{pod.uid}"
            limited = pod.qos == "guaranteed"
            _write_files(pod_dir, _with_quota(files["pod"]) if limited else files["pod"])
            for _name, cid in pod.containers:
                _write_files(f"{pod_dir}/{cid}", _with_quota(files["container"]) if limited else files["container"])


def _limit_cpu(path: str) -> None:
    """A CFS quota on a real cgroup, in whichever hierarchy has the file (v2: where the cpu controller is on)."""
    for h in cgroups.hierarchies():
        for name, value in CPU_QUOTA.items():
            if os.path.exists(f"{h}{path}/{name}"):
                with open(f"{h}{path}/{name}", "wb") as f:
                    f.write(value)


def _with_quota(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: CPU_QUOTA.get(name, data) for name, data in files.items()}


def _write_files(directory: str, files: dict[str, bytes]) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
