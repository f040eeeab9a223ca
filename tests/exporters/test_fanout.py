"""Acceptance: `podmeter run` (the real CLI, with the core's counting test receiver loaded) with one pipeline
fanning out to prometheus, otlp and otlphttp; a real Prometheus scrapes it, the OTLP backend answers
UNAVAILABLE / 503 for a while and then accepts, and SIGTERM exits 0 after a flush."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import urllib.request

from harness import free_port, wait_for
from harness.otlp import OTLPSink
from harness.prometheus import PrometheusServer, promtool_check_metrics

PLUGINS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "core", "plugins.py")


def test_one_pipeline_fanning_out_to_all_three(tmp_path):
    sink = OTLPSink().start()
    sink.set_failing(True)
    prom_port, telemetry_port = free_port(), free_port()
    config = tmp_path / "podmeter.yaml"
    config.write_text(textwrap.dedent(f"""
        receivers:
          counter:
            collection_interval: 200ms
            initial_delay: 0s
            pods: 3
        exporters:
          prometheus:
            endpoint: 127.0.0.1:{prom_port}
          otlp:
            endpoint: {sink.grpc_endpoint}
            headers: {{x-path: grpc}}
            retry_on_failure: {{initial_interval: 100ms, max_interval: 500ms}}
          otlphttp:
            endpoint: {sink.http_endpoint}
            headers: {{x-path: http}}
            retry_on_failure: {{initial_interval: 100ms, max_interval: 500ms}}
        service:
          shutdown_timeout: 20s
          telemetry:
            metrics:
              address: 127.0.0.1:{telemetry_port}
          pipelines:
            metrics:
              receivers: [counter]
              exporters: [prometheus, otlp, otlphttp]
        """))
    agent = subprocess.Popen([sys.executable, PLUGINS, "run", "--config", str(config)], stderr=subprocess.PIPE,
                             text=True)
    try:
        with PrometheusServer([f"127.0.0.1:{prom_port}"]) as prom:
            rows = prom.wait_for("test_value_ratio", lambda r: len(r) == 3)
            assert {lbl["k8s_pod_uid"] for lbl, _ in rows} == {"uid-0", "uid-1", "uid-2"}
            assert all(v >= 1 for _, v in rows)
            text = urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/metrics").read().decode()
            assert promtool_check_metrics(text)[0] == 0

        # the OTLP backend refuses on both paths for a while ...
        wait_for(lambda: min(sink.refused_by.values()) >= 3, timeout=30, what="refused attempts on both paths")
        sink.set_failing(False)

        # ... then both pushes are delivered
        def by_path(path):
            return [i for i, h in enumerate(sink.headers) if h.get("x-path") == path]

        wait_for(lambda: by_path("grpc") and by_path("http"), timeout=30, what="delivery on both paths")
        telemetry = urllib.request.urlopen(f"http://127.0.0.1:{telemetry_port}/metrics").read().decode()
        assert "podmeter_otlp_exporter_retries_total" in telemetry
        assert 'podmeter_otlphttp_exporter_sent_metric_points_total{component="otlphttp"}' in telemetry
        assert 'podmeter_prometheus_scrapes_total{code="200",component="prometheus"}' in telemetry
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            _, err = agent.communicate(timeout=60)
        finally:
            sink.stop()
    assert agent.returncode == 0, err[-3000:]
    assert "not flushed" not in err
    values = {p.value for p in sink.points() if p.name == "test.value"}
    assert values and min(values) >= 1


def test_cli_agent_killed_during_outage_delivers_its_stored_queue_after_restart(tmp_path):
    """`podmeter run` pushes to a backend that is down, with sending_queue.storage; SIGKILL; the backend comes
    back; a restarted agent delivers every batch the first one had stored (matched by collection timestamp)."""
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms_pb2

    sink = OTLPSink()  # down
    storage = tmp_path / "queue"
    config = tmp_path / "podmeter.yaml"
    config.write_text(textwrap.dedent(f"""
        receivers:
          counter: {{collection_interval: 100ms, initial_delay: 0s, pods: 2}}
        exporters:
          otlp:
            endpoint: {sink.grpc_endpoint}
            retry_on_failure: {{initial_interval: 100ms, max_interval: 500ms}}
            sending_queue: {{storage: {storage}}}
        service:
          telemetry: {{metrics: {{level: none}}}}
          pipelines:
            metrics: {{receivers: [counter], exporters: [otlp]}}
        """))
    qdir = storage / "exporter_otlp"

    def stored() -> list:
        return sorted(qdir.glob("*.otlp")) if qdir.exists() else []

    first = subprocess.Popen([sys.executable, PLUGINS, "run", "--config", str(config)], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(stored()) >= 15, timeout=30, what="batches stored during the outage")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    expected = set()
    for path in stored():
        req = ms_pb2.ExportMetricsServiceRequest.FromString(path.read_bytes())
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    expected.update((dp.time_unix_nano, dp.as_double or dp.as_int) for dp in m.gauge.data_points)
    assert len(expected) >= 15
    sink.start()
    second = subprocess.Popen([sys.executable, PLUGINS, "run", "--config", str(config)], stderr=subprocess.PIPE,
                              text=True)
    try:
        def delivered():
            got = set()
            for req in list(sink.requests):
                for rm in req.resource_metrics:
                    for sm in rm.scope_metrics:
                        for m in sm.metrics:
                            got.update((dp.time_unix_nano, dp.as_double or dp.as_int) for dp in m.gauge.data_points)
            return expected <= got

        wait_for(delivered, timeout=60, what="the first agent's stored batches at the backend")
    finally:
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=60)
        sink.stop()
    assert second.returncode == 0, err[-2000:]
    assert "left in" in err  # it said it was sending what the previous run stored
