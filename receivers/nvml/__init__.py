"""nvml receiver: per-GPU, per-MIG-device and per-process GPU metrics through NVML, processes attributed to pods."""

from podmeter.component import Factory, Stability

from .config import NvmlConfig
from .metrics import METRICS, RESOURCE_ATTRIBUTES
from .receiver import NvmlReceiver

factory = Factory(
    kind="receiver",
    type="nvml",
    config_model=NvmlConfig,
    create=NvmlReceiver,
    stability=Stability.ALPHA,
    metrics=METRICS,
    description="NVIDIA GPUs through NVML: device, MIG and per-process metrics; processes attributed to pods",
    resource_attributes=RESOURCE_ATTRIBUTES,
)

__all__ = ["factory", "NvmlConfig", "NvmlReceiver"]
