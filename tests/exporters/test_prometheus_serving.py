"""prometheus exporter's /metrics as HTTP clients reach it: content negotiation for each Prometheus version's
Accept header, request forms from proxies, and requests with a body on a kept-alive connection. Real HTTP clients
(http.client, urllib) over real sockets."""

from __future__ import annotations

import http.client
import urllib.request

import pytest
from harness import free_port

from exporters.prometheus import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, factory

PROTO = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"


@pytest.fixture
def served(kit, host):
    port = free_port()
    exp, telemetry = kit.make(factory, {"endpoint": f"127.0.0.1:{port}"})
    exp.start(host)
    exp.export(kit.batch([1, 2]))
    yield exp, port
    exp.shutdown()


# Accept headers as Prometheus builds them (scrape.acceptHeader: q falls by 0.1 per scrape_protocols entry, the
# 1.0.0 formats carry escaping=), and as other clients send them
@pytest.mark.parametrize("accept,openmetrics", [
    # Prometheus 2.x
    ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),
    # Prometheus 3 defaults
    ("application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;"
     "version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,"
     "*/*;q=0.2", True),
    # Prometheus 3 with native histograms (protobuf first: not served, the next best is)
    (f"{PROTO};q=0.6,application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.5,"
     "text/plain;version=0.0.4;q=0.4,*/*;q=0.3", True),
    # scrape_protocols: [PrometheusText0.0.4, OpenMetricsText1.0.0]
    ("text/plain;version=0.0.4;q=0.6,application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
     "*/*;q=0.4", False),
    # scrape_protocols: [PrometheusText1.0.0]
    ("text/plain;version=1.0.0;escaping=allow-utf-8;q=0.6,*/*;q=0.5", False),
    ("", False),
    ("*/*", False),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),  # a browser
    # parameter names are case-insensitive (RFC 9110): OpenMetrics was served for Q=0.1 as if q=1
    ("application/openmetrics-text;version=1.0.0;Q=0.1,text/plain;version=0.0.4", False),
    ("text/plain;version=0.0.4;Q=0.2,application/openmetrics-text;version=1.0.0;q=0.5", True),
])
def test_each_prometheus_gets_the_format_it_prefers(served, accept, openmetrics):
    exp, port = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"X-Prometheus-Scrape-Timeout-Seconds": "10", "Accept-Encoding": "gzip"}
    if accept:
        headers["Accept"] = accept
    conn.request("GET", "/metrics", headers=headers)
    r = conn.getresponse()
    r.read()
    conn.close()
    assert r.status == 200
    assert r.getheader("Content-Type") == (OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE)


def test_absolute_form_request_target_is_served(served):
    """A client talking to the agent as to a proxy sends `GET http://host/metrics` (RFC 9112 3.2.2: a server
    must accept the absolute-form): that was a 404."""
    exp, port = served
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"}))
    with opener.open(f"http://node-1.example:{port}/metrics?x=1", timeout=10) as r:
        assert r.status == 200 and r.read() == exp.rendering().text
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", f"http://127.0.0.1:{port}/other")
    assert conn.getresponse().status == 404
    conn.close()


def test_a_request_body_is_not_read_as_the_next_request(served):
    """Nothing reads a request's body: on a kept-alive connection it was parsed as the next request line, and the
    scrape that followed got 400 Bad Request. The connection is now closed after such a request."""
    exp, port = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics", body=b"name[]=container_cpu_time_seconds_total")
    r = conn.getresponse()
    assert r.status == 200 and r.read() == exp.rendering().text
    assert r.getheader("Connection") == "close"
    conn.request("GET", "/metrics")  # http.client opens a new connection after `Connection: close`
    r = conn.getresponse()
    assert r.status == 200 and r.read() == exp.rendering().text
    # without a body the connection is kept
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    r.read()
    assert r.getheader("Connection") is None and not r.will_close
    conn.close()


@pytest.mark.parametrize("tls", [{}, {"cert_file": "", "key_file": ""}, {"client_ca_file": ""}])
def test_tls_without_a_certificate_is_refused_not_served_as_plain_http(tls):
    """`tls` with empty values (a template whose variables were unset) started the exporter on plain HTTP without
    a word: a user who asked for HTTPS had their metrics served in clear."""
    from podmeter.config import validate_component

    problems: list[str] = []
    validate_component(factory, {"tls": tls}, "exporters::prometheus", problems)
    assert problems == ["exporters::prometheus::tls: needs cert_file and key_file (leave tls out to serve plain "
                        "HTTP)"]
    ok: list[str] = []
    validate_component(factory, {"tls": None}, "exporters::prometheus", ok)
    assert ok == []


def test_scrapes_are_accepted_while_an_export_holds_the_exporters_lock(served):
    """Expiry runs in the server's accept loop; when it fell due during an export it waited for the export's lock,
    and no scrape was accepted until the export was done (a scrape must never wait for a collection)."""
    exp, port = served
    url = f"http://127.0.0.1:{port}/metrics"
    with exp._lock:  # an export assembling the exposition
        exp._next_expiry = 0.0  # expiry falls due
        for _ in range(3):  # each request runs the accept loop's housekeeping again
            with urllib.request.urlopen(url, timeout=5) as r:  # a timeout here: the accept loop was stuck
                assert r.status == 200 and r.read() == exp.rendering().text
    # once the export is done, the expiry it skipped runs (nothing is stale here: the series stay)
    exp.expire()
    assert exp._next_expiry > 0.0 and exp.rendering().series > 0


def test_collector_keys_enable_open_metrics_and_send_timestamps(kit, host):
    """`enable_open_metrics` and `send_timestamps: false`, in most copied collector configs, were refused as
    unknown keys (the agent would not start); `enable_open_metrics: false` serves the text format only, as the
    collector's does, and `send_timestamps: true` is refused at its key path."""
    from podmeter.config import validate_component

    ok: list[str] = []
    validate_component(factory, {"enable_open_metrics": True, "send_timestamps": False}, "exporters::prometheus", ok)
    assert ok == []
    refused: list[str] = []
    validate_component(factory, {"send_timestamps": True}, "exporters::prometheus", refused)
    assert len(refused) == 1 and refused[0].startswith("exporters::prometheus::send_timestamps: "), refused
    port = free_port()
    exp, _telemetry = kit.make(factory, {"endpoint": f"127.0.0.1:{port}", "enable_open_metrics": False})
    exp.start(host)
    try:
        exp.export(kit.batch([1, 2]))
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": "application/openmetrics-text;version=1.0.0"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Type"] == TEXT_CONTENT_TYPE
            assert b"# EOF" not in r.read()
    finally:
        exp.shutdown()
