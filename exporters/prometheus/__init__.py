"""prometheus exporter: serves the last exported snapshot on /metrics for Prometheus to scrape.

export() translates the batch (per instrumentation scope: a receiver's new batch replaces its previous series,
so a vanished pod's series are gone after its next collection), renders that scope's families once and caches
the chunks, then assembles the whole exposition in both formats from every scope's cached chunks (only families
that several scopes share are merged again), gzipping the forms clients have been asking for gzipped. A scrape
only picks the rendering the client negotiated and writes it: it never triggers a collection, waits for one or
renders anything (the first request for a gzipped form not yet precomputed compresses that snapshot once).
"""

from __future__ import annotations

import base64
import hmac
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as TEXT_CONTENT_TYPE

from podmeter import httpserve
from podmeter.component import ComponentUnavailable, Exporter, Factory, Stability
from podmeter.config import split_endpoint
from podmeter.metrics import PerResource

from .config import PrometheusConfig
from .translate import Family, Translator, promoter

OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


# The forms a scrape may ask for. Plain ones are built on every export (they only reference the cached chunks);
# a gzipped one is compressed at export only while clients ask for it (see PrometheusExporter._wanted).
TEXT, OPENMETRICS = "text", "openmetrics"
GZIP_LEVEL = 1  # level 5 cost 2x the CPU for 22% less output, on every export (BENCHMARKS.md)
WANT_TTL = 900.0  # a gzipped form nobody asked for in this long is no longer compressed at export


class Rendering:
    """One snapshot in every form a scrape may ask for.

    The plain forms are tuples of byte chunks (family headers and the cached sample lines, shared by both formats),
    written as they are; `text` and `openmetrics` join them for callers that want one bytes object. A gzipped form
    is made at export when clients have been asking for it, or else by the first scrape that asks (once: it is kept
    on the snapshot). Immutable apart from that cache.
    """

    def __init__(self, text_chunks: tuple[bytes, ...] = (), om_chunks: tuple[bytes, ...] = (b"# EOF\n",),
                 series: int = 0) -> None:
        self.chunks = {TEXT: text_chunks, OPENMETRICS: om_chunks}
        self.series = series
        self._gz: dict[str, bytes] = {}
        self._joined: dict[str, bytes] = {}

    def plain(self, form: str) -> bytes:
        got = self._joined.get(form)
        if got is None:
            got = self._joined[form] = b"".join(self.chunks[form])
        return got

    @property
    def text(self) -> bytes:
        return self.plain(TEXT)

    @property
    def openmetrics(self) -> bytes:
        return self.plain(OPENMETRICS)

    def has_gzip(self, form: str) -> bool:
        return form in self._gz

    def gzipped(self, form: str) -> bytes:
        """The gzipped form, compressed now if this snapshot does not have it yet (a race between two first
        scrapes compresses twice, harmlessly: both results are the same)."""
        got = self._gz.get(form)
        if got is None:
            c = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: a gzip member
            got = b"".join([*map(c.compress, self.chunks[form]), c.flush()])
            self._gz[form] = got
        return got


@dataclass
class _Family:
    """One family of one scope, rendered: its sample lines are cached until the scope's next batch.

    Only the rendered bytes are kept (one large object per family, not a string per series: at 250 pods that is
    7 MiB less held, and none of the small objects that would pin the allocator's arenas between collections);
    a family that several scopes expose is parsed back from them when merged."""

    fam: Family
    count: int  # series, one per label set (the last point wins)
    lines: bytes  # "series value\n" for each sample

    def samples(self) -> dict[bytes, bytes]:
        """series -> value, parsed back from the lines (a value never holds a space, a series no raw newline)."""
        out = {}
        for line in self.lines.split(b"\n"):  # not splitlines(): a label value may hold a raw \r
            if line:
                key, _, value = line.rpartition(b" ")
                out[key] = value
        return out


@dataclass
class _Scope:
    families: dict[str, _Family]
    updated: float  # monotonic


