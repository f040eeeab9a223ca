"""otlp (gRPC) and otlphttp exporters: push to an OTLP receiver (a collector gateway, a backend).

export() encodes the batch (`encode.py`: opentelemetry-proto's messages, byte-identical to what
opentelemetry-exporter-otlp's encoder makes, at about half its cost), puts the bytes on the sending queue and
returns; `num_consumers` threads send from the queue, retrying retryable failures with exponential backoff
(`retry_on_failure`). A full queue (`queue_size` batches or `max_bytes` bytes) drops its oldest batch. With
`sending_queue.storage` the queue lives in a directory and what was not delivered is sent after a restart,
including after SIGKILL.

Since export() returns once a batch is queued, the exporter counts outcomes itself (`reports_delivery`): the
runtime's podmeter_exporter_sent_metric_points when the backend accepted points, send_failed when they were
rejected, given up after retries or abandoned at shutdown, enqueue_failed when the queue dropped them.
"""

from __future__ import annotations

import random
import re
import threading
import time

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricExporter, MetricExportResult, MetricsData

from podmeter.component import ComponentUnavailable, Exporter, Factory, Stability
from podmeter.metrics import count_points

from .config import OTLPGrpcConfig, OTLPHttpConfig
from .encode import Encoder, split_request
from .queue import QueueLocked, SendingQueue
from .senders import GrpcSender, HttpSender, Outcome
from .temporality import DeltaConverter


