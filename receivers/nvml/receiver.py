"""The nvml receiver: per-GPU, per-MIG-device and per-process GPU metrics, processes attributed to pods.

Static device facts (uuid, name, PCI bus id, MIG layout) are read at discovery (and after a GPU comes back) and
cached; a collection makes only the value calls. A process is read from /proc once (per PID and start time) and
then confirmed each collection through an fd on its /proc/<pid>; its Resource on each device is built once and
handed to the MetricsBuilder as it is. Every NVML error is handled per call: NOT_SUPPORTED / FUNCTION_NOT_FOUND
are counted once and the call is not made again on that device until NVML is re-initialised; other errors are
counted and that value is left out; GPU_IS_LOST skips the device (hw.status failed); UNINITIALIZED /
DRIVER_NOT_LOADED / a library version mismatch (a driver reload) re-initialise NVML and rediscover. Error causes
are per device (a GPU's problem is logged once, and again after that device's call has succeeded). A GPU that
cannot be read at discovery is reported failed under the identity it was last known by, without calls on it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import resource as rlimit
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from opentelemetry.sdk.metrics.export import MetricsData
from opentelemetry.sdk.resources import Resource

from podmeter.attribution import ProcessAttributor, read_process, read_start_time
from podmeter.component import ComponentUnavailable, Host, Receiver, RestartRequired
from podmeter.metrics import MetricsBuilder, empty, now_ns

from . import metrics as M
from .config import NvmlConfig
from .gpm import GpmSampler
from .xid import XidWatcher

log = logging.getLogger(__name__)

NO_ID = 0xFFFFFFFF
PROC_PID_INIT_INO = 0xEFFFFFFC  # the inode of the kernel's initial PID namespace (include/linux/proc_ns.h)
UNIDENTIFIED = "nvidia-index-"  # hw.id of a GPU whose UUID was never read: nvidia-index-<NVML index>
# pynvml error codes (the module is imported lazily, so the agent starts on hosts without it)
UNINITIALIZED, NOT_SUPPORTED, NOT_FOUND, INSUFFICIENT_SIZE, DRIVER_NOT_LOADED, LIBRARY_NOT_FOUND = 1, 3, 6, 7, 9, 12
FUNCTION_NOT_FOUND, GPU_IS_LOST, LIB_RM_VERSION_MISMATCH, ARGUMENT_VERSION_MISMATCH = 13, 15, 18, 25
REINIT_CODES = (UNINITIALIZED, DRIVER_NOT_LOADED, LIB_RM_VERSION_MISMATCH)
SKIP_CODES = (NOT_SUPPORTED, FUNCTION_NOT_FOUND)

FI_NVLINK_LINK_COUNT, FI_NVLINK_TX_KIB, FI_NVLINK_RX_KIB, FI_PCIE_TX_BYTES, FI_PCIE_RX_BYTES = 91, 138, 139, 197, 198
FI_MEMORY_TEMP = 82  # NVML_FI_DEV_MEMORY_TEMP: the memory's (HBM's) own sensor, DCGM's DCGM_FI_DEV_MEMORY_TEMP

THROTTLE_REASONS = (
    (0x1, "gpu_idle"), (0x2, "applications_clocks_setting"), (0x4, "sw_power_cap"), (0x8, "hw_slowdown"),
    (0x10, "sync_boost"), (0x20, "sw_thermal_slowdown"), (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"), (0x100, "display_clock_setting"),
)
CLOCKS = ((0, "graphics"), (1, "sm"), (2, "memory"))  # NVML_CLOCK_GRAPHICS, _SM, _MEM
# nvmlDeviceGetTemperatureThreshold types, as semconv's hw.limit_type: NVML_TEMPERATURE_THRESHOLD_SHUTDOWN,
# _SLOWDOWN, _GPU_MAX (the die) and _MEM_MAX (the memory)
TEMPERATURE_LIMITS = ((0, "shutdown", M.TEMPERATURE_LIMIT, "high.critical"),
                      (1, "slowdown", M.TEMPERATURE_LIMIT, "throttled"),
                      (3, "gpu_max", M.TEMPERATURE_LIMIT, "max"),
                      (2, "mem_max", M.MEMORY_TEMPERATURE_LIMIT, "max"))


MAX_OWNERS = 1024  # uid -> user name entries kept
# what names a container among a process's attributes, and what its per-container resource carries from them
CONTAINER_IDENTITY = ("k8s.pod.uid", "container.id")
CONTAINER_ATTRIBUTES = CONTAINER_IDENTITY + ("container.runtime.name", "k8s.pod.qos_class")
# what a process's and a container's GPU use are reported as: memory, utilization, memory controller utilization
PROCESS_SPECS = (M.PROCESS_MEMORY, M.PROCESS_UTILIZATION, M.PROCESS_MEM_CTRL_UTILIZATION)
CONTAINER_SPECS = (M.CONTAINER_MEMORY, M.CONTAINER_UTILIZATION, M.CONTAINER_MEM_CTRL_UTILIZATION)


def _exe_path(link: str) -> str | None:
    """The executable's path from /proc/<pid>/exe (in the process's mount namespace); None when it cannot be read.

    Reading the link needs ptrace-read access to the process (PTRACE_MODE_READ_FSCREDS): CAP_SYS_PTRACE, or the
    same uid, dumpable, and no capability the reader lacks."""
    try:
        target = os.readlink(link.encode())
    except OSError:
        return None
    # the binary was replaced since it started (a package upgrade): the kernel appends " (deleted)"
    if target.endswith(b" (deleted)"):
        target = target[:-len(b" (deleted)")]
    return target.decode("utf-8", "replace") or None


class _Reinit(Exception):
    """NVML lost its session (driver reload): re-initialise and rediscover."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class DriverUpgraded(RestartRequired):
    """The NVIDIA driver was replaced under a running agent: the library this process loaded no longer matches
    the kernel module (LIB_RM_VERSION_MISMATCH), and a loaded library cannot be swapped for the new one. Raised from
    collect(), so the component reports an error and health_check's liveness path fails: the liveness probe then
    restarts the agent, which loads the new library (as a restart of dcgm-exporter does)."""


class _Lost(Exception):
    """The GPU fell off the bus."""


class _Unreadable(Exception):
    """A call that identifies the GPU (handle, UUID, name) failed at discovery: args (call, NVMLError)."""


@dataclass
class Device:
    """A GPU or a MIG device, with what is static about it."""

    index: int
    handle: Any
    resource: dict
    is_mig: bool = False
    mig_mode: bool = False
    lost: bool = False
    migs: list[Device] = field(default_factory=list)
    nvlink_links: int = 0
    unsupported: set[str] = field(default_factory=set)  # calls that answered NOT_SUPPORTED: not made again
    fields: list = field(default_factory=list)           # field value ids still asked for
    temperature_limits: list = field(default_factory=list)  # (spec, hw.limit_type, Celsius), read at discovery
    last_seen: int = 0                                   # process utilization lastSeenTimeStamp (us)
    failing: dict = field(default_factory=dict)          # call -> its error cause on this device (receiver-owned)
    gpm: bool = False                                    # GPM sampling supported (and `gpm` on): GPUs only
    key: str = ""                                        # names the device in causes: GPU uuid, <uuid>/gi<n>/ci<n>

    @property
    def uuid(self) -> str:
        return self.resource["hw.id"]


class _Proc:
    """A process on a GPU, attributed once (per PID and start time) and kept while NVML lists it.

    `fd` is an open /proc/<pid> directory: it names this process, not the PID, so once the process is gone (and
    the PID free for reuse) lookups through it fail: one faccessat per collection tells the same process from a
    reused PID without reading /proc/<pid>/stat. -1 where no fd is held (over the fd budget): the start time is
    compared instead. `resources`: device uuid -> (that device's resource dict, the process's Resource on it),
    built once and shared by every collection (Resource is immutable)."""

    __slots__ = ("start_time", "attrs", "host_pid", "fd", "resources")

    def __init__(self, start_time: int, attrs: dict, host_pid: int, fd: int) -> None:
        self.start_time, self.attrs, self.host_pid, self.fd = start_time, attrs, host_pid, fd
        self.resources: dict[str, tuple[dict, Resource]] = {}

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


