"""prometheus exporter against a real Prometheus server, promtool and prometheus_client's parsers."""

from __future__ import annotations

import gzip
import ssl
import threading
import urllib.error
import urllib.request

import pytest
from harness import free_port, wait_for
from harness.prometheus import PrometheusServer, promtool_check_metrics
from harness.tls import make_certs
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from exporters.prometheus import factory
from exporters.prometheus.translate import metric_name
from podmeter.config import ConfigError, validate_component
from podmeter.metrics import MetricsBuilder
from receivers.nvml.metrics import STATUS

OM_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


def scrape(port: int, accept: str = "", gzip_ok: bool = False, scheme: str = "http", context=None,
           auth: str | None = None) -> tuple[str, str]:
    headers = {"Accept": accept} if accept else {}
    if gzip_ok:
        headers["Accept-Encoding"] = "gzip"
    if auth:
        headers["Authorization"] = auth
    req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=10, context=context) as r:
        body = r.read()
        if r.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return r.headers["Content-Type"], body.decode()


@pytest.fixture
def exporter(kit, host):
    created = []

    def start(**config):
        port = free_port()
        exp, telemetry = kit.make(factory, {"endpoint": f"127.0.0.1:{port}", **config})
        exp.start(host)
        created.append(exp)
        return exp, port, telemetry

    yield start
    for exp in created:
        exp.shutdown()


@pytest.mark.parametrize("name,unit,kind,expected", [
    ("container.cpu.time", "s", "counter", "container_cpu_time_seconds_total"),
    ("container.memory.usage", "By", "gauge", "container_memory_usage_bytes"),
    ("hw.gpu.utilization", "1", "gauge", "hw_gpu_utilization_ratio"),
    # `_ratio` is for gauges only (as the collector): a non-monotonic sum in "1" counts things
    ("hw.status", "1", "updowncounter", "hw_status"),
    ("system.network.io", "By/s", "gauge", "system_network_io_bytes_per_second"),
    ("k8s.pod.network.errors", "{errors}", "counter", "k8s_pod_network_errors_total"),
    ("requests_total", "1", "counter", "requests_total"),
    ("latency_seconds", "s", "histogram", "latency_seconds"),
    ("hw.power", "W", "gauge", "hw_power_watts"),
    ("2fast", "ms", "gauge", "_2fast_milliseconds"),
    # consecutive `_` become one in the whole name, suffixes included (the spec; the collector splits on them)
    ("queue.depth_", "s", "gauge", "queue_depth_seconds"),
    ("queue.depth.", "{item}", "counter", "queue_depth_total"),
    # a unit the collector's table lacks is used as written, as the collector does
    ("link.speed", "bit", "gauge", "link_speed_bit"),
])
def test_metric_names_follow_the_otel_prometheus_rules(name, unit, kind, expected):
    assert metric_name(name, unit, kind, add_suffixes=True) == expected


def test_a_namespace_does_not_make_a_double_underscore():
    # `2fast` alone is `_2fast` (a name cannot start with a digit); behind a namespace it needs no `_` of its own
    assert metric_name("2fast", "ms", "gauge", add_suffixes=True, namespace="ns") == "ns_2fast_milliseconds"
    assert metric_name("2fast", "ms", "gauge", add_suffixes=False, namespace="ns") == "ns_2fast"


def test_names_kept_as_given_without_suffixes():
    assert metric_name("process_gpu_memory", "MiBy", "gauge", add_suffixes=False) == "process_gpu_memory"
    assert metric_name("a.b", "s", "counter", add_suffixes=False, namespace="ns") == "ns_a_b"


def test_real_prometheus_reads_back_the_values(exporter, kit):
    exp, port, _ = exporter()
    exp.export(kit.batch([0, 1, 2], step=5))
    with PrometheusServer([f"127.0.0.1:{port}"]) as prom:
        rows = prom.wait_for('container_cpu_time_seconds_total{cpu_mode="user"}', lambda r: len(r) == 3)
        got = {labels["k8s_pod_uid"]: v for labels, v in rows}
        assert got == {"uid-0": 5.0, "uid-1": 15.0, "uid-2": 25.0}
        labels = rows[0][0]
        # identifying resource attributes are labels, so per-pod queries need no join
        assert {"k8s_pod_name", "k8s_namespace_name", "container_id", "k8s_container_name"} <= set(labels)
        assert "host_name" not in labels and "k8s_pod_label_app" not in labels
        mem = dict((lbl["k8s_pod_name"], v) for lbl, v in prom.query("container_memory_usage_bytes"))
        assert mem == {"pod-0": 1048576.0, "pod-1": 2097152.0, "pod-2": 3145728.0}
        assert prom.query('hw_gpu_utilization_ratio{k8s_pod_uid="uid-1"}')[0][1] == 0.25
        assert prom.query('k8s_pod_run_queue_latency_seconds_bucket{k8s_pod_uid="uid-0",le="0.01"}')[0][1] == 3.0
        assert prom.query('k8s_pod_run_queue_latency_seconds_count{k8s_pod_uid="uid-2"}')[0][1] == 6.0
        # the rest of the resource is in target_info, joinable on the identifying labels
        info = prom.query('target_info{k8s_pod_uid="uid-0"}')
        assert info and info[0][0]["host_name"] == "node-1" and info[0][0]["k8s_pod_label_app"] == "trainer"
        joined = prom.query('container_memory_usage_bytes * on (k8s_pod_uid) group_left (host_name) target_info')
        assert len(joined) == 3 and all(lbl["host_name"] == "node-1" for lbl, _ in joined)
        assert all(t["health"] == "up" for t in prom.target_health())

        # pod 1 is gone: its series are gone from the very next exposition, and Prometheus marks them stale
        exp.export(kit.batch([0, 2], step=6))
        _, text = scrape(port)
        assert "uid-1" not in text and "uid-0" in text
        rows = prom.wait_for('container_memory_usage_bytes', lambda r: len(r) == 2)
        assert {lbl["k8s_pod_uid"] for lbl, _ in rows} == {"uid-0", "uid-2"}


