"""What the nvml receiver keeps between collections: processes attributed once per PID and start time (a reused
PID is attributed anew), caches that follow the processes on GPUs, and device facts read again after a reset or a
driver reload. A /proc tree written by the test (proc_root) stands for PID reuse, which real processes cannot be
made to do on demand."""

from __future__ import annotations

import os
import shutil

from harness.fake_nvml import GPU, GPU_IS_LOST, Fail, GiB, Process, Scenario

from .test_nvml_receiver import points

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
POD_A = "11111111-2222-3333-4444-555555555555"
POD_B = "66666666-7777-8888-9999-000000000000"
CID_A, CID_B = "a" * 64, "b" * 64


def write_proc(root, pid: int, start: int, pod: str, cid: str, comm: str = "python") -> None:
    """/proc/<pid> as the receiver reads it: stat (start time, field 22), cgroup, status, comm, cmdline."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    fields = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 20
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    (d / "cgroup").write_text(f"0::/kubepods/burstable/pod{pod}/{cid}\n")
    (d / "status").write_text(f"Name:\t{comm}\nNSpid:\t{pid}\n")
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(comm.encode() + b"\0train.py\0")


def proc_root(tmp_path):
    root = tmp_path / "proc"
    root.mkdir()
    (root / "stat").write_text("cpu 0 0 0 0\nbtime 1700000000\n")
    return root


def process_res(md) -> dict[int, dict]:
    return {res["process.pid"]: res for res, _, _ in points(md, "process.gpu.memory.usage")}


def test_a_reused_pid_is_attributed_to_its_new_pod(fake, make_receiver, tmp_path):
    root = proc_root(tmp_path)
    write_proc(root, 4242, start=1000, pod=POD_A, cid=CID_A)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=4242, used_mem=GiB)]))
    r = make_receiver(proc_root=str(root))
    for _ in range(2):
        res = process_res(r.collect())[4242]
        assert res["k8s.pod.uid"] == POD_A and res["container.id"] == CID_A
    # the process exits and another pod's process gets the same PID: a new /proc/<pid>, a new start time
    shutil.rmtree(root / "4242")
    write_proc(root, 4242, start=2000, pod=POD_B, cid=CID_B, comm="worker")
    res = process_res(r.collect())[4242]
    assert res["k8s.pod.uid"] == POD_B and res["container.id"] == CID_B
    assert res["process.executable.name"] == "worker"


def test_a_reused_pid_is_detected_by_start_time_without_an_fd(fake, make_receiver, tmp_path):
    root = proc_root(tmp_path)
    write_proc(root, 4242, start=1000, pod=POD_A, cid=CID_A)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=4242, used_mem=GiB)]))
    r = make_receiver(proc_root=str(root))
    r._fd_budget = 0  # over the fd budget: the start time is compared at each collection
    assert process_res(r.collect())[4242]["k8s.pod.uid"] == POD_A
    assert r._procs[4242].fd == -1
    write_proc(root, 4242, start=2000, pod=POD_B, cid=CID_B)  # same directory, another process
    assert process_res(r.collect())[4242]["k8s.pod.uid"] == POD_B


def test_proc_is_read_once_per_process(fake, make_receiver, tmp_path):
    root = proc_root(tmp_path)
    write_proc(root, 4242, start=1000, pod=POD_A, cid=CID_A)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0), GPU(uuid=UUID1)],
                        processes=[Process(pid=4242, gpu=0, used_mem=GiB), Process(pid=4242, gpu=1, used_mem=GiB)]))
    r = make_receiver(proc_root=str(root))
    first = r.collect()
    misses = r.attributor.misses
    # the cgroup file changing under a live process is not re-read (it is read once per process)...
    (root / "4242" / "cgroup").write_text(f"0::/kubepods/burstable/pod{POD_B}/{CID_B}\n")
    second = r.collect()
    assert r.attributor.misses == misses
    assert process_res(second)[4242]["k8s.pod.uid"] == POD_A
    # ...and the process's Resource on each GPU is the same object from one collection to the next
    ids = {rm.resource.attributes["hw.id"]: rm.resource for rm in first.resource_metrics
           if "process.pid" in rm.resource.attributes}
    for rm in second.resource_metrics:
        if "process.pid" in rm.resource.attributes:
            assert rm.resource is ids[rm.resource.attributes["hw.id"]]
    assert len(ids) == 2


def test_exited_processes_do_not_accumulate(fake, make_receiver, tmp_path):
    root = proc_root(tmp_path)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)]))
    r = make_receiver(proc_root=str(root))
    fds_before = len(os.listdir("/proc/self/fd"))
    for gen in range(30):
        pids = [10_000 + gen * 4 + i for i in range(4)]
        for pid in pids:
            write_proc(root, pid, start=pid, pod=POD_A, cid=CID_A)
        fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=p, used_mem=GiB) for p in pids]))
        assert set(process_res(r.collect())) == set(pids)
        for pid in pids:  # they exit before the next collection
            shutil.rmtree(root / str(pid))
        assert set(r._procs) == set(pids)
        assert r._fds == 4
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)]))
    r.collect()
    assert r._procs == {} and r._fds == 0 and len(r.attributor) == 0
    assert len(os.listdir("/proc/self/fd")) <= fds_before  # every /proc/<pid> fd closed


def test_process_resources_follow_a_driver_reload(fake, make_receiver, tmp_path):
    root = proc_root(tmp_path)
    write_proc(root, 4242, start=1000, pod=POD_A, cid=CID_A)
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0, name="NVIDIA A100-SXM4-40GB")],
                            processes=[Process(pid=4242, used_mem=GiB)]))
    r = make_receiver(proc_root=str(root))
    assert process_res(r.collect())[4242]["hw.model"] == "NVIDIA A100-SXM4-40GB"
    s.gpus = [GPU(uuid=UUID0, name="NVIDIA A100-SXM4-80GB", serial="1320")]
    s.generation = 1  # a driver reload: NVML re-initialised, the GPUs discovered again
    fake.write(s)
    res = process_res(r.collect())[4242]
    assert res["hw.model"] == "NVIDIA A100-SXM4-80GB" and res["hw.serial_number"] == "1320"
    assert res["k8s.pod.uid"] == POD_A


def test_static_info_is_read_again_after_a_gpu_comes_back(fake, make_receiver, tmp_path):
    root = proc_root(tmp_path)
    write_proc(root, 4242, start=1000, pod=POD_A, cid=CID_A)
    s = fake.write(Scenario(gpus=[GPU(uuid=UUID0, serial="old")], processes=[Process(pid=4242, used_mem=GiB)]))
    r = make_receiver(proc_root=str(root))
    assert process_res(r.collect())[4242]["hw.serial_number"] == "old"
    s.fail = [Fail("*", GPU_IS_LOST, gpu=0)]
    fake.write(s)
    assert process_res(r.collect()) == {}
    s.fail = []
    s.gpus = [GPU(uuid=UUID0, serial="new", pci_bus_id="00000000:3B:00.0")]  # reset, e.g. a board swap
    fake.write(s)
    r.collect()  # back: status ok; its static facts are read again before the next one
    md = r.collect()
    res = process_res(md)[4242]
    assert res["hw.serial_number"] == "new" and res["hw.gpu.pci_bus_id"] == "00000000:3B:00.0"
    assert [a for a, p, v in points(md, "hw.status") if p["hw.state"] == "ok" and v == 1][0]["hw.serial_number"] == "new"
