"""The ebpf receiver on the real kernel (root): workloads in pod-shaped cgroups, counts compared with independent
truth (the workload's own counts, getrusage, /proc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from harness import require, require_binary
from harness.cgroups import PodCgroup, hierarchies, v2_root

pytestmark = pytest.mark.root

SWITCH = "container.context_switches"


def vol(s):
    return s.get((SWITCH, (("process.context_switch.type", "voluntary"),)), 0)


def invol(s):
    return s.get((SWITCH, (("process.context_switch.type", "involuntary"),)), 0)


def test_syscalls_and_errors_per_syscall(receiver_factory, pod, workload, series):
    r = receiver_factory(profile="comprehensive", tracked_syscalls=["getppid", "openat"])
    n, m = 200_000, 3_000
    workload(pod, "syscalls", n, m)
    s = series(r.collect(), pod)
    # the interpreter's start-up and exit add a few thousand syscalls and some failures
    assert n + m <= s[("container.syscalls", ())] <= n + m + 10_000
    assert m <= s[("container.syscall.errors", ())] <= m + 1_000
    assert s[("container.syscall.calls", (("syscall.name", "getppid"),))] == n
    assert s[("container.syscall.failures", (("syscall.name", "getppid"),))] == 0
    # Python's os.open is openat(2)
    assert m <= s[("container.syscall.failures", (("syscall.name", "openat"),))] <= m + 500
    hist = s[("container.syscall.duration", (("syscall.name", "getppid"),))]
    assert hist.count == n and sum(hist.bucket_counts) == n and hist.sum > 0
    assert len(hist.explicit_bounds) + 1 == len(hist.bucket_counts)


def test_context_switches_match_getrusage(receiver_factory, pod, workload, series):
    r = receiver_factory(profile="minimal")
    out = workload(pod, "pingpong", 20_000)
    s = series(r.collect(), pod)
    ru = out["rusage"]
    # rusage covers both processes up to the report; the exit path adds a handful of switches
    # each round trip blocks at least once per side, or preempts on wakeup (an involuntary switch)
    assert ru["nvcsw"] + ru["nivcsw"] >= 40_000, ru
    assert abs(vol(s) - ru["nvcsw"]) <= 0.05 * ru["nvcsw"] + 50, (vol(s), invol(s), ru)
    assert abs(invol(s) - ru["nivcsw"]) <= 0.05 * ru["nivcsw"] + 50, (vol(s), invol(s), ru)


def test_runqueue_latency_matches_schedstat(receiver_factory, pod, workload, series):
    require(os.path.exists("/proc/self/schedstat"), "needs CONFIG_SCHEDSTATS for /proc/<pid>/schedstat")
    r = receiver_factory(profile="standard")
    out = workload(pod, "contend", 1.5)
    s = series(r.collect(), pod)
    hist = s[("container.cpu.run_queue.latency", ())]
    truth = out["run_delay_ns"] / 1e9  # the two busy processes' run_delay: time waiting on the run queue
    assert truth > 0.2, out  # two busy loops on one CPU wait about half the time
    # the histogram also holds the interpreter start-up and exit of both processes
    assert truth * 0.9 <= hist.sum <= truth * 1.25 + 0.05
    assert hist.count >= out["timeslices"] * 0.5
    assert sum(hist.bucket_counts) == hist.count


def test_loopback_tcp_bytes_and_connections(receiver_factory, pod, workload, series):
    r = receiver_factory(profile="standard")
    size = 16 << 20
    out = workload(pod, "tcp", size)
    assert out["received"] == size
    s = series(r.collect(), pod)
    tx = s[("container.tcp.io", (("network.io.direction", "transmit"),))]
    rx = s[("container.tcp.io", (("network.io.direction", "receive"),))]
    assert tx == size and rx == size
    assert s[("container.tcp.connections", (("network.connection.direction", "outbound"),))] == 1
    assert s[("container.tcp.connections", (("network.connection.direction", "inbound"),))] == 1


def test_retransmits_in_private_netns(receiver_factory, pod, workload, series):
    unshare, tc, ip = require_binary("unshare"), require_binary("tc"), require_binary("ip")
    r = receiver_factory(profile="standard")
    # a private network namespace whose loopback is rate limited with a tiny queue: tail drops force
    # retransmissions (tbf, since this kernel has no netem); RetransSegs there counts only this transfer
    script = (f"{ip} link set lo up && {ip} link set lo mtu 1500 && "
              f"{tc} qdisc add dev lo root tbf rate 20mbit burst 16kb limit 30000 && "
              f"exec {sys.executable} {os.path.join(os.path.dirname(__file__), 'workload.py')} retransmit {2 << 20}")
    proc = pod.spawn([unshare, "-n", "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr
    truth = json.loads(stdout.strip().splitlines()[-1])
    require(truth["RetransSegs"] > 0, "the shaped loopback caused no retransmission on this kernel")
    s = series(r.collect(), pod)
    got = s[("container.tcp.retransmits", ())]
    assert r.hooks.attached["tcp_retransmit"] == "tp_btf"
    # exact: the segments the kernel added to the socket's total_retrans (and RetransSegs) at each event, not the
    # skb's gso_segs read after sending (which raced with the stack and undercounted by up to 7 % now and then);
    # RetransSegs also counts SYN-ACK retransmits of the listener's request sockets: a couple at most
    assert truth["RetransSegs"] - 2 <= got <= truth["RetransSegs"], (got, truth)
    assert s[("container.tcp.io", (("network.io.direction", "transmit"),))] >= 2 << 20


def test_retransmits_before_the_receiver_started_are_not_counted(receiver_factory, pod, series):
    """A connection that retransmitted before the receiver started: its first retransmit event afterwards counts
    that event's segments, not the socket's whole total_retrans since it was opened (which after every agent
    restart put each long-lived connection's lifetime of retransmits into one collection)."""
    unshare, tc, ip = require_binary("unshare"), require_binary("tc"), require_binary("ip")
    workload = os.path.join(os.path.dirname(__file__), "workload.py")
    script = (f"{ip} link set lo up && {ip} link set lo mtu 1500 && "
              f"{tc} qdisc add dev lo root tbf rate 20mbit burst 16kb limit 30000 && "
              f"exec {sys.executable} {workload} retransmit_twice {2 << 20}")
    proc = pod.spawn([unshare, "-n", "sh", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())["first"]
        r = receiver_factory(profile="standard")  # the maps (and the sockets' storage) start empty here
        stdout, stderr = proc.communicate("go\n", timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    second = json.loads(stdout.strip().splitlines()[-1])["second"]
    require(first > 0 and second > 0, "the shaped loopback caused no retransmission on this kernel")
    got = series(r.collect(), pod)[("container.tcp.retransmits", ())]
    assert r.hooks.attached["tcp_retransmit"] == "tp_btf"
    assert got <= second, (got, first, second)
    assert got >= second * 0.9, (got, first, second)


def test_oom_kill_in_memory_limited_cgroup(receiver_factory, pod, workload, series):
    mem = [h for h in hierarchies() if h.endswith("/memory")] or ([v2_root()] if os.path.exists(
        f"{v2_root()}/cgroup.subtree_control") and "memory" in open(f"{v2_root()}/cgroup.controllers").read() else [])
    require(bool(mem), "needs a memory controller (cgroup v1 memory or v2 with memory enabled)")
    r = receiver_factory(profile="minimal", metrics={"container.memory.oom.kills": {"enabled": True}})
    if mem[0].endswith("/memory"):
        pod.set("memory", "memory.limit_in_bytes", str(48 << 20))
    else:
        with open(f"{v2_root()}{pod.container_path}/memory.max", "w") as f:
            f.write(str(48 << 20))
    out = workload(pod, "alloc", 512, check=False)
    assert out["returncode"] == -9, out  # SIGKILLed by the OOM killer
    s = series(r.collect(), pod)
    assert s[("container.memory.oom.kills", ())] == 1


def test_major_faults_match_getrusage(receiver_factory, pod, workload, series):
    r = receiver_factory(profile="standard")
    out = workload(pod, "majfault", 16)
    require(out["majflt_mmap"] > 0, "the file mapping caused no major fault (page cache not dropped?)")
    s = series(r.collect(), pod)
    got = s[("container.memory.major_page_faults", ())]
    truth = out["rusage"]["majflt"]
    assert truth >= out["majflt_mmap"]
    assert abs(got - truth) <= 0.05 * truth + 5, (got, out)


def test_removed_cgroup_last_sample_then_cleaned(receiver_factory, workload, series):
    r = receiver_factory(profile="minimal")
    pod = PodCgroup().create()
    try:
        workload(pod, "syscalls", 10_000, 0)
        cgid = pod.cgroup_id()
        assert series(r.collect(), pod)[("container.syscalls", ())] >= 10_000
    finally:
        pod.destroy()
    # the cgroup is gone: one last sample with the final counts, then its entry and cache line are dropped
    last = series(r.collect(), pod)
    assert last[("container.syscalls", ())] >= 10_000
    assert cgid not in r.paths._cache
    assert series(r.collect(), pod) == {}
    counters = r.programs.read_counters()
    assert cgid not in counters


def test_sub_cgroup_removal_keeps_counters_monotonic(receiver_factory, pod, workload, series):
    r = receiver_factory(profile="minimal")
    # a sub-cgroup inside the container (as runc exec or systemd-in-container create): same resource
    sub_path = pod.container_path + "/sub"
    for h in hierarchies():
        os.makedirs(h + sub_path, exist_ok=True)
    try:
        def enter():
            for h in hierarchies():
                with open(f"{h}{sub_path}/cgroup.procs", "w") as f:
                    f.write("0")

        p = subprocess.Popen([sys.executable, "-c", "import os\nfor _ in range(50000): os.getppid()"],
                             preexec_fn=enter)
        p.wait()
        workload(pod, "syscalls", 20_000, 0)
        first = series(r.collect(), pod)[("container.syscalls", ())]
        assert first >= 70_000
    finally:
        for h in hierarchies():
            if os.path.isdir(h + sub_path):
                os.rmdir(h + sub_path)
    second = series(r.collect(), pod)[("container.syscalls", ())]
    third = series(r.collect(), pod)[("container.syscalls", ())]
    assert first <= second <= third  # the removed sub-cgroup's counts are carried, never subtracted


def test_non_pod_cgroups_policy(receiver_factory):
    v2 = v2_root()
    path = f"/podmeter-ebpf-test-{os.getpid()}"
    os.makedirs(v2 + path, exist_ok=True)
    keep = receiver_factory(profile="minimal", non_pod_cgroups="keep")
    drop = receiver_factory(profile="minimal")
    agg = receiver_factory(profile="minimal", non_pod_cgroups="aggregate")
    try:
        def enter():
            with open(f"{v2}{path}/cgroup.procs", "w") as f:
                f.write("0")

        subprocess.run([sys.executable, "-c", "import os\nfor _ in range(30000): os.getppid()"],
                       preexec_fn=enter, check=True)
        kept = {dict(rm.resource.attributes).get("cgroup.path") for rm in keep.collect().resource_metrics}
        assert path in kept
        # (a batch with nothing in it is one empty resource: it tells exporters the receiver has no series now)
        dropped = [dict(rm.resource.attributes) for rm in drop.collect().resource_metrics
                   if any(sm.metrics for sm in rm.scope_metrics)]
        assert all("k8s.pod.uid" in a for a in dropped), dropped
        aggregated = [dict(rm.resource.attributes) for rm in agg.collect().resource_metrics]
        assert {"podmeter.cgroup.scope": "host"} in aggregated
    finally:
        os.rmdir(v2 + path)


def test_raw_tp_fallback_counts_the_same(receiver_factory, pod, workload, series):
    r = receiver_factory(profile="standard", attach_order=["raw_tp"])
    assert r.hooks.attached["sys_exit"] == "raw_tp"
    assert r.hooks.attached["sched_switch"] == "raw_tp"
    # run-queue latency needs tp_btf: reported, the rest runs
    assert "sched_wakeup" in r.hooks.unavailable
    assert "hook_degraded:runqueue_latency" in r.settings.telemetry.failing()
    workload(pod, "syscalls", 50_000, 100)
    s = series(r.collect(), pod)
    assert 50_100 <= s[("container.syscalls", ())] <= 60_000
    assert ("container.cpu.run_queue.latency", ()) not in s


def test_tcp_bytes_use_sock_length_tracepoints_where_they_exist(receiver_factory):
    r = receiver_factory(profile="standard")
    # this kernel has sock_recv_length: fentry (overcounts some receives) is not tried; the fentry-refused
    # fallback is covered in test_hook_choice.py
    assert r.hooks.attached["tcp_bytes"] == "tp_btf"
    assert not any(line.startswith("tcp_bytes:") for line in r.hooks.fallbacks)


def test_map_diagnostics_in_self_telemetry(receiver_factory, pod, workload):
    r = receiver_factory(profile="minimal", max_cgroups=64)
    workload(pod, "syscalls", 1000, 0)
    r.collect()
    reg = r.settings.telemetry.telemetry.registry
    assert reg.get_sample_value("podmeter_ebpf_map_capacity", {"component": "ebpf", "map": "counters"}) == 64
    assert reg.get_sample_value("podmeter_ebpf_map_entries", {"component": "ebpf", "map": "counters"}) >= 1
    assert reg.get_sample_value("podmeter_ebpf_hooks", {"component": "ebpf", "hook": "sys_exit", "kind": "tp_btf",
                                                         "state": "attached"}) == 1


def test_cgroups_lost_to_a_full_map_are_counted_and_logged_once(receiver_factory, series, caplog):
    """New cgroups that a full LRU map evicts before the next collection leave no key behind to compare: they were
    lost silently (12 of 40 pods counted, no eviction, no log). Entries added minus deleted minus present counts
    them."""
    r = receiver_factory(profile="minimal", max_cgroups=16, tracked_syscalls=[])
    reg = r.settings.telemetry.telemetry.registry
    r.collect()
    lost = 0
    with caplog.at_level("WARNING"):
        for _ in range(2):  # two rounds: still failing at the second, so not logged again
            pods = [PodCgroup().create() for _ in range(40)]
            try:
                for p in pods:
                    p.spawn(["/bin/true"]).wait()
                md = r.collect()
                lost += sum(1 for p in pods if ("container.syscalls", ()) not in series(md, p))
            finally:
                for p in pods:
                    p.destroy()
    assert lost >= 2 * (40 - 16)  # the map cannot hold them all
    evicted = reg.get_sample_value("podmeter_ebpf_map_evictions_total", {"component": "ebpf", "map": "counters"})
    assert evicted and evicted >= lost, (evicted, lost)
    assert "max_cgroups" in r.settings.telemetry.failing()["counters_map_full"]
    warnings = [rec for rec in caplog.records if "counters_map_full" in rec.getMessage()]
    assert len(warnings) == 1, [w.getMessage() for w in warnings]


def test_removed_cgroup_whose_counters_entry_was_evicted_is_cleaned(receiver_factory, series):
    """A cgroup's counters entry evicted by a full map, then the cgroup removed: cgroup_rmdir finds no entry to mark,
    and its per-syscall entries (and series) stayed for good. Checked by its path: last sample, then gone."""
    r = receiver_factory(profile="minimal", max_cgroups=16, max_syscall_entries=4096, tracked_syscalls=["getppid"])
    pod = PodCgroup().create()
    flood: list[PodCgroup] = []
    try:
        pod.spawn([sys.executable, "-c", "import os\nfor _ in range(5000): os.getppid()"]).wait()
        cgid = pod.cgroup_id()
        calls = ("container.syscall.calls", (("syscall.name", "getppid"),))
        assert series(r.collect(), pod)[calls] == 5000
        while cgid in r.programs.read_counters():
            assert len(flood) < 200, "the pod's entry was never evicted"
            flood.append(PodCgroup().create())
            flood[-1].spawn(["/bin/true"]).wait()
        pod.destroy()
        assert series(r.collect(), pod).get(calls) == 5000  # the last sample
        assert series(r.collect(), pod) == {}
        assert not [k for k in r.programs.read_syscalls() if k[0] == cgid]
        assert cgid not in r.paths._cache
    finally:
        pod.destroy()
        for p in flood:
            p.destroy()


def test_latency_tracking_off_and_metric_toggles(receiver_factory, pod, workload, series):
    r = receiver_factory(profile="comprehensive", latency_tracking=False, tracked_syscalls=["getppid"],
                         metrics={"container.syscall.errors": {"enabled": False}})
    assert "sys_enter" not in r.hooks.attached and "sched_wakeup" not in r.hooks.attached
    workload(pod, "syscalls", 5_000, 10)
    s = series(r.collect(), pod)
    assert s[("container.syscall.calls", (("syscall.name", "getppid"),))] == 5_000
    assert ("container.syscall.duration", (("syscall.name", "getppid"),)) not in s
    assert ("container.cpu.run_queue.latency", ()) not in s
    assert ("container.syscall.errors", ()) not in s
    assert s[("container.syscalls", ())] >= 5_010


def test_pod_churn_keeps_state_bounded(receiver_factory, series):
    r = receiver_factory(profile="standard")
    true = "/bin/true"
    gone_ids = []
    for i in range(30):
        pod = PodCgroup().create()
        try:
            pod.spawn([true]).wait()
            gone_ids.append(pod.cgroup_id())
            if i % 3 == 0:
                assert series(r.collect(), pod)[("container.syscalls", ())] > 0
        finally:
            pod.destroy()
    r.collect()
    r.collect()
    in_map = set(r.programs.read_counters())
    assert not in_map & set(gone_ids)  # every removed pod's entry was deleted
    assert not set(r.paths._cache) & set(gone_ids)
    assert len(r.paths) <= len(in_map)
    assert not r._carry and not r._carry_sc
    # entries podmeter deleted are not mistaken for LRU evictions
    reg = r.settings.telemetry.telemetry.registry
    for name in ("counters", "syscalls"):
        assert not reg.get_sample_value("podmeter_ebpf_map_evictions_total", {"component": "ebpf", "map": name})
    assert not {"counters_map_full", "syscalls_map_full"} & set(r.settings.telemetry.failing())


COMPAT_PROGRAM = r"""
/* a 32-bit (ia32) program without libc: 1000 getpid (ia32 20), 500 failing read(-1) (ia32 3, close on x86_64) */
void _start(void)
{
	int ret;
	for (int i = 0; i < 1000; i++)
		__asm__ volatile("int $0x80" : "=a"(ret) : "a"(20) : "memory");
	for (int i = 0; i < 500; i++)
		__asm__ volatile("int $0x80" : "=a"(ret) : "a"(3), "b"(-1), "c"(0), "d"(0) : "memory");
	__asm__ volatile("int $0x80" : : "a"(1), "b"(0)); /* exit */
}
"""


@pytest.mark.parametrize("kind", ["tp_btf", "raw_tp"])
def test_32bit_syscalls_counted_but_not_named(receiver_factory, pod, series, tmp_path, kind):
    require(os.uname().machine == "x86_64", "ia32 syscalls exist on x86_64")
    clang = require_binary("clang")
    src, exe = tmp_path / "compat.c", tmp_path / "compat"
    src.write_text(COMPAT_PROGRAM)
    build = subprocess.run([clang, "-m32", "-nostdlib", "-static", "-fno-pic", "-O1", "-o", str(exe), str(src)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    r = receiver_factory(profile="minimal", tracked_syscalls=["close", "read", "writev"], attach_order=[kind])
    assert r.hooks.attached["sys_exit"] == kind
    proc = pod.spawn([str(exe)])
    require(proc.wait() == 0, "the kernel runs no 32-bit programs (CONFIG_IA32_EMULATION off)")
    s = series(r.collect(), pod)
    assert 1_500 <= s[("container.syscalls", ())] <= 1_600  # counted: the exec and the few before it add some
    assert 500 <= s[("container.syscall.errors", ())] <= 600
    # not named with x86_64's numbers: ia32 read (3) is not close, ia32 getpid (20) is not writev
    assert s.get(("container.syscall.failures", (("syscall.name", "close"),)), 0) == 0
    assert s.get(("container.syscall.calls", (("syscall.name", "close"),)), 0) < 10
    assert s.get(("container.syscall.calls", (("syscall.name", "writev"),)), 0) == 0


def test_histogram_count_is_its_buckets_sum_while_the_kernel_adds(receiver_factory, pod):
    # The maps are read while the programs update them: a histogram's count word, sum and slot are three atomic
    # adds, so a read between them saw count != sum(buckets) (about 1 collection in 150 under this load), an invalid
    # point. Ping-pong keeps both CPUs switching and in read/write while the receiver collects over and over.
    r = receiver_factory(profile="comprehensive", tracked_syscalls=["read", "write"])
    workload = os.path.join(os.path.dirname(__file__), "workload.py")
    procs = [pod.spawn([sys.executable, workload, "pingpong", "10000000"], stdout=subprocess.DEVNULL)
             for _ in range(2)]
    bad, seen = [], 0
    try:
        for _ in range(4000):
            for rm in r.collect().resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        if metric.name in ("container.cpu.run_queue.latency", "container.syscall.duration"):
                            for p in metric.data.data_points:
                                seen += 1
                                if sum(p.bucket_counts) != p.count:
                                    bad.append((metric.name, p.count, sum(p.bucket_counts)))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert seen > 4000 and not bad, (seen, bad[:5])


def test_a_cgroup_made_and_removed_between_two_collections_is_attributed(receiver_factory, workload, series):
    """An init container, a short Job: its cgroup is gone before the first collection that sees its counts, so its
    id can no longer be looked up. cgroup_rmdir leaves its path for the receiver: the counts are its pod's, in one
    last sample, and then every trace of it goes."""
    r = receiver_factory(profile="minimal")
    r.collect()
    pod = PodCgroup().create()
    try:
        workload(pod, "syscalls", 10_000, 0)
        cgid = pod.cgroup_id()
    finally:
        pod.destroy()
    unattributed = r._unattributed.labels()._value.get()
    last = series(r.collect(), pod)
    assert last[("container.syscalls", ())] >= 10_000
    assert r._unattributed.labels()._value.get() == unattributed
    assert series(r.collect(), pod) == {}
    assert cgid not in r.programs.read_counters() and cgid not in r.paths._cache
    assert r.programs.removed_path(cgid) is None  # deleted with the counters entry