def test_exposition_is_lint_clean_in_both_formats(exporter, kit):
    exp, port, _ = exporter(const_labels={"cluster": "c1"}, namespace="podmeter")
    exp.export(kit.batch(range(4)))
    status = MetricsBuilder("test/status", kit.START_NS)
    status.add(STATUS, 1, {"hw.state": "ok"}, resource={"hw.id": "GPU-0"})
    exp.export(kit.batch([7], scope="podmeter/receiver/nvml"))
    exp.export(status.build())
    ctype, text = scrape(port)
    assert ctype.startswith("text/plain; version=0.0.4")
    rc, out = promtool_check_metrics(text)
    assert rc == 0, out
    families = {f.name: f for f in parse_text(text)}
    assert families["podmeter_container_cpu_time_seconds"].type == "counter"
    # a non-monotonic sum in unit "1" is a gauge without `_ratio` (the collector's rule: that suffix is for gauges)
    assert families["podmeter_hw_status"].type == "gauge"
    assert all(s.labels["cluster"] == "c1" for f in families.values() for s in f.samples)
    # no duplicate series
    keys = [(s.name, tuple(sorted(s.labels.items()))) for f in families.values() for s in f.samples]
    assert len(keys) == len(set(keys))

    ctype, om = scrape(port, accept=OM_ACCEPT, gzip_ok=True)
    assert ctype.startswith("application/openmetrics-text")
    assert om.endswith("# EOF\n")
    om_families = {f.name: f for f in parse_openmetrics(om)}  # the strict OpenMetrics parser accepts it
    assert om_families["podmeter_k8s_pod_run_queue_latency_seconds"].type == "histogram"
    assert om_families["target"].type == "info"


def test_families_that_would_share_an_openmetrics_name_are_counted_not_exposed(exporter, kit):
    """A gauge `x_seconds` and a counter `x_seconds_total` are one family name in OpenMetrics, and a gauge `h_count`
    is a sample name of histogram `h`: the later name is dropped as a type conflict, so both formats parse."""
    from podmeter.metrics import MetricSpec

    exp, port, telemetry = exporter()
    b = MetricsBuilder("test/conflicts", kit.START_NS)
    r = {"k8s.pod.uid": "u"}
    b.add(MetricSpec("x", "gauge", "s", "gauge"), 1.0, resource=r)
    b.add(MetricSpec("x.seconds", "sum", "s", "counter"), 2.0, resource=r)
    b.add_histogram(MetricSpec("h", "histogram", "", "histogram"), [1, 1], [1.0], total=1.0, resource=r)
    b.add(MetricSpec("h.count", "gauge", "", "gauge"), 3.0, resource=r)
    exp.export(b.build())
    _, text = scrape(port)
    _, om = scrape(port, accept=OM_ACCEPT)
    assert {f.name: f.type for f in parse_openmetrics(om)}.items() >= {"x_seconds": "gauge", "h": "histogram"}.items()
    assert "x_seconds_total" not in text and 'h_count{k8s_pod_uid="u"} 3.0' not in text
    assert promtool_check_metrics(text)[0] == 0
    assert kit.sample(telemetry, "podmeter_prometheus_dropped_points_total", component="prometheus",
                      cause="type_conflict") == 2
    assert "type_conflict" in exp.telemetry.failing()


def test_a_point_attribute_named_le_does_not_break_a_histogram(exporter, kit):
    """`le` is the bucket bound: an attribute of that name (a rename can make one) is dropped from the histogram's
    series rather than put on `_sum` and `_count`, which both parsers reject."""
    exp, port, _ = exporter()
    b = MetricsBuilder("test/le", kit.START_NS)
    b.add_histogram(kit.LAT, [1, 2, 3], [0.001, 0.01], total=0.5, attributes={"le": "x", "a": "b", "z": "y"},
                    resource={"k8s.pod.uid": "u"})
    exp.export(b.build())
    _, text = scrape(port)
    assert promtool_check_metrics(text)[0] == 0, text
    assert 'k8s_pod_run_queue_latency_seconds_sum{a="b",k8s_pod_uid="u",z="y"} 0.5' in text
    assert 'k8s_pod_run_queue_latency_seconds_bucket{a="b",k8s_pod_uid="u",le="0.01",z="y"} 3.0' in text
    _, om = scrape(port, accept=OM_ACCEPT)
    assert {f.name for f in parse_openmetrics(om)} >= {"k8s_pod_run_queue_latency_seconds"}


def test_gzip_only_when_asked(exporter, kit):
    exp, port, _ = exporter()
    exp.export(kit.batch([0]))
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert b"container_cpu_time_seconds_total" in gzip.decompress(r.read())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.headers.get("Content-Encoding") is None
        assert r.headers["Vary"] == "Accept, Accept-Encoding"  # a cache between keys on both
    # q values as RFC 9110 has them: q=0 is "not this one"; `*` stands for gzip when gzip is not listed
    for header, compressed in (("gzip;q=0", False), ("deflate, gzip;q=0", False), ("*;q=0.5", True),
                               ("*, gzip;q=0", False), ("identity", False), ("br, GZIP;q=0.1", True)):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": header})
        with urllib.request.urlopen(req) as r:
            body = r.read()
            assert (r.headers.get("Content-Encoding") == "gzip") is compressed, header
            assert b"container_cpu_time_seconds_total" in (gzip.decompress(body) if compressed else body)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other")
    assert err.value.code == 404


def test_concurrent_scrapes_while_collecting_never_error(exporter, kit):
    exp, port, telemetry = exporter()
    exp.export(kit.batch(range(20)))
    errors: list[str] = []
    stop = threading.Event()

    def scraper(accept):
        while not stop.is_set():
            try:
                _, body = scrape(port, accept=accept, gzip_ok=True)
                if accept:
                    list(parse_openmetrics(body))
                else:
                    list(parse_text(body))
            except Exception as exc:  # any failure is the test's failure
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=scraper, args=(a,)) for a in ("", OM_ACCEPT, "", OM_ACCEPT)]
    for t in threads:
        t.start()
    for step in range(60):  # pods come and go while scrapes run
        exp.export(kit.batch(range(step % 7, 20 + step % 5), step=step))
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert kit.sample(telemetry, "podmeter_prometheus_scrapes_total", component="prometheus", code="200") > 0