def _headers(name: str, fam: Family) -> tuple[bytes, bytes]:
    """(# HELP/# TYPE lines in text 0.0.4, the same in OpenMetrics 1.0) of one family."""
    help_text = fam.help.replace("\\", "\\\\").replace("\n", "\\n")
    if name == "target_info":  # an info family in OpenMetrics (samples named target_info), a gauge in text
        om_name, om_type, text_type = "target", "info", "gauge"
    elif fam.type == "counter":  # OpenMetrics names the family without the _total its samples carry
        om_name, om_type, text_type = name[: -len("_total")], "counter", "counter"
    else:
        om_name, om_type = name, fam.type
        text_type = "untyped" if fam.type == "unknown" else fam.type
    return (f"# HELP {name} {help_text}\n# TYPE {name} {text_type}\n".encode(),
            f"# HELP {om_name} {help_text.replace(chr(34), chr(92) + chr(34))}\n# TYPE {om_name} {om_type}\n".encode())


def _names(name: str, ftype: str) -> tuple[str, tuple[str, ...]]:
    """A family's OpenMetrics family name and the names its samples have."""
    if ftype == "histogram":
        return name, (f"{name}_bucket", f"{name}_sum", f"{name}_count")
    if ftype == "counter":
        return name[: -len("_total")], (name,)
    return ("target" if name == "target_info" else name), (name,)


def _lines(samples: dict[bytes, bytes]) -> bytes:
    """The sample lines of {series: value}: `series value` each."""
    return b"".join([b"%s %s\n" % kv for kv in samples.items()])


def _family_lines(fam: Family) -> bytes:
    """The sample lines of a translated family: `<name><key> <value>` each (see Family). Joined from the strings
    that already exist (the family name, the keys its resources' LabelSets keep, the values), so that no string
    per line is made on the way to the one bytes object that is kept."""
    if fam.infos is not None:
        return fam.info_lines().encode()
    name = fam.name
    return "".join([s for key, value in fam.samples.items() for s in (name, key, " ", value, "\n")]).encode()


