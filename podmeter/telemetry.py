"""Self-telemetry in the collector's style, served on `service.telemetry.metrics.address` (default :8888).

Names mirror the collector's `otelcol_*` ones under a `podmeter_` prefix. Components get a
`ComponentTelemetry` to count errors (each cause logged once until it recovers) and to register their own
counters and gauges, labelled with their component id.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)

from podmeter import __version__

# The collector's self-telemetry has no `_created` series; prometheus_client adds one per counter and histogram child
# (a second series for each receiver, exporter and error cause), which nothing reads. The switch is the library's,
# for the whole process: podmeter's is its only registry.
disable_created_metrics()


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._metrics: dict[str, object] = {}
        self.started = time.time()
        ProcessCollector(namespace="podmeter", registry=self.registry)
        Info("podmeter_build", "podmeter build information", registry=self.registry).info(
            {"version": __version__})
        uptime = Gauge("podmeter_process_uptime_seconds", "Seconds since the agent started", registry=self.registry)
        uptime.set_function(lambda: time.time() - self.started)
        c, g, h = self.counter, self.gauge, self.histogram
        self.receiver_accepted = c("podmeter_receiver_accepted_metric_points", "Points a receiver produced and the pipeline accepted", ["receiver"])
        self.receiver_refused = c("podmeter_receiver_refused_metric_points", "Points a receiver produced that the pipeline refused", ["receiver"])
        self.receiver_duration = h("podmeter_receiver_collection_duration_seconds", "Wall time of one collection", ["receiver"],
                                   buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.receiver_collections = c("podmeter_receiver_collections", "Collections run, by outcome", ["receiver", "outcome"])
        self.processor_in = c("podmeter_processor_incoming_items", "Points into a processor", ["processor", "pipeline"])
        self.processor_out = c("podmeter_processor_outgoing_items", "Points out of a processor", ["processor", "pipeline"])
        self.exporter_sent = c("podmeter_exporter_sent_metric_points", "Points an exporter delivered", ["exporter"])
        self.exporter_failed = c("podmeter_exporter_send_failed_metric_points", "Points an exporter failed to deliver", ["exporter"])
        self.exporter_enqueue_failed = c("podmeter_exporter_enqueue_failed_metric_points", "Points dropped because an exporter's queue was full", ["exporter"])
        self.exporter_queue_size = g("podmeter_exporter_queue_size", "Batches waiting in an exporter's queue", ["exporter"])
        self.exporter_queue_capacity = g("podmeter_exporter_queue_capacity", "Capacity of an exporter's queue in batches", ["exporter"])
        self.component_errors = c("podmeter_component_errors", "Errors by component and cause", ["component", "cause"])

    def _get(self, cls, name: str, doc: str, labels, **kwargs):
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                metric = self._metrics[name] = cls(name, doc, list(labels), registry=self.registry, **kwargs)
            return metric

    def counter(self, name: str, doc: str, labels=()) -> Counter:
        return self._get(Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels=()) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels=(), buckets=Histogram.DEFAULT_BUCKETS) -> Histogram:
        return self._get(Histogram, name, doc, labels, buckets=buckets)


class ComponentTelemetry:
    """A component's view of self-telemetry: its id is the first label of everything it registers."""

    def __init__(self, telemetry: Telemetry, component_id: str, logger: logging.Logger) -> None:
        self.telemetry = telemetry
        self.id = component_id
        self.logger = logger
        self._failing: dict[str, str] = {}
        self._lock = threading.Lock()

    def error(self, cause: str, message: str, *, count: int = 1) -> None:
        """Count an error; log it at WARNING the first time this cause appears (until `recovered`).

        A cause may carry a class after a colon (`send:HTTP 503`): each class is its own cause, logged once, so a
        backend switching from 503 to 400 is logged again; `recovered("send")` clears every class of it."""
        self.telemetry.component_errors.labels(self.id, cause).inc(count)
        with self._lock:
            first = cause not in self._failing
            self._failing[cause] = message
        if first:
            self.logger.warning("%s: %s", cause, message)
        else:
            self.logger.debug("%s: %s", cause, message)

    def recovered(self, cause: str) -> None:
        if not self._failing:  # the common case, called after every success: no lock
            return
        with self._lock:
            gone = [c for c in self._failing if c == cause or c.startswith(cause + ":")]
            for c in gone:
                del self._failing[c]
        for c in gone:
            self.logger.info("%s: recovered", c)

    def failing(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failing)

    # An exporter that queues (its export() returning means queued, not delivered) sets `reports_delivery = True`
    # and counts outcomes here instead, in the collector's otelcol_exporter_* terms; the runtime then counts only
    # what never reached the exporter. The series are made on first use: a receiver's telemetry has none.

    def sent(self, points: int) -> None:
        """Points the destination accepted."""
        if points:
            self.telemetry.exporter_sent.labels(self.id).inc(points)

    def send_failed(self, points: int) -> None:
        """Points given up: rejected permanently, retries exhausted, or unsent at shutdown."""
        if points:
            self.telemetry.exporter_failed.labels(self.id).inc(points)

    def enqueue_failed(self, points: int) -> None:
        """Points dropped because the exporter's queue was full (or could not be written)."""
        if points:
            self.telemetry.exporter_enqueue_failed.labels(self.id).inc(points)

    def counter(self, name: str, doc: str, labels=()) -> Counter:
        """A counter labelled with this component: call `.labels(*values)` with `labels` only."""
        return _Bound(self.telemetry.counter(name, doc, ["component", *labels]), self.id)

    def gauge(self, name: str, doc: str, labels=()) -> Gauge:
        return _Bound(self.telemetry.gauge(name, doc, ["component", *labels]), self.id)