def test_scope_batches_replace_only_their_own_series(exporter, kit):
    exp, port, _ = exporter()
    exp.export(kit.batch([0, 1], scope="podmeter/receiver/cgroup"))
    exp.export(kit.batch([5], scope="podmeter/receiver/other"))
    exp.export(kit.batch([1], scope="podmeter/receiver/cgroup"))
    _, text = scrape(port)
    uids = {s.labels.get("k8s_pod_uid") for f in parse_text(text) for s in f.samples}
    assert uids == {"uid-1", "uid-5"}
    # two receivers describing the same pod share one target_info, and that is not a duplicate
    from podmeter.metrics import MetricsBuilder

    b = MetricsBuilder("podmeter/receiver/other", kit.START_NS)
    b.add(kit.UTIL, 0.5, resource=kit.pod_resource(1))
    exp.export(b.build())
    _, text = scrape(port)
    assert text.count('target_info{') == 1
    assert "duplicate_series" not in exp.telemetry.failing()


def test_metric_expiration_removes_stale_series(exporter, kit):
    exp, port, telemetry = exporter(metric_expiration="300ms")
    exp.export(kit.batch([0]))
    assert "uid-0" in scrape(port)[1]
    wait_for(lambda: "uid-0" not in scrape(port)[1], timeout=10, what="series to expire")
    assert kit.sample(telemetry, "podmeter_prometheus_expired_scopes_total", component="prometheus") == 1


def test_duplicate_series_are_merged_and_counted(exporter, kit):
    from podmeter.metrics import MetricsBuilder

    exp, port, telemetry = exporter()
    b = MetricsBuilder("podmeter/receiver/x", kit.START_NS)
    # two resources that differ only in an attribute that is not promoted: same Prometheus series
    b.add(kit.MEM, 1, resource={"k8s.pod.uid": "u", "host.name": "a"})
    b.add(kit.MEM, 2, resource={"k8s.pod.uid": "u", "host.name": "b"})
    exp.export(b.build())
    _, text = scrape(port)
    assert text.count("container_memory_usage_bytes{") == 1
    assert promtool_check_metrics(text)[0] == 0
    assert kit.sample(telemetry, "podmeter_prometheus_dropped_points_total", component="prometheus",
                      cause="duplicate_series") == 1


def test_duplicates_keep_the_last_point_in_every_kind_of_series(exporter, kit):
    """A series that two points make keeps the last one, wherever the second comes from (a resource that differs
    only in attributes that are not promoted, with or without point attributes, a histogram's buckets, sum and
    count), and each point dropped is counted once."""
    from podmeter.metrics import MetricsBuilder

    exp, port, telemetry = exporter()
    b = MetricsBuilder("podmeter/receiver/x", kit.START_NS)
    r1, r2 = {"k8s.pod.uid": "u", "host.name": "a"}, {"k8s.pod.uid": "u", "host.name": "b"}
    b.add(kit.CPU, 1.0, {"cpu.mode": "user"}, resource=r1)
    b.add(kit.CPU, 5.0, {"cpu.mode": "system"}, resource=r1)
    b.add(kit.MEM, 7, resource=r1)
    b.add_histogram(kit.LAT, [1, 2, 3], [0.001, 0.01], total=1.0, resource=r1)
    b.add(kit.CPU, 2.0, {"cpu.mode": "user"}, resource=r2)  # the same series as r1's: 2.0 is kept
    b.add(kit.MEM, 8, resource=r2)  # the same series: 8 is kept
    b.add_histogram(kit.LAT, [4, 5, 6], [0.001, 0.01], total=2.0, resource=r2)  # 3 buckets, sum, count: r2's kept
    exp.export(b.build())
    _, text = scrape(port)
    lines = set(text.splitlines())
    assert {'container_cpu_time_seconds_total{cpu_mode="user",k8s_pod_uid="u"} 2.0',
            'container_cpu_time_seconds_total{cpu_mode="system",k8s_pod_uid="u"} 5.0',
            'container_memory_usage_bytes{k8s_pod_uid="u"} 8.0',
            'k8s_pod_run_queue_latency_seconds_bucket{k8s_pod_uid="u",le="0.001"} 4.0',
            'k8s_pod_run_queue_latency_seconds_bucket{k8s_pod_uid="u",le="+Inf"} 15.0',
            'k8s_pod_run_queue_latency_seconds_sum{k8s_pod_uid="u"} 2.0',
            'k8s_pod_run_queue_latency_seconds_count{k8s_pod_uid="u"} 15.0'} <= lines
    assert sum(1 for line in lines if line.startswith("k8s_pod_run_queue_latency_seconds_")) == 5
    assert promtool_check_metrics(text)[0] == 0
    assert kit.sample(telemetry, "podmeter_prometheus_dropped_points_total", component="prometheus",
                      cause="duplicate_series") == 1 + 1 + 5
    # one target_info per entity, as for its series: the resources' labels merged, the later one's value kept
    assert [line for line in text.splitlines() if line.startswith("target_info{")] == [
        'target_info{host_name="b",k8s_pod_uid="u"} 1.0']


def test_one_target_info_per_entity_whatever_the_receivers_know(exporter, kit):
    """Receivers describing one container know different things of it (cgroup the QoS class, cri the runtime):
    one target_info each made `* on (container_id) group_left(...) target_info` many-to-many (a PromQL error). Their
    labels are merged into one target_info per set of promoted labels, within a batch and across receivers."""
    from podmeter.metrics import MetricsBuilder

    exp, port, _ = exporter()
    ident = {"k8s.pod.uid": "u", "container.id": "c" * 64}
    cgroup = MetricsBuilder("podmeter/receiver/cgroup", kit.START_NS)
    cgroup.add(kit.MEM, 7, resource={**ident, "k8s.pod.qos_class": "Burstable"})
    cri = MetricsBuilder("podmeter/receiver/cri", kit.START_NS)
    cri.add(kit.MEM, 7, resource={**ident, "container.runtime.name": "containerd"})
    cri.add(kit.CPU, 1.0, {"cpu.mode": "user"}, resource={**ident, "container.image.name": "app"})
    cri.add(kit.CPU, 1.0, {"cpu.mode": "user"}, resource={"k8s.pod.uid": "other", "container.image.name": "x"})
    exp.export(cgroup.build())
    exp.export(cri.build())
    _, text = scrape(port)
    infos = sorted(line for line in text.splitlines() if line.startswith("target_info{"))
    assert infos == [
        f'target_info{{container_id="{"c" * 64}",container_image_name="app",container_runtime_name="containerd",'
        'k8s_pod_qos_class="Burstable",k8s_pod_uid="u"} 1.0',
        'target_info{container_image_name="x",k8s_pod_uid="other"} 1.0']
    assert promtool_check_metrics(text)[0] == 0
    # a receiver's next batch replaces what it said: the merged labels follow
    cgroup = MetricsBuilder("podmeter/receiver/cgroup", kit.START_NS)
    cgroup.add(kit.MEM, 7, resource={**ident, "k8s.pod.qos_class": "Guaranteed"})
    exp.export(cgroup.build())
    _, text = scrape(port)
    assert sum('k8s_pod_qos_class="Guaranteed"' in line for line in text.splitlines()
               if line.startswith("target_info{")) == 1
    assert "Burstable" not in text