class PrometheusExporter(Exporter):
    def __init__(self, settings, config: PrometheusConfig) -> None:
        super().__init__()
        self.settings = settings
        self.config = config
        self.logger = settings.logger
        self.telemetry = settings.telemetry
        self.translator_args = dict(
            namespace=config.namespace,
            const_labels=dict(config.const_labels),
            add_suffixes=config.add_suffixes,
            promote=promoter(config.promote_resource_attributes, config.resource_to_telemetry_conversion.enabled),
            target_info=config.target_info.enabled,
            resources=PerResource(),
        )
        if config.translation_strategy is not None and "add_metric_suffixes" in config.model_fields_set \
                and config.add_metric_suffixes != config.add_suffixes:
            self.logger.warning("add_metric_suffixes: %s is ignored: translation_strategy %s takes precedence",
                                str(config.add_metric_suffixes).lower(), config.translation_strategy)
        self._scopes: dict[str, _Scope] = {}
        self._lock = threading.Lock()  # guards _scopes and rendering; scrapes never take it
        self._rendering = Rendering()
        self._wanted: dict[str, float] = {}  # form -> when a scrape last asked for it gzipped (monotonic)
        self._next_expiry = float("inf")
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        t = settings.telemetry
        self._scrapes = t.counter("podmeter_prometheus_scrapes", "Scrapes served, by HTTP status code", ["code"])
        self._scrape_duration = t.telemetry.histogram(
            "podmeter_prometheus_scrape_duration_seconds", "Time to serve one scrape", ["component"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)).labels(str(settings.id))
        self._series = t.gauge("podmeter_prometheus_series", "Series in the current exposition")
        self._dropped = t.counter("podmeter_prometheus_dropped_points",
                                  "Points not exposed, by cause (duplicate_series, type_conflict, ...)", ["cause"])
        self._expired = t.counter("podmeter_prometheus_expired_scopes",
                                  "Receiver snapshots removed by metric_expiration")
        self.port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self, host) -> None:
        addr, port = split_endpoint(self.config.endpoint)
        context = None
        tls = self.config.tls
        if tls is not None and tls.cert_file:
            try:
                context = _tls_context(tls.min_version, tls.max_version)
                context.load_cert_chain(tls.cert_file, tls.key_file)
                if tls.client_ca_file:
                    context.load_verify_locations(tls.client_ca_file)
                    context.verify_mode = ssl.CERT_REQUIRED
            except (OSError, ssl.SSLError) as exc:
                raise ComponentUnavailable(f"cannot load TLS files: {exc}") from exc
        handler = _make_handler(self)
        try:
            server = _Server((addr, port), handler, exporter=self, context=context)
        except OSError as exc:
            raise ComponentUnavailable(f"cannot listen on {self.config.endpoint}: {exc.strerror or exc}") from exc
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name=f"prometheus-{self.settings.id}", daemon=True)
        self._thread.start()
        self.logger.info("serving /metrics on %s://%s:%d", "https" if context else "http", addr, self.port)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    # -- export ------------------------------------------------------------------------------------------------

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        translator = Translator(**self.translator_args)
        by_scope: dict[str, dict[str, Family]] = {}
        for rm in metrics_data.resource_metrics:
            for sm in rm.scope_metrics:
                families = by_scope.setdefault(sm.scope.name if sm.scope else "", {})
                # translate each scope separately so a batch replaces exactly its scopes' previous series
                translator.resource_metrics(type(rm)(resource=rm.resource, scope_metrics=[sm],
                                                     schema_url=rm.schema_url), families)
        for cause, n in translator.skipped.items():
            self._dropped.labels(cause).inc(n)
            self.telemetry.error(cause, f"{n} points cannot be exposed to Prometheus ({cause.replace('_', ' ')})")
        # Render each scope's families once, here, outside the lock: the exposition is then assembled from these
        # chunks and those of the other scopes, which are not rendered again until their own next batch.
        rendered: dict[str, dict[str, _Family]] = {}
        duplicates = 0
        for scope, families in by_scope.items():
            out = rendered[scope] = {}
            while families:
                # taken out as it is rendered: its samples go now, not after the last family's
                name, fam = families.popitem()
                if fam.infos is not None:  # target_info: kept as labels too, to merge with other scopes' (below)
                    out[name] = _Family(Family(fam.name, fam.type, fam.help, infos=fam.infos), len(fam.infos),
                                        _family_lines(fam))
                    continue
                duplicates += fam.duplicates
                out[name] = _Family(Family(fam.name, fam.type, fam.help), len(fam.samples), _family_lines(fam))
        now = time.monotonic()
        with self._lock:
            for scope, families in rendered.items():
                self._scopes[scope] = _Scope(families, now)
            self._render_locked(now, duplicates)
        return MetricExportResult.SUCCESS

    def expire(self) -> None:
        """Drop scopes not updated within metric_expiration; called from the server's idle loop."""
        now = time.monotonic()
        if now < self._next_expiry:
            return
        # never wait for an export here: this runs in the accept loop, which would take no scrape meanwhile; an
        # export in progress drops the expired scopes itself
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._render_locked(now)
        finally:
            self._lock.release()

    def _render_locked(self, now: float, duplicates: int = 0) -> None:
        horizon = now - self.config.metric_expiration
        for scope in [s for s, entry in self._scopes.items() if entry.updated < horizon]:
            del self._scopes[scope]
            self._expired.inc()
        oldest = min((e.updated for e in self._scopes.values()), default=None)
        self._next_expiry = float("inf") if oldest is None else oldest + self.config.metric_expiration

        # Hand-written rather than prometheus_client's generate_latest: that one re-validates and re-escapes every
        # label name of every sample on every render (85% of the time at 10k series, measured), while podmeter's
        # names are sanitized once at translation and each sample line is shared by both formats (the output is
        # checked with prometheus_client's parsers and promtool in the tests).
        # Assemble: every family name once, in name order, from the scopes' cached chunks. A name that several
        # scopes expose (target_info for a pod that several receivers describe, or one metric from two receivers)
        # is merged into one family, so that the exposition has one # HELP/# TYPE per family.
        by_name: dict[str, list[_Family]] = {}
        # in scope name order, not arrival order: where receivers describe one entity differently (an image name
        # as CRI resolves it, or as the pod spec says), the merged target_info is the same after every restart
        for _scope, entry in sorted(self._scopes.items()):
            for name, rf in entry.families.items():
                by_name.setdefault(name, []).append(rf)
        text: list[bytes] = []
        om: list[bytes] = []
        count = conflicts = 0
        om_names: set[str] = set()
        taken: set[str] = set()
        for name in sorted(by_name):
            parts = by_name[name]
            first = parts[0]
            if len(parts) == 1:
                lines, n = first.lines, first.count
            elif first.fam.infos is not None:
                # target_info of entities several receivers describe: one per entity, their labels merged
                merged = Family(name, first.fam.type, first.fam.help)
                for rf in parts:
                    for info in (rf.fam.infos or {}).values():
                        merged.add_info(info)
                lines, n = merged.info_lines().encode(), len(merged.infos or ())
            else:
                samples: dict[bytes, bytes] = {}
                for rf in parts:
                    if rf.fam.type != first.fam.type:
                        conflicts += rf.count
                        continue
                    before = len(samples) + rf.count
                    samples.update(rf.samples())  # the scope listed later wins
                    duplicates += before - len(samples)
                lines, n = _lines(samples), len(samples)
            if not n:
                continue
            # two families must not share an OpenMetrics family name (a gauge `x_seconds` and a counter
            # `x_seconds_total`) or a sample name (a gauge `x_count` and a histogram `x`): the later one goes
            om_name, sample_names = _names(name, first.fam.type)
            if om_name in om_names or not taken.isdisjoint(sample_names):
                conflicts += n
                continue
            om_names.add(om_name)
            taken.update(sample_names)
            text_head, om_head = _headers(name, first.fam)
            text += (text_head, lines)
            om += (om_head, lines)
            count += n
        om.append(b"# EOF\n")
        if duplicates:
            self._dropped.labels("duplicate_series").inc(duplicates)
            self.telemetry.error("duplicate_series", f"{duplicates} points had the same name and labels as another "
                                 "(promote more resource attributes to tell them apart)")
        if conflicts:
            self._dropped.labels("type_conflict").inc(conflicts)
            self.telemetry.error("type_conflict", f"{conflicts} points belong to a metric whose Prometheus name is "
                                 "already used by a metric of another type")
        rendering = Rendering(tuple(text), tuple(om), count)
        for form in (TEXT, OPENMETRICS):  # compress now only the forms clients have been asking for
            asked = self._wanted.get(form)
            if asked is not None and now - asked < WANT_TTL:
                rendering.gzipped(form)
        self._rendering = rendering
        self._series.set(count)

    # -- scrape ------------------------------------------------------------------------------------------------

    def rendering(self) -> Rendering:
        return self._rendering

    def body(self, form: str, gz: bool) -> tuple[bytes, ...]:
        """What a scrape writes for `form` (TEXT or OPENMETRICS), gzipped or not: from the last snapshot only."""
        r = self._rendering
        if not gz:
            return r.chunks[form]
        # remember that this form is wanted gzipped: exports compress it from now on (a first request compresses
        # the current snapshot once, here)
        self._wanted[form] = time.monotonic()
        return (r.gzipped(form),)


