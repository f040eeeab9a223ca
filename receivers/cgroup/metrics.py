"""The metrics of the cgroup receiver: the same set per container (`container.*`) and per pod (`k8s.pod.*`).

Names follow the OTel semantic conventions where they exist (`container.cpu.time` with `cpu.mode`,
`container.memory.working_set`, `k8s.pod.network.io`...), the collector's docker_stats receiver where it has one
(`container.cpu.throttling_data.*`, `container.pids.*`), and the same style otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from podmeter.metrics import MetricSpec


@dataclass(frozen=True)
class Kind:
    suffix: str
    instrument: str
    unit: str
    description: str
    attributes: tuple[str, ...] = ()
    group: str = "cpu"
    pod_only: bool = False
    enabled: bool = True  # on by default


KINDS = (
    Kind("cpu.time", "sum", "s", "CPU time consumed, by mode (user, system); the modes add up to the total",
         ("cpu.mode",)),
    Kind("cpu.usage", "gauge", "{cpu}", "CPUs used on average since the previous collection (1 = one full core); "
                                        "from the second collection on"),
    Kind("cpu.percent", "gauge", "%", "CPU usage in percent of one core since the previous collection, as Alumet's "
                                      "cpu_percent (200 = two full cores); from the second collection on; "
                                      "cpu.usage times 100", enabled=False),
    Kind("cpu.throttling_data.periods", "sum", "{period}", "CFS enforcement periods elapsed; the three throttling "
                                                           "metrics only for a cgroup with a CPU limit (a quota)"),
    Kind("cpu.throttling_data.throttled_periods", "sum", "{period}", "CFS periods in which the cgroup was throttled"),
    Kind("cpu.throttling_data.throttled_time", "sum", "s", "Time the cgroup was throttled by its CPU limit"),
    Kind("cpu.limit", "gauge", "{cpu}", "CPU limit in CPUs, the CFS quota over its period (cpu.max / "
                                        "cpu.cfs_quota_us and cpu.cfs_period_us), as the runtime applied it; absent "
                                        "when there is none"),
    Kind("memory.usage", "gauge", "By", "Memory in use, page cache included (memory.current / memory.usage_in_bytes)",
         group="memory"),
    Kind("memory.working_set", "gauge", "By", "Usage minus inactive file cache, floored at 0, as cAdvisor's "
                                              "container_memory_working_set_bytes (what the kubelet evicts on)",
         group="memory"),
    Kind("memory.rss", "gauge", "By", "Anonymous memory (v2 anon, v1 total_rss)", group="memory"),
    Kind("memory.cache", "gauge", "By", "File-backed memory, the page cache (v2 file, v1 total_cache)",
         group="memory"),
    Kind("memory.kernel_stack", "gauge", "By", "Kernel stacks of the cgroup's tasks (cgroup v2 only)",
         group="memory"),
    Kind("memory.page_tables", "gauge", "By", "Page tables (cgroup v2 only)", group="memory"),
    Kind("memory.swap", "gauge", "By", "Swap in use (v2 memory.swap.current, v1 total_swap with swap accounting)",
         group="memory"),
    Kind("memory.limit", "gauge", "By", "Memory limit; absent when there is none", group="memory"),
    Kind("memory.oom.events", "sum", "{event}", "Times the memory limit was hit and the OOM killer invoked "
                                                "(cgroup v2 memory.events oom)", group="memory"),
    Kind("memory.oom.kills", "sum", "{process}", "Processes killed by the OOM killer in the cgroup", group="memory"),
    Kind("memory.paging.faults", "sum", "{fault}", "Page faults by type (major: needed IO; minor)",
         ("system.paging.fault.type",), group="memory"),
    Kind("disk.io", "sum", "By", "Block IO bytes by direction and device (device name from sysfs, else major:minor)",
         ("disk.io.direction", "system.device"), group="io"),
    Kind("disk.operations", "sum", "{operation}", "Block IO operations by direction and device",
         ("disk.io.direction", "system.device"), group="io"),
    Kind("pids.count", "gauge", "{task}", "Tasks (processes and threads) in the cgroup", group="pids"),
    Kind("pids.limit", "gauge", "{task}", "Task limit; absent when there is none", group="pids"),
    Kind("pressure.stall_time", "sum", "s", "Time tasks were stalled on a resource (PSI): `some` = at least one "
                                            "task, `full` = all non-idle tasks at once",
         ("pressure.resource", "pressure.type"), group="pressure"),
    Kind("network.io", "sum", "By", "Bytes received and transmitted per interface of the pod's network namespace",
         ("network.interface.name", "network.io.direction"), group="network", pod_only=True),
    Kind("network.packet.count", "sum", "{packet}", "Packets received and transmitted per interface",
         ("network.interface.name", "network.io.direction"), group="network", pod_only=True),
    Kind("network.errors", "sum", "{error}", "Receive and transmit errors per interface",
         ("network.interface.name", "network.io.direction"), group="network", pod_only=True),
    Kind("network.packet.dropped", "sum", "{packet}", "Packets dropped on receive and transmit per interface",
         ("network.interface.name", "network.io.direction"), group="network", pod_only=True),
)

CONTAINER_METRICS = {k.suffix: MetricSpec(f"container.{k.suffix}", k.instrument, k.unit, k.description,
                                          k.attributes, k.enabled) for k in KINDS if not k.pod_only}
POD_METRICS = {k.suffix: MetricSpec(f"k8s.pod.{k.suffix}", k.instrument, k.unit, k.description, k.attributes,
                                    k.enabled) for k in KINDS}
METRICS: tuple[MetricSpec, ...] = (*CONTAINER_METRICS.values(), *POD_METRICS.values())
METRICS_BY_NAME = {m.name: m for m in METRICS}
GROUP_OF = {**{f"container.{k.suffix}": k.group for k in KINDS}, **{f"k8s.pod.{k.suffix}": k.group for k in KINDS}}

RESOURCE_ATTRIBUTES = ("k8s.pod.uid", "container.id", "container.runtime.name", "k8s.pod.qos_class")