def test_merged_target_info_does_not_depend_on_which_receiver_came_first(exporter, kit):
    """Receivers that disagree on a descriptive attribute (CRI's resolved image name, the pod spec's) get one
    merged target_info; which value it shows must not change with the order their first batches arrived in (after
    every agent restart)."""
    from podmeter.metrics import MetricsBuilder

    shown = set()
    for order in (("cgroup", "cri"), ("cri", "cgroup")):
        exp, port, _ = exporter()
        for scope in order:
            b = MetricsBuilder(f"podmeter/receiver/{scope}", kit.START_NS)
            image = "docker.io/library/nginx" if scope == "cri" else "nginx"
            b.add(kit.MEM, 7, resource={"k8s.pod.uid": "u", "container.id": "c" * 64, "container.image.name": image})
            exp.export(b.build())
        _, text = scrape(port)
        infos = [line for line in text.splitlines() if line.startswith("target_info{")]
        assert len(infos) == 1, infos
        shown.add(infos[0])
        exp.shutdown()
    assert len(shown) == 1, shown


def test_resource_to_telemetry_conversion_and_exact_names(exporter, kit):
    exp, port, _ = exporter(resource_to_telemetry_conversion={"enabled": True}, add_metric_suffixes=False,
                            target_info={"enabled": False})
    exp.export(kit.batch([0]))
    _, text = scrape(port)
    fams = {f.name: f for f in parse_text(text)}
    assert "target_info" not in text
    assert fams["container_memory_usage"].samples[0].labels["host_name"] == "node-1"
    # a counter kept under its exact name cannot be typed counter (formats require _total): exposed untyped
    assert fams["container_cpu_time"].type == "unknown"
    assert promtool_check_metrics(text)[0] == 0


def test_tls_basic_auth_with_real_prometheus(exporter, kit, tmp_path):
    certs = make_certs(tmp_path)
    exp, port, telemetry = exporter(tls={"cert_file": certs.server_cert, "key_file": certs.server_key,
                                         "client_ca_file": certs.ca},
                                    basic_auth={"username": "prom", "password": "s3cret"})
    exp.export(kit.batch([3]))
    tls = {"ca_file": certs.ca, "cert_file": certs.client_cert, "key_file": certs.client_key}
    with PrometheusServer([f"127.0.0.1:{port}"], scheme="https", tls_config=tls,
                          basic_auth={"username": "prom", "password": "s3cret"}) as prom:
        rows = prom.wait_for('container_cpu_time_seconds_total{cpu_mode="system"}')
        assert rows[0][1] == 4.0 and rows[0][0]["k8s_pod_uid"] == "uid-3"
    ctx = ssl.create_default_context(cafile=certs.ca)
    ctx.load_cert_chain(certs.client_cert, certs.client_key)
    with pytest.raises(urllib.error.HTTPError) as err:  # wrong password
        scrape(port, scheme="https", context=ctx, auth="Basic cHJvbTp3cm9uZw==")
    assert err.value.code == 401
    # the scheme is case-insensitive (RFC 9110): "basic" from some clients is the same credentials
    assert "container_cpu_time_seconds_total" in scrape(port, scheme="https", context=ctx,
                                                        auth="basic cHJvbTpzM2NyZXQ=")[1]
    with pytest.raises(urllib.error.HTTPError) as err:  # right credentials, another scheme
        scrape(port, scheme="https", context=ctx, auth="Bearer cHJvbTpzM2NyZXQ=")
    assert err.value.code == 401
    no_client_cert = ssl.create_default_context(cafile=certs.ca)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        scrape(port, scheme="https", context=no_client_cert)
    assert kit.sample(telemetry, "podmeter_prometheus_scrapes_total", component="prometheus", code="401") == 2


def test_bad_config_names_the_key():
    problems: list[str] = []
    validate_component(factory, {"endpoint": "nope", "tls": {"cert_file": "a"}, "metric_expiry": "5m"},
                       "exporters::prometheus", problems)
    text = "\n".join(problems)
    assert "exporters::prometheus::endpoint: invalid endpoint" in text
    assert "exporters::prometheus::tls: cert_file and key_file must be given together" in text
    assert 'exporters::prometheus::metric_expiry: unknown key (did you mean "metric_expiration"?)' in text
    assert ConfigError  # the same problems surface through `podmeter validate`


def test_port_in_use_is_reported_not_raised(exporter, kit, host):
    from podmeter.component import ComponentUnavailable

    _, port, _ = exporter()
    other, _ = kit.make(factory, {"endpoint": f"127.0.0.1:{port}"})
    with pytest.raises(ComponentUnavailable, match="cannot listen"):
        other.start(host)


def test_pod_churn_keeps_memory_bounded(exporter, kit):
    exp, port, telemetry = exporter()
    for generation in range(100):  # 1,000 pods come and go, 10 alive at a time
        exp.export(kit.batch(range(generation * 10, generation * 10 + 10)))
    _, text = scrape(port)
    uids = {s.labels["k8s_pod_uid"] for f in parse_text(text) for s in f.samples}
    assert uids == {f"uid-{i}" for i in range(990, 1000)}
    assert len(exp._scopes) == 1
    assert kit.sample(telemetry, "podmeter_prometheus_series", component="prometheus") == exp.rendering().series


