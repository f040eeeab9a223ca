"""One attempt to deliver an encoded ExportMetricsServiceRequest, over gRPC or HTTP, classified for retrying.

Why not `OTLPMetricExporter.export()` from opentelemetry-exporter-otlp: its gRPC and HTTP exporters run their
own retry loop inside export() (exponential backoff up to ~64 s, bounded only by their timeout), which would
fight `retry_on_failure` (two nested backoffs, and no way to count attempts or honour max_elapsed_time), and
they take SDK objects, not the bytes a persistent queue holds. So podmeter encodes with the same
opentelemetry-exporter-otlp-proto-common encoder and sends each attempt once here: gRPC through the official
MetricsService method, HTTP as the spec's POST of application/x-protobuf.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import gzip
import json
import os
import ssl
import threading
from dataclasses import dataclass

import grpc
import requests
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

from podmeter import __version__

USER_AGENT = f"podmeter/{__version__}"

# The method the official stub calls (metrics_service_pb2_grpc.MetricsServiceStub.Export).
EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
assert metrics_service_pb2_grpc.MetricsServiceStub  # the path above is that stub's

# As the collector's exporterhelper: these codes mean "try again later"; others are permanent.
RETRYABLE_GRPC = {grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                  grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}
RETRYABLE_HTTP = {429, 502, 503, 504}


@dataclass
class Outcome:
    ok: bool
    retryable: bool = False
    message: str = ""
    retry_after: float | None = None  # the server's requested delay, seconds
    rejected: int = 0  # points the server refused in a partial success
    kind: str = ""  # the class of a failure (gRPC code, HTTP status, exception): one log line per class
    too_large: bool = False  # the server refused the request for its size (HTTP 413, gRPC "larger than max")


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


# Where Go's crypto/x509 (so the collector) looks for the system's CA bundle on Linux, after $SSL_CERT_FILE.
_SYSTEM_CA_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/ca-bundle.pem",
                    "/etc/pki/tls/cacert.pem", "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", "/etc/ssl/cert.pem")


def system_ca_file() -> str | None:
    """The system's CA bundle, as the collector trusts by default. Without it grpcio would verify against its own
    bundled roots and requests against certifi's, so a gateway signed by a CA installed in the node's (or image's)
    trust store, which the collector accepts, would fail every send with a TLS error."""
    found = ssl.get_default_verify_paths().cafile  # honours $SSL_CERT_FILE, as Go and OpenSSL do
    if found:
        return found
    return next((path for path in _SYSTEM_CA_FILES if os.path.isfile(path)), None)


def check_tls_files(tls) -> None:
    """Load the configured CA and client certificate as a TLS client would, so that a missing, unreadable or
    malformed file fails the exporter's start (ValueError naming the key) instead of every send."""
    if tls.ca_file:
        try:
            if os.path.isdir(tls.ca_file):  # requests takes a c_rehash'd directory too
                ssl.create_default_context(capath=tls.ca_file)
            else:
                ssl.create_default_context(cafile=tls.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"tls::ca_file: cannot load {tls.ca_file}: {_reason(exc)}") from exc
    if tls.cert_file:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(tls.cert_file, tls.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"tls::cert_file/key_file: cannot load {tls.cert_file} and {tls.key_file}: "
                             f"{_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)


def _partial(resp: metrics_service_pb2.ExportMetricsServiceResponse) -> Outcome:
    ps = resp.partial_success
    if ps.rejected_data_points or ps.error_message:
        return Outcome(True, rejected=ps.rejected_data_points, message=ps.error_message)
    return Outcome(True)


class GrpcSender:
    def __init__(self, config) -> None:
        endpoint = config.endpoint
        insecure = config.tls.insecure
        if endpoint.startswith("http://"):
            insecure = True
        elif endpoint.startswith("https://"):
            insecure = False
        self.target = endpoint.split("://", 1)[-1].rstrip("/")
        if endpoint.startswith("dns:"):  # dns:///host:port, or dns://server/host:port (see config.py)
            self.target = "dns:///" + self.target.split("/", 1)[1]
        options = [
            # retry_on_failure is the one retry policy: no transparent gRPC retries under it
            ("grpc.enable_retries", 0),
            # After an outage the channel reconnects on its own backoff (default up to 120 s) and fails calls
            # fast meanwhile; keep that short so delivery resumes soon after the backend is back.
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.primary_user_agent", USER_AGENT),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # the collector's otlp exporter default (balancer_name: round_robin): requests are spread over every
            # address the name resolves to (the pods of a headless gateway Service), not all sent to the first
            ("grpc.lb_policy_name", "round_robin"),
        ]
        if insecure:
            self.channel = grpc.insecure_channel(self.target, options=options)
        else:
            tls = config.tls
            check_tls_files(tls)
            creds = grpc.ssl_channel_credentials(root_certificates=_read(tls.ca_file or system_ca_file() or ""),
                                                 private_key=_read(tls.key_file),
                                                 certificate_chain=_read(tls.cert_file))
            self.channel = grpc.secure_channel(self.target, creds, options=options)
        # request bytes go through as they are (request_serializer None): they are already encoded
        self.call = self.channel.unary_unary(
            EXPORT_METHOD, request_serializer=None,
            response_deserializer=metrics_service_pb2.ExportMetricsServiceResponse.FromString)
        # a -bin key's value is binary: grpcio wants bytes (a str fails every call with a TypeError); the
        # collector sends its UTF-8 bytes, base64-encoded on the wire
        self.metadata = [(k.lower(), v.encode() if k.lower().endswith("-bin") else v)
                         for k, v in config.headers.items()]
        self.compression = grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression
        self.timeout = config.timeout

    def send(self, data: bytes) -> Outcome:
        try:
            resp = self.call(data, timeout=self.timeout, metadata=self.metadata, compression=self.compression)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
            detail = err.details() if hasattr(err, "details") else str(err)
            retry_after = _grpc_retry_after(err)
            retryable = code in RETRYABLE_GRPC or (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                                   and retry_after is not None)
            # a gateway whose max_recv_msg_size is below our request size answers RESOURCE_EXHAUSTED, without
            # RetryInfo: "Received message larger than max (N vs. M)" (grpc-go says "grpc: received message ...")
            too_large = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (detail or "")
            return Outcome(False, retryable, f"{code.name}: {detail}", retry_after, kind=code.name,
                           too_large=too_large)
        return _partial(resp)

    def close(self) -> None:
        self.channel.close()


def _grpc_retry_after(err) -> float | None:
    """The delay a server asks for in a RetryInfo, or None without one. Servers (the collector's receiver, any
    grpc-go or grpc-java server) send it as a detail of the google.rpc.Status in the `grpc-status-details-bin`
    trailer, as the OTLP spec shows; a few Google APIs also send it alone as `google.rpc.retryinfo-bin`."""
    try:
        trailing = dict(err.trailing_metadata() or ())
    except Exception:
        return None
    try:
        from google.rpc.error_details_pb2 import RetryInfo
        from google.rpc.status_pb2 import Status

        info = RetryInfo()
        raw = trailing.get("grpc-status-details-bin")
        if raw is not None:
            details = Status.FromString(raw).details
            found = next((d for d in details if d.Is(RetryInfo.DESCRIPTOR)), None)
            if found is None or not found.Unpack(info):
                raw = None
        if raw is None:
            raw = trailing.get("google.rpc.retryinfo-bin")
            if raw is None:
                return None
            info.ParseFromString(raw)
        return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    except Exception:
        return None


class HttpSender:
    def __init__(self, config) -> None:
        self.url = config.metrics_endpoint or config.endpoint.rstrip("/") + "/v1/metrics"
        self.json = config.encoding == "json"
        content_type = "application/json" if self.json else "application/x-protobuf"
        self.headers = {"Content-Type": content_type, "User-Agent": USER_AGENT,
                        **{k: _header_value(v) for k, v in config.headers.items()}}
        # one Session (connection pool) per consumer thread: requests does not promise Session is thread-safe
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()
        tls = config.tls
        if self.url.startswith("https://"):
            check_tls_files(tls)
        self.verify: bool | str = False if tls.insecure_skip_verify else (tls.ca_file or system_ca_file() or True)
        self.cert = (tls.cert_file, tls.key_file) if tls.cert_file else None
        self.gzip = config.compression == "gzip"
        self.timeout = config.timeout

    def send(self, data: bytes) -> Outcome:
        headers = {}
        body = _to_json(data) if self.json else data
        if self.gzip:
            body = gzip.compress(body, 5)
            headers["Content-Encoding"] = "gzip"
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(self.headers)
            with self._sessions_lock:
                self._sessions.append(session)
        try:
            resp = session.post(self.url, data=body, headers=headers, timeout=self.timeout,
                                     verify=self.verify, cert=self.cert)
        except requests.exceptions.SSLError as exc:
            # The connection closed during the handshake (a load balancer or proxy whose backend is restarting)
            # is an outage, like a refused connection, and retried (the collector retries it too). Anything else
            # (an untrusted certificate, a handshake the server refuses) is the configuration's: permanent.
            closed = isinstance(_ssl_cause(exc), ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError)
            return Outcome(False, closed, f"TLS error: {exc}", kind="SSLError")
        except requests.exceptions.RequestException as exc:  # refused, reset, timed out: the backend is away
            return Outcome(False, True, f"{type(exc).__name__}: {_short(exc)}", kind=type(exc).__name__)
        except (OSError, ValueError) as exc:  # e.g. a TLS file removed since start: permanent until fixed
            return Outcome(False, False, f"{type(exc).__name__}: {exc}", kind=type(exc).__name__)
        if 200 <= resp.status_code < 300:
            ctype = resp.headers.get("Content-Type", "")
            if resp.content and ("protobuf" in ctype or "json" in ctype):
                try:
                    return _partial(_parse(resp.content, "json" in ctype,
                                           metrics_service_pb2.ExportMetricsServiceResponse()))
                except Exception:
                    return Outcome(True)
            return Outcome(True)
        retry_after = _retry_after(resp.headers.get("Retry-After", ""))
        text = _error_text(resp)
        return Outcome(False, resp.status_code in RETRYABLE_HTTP, f"HTTP {resp.status_code} {resp.reason}: {text}",
                       retry_after, kind=f"HTTP {resp.status_code}", too_large=resp.status_code == 413)

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


def _ssl_cause(exc: BaseException) -> BaseException | None:
    """The ssl module's error under requests' SSLError (requests and urllib3 each wrap it)."""
    seen = 0
    while exc is not None and not isinstance(exc, ssl.SSLError) and seen < 10:
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return exc if isinstance(exc, ssl.SSLError) else None


def _header_value(value: str) -> str | bytes:
    """A header value as the collector (Go's HTTP client) sends it: a value that is not ASCII as its UTF-8 bytes
    (given as str, http.client would send Latin-1 and refuse anything beyond). Leading whitespace, which a server
    drops anyway (RFC 9110), is dropped here: requests refuses it, and every send failed as if the backend were away."""
    value = value.lstrip(" \t")
    return value if value.isascii() else value.encode()


def _retry_after(value: str) -> float | None:
    """Seconds a Retry-After header asks to wait: delay-seconds, or an HTTP-date (RFC 9110; the collector's
    otlphttp exporter reads both). A date already past means now; anything else is no request."""
    value = value.strip()
    if value.isdigit():
        # isdigit() is also true of "²" and other Latin-1 digits a header can carry, which float() refuses
        return float(value) if value.isascii() else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT; "-0000" parses as naive
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _error_text(resp) -> str:
    """What a failed response says. An OTLP/HTTP server answers 4xx/5xx with a protobuf google.rpc.Status (the
    collector's receiver does): its message, not the raw bytes, goes to the log."""
    if not resp.content:
        return ""
    ctype = resp.headers.get("Content-Type", "")
    if "protobuf" in ctype or "json" in ctype:  # as the request was encoded: the collector answers in kind
        try:
            from google.rpc.status_pb2 import Status

            return _parse(resp.content, "json" in ctype, Status()).message[:200]
        except Exception:
            if "protobuf" in ctype:
                return f"({len(resp.content)} bytes of undecodable protobuf)"
    return resp.text[:200].strip()


def _parse(content: bytes, is_json: bool, message):
    if is_json:
        return json_format.Parse(content, message, ignore_unknown_fields=True)
    message.ParseFromString(content)
    return message


def _to_json(data: bytes) -> bytes:
    """An encoded request as OTLP/JSON: the proto3 JSON mapping (lowerCamelCase keys, 64-bit integers as decimal
    strings) with the OTLP spec's two changes: enums as integers, trace and span ids as hex, not base64. The
    queue holds protobuf (one format on disk, whatever the encoding), so this runs per attempt, on a consumer."""
    request = metrics_service_pb2.ExportMetricsServiceRequest.FromString(data)
    tree = json_format.MessageToDict(request, use_integers_for_enums=True)
    for rm in tree.get("resourceMetrics", ()):
        for sm in rm.get("scopeMetrics", ()):
            for metric in sm.get("metrics", ()):
                for kind in ("sum", "gauge", "histogram", "exponentialHistogram", "summary"):
                    for point in metric.get(kind, {}).get("dataPoints", ()):
                        for exemplar in point.get("exemplars", ()):
                            for key in ("traceId", "spanId"):
                                if key in exemplar:
                                    exemplar[key] = base64.b64decode(exemplar[key]).hex()
    return json.dumps(tree, separators=(",", ":")).encode()


def _short(exc: Exception) -> str:
    text = str(exc)
    # urllib3 wraps the cause in long reprs; the last part says what happened
    if "Caused by" in text:
        text = text.split("Caused by", 1)[1]
    return text.strip(" ():'\"")[:200]
