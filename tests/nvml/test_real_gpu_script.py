"""bench.real_gpu, the check made on a machine with a real NVIDIA driver, run here against the fake library so that
it keeps working between the times a GPU is at hand (no workloads: they need PyTorch and a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from harness.fake_nvml import GPU, GiB, Scenario

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UUID = "GPU-12345678-1111-2222-3333-444444444444"


def test_real_gpu_check_reports_every_call_and_the_agents_metrics(fake, tmp_path):
    fake.write(Scenario(gpus=[GPU(uuid=UUID, mem_used=3 * GiB, energy_mj=5_000_000, gpm={2: 50})]))
    out = tmp_path / "out"
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(fake.lib))
    scratch_before = set(os.listdir(tempfile.gettempdir()))
    run = subprocess.run([sys.executable, "-m", "bench.real_gpu", "--out", str(out), "--workload", "0",
                          "--iterations", "3", "--agent-seconds", "3", "--mps"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    gpu = report["probes"][0]["devices"][0]
    assert gpu["uuid"]["value"] == UUID
    assert gpu["energy_mj"]["value"] == 5_000_000 and gpu["energy_mj"]["cpu_us"] >= 0
    assert gpu["process_utilization_size_query_all"]["code"] in (6, 7)  # NOT_FOUND or INSUFFICIENT_SIZE
    assert report["in_process"]["missing"] == {} and report["in_process"]["cpu_collect"]["n"] == 3
    assert report["in_process_without_energy"]["cpu_collect"]["n"] == 3
    # GPM: supported, what its metrics answer (SM_UTIL only here), and its cost in the receiver
    assert gpu["gpm_support"]["value"]["isSupportedDevice"] == 1
    assert gpu["gpm_metrics_1s"]["value"]["2"] == [0, 50.0] and gpu["gpm_metrics_1s"]["value"]["1"][0] == 3
    assert report["in_process_with_gpm"]["cpu_collect"]["n"] == 3
    assert report["in_process_per_container"]["cpu_collect"]["n"] == 3  # as the shipped DaemonSet configuration
    assert gpu["memory_temp_field_82"]["value"] == [[3, 3, 0]]  # the fake GPU has no memory sensor: NOT_SUPPORTED
    assert gpu["temperature_thresholds"]["slowdown"]["code"] == 3
    assert gpu["remapped_rows"]["value"] == [0, 0, 0, 0] and gpu["pcie_replays"]["value"] == 0
    costs = report["costs"]  # per call on GPU 0, beside the alternatives
    assert costs["gpm: nvmlGpmSampleGet"]["answer"] == "sample" and costs["health: nvmlDeviceGetPcieReplayCounter"]
    assert costs["health: nvmlEventSetWait_v2, nothing queued"]["answer"] == "Timeout (10)"
    assert report["agent"] == {"up": True, "exit": 0}
    # no MPS daemon on these machines: said, and the rest ran
    assert report["mps"]["problem"] == "nvidia-cuda-mps-control is not on the PATH"
    for proc_root in ("own /proc", "host /proc as proc_root"):  # `podmeter collect` in a PID namespace of its own
        assert report["pid_namespace"][proc_root]["rc"] == 0, report["pid_namespace"][proc_root]["log"]
    metrics = (out / "metrics.txt").read_text()
    assert f'hw_gpu_sm_utilization_ratio{{hw_gpu_index="0",hw_id="{UUID}"}} 0.5' in metrics
    assert f'hw_gpu_memory_usage_bytes{{hw_gpu_index="0",hw_id="{UUID}"}} 3.221225472e+09' in metrics
    assert "# nvml receiver on a real driver" in (out / "report.md").read_text()
    # the configs that ran are kept with the results; nothing is left in the temporary directory
    assert {"agent.yaml", "pidns-own-proc.yaml", "pidns-host-proc.yaml"} <= set(os.listdir(out))
    assert not {n for n in set(os.listdir(tempfile.gettempdir())) - scratch_before if n.startswith("podmeter-")}