class NvmlReceiver(Receiver):
    def __init__(self, settings, config: NvmlConfig) -> None:
        self.settings = settings
        self.config = config
        self.logger = settings.logger
        self.telemetry = settings.telemetry
        self.scope = f"podmeter/receiver/{settings.id}"
        self.start_ns = now_ns()
        self.nvml: Any = None
        # an NVML session is open (not named `ready`: that is Component.ready(), which `podmeter collect` calls)
        self.session_open = False
        self.devices: list[Device] = []
        # the GPUs of the last discovery, kept through a driver reload: whom a GPU that cannot be read now was
        self._known: list[Device] = []
        # device key -> {call -> cause}: errors are counted per device and recovered when that call succeeds there
        # again; bounded by the node's GPUs (keys are GPU UUIDs, <uuid>/gi<n>/ci<n>, nvidia-index-<n>, "" the node)
        self._causes: dict[str, dict[str, str]] = {}
        self.driver_version = ""
        self.discovered_at = 0.0
        self.host: Host | None = None
        self.attributor = ProcessAttributor(config.proc_root)
        self._procs: dict[int, _Proc] = {}  # NVML pid -> the process, attributed (only those on a GPU now)
        self._checked: set[int] = set()      # pids whose _Proc was confirmed in this collection
        # (device uuid, container identity) -> (device resource, container attributes, Resource): containers with a
        # process on a GPU at the last collection, and those found in this one
        self._container_resources: dict[tuple, tuple[dict, list, Resource]] = {}
        self._containers_seen: set[tuple] = set()
        try:
            soft = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)[0]
        except (OSError, ValueError):
            soft = 1024
        # /proc/<pid> fds held: a quarter of the fd limit at most, the rest compare start times
        self._fd_budget = min(4096, (soft if soft > 0 else 1024) // 4)
        self._fds = 0
        self._owners: dict[int, str] = {}
        self._btime: float | None = None
        self._ns_map: dict[int, int] | None = None      # NSpid translation, built only when needed
        self._translate_pids = False  # podmeter's own PID namespace, and proc_root shows an outer one
        self._error_names: dict[int, str] = {}
        self.initialised = False  # nvmlInit succeeded once in this process
        # Cumulative counters (energy, ECC, PCIe, NVLink) count "since the driver was loaded" and restart at a driver
        # reload or a GPU reset. A cumulative point that goes down under the same start time reads as a huge
        # negative rate to OTLP backends (cumulative-to-delta), so each series gets a new start time when it
        # restarts. (GPU uuid, metric, attributes) -> [start_ns, last value, last time_ns, session]; bounded by the
        # GPUs ever seen on the node (kept when a GPU leaves, so a returning GPU is compared with what it was).
        self._counters: dict[tuple, list] = {}
        self._session = 0                # NVML sessions started after the first (driver reloads)
        self._session_ns = self.start_ns  # start time of series first seen in this session
        self._collect_ns = self.start_ns  # time of the latest collection
        self._gpm: GpmSampler | None = None  # with `gpm: true`, once pynvml is loaded
        # GPM figures compare two samples, the first taken when a GPU is discovered: `podmeter collect --once` waits
        # one interval for the second, as it does for the event-counting receivers
        self.counts_events = config.gpm
        self._no_gpm_said: set[str] = set()  # GPUs said to have no GPM (bounded by the node's GPUs)
        self._xid: XidWatcher | None = None  # with `health` (the default), once pynvml is loaded

    # ------------------------------------------------------------------------------------------------ lifecycle

    def start(self, host: Host) -> None:
        self.host = host
        try:
            import pynvml
        except ImportError as exc:  # packaging problem, not a host one: still say it plainly
            raise ComponentUnavailable(f"nvidia-ml-py is not installed: {exc}") from None
        self.nvml = pynvml
        if self.config.gpm:
            self._gpm = GpmSampler(pynvml)
        if self.config.health:
            self._xid = XidWatcher(pynvml)
        self._error_names = {getattr(pynvml, n): n[len("NVML_ERROR_"):] for n in dir(pynvml)
                             if n.startswith("NVML_ERROR_") and isinstance(getattr(pynvml, n), int)}
        self._load_library()
        try:
            self._init()
        except _Reinit as exc:
            # the library is there but the driver is not (yet): keep trying at each collection
            self.telemetry.error("nvmlInit", f"NVML could not initialise: {exc}; retrying every collection")
        self._check_pid_namespace()

    def _load_library(self) -> None:
        N = self.nvml
        path = self.config.library_path
        if path:
            if not os.path.exists(path):
                raise ComponentUnavailable(f"library_path {path} does not exist")
            with N.libLoadLock:
                current = getattr(N.nvmlLib, "_name", None)
                if current != path:
                    try:
                        # pynvml keeps one library per process in N.nvmlLib; setting it is its own mechanism
                        N.nvmlLib = ctypes.CDLL(path)
                    except OSError as exc:
                        raise ComponentUnavailable(f"cannot load the NVML library {path}: {exc}") from None
                    N._nvmlGetFunctionPointer_cache.clear()
            return
        try:
            N._LoadNvmlLibrary()
        except N.NVMLError as exc:
            raise ComponentUnavailable(
                f"no NVML library on this host ({exc}): libnvidia-ml.so.1 is not on the library path; "
                "is the NVIDIA driver installed? set library_path if it lives elsewhere") from None

    def _init(self) -> None:
        N = self.nvml
        try:
            N.nvmlInit()
        except N.NVMLError as exc:
            raise _Reinit(f"nvmlInit: {self._name(exc)}", getattr(exc, "value", None)) from None
        self.session_open = self.initialised = True
        try:
            self._discover()
        except _Reinit:
            # nvmlInit worked but the driver is not up yet (or went again): not ready, so the next collection
            # initialises again, rather than collecting nothing from an empty device list until the next discovery
            self.session_open = False
            try:
                N.nvmlShutdown()  # balance this nvmlInit: the next one starts afresh
            except N.NVMLError:
                pass
            raise
        self.telemetry.recovered("nvmlInit")

    def _reinit(self, why: str) -> bool:
        """After a driver reload: drop the old session, start a new one. False if NVML is still unavailable."""
        self.telemetry.error("nvml_reinit", f"NVML session lost ({why}); re-initialising")
        self.session_open = False
        if self._gpm is not None:
            self._gpm.close()  # samples of the old session do not pair with the new one's
        if self._xid is not None:
            self._xid.close()  # the new session registers its GPUs on a new event set
            self._xid.reading = True  # and a new driver may read events an old one could not
        # the driver restarted after the latest collection: every counter read from now on restarted there
        self._session += 1
        self._session_ns = self._collect_ns + 1
        self.devices = []  # a new driver may support what the old one did not: forget it all
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # the old session is gone anyway  # noqa: BLE001
            pass
        try:
            self._init()
        except _Reinit as exc:
            self._upgraded(exc)
            self.telemetry.error("nvmlInit", f"NVML could not initialise: {exc}; retrying every collection")
            return False
        self.telemetry.recovered("nvml_reinit")
        return True

    def shutdown(self) -> None:
        for proc in self._procs.values():
            proc.close()
        self._procs.clear()
        self._fds = 0
        if self._gpm is not None:
            self._gpm.close()
        if self._xid is not None:
            self._xid.close()
        if self.session_open and self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down regardless
                pass
        self.session_open = False

    # ------------------------------------------------------------------------------------------------ discovery

    def _name(self, exc) -> str:
        return self._error_names.get(getattr(exc, "value", None), str(exc))

    def _discover(self) -> None:
        N = self.nvml
        self.discovered_at = time.monotonic()
        node = self._failing("")
        try:
            self.driver_version = _text(N.nvmlSystemGetDriverVersion())
            count = N.nvmlDeviceGetCount()
        except N.NVMLError as exc:
            if exc.value in REINIT_CODES:
                raise _Reinit(f"nvmlDeviceGetCount: {self._name(exc)}") from None
            # the GPUs known stay (their handles are this session's): enumerated again at the next discovery
            self._fail(node, "nvmlDeviceGetCount", f"nvmlDeviceGetCount: {self._name(exc)}",
                       f"cannot enumerate GPUs: {exc}; the GPUs known are kept until the next discovery")
            return
        self._ok(node, "nvmlDeviceGetCount")
        old = {d.uuid: d for gpu in self.devices for d in (gpu, *gpu.migs)}  # this session's (empty after a reload)
        devices, unread = [], []
        for i in range(count):
            dev = Device(i, None, {"hw.type": "gpu", "hw.vendor": "NVIDIA", "hw.driver_version": self.driver_version,
                                   "hw.gpu.index": i})
            try:
                self._discover_gpu(dev, old)
            except (_Lost, _Unreadable) as exc:
                dev.handle, dev.migs = None, []  # nothing is asked of it until the next discovery
                unread.append((dev, exc))
            else:
                self._ok(self._causes.get(f"{UNIDENTIFIED}{i}", {}), "gpu_lost", "discovery", "gpu_removed")
                self._ok(dev.failing, "gpu_lost", "discovery")
                for d in (dev, *dev.migs):
                    prev = old.get(d.uuid)
                    if prev is not None:
                        # same driver session: keep the process-utilization cursor, and what is known unsupported
                        # (counted once, not again at every discovery; the GPU's own is carried by _discover_gpu)
                        d.last_seen = d.last_seen or prev.last_seen
                        if d.is_mig:
                            d.unsupported |= prev.unsupported
            devices.append(dev)
        if unread:
            self._identify_unread(devices, unread)
        ids = {d.uuid for d in devices}
        for d in devices:
            self._ok(d.failing, "gpu_removed")
        for d in self._known:
            # one never identified is gone only with its index (else it is this index's GPU, now read or not)
            if d.uuid not in ids and not (d.uuid.startswith(UNIDENTIFIED) and d.index < count):
                self._fail(d.failing, "gpu_removed", f"gpu_removed {d.uuid}",
                           f"GPU {d.uuid} (index {d.index}) is no longer enumerated by NVML (taken off the bus, or not "
                           "brought up by the driver): it is not reported any more")
        self.devices = self._known = devices
        if self._gpm is not None:
            self._gpm.keep({source[0] for d in devices for source in self._gpm_sources(d)})
        if not devices:
            self.logger.info("NVML reports no GPUs on this host")

    def _identify_unread(self, devices: list[Device], unread: list) -> None:
        """GPUs that could not be read: reported failed under the identity they were last known by (alerts key on
        hw.id), else under what was read of them (their UUID at least where it was), else `nvidia-index-<i>`."""
        known = {d.uuid: d for d in self._known}
        lined_up = _line_up(self._known, [d.resource.get("hw.id") for d in devices])
        for dev, exc in unread:
            prev = known.get(dev.resource.get("hw.id")) or lined_up.get(dev.index)
            if prev is not None:
                dev.resource = prev.resource  # the very same attributes: the same series
            else:
                dev.resource.setdefault("hw.id", f"{UNIDENTIFIED}{dev.index}")
                dev.resource.setdefault("hw.name", f"nvidia{dev.index}")
            dev.lost = True
            dev.key = dev.uuid
            dev.failing = self._failing(dev.key)
            if isinstance(exc, _Lost):
                self._fail(dev.failing, "gpu_lost", f"gpu_lost {dev.key}",
                           f"GPU {dev.index} ({dev.key}) fell off the bus ({exc}: GPU_IS_LOST); reported failed, "
                           "tried again at each discovery")
            else:
                call, err = exc.args
                self._fail(dev.failing, "discovery", f"{call}: {self._name(err)} {dev.key}",
                           f"GPU {dev.index} ({dev.key}) cannot be enumerated ({call}: {err}); reported failed, "
                           "nothing is asked of it until the next discovery")

    def _discover_gpu(self, dev: Device, old: dict[str, Device]) -> None:
        """Read GPU dev.index's identity and static facts into dev. Raises _Lost / _Unreadable (dev keeps what was
        read); other errors leave that fact out. `old`: this session's devices by UUID."""
        N, i = self.nvml, dev.index
        call = "nvmlDeviceGetHandleByIndex"
        try:
            handle = N.nvmlDeviceGetHandleByIndex(i)
            call = "nvmlDeviceGetUUID"
            dev.resource["hw.id"] = dev.key = _text(N.nvmlDeviceGetUUID(handle))
            call = "nvmlDeviceGetName"
            dev.resource["hw.model"] = _text(N.nvmlDeviceGetName(handle))
        except N.NVMLError as exc:
            if exc.value in REINIT_CODES:
                raise _Reinit(f"{call}: {self._name(exc)}") from None
            if exc.value == GPU_IS_LOST:
                raise _Lost(call) from None
            raise _Unreadable(call, exc) from None
        dev.handle = handle
        dev.failing = self._failing(dev.key)
        prev = old.get(dev.key)
        if prev is not None:
            # same driver session: what it does not support (discovery's calls too) is not asked, nor counted, again
            dev.unsupported = set(prev.unsupported)
        minor = self._static(dev, "nvmlDeviceGetMinorNumber", N.nvmlDeviceGetMinorNumber, handle)
        dev.resource["hw.name"] = f"nvidia{minor if minor is not None else i}"  # its /dev/nvidiaN, as dcgm's `device`
        pci = self._static(dev, "nvmlDeviceGetPciInfo", N.nvmlDeviceGetPciInfo, handle)
        if pci is not None:
            dev.resource["hw.gpu.pci_bus_id"] = _text(pci.busId)
        serial = self._static(dev, "nvmlDeviceGetSerial", N.nvmlDeviceGetSerial, handle, optional=True)
        if serial:
            dev.resource["hw.serial_number"] = _text(serial)
        dev.temperature_limits = []
        for kind, name, spec, limit_type in TEMPERATURE_LIMITS:
            v = self._static(dev, f"nvmlDeviceGetTemperatureThreshold({name})", N.nvmlDeviceGetTemperatureThreshold,
                             handle, kind, optional=True)
            if v:  # a limit of 0 Celsius is a driver's way of not knowing one
                dev.temperature_limits.append((spec, limit_type, v))
        mode = self._static(dev, "nvmlDeviceGetMigMode", N.nvmlDeviceGetMigMode, handle, optional=True)
        dev.mig_mode = bool(mode and mode[0])
        if prev is not None and prev.mig_mode != dev.mig_mode:
            # MIG toggled since: the GPU answered NOT_SUPPORTED to what its mode lacked (device and process
            # utilization), which says nothing about the new mode
            dev.unsupported.clear()
        if dev.mig_mode:
            dev.migs = self._discover_migs(dev)
        if self._gpm is not None:
            self._discover_gpm(dev)
            for key, call, fn, args, _ in self._gpm_sources(dev):
                if key not in self._gpm:  # a new GPU or instance: the first collection then has its figures
                    self._gpm.sample(key, partial(self._q, dev), call, fn, *args)
        if self._xid is not None:
            self._xid.watch(partial(self._static, dev, optional=True), handle, dev.uuid)
        # one nvmlDeviceGetFieldValues call per collection asks for all of these; a field the GPU answers
        # NOT_SUPPORTED for is dropped until the next discovery
        dev.fields = [FI_MEMORY_TEMP]
        if self.config.interconnect:
            dev.fields += [FI_PCIE_TX_BYTES, FI_PCIE_RX_BYTES]
            links = self._field_values(dev, [FI_NVLINK_LINK_COUNT])
            dev.nvlink_links = int(links.get((FI_NVLINK_LINK_COUNT, 0), 0) or 0)
            for link in range(dev.nvlink_links):
                dev.fields += [(FI_NVLINK_TX_KIB, link), (FI_NVLINK_RX_KIB, link)]

    def _discover_gpm(self, dev: Device) -> None:
        support = self._static(dev, "nvmlGpmQueryDeviceSupport", self.nvml.nvmlGpmQueryDeviceSupport, dev.handle,
                               optional=True)
        dev.gpm = bool(support is not None and support.isSupportedDevice)
        if not dev.gpm and dev.key not in self._no_gpm_said:
            self._no_gpm_said.add(dev.key)
            self.logger.info("GPU %d (%s, %s) has no GPM: its hw.gpu.engine.utilization, hw.gpu.sm.*, "
                             "hw.gpu.pipe.utilization and hw.gpu.memory.bandwidth.utilization are not reported (GPM "
                             "needs a Hopper or newer GPU and driver R525 or newer)", dev.index,
                             dev.resource.get("hw.model"), dev.key)

    def _gpm_sources(self, dev: Device) -> list[tuple]:
        """What GPM samples on GPU `dev`: (source key, call name, function, its arguments before the sample, the
        devices its metrics go to). The whole GPU, or in MIG mode each GPU instance, whose figures its MIG devices
        (one per compute instance) share. An instance's key has its first MIG UUID, new at each reconfiguration."""
        if not dev.gpm or dev.handle is None:
            return []
        N = self.nvml
        if not dev.mig_mode:
            return [(dev.key, "nvmlGpmSampleGet", N.nvmlGpmSampleGet, (dev.handle,), [dev])]
        instances: dict[int, list[Device]] = {}
        for mig in dev.migs:
            instances.setdefault(mig.resource["hw.gpu.mig.gpu_instance_id"], []).append(mig)
        return [(f"{dev.key}/gi{gi}/{migs[0].uuid}", "nvmlGpmMigSampleGet", N.nvmlGpmMigSampleGet,
                 (dev.handle, gi), migs) for gi, migs in instances.items()]

    def _discover_migs(self, parent: Device) -> list[Device]:
        N = self.nvml
        migs = []
        count = self._static(parent, "nvmlDeviceGetMaxMigDeviceCount", N.nvmlDeviceGetMaxMigDeviceCount,
                             parent.handle) or 0
        for j in range(count):
            slot = f"nvmlDeviceGetMigDeviceHandleByIndex({j})"
            try:
                h = N.nvmlDeviceGetMigDeviceHandleByIndex(parent.handle, j)
                uuid = _text(N.nvmlDeviceGetUUID(h))
                name = _text(N.nvmlDeviceGetName(h))
                gi = N.nvmlDeviceGetGpuInstanceId(h)
                ci = N.nvmlDeviceGetComputeInstanceId(h)
            except N.NVMLError as exc:
                if exc.value == NOT_FOUND:  # an empty slot
                    self._ok(parent.failing, slot)
                    continue
                if exc.value in REINIT_CODES:
                    raise _Reinit(self._name(exc)) from None
                if exc.value == GPU_IS_LOST:
                    raise _Lost(slot) from None
                self._fail(parent.failing, slot, f"{slot}: {self._name(exc)} {parent.key}",
                           f"GPU {parent.index} MIG device {j}: {exc}")
                continue
            self._ok(parent.failing, slot)
            # The driver names MIG devices "<GPU name> MIG <profile>", e.g. "NVIDIA A100-SXM4-40GB MIG 1g.5gb"
            profile = name.rpartition(" MIG ")[2] if " MIG " in name else name
            res = {**parent.resource, "hw.id": uuid, "hw.model": name, "hw.parent": parent.uuid,
                   "hw.name": f"{parent.resource['hw.name']}/gi{gi}/ci{ci}",
                   "hw.gpu.mig.gpu_instance_id": gi, "hw.gpu.mig.compute_instance_id": ci,
                   "hw.gpu.mig.profile": profile}
            res.pop("hw.serial_number", None)
            # keyed by GPU and instance, not by the MIG UUID (new at each reconfiguration): causes stay bounded
            key = f"{parent.key}/gi{gi}/ci{ci}"
            migs.append(Device(parent.index, h, res, is_mig=True, key=key, failing=self._failing(key)))
        return migs

    def _static(self, dev: Device, name: str, fn, *args, optional: bool = False):
        """A discovery-time call: errors are counted (an optional fact's absence is not an error); NOT_SUPPORTED is
        counted once and not asked again (as value calls)."""
        if name in dev.unsupported:
            return None
        try:
            v = fn(*args)
        except self.nvml.NVMLError as exc:
            if exc.value in REINIT_CODES:
                raise _Reinit(f"{name}: {self._name(exc)}") from None
            if exc.value == GPU_IS_LOST:
                raise _Lost(name) from None
            if exc.value in SKIP_CODES:
                dev.unsupported.add(name)
            if not (optional and exc.value in SKIP_CODES):
                self._count(dev, name, exc)
            return None
        if name in dev.failing:
            self._ok(dev.failing, name)
        return v

    # ------------------------------------------------------------------------------------------------ calls

    def _failing(self, key: str) -> dict[str, str]:
        return self._causes.setdefault(key, {})

    def _fail(self, failing: dict[str, str], name: str, cause: str, message: str) -> None:
        """Count an error (logged the first time its cause appears) and remember it in `failing`, one device's
        causes by call, so that it recovers when that call succeeds on that device again."""
        prev = failing.get(name)
        if prev is not None and prev != cause:
            self.telemetry.recovered(prev)  # another error now: one cause per device and call
        failing[name] = cause
        self.telemetry.error(cause, message)

    def _ok(self, failing: dict[str, str], *names: str) -> None:
        for name in names:
            cause = failing.pop(name, None)
            if cause is not None:
                self.telemetry.recovered(cause)

    def _count(self, dev: Device, name: str, exc) -> None:
        what = f"{'MIG device' if dev.is_mig else 'GPU'} {dev.index} ({dev.resource.get('hw.id')})"
        if exc.value in SKIP_CODES:
            # what the driver or model lacks (the same on every GPU of a node): one cause, and not asked again
            self.telemetry.error(f"{name}: {self._name(exc)}", f"{name} on {what}: {exc}")
        else:
            self._fail(dev.failing, name, f"{name}: {self._name(exc)} {dev.key}", f"{name} on {what}: {exc}")

    def _q(self, dev: Device, name: str, fn, *args):
        """One value call: None (value left out) on a per-call error; raises _Lost / _Reinit."""
        if name in dev.unsupported:
            return None
        try:
            v = fn(*args)
        except self.nvml.NVMLError as exc:
            code = exc.value
            if code in REINIT_CODES:
                raise _Reinit(f"{name}: {self._name(exc)}") from None
            if code == GPU_IS_LOST:
                raise _Lost(name) from None
            if code in SKIP_CODES:
                dev.unsupported.add(name)  # counted once; asking again every collection would only cost
            self._count(dev, name, exc)
            return None
        if name in dev.failing:
            self._ok(dev.failing, name)
        return v

    def _field_values(self, dev: Device, ids: list) -> dict:
        values = self._q(dev, "nvmlDeviceGetFieldValues", self.nvml.nvmlDeviceGetFieldValues, dev.handle, ids)
        out = {}
        if values is None:
            return out
        for want, v in zip(ids, values, strict=False):
            key = want if isinstance(want, tuple) else (want, 0)
            if v.nvmlReturn != 0:
                if v.nvmlReturn in SKIP_CODES and want in dev.fields:
                    dev.fields.remove(want)
                continue
            vt = v.valueType
            out[key] = (v.value.dVal if vt == 0 else v.value.uiVal if vt == 1 else v.value.ulVal if vt == 2
                        else v.value.ullVal if vt == 3 else v.value.sllVal if vt == 4 else v.value.siVal if vt == 5
                        else v.value.usVal)
        return out

    # ------------------------------------------------------------------------------------------------ collect

    def collect(self) -> MetricsData:
        if self.nvml is None:
            return empty()
        if not self.session_open:
            try:
                self._init()
            except _Reinit as exc:
                self._upgraded(exc)
                self.telemetry.error("nvmlInit", f"NVML could not initialise: {exc}; retrying every collection")
                return empty()
        for attempt in (1, 2):
            try:
                if time.monotonic() - self.discovered_at >= self.config.discovery_interval:
                    self._discover()
                return self._collect()
            except _Reinit as exc:
                if attempt == 2 or not self._reinit(str(exc)):
                    return empty()
        return empty()

    def _upgraded(self, exc: _Reinit) -> None:
        """Raise DriverUpgraded when NVML worked in this process and now refuses it as a version mismatch. A
        mismatch from the very first nvmlInit is a mounted library that does not fit the node's driver: restarting
        would not fix it, so that one is only reported, and the agent's other receivers keep running."""
        if exc.code == LIB_RM_VERSION_MISMATCH and self.initialised:
            raise DriverUpgraded(f"the NVIDIA driver changed under the agent ({exc}): the loaded NVML library no "
                                 "longer fits it; restart podmeter to load the new one") from None

    def _collect(self) -> MetricsData:
        self._collect_ns = now_ns()
        if self._xid is not None:
            self._drain_xids()
        b = MetricsBuilder(self.scope, self.start_ns, time_ns=self._collect_ns)
        assignments = self._assignments()
        seen_pids: set[int] = set()
        self._checked = set()
        self._containers_seen = set()
        parts: list[MetricsBuilder] = []
        for dev in self.devices:
            # each GPU's points go to a builder of their own: a GPU that falls off the bus part-way through a
            # collection must not report what it answered before (its other metrics are left out while failed)
            gb = MetricsBuilder(self.scope, self.start_ns, time_ns=self._collect_ns)
            parts.append(gb)
            if dev.handle is None:
                # lost or unreadable at discovery (said then): nothing is asked of it until the next discovery
                self._status(gb, dev, "failed")
                continue
            try:
                self._collect_gpu(gb, dev, assignments, seen_pids)
                if dev.lost:
                    dev.lost = False
                    self._ok(dev.failing, "gpu_lost")
                    # back on the bus (after a reset): read what is static about it again at the next collection
                    self.discovered_at = float("-inf")
                self._status(gb, dev, "ok")
            except _Lost as exc:
                dev.lost = True
                self._fail(dev.failing, "gpu_lost", f"gpu_lost {dev.uuid}",
                           f"GPU {dev.index} ({dev.uuid}) fell off the bus ({exc}: GPU_IS_LOST); "
                           "its metrics are left out until it answers again")
                gb = parts[-1] = MetricsBuilder(self.scope, self.start_ns, time_ns=self._collect_ns)
                self._status(gb, dev, "failed")
                if self._gpm is not None:
                    self._gpm.forget_gpu(dev.key)
        self._forget_exited(seen_pids)
        if len(self._container_resources) > len(self._containers_seen):
            self._container_resources = {k: v for k, v in self._container_resources.items()
                                         if k in self._containers_seen}
        # the builders' resources are disjoint (every resource carries its device's hw.id); an empty builder's
        # placeholder is kept only when nothing at all was collected
        rms = [rm for part in parts for rm in part.build().resource_metrics
               if any(sm.metrics for sm in rm.scope_metrics)]
        return MetricsData(resource_metrics=rms) if rms else b.build()

    def _drain_xids(self) -> None:
        node, N = self._failing(""), self.nvml
        try:
            self._xid.drain()
        except N.NVMLError as exc:
            if exc.value in REINIT_CODES:
                raise _Reinit(f"nvmlEventSetWait: {self._name(exc)}") from None
            if exc.value in SKIP_CODES:
                # a driver without event reads: said once, and not asked again until another driver is loaded
                self.telemetry.error(f"nvmlEventSetWait: {self._name(exc)}",
                                     f"XID errors are not watched: nvmlEventSetWait: {exc}")
                self._xid.close()
                self._xid.reading = False
                return
            self._fail(node, "nvmlEventSetWait", f"nvmlEventSetWait: {self._name(exc)}",
                       f"reading XID events failed: {exc}; read again at the next collection (they stay queued)")
        else:
            self._ok(node, "nvmlEventSetWait")

    def _status(self, b: MetricsBuilder, dev: Device, state: str) -> None:
        for s in ("ok", "failed"):
            b.add(M.STATUS, 1 if s == state else 0, {"hw.state": s}, dev.resource)

    def _collect_gpu(self, b: MetricsBuilder, dev: Device, assignments: dict, seen: set[int]) -> None:
        N, h, res, q = self.nvml, dev.handle, dev.resource, self._q
        self._memory(b, dev)
        if not dev.mig_mode:  # device utilization is not available in MIG mode
            util = q(dev, "nvmlDeviceGetUtilizationRates", N.nvmlDeviceGetUtilizationRates, h)
            if util is not None:
                b.add(M.GPU_UTILIZATION, util.gpu / 100, {"hw.gpu.task": "general"}, res)
                b.add(M.MEM_CTRL_UTILIZATION, util.memory / 100, None, res)
        for name, fn, task in (("nvmlDeviceGetEncoderUtilization", N.nvmlDeviceGetEncoderUtilization, "encoder"),
                               ("nvmlDeviceGetDecoderUtilization", N.nvmlDeviceGetDecoderUtilization, "decoder")):
            v = q(dev, name, fn, h)
            if v is not None:
                b.add(M.GPU_UTILIZATION, v[0] / 100, {"hw.gpu.task": task}, res)
        v = q(dev, "nvmlDeviceGetTemperature", N.nvmlDeviceGetTemperature, h, 0)
        b.add(M.TEMPERATURE, v, None, res)
        for spec, limit_type, v in dev.temperature_limits:
            b.add(spec, v, {"hw.limit_type": limit_type}, res)
        v = q(dev, "nvmlDeviceGetPowerUsage", N.nvmlDeviceGetPowerUsage, h)
        b.add(M.POWER, None if v is None else v / 1000, None, res)
        v = q(dev, "nvmlDeviceGetEnforcedPowerLimit", N.nvmlDeviceGetEnforcedPowerLimit, h)
        b.add(M.POWER_LIMIT, None if v is None else v / 1000, None, res)
        if self.config.energy:
            v = q(dev, "nvmlDeviceGetTotalEnergyConsumption", N.nvmlDeviceGetTotalEnergyConsumption, h)
            self._counter(b, dev, M.ENERGY, None if v is None else v / 1000, None)
        for clock, domain in CLOCKS:
            v = q(dev, f"nvmlDeviceGetClockInfo({domain})", N.nvmlDeviceGetClockInfo, h, clock)
            b.add(M.CLOCK, None if v is None else v * 1_000_000, {"hw.gpu.clock.domain": domain}, res)
        reasons = q(dev, "nvmlDeviceGetCurrentClocksEventReasons", N.nvmlDeviceGetCurrentClocksEventReasons, h)
        if reasons is None and "nvmlDeviceGetCurrentClocksEventReasons" in dev.unsupported:
            # drivers before R535 only have the older name
            reasons = q(dev, "nvmlDeviceGetCurrentClocksThrottleReasons",
                        N.nvmlDeviceGetCurrentClocksThrottleReasons, h)
        if reasons is not None:
            for bit, reason in THROTTLE_REASONS:
                b.add(M.THROTTLE, 1 if reasons & bit else 0, {"hw.gpu.throttle.reason": reason}, res)
        if self.config.ecc:
            for etype, label in ((0, "corrected"), (1, "uncorrected")):
                v = q(dev, f"nvmlDeviceGetTotalEccErrors({label})", N.nvmlDeviceGetTotalEccErrors, h, etype, 0)
                self._counter(b, dev, M.ERRORS, v, {"error.type": label})
        values = self._field_values(dev, list(dev.fields)) if dev.fields else {}
        # 0 Celsius is no reading of a running GPU's memory: a driver's way of not knowing, as for the limits
        b.add(M.MEMORY_TEMPERATURE, values.get((FI_MEMORY_TEMP, 0)) or None, None, res)
        if self.config.interconnect and values:
            for fid, direction in ((FI_PCIE_TX_BYTES, "transmit"), (FI_PCIE_RX_BYTES, "receive")):
                if (fid, 0) in values:
                    self._counter(b, dev, M.IO, values[(fid, 0)], {"network.io.direction": direction})
            for fid, direction in ((FI_NVLINK_TX_KIB, "transmit"), (FI_NVLINK_RX_KIB, "receive")):
                kib = [v for (f, _), v in values.items() if f == fid]
                # a sum over some of the links only is not the counter: it would read as a reset, then as a jump
                # of a whole link's bytes when that link answers again; left out until every link asked answers
                asked = sum(1 for w in dev.fields if isinstance(w, tuple) and w[0] == fid)
                if kib and len(kib) == asked:
                    self._counter(b, dev, M.NVLINK_IO, sum(kib) * 1024, {"network.io.direction": direction})
        if self._xid is not None:
            self._health(b, dev)
        self._allocation(b, dev, assignments)
        processes = self.config.per_process or self.config.per_container
        if processes and not dev.mig_mode:
            self._processes(b, dev, seen, utilization=True)
        for mig in dev.migs:
            self._memory(b, mig)
            self._allocation(b, mig, assignments)
            if processes:
                # MIG: NVML has no per-process utilization (nvmlDeviceGetProcessUtilization is NOT_SUPPORTED)
                self._processes(b, mig, seen, utilization=False)
        if self._gpm is not None:
            for key, call, fn, args, targets in self._gpm_sources(dev):
                for spec, attrs, v in self._gpm.sample(key, partial(q, dev), call, fn, *args):
                    for target in targets:
                        b.add(spec, v, attrs, target.resource)

    def _health(self, b: MetricsBuilder, dev: Device) -> None:
        N, h, res = self.nvml, dev.handle, dev.resource
        for xid, n in self._xid.counts.get(dev.uuid, {}).items():
            b.add(M.XID_ERRORS, n, {"hw.gpu.xid": xid}, res)  # podmeter's count: starts with the receiver
        rows = self._q(dev, "nvmlDeviceGetRemappedRows", N.nvmlDeviceGetRemappedRows, h)
        if rows is not None:
            corrected, uncorrected, pending, failed = rows
            # kept by the GPU itself (InfoROM) across resets and driver reloads: one start time, the receiver's
            b.add(M.REMAPPED_ROWS, corrected, {"hw.gpu.memory.remap.cause": "correctable"}, res)
            b.add(M.REMAPPED_ROWS, uncorrected, {"hw.gpu.memory.remap.cause": "uncorrectable"}, res)
            b.add(M.REMAP_PENDING, 1 if pending else 0, None, res)
            b.add(M.REMAP_FAILED, 1 if failed else 0, None, res)
        replays = self._q(dev, "nvmlDeviceGetPcieReplayCounter", N.nvmlDeviceGetPcieReplayCounter, h)
        self._counter(b, dev, M.PCIE_REPLAYS, replays, None)

    def _counter(self, b: MetricsBuilder, dev: Device, spec, value, attrs: dict | None) -> None:
        """A cumulative point whose start time moves when the device's counter restarted: after a driver reload
        (a new NVML session), when the GPU comes back from GPU_IS_LOST (a reset clears its volatile counters), or
        whenever the value went down. The new start is just after the previous point, where the restart happened."""
        if value is None:
            return
        key = (dev.uuid, spec.name, tuple(attrs.items()) if attrs else ())
        now = self._collect_ns
        prev = self._counters.get(key)
        if prev is None:
            start = self._session_ns
        elif value < prev[1] or prev[3] != self._session or dev.lost:
            start = prev[2] + 1
        else:
            start = prev[0]
        self._counters[key] = [start, value, now, self._session]
        b.add(spec, value, attrs, dev.resource, start_time_ns=start)

    def _memory(self, b: MetricsBuilder, dev: Device) -> None:
        N, res = self.nvml, dev.resource
        mem, reserved = None, None
        if "nvmlDeviceGetMemoryInfo_v2" not in dev.unsupported:
            try:
                mem = N.nvmlDeviceGetMemoryInfo(dev.handle, version=N.nvmlMemory_v2)
                reserved = mem.reserved
                if dev.failing:
                    self._ok(dev.failing, "nvmlDeviceGetMemoryInfo_v2")
            except N.NVMLError as exc:
                if exc.value in REINIT_CODES:
                    raise _Reinit(f"nvmlDeviceGetMemoryInfo_v2: {self._name(exc)}") from None
                if exc.value == GPU_IS_LOST:
                    raise _Lost("nvmlDeviceGetMemoryInfo_v2") from None
                if exc.value in (*SKIP_CODES, ARGUMENT_VERSION_MISMATCH):
                    dev.unsupported.add("nvmlDeviceGetMemoryInfo_v2")  # older driver: use v1 from now on
                else:
                    self._count(dev, "nvmlDeviceGetMemoryInfo_v2", exc)
                    return
        if mem is None:
            mem = self._q(dev, "nvmlDeviceGetMemoryInfo", N.nvmlDeviceGetMemoryInfo, dev.handle)
            if mem is None:
                return
        b.add(M.MEM_USAGE, mem.used, None, res)
        b.add(M.MEM_LIMIT, mem.total, None, res)
        b.add(M.MEM_FREE, mem.free, None, res)
        b.add(M.MEM_RESERVED, reserved, None, res)
        if mem.total:
            b.add(M.MEM_UTILIZATION, mem.used / mem.total, None, res)

    def _allocation(self, b: MetricsBuilder, dev: Device, assignments: dict) -> None:
        # NVIDIA's device plugin names devices by UUID; GKE's (container-engine-accelerators) by device node:
        # "nvidia<minor>" for a GPU and "nvidia<minor>/gi<GPU instance>" for a MIG device (hw.name without /ci<n>)
        name = dev.resource.get("hw.name", "")
        gke = name.rpartition("/ci")[0] if dev.is_mig else name
        for key in (dev.uuid, gke):
            for attrs in assignments.get(key, ()):
                b.add(M.ALLOCATION, 1, attrs, dev.resource)

    def _assignments(self) -> dict[str, list[dict]]:
        """GPU/MIG UUID -> pods it is allocated to, from podresources when it runs (looked up lazily)."""
        if self.host is None:
            return {}
        out: dict[str, list[dict]] = {}
        for provider in self.host.lookup("device_assignments"):
            try:
                table = provider.assignments()
            except Exception as exc:  # noqa: BLE001 - another component's trouble must not stop ours
                self.telemetry.error("device_assignments", f"podresources lookup failed: {exc}")
                continue
            for device_id, pods in (table or {}).items():
                # time-slicing replicas are advertised as "<uuid>::<n>" (NVIDIA's plugin) or "nvidia0/vgpu<n>",
                # "nvidia0/gi1/vgpu<n>" (GKE's): they are the same GPU or MIG device; each keeps its replica id
                device_id = str(device_id)
                key = device_id.split("::")[0]
                base, sep, replica = key.rpartition("/vgpu")
                if sep and replica.isdigit():
                    key = base
                entries = [dict(p) for p in pods]
                if key != device_id:
                    for e in entries:
                        e.setdefault("k8s.device.id", device_id)
                out.setdefault(key, []).extend(entries)
        return out

    # ------------------------------------------------------------------------------------------------ processes

    def _processes(self, b: MetricsBuilder, dev: Device, seen: set[int], utilization: bool) -> None:
        N, h = self.nvml, dev.handle
        memory: dict[int, int | None] = {}
        for kind in ("Compute", "Graphics", "MPSCompute"):
            # the _v3 symbols need driver R510+; older drivers have _v2 (same struct): fall back once
            name = f"nvmlDeviceGet{kind}RunningProcesses_v3"
            found = self._q(dev, name, getattr(N, name), h)
            if name in dev.unsupported:
                name = f"nvmlDeviceGet{kind}RunningProcesses_v2"
                found = self._q(dev, name, getattr(N, name), h)
            for p in found or ():
                used = p.usedGpuMemory  # None where the driver cannot say (no privilege)
                # a process with compute and graphics contexts is listed twice with the same memory
                if used is not None:
                    memory[p.pid] = max(used, memory.get(p.pid) or 0)
                else:
                    memory.setdefault(p.pid, None)
        if not memory:
            return
        samples = self._samples(dev) if utilization else None
        per_process = self.config.per_process
        # container identity -> [its Resource, then the sums of the figures below]: each None until one of its
        # processes gives that figure, so that a figure no process had is left out rather than summed to zero
        containers: dict[tuple, list] | None = {} if self.config.per_container else None
        for pid, used in memory.items():
            resource = self._process_resource(pid, dev)  # the process's Resource, kept across collections
            seen.add(pid)
            # memory, then the samples' sm, memory controller, encoder, decoder: no sample since the last call is
            # idle; samples None (not supported: MIG; or failed) leaves them out
            figures = (used,) + (() if samples is None else samples.get(pid, (0, 0, 0, 0)))
            if per_process:
                self._usage_points(b.adder(resource), figures, PROCESS_SPECS)
            if containers is not None:
                sums = self._container_sums(containers, resource, dev)
                if sums is not None:
                    for k, v in enumerate(figures, 1):
                        if v is not None:
                            sums[k] = v if sums[k] is None else sums[k] + v
        for resource, used, *util in (containers or {}).values():
            # a sum over processes can pass 100% where their samples overlap (MPS clients running at once): a
            # container cannot use more than the whole GPU
            figures = (used,) + (() if samples is None else tuple(None if v is None else min(v, 100) for v in util))
            self._usage_points(b.adder(resource), figures, CONTAINER_SPECS)

    @staticmethod
    def _usage_points(add, figures: tuple, specs: tuple) -> None:
        """Points of `figures` (memory, then, if sampled, the sm, memory controller, encoder and decoder percentages)
        as `specs` (memory, utilization, memory controller utilization): a process's or a container's."""
        memory, utilization, mem_ctrl = specs
        add(memory, figures[0])
        if len(figures) == 1:
            return
        _used, sm, mem, enc, dec = figures
        # NVML's SM utilization is the device's `general` task (hw.gpu.utilization's value for the same measure);
        # the memory controller's share is not a task: its own metric, as on the device
        for task, v in (("general", sm), ("encoder", enc), ("decoder", dec)):
            if v is not None:
                add(utilization, v / 100, {"hw.gpu.task": task})
        if mem is not None:
            add(mem_ctrl, mem / 100)

    def _container_sums(self, containers: dict, process: Resource, dev: Device) -> list | None:
        """The running sums of the container `process` belongs to on `dev`; None for a process outside any pod or
        container. Each container keeps one Resource per device while both live (found again by identity
        downstream, as processes' are)."""
        attrs = process.attributes
        ident = tuple(attrs.get(k) for k in CONTAINER_IDENTITY)
        if not any(ident):
            return None
        sums = containers.get(ident)
        if sums is None:
            key, own = (dev.uuid, ident), [attrs.get(k) for k in CONTAINER_ATTRIBUTES]
            hit = self._container_resources.get(key)
            if hit is None or hit[0] is not dev.resource or hit[1] != own:  # new, or its device rediscovered
                labels = {k: v for k, v in zip(CONTAINER_ATTRIBUTES, own, strict=True) if v is not None}
                hit = self._container_resources[key] = (dev.resource, own, Resource({**dev.resource, **labels}))
            self._containers_seen.add(key)
            sums = containers[ident] = [hit[2], None, None, None, None, None]
        return sums

    def _samples(self, dev: Device) -> dict[int, tuple[float | None, ...]] | None:
        """Per-PID utilization averaged over the samples newer than this device's last-seen timestamp.

        A lastSeen of 0 returns the driver's whole buffer, a lagging average: the first call asks for one
        collection interval back, later calls for what is newer than the newest sample seen (sample timestamps are
        wall-clock microseconds)."""
        N = self.nvml
        name = "nvmlDeviceGetProcessUtilization"
        if name in dev.unsupported:
            return None
        now = time.time()
        if not dev.last_seen or dev.last_seen > (now + 1) * 1_000_000:
            # first call; or the cursor is in the future because the clock stepped back (NTP's first sync at boot,
            # a VM resumed): samples newer than it would not come until the clock caught up
            dev.last_seen = int((now - self.config.collection_interval) * 1_000_000)
        try:
            try:
                raw = N.nvmlDeviceGetProcessUtilization(dev.handle, dev.last_seen)
            except N.NVMLError as exc:
                if exc.value != INSUFFICIENT_SIZE:
                    raise
                # a sample arrived between pynvml's size query and its read (it does not oversize this buffer):
                # a race, not an error of the GPU; once more
                raw = N.nvmlDeviceGetProcessUtilization(dev.handle, dev.last_seen)
        except N.NVMLError as exc:
            if exc.value == NOT_FOUND:
                if name in dev.failing:
                    self._ok(dev.failing, name)
                return {}  # no samples since last time: every process was idle
            if exc.value in REINIT_CODES:
                raise _Reinit(f"{name}: {self._name(exc)}") from None
            if exc.value == GPU_IS_LOST:
                raise _Lost(name) from None
            if exc.value in SKIP_CODES:
                dev.unsupported.add(name)
            self._count(dev, name, exc)
            return None
        if name in dev.failing:
            self._ok(dev.failing, name)
        acc: dict[int, list] = {}
        newest = dev.last_seen
        for s in raw:
            if s.timeStamp <= dev.last_seen:
                continue
            newest = max(newest, s.timeStamp)
            # per task: [sum, number of valid samples]. Drivers are known to fill some samples with garbage
            # (values like 2147483632, nvtop#110, DCGM#83): a percentage over 100 is not a measurement, so it is
            # left out of the average rather than reported as a utilization of millions
            a = acc.setdefault(s.pid, [[0, 0], [0, 0], [0, 0], [0, 0]])
            for k, v in enumerate((s.smUtil, s.memUtil, s.encUtil, s.decUtil)):
                if v <= 100:
                    a[k][0] += v
                    a[k][1] += 1
        dev.last_seen = newest
        # a task with samples but none valid: None (that point is left out; no sample at all means idle, 0)
        return {pid: tuple(t / n if n else None for t, n in a) for pid, a in acc.items()}

    def _process_resource(self, pid: int, dev: Device) -> Resource:
        """The process's attributes merged with the device's, as a Resource kept while both stay the same."""
        proc = self._process(pid)
        if proc is None:
            return Resource({**dev.resource, "process.pid": pid})
        hit = proc.resources.get(dev.uuid)
        if hit is not None and hit[0] is dev.resource:  # a rediscovered device has a new resource dict
            return hit[1]
        res = Resource({**dev.resource, **proc.attrs})
        proc.resources[dev.uuid] = (dev.resource, res)
        return res

    def _process(self, pid: int) -> _Proc | None:
        """The process NVML reports as `pid`, attributed; None when it cannot be seen under proc_root.

        /proc is read once per process: afterwards one faccessat through its /proc/<pid> fd per collection (or a
        start-time comparison) confirms the PID still names the same process; a reused PID is attributed anew."""
        proc = self._procs.get(pid)
        gone = None
        if proc is not None:
            if pid in self._checked or self._same(proc):
                self._checked.add(pid)
                return proc
            self._drop(pid)  # exited: the PID now names another process, or nothing
            gone = proc
        host_pid = pid
        if self._translate_pids:
            # current drivers number a process of podmeter's namespace as that namespace does: translated first,
            # since the same number under a host /proc is another process (2 is kthreadd). Older drivers report
            # host PIDs, which no process of podmeter's namespace has: those are looked up as they are
            host_pid = self._translate(pid) or pid
        info = self.attributor.lookup(host_pid)
        if info is None and gone is not None:
            # The process exited and its PID names nothing yet, but NVML still lists it while the driver tears its
            # contexts down (a collection or two): that memory is still its pod's. Reported as the process it was,
            # not as a process outside any pod (which would show up as host GPU use at every pod termination);
            # kept until NVML stops listing the PID (a new process on that PID is attributed anew).
            self._procs[pid] = gone
            self._checked.add(pid)
            return gone
        if info is None:
            self.telemetry.error("process_not_visible",
                                 f"PID {pid} that NVML reports is not under {self.config.proc_root} (exited, or "
                                 "podmeter does not see the host PID namespace: run with hostPID: true or mount "
                                 "the host /proc and set proc_root); reported without a pod")
            return None
        attrs = info.attributes()
        attrs["process.pid"] = host_pid
        attrs.update(self._proc_details(host_pid, info.start_time, info.uid))
        proc = _Proc(info.start_time, attrs, host_pid, self._open_proc(host_pid, info.start_time))
        self._procs[pid] = proc
        self._checked.add(pid)
        return proc

    def _same(self, proc: _Proc) -> bool:
        """Is the process still there (so its PID was not reused)?"""
        if proc.fd >= 0:
            # lookups under a /proc/<pid> fd fail (ESRCH) once its process is gone, whatever has the PID now
            return os.access("stat", os.F_OK, dir_fd=proc.fd)
        return read_start_time(self.attributor.proc_root, proc.host_pid) == proc.start_time

    def _open_proc(self, pid: int, start_time: int) -> int:
        """An fd on /proc/<pid> if it is the process that started at start_time; -1 over budget or on failure."""
        if self._fds >= self._fd_budget or os.access not in os.supports_dir_fd:
            return -1
        try:
            fd = os.open(f"{self.attributor.proc_root}/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return -1
        try:
            sfd = os.open("stat", os.O_RDONLY, dir_fd=fd)
            try:
                data = os.read(sfd, 4096)
            finally:
                os.close(sfd)
            same = int(data[data.rindex(b")") + 2:].split()[19]) == start_time
        except (OSError, ValueError, IndexError):
            same = False
        if not same:  # the PID changed hands since it was read: compare start times instead
            os.close(fd)
            return -1
        self._fds += 1
        return fd

    def _drop(self, pid: int) -> None:
        proc = self._procs.pop(pid, None)
        if proc is not None and proc.fd >= 0:
            self._fds -= 1
            proc.close()

    def _proc_details(self, pid: int, start_ticks: int, uid: int | None) -> dict:
        """process.* attributes, read once per process (PID and start time). `uid`: the real uid, as psutil's and
        gopsutil's username() use (the attributor read it from status), not the owner of /proc/<pid>, which is
        the effective uid (a setuid program shows its owner, not who ran it), and on old kernels root for any
        non-dumpable process."""
        root = self.attributor.proc_root
        out: dict = {}
        exe = _exe_path(f"{root}/{pid}/exe")
        if exe:
            out["process.executable.path"] = exe
            out["process.executable.name"] = os.path.basename(exe)
        try:
            if not exe:
                # exe cannot be read without ptrace-read access (see the README): comm, which the process may have
                # renamed (PyTorch's pt_main_thread), is the best name left
                with open(f"{root}/{pid}/comm", encoding="utf-8", errors="replace") as f:
                    out["process.executable.name"] = f.read().strip()
            with open(f"{root}/{pid}/cmdline", "rb") as f:
                argv0 = f.read(4096).split(b"\0", 1)[0]
            if argv0:
                out["process.command"] = argv0.decode("utf-8", "replace")
            if uid is None:  # no Uid line (not a procfs): the directory's owner is the best left
                uid = os.stat(f"{root}/{pid}").st_uid
            out["process.owner"] = self._owner(uid)
        except OSError:
            pass  # exited between calls: what we have is enough
        btime = self._boot_time()
        if btime is not None:
            started = btime + start_ticks / os.sysconf("SC_CLK_TCK")
            out["process.creation.time"] = datetime.fromtimestamp(started, UTC).isoformat(
                timespec="seconds").replace("+00:00", "Z")
        return out

    def _owner(self, uid: int) -> str:
        name = self._owners.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)  # a container user unknown to this image's /etc/passwd
            if len(self._owners) >= MAX_OWNERS:  # random uids (OpenShift's per-namespace ranges) come and go
                del self._owners[next(iter(self._owners))]
            self._owners[uid] = name
        return name

    def _boot_time(self) -> float | None:
        if self._btime is None:
            try:
                with open(f"{self.attributor.proc_root}/stat") as f:
                    for line in f:
                        if line.startswith("btime "):
                            self._btime = float(line.split()[1])
                            break
            except OSError:
                return None
        return self._btime

    def _forget_exited(self, seen: set[int]) -> None:
        """Keep caches to the processes on GPUs now: bounded under churn."""
        for pid in [p for p in self._procs if p not in seen]:
            # the attributor caches by the PID it looked up: the host PID, NVML's translated where podmeter is in
            # a PID namespace of its own
            self.attributor.forget(self._procs[pid].host_pid)
            self._drop(pid)
        self._ns_map = None

    # ------------------------------------------------------------------------------------------------ PID namespaces

    def _check_pid_namespace(self) -> None:
        """Say how NVML's PIDs are resolved when podmeter is not in the host's PID namespace."""
        root = self.attributor.proc_root
        try:
            # /proc/self/status's NSpid lists only the namespaces its procfs can see: a container's own /proc shows
            # one entry, as the host's does. The namespace's inode tells: the kernel's initial one is fixed
            nested = os.stat("/proc/self/ns/pid").st_ino != PROC_PID_INIT_INO
        except OSError:
            nested = False
        try:
            with open("/proc/self/status") as f:
                nested = nested or next((len(line.split()) > 2 for line in f if line.startswith("NSpid:")), False)
        except OSError:
            pass
        if not nested:
            return  # hostPID: NVML's PIDs are ours
        # proc_root's "self" is this process as that procfs's namespace sees it: more than one NSpid entry means
        # proc_root shows an outer (the host's) namespace
        try:
            me = read_process(root, int(os.readlink(f"{root}/self")))
        except (OSError, ValueError):
            me = None
        # only then can a PID of podmeter's namespace be translated; under its own /proc, NVML's PIDs are its
        self._translate_pids = me is not None and len(me.nspid) > 1
        how = (f"{root} shows the host PID namespace: PIDs of podmeter's own namespace are translated to host PIDs "
               "through NSpid, and host PIDs resolve directly"
               if self._translate_pids else
               f"{root} is this namespace's own /proc: other pods' processes are not visible; mount the host "
               "/proc and set proc_root, or run with hostPID: true")
        # a warning: drivers whose resource manager translates PIDs into the caller's namespace (the open kernel
        # modules' gpuGetProcWithObject; seen with 580 on an H200) leave out every process outside it
        self.logger.warning("podmeter is not in the host's PID namespace (hostPID off, or a node that is itself a "
                            "container): per-process GPU metrics need hostPID: true with current drivers, which "
                            "list only the processes of the caller's PID namespace; %s", how)

    def _translate(self, pid: int) -> int | None:
        """A PID in podmeter's own namespace -> host PID, from NSpid of the processes sharing that namespace."""
        if self._ns_map is None:
            self._ns_map = {}
            root = self.attributor.proc_root
            try:
                mine = os.readlink("/proc/self/ns/pid")
                for entry in os.scandir(root):
                    if not entry.name.isdigit():
                        continue
                    try:
                        if os.readlink(f"{root}/{entry.name}/ns/pid") != mine:
                            continue
                        info = read_process(root, int(entry.name))
                    except OSError:
                        continue
                    if info and info.nspid:
                        self._ns_map[info.nspid[-1]] = info.nspid[0]
            except OSError:
                pass
        return self._ns_map.get(pid)


def _line_up(before: list[Device], now: list[str | None]) -> dict[int, Device]:
    """Index -> the GPU it was, for indices whose UUID cannot be read now (None in `now`, the UUIDs by index).

    NVML enumerates GPUs in PCI bus order, so the others keep their order when one leaves the enumeration: between
    two GPUs identified both before and now, the unidentified indices are the GPUs known between the same two
    before and identified nowhere now, in order. Where more of those are left than unidentified indices (some also
    left the enumeration), the ones that were already failing are taken; if that is still ambiguous, none."""
    pos = {d.uuid: k for k, d in enumerate(before)}
    seen = {u for u in now if u is not None}
    out: dict[int, Device] = {}
    lo_now = lo_before = 0
    for i in range(len(now) + 1):
        if i < len(now) and now[i] not in pos:
            continue
        hi_before = pos[now[i]] if i < len(now) else len(before)
        gap = [j for j in range(lo_now, i) if now[j] is None]
        if gap:
            left = [d for d in before[lo_before:hi_before] if d.uuid not in seen]
            if len(left) != len(gap):
                left = [d for d in left if d.handle is None or d.lost]
            if len(left) == len(gap):
                out.update(zip(gap, left, strict=True))
        lo_now, lo_before = i + 1, max(lo_before, hi_before + 1)
    return out


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
