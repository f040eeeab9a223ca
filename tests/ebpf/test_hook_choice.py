"""Hook choices that depend on the kernel's tracepoint prototypes, decided from real BTF: the running kernel's
(6.8+: mark_victim passes the task, sock_*_length tracepoints exist) and, for older kernels, BTF that clang emits
for a small C file declaring the old prototypes (no older kernel runs here)."""

from __future__ import annotations

import os
import subprocess

import pytest
from harness import require, require_binary, require_root, wait_for

from receivers.ebpf import libbpf as lb
from receivers.ebpf.programs import (
    HOOKS,
    Programs,
    has_sock_length_tracepoints,
    oom_hook_problem,
    order_variants,
)

# Kernels before 6.8 (Ubuntu 22.04/24.04, Debian 12, RHEL 9): mark_victim passes the pid; before 6.3 there is no
# sock_recv_length / sock_send_length tracepoint. Declared and used so clang emits them into the object's BTF.
OLD_KERNEL_C = """
typedef void (*btf_trace_mark_victim)(void *, int);
btf_trace_mark_victim pm_mark_victim;
"""
NO_OOM_C = "int pm_unrelated;\n"


def compile_btf(tmp_path, source: str) -> str:
    clang = require_binary("clang")
    src, obj = tmp_path / "btf.c", tmp_path / "btf.o"
    src.write_text(source)
    subprocess.run([clang, "-g", "-O2", "-target", "bpf", "-c", str(src), "-o", str(obj)], check=True,
                   capture_output=True, timeout=60)
    return str(obj)


@pytest.fixture
def kernel_btf():
    require(os.path.exists("/sys/kernel/btf/vmlinux"), "needs a kernel with BTF")
    with lb.BTF() as btf:
        yield btf


@pytest.fixture
def old_kernel_btf(tmp_path):
    with lb.BTF(compile_btf(tmp_path, OLD_KERNEL_C)) as btf:
        yield btf


def kinds(variants) -> list[str]:
    return [v.kind for v in variants]


def test_oom_hook_runs_where_mark_victim_passes_the_task(kernel_btf):
    assert oom_hook_problem(kernel_btf) is None


def test_oom_hook_refused_where_mark_victim_passes_a_pid(old_kernel_btf):
    why = oom_hook_problem(old_kernel_btf)
    assert why is not None and "pid" in why
    assert "cgroup receiver" in why and "memory.events" in why  # says where the kills are still counted


def test_oom_hook_refused_without_the_tracepoint(tmp_path):
    with lb.BTF(compile_btf(tmp_path, NO_OOM_C)) as btf:
        assert "no oom/mark_victim" in oom_hook_problem(btf)


def test_tcp_bytes_prefer_sock_length_tracepoints_over_fentry(kernel_btf, old_kernel_btf):
    assert has_sock_length_tracepoints(kernel_btf)
    assert kinds(order_variants("tcp_bytes", list(HOOKS["tcp_bytes"]), True)) == ["tp_btf", "raw_tp", "fentry"]
    # older kernels: fentry first (it overcounts some receives, but the tracepoints do not exist there)
    assert not has_sock_length_tracepoints(old_kernel_btf)
    assert kinds(order_variants("tcp_bytes", list(HOOKS["tcp_bytes"]), False)) == ["fentry", "tp_btf", "raw_tp"]
    # other hooks keep attach_order's order
    assert kinds(order_variants("oom", list(HOOKS["oom"]), True)) == ["tp_btf", "raw_tp"]


def start_programs(btf_path: str | None, built_object: str) -> Programs:
    require_root()
    progs = Programs(built_object, {"oom_kills", "tcp"}, max_cgroups=64, syscall_entries=1, tracked=[],
                     attach_order=["fentry", "tp_btf", "raw_tp"], btf_path=btf_path)
    progs.start()
    return progs


def test_this_kernel_attaches_oom_and_tcp_bytes_tracepoints(kernel_btf, built_object):
    progs = start_programs(None, built_object)
    try:
        res = progs.result
        assert res.attached["oom"] == "tp_btf"
        assert res.attached["tcp_bytes"] == "tp_btf"
        assert not any(line.startswith("tcp_bytes:") for line in res.fallbacks)  # fentry not even tried
    finally:
        progs.close()


def test_old_kernel_prototypes_leave_oom_unattached_and_try_fentry_first(tmp_path, built_object):
    require(os.path.exists("/sys/kernel/btf/vmlinux"), "needs a kernel with BTF")
    progs = start_programs(compile_btf(tmp_path, OLD_KERNEL_C), built_object)
    try:
        res = progs.result
        assert "oom" not in res.attached and "pid" in res.unavailable["oom"]
        assert "tcp_retransmit" in res.attached  # the rest runs
        # fentry first; this kernel refuses trampolines (EPERM), so it falls back to the tracepoint
        assert res.attached["tcp_bytes"] in ("fentry", "tp_btf")
        if res.attached["tcp_bytes"] == "tp_btf":
            assert any(line.startswith("tcp_bytes: fentry") for line in res.fallbacks)
    finally:
        progs.close()