def test_awkward_values_are_escaped_for_both_parsers(exporter, kit):
    from podmeter.metrics import MetricsBuilder, MetricSpec

    exp, port, _ = exporter()
    spec = MetricSpec("odd.metric", "gauge", "{things}", 'help with "quotes", \\ and\na newline')
    b = MetricsBuilder("podmeter/receiver/x", kit.START_NS)
    value = 'a "quoted" \\ back\nslash ünïcode'
    b.add(spec, float("nan"), {"weird.key-name/x": value, "9lives": "1"}, resource={"k8s.pod.name": value})
    b.add(spec, float("inf"), {"weird.key-name/x": "other"}, resource={"k8s.pod.name": "p"})
    exp.export(b.build())
    _, text = scrape(port)
    (fam,) = [f for f in parse_text(text) if f.name == "odd_metric"]
    labels = next(s.labels for s in fam.samples if s.labels.get("k8s_pod_name") == value)
    assert labels["weird_key_name_x"] == value and labels["key_9lives"] == "1"
    assert promtool_check_metrics(text)[0] == 0
    _, om = scrape(port, accept=OM_ACCEPT)
    (fam,) = [f for f in parse_openmetrics(om) if f.name == "odd_metric"]
    assert fam.documentation == 'help with "quotes", \\ and\na newline'
    assert {s.labels["weird_key_name_x"] for s in fam.samples} == {value, "other"}


def test_an_empty_scope_marker_removes_the_last_pods_series(exporter, kit):
    """When a receiver's last pod goes, its batch has no points. A ScopeMetrics without metrics (the marker the
    report asks MetricsBuilder.build() to emit for an empty collection) still names the scope, so the exporter
    drops that receiver's series at once instead of after metric_expiration."""
    from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    exp, port, _ = exporter()
    exp.export(kit.batch([0], scope="podmeter/receiver/cgroup"))
    exp.export(kit.batch([1], scope="podmeter/receiver/nvml"))
    marker = MetricsData([ResourceMetrics(Resource({}), [ScopeMetrics(InstrumentationScope(
        "podmeter/receiver/cgroup"), [], "")], "")])
    exp.export(marker)
    _, text = scrape(port)
    assert "uid-0" not in text and "uid-1" in text


# -- export cost: per-scope rendering cache, gzip only on demand, bounded memo caches -----------------------------


def gz_scrape(port: int, accept: str = "") -> tuple[str, bytes]:
    """A scrape asking for gzip: (Content-Encoding, raw body as received)."""
    headers = {"Accept-Encoding": "gzip", **({"Accept": accept} if accept else {})}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.headers.get("Content-Encoding"), r.read()


@pytest.mark.parametrize("accept,form", [("", "text"), (OM_ACCEPT, "openmetrics")])
def test_gzip_forms_are_compressed_only_once_asked_for(exporter, kit, accept, form):
    from exporters.prometheus import WANT_TTL

    exp, port, _ = exporter()
    exp.export(kit.batch([0, 1]))
    # nobody asked for gzip yet: the export compressed nothing
    assert not exp.rendering().has_gzip("text") and not exp.rendering().has_gzip("openmetrics")
    # the first request compresses the current snapshot once, on the scrape path; the content is the plain form's
    encoding, body = gz_scrape(port, accept)
    assert encoding == "gzip"
    assert gzip.decompress(body) == exp.rendering().plain(form)
    assert exp.rendering().has_gzip(form)
    # from now on every export compresses that form (and only that one) before any scrape asks
    exp.export(kit.batch([2], step=7))
    r = exp.rendering()
    assert r.has_gzip(form)
    assert not r.has_gzip("openmetrics" if form == "text" else "text")
    encoding, body = gz_scrape(port, accept)
    plain = gzip.decompress(body).decode()
    assert 'k8s_pod_uid="uid-2"' in plain and "uid-0" not in plain
    assert plain.encode() == r.plain(form)
    if form == "openmetrics":
        assert plain.endswith("# EOF\n")
        assert {f.name for f in parse_openmetrics(plain)} >= {"container_cpu_time_seconds", "target"}
    else:
        assert promtool_check_metrics(plain)[0] == 0
    # a form nobody asked for in WANT_TTL is no longer compressed at export
    exp._wanted[form] -= WANT_TTL + 1
    exp.export(kit.batch([3]))
    assert not exp.rendering().has_gzip(form)


def test_both_gzip_forms_serve_their_own_format(exporter, kit):
    exp, port, _ = exporter()
    exp.export(kit.batch([4]))
    gz_scrape(port), gz_scrape(port, OM_ACCEPT)  # both forms asked for
    exp.export(kit.batch([5]))
    r = exp.rendering()
    assert r.has_gzip("text") and r.has_gzip("openmetrics")
    _, text_gz = gz_scrape(port)
    _, om_gz = gz_scrape(port, OM_ACCEPT)
    text, om = gzip.decompress(text_gz).decode(), gzip.decompress(om_gz).decode()
    assert "# TYPE container_cpu_time_seconds_total counter" in text and "# EOF" not in text
    assert "# TYPE container_cpu_time_seconds counter" in om and om.endswith("# EOF\n")
    assert {s.labels["k8s_pod_uid"] for f in parse_text(text) for s in f.samples if "k8s_pod_uid" in s.labels} == \
        {"uid-5"}
    # and what a scrape without gzip gets is the same content
    assert scrape(port)[1] == text and scrape(port, accept=OM_ACCEPT)[1] == om


def power_batch(kit, pods, step: int = 1, scope: str = "podmeter/receiver/nvml"):
    from podmeter.metrics import MetricsBuilder, MetricSpec

    b = MetricsBuilder(scope, kit.START_NS)
    for i in pods:
        b.add(MetricSpec("hw.power", "gauge", "W", "Power"), 100.0 * i + step, resource={"hw.id": f"GPU-{i}"})
    return b.build()


