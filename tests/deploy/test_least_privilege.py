"""The agent runs with exactly what the DaemonSet grants, on this real kernel (no container runtime runs here, so
the container's view is rebuilt with the same kernel mechanisms a runtime uses):

- a private mount namespace: the host's /proc, /sys/fs/cgroup and the kubelet's pod-resources directory bind-mounted
  read-only under <tmp>/host (the DaemonSet's read-only hostPath mounts), with the mounts below them read-only too
  (recursiveReadOnly; checked: none is writable), the whole root filesystem read-only (readOnlyRootFilesystem), a
  tmpfs for the writable emptyDir;
- UID 0 with the capability sets a runtime gives for `drop: [ALL], add: [BPF, PERFMON]` (or none, for the no-ebpf
  overlay) and no_new_privs (allowPrivilegeEscalation: false), through util-linux's setpriv.

It then serves health, per-pod cgroup metrics, eBPF metrics (with BPF and PERFMON only, no SYS_ADMIN), GPU
processes attributed to their pod (the real nvidia-ml-py over the fake libnvidia-ml.so.1: no GPU here), the
PodResources allocations read through the read-only socket directory and (variant base+containerd) pod names from
a real containerd's CRI socket, also through a read-only directory mount, with no permission error in its log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml
from deploy.kubelet import serve_podresources
from harness import free_port, http_get, require, stop_process, wait_for
from harness.cgroups import PodCgroup
from harness.fake_nvml import GPU as FakeGPU
from harness.fake_nvml import GiB, Process, Scenario, build_fake_nvml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIPPED = os.path.join(ROOT, "k8s", "base", "pipelines.yaml")
NO_EBPF = os.path.join(ROOT, "k8s", "overlays", "no-ebpf", "no-ebpf.yaml")
CAP_PERFMON, CAP_BPF = 38, 39
GPU = "GPU-aaaa0000-1111-2222-3333-444444444444"



@pytest.fixture
def short_tmp():
    """A short directory: unix socket paths are limited to 107 characters."""
    import pathlib
    import tempfile

    path = tempfile.mkdtemp(prefix="pm-")
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["base", "no-ebpf", "base+containerd"])
def test_agent_runs_with_only_the_granted_privileges(variant, short_tmp):
    tmp_path = short_tmp
    require(os.geteuid() == 0, "needs root: mount namespaces, cgroups, eBPF")
    for tool in ("unshare", "setpriv", "findmnt", "mount"):
        require(shutil.which(tool) is not None, f"needs {tool} (util-linux)")
    probe = subprocess.run(["setpriv", "--bounding-set", "-all,+bpf,+perfmon", "--inh-caps", "-all", "--nnp", "--",
                            "true"], capture_output=True, text=True)
    require(probe.returncode == 0, f"setpriv does not know CAP_BPF/CAP_PERFMON here: {probe.stderr.strip()}")

    host = tmp_path / "host"
    for d in ("proc", "sys/fs/cgroup", "var/lib/kubelet/pod-resources"):
        (host / d).mkdir(parents=True)
    (tmp_path / "kubelet").mkdir()
    (tmp_path / "state").mkdir()
    server = serve_podresources(str(tmp_path / "kubelet" / "kubelet.sock"), {("ml", "trainer-0", "main"): [GPU]})
    pod = PodCgroup().create()
    agent = ctrd = None
    try:
        cri_mount = ""
        if variant == "base+containerd":
            # a real containerd serving CRI, its socket directory mounted read-only as the DaemonSet does:
            # names come from CRI (no API server here)
            from harness import containerd

            ok, why = containerd.available()
            require(ok, why)
            ctrd = containerd.Containerd().start()
            ctrd.run_pod("web-0", "shop", containers={"main": ["/bin/sleep", "3600"]})
            (host / "run" / "containerd").mkdir(parents=True)
            # with what is mounted below it (the containers' root filesystems), all read-only: recursiveReadOnly
            cri_mount = (f"mount --rbind {ctrd.work} {host}/run/containerd\n"
                         f"for m in $(findmnt -rn -o TARGET -R {host}/run/containerd); do "
                         f"mount -o remount,bind,ro \"$m\"; done\n")
        worker = pod.spawn([sys.executable, "-c", "import time\nwhile True:\n    sum(range(10000)); time.sleep(0.001)"])
        # NVML through the fake libnvidia-ml.so.1 (no GPU here): the GPU process is the pod's real worker, so its
        # attribution reads /proc/<pid> of a process the agent may not ptrace
        require(shutil.which("gcc") is not None, "needs gcc to build the fake libnvidia-ml.so.1")
        lib = build_fake_nvml()
        scenario = tmp_path / "nvml.txt"
        Scenario(gpus=[FakeGPU(uuid=GPU, mem_used=3 * GiB)],
                 processes=[Process(pid=worker.pid, gpu=0, used_mem=2 * GiB, sm=50)]).write(str(scenario))
        prom, health, telemetry = free_port(), free_port(), free_port()
        override = {
            # the DaemonSet's /host/... paths, under <tmp>/host here; collections every second, with a timeout
            # that a loaded test machine cannot trip (a timed-out collection marks its receiver in error)
            "receivers": {
                "cgroup": {"cgroup_root": f"{host}/sys/fs/cgroup", "proc_root": f"{host}/proc",
                           "collection_interval": "1s", "timeout": "10s", "initial_delay": "0s"},
                "podresources": {"endpoint": f"unix://{host}/var/lib/kubelet/pod-resources/kubelet.sock",
                                 "collection_interval": "1s", "timeout": "10s", "initial_delay": "0s"},
                "nvml": {"proc_root": f"{host}/proc", "library_path": lib, "collection_interval": "1s", "timeout": "10s",
                         "initial_delay": "0s"},
                "ebpf": {"cgroup_root": f"{host}/sys/fs/cgroup", "collection_interval": "1s", "timeout": "10s", "initial_delay": "0s"},
                "cri": {"endpoint": f"unix://{host}/run/containerd/{os.path.basename(ctrd.socket) if ctrd else 'x'}"},
            },
            # no API server here: CRI and local sources only
            "processors": {"k8sattributes": {"auth_type": "none", "proc_root": f"{host}/proc"}},
            "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{prom}"},
                          "otlp": {"sending_queue": {"storage": f"{tmp_path}/state/queue"}}},
            "extensions": {"health_check": {"endpoint": f"127.0.0.1:{health}"}},
            "service": {"telemetry": {"metrics": {"address": f"127.0.0.1:{telemetry}"}}},
        }
        (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
        configs = ["--config", SHIPPED] + (["--config", NO_EBPF] if variant == "no-ebpf" else [])
        configs += ["--config", str(tmp_path / "override.yaml")]
        caps = "-all" if variant == "no-ebpf" else "-all,+bpf,+perfmon"
        # mounts as the DaemonSet declares them; then the root filesystem read-only; then drop privileges
        script = textwrap.dedent(f"""\
            set -e
            mount --bind /proc {host}/proc
            mount -o remount,bind,ro {host}/proc
            mount --rbind /sys/fs/cgroup {host}/sys/fs/cgroup
            for m in $(findmnt -rn -o TARGET -R {host}/sys/fs/cgroup); do mount -o remount,bind,ro "$m"; done
            mount --bind {tmp_path}/kubelet {host}/var/lib/kubelet/pod-resources
            mount -o remount,bind,ro {host}/var/lib/kubelet/pod-resources
            {cri_mount}mount -t tmpfs -o size=64m tmpfs {tmp_path}/state
            mkdir {tmp_path}/state/tmp
            mount -o remount,bind,ro /
            if touch /podmeter-rootfs-probe 2>/dev/null || touch {host}/proc/x 2>/dev/null; then
              echo "mounts are writable" >&2; exit 3
            fi
            for m in $(findmnt -rn -o TARGET | grep "^{host}/"); do
              if touch "$m/.podmeter-probe" 2>/dev/null; then echo "$m is writable" >&2; exit 3; fi
            done
            export TMPDIR={tmp_path}/state/tmp PYTHONDONTWRITEBYTECODE=1 K8S_NODE_NAME=node-1 \\
              FAKE_NVML_SCENARIO={scenario}
            exec setpriv --bounding-set {caps} --inh-caps -all --nnp -- \\
              {sys.executable} -m podmeter.cli run {' '.join(configs)}
            """)
        log_path = tmp_path / "agent.log"
        log = open(log_path, "w")
        agent = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script], stdout=log,
                                 stderr=subprocess.STDOUT, cwd=ROOT)

        def healthy():
            if agent.poll() is not None:
                pytest.fail(f"the agent exited {agent.returncode}:\n{log_path.read_text()[-4000:]}")
            got = http_get(f"http://127.0.0.1:{health}/")
            return got and got[0] == 200 and json.loads(got[1])

        wait_for(healthy, timeout=60, what="health 200")

        # the process really holds only what the DaemonSet grants
        with open(f"/proc/{agent.pid}/status") as f:
            fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        eff = int(fields["CapEff"], 16)
        want = 0 if variant == "no-ebpf" else (1 << CAP_BPF | 1 << CAP_PERFMON)
        assert eff == want and int(fields["CapBnd"], 16) == want, fields["CapEff"]
        assert fields["NoNewPrivs"].strip() == "1"

        def metrics_with(*needles):
            got = http_get(f"http://127.0.0.1:{prom}/metrics")
            return got and all(n in got[1] for n in needles) and got[1]

        uid = f'k8s_pod_uid="{pod.uid}"'
        needles = ["container_cpu_time_seconds_total{", uid, "container_memory_working_set_bytes{",
                   "k8s_container_device_allocated", "process_gpu_memory_usage_bytes{", "hw_gpu_allocation"]
        if variant != "no-ebpf":
            needles += ["container_context_switches_total{", "container_syscalls_total{"]
        if ctrd is not None:
            needles += ['k8s_pod_name="web-0"']
        try:
            body = wait_for(lambda: metrics_with(*needles), timeout=60, what="metrics")
        except BaseException:
            got = http_get(f"http://127.0.0.1:{prom}/metrics")
            missing = [n for n in needles if not got or n not in got[1]]
            pytest.fail(f"missing {missing}; health {http_get(f'http://127.0.0.1:{health}/')}\n"
                        f"{log_path.read_text()[-4000:]}")
        components = json.loads(http_get(f"http://127.0.0.1:{health}/")[1])["components"]
        mine = [line for line in body.splitlines() if uid in line and line.startswith("container_")]
        assert any(line.startswith("container_cpu_time_seconds_total") for line in mine)
        gpu = [line for line in body.splitlines() if line.startswith("process_gpu_memory_usage_bytes{")]
        assert len(gpu) == 1 and uid in gpu[0] and f'process_pid="{worker.pid}"' in gpu[0], gpu
        assert gpu[0].rsplit(" ", 1)[1] in ("2147483648", "2147483648.0", "2.147483648e+09"), gpu
        if ctrd is not None:
            named = [line for line in body.splitlines() if line.startswith("container_cpu_time_seconds_total{")
                     and 'k8s_pod_name="web-0"' in line]
            # the pod's sandbox (pause) container is reported too, with no container name
            assert all('k8s_namespace_name="shop"' in line for line in named), named
            assert any('k8s_container_name="main"' in line for line in named), named
            assert components["receiver:cri"] == "ok"
        if variant != "no-ebpf":
            assert components["receiver:ebpf"] == "ok"
            assert any(line.startswith("container_context_switches_total") for line in mine), mine
        else:
            assert "receiver:ebpf" not in components  # the no-ebpf pipeline does not list it
        for key in ("receiver:cgroup", "receiver:podresources", "receiver:nvml", "exporter:prometheus",
                    "processor:k8sattributes:metrics"):
            assert components[key] == "ok", (key, components)
        assert worker.poll() is None
    finally:
        stop_process(agent, 20)
        server.stop(0).wait()
        pod.destroy()
        if ctrd is not None:
            ctrd.close()
    text = log_path.read_text()
    assert agent.returncode == 0, text[-3000:]
    # The kernel shows /proc/<pid>/ns/net only to a process that may ptrace the target (CAP_SYS_PTRACE, which the
    # DaemonSet does not grant), so the shipped configuration switches the cgroup receiver's network group off
    # (k8s/base/pipelines.yaml, docs/deploy.md): nothing tries, nothing warns.
    for bad in ("Permission denied", "Read-only file system", "Traceback", "EACCES", "EROFS",
                "cannot read the network namespace"):
        assert bad not in text, f"{bad!r} in the agent log:\n{text[-3000:]}"
