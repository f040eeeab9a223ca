"""Real OTLP receivers for exporter tests: a sink on opentelemetry-proto's official gRPC stubs (and the spec's
HTTP/protobuf endpoint), and rotel (PyPI `rotel`, a Rust OpenTelemetry collector) as a real peer in front of it.

    from harness.otlp import OTLPSink, RotelAgent

    sink = OTLPSink().start()                    # gRPC on sink.grpc_endpoint, HTTP on sink.http_endpoint
    ... push to "http://127.0.0.1:%d" % sink.grpc_port  or  sink.http_endpoint (base URL; POST /v1/metrics)
    sink.wait_for(lambda pts: len(pts) >= 3)     # -> list of Point(resource, name, attributes, value, kind)
    sink.set_failing(True)                       # answer UNAVAILABLE (gRPC) / 503 (HTTP) until set_failing(False)
    sink.refused, sink.refused_by["grpc"]        # attempts answered with that failure (all / per protocol)
    sink.stop(); sink.start()                    # a real outage: the ports close and reopen (same numbers)
    sink.headers                                 # metadata / HTTP headers of every accepted request

    sink = OTLPSink(certs=make_certs(tmp), client_auth=True).start()   # TLS (mutual with client_auth)
    sink = OTLPSink(max_receive_message_length=6000)  # gRPC refuses larger requests, as a collector with a
                                                      # small max_recv_msg_size_mib does (RESOURCE_EXHAUSTED)

    with RotelAgent(forward_to=sink.grpc_endpoint) as rotel:          # rotel receives, forwards to the sink
        push to rotel.grpc_endpoint ("http://127.0.0.1:PORT") or rotel.http_endpoint ("http://127.0.0.1:PORT")
        rotel.stop(); rotel.start()              # outage of the real peer, same ports
        rotel.log()                              # its log (with the detailed debug log of every metric)

Point.value is a float for gauges and sums, and (count, sum, bucket_counts, explicit_bounds) for histograms.
rotel's receivers have no TLS options, so TLS is tested against the sink.
"""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as ms_grpc

from harness import free_port, require, stop_process


@dataclass
class Point:
    resource: dict
    name: str
    attributes: dict
    value: object
    kind: str  # gauge | sum | histogram | ...
    temporality: int = 0  # 1 delta, 2 cumulative (OTLP enum); 0 for gauges


