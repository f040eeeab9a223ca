"""The agent's three HTTP listeners (prometheus /metrics, self-telemetry, health_check) against hostile clients,
over real sockets: each must keep answering scrapes and probes, and hold no thread for a client that stalls.

The deadlines are lowered on the running server so that the tests wait seconds, not the minute they are in the
agent; every wait has a bound many times what it needs and nothing is timed.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import urllib.request

import pytest
from harness import free_port, wait_for

from exporters.prometheus import factory as prometheus_factory
from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.extensions.health_check import factory as health_factory
from podmeter.telemetry import ComponentTelemetry, Telemetry

BOUND = 20.0  # how long a test waits for what should take about a second


class Endpoint:
    def __init__(self, name: str, port: int, server, path: str, stop) -> None:
        self.name, self.port, self.server, self.path, self._stop = name, port, server, path, stop

    def stop(self) -> None:
        self._stop()


def _create(factory, config: dict):
    telemetry = Telemetry()
    cid = ComponentID(factory.type, "")
    logger = logging.getLogger(f"test.{cid}")
    settings = CreateSettings(id=cid, kind=factory.kind, logger=logger,
                              telemetry=ComponentTelemetry(telemetry, str(cid), logger))
    return factory.create(settings, factory.config_model.model_validate(config)), telemetry


def start_endpoint(name: str, host: str, tmp_path) -> Endpoint:
    """One of the agent's three listeners on `host` and a free port, as the agent serves it."""
    port = free_port()
    if name == "prometheus":
        exp, _ = _create(prometheus_factory, {"endpoint": f"{host}:{port}"})
        exp.start(Host())
        return Endpoint("prometheus", port, exp._server, "/metrics", exp.shutdown)
    if name == "health_check":
        ext, _ = _create(health_factory, {"endpoint": f"{host}:{port}"})
        ext.start(Host())
        return Endpoint("health_check", port, ext.server, "/", ext.shutdown)
    # the agent's own :8888, as the runtime serves it
    from podmeter.config import load
    from podmeter.runtime import Service

    path = tmp_path / "agent.yaml"
    path.write_text(f"""
receivers: {{cgroup: {{}}}}
exporters: {{debug: {{}}}}
service:
  telemetry: {{metrics: {{address: "{host}:{port}"}}}}
  pipelines: {{metrics: {{receivers: [cgroup], exporters: [debug]}}}}
""")
    service = Service(load([str(path)], env={}))
    service._start_telemetry_server()
    return Endpoint("telemetry", port, service._telemetry_server[0], "/metrics", service._stop_telemetry_server)


@pytest.fixture(params=["prometheus", "telemetry", "health_check"])
def endpoint(request, tmp_path):
    ep = start_endpoint(request.param, "127.0.0.1", tmp_path)
    yield ep
    ep.stop()


