// SPDX-License-Identifier: GPL-2.0
/*
 * podmeter's eBPF receiver: kernel events counted per cgroup v2 id, read by userspace once per collection.
 *
 * Each logical hook has variants the loader tries in order (see programs.py HOOKS):
 *   fentry/fexit (BPF trampolines; refused on some kernels) -> tp_btf (typed tracepoints) -> raw_tp.
 * raw_tp variants only count; latency needs task storage, which needs the typed (tp_btf) pointers.
 * Every counter is attributed to a cgroup: the current task's for syscalls, switches and faults, the socket's for
 * TCP (retransmits run in softirq context), the woken task's for run-queue latency, the victim's for OOM kills.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "podmeter.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define MAX_ERRNO 4095
#define MSG_PEEK 2
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3

const volatile struct pm_cfg cfg = {};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 10240); /* max_cgroups, set by the loader */
	__type(key, __u64);
	__type(value, struct cg_counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 10240);
	__type(key, struct sc_key);
	__type(value, struct sc_counters);
} syscalls SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DIAG_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} diag SEC(".maps");

/* per-task timestamps, freed with the task */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} wakeup_ts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} sys_enter_ts SEC(".maps");

#define ADD(field, v) __sync_fetch_and_add(&(field), (v))

static __always_inline void diag_inc(__u32 slot)
{
	__u64 *v = bpf_map_lookup_elem(&diag, &slot);
	if (v)
		ADD(*v, 1);
}

static __always_inline struct cg_counters *counters_of(__u64 cgid)
{
	struct cg_counters *c = bpf_map_lookup_elem(&counters, &cgid);
	if (c)
		return c;
	struct cg_counters zero = {};
	long err = bpf_map_update_elem(&counters, &cgid, &zero, BPF_NOEXIST);
	/* Counting additions lets userspace tell evictions apart (an LRU map evicts silently, and an entry added and
	 * evicted between two collections leaves no other trace) */
	if (!err)
		diag_inc(DIAG_COUNTERS_NEW);
	else if (err != -17 /* EEXIST: another CPU won the race */)
		diag_inc(DIAG_COUNTERS_FULL);
	return bpf_map_lookup_elem(&counters, &cgid);
}

static __always_inline __u32 lat_slot(__u64 ns)
{
	__u64 us = ns / 1000;
	__u32 r = 0;
	if (!us)
		return 0;
	if (us >> 32) { us >>= 32; r += 32; }
	if (us >> 16) { us >>= 16; r += 16; }
	if (us >> 8) { us >>= 8; r += 8; }
	if (us >> 4) { us >>= 4; r += 4; }
	if (us >> 2) { us >>= 2; r += 2; }
	if (us >> 1) { r += 1; }
	r += 1;
	return r < LAT_SLOTS ? r : LAT_SLOTS - 1;
}

/* cgroup v2 id of a task other than current */
static __always_inline __u64 task_cgid(struct task_struct *t)
{
	return BPF_CORE_READ(t, cgroups, dfl_cgrp, kn, id);
}

struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

static __always_inline long task_state(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return BPF_CORE_READ(t, __state);
	return BPF_CORE_READ((struct task_struct___pre514 *)t, state);
}

struct sock_cgroup_data___pre515 {
	__u64 val;
} __attribute__((preserve_access_index));

/* the cgroup the socket was created in (kept across accept: children copy the listener's) */
static __always_inline __u64 sock_cgid(const struct sock *sk)
{
	if (bpf_core_field_exists(sk->sk_cgrp_data.cgroup))
		return BPF_CORE_READ(sk, sk_cgrp_data.cgroup, kn, id);
	struct sock_cgroup_data___pre515 *d = (void *)&sk->sk_cgrp_data;
	__u64 v = BPF_CORE_READ(d, val);
	if (v & 1)
		return 0;
	return BPF_CORE_READ((struct cgroup *)v, kn, id);
}

static __always_inline bool sock_is_tcp(const struct sock *sk)
{
	__u16 fam = BPF_CORE_READ(sk, __sk_common.skc_family);
	__u16 proto = BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol);
	return (fam == AF_INET || fam == AF_INET6) && proto == IPPROTO_TCP;
}

static __always_inline __u32 skb_pcount(const struct sk_buff *skb)
{
	unsigned char *head = BPF_CORE_READ(skb, head);
	__u32 end = BPF_CORE_READ(skb, end);
	struct skb_shared_info *shinfo = (void *)(head + end);
	__u16 segs = BPF_CORE_READ(shinfo, gso_segs);
	return segs ? segs : 1;
}

/* ---- scheduler ---------------------------------------------------------------------------------------- */

