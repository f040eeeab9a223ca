"""What the ebpf receiver emits. Names follow OTel style under `container.*` (each point's resource is a
container, or a pod for processes in the pod-level cgroup); attribute names reuse semantic-convention ones where
they exist (`network.io.direction`, `process.context_switch.type`)."""

from podmeter.metrics import MetricSpec

# unit as semconv's process.context_switches (model/process/metrics.yaml)
CONTEXT_SWITCHES = MetricSpec(
    "container.context_switches", "sum", "{context_switch}",
    "Context switches of the container's tasks; involuntary = preempted while still runnable",
    attributes=("process.context_switch.type",))
RUNQUEUE_LATENCY = MetricSpec(
    "container.cpu.run_queue.latency", "histogram", "s",
    "Time the container's tasks waited runnable on a run queue before getting a CPU (wakeup or preemption to "
    "running)")
SYSCALLS = MetricSpec("container.syscalls", "sum", "{syscall}", "System calls made by the container's tasks")
SYSCALL_ERRORS = MetricSpec("container.syscall.errors", "sum", "{syscall}",
                            "System calls that returned an error (-4095..-1)")
SYSCALL_CALLS = MetricSpec("container.syscall.calls", "sum", "{syscall}",
                           "Calls of each syscall in tracked_syscalls", attributes=("syscall.name",))
SYSCALL_FAILURES = MetricSpec("container.syscall.failures", "sum", "{syscall}",
                              "Failed calls of each syscall in tracked_syscalls", attributes=("syscall.name",))
SYSCALL_DURATION = MetricSpec("container.syscall.duration", "histogram", "s",
                              "Duration of each syscall in tracked_syscalls (profile comprehensive or "
                              "programs.syscall_latency)", attributes=("syscall.name",))
TCP_IO = MetricSpec("container.tcp.io", "sum", "By",
                    "TCP payload bytes sent and received by the container's sockets",
                    attributes=("network.io.direction",))
TCP_RETRANSMITS = MetricSpec("container.tcp.retransmits", "sum", "{segment}",
                             "TCP segments retransmitted by the container's sockets")
TCP_CONNECTIONS = MetricSpec("container.tcp.connections", "sum", "{connection}",
                             "TCP connections opened: outbound (connect) and inbound (accepted)",
                             attributes=("network.connection.direction",))
# The same count as the cgroup receiver's container.memory.oom.kills (memory.events oom_kill: kills by any OOM
# killer), so the same name and unit, and off by default: both on in one pipeline would be two sources of one series
# (the prometheus exporter keeps one). For nodes where the cgroup receiver does not run.
OOM_KILLS = MetricSpec("container.memory.oom.kills", "sum", "{process}",
                       "Processes of the container killed by the OOM killer (any memory cgroup's limit or the "
                       "node's); the cgroup receiver's metric, counted from the kernel event instead", enabled=False)
MAJOR_FAULTS = MetricSpec("container.memory.major_page_faults", "sum", "{fault}",
                          "Major page faults (a page read from disk) of the container's tasks")

METRICS = (CONTEXT_SWITCHES, RUNQUEUE_LATENCY, SYSCALLS, SYSCALL_ERRORS, SYSCALL_CALLS, SYSCALL_FAILURES,
           SYSCALL_DURATION, TCP_IO, TCP_RETRANSMITS, TCP_CONNECTIONS, OOM_KILLS, MAJOR_FAULTS)
METRIC_NAMES = frozenset(m.name for m in METRICS)
