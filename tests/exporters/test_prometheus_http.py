"""prometheus exporter's HTTP server against slow and broken clients, over real sockets (the hostile clients that
all three listeners share are in tests/core/test_http_endpoints.py)."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.request

import pytest
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


def _tls_client(certs, lowest: ssl.TLSVersion, highest: ssl.TLSVersion) -> ssl.SSLContext:
    import warnings

    ctx = ssl.create_default_context(cafile=certs.ca)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 offers TLS 1.0/1.1 only at security level 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version, ctx.maximum_version = lowest, highest
    return ctx


V = ssl.TLSVersion


@pytest.mark.parametrize("tls,client,negotiated", [
    ({}, (V.TLSv1_2, V.TLSv1_3), "TLSv1.3"),
    ({}, (V.TLSv1, V.TLSv1_1), None),  # the default minimum is 1.2
    ({"min_version": "1.3"}, (V.TLSv1_2, V.TLSv1_2), None),
    ({"min_version": 1.3}, (V.TLSv1_2, V.TLSv1_3), "TLSv1.3"),  # unquoted in YAML: a number
    ({"max_version": "1.2"}, (V.TLSv1_2, V.TLSv1_3), "TLSv1.2"),
    ({"max_version": "1.2"}, (V.TLSv1_3, V.TLSv1_3), None),
    ({"min_version": "1.0", "max_version": "1.0"}, (V.TLSv1, V.TLSv1_3), "TLSv1"),
    ({"min_version": "1.1"}, (V.TLSv1_1, V.TLSv1_1), "TLSv1.1"),
])
def test_tls_min_and_max_version_bound_what_a_real_client_negotiates(kit, host, tmp_path, tls, client, negotiated):
    """tls.min_version and tls.max_version (confighttp's keys, in most copied collector configs) were refused as
    unknown keys: the agent would not start. A real TLS client over a real socket gets the version they allow, or
    no handshake."""
    certs = make_certs(tmp_path / "certs")
    port = free_port()
    exp, _ = kit.make(factory, {"endpoint": f"127.0.0.1:{port}",
                                "tls": {"cert_file": certs.server_cert, "key_file": certs.server_key, **tls}})
    exp.start(host)
    try:
        exp.export(kit.batch([1]))
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=BOUND, context=_tls_client(certs, *client))
        if negotiated is None:
            with pytest.raises(ssl.SSLError):
                conn.request("GET", "/metrics")
            return
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 200 and r.read() == exp.rendering().text
        assert conn.sock.version() == negotiated
        conn.close()
    finally:
        exp.shutdown()


@pytest.mark.parametrize("tls,problem", [
    ({"min_version": "1.4"}, "exporters::prometheus::tls::min_version: unsupported TLS version; use one of 1.0, "
                             "1.1, 1.2, 1.3 (got '1.4')"),
    ({"max_version": "TLS1.3"}, "exporters::prometheus::tls::max_version: unsupported TLS version; use one of "
                                "1.0, 1.1, 1.2, 1.3 (got 'TLS1.3')"),
    ({"max_version": "1.1"}, "exporters::prometheus::tls: min_version 1.2 is above max_version 1.1 (min_version "
                             "defaults to 1.2)"),
    ({"min_version": "1.3", "max_version": "1.2"}, "exporters::prometheus::tls: min_version 1.3 is above "
                                                   "max_version 1.2 (min_version defaults to 1.2)"),
])
def test_bad_tls_versions_are_refused_at_their_key(tls, problem):
    from podmeter.config import validate_component

    problems: list[str] = []
    validate_component(factory, {"tls": {"cert_file": "c", "key_file": "k", **tls}}, "exporters::prometheus",
                       problems)
    assert problems == [problem]
