"""A fake libnvidia-ml.so.1 (a test double: no NVIDIA GPU can run here) and the scenarios that drive it.

The real nvidia-ml-py runs unchanged against it. Usage:

    from harness.fake_nvml import GPU, MigDevice, Process, Fail, Scenario, build_fake_nvml

    lib = build_fake_nvml()                           # compiled once per source version into a cache dir
    scenario = Scenario(
        gpus=[GPU(uuid="GPU-0000...", mem_used=30 * GiB)],
        processes=[Process(pid=proc.pid, gpu=0, used_mem=20 * GiB, sm=70)],
    )
    scenario.write(path)                              # atomic; the library re-reads it on its next call
    os.environ["FAKE_NVML_SCENARIO"] = path           # read by the library at every call (in-process tests)
    # receiver config: {"library_path": lib}; for a subprocess pass FAKE_NVML_SCENARIO in its environment.
    # Another program that loads libnvidia-ml.so.1 by name (nvitop-exporter, nvidia-smi-like tools):
    #   env LD_LIBRARY_PATH=os.path.dirname(lib) FAKE_NVML_SCENARIO=path <program>

Rewriting the scenario while the code under test keeps its NVML session changes what NVML reports; bumping
`Scenario.generation` simulates a driver reload (open sessions get NVML_ERROR_UNINITIALIZED until nvmlInit).
`calls(lib, "nvmlDeviceGetName")`, `last_seen(lib, gpu_index)`, `gpm_samples(lib)` and `event_sets(lib)` read the
library's own counters.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, fields

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "fake_nvml.c")
GiB = 1 << 30
MiB = 1 << 20

# NVML return codes tests inject most
NOT_SUPPORTED, NO_PERMISSION, NOT_FOUND, INSUFFICIENT_SIZE, DRIVER_NOT_LOADED, GPU_IS_LOST, UNKNOWN = 3, 4, 6, 7, 9, 15, 999

# Clock event (throttle) reason bits
THROTTLE_GPU_IDLE, THROTTLE_SW_POWER_CAP, THROTTLE_HW_SLOWDOWN, THROTTLE_SW_THERMAL = 0x1, 0x4, 0x8, 0x20


def cache_dir() -> str:
    return os.environ.get("PODMETER_TEST_CACHE") or os.path.join(tempfile.gettempdir(), "podmeter-test-cache")


def build_fake_nvml(outdir: str | None = None) -> str:
    """Compile fake_nvml.c (gcc, about 0.5 s) once per source version; return the path of libnvidia-ml.so.1."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    outdir = outdir or os.path.join(cache_dir(), f"fake_nvml-{digest}")
    so = os.path.join(outdir, "libnvidia-ml.so.1")
    if os.path.exists(so):
        return so
    os.makedirs(outdir, exist_ok=True)
    tmp = f"{so}.{os.getpid()}.tmp"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-Wl,-soname,libnvidia-ml.so.1",
                    "-o", tmp, SOURCE, "-lpthread"], check=True)
    os.replace(tmp, so)  # atomic: concurrent builders never see a half-written library
    return so


