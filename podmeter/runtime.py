"""The service: builds components from a validated config, runs collection on schedules, fans out to exporters.

Threads, one way: each receiver has a scheduler thread that collects on its own interval and pushes the batch
through every pipeline that lists it (one processor chain per pipeline); each exporter has a worker thread with
a bounded queue, so a slow, failing or hanging exporter never delays collection or the other exporters.

Start: a receiver or processor that cannot run on this host (no GPU, no socket) is reported once and the rest
runs; a receiver whose start has not returned within RECEIVER_START_TIMEOUT (a hung driver call) is a component
error while the rest runs, and is collected once its start returns. An exporter or extension that cannot start
(a port in use, a missing certificate, an unusable queue directory) is a configuration error, as in the
collector: `start()` raises StartError naming it and its cause, and `podmeter run` exits 1, rather than running
on with nowhere to send data.

Shutdown, bounded by `service.shutdown_timeout`: scheduling stops; exporters drain and flush while receivers and
processors release what they hold; a component whose shutdown has not returned by the deadline is abandoned
(logged once). Collections and shutdowns run on daemon threads, so a call wedged in the kernel or a library (a
FIFO, a hung NVML call) cannot keep the process from exiting.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import gc
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData

from podmeter.component import (
    Component,
    ComponentID,
    ComponentStatus,
    ComponentUnavailable,
    CreateSettings,
    Exporter,
    Host,
    Kind,
    Processor,
    Receiver,
    RestartRequired,
    registry,
)
from podmeter.config import Config
from podmeter.metrics import count_points
from podmeter.telemetry import ComponentTelemetry, Telemetry

log = logging.getLogger("podmeter")

EXPORTER_QUEUE_BATCHES = 64  # isolation buffer per exporter; otlp exporters keep their own sending_queue
# ... and at most this many points in it: a batch is about 170 bytes per point as SDK objects, so a hung exporter
# holds about 40 MiB here, not 64 batches of a 250-pod node (190 MiB)
EXPORTER_QUEUE_POINTS = 250_000
SHUTDOWN_GRACE = 1.0  # seconds past the shutdown deadline for exporters to wrap up, and then for extensions
# How long a receiver's start() is waited for before the rest starts without it. A receiver's start may call into a
# driver (nvmlInit and device discovery on a GPU in a bad state can hang for minutes): waited for without end, it
# kept every receiver after it from starting, and health at 503 "starting" naming nothing, so that the node had no
# metrics at all, not even between liveness restarts. Past this the receiver is a component error (health names it)
# and the others run; should its start return later, it is collected from then on (a slow CRI runtime at start).
RECEIVER_START_TIMEOUT = 20.0
MANDATORY: tuple[Kind, ...] = ("exporter", "extension")  # must start; receivers and processors may be unavailable


class StartError(Exception):
    """A component failed to start and the service runs with --strict."""


@dataclass
class Pipeline:
    id: str
    processors: list[tuple[str, Processor]]
    exporters: list[ExporterWorker]
    telemetry: Telemetry
    lock: threading.Lock = field(default_factory=threading.Lock)
    status: dict[str, ComponentStatus] = field(default_factory=dict)

    def process(self, data: MetricsData) -> MetricsData | None:
        return self.run(data)[0]

    def run(self, data: MetricsData) -> tuple[MetricsData | None, bool]:
        """Run the processor chain -> (output, refused). A processor that raises refuses this batch (counted,
        logged once); an empty output is filtering, not refusal."""
        with self.lock:  # receivers on different threads share this pipeline's processor instances
            for pid, proc in self.processors:
                n_in = count_points(data)
                self.telemetry.processor_in.labels(pid, self.id).inc(n_in)
                status = self.status.get(f"processor:{pid}:{self.id}")
                try:
                    data = proc.process(data)
                except Exception as exc:
                    _component_error(status, proc, f"process failed: {type(exc).__name__}: {exc}", type(exc).__name__)
                    return None, True
                if status is not None and status.state == "error":  # it works again: health and logs say so
                    _component_recovered(status, proc)
                self.telemetry.processor_out.labels(pid, self.id).inc(count_points(data))
                if data is None or not data.resource_metrics:
                    return None, False
        return data, False

    def consume(self, data: MetricsData) -> bool:
        """Process and fan out; False when a processor failure refused the batch."""
        out, refused = self.run(data)
        if out is not None:
            points = count_points(out)
            for worker in self.exporters:
                worker.enqueue(out, points)
        return not refused


def _component_error(status: ComponentStatus | None, component: Any, message: str, kind: str) -> None:
    """Count and log (once per kind: a timeout, then an exception type) an error the runtime caught; the cause is
    `internal:<kind>`, so that a collection that stops timing out and starts raising is logged again."""
    telemetry: ComponentTelemetry | None = getattr(component, "_podmeter_telemetry", None)
    if telemetry is not None:
        telemetry.error(f"internal:{kind}", message)
    else:
        log.warning("%s", message)
    if status is not None:
        status.state, status.message = "error", message


def _component_recovered(status: ComponentStatus | None, component: Any) -> None:
    telemetry: ComponentTelemetry | None = getattr(component, "_podmeter_telemetry", None)
    if telemetry is not None:
        telemetry.recovered("internal")
    if status is not None:
        status.state, status.message = "ok", ""


class ExporterWorker:
    """One exporter's thread and bounded queue. A full queue drops the oldest batch and counts it.

    The generic counters (podmeter_exporter_sent/send_failed/enqueue_failed_metric_points) count what export()
    returned, unless the exporter sets `reports_delivery`: an exporter with its own queue (otlp) returns once a
    batch is queued, so it counts deliveries itself through `ComponentTelemetry.sent()` and its siblings, and
    the worker counts only what never reached it (dropped here, raised, abandoned at shutdown).
    """

    def __init__(self, id: str, exporter: Exporter, telemetry: Telemetry, status: ComponentStatus,
                 capacity: int = EXPORTER_QUEUE_BATCHES, export_timeout: float = 30.0) -> None:
        self.id, self.exporter, self.telemetry, self.status = id, exporter, telemetry, status
        self.capacity = capacity
        self.export_timeout = export_timeout
        self.queue: collections.deque[MetricsData] = collections.deque()
        self.sizes: collections.deque[int] = collections.deque()  # points of each queued batch
        self.queued_points = 0
        self.max_points = EXPORTER_QUEUE_POINTS
        self.cond = threading.Condition()
        self.busy = False
        self.stopping = False
        self.closed = False
        self.raised = False  # the last failed export() raised: logged under "internal" until one succeeds
        self.reports_delivery = bool(getattr(exporter, "reports_delivery", False))
        self.thread = threading.Thread(target=self._loop, name=f"exporter-{id}", daemon=True)
        telemetry.exporter_queue_capacity.labels(id).set(capacity)
        # every outcome's series from the start, at 0 as the collector's: an alert on increase() or rate() of
        # send_failed sees the first failure (a series that appears with it reads as no increase)
        for counter in (telemetry.exporter_sent, telemetry.exporter_failed, telemetry.exporter_enqueue_failed):
            counter.labels(id)

    def start(self) -> None:
        self.thread.start()

    def enqueue(self, data: MetricsData, points: int | None = None) -> None:
        n = count_points(data) if points is None else points
        with self.cond:
            if self.closed:  # a collection that finished after shutdown had given up on this exporter
                self.telemetry.exporter_enqueue_failed.labels(self.id).inc(n)
                return
            # the oldest batches make room (the newest is always taken): at most `capacity` batches and
            # `max_points` points
            while self.queue and (len(self.queue) >= self.capacity or self.queued_points + n > self.max_points):
                self.queue.popleft()
                dropped = self.sizes.popleft()
                self.queued_points -= dropped
                self.telemetry.exporter_enqueue_failed.labels(self.id).inc(dropped)
            self.queue.append(data)
            self.sizes.append(n)
            self.queued_points += n
            self.telemetry.exporter_queue_size.labels(self.id).set(len(self.queue))
            self.cond.notify()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if not self.queue and self.stopping:
                    return
                data = self.queue.popleft()
                self.queued_points -= self.sizes.popleft()
                self.busy = True
                self.telemetry.exporter_queue_size.labels(self.id).set(len(self.queue))
            points = count_points(data)
            raised = False
            try:
                result = self.exporter.export(data, timeout_millis=self.export_timeout * 1000)
            except Exception as exc:
                result, raised = MetricExportResult.FAILURE, True
                _component_error(None, self.exporter, f"export raised {type(exc).__name__}: {exc}", type(exc).__name__)
            ok = result == MetricExportResult.SUCCESS or result is None
            if raised or not self.reports_delivery:
                (self.telemetry.exporter_sent if ok else self.telemetry.exporter_failed).labels(self.id).inc(points)
            if raised:
                self.raised = True
            elif ok and self.raised:  # clear only the cause it set: an exporter may use "internal" itself
                self.raised = False
                _component_recovered(None, self.exporter)
            with self.cond:
                self.busy = False
                self.cond.notify_all()

    def drain(self, deadline: float) -> bool:
        """Wait until everything queued was handed to the exporter, or the deadline passes."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            while self.queue or self.busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(remaining)
        return True

    def close(self, deadline: float) -> bool:
        """At shutdown: drain, then flush and shut the exporter down, by the deadline. What is still queued then
        is dropped, counted as send_failed and logged. True if everything was flushed."""
        flushed = self.drain(deadline)
        with self.cond:
            self.closed = True
            left, points = len(self.queue), self.queued_points
            self.queue.clear()
            self.sizes.clear()
            self.queued_points = 0
            self.telemetry.exporter_queue_size.labels(self.id).set(0)
            self.cond.notify_all()
        if left:
            self.telemetry.exporter_failed.labels(self.id).inc(points)
            log.warning("exporter %s: %d batches (%d points) not exported before the shutdown deadline: dropped",
                        self.id, left, points)
        try:
            if self.exporter.force_flush(timeout_millis=_ms_left(deadline)) is False:
                flushed = False
            self.exporter.shutdown(timeout_millis=_ms_left(deadline))
        except Exception as exc:
            log.warning("exporter %s: shutdown failed: %s: %s", self.id, type(exc).__name__, exc)
            return False
        return flushed


