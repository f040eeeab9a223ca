"""XID errors from NVML events. The driver queues an event for each critical XID on every event set that has the GPU
registered; one set per NVML session, each GPU registered once, drained without waiting at each collection (no
thread blocks in the driver). The counts are podmeter's own (events seen while it watched), per GPU UUID and XID,
and outlive a driver reload; an XID raised while no set was open (before the start, during a reload) is not seen."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

XID_CRITICAL = 0x8       # nvmlEventTypeXidCriticalError
TIMEOUT = 10             # NVML_ERROR_TIMEOUT: nothing queued
MAX_EVENTS = 1000        # per collection; a larger burst is read at the next collections
MAX_XIDS_PER_GPU = 256   # distinct XIDs counted per GPU (NVIDIA's catalogue has fewer): bounds memory

# call(name, function, *args): the receiver's guarded call on the GPU at hand (None on an error it counted)
Call = Callable[..., Any]


def _address(handle) -> int | None:
    return ctypes.cast(handle, ctypes.c_void_p).value


class XidWatcher:
    def __init__(self, nvml) -> None:
        self.nvml = nvml
        self._events = None                  # this session's nvmlEventSet_t
        self._watched: dict[int, str] = {}   # registered device handle (address) -> GPU UUID
        self.counts: dict[str, dict[int, int]] = {}  # GPU UUID -> XID -> events seen; bounded by the node's GPUs
        self.reading = True  # False once the driver turned out unable to read events (until the next session)

    def watch(self, call: Call, handle, uuid: str) -> None:
        """Register a GPU for XID events (once per session: handles are the session's)."""
        if not self.reading:
            return
        addr = _address(handle)
        if addr in self._watched:
            self._watched[addr] = uuid
            return
        N = self.nvml
        if self._events is None:
            self._events = call("nvmlEventSetCreate", N.nvmlEventSetCreate)
            if self._events is None:
                return

        def register(h, events):  # pynvml answers None on success
            N.nvmlDeviceRegisterEvents(h, XID_CRITICAL, events)
            return True

        if call("nvmlDeviceRegisterEvents", register, handle, self._events):
            self._watched[addr] = uuid

    def drain(self) -> None:
        """Count the queued XID events. Raises NVMLError when the set cannot be read (not for an empty queue)."""
        if self._events is None or not self.reading:
            return
        N = self.nvml
        for _ in range(MAX_EVENTS):
            try:
                event = N.nvmlEventSetWait_v2(self._events, 0)
            except N.NVMLError as exc:
                if exc.value == TIMEOUT:
                    return
                raise
            uuid = self._watched.get(_address(event.device))
            if not event.eventType & XID_CRITICAL or uuid is None:
                continue
            seen = self.counts.setdefault(uuid, {})
            xid = int(event.eventData)
            if xid in seen or len(seen) < MAX_XIDS_PER_GPU:
                seen[xid] = seen.get(xid, 0) + 1

    def close(self) -> None:
        """Free the event set (at shutdown, and when the NVML session is lost: a new one registers again); the
        counts stay."""
        events, self._events = self._events, None
        self._watched.clear()
        if events is not None:
            try:
                self.nvml.nvmlEventSetFree(events)
            except self.nvml.NVMLError:
                pass  # the set goes with the session either way