class OTLPExporter(Exporter):
    sender_class: type = GrpcSender
    type_name = "otlp"
    reports_delivery = True  # see the module docstring
    max_request_bytes = 3 * 1024 * 1024  # under the 4 MiB gRPC default receive limit, with room to spare

    def __init__(self, settings, config) -> None:
        super().__init__()
        self.settings = settings
        self.config = config
        self.encoder = Encoder()
        self.logger = settings.logger
        self.telemetry = settings.telemetry
        prefix = f"podmeter_{self.type_name}_exporter"
        t = settings.telemetry
        self._sent = t.counter(f"{prefix}_sent_metric_points", "Points delivered to the backend")
        self._failed = t.counter(f"{prefix}_send_failed_metric_points",
                                 "Points given up: permanent error, retries exhausted, or unsent at shutdown")
        self._retries = t.counter(f"{prefix}_retries", "Send attempts that failed with a retryable error")
        self._dropped = t.counter(f"{prefix}_dropped_metric_points",
                                  "Points dropped, by cause (queue_full, rejected by the backend)", ["cause"])
        self._queue_size = t.gauge(f"{prefix}_queue_size", "Batches waiting in the sending queue")
        self._queue_capacity = t.gauge(f"{prefix}_queue_capacity", "Capacity of the sending queue in batches")
        self._queue_bytes = t.gauge(f"{prefix}_queue_size_bytes", "Encoded bytes waiting in the sending queue")
        self._delta = DeltaConverter() if config.temporality_preference == "delta" else None
        self._delta_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._active = 0  # export() calls sending without a queue (on the runtime's worker thread)
        self._active_cond = threading.Condition()
        self.queue: SendingQueue | None = None
        self.sender = None
        self._last_warning = ""  # the last partial-success warning logged
        self._split_logged = False  # "request too large, split" said once
        if self._delta is not None:
            # what an SDK MetricReader would ask of this exporter (as the SDK's OTLP delta preference)
            from opentelemetry.sdk.metrics import Counter, Histogram, ObservableCounter

            delta = AggregationTemporality.DELTA
            MetricExporter.__init__(self, preferred_temporality={Counter: delta, Histogram: delta,
                                                                 ObservableCounter: delta})

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, host) -> None:
        # A failure here is a configuration error (a missing certificate, an unusable queue directory): the
        # runtime treats an exporter that cannot start as fatal, whatever exception says so.
        try:
            self.sender = self.sender_class(self.config)
        except (OSError, ValueError) as exc:
            raise ComponentUnavailable(f"cannot set up the connection to {self.config.endpoint}: {exc}") from exc
        q = self.config.sending_queue
        if q.enabled:
            directory = ""
            if q.storage:
                directory = f"{q.storage.rstrip('/')}/exporter_{_safe(str(self.settings.id))}"
            try:
                self.queue = SendingQueue(q.queue_size, directory, fsync=q.fsync, max_bytes=q.max_bytes)
            except QueueLocked as exc:
                raise ComponentUnavailable(f"sending_queue::storage: {exc}") from exc
            except OSError as exc:
                raise ComponentUnavailable(f"sending_queue::storage: cannot use {directory}: "
                                           f"{exc.strerror or exc}") from exc
            if self.queue.trimmed:
                n = sum(i.points for i in self.queue.trimmed)
                self._dropped.labels("queue_full").inc(n)
                self.telemetry.enqueue_failed(n)
                self.logger.warning("dropped the %d oldest stored batches (%d points) beyond queue_size %d or "
                                    "max_bytes %d", len(self.queue.trimmed), n, q.queue_size, q.max_bytes)
            if self.queue.recovered():
                self.logger.info("sending %d batches left in %s by a previous run", self.queue.recovered(), directory)
            self._queue_capacity.set(q.queue_size)
            self._queue_size.set_function(lambda: len(self.queue) if self.queue else 0)
            self._queue_bytes.set_function(lambda: self.queue.nbytes() if self.queue else 0)
            for i in range(q.num_consumers):
                t = threading.Thread(target=self._consume, name=f"{self.settings.id}-sender-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        if self._delta is not None:
            with self._delta_lock:
                metrics_data = self._delta.convert(metrics_data)
        points = count_points(metrics_data)
        if not points:
            return MetricExportResult.SUCCESS
        if self.sender is None:  # not started (`podmeter collect --once` never starts exporters)
            self._failed.inc(points)
            self.telemetry.send_failed(points)
            return MetricExportResult.FAILURE
        if self._stop.is_set():
            self._abandoned(points, "exported after the exporter shut down")
            return MetricExportResult.FAILURE
        chunks = self._encode(metrics_data)
        if self.queue is None:  # no queue: send now, retrying within this call
            return self._send_now(chunks, time.monotonic() + timeout_millis / 1000)
        dropped = []
        for i, (data, n) in enumerate(chunks):
            try:
                dropped += self.queue.put(data, n)
            except OSError as exc:
                lost = sum(m for _, m in chunks[i:])
                self.telemetry.error("storage", f"cannot write to the persistent queue: {exc}")
                self._dropped.labels("storage").inc(lost)
                self.telemetry.enqueue_failed(lost)
                return MetricExportResult.FAILURE
        self.telemetry.recovered("storage")
        if dropped:
            n = sum(i.points for i in dropped)
            q = self.config.sending_queue
            self._dropped.labels("queue_full").inc(n)
            self.telemetry.enqueue_failed(n)
            self.telemetry.error("queue_full", f"sending queue full ({q.queue_size} batches or {q.max_bytes} bytes): "
                                 f"dropped the {len(dropped)} oldest batches ({n} points); the backend is not "
                                 "keeping up or is unreachable")
        else:
            self.telemetry.recovered("queue_full")
        return MetricExportResult.SUCCESS

    def _send_now(self, chunks: list[tuple[bytes, int]], deadline: float) -> MetricExportResult:
        with self._active_cond:
            self._active += 1
        unsent: list[tuple[bytes, int]] = []
        try:
            results = [self._send_with_retry(data, n, deadline=deadline, unsent=unsent) for data, n in chunks]
        finally:
            with self._active_cond:
                self._active -= 1
                self._active_cond.notify_all()
        stopped = sum(n for _, n in unsent)  # of a split chunk, only the parts not yet delivered or given up
        if stopped:
            self._abandoned(stopped, "the exporter shut down while sending them")
        return MetricExportResult.SUCCESS if all(r is True for r in results) else MetricExportResult.FAILURE

    def _abandoned(self, points: int, why: str) -> None:
        self._failed.inc(points)
        self.telemetry.send_failed(points)
        self.telemetry.error("shutdown", f"{points} points not delivered to {self._where()}: {why}")

    def _encode(self, data: MetricsData) -> list[tuple[bytes, int]]:
        """Encoded requests of at most max_request_bytes, split between resources when a batch is larger: gRPC
        servers (the collector's included) refuse messages over 4 MiB by default, and big HTTP bodies fare no
        better."""
        return self.encoder.requests(data, self.max_request_bytes)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Wait until the queue is delivered (True) or the timeout. With storage, also stop (False) once a send is
        being retried: what is not delivered is safe on disk, and the runtime flushes before each shutdown (see
        shutdown())."""
        if self.queue is None:
            return True
        return self.queue.wait_empty(max(0.0, timeout_millis / 1000), unless_retrying=bool(self.queue.directory))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        deadline = time.monotonic() + max(0.0, timeout_millis / 1000)
        if self.queue is not None:
            # Without storage what is not sent by the deadline is lost: wait for it. With storage it stays on disk
            # and is sent by the next run (as the collector's persistent queue), so the queue is drained only while
            # the backend takes it: waiting out retries of an outage would only delay the shutdown.
            self.queue.wait_empty(max(0.0, deadline - time.monotonic()), unless_retrying=bool(self.queue.directory))
            self._stop.set()  # consumers in a retry wait give up now
            left = self.queue.abandon()
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))
            if left:
                n = sum(i.points for i in left)
                if self.queue.directory:
                    self.logger.info("%d batches (%d points) stay in %s for the next start", len(left), n,
                                     self.queue.directory)
                else:
                    self._abandoned(n, f"{len(left)} batches still queued at the shutdown deadline")
            self.queue.release()
        else:
            self._stop.set()
            # an export() still sending (on the runtime's worker thread) stops after its current attempt; closing
            # the channel under it would fail that attempt as a bug ("Cannot invoke RPC on closed channel")
            with self._active_cond:
                self._active_cond.wait_for(lambda: self._active == 0, max(0.0, deadline - time.monotonic()))
        if self.sender is not None:
            self.sender.close()

    # -- sending -----------------------------------------------------------------------------------------------

    def _consume(self) -> None:
        assert self.queue is not None
        while not self._stop.is_set():
            got = self.queue.get(timeout=0.5)
            if got is None:
                continue
            item, data = got
            keep = False
            unsent: list[tuple[bytes, int]] = []
            try:
                if item.recovered and not item.error and not _whole_request(data, item.points):
                    item.error = f"{self.queue.path(item)} is empty or not a whole OTLP request (cut short by a crash?)"
                if item.error:  # a stored batch that cannot be read back, or a corrupt file left by a crash
                    self._failed.inc(item.points)
                    self.telemetry.send_failed(item.points)
                    self.telemetry.error("storage_read", f"dropping {item.points} points: {item.error}")
                elif data and self._send_with_retry(data, item.points, unsent=unsent) == "stopped":
                    # shutting down mid-retry: a persistent queue keeps the batch for the next start
                    keep = bool(self.queue.directory)
                    if keep and unsent != [(data, item.points)]:
                        # a request split for a gateway's limit, part of it already delivered or given up: only
                        # the rest is kept (requests concatenated are one request), not sent or counted twice
                        keep = False
                        self._store_unsent(unsent)
                    elif not keep:
                        self._abandoned(sum(n for _, n in unsent), "the exporter shut down while sending them")
                self.telemetry.recovered("internal")
            except Exception as exc:  # a bug here must not kill the consumer
                self.telemetry.error("internal", f"sending failed: {type(exc).__name__}: {exc}")
                self._failed.inc(item.points)
                self.telemetry.send_failed(item.points)
            finally:
                try:
                    self.queue.done(item, keep=keep)
                except OSError as exc:  # e.g. the filesystem went read-only: this consumer must keep sending
                    self.telemetry.error("storage_remove", f"cannot remove a finished batch's file: "
                                         f"{exc.strerror or exc} ({exc.filename}); it is read again at the next "
                                         "start")

    def _store_unsent(self, unsent: list[tuple[bytes, int]]) -> None:
        points = sum(n for _, n in unsent)
        try:
            dropped = self.queue.put(b"".join(data for data, _ in unsent), points)
        except OSError as exc:
            self._abandoned(points, f"the exporter shut down while sending them and they cannot be stored: {exc}")
            return
        if dropped:  # the queue is emptied at shutdown: only if a put came in between
            n = sum(i.points for i in dropped)
            self._dropped.labels("queue_full").inc(n)
            self.telemetry.enqueue_failed(n)

    def _send_with_retry(self, data: bytes, points: int, deadline: float | None = None,
                         unsent: list[tuple[bytes, int]] | None = None, started: float | None = None) -> bool | str:
        """Send until delivered (True), given up (False) or the exporter stops (\"stopped\"). When stopped, what
        was not delivered nor given up is added to `unsent` (a part of `data` when it was split), as the caller
        must not count the points of delivered parts again.

        Failures are logged once per class (`send:UNAVAILABLE`, `send_failed:HTTP 400`): `send` while retrying,
        `send_failed` when points are given up; a delivery clears them, so the next outage is logged again."""
        retry = self.config.retry_on_failure
        if started is None:  # the parts of a request split for a gateway's limit share its max_elapsed_time
            started = time.monotonic()
        interval = retry.initial_interval
        while True:
            if self._stop.is_set():
                return _stopped(data, points, unsent)
            try:
                outcome: Outcome = self.sender.send(data)
            except Exception:
                if self._stop.is_set():  # the channel was closed under this attempt at the shutdown deadline
                    return _stopped(data, points, unsent)
                raise
            if outcome.ok:
                # a server counting more rejected points than were sent must not make a counter go negative (a
                # ValueError here would count the whole batch failed a second time)
                rejected = min(max(outcome.rejected, 0), points)
                self._sent.inc(points - rejected)
                self.telemetry.sent(points - rejected)
                self.telemetry.recovered("send")
                self.telemetry.recovered("send_failed")
                if rejected:
                    self._dropped.labels("rejected").inc(rejected)
                    self.telemetry.send_failed(rejected)
                    self.telemetry.error("rejected", f"the backend rejected {rejected} points: "
                                         f"{outcome.message}")
                else:
                    self.telemetry.recovered("rejected")
                    if outcome.message and outcome.message != self._last_warning:
                        # a partial success rejecting nothing is a warning from the backend (the OTLP spec; the
                        # collector logs it): log each distinct one once
                        self._last_warning = outcome.message
                        self.logger.warning("%s accepted every point with a warning: %s", self._where(),
                                            outcome.message)
                return True
            kind = outcome.kind or "error"
            if outcome.too_large:
                # The gateway's limit is below ours (max_request_bytes): a proxy's body limit, a smaller
                # max_recv_msg_size_mib. The collector drops such a batch, and every later one; halves (by resource
                # or within a resource) are sent instead, each split again if it is still too large.
                halves = split_request(data)
                if halves is not None:
                    if not self._split_logged:  # a warning, not an error: nothing is lost
                        self._split_logged = True
                        self.logger.warning("%s refused a request of %d bytes as too large (%s); sending requests "
                                            "that large in smaller parts", self._where(), len(data), outcome.message)
                    results = [self._send_with_retry(part, n, deadline, unsent, started) for part, n in halves]
                    return "stopped" if "stopped" in results else all(r is True for r in results)
            if outcome.retryable and self._stop.is_set():
                # the attempt failed because shutdown closed the connection under it (gRPC CANCELLED "Channel
                # closed"): not a backend failure to log or count as a retry
                return _stopped(data, points, unsent)
            if not outcome.retryable or not retry.enabled:
                self._give_up(points, kind, f"dropping {points} points: {outcome.message}"
                              + ("" if outcome.retryable else " (not retryable)"))
                return False
            wait = interval * (1 + retry.randomization_factor * (2 * random.random() - 1))
            if outcome.retry_after is not None:
                wait = max(wait, outcome.retry_after)
            wait = min(wait, retry.max_interval) if outcome.retry_after is None else wait
            elapsed = time.monotonic() - started
            if (retry.max_elapsed_time and elapsed + wait > retry.max_elapsed_time) or \
                    (deadline is not None and time.monotonic() + wait > deadline):
                self._give_up(points, kind, f"giving up {points} points after {elapsed:.0f}s of retries: "
                              f"{outcome.message}")
                return False
            self._retries.inc()
            self.telemetry.error(f"send:{kind}", f"sending to {self._where()} failed: {outcome.message}; "
                                 "retrying with backoff")
            # a Retry-After far in the future (with max_elapsed_time 0) is over what a wait can take
            self._backoff(+1)
            try:
                stopped = self._stop.wait(min(wait, threading.TIMEOUT_MAX))
            finally:
                self._backoff(-1)
            if stopped:
                return _stopped(data, points, unsent)
            interval = min(interval * retry.multiplier, retry.max_interval)

    def _backoff(self, n: int) -> None:
        if self.queue is not None:  # without a queue export() is sending, on the runtime's thread
            self.queue.retrying(n)

    def _give_up(self, points: int, kind: str, message: str) -> None:
        self._failed.inc(points)
        self.telemetry.send_failed(points)
        self.telemetry.error(f"send_failed:{kind}", message)

    def _where(self) -> str:
        return getattr(self.sender, "url", None) or getattr(self.sender, "target", "")


class OTLPHttpExporter(OTLPExporter):
    sender_class = HttpSender
    type_name = "otlphttp"


def _stopped(data: bytes, points: int, unsent: list[tuple[bytes, int]] | None) -> str:
    if unsent is not None:
        unsent.append((data, points))
    return "stopped"


def _whole_request(data: bytes, points: int) -> bool:
    """Whether a file left by an earlier run holds a whole request. Without fsync a power cut (or a full disk)
    can leave it empty or cut short; sent, the backend refuses it as malformed (gRPC INTERNAL, HTTP 400) and the
    log blames it, not the file."""
    if not data:
        return not points
    try:
        ExportMetricsServiceRequest.FromString(data)
    except DecodeError:
        return False
    return True


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


grpc_factory = Factory(
    kind="exporter", type="otlp", config_model=OTLPGrpcConfig, create=OTLPExporter, stability=Stability.BETA,
    description="Pushes metrics over OTLP/gRPC with a bounded (optionally persistent) queue and retries")
http_factory = Factory(
    kind="exporter", type="otlphttp", config_model=OTLPHttpConfig, create=OTLPHttpExporter,
    stability=Stability.BETA,
    description="Pushes metrics over OTLP/HTTP (protobuf) with a bounded (optionally persistent) queue and retries")