def _ms_left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic()) * 1000


class _Collector:
    """One daemon thread running a receiver's collect(), one call at a time (always the same thread, as the
    ThreadPoolExecutor before it). Not a ThreadPoolExecutor: Python joins its workers at exit, so one collection
    wedged in the kernel or a library (a FIFO, a hung NVML call) would keep the process from ever exiting."""

    def __init__(self, name: str, collect: Callable[[], Any]) -> None:
        self.collect = collect
        self.requests: queue.SimpleQueue[concurrent.futures.Future | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def submit(self) -> concurrent.futures.Future:
        if not self.thread.is_alive() and self.thread.ident is None:
            self.thread.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.requests.put(future)
        return future

    def close(self) -> None:
        self.requests.put(None)

    def _loop(self) -> None:
        while (future := self.requests.get()) is not None:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.collect())
            except BaseException as exc:  # handed to the scheduler, which counts and logs it
                future.set_exception(exc)


class ReceiverRunner:
    """Collects one receiver on its interval and feeds every pipeline that lists it."""

    def __init__(self, id: str, receiver: Receiver, config: Any, pipelines: list[Pipeline], telemetry: Telemetry,
                 status: ComponentStatus) -> None:
        self.id, self.receiver, self.pipelines, self.telemetry, self.status = id, receiver, pipelines, telemetry, status
        self.interval = float(getattr(config, "collection_interval", 10.0) or 10.0)
        self.initial_delay = float(getattr(config, "initial_delay", 0.0) or 0.0)
        self.timeout = float(getattr(config, "timeout", 0.0) or 0.0) or self.interval
        self.stop_event = threading.Event()
        self.wake = threading.Event()  # the pending collection finished, or stop() was called
        self.collector = _Collector(f"collect-{id}", receiver.collect)
        self.pending: concurrent.futures.Future | None = None
        self.thread = threading.Thread(target=self._loop, name=f"receiver-{id}", daemon=True)
        # every outcome's series from the start, at 0 (see ExporterWorker)
        telemetry.receiver_accepted.labels(id)
        telemetry.receiver_refused.labels(id)
        for outcome in ("ok", "error", "timeout", "skipped"):
            telemetry.receiver_collections.labels(id, outcome)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Stop scheduling; a collection in progress is no longer waited for."""
        self.stop_event.set()
        self.wake.set()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        self.collector.close()  # a wedged collection keeps its (daemon) thread; nothing waits for it

    def _loop(self) -> None:
        if self.stop_event.wait(self.initial_delay):
            return
        next_tick = time.monotonic()
        while not self.stop_event.is_set():
            self.collect_once()
            next_tick += self.interval
            now = time.monotonic()
            if next_tick < now:  # fell behind (slow collection): skip missed ticks rather than burst
                next_tick = now + self.interval
            if self.stop_event.wait(next_tick - now):
                return

    def collect_once(self) -> None:
        if self.pending is not None and not self.pending.done():
            self.telemetry.receiver_collections.labels(self.id, "skipped").inc()
            return
        started = time.perf_counter()
        future = self.pending = self.collector.submit()
        future.add_done_callback(lambda _: self.wake.set())
        deadline = time.monotonic() + self.timeout
        while not future.done() and not self.stop_event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wake.wait(remaining):
                break
            self.wake.clear()
        try:
            if not future.done():
                if self.stop_event.is_set():  # shutting down: abandoned, not a timeout
                    return
                self.telemetry.receiver_collections.labels(self.id, "timeout").inc()
                _component_error(self.status, self.receiver, f"collection exceeded its timeout of {self.timeout:g}s",
                                 "timeout")
                return
            data = future.result(0)
        except Exception as exc:
            self.telemetry.receiver_collections.labels(self.id, "error").inc()
            _component_error(self.status, self.receiver, f"collection failed: {type(exc).__name__}: {exc}",
                             type(exc).__name__)
            self.status.restart = isinstance(exc, RestartRequired)
            return
        finally:
            self.telemetry.receiver_duration.labels(self.id).observe(time.perf_counter() - started)
        self.telemetry.receiver_collections.labels(self.id, "ok").inc()
        if self.status.state == "error":
            _component_recovered(self.status, self.receiver)
            self.status.restart = False
        if data is None:
            return
        points = count_points(data)
        refused = sum(not pipeline.consume(data) for pipeline in self.pipelines)
        if refused:
            self.telemetry.receiver_refused.labels(self.id).inc(points)
        else:
            self.telemetry.receiver_accepted.labels(self.id).inc(points)


class Service:
    def __init__(self, config: Config, telemetry: Telemetry | None = None, strict: bool = False,
                 stopping: threading.Event | None = None) -> None:
        self.config = config
        self.strict = strict
        # set by the caller on SIGTERM: a receiver start still running is no longer waited for
        self.stopping = stopping or threading.Event()
        self._late: dict[str, _PendingStart] = {}  # receivers whose start outlasted RECEIVER_START_TIMEOUT
        self._runners_lock = threading.Lock()  # a late start adds its runner while shutdown may be stopping them
        self.telemetry = telemetry or Telemetry()
        self.host = Host()
        self.status: dict[str, ComponentStatus] = {}
        self.receivers: dict[str, Receiver] = {}
        self.exporters: dict[str, ExporterWorker] = {}
        self.extensions: dict[str, Component] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self.runners: list[ReceiverRunner] = []
        self._telemetry_server = None
        self._fatal: list[str] = []  # exporters and extensions that could not be created or started, one line each
        self.host.publish("component_status", self)
        self._build()

    # -- construction -------------------------------------------------------------------------------------

    def _create(self, kind: Kind, cid: ComponentID, pipeline: str = "") -> Any:
        factory = registry().get(kind, cid.type)
        assert factory is not None, f"{kind} {cid} passed validation without a factory"
        cfg = self.config.section(kind)[cid]
        name = str(cid) if not pipeline else f"{cid} in {pipeline}"
        logger = logging.getLogger(f"podmeter.{kind}.{cid}")
        ct = ComponentTelemetry(self.telemetry, str(cid), logger)
        settings = CreateSettings(id=cid, kind=kind, logger=logger, telemetry=ct, pipeline=pipeline)
        try:
            component = factory.create(settings, cfg)
        except ComponentUnavailable:
            raise
        except Exception as exc:
            raise StartError(f"{kind} {name}: cannot be created: {type(exc).__name__}: {exc}") from exc
        try:
            component._podmeter_telemetry = ct
        except AttributeError:  # e.g. a slotted third-party exporter
            pass
        return component

    def _build(self) -> None:
        svc = self.config.service
        for ext in svc.extensions:
            self._add(f"extension:{ext}", "extension", lambda e=ext: self.extensions.__setitem__(
                e, self._create("extension", ComponentID.parse(e))))
        exporter_pipelines: dict[str, list[str]] = {}
        receiver_pipelines: dict[str, list[str]] = {}
        for pid, p in svc.pipelines.items():
            for e in p.exporters:
                exporter_pipelines.setdefault(e, []).append(pid)
            for r in p.receivers:
                receiver_pipelines.setdefault(r, []).append(pid)
        for eid, pids in exporter_pipelines.items():
            def make_exporter(eid=eid):
                exporter = self._create("exporter", ComponentID.parse(eid))
                self.exporters[eid] = ExporterWorker(eid, exporter, self.telemetry, self.status[f"exporter:{eid}"])
            self._add(f"exporter:{eid}", "exporter", make_exporter, pids)
        for pid, p in svc.pipelines.items():
            procs: list[tuple[str, Processor]] = []
            pipeline = Pipeline(pid, procs, [], self.telemetry, status=self.status)
            for proc_id in p.processors:
                key = f"processor:{proc_id}:{pid}"
                self._add(key, "processor", lambda proc_id=proc_id, procs=procs, pid=pid: procs.append(
                    (proc_id, self._create("processor", ComponentID.parse(proc_id), pid))), [pid])
            self.pipelines[pid] = pipeline
        for rid, pids in receiver_pipelines.items():
            self._add(f"receiver:{rid}", "receiver", lambda rid=rid: self.receivers.__setitem__(
                rid, self._create("receiver", ComponentID.parse(rid))), pids)

    def _add(self, key: str, kind: Kind, create, pipelines: list[str] | None = None) -> None:
        status = self.status[key] = ComponentStatus(id=key.split(":", 1)[1], kind=kind, pipelines=pipelines or [])
        try:
            create()
        except ComponentUnavailable as exc:
            if kind in MANDATORY:
                self._failed(status, f"cannot be created: {exc}")
            else:
                self._unavailable(status, str(exc))
        except StartError as exc:
            if self.strict:
                raise
            status.state, status.message = "error", str(exc)
            if kind in MANDATORY:
                self._fatal.append(str(exc))
            else:
                log.error("%s", exc)

    def _failed(self, status: ComponentStatus, message: str) -> None:
        """An exporter or extension that cannot run: start() raises StartError once the others are checked."""
        status.state, status.message = "error", message
        line = f"{status.kind} {status.id} {message}"
        if self.strict:
            raise StartError(line)
        self._fatal.append(line)

    def _unavailable(self, status: ComponentStatus, reason: str) -> None:
        if self.strict:
            raise StartError(f"{status.kind} {status.id} cannot run on this host: {reason}")
        status.state, status.message = "unavailable", reason
        log.warning("%s %s is not available on this host and is disabled: %s", status.kind, status.id, reason)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def _start_component(self, key: str, component: Component) -> bool:
        status = self.status[key]
        try:
            if status.kind == "receiver":
                _start_bounded(component, self.host, RECEIVER_START_TIMEOUT, self.stopping)
            else:
                component.start(self.host)
        except _PendingStart as pending:
            if self.stopping.is_set():  # a signal cut the start short: the stop asked for, not a failure to start
                status.state, status.message = "stopped", str(pending)
                log.info("%s %s %s", status.kind, status.id, pending)
                return False
            if self.strict:
                raise StartError(f"{status.kind} {status.id} failed to start: {pending}") from None
            status.state, status.message = "error", str(pending)
            log.error("%s %s %s", status.kind, status.id, pending)
            self._late[status.id] = pending
            return False
        except ComponentUnavailable as exc:
            if status.kind in MANDATORY:  # e.g. a port in use or a missing certificate: not an optional absence
                self._failed(status, f"failed to start: {exc}")
            else:
                self._unavailable(status, str(exc))
            return False
        except Exception as exc:
            message = f"failed to start: {type(exc).__name__}: {exc}"
            if status.kind in MANDATORY:
                self._failed(status, message)
                return False
            if self.strict:
                raise StartError(f"{status.kind} {status.id} {message}") from exc
            status.state, status.message = "error", message
            log.error("%s %s %s", status.kind, status.id, message)
            return False
        status.state = "ok"
        return True

    def start_components(self, exporters: bool = True) -> None:
        """Start in dependency order: extensions, exporters, processors, receivers (receivers not scheduled).

        With exporters=False (collect --once) extensions and exporters are left unstarted: nothing binds a port.
        An extension or exporter that cannot be created or started raises StartError naming every such one, after
        what had started is shut down again.
        """
        if not exporters:
            self.extensions.clear()
            self.exporters.clear()
        for eid, ext in list(self.extensions.items()):
            if not self._start_component(f"extension:{eid}", ext):
                del self.extensions[eid]
        for eid, worker in list(self.exporters.items()):
            if self._start_component(f"exporter:{eid}", worker.exporter):
                worker.start()
            else:
                del self.exporters[eid]
        if exporters:
            self._check_fatal()
        for pid, pipeline in self.pipelines.items():
            kept = []
            for proc_id, proc in pipeline.processors:
                if self._start_component(f"processor:{proc_id}:{pid}", proc):
                    kept.append((proc_id, proc))
            pipeline.processors[:] = kept
            # a pipeline whose processor failed still runs without it: losing enrichment beats losing data
            pipeline.exporters = [self.exporters[e] for e in self.config.service.pipelines[pid].exporters
                                  if e in self.exporters]
        for rid, receiver in list(self.receivers.items()):
            if not self._start_component(f"receiver:{rid}", receiver):
                del self.receivers[rid]
        self._notify_extensions()

    def start(self) -> None:
        self._start_telemetry_server()
        self.start_components()
        for rid, receiver in self.receivers.items():
            self._run_receiver(rid, receiver)
        for rid, pending in self._late.items():
            threading.Thread(target=self._start_late, args=(rid, pending), name=f"late-start-{rid}",
                             daemon=True).start()
        running = [k for k, s in self.status.items() if s.state == "ok"]
        log.info("podmeter started: %d pipelines, %d components running (%s)", len(self.pipelines), len(running),
                 ", ".join(running))

    def _run_receiver(self, rid: str, receiver: Receiver) -> None:
        pipes = [self.pipelines[p] for p in self.status[f"receiver:{rid}"].pipelines]
        runner = ReceiverRunner(rid, receiver, self.config.receivers[ComponentID.parse(rid)], pipes,
                                self.telemetry, self.status[f"receiver:{rid}"])
        self.runners.append(runner)
        runner.start()

    def _start_late(self, rid: str, pending: _PendingStart) -> None:
        """Wait for a receiver's start that outlasted RECEIVER_START_TIMEOUT; run it if it returns before shutdown."""
        while not pending.done.wait(1.0):
            if self.stopping.is_set():
                return
        status = self.status[f"receiver:{rid}"]
        with self._runners_lock:
            if self.stopping.is_set():
                return
            error = pending.outcome[0]
            if isinstance(error, ComponentUnavailable):
                self._unavailable(status, str(error))
            elif error is not None:
                status.state, status.message = "error", f"failed to start: {type(error).__name__}: {error}"
                log.error("receiver %s %s", rid, status.message)
            else:
                status.state, status.message = "ok", ""
                log.info("receiver %s started late (after more than %gs): collecting from now on", rid,
                         RECEIVER_START_TIMEOUT)
                self.receivers[rid] = pending.component
                self._run_receiver(rid, pending.component)

    def _check_fatal(self) -> None:
        if not self._fatal:
            return
        # release what did start (ports, queue directories): the caller exits, or a test starts another service
        tasks = [(f"exporter {eid}", lambda w=worker: w.close(time.monotonic() + 2.0))
                 for eid, worker in self.exporters.items() if worker.thread.is_alive()]
        tasks += [(f"extension {eid}", ext.shutdown) for eid, ext in self.extensions.items()
                  if self.status[f"extension:{eid}"].state == "ok"]
        tasks.append(("self-telemetry server", self._stop_telemetry_server))
        _run_bounded(tasks, time.monotonic() + 2.0)
        raise StartError("; ".join(self._fatal))

    def _start_telemetry_server(self) -> None:
        cfg = self.config.service.telemetry.metrics
        if cfg.level == "none":
            return
        from podmeter.config import split_endpoint
        from podmeter.telemetry import serve

        host, port = split_endpoint(cfg.address)
        try:
            self._telemetry_server = serve(self.telemetry.registry, host, port)
        except OSError as exc:
            message = f"cannot serve self-telemetry on {cfg.address}: {exc.strerror or exc}"
            if self.strict:
                raise StartError(message) from exc
            log.warning("%s", message)

    def statuses(self) -> dict[str, ComponentStatus]:
        return dict(self.status)

    def failing(self) -> list[ComponentStatus]:
        return [s for s in self.status.values() if s.state == "error"]

    def _notify_extensions(self) -> None:
        for ext in self.extensions.values():
            setter = getattr(ext, "set_status", None)
            if setter:
                setter(self.statuses())

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop scheduling; drain and flush exporters while receivers and processors shut down, all by the deadline
        (`shutdown_timeout`); then extensions. A component whose shutdown has not returned by then is abandoned
        and logged once. True if every exporter flushed everything in time."""
        timeout = self.config.service.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._runners_lock:  # no receiver whose start returned late is added from here on
            self.stopping.set()
        for runner in self.runners:
            runner.stop()
        for runner in self.runners:
            runner.join(max(0.0, min(2.0, deadline - time.monotonic())))
        # Nothing is collected any more, so exporters need nothing from receivers: they drain side by side with
        # the receivers' and processors' shutdowns, and a receiver stuck behind a wedged call delays nothing.
        flushed: dict[str, bool] = {}
        tasks: list[tuple[str, Callable[[], Any]]] = []
        for eid, worker in self.exporters.items():
            tasks.append((f"exporter {eid}", lambda eid=eid, w=worker: flushed.__setitem__(eid, w.close(deadline))))
        tasks += [(f"receiver {rid}", r.shutdown) for rid, r in self.receivers.items()]
        tasks += [(f"processor {proc_id} in {pid}", proc.shutdown) for pid, pipeline in self.pipelines.items()
                  for proc_id, proc in pipeline.processors]
        # past the deadline, an exporter still counts and logs what it drops and closes its connections (with no
        # time left): the grace lets that finish before anything is called abandoned
        _run_bounded(tasks, deadline + SHUTDOWN_GRACE)
        for eid in self.exporters:
            self.status[f"exporter:{eid}"].state = "stopped"
        for rid in self.receivers:
            self.status[f"receiver:{rid}"].state = "stopped"
        tasks = [(f"extension {eid}", ext.shutdown) for eid, ext in self.extensions.items()]
        tasks.append(("self-telemetry server", self._stop_telemetry_server))
        _run_bounded(tasks, max(deadline, time.monotonic() + SHUTDOWN_GRACE))
        return all(flushed.get(eid, False) for eid in self.exporters)  # an abandoned exporter did not flush

    def _stop_telemetry_server(self) -> None:
        server = self._telemetry_server[0] if isinstance(self._telemetry_server, tuple) else None
        self._telemetry_server = None
        if server is not None:
            server.shutdown()
            server.server_close()

    # -- one-shot collection (podmeter collect --once) ------------------------------------------------------

    def collect_once(self, wait_timeout: float = 30.0) -> MetricsData:
        """Start components, wait for metadata and event windows, collect every receiver once, process."""
        self.start_components(exporters=False)
        deadline = time.monotonic() + wait_timeout
        # receivers' metadata too (the CRI and kubelet caches): a first sync that failed at start is retried
        # meanwhile, and their ready() says at once when there is nothing to wait for (no socket)
        for component in [*self.receivers.values(), *(p for pl in self.pipelines.values() for _, p in pl.processors)]:
            component.ready(max(0.0, deadline - time.monotonic()))
        windows = [float(getattr(self.config.receivers[ComponentID.parse(rid)], "collection_interval", 0) or 0)
                   for rid, r in self.receivers.items() if r.counts_events]
        if windows:
            time.sleep(max(windows))
        out: list[MetricsData] = []
        for rid, receiver in self.receivers.items():
            try:
                data = receiver.collect()
            except Exception as exc:
                log.error("receiver %s: collection failed: %s: %s", rid, type(exc).__name__, exc)
                continue
            for pid in self.status[f"receiver:{rid}"].pipelines:
                processed = self.pipelines[pid].process(data)
                if processed is not None:
                    out.append(processed)
        self.shutdown(timeout=5.0)
        return MetricsData(resource_metrics=[rm for d in out for rm in d.resource_metrics])


# Net allocations of container objects between two passes of the cyclic garbage collector's youngest generation.
# A collection's batch is tens of thousands of such objects (points, metrics, their lists) that live until the
# exporters are done and are then freed by reference counting: they hold no cycles. With Python's default of 700,
# each batch is walked by one or more passes while it is alive, for nothing (10 ms per collection at 250 pods).
# Above a batch's size, a batch is usually freed before a pass comes; the passes that do come walk what stayed.
GC_YOUNG_THRESHOLD = 100_000


def tune_gc() -> None:
    """For a long-running agent, once started: what start built (modules, config, components) lives as long as
    the agent and is moved out of the collector's generations (`gc.freeze()`), so its full passes no longer walk
    it again and again; and the youngest generation is collected after `GC_YOUNG_THRESHOLD` net allocations."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