def test_a_scopes_batch_reuses_the_other_scopes_rendering(exporter, kit):
    exp, port, _ = exporter()
    exp.export(kit.batch([0, 1], scope="podmeter/receiver/cgroup"))
    exp.export(power_batch(kit, [5]))
    cached = exp._scopes["podmeter/receiver/cgroup"].families["container_memory_usage_bytes"].lines
    _, before = scrape(port)
    cgroup_lines = [line for line in before.splitlines() if 'uid-0"' in line or 'uid-1"' in line]
    assert len(cgroup_lines) > 10
    # nvml's next batch: cgroup's families are not rendered again (the very same chunks are in the exposition)
    # and its series are unchanged
    exp.export(power_batch(kit, [6], step=9))
    assert any(chunk is cached for chunk in exp.rendering().chunks["text"])
    assert any(chunk is cached for chunk in exp.rendering().chunks["openmetrics"])
    _, after = scrape(port)
    assert set(cgroup_lines) <= set(after.splitlines())
    assert 'hw_id="GPU-5"' not in after and 'hw_power_watts{hw_id="GPU-6"} 609.0' in after
    # cgroup's next batch without pod 0: pod 0's series are gone, nvml's stay
    exp.export(kit.batch([1], scope="podmeter/receiver/cgroup", step=3))
    assert not any(chunk is cached for chunk in exp.rendering().chunks["text"])
    _, text = scrape(port)
    assert {s.labels.get("k8s_pod_uid") for f in parse_text(text) for s in f.samples} == {"uid-1", None}
    assert 'hw_id="GPU-6"' in text and 'k8s_pod_uid="uid-1"' in text and "uid-0" not in text
    assert promtool_check_metrics(text)[0] == 0
    # assembled from the cached chunks, the exposition equals a render of the merged families

    merged = {}
    for entry in exp._scopes.values():
        for name, rf in entry.families.items():
            merged.setdefault(name, (rf.fam, {}))[1].update(rf.samples())
    assert render(merged)[0] == exp.rendering().text and render(merged)[1] == exp.rendering().openmetrics


def render(merged: dict) -> tuple[bytes, bytes, int]:
    """The reference rendering of whole families (name -> (Family, {series: value} in bytes)) in both formats:
    what the exporter's assembly from cached per-scope chunks must equal."""
    from exporters.prometheus import _headers, _lines

    text, om, count = [], [], 0
    for name in sorted(merged):
        fam, samples = merged[name]
        if samples:
            text_head, om_head = _headers(name, fam)
            text += (text_head, _lines(samples))
            om += (om_head, _lines(samples))
            count += len(samples)
    return b"".join(text), b"".join(om + [b"# EOF\n"]), count


def test_a_family_in_several_scopes_has_one_help_and_type(exporter, kit):
    """Two receivers emitting the same metric name (and target_info for the same pods): each family appears once
    in the exposition, with the samples of both scopes; a scope's batch only replaces its own samples."""
    exp, port, telemetry = exporter()
    exp.export(kit.batch([0, 1], scope="podmeter/receiver/cgroup"))
    exp.export(kit.batch([1, 2], scope="podmeter/receiver/cri"))  # pod 1 described by both
    _, text = scrape(port)
    _, om = scrape(port, accept=OM_ACCEPT)
    for name in ("container_cpu_time_seconds_total", "container_memory_usage_bytes", "target_info",
                 "k8s_pod_run_queue_latency_seconds"):
        assert text.count(f"# HELP {name} ") == 1 and text.count(f"# TYPE {name} ") == 1
    assert om.count("# TYPE container_cpu_time_seconds counter") == 1 and om.count("# TYPE target info") == 1
    assert promtool_check_metrics(text)[0] == 0
    list(parse_openmetrics(om))  # the strict parser rejects a family split in two
    mem = {s.labels["k8s_pod_uid"] for f in parse_text(text) if f.name == "container_memory_usage_bytes"
           for s in f.samples}
    assert mem == {"uid-0", "uid-1", "uid-2"}
    assert text.count('target_info{') == 3  # pod 1's target_info is one series
    # pod 1's points came from both scopes with the same labels: one series, counted as a duplicate
    assert kit.sample(telemetry, "podmeter_prometheus_dropped_points_total", component="prometheus",
                      cause="duplicate_series") > 0
    # cri drops pod 2: its series go, the cgroup scope's pod 0 and pod 1 stay
    exp.export(kit.batch([1], scope="podmeter/receiver/cri"))
    _, text = scrape(port)
    assert "uid-2" not in text and 'k8s_pod_uid="uid-0"' in text and 'k8s_pod_uid="uid-1"' in text
    assert text.count("# TYPE container_memory_usage_bytes ") == 1
    # a name another scope uses for another type: one family, of the type of the scope exposed first
    from podmeter.metrics import MetricsBuilder, MetricSpec

    b = MetricsBuilder("podmeter/receiver/other", kit.START_NS)
    b.add_histogram(MetricSpec("container.memory.usage", "histogram", "By", "as a histogram"), [1, 1], [10.0],
                    total=12.0, resource=kit.pod_resource(9))
    exp.export(b.build())
    _, text = scrape(port)
    assert text.count("# TYPE container_memory_usage_bytes gauge") == 1
    assert "container_memory_usage_bytes_bucket" not in text and 'target_info{' in text and "uid-9" in text
    assert promtool_check_metrics(text)[0] == 0
    assert kit.sample(telemetry, "podmeter_prometheus_dropped_points_total", component="prometheus",
                      cause="type_conflict") >= 1


def test_memo_caches_stay_bounded(monkeypatch):
    from exporters.prometheus import translate

    monkeypatch.setattr(translate, "MEMO_CAP", 100)
    for memo in (translate._label_memo, translate._value_memo, translate._name_memo, translate._point_memo):
        memo.clear()
    for i in range(1_000):  # churning keys and values: pids, uids
        assert translate.sanitize_label(f"attr.{i}") == f"attr_{i}"
        assert translate.escape_value(f'pod "{i}"') == f'pod \\"{i}\\"'
        assert translate.metric_name(f"m.{i}", "By", "gauge", True) == f"m_{i}_bytes"
        assert translate.point_pairs({"process.pid": str(i)}) == (("process_pid", f'process_pid="{i}"'),)
    for memo in (translate._label_memo, translate._value_memo, translate._name_memo, translate._point_memo):
        assert 0 < len(memo) <= 100
    # and a memoized answer is the computed one
    assert translate.sanitize_label("9.x") == "key_9_x" and translate.sanitize_label("9.x") == "key_9_x"
    assert translate.sanitize_label("__a") == "key__a"
    assert translate.escape_value('a\\b\n"') == 'a\\\\b\\n\\"'


