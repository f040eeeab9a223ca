"""What the nvml receiver emits. OTel `hw.*` semantic-convention names where one exists; ours in the same style."""

from __future__ import annotations

from podmeter.metrics import MetricSpec

S = MetricSpec

# Device (GPU or MIG device) metrics; resource: hw.id, hw.type, hw.name, hw.model, hw.vendor, ...
GPU_UTILIZATION = S("hw.gpu.utilization", "gauge", "1",
                    "Fraction of time the GPU was busy with a task: general (kernels running), encoder, decoder",
                    attributes=("hw.gpu.task",))
MEM_CTRL_UTILIZATION = S("hw.gpu.memory.controller.utilization", "gauge", "1",
                         "Fraction of time device memory was being read or written")
MEM_UTILIZATION = S("hw.gpu.memory.utilization", "gauge", "1", "Fraction of GPU memory used (usage / limit)")
MEM_USAGE = S("hw.gpu.memory.usage", "updowncounter", "By", "GPU memory used")
MEM_LIMIT = S("hw.gpu.memory.limit", "updowncounter", "By", "Size of the GPU memory")
MEM_FREE = S("hw.gpu.memory.free", "updowncounter", "By", "GPU memory free")
MEM_RESERVED = S("hw.gpu.memory.reserved", "updowncounter", "By", "GPU memory reserved by the driver and firmware")
TEMPERATURE = S("hw.gpu.temperature", "gauge", "Cel", "GPU die temperature")
MEMORY_TEMPERATURE = S("hw.gpu.memory.temperature", "gauge", "Cel",
                       "GPU memory (HBM) temperature, where the GPU has a sensor for it (data-center GPUs with HBM)")
TEMPERATURE_LIMIT = S("hw.gpu.temperature.limit", "gauge", "Cel",
                      "GPU die temperature limits: throttled (the driver slows the clocks down), max (the highest "
                      "operating temperature), high.critical (the GPU shuts down)", attributes=("hw.limit_type",))
MEMORY_TEMPERATURE_LIMIT = S("hw.gpu.memory.temperature.limit", "gauge", "Cel",
                             "GPU memory temperature limit: max (the highest operating temperature)",
                             attributes=("hw.limit_type",))
POWER = S("hw.power", "gauge", "W", "Power drawn by the GPU")
POWER_LIMIT = S("hw.gpu.power.limit", "gauge", "W", "Enforced power limit of the GPU")
ENERGY = S("hw.energy", "sum", "J", "Energy consumed by the GPU since the driver was loaded")
CLOCK = S("hw.gpu.clock.frequency", "gauge", "Hz", "Current clock frequency",
          attributes=("hw.gpu.clock.domain",))
THROTTLE = S("hw.gpu.throttle", "gauge", "1",
             "1 while the clocks are held down for this reason, else 0 (NVML clock event reasons)",
             attributes=("hw.gpu.throttle.reason",))
ERRORS = S("hw.errors", "sum", "{error}", "ECC errors since the driver was loaded (volatile counters)",
           attributes=("error.type",))
IO = S("hw.gpu.io", "sum", "By", "Bytes moved over PCIe since the driver was loaded",
       attributes=("network.io.direction",))
NVLINK_IO = S("hw.gpu.nvlink.io", "sum", "By", "Bytes moved over all NVLink links since the driver was loaded",
              attributes=("network.io.direction",))
# GPU health (`health`): what tells a GPU to drain or replace
XID_ERRORS = S("hw.gpu.xid.errors", "sum", "{error}",
               "XID errors the driver reported for the GPU since podmeter started watching (NVML's critical XID "
               "events), by XID number", attributes=("hw.gpu.xid",))
REMAPPED_ROWS = S("hw.gpu.memory.remapped_rows", "sum", "{row}",
                  "Memory rows the GPU remapped, for correctable or uncorrectable errors (A100 and newer)",
                  attributes=("hw.gpu.memory.remap.cause",))
REMAP_PENDING = S("hw.gpu.memory.remap.pending", "gauge", "1",
                  "1 while a row remap waits for a GPU reset to take effect, else 0")
REMAP_FAILED = S("hw.gpu.memory.remap.failed", "gauge", "1",
                 "1 once a row remap failed (no spare row left: the GPU needs service), else 0")
PCIE_REPLAYS = S("hw.gpu.pcie.replays", "sum", "{replay}",
                 "PCIe replays (link-level retransmissions after a transfer error) since the driver was loaded")

# GPM (GPU performance metrics, Hopper and newer; `gpm: true`): what DCGM's profiling fields give, from two samples a
# collection apart; per GPU and per MIG GPU instance
GPM = "(GPM, gpm: true; per GPU, and per MIG device for its GPU instance)"
ENGINE_UTILIZATION = S("hw.gpu.engine.utilization", "gauge", "1",
                       "Fraction of time the graphics/compute engine had work since the previous collection (DCGM's "
                       f"GR_ENGINE_ACTIVE) {GPM}")
SM_UTILIZATION = S("hw.gpu.sm.utilization", "gauge", "1",
                   f"Fraction of the SMs busy since the previous collection (DCGM's SM_ACTIVE) {GPM}")