def _any(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_any(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return {kv.key: _any(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> dict:
    return {kv.key: _any(kv.value) for kv in kvs}


def flatten(requests) -> list[Point]:
    out = []
    for req in requests:
        for rm in req.resource_metrics:
            res = _attrs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    data = getattr(m, kind)
                    temporality = getattr(data, "aggregation_temporality", 0)
                    for dp in data.data_points:
                        if kind == "histogram":
                            value = (dp.count, dp.sum, tuple(dp.bucket_counts), tuple(dp.explicit_bounds))
                        elif kind in ("gauge", "sum"):
                            value = dp.as_double if dp.WhichOneof("value") == "as_double" else float(dp.as_int)
                        else:
                            value = None
                        out.append(Point(res, m.name, _attrs(dp.attributes), value, kind, temporality))
    return out


class OTLPSink(ms_grpc.MetricsServiceServicer):
    def __init__(self, certs=None, client_auth: bool = False, max_receive_message_length: int = 0) -> None:
        self.certs = certs
        self.client_auth = client_auth
        self.max_receive_message_length = max_receive_message_length  # 0: grpcio's default (4 MiB)
        self.grpc_port = free_port()
        self.http_port = free_port()
        scheme = "https" if certs else "http"
        self.grpc_endpoint = f"{scheme}://127.0.0.1:{self.grpc_port}"
        self.http_endpoint = f"{scheme}://127.0.0.1:{self.http_port}"
        self.requests: list = []
        self.headers: list[dict] = []
        self.failing = False
        self.refused = 0  # requests answered with an injected failure
        self.refused_by = {"grpc": 0, "http": 0}
        self.cond = threading.Condition()
        self._grpc = None
        self._http = None

    # -- the receiver -------------------------------------------------------------------------------------------

    def Export(self, request, context):  # noqa: N802 - the generated servicer's name
        if self.failing:
            with self.cond:
                self.refused += 1
                self.refused_by["grpc"] += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "sink is failing on purpose")
        self._record(request, dict(context.invocation_metadata()))
        return ms_pb2.ExportMetricsServiceResponse()

    def _record(self, request, headers: dict) -> None:
        with self.cond:
            self.requests.append(request)
            self.headers.append(headers)
            self.cond.notify_all()

    def set_failing(self, failing: bool) -> None:
        self.failing = failing

    def points(self) -> list[Point]:
        with self.cond:
            reqs = list(self.requests)
        return flatten(reqs)

    def wait_for(self, predicate, timeout: float = 30.0) -> list[Point]:
        """Wait until predicate(points) holds; return the points (AssertionError with them on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            pts = self.points()
            if predicate(pts):
                return pts
            if time.monotonic() > deadline:
                raise AssertionError(f"OTLP sink: condition not met within {timeout}s; {len(self.requests)} "
                                     f"requests, {len(pts)} points")
            with self.cond:
                self.cond.wait(0.2)

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> OTLPSink:
        options = ([("grpc.max_receive_message_length", self.max_receive_message_length)]
                   if self.max_receive_message_length else [])
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
        ms_grpc.add_MetricsServiceServicer_to_server(self, self._grpc)
        addr = f"127.0.0.1:{self.grpc_port}"
        if self.certs:
            with open(self.certs.server_key, "rb") as k, open(self.certs.server_cert, "rb") as c, \
                    open(self.certs.ca, "rb") as ca:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())], root_certificates=ca.read(),
                                                    require_client_auth=self.client_auth)
            self._grpc.add_secure_port(addr, creds)
        else:
            self._grpc.add_insecure_port(addr)
        self._grpc.start()
        self._http = _HTTPServer(("127.0.0.1", self.http_port), _make_handler(self))
        if self.certs:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.certs.server_cert, self.certs.server_key)
            if self.client_auth:
                ctx.load_verify_locations(self.certs.ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
            self._http.socket = ctx.wrap_socket(self._http.socket, server_side=True)
        threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(0).wait()
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> OTLPSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:  # a refused TLS client is part of some tests
        pass


def _make_handler(sink: OTLPSink):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/v1/metrics":
                return self._reply(404, b"")
            if self.headers.get("Content-Type") != "application/x-protobuf":
                return self._reply(415, b"")
            if sink.failing:
                with sink.cond:
                    sink.refused += 1
                    sink.refused_by["http"] += 1
                return self._reply(503, b"failing on purpose")
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            req = ms_pb2.ExportMetricsServiceRequest()
            req.ParseFromString(body)
            sink._record(req, {k.lower(): v for k, v in self.headers.items()})
            self._reply(200, ms_pb2.ExportMetricsServiceResponse().SerializeToString(), "application/x-protobuf")

        def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler


# ---------------------------------------------------------------------------------------------------------
# rotel


def rotel_binary() -> str:
    try:
        import rotel
    except ImportError:
        rotel = None
    path = os.path.join(os.path.dirname(rotel.__file__), "rotel-agent") if rotel else ""
    require(bool(path) and os.access(path, os.X_OK), "needs rotel from PyPI (pip install rotel; a dev dependency)")
    return path


class RotelAgent:
    """rotel-agent receiving OTLP (gRPC and HTTP) and forwarding to `forward_to` (an OTLP gRPC endpoint URL)."""

    def __init__(self, forward_to: str, batch_timeout: str = "50ms") -> None:
        self.binary = rotel_binary()
        self.forward_to = forward_to
        self.batch_timeout = batch_timeout
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.grpc_endpoint = f"http://127.0.0.1:{self.grpc_port}"
        self.http_endpoint = f"http://127.0.0.1:{self.http_port}"
        self.dir = tempfile.mkdtemp(prefix="rotel-")
        self.log_path = os.path.join(self.dir, "rotel.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> RotelAgent:
        out = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [self.binary, "start", "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
             "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}", "--exporter", "otlp",
             "--otlp-exporter-endpoint", self.forward_to, "--otlp-exporter-protocol", "grpc",
             "--debug-log", "metrics", "--debug-log-verbosity", "detailed", "--batch-timeout", self.batch_timeout,
             "--pid-file", os.path.join(self.dir, "rotel.pid")],
            stdout=out, stderr=subprocess.STDOUT)
        out.close()
        deadline = time.monotonic() + 20
        for port in (self.grpc_port, self.http_port):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.2).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"rotel did not start: {self.log()[-2000:]}") from None
                    time.sleep(0.02)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def __enter__(self) -> RotelAgent:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