_TLS_VERSIONS = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1, "1.2": ssl.TLSVersion.TLSv1_2,
                 "1.3": ssl.TLSVersion.TLSv1_3}


def _tls_context(min_version: str, max_version: str) -> ssl.SSLContext:
    """A server context accepting TLS min_version (default 1.2) to max_version (default: the highest)."""
    import warnings

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():  # setting TLS 1.0/1.1 warns that they are deprecated: the user asked for them
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = _TLS_VERSIONS[min_version or "1.2"]
        if max_version:
            context.maximum_version = _TLS_VERSIONS[max_version]
    if context.minimum_version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3 refuses TLS 1.0 and 1.1 at security level 1 and above (their handshake signs with SHA-1):
        # without this, min_version 1.0 would still turn those clients away
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


class _Server(httpserve.Server):
    """podmeter.httpserve's server (request deadline, connection limit, backlog), with the exporter's housekeeping
    and its count of failed connections."""

    def __init__(self, address, handler, exporter: PrometheusExporter, context: ssl.SSLContext | None) -> None:
        self.exporter = exporter
        super().__init__(address, handler, context)

    def service_actions(self) -> None:
        super().service_actions()
        try:
            self.exporter.expire()
        except Exception as exc:  # never let housekeeping stop the server
            self.exporter.telemetry.error("expiration", f"expiring old series failed: {type(exc).__name__}: {exc}")

    def connection_failed(self, client_address, exc: BaseException | None) -> None:
        # a client that hangs up or fails the TLS handshake is its own problem: count it, no traceback (those the
        # server closed itself, past their deadline or over the connection limit, are not counted)
        self.exporter.telemetry.error("scrape_connection", f"connection from {client_address[0]} failed: "
                                      f"{type(exc).__name__}: {exc}")


