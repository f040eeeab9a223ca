"""Configuration of the cgroup receiver."""

from __future__ import annotations

from pydantic import Field, field_validator

from podmeter.config import ComponentConfig, Duration, ScraperConfig


class MetricGroups(ComponentConfig):
    """Switches per group of metrics: a group that is off is not read at all (its files are never opened)."""

    cpu: bool = Field(True, description="CPU time by mode, CPU usage (and percent), CFS throttling under a CPU "
                                        "limit")
    memory: bool = Field(True, description="Memory usage, working set, RSS, cache, kernel stack, page tables, "
                                           "swap, limit, OOM events and kills, page faults")
    io: bool = Field(True, description="Block IO bytes and operations per device")
    pids: bool = Field(True, description="Tasks in the cgroup and the pids limit")
    pressure: bool = Field(True, description="Pressure stall (PSI) time for cpu, memory and io; needs cgroup2 "
                                             "(pure v2, or the hybrid layout's unified tree)")
    network: bool = Field(True, description="Per pod network counters per interface from /proc/<pid>/net/dev of "
                                            "one of the pod's processes: one extra read per pod (the process is "
                                            "found once and kept); pods on the host network are skipped")


class MetricToggle(ComponentConfig):
    enabled: bool = Field(True, description="Emit this metric")


class CgroupReceiverConfig(ScraperConfig):
    cgroup_root: str = Field("/sys/fs/cgroup", description="Where the host's cgroup hierarchies are mounted "
                                                           "(/host/sys/fs/cgroup in the DaemonSet)")
    proc_root: str = Field("/proc", description="The host's procfs, for per pod network counters "
                                                "(/host/proc in the DaemonSet, with hostPID or the host's /proc "
                                                "mounted)")
    per_container: bool = Field(True, description="Emit container.* metrics for each container cgroup")
    per_pod: bool = Field(True, description="Emit k8s.pod.* metrics for each pod cgroup")
    groups: MetricGroups = Field(default_factory=MetricGroups,
                                 description="Metric groups to read: cpu, memory, io, pids, pressure, network")
    metrics: dict[str, MetricToggle] = Field(
        default_factory=dict,
        description="Per metric switches as the collector's `metrics: {<name>: {enabled: false}}`")
    max_depth: int = Field(8, ge=1, le=32, description="How deep below each hierarchy's root kubelet's kubepods "
                                                       "tree may be: 1 is directly below it, as kubelet makes it; "
                                                       "kind's nodes, seen from the host, put it at 4")
    discovery_interval: Duration = Field(60.0, gt=0, description="How often to search the hierarchy again for "
                                                                 "kubepods trees; pods and containers below the "
                                                                 "trees found are listed on every collection")
    exclude_interfaces: list[str] = Field(["lo"], description="Network interfaces not reported")
    max_open_files: int = Field(16384, ge=0, description="Cgroup files kept open between collections and "
                                                        "re-read in place (a fifth of the cost of opening "
                                                        "them again); at most half the soft RLIMIT_NOFILE, "
                                                        "which is raised towards the hard limit at start as "
                                                        "far as needed, and shared by all cgroup receivers of "
                                                        "the process; files beyond it are opened, read and "
                                                        "closed on every collection; 0 keeps none")
    limits_every: int = Field(6, ge=1, le=1000, description="Read limits (memory.limit_in_bytes or memory.max, "
                                                            "pids.max, the CPU quota) when a cgroup is first "
                                                            "seen and then "
                                                            "on every Nth collection: a changed limit shows "
                                                            "within N collections; 1 reads them every time")

    @field_validator("cgroup_root", "proc_root")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value.rstrip("/") or "/"

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: dict[str, MetricToggle]) -> dict[str, MetricToggle]:
        from receivers.cgroup.metrics import METRICS_BY_NAME

        unknown = sorted(set(value) - set(METRICS_BY_NAME))
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; see the receiver's README for the names")
        return value
