from __future__ import annotations

from pydantic import Field, field_validator

from podmeter.config import Duration, ScraperConfig


class NvmlConfig(ScraperConfig):
    library_path: str = Field(
        "", description="Absolute path of libnvidia-ml.so.1 for drivers installed off the standard library path "
                        "(e.g. /run/nvidia/driver/usr/lib64/libnvidia-ml.so.1); empty: the dynamic loader finds it")
    proc_root: str = Field(
        "/proc", description="Where the host's /proc is visible. Per-process metrics need hostPID: true with current "
                             "drivers (they list only the processes of the caller's PID namespace); with older "
                             "drivers, which report host PIDs to every caller, mounting the host /proc here also works")
    per_process: bool = Field(True, description="Collect per-process GPU memory and utilization, attributed to pods "
                                                "(process.gpu.*: series per PID, new with every process)")
    per_container: bool = Field(
        False, description="Collect GPU memory and utilization per container and GPU or MIG device, its processes "
                           "summed (container.gpu.*): series that stay the same while PIDs come and go. With "
                           "per_process: false, a GPU node's series no longer change with process churn. On in the "
                           "shipped DaemonSet configuration, whose dashboard uses it")
    discovery_interval: Duration = Field(
        60.0, gt=0, description="How often to re-enumerate GPUs and MIG devices (their static info is cached)")
    energy: bool = Field(
        True, description="Collect the energy counter (hw.energy). On an H200 with driver 580 each read cost the driver "
                          "about 3 ms of CPU per GPU and collection, a third of the receiver's cost with 32 processes on "
                          "the GPU; hw.power costs microseconds")
    ecc: bool = Field(True, description="Collect volatile ECC error counts (hw.errors)")
    interconnect: bool = Field(True, description="Collect PCIe and NVLink byte counters (hw.gpu.io, hw.gpu.nvlink.io)")
    health: bool = Field(
        True, description="Collect GPU health signals: XID errors (hw.gpu.xid.errors, from NVML events drained at each "
                          "collection), remapped memory rows and remap state (hw.gpu.memory.remapped_rows, "
                          "hw.gpu.memory.remap.*), PCIe replays (hw.gpu.pcie.replays)")
    gpm: bool = Field(
        False, description="Collect GPU performance metrics through NVML's GPM (Hopper and newer GPUs, driver R525+): "
                           "SM activity and occupancy, tensor and FP pipe activity, memory bandwidth, per GPU and per "
                           "MIG GPU instance (hw.gpu.engine.utilization, hw.gpu.sm.*, hw.gpu.pipe.utilization, "
                           "hw.gpu.memory.bandwidth.utilization). Off by default: its cost on a real driver is not "
                           "measured yet (python -m bench.real_gpu measures it)")

    @field_validator("library_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError("library_path must be absolute, like /usr/lib64/libnvidia-ml.so.1")
        return value