@dataclass
class GPU:
    """One physical GPU; index is its position in Scenario.gpus. Units as NVML reports them."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    mem_total: int = 80 * GiB
    mem_used: int = 0
    mem_reserved: int = 0
    util_gpu: int = 0          # percent
    util_mem: int = 0
    util_enc: int = 0
    util_dec: int = 0
    temp: int = 40             # Celsius
    power_mw: int = 70_000
    power_limit_mw: int = 700_000
    energy_mj: int = 1_000_000
    clock_sm: int = 1980       # MHz
    clock_mem: int = 2619
    clock_gfx: int = 1980
    throttle: int = 0          # clock event reason bitmask
    ecc_corr: int = 0
    ecc_uncorr: int = 0
    pcie: int = 1              # 0: PCIe counters not supported
    pcie_tx: int = 0           # bytes since driver load
    pcie_rx: int = 0
    nvlink_links: int = 0
    nvlink_tx: int = 0         # KiB, split evenly over the links
    nvlink_rx: int = 0
    serial: str = ""
    pci_bus_id: str = ""       # default 00000000:<18+index>:00.0
    minor: int = -1            # default = index
    mig: int = 0               # 1: MIG mode on (add MigDevice entries)
    lost: int = 0              # 1: every call on it, nvmlDeviceGetHandleByIndex(its index) too, returns GPU_IS_LOST
    gpm: dict[int, float] | None = None  # GPM metric id (NVML_GPM_METRIC_*) -> percent; None: no GPM on this GPU
    remap: int = 1             # 0: row remapping not supported (before A100)
    remap_corr: int = 0        # rows remapped for correctable / uncorrectable errors; a remap pending; one failed
    remap_unc: int = 0
    remap_pending: int = 0
    remap_failed: int = 0
    pcie_replays: int = 0      # PCIe replay counter (not supported where pcie=0)
    mem_temp: int = 0          # memory (HBM) temperature, Celsius, field 82; 0: the GPU has none (NOT_SUPPORTED);
    #                            -1: answered as 0 (a driver that cannot read the sensor)
    temp_shutdown: int = 0     # nvmlDeviceGetTemperatureThreshold, Celsius, by type; 0: NOT_SUPPORTED
    temp_slowdown: int = 0
    temp_gpu_max: int = 0
    temp_mem_max: int = 0


@dataclass
class MigDevice:
    gpu: int                   # parent GPU index
    gi: int                    # GPU instance id
    uuid: str
    ci: int = 0                # compute instance id
    profile: str = "1g.10gb"
    mem_total: int = 10 * GiB
    mem_used: int = 0
    gpm: dict[int, float] | None = None  # its GPU instance's GPM metrics (nvmlGpmMigSampleGet), as GPU.gpm


@dataclass
class Process:
    pid: int
    gpu: int = 0
    used_mem: int = 0
    type: str = "compute"      # compute | graphics | mps
    sm: int = 0                # percent, in utilization samples
    mem: int = 0
    enc: int = 0
    dec: int = 0
    ts: int = -1               # sample timestamp (us); -1: "now" at every call (a process that keeps running)
    util: int = 1              # 0: no utilization samples at all
    gi: int = 0xFFFFFFFF       # MIG GPU instance the process runs in
    ci: int = 0xFFFFFFFF


@dataclass
class Xid:
    gpu: int                   # an XID error on this GPU: delivered once to each event set that had the GPU registered
    code: int                  # before it was written (XIDs already in the scenario at registration are the past)


@dataclass
class Fail:
    fn: str                    # NVML symbol name, "*" for every call on the device (and its handle), or "nvmlInit"
    code: int
    gpu: int = -1              # -1: every device
    times: int = -1            # only the next N matching calls fail (a race between two calls); -1: every one


@dataclass
class Scenario:
    gpus: list[GPU] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    mig: list[MigDevice] = field(default_factory=list)
    fail: list[Fail] = field(default_factory=list)
    xids: list[Xid] = field(default_factory=list)
    driver_version: str = "550.54.15"
    generation: int = 0        # change it to simulate a driver reload
    loaded: int = 1            # 0: the driver is not loaded (nvmlInit fails)
    # >0: nvmlDeviceGetProcessUtilization's size query answers INSUFFICIENT_SIZE with room for this many samples
    # whatever the timestamp, and the read answers NOT_FOUND when no sample is newer (driver 580 on an H200: 72)
    util_buffer: int = 0

    def text(self) -> str:
        lines = [f"driver\tversion={self.driver_version}\tgeneration={self.generation}\tloaded={self.loaded}"
                 f"\tutil_buffer={self.util_buffer}"]
        for g in self.gpus:
            lines.append("device\t" + _kv(g, skip={"minor": -1, "serial": "", "pci_bus_id": ""}))
        for m in self.mig:
            lines.append("mig\t" + _kv(m, rename={"gpu": "dev"}))
        for p in self.processes:
            lines.append("proc\t" + _kv(p, rename={"gpu": "dev"}))
        for x in self.xids:
            lines.append(f"xid\tdev={x.gpu}\tcode={x.code}")
        for x in self.fail:
            lines.append(f"fail\tfn={x.fn}\tcode={x.code}\tdev={x.gpu}\ttimes={x.times}")
        return "\n".join(lines) + "\n"

    def write(self, path: str) -> str:
        """Atomically replace `path`; the mtime always moves forward so the library notices the change."""
        prev = os.stat(path).st_mtime_ns if os.path.exists(path) else 0
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(self.text())
        ns = max(time.time_ns(), prev + 1_000_000)
        os.utime(tmp, ns=(ns, ns))
        os.replace(tmp, path)
        return path


def _kv(obj, rename=None, skip=None) -> str:
    out = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None or (skip and f.name in skip and skip[f.name] == value):
            continue
        if isinstance(value, dict):
            value = ",".join(f"{k}:{v}" for k, v in value.items())
        out.append(f"{(rename or {}).get(f.name, f.name)}={value}")
    return "\t".join(out)


def _lib(path: str):
    lib = ctypes.CDLL(path)
    lib.fakeNvmlCalls.restype = ctypes.c_ulonglong
    lib.fakeNvmlCalls.argtypes = [ctypes.c_char_p]
    lib.fakeNvmlLastSeen.restype = ctypes.c_ulonglong
    lib.fakeNvmlLastSeen.argtypes = [ctypes.c_uint]
    lib.fakeNvmlGpmSamples.restype = ctypes.c_long
    lib.fakeNvmlEventSets.restype = ctypes.c_long
    return lib


def calls(lib_path: str, fn: str) -> int:
    """How many times this process called NVML symbol `fn` of the fake library."""
    return _lib(lib_path).fakeNvmlCalls(fn.encode())


def field_reads(lib_path: str, field_id: int) -> int:
    """How many times this process asked for field value `field_id` (nvmlDeviceGetFieldValues, any GPU)."""
    return calls(lib_path, f"field {field_id}")


def last_seen(lib_path: str, gpu: int) -> int:
    """The lastSeenTimeStamp the latest nvmlDeviceGetProcessUtilization call on GPU `gpu` passed."""
    return _lib(lib_path).fakeNvmlLastSeen(gpu)


def gpm_samples(lib_path: str) -> int:
    """How many GPM samples this process allocated and has not freed."""
    return _lib(lib_path).fakeNvmlGpmSamples()


def event_sets(lib_path: str) -> int:
    """How many NVML event sets this process created and has not freed."""
    return _lib(lib_path).fakeNvmlEventSets()
