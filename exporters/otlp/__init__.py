"""otlp (gRPC) and otlphttp exporters: push to an OTLP receiver (a collector gateway, a backend).

export() encodes the batch (`encode.py`: opentelemetry-proto's messages, byte-identical to what
opentelemetry-exporter-otlp's encoder makes, at about half its cost), puts the bytes on the sending queue and
returns; `num_consumers` threads send from the queue, retrying retryable failures with exponential backoff
(`retry_on_failure`). A full queue drops its oldest batch. With `sending_queue.storage` the queue lives in a
directory and what was not delivered is sent after a restart, including after SIGKILL.
"""

from __future__ import annotations

import random
import re
import threading
import time

from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricExporter, MetricExportResult, MetricsData

from podmeter.component import ComponentUnavailable, Exporter, Factory, Stability
from podmeter.metrics import count_points

from .config import OTLPGrpcConfig, OTLPHttpConfig
from .encode import Encoder
from .queue import QueueLocked, SendingQueue
from .senders import GrpcSender, HttpSender, Outcome
from .temporality import DeltaConverter


class OTLPExporter(Exporter):
    sender_class: type = GrpcSender
    type_name = "otlp"
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
        self._delta = DeltaConverter() if config.temporality_preference == "delta" else None
        self._delta_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.queue: SendingQueue | None = None
        self.sender = None
        if self._delta is not None:
            # what an SDK MetricReader would ask of this exporter (as the SDK's OTLP delta preference)
            from opentelemetry.sdk.metrics import Counter, Histogram, ObservableCounter

            delta = AggregationTemporality.DELTA
            MetricExporter.__init__(self, preferred_temporality={Counter: delta, Histogram: delta,
                                                                 ObservableCounter: delta})

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, host) -> None:
        try:
            self.sender = self.sender_class(self.config)
        except (OSError, ValueError) as exc:
            raise ComponentUnavailable(f"cannot set up the connection: {exc}") from exc
        q = self.config.sending_queue
        if q.enabled:
            directory = ""
            if q.storage:
                directory = f"{q.storage.rstrip('/')}/exporter_{_safe(str(self.settings.id))}"
            try:
                self.queue = SendingQueue(q.queue_size, directory, fsync=q.fsync)
            except QueueLocked as exc:
                raise ComponentUnavailable(f"sending_queue::storage: {exc}") from exc
            except OSError as exc:
                raise ComponentUnavailable(f"sending_queue::storage: cannot use {directory}: {exc}") from exc
            if self.queue.trimmed:
                n = sum(i.points for i in self.queue.trimmed)
                self._dropped.labels("queue_full").inc(n)
                self.logger.warning("dropped the %d oldest stored batches (%d points) beyond queue_size %d",
                                    len(self.queue.trimmed), n, q.queue_size)
            if self.queue.recovered():
                self.logger.info("sending %d batches left in %s by a previous run", self.queue.recovered(), directory)
            self._queue_capacity.set(q.queue_size)
            self._queue_size.set_function(lambda: len(self.queue) if self.queue else 0)
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
        if self.sender is None:  # not started (e.g. `podmeter collect --once` never starts exporters)
            return MetricExportResult.FAILURE
        chunks = self._encode(metrics_data)
        if self.queue is None:  # no queue: send now, retrying within this call
            deadline = time.monotonic() + timeout_millis / 1000
            ok = all([self._send_with_retry(data, n, deadline=deadline) is True for data, n in chunks])
            return MetricExportResult.SUCCESS if ok else MetricExportResult.FAILURE
        dropped = []
        for data, n in chunks:
            try:
                dropped += self.queue.put(data, n)
            except OSError as exc:
                self.telemetry.error("storage", f"cannot write to the persistent queue: {exc}")
                self._dropped.labels("storage").inc(n)
                return MetricExportResult.FAILURE
        if dropped:
            n = sum(i.points for i in dropped)
            self._dropped.labels("queue_full").inc(n)
            self.telemetry.error("queue_full", f"sending queue full ({self.config.sending_queue.queue_size} "
                                 f"batches): dropped the oldest batch ({n} points); the backend is not keeping up "
                                 "or is unreachable")
        return MetricExportResult.SUCCESS

    def _encode(self, data: MetricsData) -> list[tuple[bytes, int]]:
        """Encoded requests of at most max_request_bytes, split between resources when a batch is larger: gRPC
        servers (the collector's included) refuse messages over 4 MiB by default, and big HTTP bodies fare no
        better."""
        return self.encoder.requests(data, self.max_request_bytes)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        if self.queue is None:
            return True
        return self.queue.wait_empty(max(0.0, timeout_millis / 1000))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        deadline = time.monotonic() + max(0.0, timeout_millis / 1000)
        if self.queue is not None:
            self.queue.wait_empty(max(0.0, deadline - time.monotonic()))
            self._stop.set()  # consumers in a retry wait give up now
            left = self.queue.abandon()
            for t in self._threads:
                t.join(max(0.1, deadline - time.monotonic()))
            if left:
                n = sum(i.points for i in left)
                if self.queue.directory:
                    self.logger.info("%d batches (%d points) stay in %s for the next start", len(left), n,
                                     self.queue.directory)
                else:
                    self._failed.inc(n)
                    self.logger.warning("%d batches (%d points) not delivered before the shutdown deadline",
                                        len(left), n)
            self.queue.release()
        else:
            self._stop.set()
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
            try:
                if data and self._send_with_retry(data, item.points) == "stopped":
                    # shutting down mid-retry: a persistent queue keeps the batch for the next start
                    keep = bool(self.queue.directory)
                    if not keep:
                        self._failed.inc(item.points)
            except Exception as exc:  # a bug here must not kill the consumer
                self.telemetry.error("internal", f"sending failed: {type(exc).__name__}: {exc}")
                self._failed.inc(item.points)
            finally:
                self.queue.done(item, keep=keep)

    def _send_with_retry(self, data: bytes, points: int, deadline: float | None = None) -> bool | str:
        """Send until delivered (True), given up (False) or the exporter stops (\"stopped\")."""
        retry = self.config.retry_on_failure
        started = time.monotonic()
        interval = retry.initial_interval
        while True:
            outcome: Outcome = self.sender.send(data)
            if outcome.ok:
                self._sent.inc(points - outcome.rejected)
                self.telemetry.recovered("send")
                if outcome.rejected:
                    self._dropped.labels("rejected").inc(outcome.rejected)
                    self.telemetry.error("rejected", f"the backend rejected {outcome.rejected} points: "
                                         f"{outcome.message}")
                return True
            if not outcome.retryable or not retry.enabled:
                self._failed.inc(points)
                self.telemetry.error("send", f"dropping {points} points: {outcome.message}"
                                     + ("" if outcome.retryable else " (not retryable)"))
                return False
            wait = interval * (1 + retry.randomization_factor * (2 * random.random() - 1))
            if outcome.retry_after is not None:
                wait = max(wait, outcome.retry_after)
            wait = min(wait, retry.max_interval) if outcome.retry_after is None else wait
            elapsed = time.monotonic() - started
            if (retry.max_elapsed_time and elapsed + wait > retry.max_elapsed_time) or \
                    (deadline is not None and time.monotonic() + wait > deadline):
                self._failed.inc(points)
                self.telemetry.error("send", f"giving up {points} points after {elapsed:.0f}s of retries: "
                                     f"{outcome.message}")
                return False
            self._retries.inc()
            self.telemetry.error("send", f"sending to {self._where()} failed: {outcome.message}; "
                                 "retrying with backoff")
            if self._stop.wait(wait):
                return "stopped"
            interval = min(interval * retry.multiplier, retry.max_interval)

    def _where(self) -> str:
        return getattr(self.sender, "url", None) or getattr(self.sender, "target", "")


class OTLPHttpExporter(OTLPExporter):
    sender_class = HttpSender
    type_name = "otlphttp"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


grpc_factory = Factory(
    kind="exporter", type="otlp", config_model=OTLPGrpcConfig, create=OTLPExporter, stability=Stability.BETA,
    description="Pushes metrics over OTLP/gRPC with a bounded (optionally persistent) queue and retries")
http_factory = Factory(
    kind="exporter", type="otlphttp", config_model=OTLPHttpConfig, create=OTLPHttpExporter,
    stability=Stability.BETA,
    description="Pushes metrics over OTLP/HTTP (protobuf) with a bounded (optionally persistent) queue and retries")
