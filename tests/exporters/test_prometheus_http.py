"""prometheus exporter's HTTP server against slow and broken clients, over real sockets (the hostile clients that
all three listeners share are in tests/core/test_http_endpoints.py)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.request

from harness import free_port
from harness.tls import make_certs

from exporters.prometheus import factory

BOUND = 20.0  # how long a test waits for what should take about a second


def test_a_slow_reader_gets_a_large_exposition_whole(kit, host):
    """The socket timeout bounded each sendall, and a family's chunk (or a gzipped exposition) is one sendall: a
    scraper reading a few MB over a slow link was cut off mid-body once the whole chunk took longer than the
    timeout, though it never stopped reading. The limit is now on a reader that takes nothing for that long."""
    port = free_port()
    exp, _ = kit.make(factory, {"endpoint": f"127.0.0.1:{port}"})
    exp.start(host)
    try:
        exp.export(kit.batch(range(2000)))  # 4.6 MB of text, its largest family 2.3 MB
        expected = exp.rendering().text
        exp._server.RequestHandlerClass.timeout = 2.0  # the agent's is a minute: the test reads for seconds
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before connecting: a small window
        s.settimeout(BOUND)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = bytearray()
        while data := s.recv(32768):  # about 640 KB/s: a 2.3 MB chunk takes 3.6 s, each 256 KiB slice 0.4 s
            got += data
            time.sleep(0.05)
        s.close()
        head, _, body = bytes(got).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert body == expected
    finally:
        exp.shutdown()


def test_tls_port_survives_plain_http_and_stalled_handshakes(kit, host, tmp_path, capfd):
    """On the HTTPS port: a client that connects and never starts its handshake, one that trickles it, and one
    that speaks plain HTTP. None may stall other scrapes (the handshake is not done in the accept loop) and each
    is closed within request_timeout (the handshake had only the per-read socket timeout, so a trickling one was
    never closed); no traceback."""
    certs = make_certs(tmp_path / "certs")
    port = free_port()
    exp, _ = kit.make(factory, {"endpoint": f"127.0.0.1:{port}",
                                "tls": {"cert_file": certs.server_cert, "key_file": certs.server_key}})
    exp.start(host)
    try:
        exp.export(kit.batch(range(3)))
        exp._server.request_timeout = 1.0
        silent = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
        plain = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
        plain.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        trickle = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
        done = threading.Event()

        def drip() -> None:  # the start of a TLS record, a byte every 0.2 s
            try:
                for b in b"\x16\x03\x01\x02\x00" + b"\x01" * 512:
                    if done.wait(0.2):
                        return
                    trickle.send(bytes([b]))
            except OSError:
                pass

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        ctx = ssl.create_default_context(cafile=certs.ca)
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=BOUND, context=ctx) as r:
            assert r.status == 200 and b"container_cpu_time_seconds_total" in r.read()
        try:
            for s in (silent, plain, trickle):
                try:
                    while s.recv(4096):  # plain HTTP may get a TLS alert before the close
                        pass
                except ConnectionResetError:
                    pass
                s.close()  # a TimeoutError here: the server kept the connection past BOUND
        finally:
            done.set()
            dripper.join(BOUND)
        err = capfd.readouterr().err
        assert "Traceback" not in err, err
    finally:
        exp.shutdown()
