"""MetricsBuilder groups points by resource (by identity fast, by value always) and builds SDK MetricsData."""

from opentelemetry.sdk.metrics.export import Gauge, Sum

from podmeter.metrics import MetricsBuilder, MetricSpec, count_points, metrics_table

SUM = MetricSpec("container.cpu.time", "sum", "s", "cpu", ("cpu.mode",))
GAUGE = MetricSpec("container.memory.usage", "gauge", "By", "mem")
OFF = MetricSpec("container.memory.rss", "gauge", "By", "rss", enabled=False)
HIST = MetricSpec("container.cpu.run_queue.latency", "histogram", "s", "latency")
RATIO = MetricSpec("hw.gpu.utilization", "gauge", "1", "busy")


def test_points_grouped_by_resource_value_not_dict_identity():
    a, b = {"k8s.pod.uid": "u1", "container.id": "c1"}, {"k8s.pod.uid": "u2", "tags": ["x", "y"]}
    builder = MetricsBuilder("podmeter/receiver/test", 123)
    builder.add(SUM, 1.5, {"cpu.mode": "user"}, a)
    builder.add(SUM, 0.5, {"cpu.mode": "system"}, a)
    builder.add(GAUGE, 42, None, a)
    builder.add(GAUGE, None, None, a)  # missing values are skipped
    builder.add(OFF, 7, None, a)  # disabled metrics are skipped
    builder.add(GAUGE, 9, None, b)  # list-valued attributes are fine
    builder.add(SUM, 2.0, {"cpu.mode": "user"}, dict(a))  # an equal resource as another dict: same resource
    builder.add_histogram(HIST, [1, 2, 0], [0.001, 0.01], total=0.02, resource=b)
    data = builder.build()
    assert len(data.resource_metrics) == 2
    first = data.resource_metrics[0]
    assert dict(first.resource.attributes) == a
    metrics = {m.name: m for m in first.scope_metrics[0].metrics}
    assert isinstance(metrics["container.cpu.time"].data, Sum) and metrics["container.cpu.time"].data.is_monotonic
    assert [p.value for p in metrics["container.cpu.time"].data.data_points] == [1.5, 0.5, 2.0]
    assert all(p.start_time_unix_nano == 123 for p in metrics["container.cpu.time"].data.data_points)
    assert isinstance(metrics["container.memory.usage"].data, Gauge)
    assert "container.memory.rss" not in metrics
    assert first.scope_metrics[0].scope.name == "podmeter/receiver/test"
    assert count_points(data) == 6


def test_empty_collection_still_names_its_scope():
    data = MetricsBuilder("podmeter/receiver/test", 1).build()
    assert [sm.scope.name for rm in data.resource_metrics for sm in rm.scope_metrics] == ["podmeter/receiver/test"]
    assert count_points(data) == 0


def test_metrics_table_lists_disabled_ones():
    table = metrics_table([SUM, OFF])
    assert "`container.cpu.time` | sum | `s` | `cpu.mode`" in table
    assert "(off by default)" in table


def test_metrics_table_gives_the_prometheus_name_of_each_metric():
    """The README tables say what a PromQL query spells: the exporter's own translation, one source of truth."""
    from podmeter.docs import prometheus_name

    table = metrics_table([SUM, GAUGE, HIST, RATIO], prometheus_name)
    assert table.splitlines()[0] == "| metric | Prometheus | type | unit | attributes | description |"
    assert "| `container.cpu.time` | `container_cpu_time_seconds_total` | sum |" in table
    assert "| `container.memory.usage` | `container_memory_usage_bytes` | gauge |" in table
    assert "| `container.cpu.run_queue.latency` | `container_cpu_run_queue_latency_seconds` | histogram |" in table
    assert "| `hw.gpu.utilization` | `hw_gpu_utilization_ratio` | gauge |" in table


def test_adder_is_add_bound_to_one_resource_and_points_equal_the_sdks():
    from opentelemetry.sdk.metrics.export import AggregationTemporality, Metric, NumberDataPoint

    res = {"k8s.pod.uid": "u1"}
    one = MetricsBuilder("s", 123, time_ns=456)
    add = one.adder(res)
    add(SUM, 1.5, {"cpu.mode": "user"})
    add(GAUGE, 42)
    add(GAUGE, None)  # missing: skipped
    add(OFF, 7)  # disabled: skipped
    other = MetricsBuilder("s", 123, time_ns=456)
    other.add(SUM, 1.5, {"cpu.mode": "user"}, res)
    other.add(GAUGE, 42, None, dict(res))
    a, b = one.build(), other.build()
    assert a == b
    metrics = {m.name: m for m in a.resource_metrics[0].scope_metrics[0].metrics}
    # built without the dataclasses' __init__, yet the very objects the SDK's constructors make
    assert metrics["container.cpu.time"] == Metric(
        name="container.cpu.time", description="cpu", unit="s",
        data=Sum(data_points=[NumberDataPoint(attributes={"cpu.mode": "user"}, start_time_unix_nano=123,
                                              time_unix_nano=456, value=1.5)],
                 aggregation_temporality=AggregationTemporality.CUMULATIVE, is_monotonic=True))
    point = metrics["container.memory.usage"].data.data_points[0]
    assert point == NumberDataPoint(attributes={}, start_time_unix_nano=0, time_unix_nano=456, value=42)
    # no exemplars: one empty list shared by every point (nothing appends to a built point's exemplars)
    assert point.exemplars == [] and point.exemplars is metrics["container.cpu.time"].data.data_points[0].exemplars
    assert repr(point) == repr(NumberDataPoint(attributes={}, start_time_unix_nano=0, time_unix_nano=456, value=42))
    try:
        point.value = 1
    except AttributeError:
        pass
    else:
        raise AssertionError("points stay frozen")


def test_a_kept_resource_object_is_used_as_it_is():
    """A receiver that keeps its Resource across collections hands it to the builder; the built data carries that
    very object (downstream caches key on it), with all the points added for it."""
    from opentelemetry.sdk.resources import Resource

    spec = MetricSpec("process.memory", "gauge", "By", "memory")
    kept = Resource({"process.pid": 7})
    b = MetricsBuilder("test", 1)
    b.add(spec, 1, {"k": "a"}, kept)
    b.adder({"process.pid": 8})(spec, 3)
    b.adder(kept)(spec, 2, {"k": "b"})
    rms = b.build().resource_metrics
    assert rms[0].resource is kept
    assert [p.value for p in rms[0].scope_metrics[0].metrics[0].data.data_points] == [1, 2]
    assert dict(rms[1].resource.attributes) == {"process.pid": 8}


def test_a_point_timed_before_the_start_starts_at_its_time():
    # CRI times its stats itself (writable_layer.timestamp), which can be before the receiver started: OTLP wants
    # start_time_unix_nano <= time_unix_nano
    builder = MetricsBuilder("podmeter/receiver/test", 1_000)
    builder.add(SUM, 1.0, {"cpu.mode": "user"}, {"k8s.pod.uid": "u"}, time_ns=400)
    builder.add(SUM, 2.0, {"cpu.mode": "system"}, {"k8s.pod.uid": "u"}, time_ns=2_000)
    (point_early, point_late) = builder.build().resource_metrics[0].scope_metrics[0].metrics[0].data.data_points
    assert (point_early.start_time_unix_nano, point_early.time_unix_nano) == (400, 400)
    assert (point_late.start_time_unix_nano, point_late.time_unix_nano) == (1_000, 2_000)
