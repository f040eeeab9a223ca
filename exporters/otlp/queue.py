"""The sending queue: encoded OTLP requests waiting for a consumer, in memory or in a directory.

Items are serialized ExportMetricsServiceRequest bytes, so what is queued is bounded exactly, by `queue_size`
batches and by `max_bytes` bytes, and a persistent queue needs no second encoding. When the queue is full the
OLDEST waiting batch is dropped: for cumulative metrics the newest batch carries the most recent totals, so it is
worth more than the oldest. The newest batch is always taken, even alone over `max_bytes` (requests are split
under 3 MiB, so that bounds the excess).

The persistent queue keeps one file per batch (`<sequence>-<points>-<bytes>.otlp`, written to a temporary name and
renamed, so a kill leaves either the whole file or none; the size in the name tells a file that a power cut left
short, even one cut exactly between two messages, which still parses) and removes it once the batch is delivered or
given up. On start it picks up what a previous process left. Delivery is at-least-once: a batch in flight when the
process dies is sent again after the restart. By default files are not fsynced (as the collector's file_storage):
they survive the process being killed, not the machine losing power. With `fsync`, each file and then the directory
are flushed to disk before `put` returns: one disk flush per batch, a power loss loses nothing that was queued.
"""

from __future__ import annotations

import collections
import fcntl
import os
import re
import threading
from dataclasses import dataclass

# `<sequence>-<points>.otlp` is the name before the size was added to it: still read back
_FILE = re.compile(r"^(\d{20})-(\d+)(?:-(\d+))?\.otlp$")


@dataclass
class Item:
    seq: int
    points: int
    data: bytes | None = None  # None for a persistent item until it is read
    size: int = 0  # encoded bytes
    recovered: bool = False  # a file left by an earlier process (read back at start)
    error: str = ""  # why its stored bytes cannot be read: set by get()
    written: int | None = None  # the size its file name gives (None: a file named before names gave it)


class QueueLocked(Exception):
    """Another process holds the persistent queue directory."""