def _make_handler(exporter: PrometheusExporter):
    auth = exporter.config.basic_auth
    expected = None
    if auth is not None:
        expected = base64.b64encode(f"{auth.username}:{auth.password}".encode())

    class Handler(httpserve.Handler):  # deadlines and the TLS handshake: see podmeter.httpserve
        protocol_version = "HTTP/1.1"
        server_version = "podmeter"

        def do_GET(self) -> None:  # noqa: N802
            started = time.perf_counter()
            code = self._serve()
            exporter._scrapes.labels(str(code)).inc()
            exporter._scrape_duration.observe(time.perf_counter() - started)

        do_HEAD = do_GET  # noqa: N815

        def _serve(self) -> int:
            path = self.path.split("?", 1)[0]
            if not path.startswith("/"):  # absolute-form, as through a proxy: RFC 9112 3.2.2 has servers take it
                path = urlsplit(self.path).path
            if expected is not None:
                # the scheme is case-insensitive (RFC 9110 11.1): some clients send "basic"
                scheme, _, credentials = (self.headers.get("Authorization") or "").strip().partition(" ")
                if not (hmac.compare_digest(credentials.strip().encode(), expected)
                        and scheme.lower() == "basic"):
                    return self._reply(401, b"unauthorized\n", "text/plain; charset=utf-8",
                                       {"WWW-Authenticate": 'Basic realm="podmeter"'})
            if path not in ("/metrics", "/metrics/"):
                return self._reply(404, b"not found; metrics are on /metrics\n", "text/plain; charset=utf-8")
            accept = self.headers.get("Accept") or ""
            use_om = exporter.config.enable_open_metrics and _wants_openmetrics(accept)
            gz = _wants_gzip(self.headers.get("Accept-Encoding") or "")
            body = exporter.body(OPENMETRICS if use_om else TEXT, gz)
            # caches between Prometheus and the agent must key the reply on both negotiated headers
            extra = {"Vary": "Accept, Accept-Encoding"}
            if gz:
                extra["Content-Encoding"] = "gzip"
            return self._reply(200, body, OPENMETRICS_CONTENT_TYPE if use_om else TEXT_CONTENT_TYPE, extra)

        def _reply(self, code: int, body: bytes | tuple[bytes, ...], ctype: str, headers: dict | None = None) -> int:
            chunks = (body,) if isinstance(body, bytes) else body
            self.send_response(code)
            if self.headers.get("Content-Length", "0").strip() not in ("", "0") or "Transfer-Encoding" in self.headers:
                # a request body is never read: on a kept-alive connection it would be parsed as the next request
                self.send_header("Connection", "close")
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(sum(map(len, chunks))))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.write_body(chunks)  # nothing for HEAD
            return code

    return Handler


def _weights(header: str) -> dict[str, float]:
    """An Accept or Accept-Encoding header's q value per token (RFC 9110: q defaults to 1, q=0 is "not acceptable";
    a token listed twice keeps its highest q)."""
    out: dict[str, float] = {}
    for part in header.split(","):
        fields = [f.strip() for f in part.split(";")]
        if not fields[0]:
            continue
        q = 1.0
        for f in fields[1:]:
            name, _, value = f.partition("=")
            if name.strip().lower() == "q":  # parameter names are case-insensitive (RFC 9110 5.6.6): `Q=0.1` too
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        token = fields[0].lower()
        out[token] = max(out.get(token, -1.0), q)
    return out


def _wants_openmetrics(accept: str) -> bool:
    """Content negotiation: OpenMetrics when the client lists it with a q at least text/plain's.

    Not prometheus_client's choose_encoder: it takes the first type it knows in header order and ignores q
    values, and it returns a renderer, while here both renderings already exist.
    """
    weights = _weights(accept)
    best_om = weights.get("application/openmetrics-text", -1.0)
    best_text = max(weights.get(t, -1.0) for t in ("text/plain", "*/*", "text/*"))
    return best_om > 0 and best_om >= best_text


def _wants_gzip(accept_encoding: str) -> bool:
    """gzip when the client accepts it: listed (or `*` listed and gzip not) with a q above 0."""
    weights = _weights(accept_encoding)
    return weights.get("gzip", weights.get("*", 0.0)) > 0


factory = Factory(
    kind="exporter", type="prometheus", config_model=PrometheusConfig, create=PrometheusExporter,
    stability=Stability.BETA,
    description="Serves the latest metrics on /metrics for Prometheus to scrape (text and OpenMetrics, gzip)",
)
