"""ebpf receiver: per-pod kernel events (context switches, run-queue latency, syscalls, TCP, OOM kills, major
faults) counted by CO-RE BPF programs per cgroup and read once per collection."""

from podmeter.component import Factory, Stability

from .config import EbpfConfig
from .metrics import METRICS
from .receiver import EbpfReceiver

factory = Factory(
    kind="receiver",
    type="ebpf",
    config_model=EbpfConfig,
    create=EbpfReceiver,
    stability=Stability.ALPHA,
    metrics=METRICS,
    description="Per-pod kernel events from CO-RE eBPF programs (loaded through libbpf.so.1), counted per cgroup",
    resource_attributes=("k8s.pod.uid", "container.id", "container.runtime.name", "k8s.pod.qos_class", "cgroup.path"),
)

__all__ = ["factory", "EbpfReceiver", "EbpfConfig"]