# glibc malloc: blocks from this size up are mmap'd (and unmapped when freed), and the heap's free top is given back
# above this size. glibc's defaults start there too but rise with every large block freed (up to 32 MiB and 64 MiB),
# after which a collection's and an export's transient buffers (exposition text, gzip output, big lists) stay in
# the heap as RSS. Pinned, the agent's peak RSS at 250 pods was 3-4 MiB lower, at no measurable CPU.
MALLOC_THRESHOLD = 128 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def tune_malloc() -> bool:
    """Pin glibc's mmap and trim thresholds (MALLOC_THRESHOLD) unless MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ set them in the environment; False where there is no glibc mallopt (musl)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD))


class _PendingStart(Exception):
    """A receiver's start still running past its timeout (on its own daemon thread, which does not hold up the
    exit): `done` is set, and `outcome` holds what it raised or None, once it returns."""

    def __init__(self, message: str, component: Component, done: threading.Event,
                 outcome: list[BaseException | None]) -> None:
        super().__init__(message)
        self.component, self.done, self.outcome = component, done, outcome


def _start_bounded(component: Component, host: Host, timeout: float, stopping: threading.Event) -> None:
    """component.start(host) on a daemon thread, waited for up to `timeout` or until `stopping` is set: what it
    raised is raised here; a start still running then raises _PendingStart."""
    outcome: list[BaseException | None] = []
    done = threading.Event()

    def run() -> None:
        try:
            component.start(host)
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)
        else:
            outcome.append(None)
        done.set()

    threading.Thread(target=run, name="start", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
        if stopping.is_set():
            raise _PendingStart("start abandoned: the agent is stopping", component, done, outcome)
        if time.monotonic() >= deadline:
            raise _PendingStart(f"start has not returned after {timeout:g}s (a hung driver or kernel call?); the "
                                "others run meanwhile", component, done, outcome)
    if outcome[0] is not None:
        raise outcome[0]


def _run_bounded(tasks: list[tuple[str, Callable[[], Any]]], deadline: float) -> list[str]:
    """Run each (name, fn) on its own daemon thread and wait for them until the deadline; return the names of
    those still running, each logged once as abandoned (a daemon thread does not hold up the exit)."""
    threads = []
    for name, fn in tasks:
        thread = threading.Thread(target=_guarded, args=(name, fn), name=f"shutdown {name}", daemon=True)
        thread.start()
        threads.append((name, thread))
    abandoned = []
    for name, thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            abandoned.append(name)
            log.warning("%s: shutdown did not return before the shutdown deadline: abandoned", name)
    return abandoned


def _guarded(name: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as exc:
        log.warning("%s: shutdown failed: %s: %s", name, type(exc).__name__, exc)
