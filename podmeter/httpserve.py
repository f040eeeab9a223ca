"""The HTTP server behind the agent's three listeners (prometheus /metrics, self-telemetry, health_check).

http.server as it comes cannot face a node's network: it listens with a backlog of 5 (a burst of connections has
its SYNs dropped and waits 1 s, 3 s, 7 s to retry, long enough to fail a 5 s liveness probe), it waits for a
request forever (a connection that sends half a request line, or an idle keep-alive one, holds a thread for good)
and it starts a thread for every connection, without limit. `Server` fixes those, in the way of Go's net/http
that the collector and Prometheus's exporters run on (ReadHeaderTimeout and IdleTimeout):

- a connection must complete its request's headers (and its TLS handshake) within `request_timeout` of being
  accepted or of its previous response: a total deadline, so that trickling a byte at a time does not extend it;
- writing a response has no deadline (a large exposition over a slow link takes what it takes), only a limit on
  a reader that takes nothing for `Handler.timeout`;
- at most `max_connections` at once: a new one past that closes the one that has waited longest for a request
  (an attacker's stalled connections go first, a scrape in progress is never cut), or is itself closed when
  every connection is busy answering.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("podmeter.http")

WRITE_SLICE = 256 * 1024  # sendall's timeout covers a whole call: written in slices, it is a limit per slice
# http.server takes 100 header lines of 64 KiB each, held while the rest is awaited: 80 connections that sent 99
# such lines and stalled held 540 MB (the DaemonSet's limit is 512 MiB). Scrapers and probes send well under 1 KiB.
MAX_HEADER_BYTES = 64 * 1024


class _HeaderBudget:
    """The request's stream while its headers are read (http.client.parse_headers only calls readline): past
    MAX_HEADER_BYTES in all it raises LineTooLong, which http.server answers with 431."""

    def __init__(self, rfile) -> None:
        self._rfile = rfile
        self._left = MAX_HEADER_BYTES

    def readline(self, limit: int = -1) -> bytes:
        line = self._rfile.readline(self._left + 1 if limit < 0 else min(limit, self._left + 1))
        self._left -= len(line)
        if self._left < 0:
            raise http.client.LineTooLong("header section")
        return line


class _Conn:
    __slots__ = ("deadline", "aborted")

    def __init__(self, deadline: float) -> None:
        self.deadline: float | None = deadline  # None while a request is being answered
        self.aborted = False


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # the kernel caps it at net.core.somaxconn; socketserver's 5 drops SYNs in any burst of connections
    request_queue_size = socket.SOMAXCONN
    request_timeout = 60.0  # from accept, or the end of a response, until the next request's headers are in
    max_connections = 100

    def __init__(self, address, handler, context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self._conns: dict[socket.socket, _Conn] = {}
        self._conns_lock = threading.Lock()
        # the wildcard (`0.0.0.0:9464`, `:9464`) listens on IPv4 and IPv6 alike, as the collector's does (Go listens
        # on [::] without IPV6_V6ONLY for it): an IPv6-only or dual-stack node is scraped at its IPv6 address with
        # the configuration written for the collector; a kernel without IPv6 keeps the IPv4 socket
        self.dual_stack = address[0] in ("", "0.0.0.0") and socket.has_dualstack_ipv6()
        if self.dual_stack:
            address = ("::", *address[1:])
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_bind(self) -> None:
        if self.dual_stack:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def get_request(self):
        sock, addr = super().get_request()
        if self.dual_stack and addr[0].startswith("::ffff:") and "." in addr[0]:
            addr = (addr[0][7:], *addr[1:])  # an IPv4 client, named as such in logs and access lines
        if self.context is not None:
            # the handshake runs in the connection's own thread (Handler.setup), never in the accept loop, and
            # within request_timeout
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request, client_address) -> None:
        now = time.monotonic()
        with self._conns_lock:
            live = [(c.deadline, s) for s, c in self._conns.items() if not c.aborted]
            if len(live) >= self.max_connections:
                waiting = [(d, id(s), s) for d, s in live if d is not None]
                if not waiting:  # every connection is being answered: this one waits for none of them
                    self.shutdown_request(request)
                    return
                self._abort_locked(min(waiting)[2])
            self._conns[request] = _Conn(now + self.request_timeout)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread to serve it (the caller closes it)
            self._forget(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def service_actions(self) -> None:
        # from serve_forever's loop (every poll_interval): close the connections past their request deadline
        now = time.monotonic()
        with self._conns_lock:
            for sock, conn in list(self._conns.items()):
                if not conn.aborted and conn.deadline is not None and conn.deadline < now:
                    self._abort_locked(sock)

    def server_close(self) -> None:
        super().server_close()
        with self._conns_lock:  # a stopped server answers no more requests on the connections it kept open
            for sock in list(self._conns):
                self._abort_locked(sock)

    def handle_error(self, request, client_address) -> None:
        import sys

        exc = sys.exc_info()[1]
        with self._conns_lock:
            conn = self._conns.get(request)
            if conn is not None and conn.aborted:  # closed here (deadline, limit, stop): what failed is expected
                return
        self.connection_failed(client_address, exc)

    def connection_failed(self, client_address, exc: BaseException | None) -> None:
        """A client hanging up, failing its TLS handshake or timing out is its own business: no traceback."""
        if isinstance(exc, OSError):
            log.debug("connection from %s: %s: %s", client_address[0], type(exc).__name__, exc)
        else:
            log.warning("serving %s failed", client_address[0], exc_info=exc)

    # -- connection states, called by Handler ------------------------------------------------------------------

    def answering(self, sock) -> bool:
        """The request's headers are in: no deadline while it is answered. False if it was closed meanwhile."""
        with self._conns_lock:
            conn = self._conns.get(sock)
            if conn is None or conn.aborted:
                return False
            conn.deadline = None
            return True

    def waiting(self, sock) -> None:
        """A response is written: the next request has request_timeout to arrive."""
        with self._conns_lock:
            conn = self._conns.get(sock)
            if conn is not None:
                conn.deadline = time.monotonic() + self.request_timeout

    def _forget(self, sock) -> None:
        with self._conns_lock:
            self._conns.pop(sock, None)

    def _abort_locked(self, sock) -> None:
        self._conns[sock].aborted = True
        try:
            # the plain socket's shutdown, also for a TLS one: the thread blocked reading it returns at once, and
            # the SSLSocket's own state, used by that thread, is left alone
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass


