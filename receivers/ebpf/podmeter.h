/* Layouts shared by podmeter.bpf.c and the Python reader (receivers/ebpf/programs.py decodes them by field
 * order). Every value field is a __u64 so Python reads a value as N native "Q"s. Change both together. */
#ifndef PODMETER_EBPF_H
#define PODMETER_EBPF_H

/* log2 latency slots: slot 0 < 1 us, slot k (k >= 1) holds [2^(k-1), 2^k) us; the last slot is open-ended */
#define LAT_SLOTS 27
#define WATCH_MAX 512 /* syscall numbers below this can be tracked by name */

/* `counters` map value, key = cgroup v2 id (the cgroup directory's inode) */
struct cg_counters {
	__u64 switches_voluntary;
	__u64 switches_involuntary;
	__u64 syscalls;
	__u64 syscall_errors;
	__u64 tcp_tx_bytes;
	__u64 tcp_rx_bytes;
	__u64 tcp_retrans_segs;
	__u64 tcp_conn_outbound;
	__u64 tcp_conn_inbound;
	__u64 oom_kills;
	__u64 major_faults;
	__u64 removed_ns;   /* cgroup_rmdir seen: userspace emits a last sample, then deletes the entry */
	__u64 runq_count;
	__u64 runq_sum_ns;
	__u64 runq_slots[LAT_SLOTS];
};

/* `syscalls` map (per cgroup and tracked syscall) */
struct sc_key {
	__u64 cgid;
	__u32 nr;
	__u32 pad;
};

struct sc_counters {
	__u64 calls;
	__u64 errors;
	__u64 lat_count;
	__u64 lat_sum_ns;
	__u64 lat_slots[LAT_SLOTS];
};

/* the cgroup_rmdir tracepoint's path (relative to the cgroup2 root), NUL-terminated; longer ones are cut and not
 * attributed */
#define REMOVED_PATH_LEN 256
struct removed_path {
	char path[REMOVED_PATH_LEN];
};

/* `diag` array map slots */
enum diag_slot {
	DIAG_COUNTERS_FULL = 0, /* counters map update failed */
	DIAG_SYSCALLS_FULL = 1, /* syscalls map update failed */
	DIAG_STORAGE_FAIL = 2,  /* task storage allocation failed */
	DIAG_COUNTERS_NEW = 3,  /* entries added to counters: with the entries read and those deleted, gives the evicted */
	DIAG_SYSCALLS_NEW = 4,  /* entries added to syscalls */
	DIAG_SLOTS = 8,
};

/* .rodata, written by the loader before load; disabled branches are removed by the verifier */
struct pm_cfg {
	__u8 switches;
	__u8 runq_latency;
	__u8 syscalls;
	__u8 syscall_latency;
	__u8 breakdown;
	__u8 pad[3];
	__u8 watch[WATCH_MAX]; /* 1 = count this syscall number by name */
};

#endif