def test_identifying_attributes_only_are_promoted_by_default(exporter, kit):
    """GPU descriptions (model, driver, PCI bus, ...) stay in target_info; identity is on every series."""
    from podmeter.metrics import MetricsBuilder

    exp, port, _ = exporter()
    gpu = {"hw.id": "GPU-1234", "hw.gpu.index": 0, "hw.type": "gpu", "hw.name": "nvidia0", "hw.vendor": "NVIDIA",
           "hw.model": "NVIDIA H100 80GB HBM3", "hw.driver_version": "550.54.15", "hw.gpu.pci_bus_id": "00:18.0"}
    proc = {**gpu, "process.pid": 4242, "process.executable.name": "python", "process.owner": "root",
            "k8s.pod.uid": "uid-7", "container.id": "c" * 64, "k8s.pod.name": "pod-7", "k8s.namespace.name": "ml",
            "k8s.container.name": "train", "k8s.deployment.name": "trainer", "k8s.node.name": "node-1",
            "k8s.pod.labels.name": "x", "k8s.pod.ip": "10.0.0.7", "container.image.name": "registry/x"}
    b = MetricsBuilder("podmeter/receiver/nvml", kit.START_NS)
    b.add(kit.UTIL, 0.5, {"hw.gpu.task": "general"}, resource=gpu)
    b.add(kit.MEM, 1024, resource=proc)
    exp.export(b.build())
    _, text = scrape(port)
    fams = {f.name: f for f in parse_text(text)}
    (util,) = fams["hw_gpu_utilization_ratio"].samples
    assert util.labels == {"hw_id": "GPU-1234", "hw_gpu_index": "0", "hw_gpu_task": "general"}
    (mem,) = fams["container_memory_usage_bytes"].samples
    assert set(mem.labels) == {"hw_id", "hw_gpu_index", "process_pid", "k8s_pod_uid", "container_id",
                               "k8s_pod_name", "k8s_namespace_name", "k8s_container_name", "k8s_deployment_name",
                               "k8s_node_name"}
    info = {s.labels["hw_id"]: s.labels for s in fams["target_info"].samples if "process_pid" not in s.labels}
    assert info["GPU-1234"]["hw_model"] == "NVIDIA H100 80GB HBM3" and info["GPU-1234"]["hw_name"] == "nvidia0"
    # a descriptive attribute a query needs as a label is promoted explicitly
    exp2, port2, _ = exporter(promote_resource_attributes=["hw.id", "hw.model"])
    exp2.export(b.build())
    fams = {f.name: f for f in parse_text(scrape(port2)[1])}
    assert fams["hw_gpu_utilization_ratio"].samples[0].labels["hw_model"] == "NVIDIA H100 80GB HBM3"


def _gauge_batch(resource, value: float):
    from opentelemetry.sdk.metrics.export import (
        Gauge,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
    )
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    point = NumberDataPoint(attributes={}, start_time_unix_nano=0, time_unix_nano=1, value=value)
    metric = Metric(name="container.memory.usage", description="Memory in use", unit="By",
                    data=Gauge(data_points=[point]))
    scope = ScopeMetrics(scope=InstrumentationScope("podmeter/receiver/test"), metrics=[metric], schema_url="")
    return MetricsData(resource_metrics=[ResourceMetrics(resource=resource, scope_metrics=[scope], schema_url="")])