class Handler(BaseHTTPRequestHandler):
    """Works with Server: reports when a request's headers are in and when its response is written."""

    server: Server
    # http.server's per-operation socket timeout: here only the limit on a reader that takes nothing (see
    # write_body) and a backstop; the wait for a request is bounded by Server.request_timeout
    timeout = 60.0
    # the Server header names podmeter alone: http.server would add the Python version, which tells a scanner what
    # to try and a scraper nothing
    server_version = "podmeter"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def parse_request(self) -> bool:
        rfile, self.rfile = self.rfile, _HeaderBudget(self.rfile)
        try:
            ok = super().parse_request()  # reads the headers
        finally:
            self.rfile = rfile
        if not self.server.answering(self.connection):  # closed past its deadline: what was read is cut short
            self.close_connection = True
            return False
        return ok

    def handle_one_request(self) -> None:
        super().handle_one_request()
        self.server.waiting(self.connection)

    def write_body(self, chunks) -> None:
        """Write the body's chunks, in slices so that the stall limit applies to each and not to a whole chunk."""
        if self.command == "HEAD":
            return
        for chunk in chunks:
            view = memoryview(chunk)
            for i in range(0, len(view), WRITE_SLICE):
                self.wfile.write(view[i:i + WRITE_SLICE])

    def log_message(self, format, *args) -> None:  # noqa: A002 - probes and scrapes are counted, not logged
        pass