def test_a_variant_refused_at_attach_falls_back_to_the_next(built_object, monkeypatch):
    """A kernel can load a program and then refuse to attach it: arm64 before 6.0 loads fentry programs but has no
    BPF trampolines to attach them (ENOTSUPP). The hook then runs on its next variant, reloaded, instead of being
    dropped; a hook with no other variant is reported unavailable and the rest runs.

    No kernel here refuses an attach after a load, so the refusal is made at libbpf's attach call for the chosen
    programs (a stand-in for that kernel); loading, the reload and attaching the fallbacks are real."""
    require_root()
    require(os.path.exists("/sys/kernel/btf/vmlinux"), "needs a kernel with BTF")
    refuse = {"switch_btf", "wakeup_btf"}
    real_attach = lb.BPFObject.attach

    def attach(self, prog):
        if prog in refuse:
            raise lb.BPFError(524, f"attach {prog}")  # ENOTSUPP, as arm64 answers for a trampoline
        return real_attach(self, prog)

    monkeypatch.setattr(lb.BPFObject, "attach", attach)
    progs = Programs(built_object, {"context_switches", "runqueue_latency"}, max_cgroups=64, syscall_entries=1,
                     tracked=[], attach_order=["fentry", "tp_btf", "raw_tp"])
    res = progs.start()
    try:
        assert res.attached["sched_switch"] == "raw_tp"
        assert any(line.startswith("sched_switch: tp_btf not attachable") for line in res.fallbacks), res.fallbacks
        assert "sched_wakeup" not in res.attached and "attach failed" in res.unavailable["sched_wakeup"]
        assert res.attached["cgroup_rmdir"] == "tp_btf"
        assert set(progs.obj.links) == {"switch_raw", "rmdir_btf"}
        # attached for real: the kernel's context switches are counted
        wait_for(lambda: any(words[0] + words[1] for words in progs.read_counters().values()), what="context switches")
    finally:
        progs.close()


def test_kernel_without_task_storage_runs_the_hooks_that_need_none(built_object, monkeypatch):
    """Kernels 5.8-5.10 have BTF tracepoints but no task-local storage maps. A map the kernel cannot make fails the
    whole object at load, so the variants that use one are left out beforehand and their maps are not made:
    context switches and syscalls are counted (raw_tp, without latencies), the wakeup and sys_enter hooks are
    reported unavailable, and nothing else is lost.

    This kernel has task storage, so libbpf's probe answers "no" here as a 5.10 kernel's would (a stand-in);
    the probe itself, the load without those maps and the counting are real."""
    require_root()
    require(os.path.exists("/sys/kernel/btf/vmlinux"), "needs a kernel with BTF")
    assert lb.map_type_supported(lb.BPF_MAP_TYPE_TASK_STORAGE)  # the real probe, on this 6.x kernel
    monkeypatch.setattr(lb, "map_type_supported", lambda t: t != lb.BPF_MAP_TYPE_TASK_STORAGE)
    progs = Programs(built_object, {"context_switches", "runqueue_latency", "syscalls", "syscall_latency", "tcp"},
                     max_cgroups=64, syscall_entries=64, tracked=[0, 1], attach_order=["fentry", "tp_btf", "raw_tp"])
    res = progs.start()
    try:
        assert res.attached["sched_switch"] == "raw_tp" and res.attached["sys_exit"] == "raw_tp"
        assert "5.11" in res.unavailable["sched_wakeup"] and "5.11" in res.unavailable["sys_enter"]
        assert any(line.startswith("sched_switch: tp_btf needs task-local storage") for line in res.fallbacks)
        assert res.attached["tcp_retransmit"] == "tp_btf"  # hooks without task storage keep their best variant
        with pytest.raises(lb.BPFError):
            progs.obj.map("wakeup_ts")  # not made: a 5.10 kernel would have refused the whole object here
        wait_for(lambda: any(words[0] + words[1] and words[2] for words in progs.read_counters().values()),
                 what="context switches and syscalls")
    finally:
        progs.close()


def test_task_storage_maps_are_made_only_when_used(built_object):
    """Without run-queue or syscall latency chosen (the minimal profile), the task-storage maps are not made."""
    require_root()
    progs = Programs(built_object, {"syscalls"}, max_cgroups=64, syscall_entries=1, tracked=[],
                     attach_order=["raw_tp"])
    progs.start()
    try:
        assert progs.result.attached["sys_exit"] == "raw_tp"
        for name in ("wakeup_ts", "sys_enter_ts"):
            with pytest.raises(lb.BPFError):
                progs.obj.map(name)
    finally:
        progs.close()