def get(ep: Endpoint, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{ep.port}{ep.path}", method=method)
    with urllib.request.urlopen(req, timeout=BOUND) as r:
        return r.status, dict(r.headers), r.read()


def connection_threads() -> int:
    """Threads serving a connection, in any server of this process (socketserver names them so)."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def connect(ep: Endpoint, send: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", ep.port), timeout=BOUND)
    if send:
        s.sendall(send)
    return s


def closed_by_server(s: socket.socket) -> bool:
    """Read until the server closes the connection (True), or BOUND passes with it still open (False)."""
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        s.close()


def test_listen_backlog_takes_a_burst_of_connections(endpoint):
    """socketserver listens with a backlog of 5: past that the kernel drops a connection's SYN and the client
    retries after 1 s, 3 s, 7 s (100 connections in a row took 16 s here), so a burst of scrapers, or anyone
    flooding the port, makes a 5 s liveness probe fail. The backlog is read back from the listening socket
    (TCP_INFO's tcpi_sacked is a listener's maximum backlog)."""
    info = endpoint.server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    assert struct.unpack_from("I", info, 28)[0] >= 128


def test_stalled_and_idle_connections_are_closed_at_the_request_deadline(endpoint):
    """Slowloris: connections that send nothing, half a request line, half the headers, headers a byte at a time,
    or that sit idle after a response. http.server waits for each forever (or, with a socket timeout, forever for
    one that keeps trickling); each must be closed once request_timeout has passed."""
    endpoint.server.request_timeout = 1.0
    stalled = [
        connect(endpoint),
        connect(endpoint, b"GET /metr"),
        connect(endpoint, b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Ag"),
        connect(endpoint, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),  # answered, then idle (keep-alive)
    ]
    trickle = connect(endpoint, b"GET /metrics HTTP/1.1\r\nX-Slow: ")
    done = threading.Event()

    def drip() -> None:  # a byte every 0.2 s: no single read ever waits long
        try:
            while not done.wait(0.2):
                trickle.send(b"a")
        except OSError:
            pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        assert [closed_by_server(s) for s in stalled] == [True] * len(stalled)
        assert closed_by_server(trickle)
    finally:
        done.set()
        dripper.join(BOUND)
    assert get(endpoint)[0] == 200


def test_a_flood_of_connections_holds_bounded_threads_and_probes_still_answer(endpoint):
    """A thread per connection without limit: 400 stalled connections held 400 threads (memory, pids, fds that
    the receivers need) for as long as the attacker liked. Past max_connections the connection that has waited
    longest for a request is closed, and a scrape or probe made during the flood is answered."""
    before = connection_threads()
    flood = [connect(endpoint, b"GET / HTTP/1.1\r\nHost") for _ in range(400)]
    try:
        assert get(endpoint)[0] == 200
        wait_for(lambda: connection_threads() - before <= endpoint.server.max_connections, timeout=BOUND,
                 what="at most max_connections connection threads during the flood")
        assert sum(closed_by_server(s) for s in flood[:200]) == 200  # the oldest were closed for newer ones
    finally:
        for s in flood:
            s.close()
    assert get(endpoint)[0] == 200


def test_oversized_headers_are_refused_without_waiting_for_the_rest(endpoint):
    """http.server accepts 100 header lines of 64 KiB and keeps them while it waits for the rest: 80 connections
    that sent 99 such lines and stalled held 540 MB of the agent (its limit is 512 MiB). Past 64 KiB of headers
    the request is refused (431) and the connection closed at once, whatever the request deadline."""
    s = connect(endpoint)
    try:  # 80 KB in lines well under http.server's 64 KiB line limit, and no end of headers
        s.sendall(b"GET / HTTP/1.1\r\n" + (b"X-Big: " + b"a" * 8000 + b"\r\n") * 10)
    except (BrokenPipeError, ConnectionResetError):  # closed before it took everything
        s.close()
    else:  # it may reset rather than let the 431 be read: the rest was left unread
        assert closed_by_server(s)
    assert get(endpoint)[0] == 200


def test_clients_hanging_up_leave_no_traceback(endpoint, capfd):
    """A client that resets the connection in the middle of its request, or right after sending it, is its own
    business: socketserver's default handle_error prints a traceback to stderr for each one."""
    before = connection_threads()
    for payload in (b"GET / HTTP/1.1\r\nHo", f"GET {endpoint.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()) * 5:
        s = connect(endpoint, payload)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a RST
        s.close()
    wait_for(lambda: connection_threads() <= before, timeout=BOUND, what="every connection handled")
    assert get(endpoint)[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def test_head_answers_the_headers_without_a_body(endpoint):
    """HEAD (used by uptime checkers and `curl -I`) got 501 from health_check and 405 from self-telemetry."""
    status, headers, body = get(endpoint, "HEAD")
    assert (status, body) == (200, b"")
    length = int(headers["Content-Length"])
    if endpoint.name == "telemetry":  # its values (CPU time, uptime) change between two requests
        assert length > 0
    else:
        assert length == len(get(endpoint)[2])


def test_the_server_header_names_podmeter_without_the_python_version(endpoint):
    """http.server sends `Server: BaseHTTP/0.6 Python/3.11.7`: the interpreter's version is nothing a scraper or a
    probe uses, and something a scanner does."""
    _status, headers, _body = get(endpoint)
    assert headers["Server"] == "podmeter"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=BOUND):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("name", ["prometheus", "telemetry", "health_check"])
@pytest.mark.parametrize("wildcard", ["0.0.0.0", ""])
def test_the_wildcard_listens_on_ipv4_and_ipv6(name, wildcard, tmp_path):
    """`0.0.0.0:port` and `:port` answer over IPv6 too, as the collector's listeners do: on an IPv6-only node
    Prometheus scrapes the node's IPv6 address with the configuration written for IPv4. An explicit address stays
    what it says."""
    ep = start_endpoint(name, wildcard, tmp_path)
    port, stop = ep.port, ep.stop
    try:
        assert socket.has_dualstack_ipv6(), "this machine has no IPv6 (the test needs ::1)"
        for host in ("127.0.0.1", "::1"):
            with socket.create_connection((host, port), timeout=BOUND) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert s.recv(12).startswith(b"HTTP/1."), host
    finally:
        stop()
    explicit = free_port()
    comp, _ = _create(health_factory, {"endpoint": f"127.0.0.1:{explicit}"})
    comp.start(Host())
    try:
        assert _reachable("127.0.0.1", explicit) and not _reachable("::1", explicit)
    finally:
        comp.shutdown()


def test_ipv4_clients_of_the_wildcard_are_named_as_ipv4():
    """Through the dual-stack socket an IPv4 client's address is `::ffff:a.b.c.d`; logs name it `a.b.c.d`."""
    from http.server import BaseHTTPRequestHandler

    from podmeter import httpserve

    class Echo(httpserve.Handler):
        def do_GET(self) -> None:  # noqa: N802
            body = self.client_address[0].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    assert issubclass(Echo, BaseHTTPRequestHandler)
    server = httpserve.Server(("0.0.0.0", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=BOUND) as r:
            assert r.read() == b"127.0.0.1"
        with urllib.request.urlopen(f"http://[::1]:{port}/", timeout=BOUND) as r:
            assert r.read() == b"::1"
    finally:
        server.shutdown()
        server.server_close()