class _Bound:
    """A metric with its first label (the component id) filled in."""

    def __init__(self, metric, component_id: str) -> None:
        self._metric = metric
        self._id = component_id

    def labels(self, *values):
        return self._metric.labels(self._id, *values)

    def inc(self, amount: float = 1) -> None:
        self._metric.labels(self._id).inc(amount)

    def set(self, value: float) -> None:
        self._metric.labels(self._id).set(value)

    def set_function(self, fn) -> None:
        self._metric.labels(self._id).set_function(fn)


def null_component_telemetry(component_id: str = "test", logger: logging.Logger | None = None) -> ComponentTelemetry:
    """For unit tests and one-shot commands that build components outside a service."""
    return ComponentTelemetry(Telemetry(), component_id, logger or logging.getLogger(f"podmeter.{component_id}"))


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[object, threading.Thread]:
    """Serve `registry` on http://host:port/metrics (any path, as prometheus_client's start_http_server) from a
    daemon thread; returns (server, thread) as start_http_server does: `server.shutdown(); server.server_close()`
    stops it.

    Not start_http_server itself: its wsgiref server has socketserver's backlog of 5, no timeout and no limit on
    connections, so a few hundred stalled connections on :8888 would hold a thread each for good. This one is
    podmeter.httpserve's (request deadline, connection limit, backlog), as /metrics and health are.
    """
    import gzip
    from urllib.parse import parse_qs, urlsplit

    from prometheus_client.exposition import choose_encoder, gzip_accepted

    from podmeter import httpserve

    class Handler(httpserve.Handler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            url = urlsplit(self.path)
            if url.path == "/favicon.ico":  # as prometheus_client: browsers ask for it
                body, headers = b"", [("Content-Type", "text/plain")]
            else:
                names = parse_qs(url.query).get("name[]")
                encoder, ctype = choose_encoder(self.headers.get("Accept"))
                body = encoder(registry.restricted_registry(names) if names else registry)
                headers = [("Content-Type", ctype)]
                if gzip_accepted(self.headers.get("Accept-Encoding")):
                    body = gzip.compress(body)
                    headers.append(("Content-Encoding", "gzip"))
            self.send_response(200)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.write_body((body,))

        do_HEAD = do_GET  # noqa: N815 - the same headers, no body (write_body skips it)

    server = httpserve.Server((host, port), Handler)
    thread = threading.Thread(target=server.serve_forever, name="telemetry-http", daemon=True)
    thread.start()
    return server, thread


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