def test_a_resource_passed_again_is_translated_once_and_forgotten_with_it(exporter, monkeypatch):
    """nvml keeps its Resource objects and k8sattributes hands back the same enriched one while pods are
    unchanged: their labels are rendered once, and the cache holds only resources that are still alive."""
    import gc

    from opentelemetry.sdk.resources import Resource

    from exporters.prometheus import translate

    exp, port, _ = exporter()
    cache = exp.translator_args["resources"]
    calls = []
    real = translate.labels_from
    monkeypatch.setattr(translate, "labels_from", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = Resource({"k8s.pod.uid": "u1", "k8s.pod.name": "p1", "host.name": "node-1"})
    exp.export(_gauge_batch(res, 1.0))
    first = len(calls)
    assert first and len(cache) == 1
    exp.export(_gauge_batch(res, 2.0))
    assert len(calls) == first  # the same object: nothing translated again
    _, text = scrape(port)
    assert 'container_memory_usage_bytes{k8s_pod_name="p1",k8s_pod_uid="u1"} 2.0' in text
    assert 'host_name="node-1"' in text  # in target_info, from the cached translation

    # a new object (same attributes or not) is translated on its own
    other = Resource({"k8s.pod.uid": "u2", "k8s.pod.name": "p2"})
    exp.export(_gauge_batch(other, 3.0))
    assert len(calls) > first and len(cache) == 2
    _, text = scrape(port)
    assert 'container_memory_usage_bytes{k8s_pod_name="p2",k8s_pod_uid="u2"} 3.0' in text
    assert "u1" not in text  # the batch replaced the scope's series
    del res, other
    gc.collect()
    assert len(cache) == 0


def test_a_rendered_family_parses_back_whatever_its_label_values_hold():
    """Families shared by several scopes are merged from their rendered lines: a value with spaces, quotes,
    backslashes, a newline (escaped) or a raw carriage return (not escaped by either format) survives."""
    from exporters.prometheus import _Family, _lines
    from exporters.prometheus.translate import Family, LabelSet

    odd = {"plain": "a", "spaced": "a b  c", "quoted": 'say "hi"', "slashed": "C:\\x", "newline": "1\n2",
           "cr": "1\r2"}
    samples = {"m" + LabelSet({"k": v}).key: f"{i}.0" for i, v in enumerate(odd.values())}
    rendered = _Family(Family("m", "gauge", "help"), len(samples),
                       _lines({k.encode(): v.encode() for k, v in samples.items()}))
    assert rendered.samples() == {k.encode(): v.encode() for k, v in samples.items()}


def test_values_that_are_not_utf8_are_replaced_not_fatal(exporter, kit):
    """Python's os functions decode bytes that are not UTF-8 (a cgroup directory, a process name) as lone
    surrogates, which cannot be encoded: one such value made every export of that receiver's batches raise
    UnicodeEncodeError, so its series froze and then expired. It becomes U+FFFD, as the bytes would when decoded
    with replace."""
    exp, port, _ = exporter()
    b = MetricsBuilder("podmeter/receiver/x", kit.START_NS)
    bad = "job-\udcff\udcfe"  # os.fsdecode(b"job-\xff\xfe")
    b.add(kit.MEM, 7.0, {"name": bad}, resource={"k8s.pod.uid": "u", "process.executable.name": bad})
    b.add(kit.MEM, 8.0, {"name": "ok"}, resource={"k8s.pod.uid": "u", "process.executable.name": bad})
    exp.export(b.build())
    _, text = scrape(port)
    assert promtool_check_metrics(text)[0] == 0, text
    (fam,) = [f for f in parse_text(text) if f.name == "container_memory_usage_bytes"]
    assert {s.labels["name"]: s.value for s in fam.samples} == {"job-\ufffd\ufffd": 7.0, "ok": 8.0}
    (info,) = [f for f in parse_text(text) if f.name == "target_info"]
    assert info.samples[0].labels["process_executable_name"] == "job-\ufffd\ufffd"
    _, om = scrape(port, accept=OM_ACCEPT)
    assert {f.name for f in parse_openmetrics(om)} >= {"container_memory_usage_bytes", "target"}


def test_array_attributes_are_compact_json_as_the_collector_renders_them(exporter, kit):
    """An array attribute (container.image.tags) is one label value: JSON without spaces and with its UTF-8 kept,
    as the collector writes it, so both expose the same value for the same tags."""
    exp, port, _ = exporter()
    b = MetricsBuilder("podmeter/receiver/x", kit.START_NS)
    b.add(kit.MEM, 1.0, {"ports": [80, 443]},
          resource={"k8s.pod.uid": "u", "container.image.tags": ["v1", "läst"]})
    exp.export(b.build())
    _, text = scrape(port)
    families = {f.name: f for f in parse_text(text)}
    assert families["container_memory_usage_bytes"].samples[0].labels["ports"] == "[80,443]"
    assert families["target_info"].samples[0].labels["container_image_tags"] == '["v1","läst"]'


def test_double_attributes_are_written_as_the_collector_writes_them(exporter, kit):
    """A double attribute's label value is pcommon's AsString (JSON's number form): `1`, not Python's `1.0`, and
    exponents only below 1e-6 and from 1e21, so both expose the same series for the same value."""
    exp, port, _ = exporter()
    b = MetricsBuilder("podmeter/receiver/x", kit.START_NS)
    cases = {"one": 1.0, "half": 0.5, "small": 1e-05, "tiny": 1.5e-07, "big": 1e20, "huge": 1e21, "neg": -2.0,
             "list": [1.0, 0.25]}
    b.add(kit.MEM, 1.0, cases, resource={"k8s.pod.uid": "u", "app.version": 2.0})
    exp.export(b.build())
    _, text = scrape(port)
    families = {f.name: f for f in parse_text(text)}
    labels = families["container_memory_usage_bytes"].samples[0].labels
    assert {k: labels[k] for k in cases} == {"one": "1", "half": "0.5", "small": "0.00001", "tiny": "1.5e-7",
                                             "big": "100000000000000000000", "huge": "1e+21", "neg": "-2",
                                             "list": "[1,0.25]"}
    assert families["target_info"].samples[0].labels["app_version"] == "2"


def test_translation_strategy_as_the_collectors(exporter, kit, caplog):
    """`translation_strategy`, the collector's successor of add_metric_suffixes, was refused as an unknown key (the
    agent would not start on a current collector config). The underscore-escaping strategies are served; when
    both keys are given the strategy wins (as in the collector) and the ignored add_metric_suffixes is logged."""
    exp, port, _ = exporter(translation_strategy="UnderscoreEscapingWithoutSuffixes")
    exp.export(kit.batch([0]))
    _, text = scrape(port)
    fams = {f.name: f for f in parse_text(text)}
    assert "container_memory_usage" in fams and "container_memory_usage_bytes" not in fams
    assert fams["container_cpu_time"].type == "unknown"  # as with add_metric_suffixes: false
    assert promtool_check_metrics(text)[0] == 0
    with caplog.at_level("WARNING"):
        exp, port, _ = exporter(translation_strategy="UnderscoreEscapingWithSuffixes", add_metric_suffixes=False)
    assert "add_metric_suffixes: false is ignored: translation_strategy UnderscoreEscapingWithSuffixes" in caplog.text
    exp.export(kit.batch([0]))
    _, text = scrape(port, OM_ACCEPT)
    assert {f.name for f in parse_openmetrics(text)} >= {"container_cpu_time_seconds", "container_memory_usage_bytes"}


@pytest.mark.parametrize("strategy,problem", [
    ("NoTranslation", "UTF-8 metric and label names are not supported: podmeter serves only underscore-escaped "
                      "names, valid for every Prometheus; use UnderscoreEscapingWithSuffixes or "
                      "UnderscoreEscapingWithoutSuffixes (got 'NoTranslation')"),
    ("NoUTF8EscapingWithSuffixes", "UTF-8 metric and label names are not supported: podmeter serves only "
                                   "underscore-escaped names, valid for every Prometheus; use "
                                   "UnderscoreEscapingWithSuffixes or UnderscoreEscapingWithoutSuffixes (got "
                                   "'NoUTF8EscapingWithSuffixes')"),
    ("underscores", "unknown strategy; use UnderscoreEscapingWithSuffixes or UnderscoreEscapingWithoutSuffixes "
                    "(got 'underscores')"),
])
def test_a_translation_strategy_podmeter_cannot_honour_is_refused_at_its_key(strategy, problem):
    problems: list[str] = []
    validate_component(factory, {"translation_strategy": strategy}, "exporters::prometheus", problems)
    assert problems == [f"exporters::prometheus::translation_strategy: {problem}"]