SM_OCCUPANCY = S("hw.gpu.sm.occupancy", "gauge", "1",
                 "Resident warps as a fraction of the SMs' maximum since the previous collection (DCGM's "
                 f"SM_OCCUPANCY) {GPM}")
PIPE_UTILIZATION = S("hw.gpu.pipe.utilization", "gauge", "1",
                     "Fraction of time the SMs' pipes were busy since the previous collection, by pipe: tensor (any "
                     f"tensor operation), fp64, fp32, fp16, integer (DCGM's PIPE_*_ACTIVE) {GPM}",
                     attributes=("hw.gpu.pipe",))
MEM_BANDWIDTH_UTILIZATION = S("hw.gpu.memory.bandwidth.utilization", "gauge", "1",
                              "Fraction of the peak device memory bandwidth used since the previous collection "
                              f"(DCGM's DRAM_ACTIVE) {GPM}")
STATUS = S("hw.status", "updowncounter", "1",
           "1 for the GPU's current state (ok; failed: fell off the bus or cannot be read), else 0",
           attributes=("hw.state",))
ALLOCATION = S("hw.gpu.allocation", "gauge", "1",
               "1 per pod container the kubelet allocated this GPU or MIG device to (from the podresources receiver; "
               "time-slicing replicas of one GPU each appear with their k8s.device.id)",
               attributes=("k8s.pod.uid", "k8s.pod.name", "k8s.namespace.name", "k8s.container.name",
                           "k8s.resource.name", "k8s.device.id"))

# Per-process metrics; resource: process.*, k8s.pod.uid, container.id and the device's hw.* attributes.
PROCESS_MEMORY = S("process.gpu.memory.usage", "updowncounter", "By",
                   "GPU memory used by the process on this GPU or MIG device (compute, graphics and MPS clients)")
PROCESS_UTILIZATION = S("process.gpu.utilization", "gauge", "1",
                        "Fraction of the GPU the process used since the previous collection, by task: general "
                        "(kernels running: NVML's SM utilization), encoder, decoder (not available on MIG devices: "
                        "left out, never zero)",
                        attributes=("hw.gpu.task",))
PROCESS_MEM_CTRL_UTILIZATION = S("process.gpu.memory.controller.utilization", "gauge", "1",
                                 "Fraction of time device memory was read or written for the process since the "
                                 "previous collection (not available on MIG devices: left out, never zero)")

# Per-container metrics (`per_container`): the processes of one container on one GPU or MIG device, summed;
# resource: k8s.pod.uid, container.id (as attributed), container.runtime.name, k8s.pod.qos_class and the device's hw.*
CONTAINER_MEMORY = S("container.gpu.memory.usage", "updowncounter", "By",
                     "GPU memory used by the container's processes on this GPU or MIG device (their sum)")
CONTAINER_UTILIZATION = S("container.gpu.utilization", "gauge", "1",
                          "Fraction of the GPU the container's processes used since the previous collection, by task "
                          "(their sum, at most 1; not available on MIG devices: left out, never zero)",
                          attributes=("hw.gpu.task",))
CONTAINER_MEM_CTRL_UTILIZATION = S("container.gpu.memory.controller.utilization", "gauge", "1",
                                   "Fraction of time device memory was read or written for the container's processes "
                                   "since the previous collection (their sum, at most 1; not on MIG devices)")

METRICS = (GPU_UTILIZATION, MEM_CTRL_UTILIZATION, MEM_UTILIZATION, MEM_USAGE, MEM_LIMIT, MEM_FREE, MEM_RESERVED,
           TEMPERATURE, MEMORY_TEMPERATURE, TEMPERATURE_LIMIT, MEMORY_TEMPERATURE_LIMIT, POWER, POWER_LIMIT, ENERGY, CLOCK, THROTTLE, ERRORS, IO, NVLINK_IO, ENGINE_UTILIZATION,
           SM_UTILIZATION, SM_OCCUPANCY, PIPE_UTILIZATION, MEM_BANDWIDTH_UTILIZATION, XID_ERRORS, REMAPPED_ROWS,
           REMAP_PENDING, REMAP_FAILED, PCIE_REPLAYS, STATUS, ALLOCATION,
           PROCESS_MEMORY, PROCESS_UTILIZATION, PROCESS_MEM_CTRL_UTILIZATION,
           CONTAINER_MEMORY, CONTAINER_UTILIZATION, CONTAINER_MEM_CTRL_UTILIZATION)

RESOURCE_ATTRIBUTES = (
    "hw.id", "hw.type", "hw.name", "hw.model", "hw.vendor", "hw.driver_version", "hw.serial_number", "hw.parent",
    "hw.gpu.index", "hw.gpu.pci_bus_id", "hw.gpu.mig.gpu_instance_id", "hw.gpu.mig.compute_instance_id",
    "hw.gpu.mig.profile",
    "process.pid", "process.executable.name", "process.executable.path", "process.command", "process.owner",
    "process.creation.time",
    "k8s.pod.uid", "container.id", "container.runtime.name", "k8s.pod.qos_class",
)
