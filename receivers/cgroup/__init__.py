"""The cgroup receiver: per-pod and per-container CPU, memory, IO, PIDs, pressure and network from cgroup files,
on cgroup v1, v2 and hybrid hosts, with kubelet's cgroupfs and systemd drivers and every common runtime."""

from podmeter.component import Factory, Stability

from .config import CgroupReceiverConfig
from .metrics import METRICS, RESOURCE_ATTRIBUTES
from .receiver import CgroupReceiver

factory = Factory(
    kind="receiver",
    type="cgroup",
    config_model=CgroupReceiverConfig,
    create=CgroupReceiver,
    stability=Stability.ALPHA,
    metrics=METRICS,
    description="Per pod and per container CPU, memory, IO, PIDs, pressure and network from the node's cgroups",
    resource_attributes=RESOURCE_ATTRIBUTES,
)

__all__ = ["factory", "CgroupReceiver", "CgroupReceiverConfig"]