class SendingQueue:
    def __init__(self, capacity: int, directory: str = "", fsync: bool = False, max_bytes: int = 0) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes  # 0: no byte bound
        self._bytes = 0  # of the waiting items
        self.directory = directory
        self.fsync = fsync
        self._cond = threading.Condition()
        self._waiting: collections.deque[Item] = collections.deque()
        self._in_flight = 0
        self._retrying = 0  # consumers waiting to retry a failed send
        self._closed = False
        self._seq = 0
        self._lock_file = None
        self.trimmed: list[Item] = []  # stored batches dropped at start because they exceeded capacity
        if directory:
            os.makedirs(directory, exist_ok=True)
            self._lock_file = open(os.path.join(directory, ".lock"), "w")
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                self._lock_file.close()
                raise QueueLocked(f"{directory} is in use by another process") from exc
            found = []
            for name in os.listdir(directory):
                m = _FILE.match(name)
                if m:
                    try:
                        size = os.stat(os.path.join(directory, name)).st_size
                    except FileNotFoundError:
                        continue
                    written = int(m.group(3)) if m.group(3) else None
                    found.append(Item(int(m.group(1)), int(m.group(2)), size=size, recovered=True, written=written))
                elif name.endswith(".tmp"):  # a write interrupted by a kill: never complete, never queued
                    os.unlink(os.path.join(directory, name))
            found.sort(key=lambda i: i.seq)
            # queue_size or max_bytes may have shrunk since the files were written: keep the newest
            total = sum(i.size for i in found)
            while len(found) > capacity or (max_bytes and total > max_bytes and len(found) > 1):
                old = found.pop(0)
                total -= old.size
                self._remove(old)
                self.trimmed.append(old)
            self._waiting.extend(found)
            self._bytes = total
            self._seq = found[-1].seq + 1 if found else 0

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def path(self, item: Item) -> str:
        if item.written is None:
            return os.path.join(self.directory, f"{item.seq:020d}-{item.points}.otlp")
        return os.path.join(self.directory, f"{item.seq:020d}-{item.points}-{item.written}.otlp")

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    def nbytes(self) -> int:
        """Encoded bytes waiting (in memory, or on disk with a directory)."""
        return self._bytes

    def recovered(self) -> int:
        """Batches found on disk at start (before anything was put)."""
        return len(self._waiting)

    def put(self, data: bytes, points: int) -> list[Item]:
        """Queue a batch; returns the batches dropped to make room (oldest first)."""
        dropped: list[Item] = []
        with self._cond:
            item = Item(self._seq, points, data, len(data), written=len(data))
            self._seq += 1
            if self.directory:
                path = self.path(item)
                try:
                    with open(path + ".tmp", "wb") as f:
                        f.write(data)
                        if self.fsync:
                            f.flush()
                            os.fsync(f.fileno())
                    os.replace(path + ".tmp", path)
                except OSError:
                    # a full disk: the partial file would hold its blocks (and an inode per export) until the
                    # next start
                    try:
                        os.unlink(path + ".tmp")
                    except OSError:
                        pass
                    raise
                if self.fsync:
                    self._sync_directory()  # the rename itself is durable only once the directory is
                item.data = None  # the file holds it; memory stays bounded by what is in flight
            while self._waiting and (len(self._waiting) >= self.capacity
                                     or (self.max_bytes and self._bytes + item.size > self.max_bytes)):
                old = self._waiting.popleft()
                self._bytes -= old.size
                self._remove(old)
                dropped.append(old)
            self._waiting.append(item)
            self._bytes += item.size
            self._cond.notify()
        return dropped

    def get(self, timeout: float | None = None) -> tuple[Item, bytes] | None:
        """The oldest waiting batch and its bytes, or None when closed (or on timeout)."""
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return None
                if not self._cond.wait(timeout):
                    return None
            item = self._waiting.popleft()
            self._bytes -= item.size
            self._in_flight += 1
        data = item.data
        if data is None:
            data = self._read(item)
        return item, data

    def _read(self, item: Item) -> bytes:
        """A stored batch's bytes; b"" with `item.error` saying why when they cannot be read."""
        path = self.path(item)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            item.error = f"cannot read {path}: {exc.strerror or exc}"
            return b""
        if item.written is not None and len(data) != item.written:
            item.error = f"{path} holds {len(data)} of the {item.written} bytes written (cut short by a crash?)"
            return b""
        return data

    def done(self, item: Item, keep: bool = False) -> None:
        """The batch was delivered or given up (removed), or must stay for the next run (keep). An OSError
        removing the file (a read-only filesystem) is raised once the batch no longer counts as in flight."""
        try:
            if not keep:
                self._remove(item)
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def _remove(self, item: Item) -> None:
        if self.directory:
            try:
                os.unlink(self.path(item))
            except FileNotFoundError:
                pass

    def wait_empty(self, timeout: float, unless_retrying: bool = False) -> bool:
        """Wait until nothing waits or is in flight (True), or timeout, or (`unless_retrying`) a consumer waits
        to retry a failed send."""
        with self._cond:
            self._cond.wait_for(lambda: (not self._waiting and self._in_flight == 0)
                                or (unless_retrying and self._retrying > 0), timeout)
            return not self._waiting and self._in_flight == 0

    def retrying(self, n: int) -> None:
        """A consumer starts (+1) or ends (-1) waiting to retry a failed send."""
        with self._cond:
            self._retrying += n
            self._cond.notify_all()

    def close(self) -> None:
        """Consumers get None once the queue is empty; waiting ones wake now."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def abandon(self) -> list[Item]:
        """At shutdown: take what still waits. Persistent items stay on disk for the next start."""
        with self._cond:
            items = list(self._waiting)
            self._waiting.clear()
            self._bytes = 0
            self._closed = True
            self._cond.notify_all()
        return items

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