static __always_inline void mark_runnable(struct task_struct *p)
{
	__u64 *ts = bpf_task_storage_get(&wakeup_ts, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (ts)
		*ts = bpf_ktime_get_ns();
	else
		diag_inc(DIAG_STORAGE_FAIL);
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(wakeup_btf, struct task_struct *p)
{
	if (cfg.runq_latency)
		mark_runnable(p);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(wakeup_new_btf, struct task_struct *p)
{
	if (cfg.runq_latency)
		mark_runnable(p);
	return 0;
}

static __always_inline bool count_switch(bool preempt, struct task_struct *prev)
{
	/* current == prev here; pid 0 is the idle task */
	if (!BPF_CORE_READ(prev, pid))
		return false;
	bool invol = preempt || task_state(prev) == 0 /* TASK_RUNNING: still runnable */;
	if (cfg.switches) {
		struct cg_counters *c = counters_of(bpf_get_current_cgroup_id());
		if (c) {
			if (invol)
				ADD(c->switches_involuntary, 1);
			else
				ADD(c->switches_voluntary, 1);
		}
	}
	return invol;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(switch_btf, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	bool invol = count_switch(preempt, prev);
	if (!cfg.runq_latency)
		return 0;
	if (invol && prev->pid) /* preempted: back on the run queue now */
		mark_runnable(prev);
	if (!next->pid)
		return 0;
	__u64 *ts = bpf_task_storage_get(&wakeup_ts, next, 0, 0);
	if (!ts || !*ts)
		return 0;
	__u64 delta = bpf_ktime_get_ns() - *ts;
	*ts = 0;
	struct cg_counters *c = counters_of(task_cgid(next));
	if (c) {
		ADD(c->runq_count, 1);
		ADD(c->runq_sum_ns, delta);
		ADD(c->runq_slots[lat_slot(delta)], 1);
	}
	return 0;
}

SEC("raw_tp/sched_switch")
int BPF_PROG(switch_raw, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	count_switch(preempt, prev);
	return 0;
}

/* ---- syscalls ----------------------------------------------------------------------------------------- */

static __always_inline bool watched(long nr)
{
	return nr >= 0 && nr < WATCH_MAX && cfg.watch[nr & (WATCH_MAX - 1)];
}

#if defined(__TARGET_ARCH_arm64)
#define SYSCALL_NR(regs) BPF_CORE_READ(regs, syscallno)
#define SYSCALL_NR_TYPED(regs) ((regs)->syscallno)
#else
#define SYSCALL_NR(regs) BPF_CORE_READ(regs, orig_ax)
#define SYSCALL_NR_TYPED(regs) ((regs)->orig_ax)
#endif

#if defined(__TARGET_ARCH_x86)
#define TS_COMPAT 0x0002 /* thread_info.status: a 32-bit (ia32) syscall is running, cleared on return to user */
/* A 32-bit task's syscall numbers are the ia32 table's (3 is read there, close in x86_64's): such calls are counted
 * but not named. */
static __always_inline bool compat_syscall(bool typed)
{
	if (typed)
		return bpf_get_current_task_btf()->thread_info.status & TS_COMPAT;
	struct task_struct *t = (void *)bpf_get_current_task();
	return BPF_CORE_READ(t, thread_info.status) & TS_COMPAT;
}
#else
static __always_inline bool compat_syscall(bool typed)
{
	return false;
}
#endif

SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter_btf, struct pt_regs *regs, long id)
{
	if (!cfg.syscall_latency || !watched(id) || compat_syscall(true))
		return 0;
	__u64 *ts = bpf_task_storage_get(&sys_enter_ts, bpf_get_current_task_btf(), 0,
					 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (ts)
		*ts = bpf_ktime_get_ns();
	else
		diag_inc(DIAG_STORAGE_FAIL);
	return 0;
}

static __always_inline void count_sys_exit(long nr, long ret, bool typed)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	bool failed = ret < 0 && ret >= -MAX_ERRNO;
	struct cg_counters *c = counters_of(cgid);
	if (c) {
		ADD(c->syscalls, 1);
		if (failed)
			ADD(c->syscall_errors, 1);
	}
	if (!cfg.breakdown || !watched(nr) || compat_syscall(typed))
		return;
	__u64 delta = 0;
	if (typed && cfg.syscall_latency) {
		__u64 *ts = bpf_task_storage_get(&sys_enter_ts, bpf_get_current_task_btf(), 0, 0);
		if (ts && *ts) {
			delta = bpf_ktime_get_ns() - *ts;
			*ts = 0;
		}
	}
	struct sc_key key = {.cgid = cgid, .nr = nr};
	struct sc_counters *s = bpf_map_lookup_elem(&syscalls, &key);
	if (!s) {
		struct sc_counters zero = {};
		long err = bpf_map_update_elem(&syscalls, &key, &zero, BPF_NOEXIST);
		if (!err)
			diag_inc(DIAG_SYSCALLS_NEW);
		else if (err != -17)
			diag_inc(DIAG_SYSCALLS_FULL);
		s = bpf_map_lookup_elem(&syscalls, &key);
		if (!s)
			return;
	}
	ADD(s->calls, 1);
	if (failed)
		ADD(s->errors, 1);
	if (delta) {
		ADD(s->lat_count, 1);
		ADD(s->lat_sum_ns, delta);
		ADD(s->lat_slots[lat_slot(delta)], 1);
	}
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit_btf, struct pt_regs *regs, long ret)
{
	count_sys_exit(cfg.breakdown ? SYSCALL_NR_TYPED(regs) : -1, ret, true);
	return 0;
}

SEC("raw_tp/sys_exit")
int BPF_PROG(sys_exit_raw, struct pt_regs *regs, long ret)
{
	count_sys_exit(cfg.breakdown ? SYSCALL_NR(regs) : -1, ret, false);
	return 0;
}

/* ---- TCP ---------------------------------------------------------------------------------------------- */

static __always_inline void count_retransmit(const struct sock *sk, const struct sk_buff *skb)
{
	struct cg_counters *c = counters_of(sock_cgid(sk));
	if (c)
		ADD(c->tcp_retrans_segs, skb_pcount(skb)); /* segments, like /proc/net/snmp RetransSegs */
}

/* per socket: tcp_sock.total_retrans at the last retransmit event, freed with the socket */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} retrans_seen SEC(".maps");

/* The segments the kernel added to RetransSegs (and to the socket's total_retrans, together) since the socket's
 * last event. Reading the skb's gso_segs once it has been sent instead races with the stack, which may have
 * changed the shared skb_shared_info by then (seen undercounting by a few %); failed sends (local qdisc drops),
 * which RetransSegs counts and kernels before 6.12 fire no event for, are picked up at the next event. */
SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(retrans_btf, struct sock *sk, const struct sk_buff *skb)
{
	__u32 *seen = bpf_sk_storage_get(&retrans_seen, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!seen) {
		diag_inc(DIAG_STORAGE_FAIL);
		count_retransmit(sk, skb);
		return 0;
	}
	__u32 total = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans);
	if (!*seen) {
		/* The socket's first event since the programs were loaded (total_retrans already counts this event's
		 * segments, so it is never 0 here). What it counted before is from before podmeter started: counted as a
		 * delta, every long-lived connection's lifetime of retransmits landed in one collection at each restart. */
		*seen = total;
		count_retransmit(sk, skb);
		return 0;
	}
	__u32 delta = total - *seen; /* u32 arithmetic: right across wrap-around */
	*seen = total;
	struct cg_counters *c = delta ? counters_of(sock_cgid(sk)) : 0;
	if (c)
		ADD(c->tcp_retrans_segs, delta);
	return 0;
}

SEC("raw_tp/tcp_retransmit_skb")
int BPF_PROG(retrans_raw, const struct sock *sk, const struct sk_buff *skb)
{
	count_retransmit(sk, skb);
	return 0;
}

static __always_inline void count_bytes(const struct sock *sk, int bytes, bool tx)
{
	if (bytes <= 0)
		return;
	struct cg_counters *c = counters_of(sock_cgid(sk));
	if (!c)
		return;
	if (tx)
		ADD(c->tcp_tx_bytes, bytes);
	else
		ADD(c->tcp_rx_bytes, bytes);
}

/* fentry variants: only TCP reaches these functions */
SEC("fexit/tcp_sendmsg")
int BPF_PROG(send_fexit, struct sock *sk, struct msghdr *msg, size_t size, int ret)
{
	count_bytes(sk, ret, true);
	return 0;
}

SEC("fentry/tcp_cleanup_rbuf")
int BPF_PROG(recv_fentry, struct sock *sk, int copied)
{
	count_bytes(sk, copied, false);
	return 0;
}

/* sock:sock_{send,recv}_length fire for every socket family: keep TCP */
SEC("tp_btf/sock_send_length")
int BPF_PROG(send_btf, struct sock *sk, int ret, int flags)
{
	if (ret > 0 && sock_is_tcp(sk))
		count_bytes(sk, ret, true);
	return 0;
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(recv_btf, struct sock *sk, int ret, int flags)
{
	if (ret > 0 && !(flags & MSG_PEEK) && sock_is_tcp(sk))
		count_bytes(sk, ret, false);
	return 0;
}

SEC("raw_tp/sock_send_length")
int BPF_PROG(send_raw, struct sock *sk, int ret, int flags)
{
	if (ret > 0 && sock_is_tcp(sk))
		count_bytes(sk, ret, true);
	return 0;
}

SEC("raw_tp/sock_recv_length")
int BPF_PROG(recv_raw, struct sock *sk, int ret, int flags)
{
	if (ret > 0 && !(flags & MSG_PEEK) && sock_is_tcp(sk))
		count_bytes(sk, ret, false);
	return 0;
}

static __always_inline void count_state(const struct sock *sk, int oldstate, int newstate)
{
	bool out = newstate == TCP_SYN_SENT;                               /* connect() */
	bool in = oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED; /* accepted */
	if (!(out || in) || BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol) != IPPROTO_TCP)
		return;
	struct cg_counters *c = counters_of(sock_cgid(sk));
	if (!c)
		return;
	if (out)
		ADD(c->tcp_conn_outbound, 1);
	else
		ADD(c->tcp_conn_inbound, 1);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(state_btf, struct sock *sk, int oldstate, int newstate)
{
	count_state(sk, oldstate, newstate);
	/* A retransmit whose send failed (a full local qdisc) adds to total_retrans without an event; one after the
	 * socket's last event would never be counted: the socket's state changes (FIN, close) take them in. */
	__u32 *seen = newstate != TCP_ESTABLISHED ? bpf_sk_storage_get(&retrans_seen, sk, 0, 0) : 0;
	if (seen && *seen) {
		__u32 total = BPF_CORE_READ((struct tcp_sock *)sk, total_retrans);
		__u32 delta = total - *seen;
		*seen = total;
		struct cg_counters *c = delta ? counters_of(sock_cgid(sk)) : 0;
		if (c)
			ADD(c->tcp_retrans_segs, delta);
	}
	return 0;
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(state_raw, const struct sock *sk, int oldstate, int newstate)
{
	count_state(sk, oldstate, newstate);
	return 0;
}

/* ---- OOM kills: attributed to the victim's cgroup ------------------------------------------------------ */

static __always_inline void count_oom(struct task_struct *task)
{
	struct cg_counters *c = counters_of(task_cgid(task));
	if (c)
		ADD(c->oom_kills, 1);
}

SEC("tp_btf/mark_victim")
int BPF_PROG(oom_btf, struct task_struct *task)
{
	count_oom(task);
	return 0;
}

SEC("raw_tp/mark_victim")
int BPF_PROG(oom_raw, struct task_struct *task)
{
	count_oom(task);
	return 0;
}

/* ---- major page faults: software perf event, sample_period 1, one per CPU ----------------------------- */

SEC("perf_event")
int major_fault(struct bpf_perf_event_data *ctx)
{
	struct cg_counters *c = counters_of(bpf_get_current_cgroup_id());
	if (c)
		ADD(c->major_faults, 1);
	return 0;
}

/* ---- cgroup removal: mark the entry so userspace emits a last sample and deletes it ------------------- */

/* The path of each removed cgroup that has counts, for userspace to attribute a cgroup made and removed between two
 * collections (an init container, a short Job): by then it cannot be looked up by its id. Entries go with the
 * cgroup's counters entry; the LRU bounds them if more cgroups go in one interval than it holds. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct removed_path);
} removed_paths SEC(".maps");

/* the path is read here first: a struct removed_path is too big for the BPF stack */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct removed_path);
} path_scratch SEC(".maps");

static __always_inline void mark_removed(struct cgroup *cgrp, const char *path)
{
	if (BPF_CORE_READ(cgrp, root, hierarchy_id) != 0) /* cgroup v2 only (the default hierarchy) */
		return;
	__u64 id = BPF_CORE_READ(cgrp, kn, id);
	struct cg_counters *c = bpf_map_lookup_elem(&counters, &id);
	if (!c)
		return;
	c->removed_ns = bpf_ktime_get_ns();
	__u32 zero = 0;
	struct removed_path *p = bpf_map_lookup_elem(&path_scratch, &zero);
	if (p && bpf_probe_read_kernel_str(p->path, sizeof(p->path), path) > 0)
		bpf_map_update_elem(&removed_paths, &id, p, BPF_ANY);
}

SEC("tp_btf/cgroup_rmdir")
int BPF_PROG(rmdir_btf, struct cgroup *cgrp, const char *path)
{
	mark_removed(cgrp, path);
	return 0;
}

SEC("raw_tp/cgroup_rmdir")
int BPF_PROG(rmdir_raw, struct cgroup *cgrp, const char *path)
{
	mark_removed(cgrp, path);
	return 0;
}
