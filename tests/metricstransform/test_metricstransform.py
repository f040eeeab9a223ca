"""metricstransform processor on MetricsData built the way receivers build it; the compatibility case goes on
through the real prometheus exporter and promtool."""

from __future__ import annotations

import logging
import urllib.request
from dataclasses import replace

import pytest
from harness.validate import validate_cli

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.config import validate_component
from podmeter.metrics import MetricsBuilder, MetricSpec, iter_points
from podmeter.telemetry import ComponentTelemetry, Telemetry
from processors.metricstransform import factory

CPU = MetricSpec("container.cpu.time", "sum", "s", "CPU time", attributes=("cpu.mode",))
MEM = MetricSpec("container.memory.usage", "updowncounter", "By", "Memory")
DISK_R = MetricSpec("container.disk.read", "sum", "By", "read")
DISK_W = MetricSpec("container.disk.write", "sum", "By", "written")
LAT = MetricSpec("lat", "histogram", "s", "latency")
RES = {"k8s.pod.uid": "u1", "k8s.pod.name": "trainer-0", "k8s.namespace.name": "ml"}


def make(transforms: list) -> tuple:
    telemetry = Telemetry()
    cid = ComponentID("metricstransform")
    logger = logging.getLogger("test.metricstransform")
    settings = CreateSettings(id=cid, kind="processor", logger=logger, pipeline="metrics",
                              telemetry=ComponentTelemetry(telemetry, str(cid), logger))
    return factory.create(settings, factory.config_model.model_validate({"transforms": transforms})), settings


def data():
    b = MetricsBuilder("podmeter/receiver/cgroup", 1)
    for mode, v in (("user", 4.0), ("system", 1.0), ("iowait", 0.5)):
        b.add(CPU, v, {"cpu.mode": mode, "cpu": "0"}, resource=RES)
        b.add(CPU, v * 2, {"cpu.mode": mode, "cpu": "1"}, resource=RES)
    b.add(MEM, 3 * 1048576, resource=RES)
    b.add(DISK_R, 100, {"device": "sda"}, resource=RES)
    b.add(DISK_W, 40, {"device": "sda"}, resource=RES)
    b.add_histogram(LAT, [1, 1], [0.5], 1.0, attributes={"cpu": "0"}, resource=RES, minimum=0.1, maximum=0.9)
    b.add_histogram(LAT, [2, 0], [0.5], 0.4, attributes={"cpu": "1"}, resource=RES, minimum=0.1, maximum=0.3)
    return b.build()


def points(md, name=None) -> list[tuple[str, dict, object]]:
    return [(m.name, dict(p.attributes), getattr(p, "value", None) if hasattr(p, "value") else p)
            for _, _, m, p in iter_points(md) if name is None or m.name == name]


def test_rename_exact_and_regexp_with_groups():
    proc, _ = make([
        {"include": "container.memory.usage", "action": "update", "new_name": "pod_memory_bytes"},
        {"include": r"^container\.disk\.(\w+)$", "match_type": "regexp", "action": "update",
         "new_name": "disk_${1}_bytes_total"},
    ])
    names = {n for n, _, _ in points(proc.process(data()))}
    assert {"pod_memory_bytes", "disk_read_bytes_total", "disk_write_bytes_total", "container.cpu.time"} <= names
    assert "container.memory.usage" not in names


@pytest.mark.parametrize("new_name, expected", [
    # Go's Regexp.Expand, as the collector reads new_name: a bare reference is as long as possible, $$ is a $,
    # a $ that starts no reference stays
    ("disk_$1", "disk_read"),
    ("disk_${1}_bytes", "disk_read_bytes"),
    ("disk_$dir.$1", "disk_read.read"),
    ("disk_${dir}_$01", "disk_read_read"),
    ("$0.total", "container.disk.read.total"),
    ("disk.$$.$dir.$", "disk.$.read.$"),
])
def test_new_name_group_references_as_the_collector(new_name, expected):
    proc, _ = make([{"include": r"^container\.disk\.(?P<dir>read)$", "match_type": "regexp", "action": "update",
                     "new_name": new_name}])
    names = {n for n, _, _ in points(proc.process(data()))}
    assert expected in names and "container.disk.read" not in names


def test_insert_keeps_the_original():
    proc, _ = make([{"include": "container.memory.usage", "action": "insert", "new_name": "mem_mib",
                     "operations": [{"action": "experimental_scale_value", "experimental_scale": 1 / 1048576}]}])
    out = points(proc.process(data()))
    assert ("container.memory.usage", {}, 3 * 1048576) in out
    assert ("mem_mib", {}, 3) in out  # integer points stay integers


def test_integers_are_truncated_as_the_collector_does():
    """The collector converts with Go's int64(), which truncates toward zero: 1.9 MiB is 1 MiB, as dcgm-exporter's
    integer MiB are (examples/dcgm-compat.yaml), not 2."""
    gauge = MetricSpec("g", "gauge", "By", "g")
    proc, _ = make([{"include": "g", "action": "update", "operations": [
        {"action": "experimental_scale_value", "experimental_scale": 1 / 1048576}]}])
    assert [v for _, _, v in points(proc.process(_one(gauge, [(int(1.9 * 1048576), {})])))] == [1]
    proc, _ = make([{"include": "g", "action": "update", "operations": [{"action": "toggle_scalar_data_type"}]}])
    assert [v for _, _, v in points(proc.process(_one(gauge, [(2.7, {}), (-2.7, {"k": "n"})])))] == [2, -2]


def test_label_operations():
    proc, _ = make([{"include": "container.cpu.time", "action": "update", "operations": [
        {"action": "add_label", "new_label": "source", "new_value": "cgroup"},
        {"action": "update_label", "label": "cpu.mode", "new_label": "state",
         "value_actions": [{"value": "iowait", "new_value": "wait"}]},
        {"action": "copy_label", "label": "state", "new_label": "mode"},
        {"action": "delete_label_value", "label": "state", "label_value": "system"},
        {"action": "copy_resource_attribute", "resource_attribute": "k8s.pod.name", "new_label": "pod"},
    ]}])
    out = points(proc.process(data()), "container.cpu.time")
    assert len(out) == 4
    for _, attrs, _ in out:
        assert attrs["source"] == "cgroup" and attrs["pod"] == "trainer-0" and attrs["state"] == attrs["mode"]
        assert "cpu.mode" not in attrs
    assert {a["state"] for _, a, _ in out} == {"user", "wait"}


@pytest.mark.parametrize("how,expected", [("sum", {"user": 12.0, "system": 3.0, "iowait": 1.5}),
                                          ("mean", {"user": 6.0, "system": 1.5, "iowait": 0.75}),
                                          ("max", {"user": 8.0, "system": 2.0, "iowait": 1.0}),
                                          ("min", {"user": 4.0, "system": 1.0, "iowait": 0.5})])
def test_aggregate_away_a_label(how, expected):
    proc, _ = make([{"include": "container.cpu.time", "action": "update", "operations": [
        {"action": "aggregate_labels", "label_set": ["cpu.mode"], "aggregation_type": how}]}])
    out = points(proc.process(data()), "container.cpu.time")
    assert {a["cpu.mode"]: v for _, a, v in out} == expected
    assert all(set(a) == {"cpu.mode"} for _, a, _ in out)


def test_delete_label_merges_points_and_histograms_sum():
    proc, _ = make([{"include": "lat", "action": "update", "operations": [{"action": "delete_label", "label": "cpu"}]}])
    (_, attrs, p), = points(proc.process(data()), "lat")
    assert attrs == {} and p.count == 4 and list(p.bucket_counts) == [3, 1] and p.sum == 1.4 and p.max == 0.9


def test_aggregate_label_values_and_combine():
    proc, _ = make([
        {"include": "container.cpu.time", "action": "update", "operations": [
            {"action": "aggregate_label_values", "label": "cpu.mode", "aggregated_values": ["system", "iowait"],
             "new_value": "other", "aggregation_type": "sum"}]},
        {"include": r"^container\.disk\.(?P<direction>\w+)$", "match_type": "regexp", "action": "combine",
         "new_name": "container.disk.io", "submatch_case": "upper"},
    ])
    md = proc.process(data())
    cpu = {(a["cpu.mode"], a["cpu"]): v for _, a, v in points(md, "container.cpu.time")}
    assert cpu == {("user", "0"): 4.0, ("user", "1"): 8.0, ("other", "0"): 1.5, ("other", "1"): 3.0}
    disk = {a["direction"]: v for _, a, v in points(md, "container.disk.io")}
    assert disk == {"READ": 100, "WRITE": 40}


def test_problems_are_counted_and_the_metric_passes(caplog):
    proc, settings = make([{"include": "lat", "action": "update", "new_name": "renamed", "operations": [
        {"action": "aggregate_labels", "label_set": [], "aggregation_type": "max"}]}])
    out = points(proc.process(data()), "lat")
    assert len(out) == 2  # unchanged, not renamed
    assert "transform" in settings.telemetry.failing()


def test_strict_config_names_the_path():
    problems: list[str] = []
    validate_component(factory, {"transforms": [
        {"include": "a", "action": "update", "operations": [{"action": "add_label", "new_label": "x"}]},
        {"include": "(", "match_type": "regexp", "action": "update"},
        {"include": "a", "action": "combine", "new_name": "b"},
        {"include": "a", "action": "rename"},
        {"include": "a", "action": "update", "operations": [{"action": "add_label", "new_label": "x",
                                                             "new_value": "y", "lable": "z"}]},
        # group references new_name makes that include does not have: caught here, not on every metric later
        {"include": "^a.(b)$", "match_type": "regexp", "action": "update", "new_name": "x.$9"},
        {"include": "^a.(?P<what>b)$", "match_type": "regexp", "action": "insert", "new_name": "x.${who}"},
        {"include": "^a.(?P<what>b)$", "match_type": "regexp", "action": "insert", "new_name": "x.${what}.$1.${1}"},
        {"include": "(" * 2000 + ")" * 2000, "match_type": "regexp", "action": "update"},
        # bare references are as long as possible, as in Go: $1x is group 1x (write ${1}x)
        {"include": "^a.(b)$", "match_type": "regexp", "action": "update", "new_name": "x.$1x"},
    ]}, "processors::metricstransform", problems)
    text = "\n".join(problems)
    assert "processors::metricstransform::transforms::0::operations::0: action add_label needs new_value" in text
    assert "processors::metricstransform::transforms::1: include '(' is not a valid regular expression" in text
    assert "processors::metricstransform::transforms::2: action combine needs match_type: regexp" in text
    assert "processors::metricstransform::transforms::3::action:" in text
    assert "processors::metricstransform::transforms::4::operations::0::lable: unknown key" in text
    assert "transforms::5: new_name refers to group 9, which include does not have (1 groups)" in text
    assert "transforms::6: new_name refers to group who, which include does not have (1 groups, named what)" in text
    assert "transforms::7" not in text
    assert "transforms::8: include '((((" in text and "is not a valid regular expression" in text
    assert "transforms::9: new_name refers to group 1x, which include does not have (1 groups)" in text


def test_compatibility_names_through_the_prometheus_exporter(tmp_path):
    """An nvitop-exporter style series from OTel data: exact name, MiB, pod label, through the real exporter."""
    from harness import free_port
    from harness.prometheus import promtool_check_metrics

    from exporters.prometheus import factory as prom_factory

    proc, _ = make([{"include": "container.memory.usage", "action": "insert", "new_name": "process_rss_memory",
                     "operations": [
                         {"action": "experimental_scale_value", "experimental_scale": 1 / 1048576},
                         {"action": "copy_resource_attribute", "resource_attribute": "k8s.pod.name",
                          "new_label": "pod_name"}]}])
    port = free_port()
    telemetry = Telemetry()
    logger = logging.getLogger("test.prometheus")
    settings = CreateSettings(id=ComponentID("prometheus"), kind="exporter", logger=logger,
                              telemetry=ComponentTelemetry(telemetry, "prometheus", logger))
    exp = prom_factory.create(settings, prom_factory.config_model.model_validate(
        {"endpoint": f"127.0.0.1:{port}", "add_metric_suffixes": False, "promote_resource_attributes": []}))
    exp.start(Host())
    try:
        exp.export(proc.process(data()))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        exp.shutdown()
    assert 'process_rss_memory{pod_name="trainer-0"} 3.0' in text
    assert promtool_check_metrics(text)[0] == 0


def _names(md) -> list[str]:
    return [m.name for rm in md.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]


def test_rename_onto_an_existing_name_is_a_collision_left_unchanged():
    """Two metrics with one name give two TYPE lines (the prometheus exporter drops one as a type conflict) or
    duplicate series; the collector documents a rename collision as no operation, logged."""
    proc, settings = make([
        {"include": "container.disk.read", "action": "update", "new_name": "container.disk.write"},
        # a regexp that maps several metrics to one name: the first gets it, the others stay as they are
        {"include": r"^container\.(memory|cpu)\.", "match_type": "regexp", "action": "update", "new_name": "x"},
        {"include": "lat", "action": "insert", "new_name": "lat"},
        {"include": r"^container\.disk\.(?P<d>\w+)$", "match_type": "regexp", "action": "combine",
         "new_name": "x"},
    ])
    names = _names(proc.process(data()))
    assert sorted(names) == sorted(["container.disk.read", "container.disk.write", "x", "container.memory.usage",
                                    "lat"])
    assert "transform" in settings.telemetry.failing()


def _one(spec, points, resource=RES):
    b = MetricsBuilder("podmeter/receiver/test", 1)
    for value, attrs in points:
        b.add(spec, value, attrs, resource=resource)
    return b.build()


def test_odd_points_never_raise():
    """A NaN gauge, a list-valued attribute, an integer out of range, an exponential histogram: the metric passes
    unchanged (counted), never an exception that makes the pipeline refuse the whole batch."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Buckets,
        ExponentialHistogram,
        ExponentialHistogramDataPoint,
        Metric,
        MetricsData,
        ResourceMetrics,
        ScopeMetrics,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    gauge = MetricSpec("g", "gauge", "1", "g")
    proc, settings = make([{"include": "g", "action": "update", "operations": [
        {"action": "toggle_scalar_data_type"}]}])
    (_, _, value), = points(proc.process(_one(gauge, [(float("nan"), {"gpu": "0"})])))
    assert value != value  # still the NaN float
    assert "transform" in settings.telemetry.failing()

    proc, _ = make([{"include": "g", "action": "update", "operations": [
        {"action": "aggregate_label_values", "label": "k", "aggregated_values": ["a", "b"], "new_value": "ab",
         "aggregation_type": "sum"}]}])
    out = points(proc.process(_one(gauge, [(1.0, {"k": ["a", "b"]}), (2.0, {"k": "a"}), (3.0, {"k": "b"})])))
    assert sorted((str(a["k"]), v) for _, a, v in out) == [("['a', 'b']", 1.0), ("ab", 5.0)]

    proc, _ = make([{"include": "g", "action": "update", "operations": [
        {"action": "experimental_scale_value", "experimental_scale": 1e308}]}])
    assert [v for *_, v in points(proc.process(_one(gauge, [(10, {})])))] == [10]

    point = ExponentialHistogramDataPoint(
        attributes={"k": "a"}, start_time_unix_nano=1, time_unix_nano=2, count=1, sum=1.0, scale=0, zero_count=0,
        positive=Buckets(0, [1]), negative=Buckets(0, []), flags=0, min=1.0, max=1.0)
    md = MetricsData([ResourceMetrics(Resource(RES), [ScopeMetrics(InstrumentationScope("s"), [Metric(
        "g", "", "s", ExponentialHistogram([point, replace(point, attributes={"k": "b"})],
                                           AggregationTemporality.CUMULATIVE))], "")], "")])
    for op in ({"action": "aggregate_labels", "label_set": [], "aggregation_type": "sum"},
               {"action": "experimental_scale_value", "experimental_scale": 2},
               {"action": "toggle_scalar_data_type"}):
        proc, _ = make([{"include": "g", "action": "update", "operations": [op]}])
        assert len(points(proc.process(md))) == 2


def test_non_finite_scale_is_a_configuration_error():
    problems: list[str] = []
    validate_component(factory, {"transforms": [{"include": "a", "action": "update", "operations": [
        {"action": "experimental_scale_value", "experimental_scale": float("nan")}]}]},
        "processors::metricstransform", problems)
    assert any(p.startswith("processors::metricstransform::transforms::0::operations::0") and "finite" in p
               for p in problems)


def test_merges_keep_the_configured_aggregation_and_never_leave_duplicates():
    """delete_label / update_label merge the points that become equal: with the aggregation_type given (a gauge's
    max, not a sum of percentages), and update_label does not overwrite an attribute already there."""
    util = MetricSpec("hw.gpu.utilization", "gauge", "1", "u")
    md = _one(util, [(0.5, {"gpu": "0", "state": "busy"}), (0.75, {"gpu": "1", "state": "busy"})])
    proc, _ = make([{"include": "hw.gpu.utilization", "action": "update", "operations": [
        {"action": "delete_label", "label": "gpu", "aggregation_type": "max"}]}])
    assert [(a, v) for _, a, v in points(proc.process(md))] == [({"state": "busy"}, 0.75)]

    proc, _ = make([{"include": "hw.gpu.utilization", "action": "update", "operations": [
        {"action": "update_label", "label": "gpu", "value_actions": [{"value": "1", "new_value": "0"}],
         "aggregation_type": "mean"}]}])
    assert [(a, v) for _, a, v in points(proc.process(md))] == [({"gpu": "0", "state": "busy"}, 0.625)]

    proc, settings = make([{"include": "hw.gpu.utilization", "action": "update", "operations": [
        {"action": "update_label", "label": "gpu", "new_label": "state"}]}])
    out = points(proc.process(md))
    assert sorted(a["gpu"] for _, a, _ in out) == ["0", "1"]  # left unchanged, not two {state: "0"/"1"} overwrites
    assert "transform" in settings.telemetry.failing()


def test_histogram_merge_with_unrecorded_min_max():
    """min/max NaN means not recorded: the merge is unknown too, whatever the order of the points."""
    b = MetricsBuilder("podmeter/receiver/test", 1)
    b.add_histogram(LAT, [1, 0], [0.5], 0.2, attributes={"cpu": "0"}, resource=RES, minimum=0.2, maximum=0.2)
    b.add_histogram(LAT, [1, 1], [0.5], 1.0, attributes={"cpu": "1"}, resource=RES)
    proc, _ = make([{"include": "lat", "action": "update", "operations": [{"action": "delete_label", "label": "cpu"}]}])
    (_, _, p), = points(proc.process(b.build()), "lat")
    assert p.count == 3 and p.min != p.min and p.max != p.max


def test_operations_that_would_make_duplicate_series_leave_the_metric_unchanged():
    """add_label over an attribute the points differ by, or a combine whose metrics' points end up alike, would
    give two series with one name and one label set: counted and left as they were."""
    proc, settings = make([
        {"include": "container.cpu.time", "action": "update", "operations": [
            {"action": "add_label", "new_label": "cpu", "new_value": "all"}]},
        # the combined points differ only by direction, which add_label then overwrites
        {"include": r"^container\.disk\.(?P<direction>read|write)$", "match_type": "regexp", "action": "combine",
         "new_name": "container.disk.io", "operations": [{"action": "add_label", "new_label": "direction",
                                                          "new_value": "any"}]},
    ])
    md = proc.process(data())
    assert sorted(a["cpu"] for _, a, _ in points(md, "container.cpu.time")) == ["0", "0", "0", "1", "1", "1"]
    assert {n for n, _, _ in points(md)} >= {"container.disk.read", "container.disk.write"}
    assert "transform" in settings.telemetry.failing()
    # the same operations where they make no duplicates apply
    proc, _ = make([{"include": "container.memory.usage", "action": "update", "operations": [
        {"action": "add_label", "new_label": "cpu", "new_value": "all"}]}])
    assert [a for _, a, _ in points(proc.process(data()), "container.memory.usage")] == [{"cpu": "all"}]


# -- configurations copied from the collector (processor/metricstransformprocessor README and testdata) ----------


def test_collector_combine_with_aggregation_type(tmp_path):
    """The collector's README: "if action is combine, aggregation_type is required". It was an unknown key, so
    every collector combine was refused; now the combined points with equal attributes merge by it."""
    rc, err = validate_cli(tmp_path, r"""
metricstransform:
  transforms:
    - include: ^container\.disk\.(?P<direction>.*)$
      match_type: regexp
      action: combine
      new_name: container.disk.io
      aggregation_type: sum
      operations:
        - {action: delete_label, label: device, aggregation_type: sum}
""")
    assert rc == 0, err
    b = MetricsBuilder("podmeter/receiver/cgroup", 1)
    for spec in (DISK_R, DISK_W):
        b.add(spec, 100, {"device": "sda"}, resource=RES)
        b.add(spec, 10, {"device": "sdb"}, resource=RES)
    proc, _ = make([{"include": r"^container\.disk\.(?P<direction>.*)$", "match_type": "regexp",
                     "action": "combine", "new_name": "io", "aggregation_type": "max"}])
    # the points differ by direction and device: nothing to merge
    assert sorted((a["direction"], a["device"], v) for _, a, v in points(proc.process(b.build()), "io")) == [
        ("read", "sda", 100), ("read", "sdb", 10), ("write", "sda", 100), ("write", "sdb", 10)]


def test_combine_aggregation_type_merges_points_left_equal():
    """Two metrics with the same points and a group that matches neither name's difference: without
    aggregation_type that is a collision (left unchanged); with it they merge, as the collector's combine does."""
    b = MetricsBuilder("podmeter/receiver/cgroup", 1)
    b.add(DISK_R, 100, {"device": "sda"}, resource=RES)
    b.add(DISK_W, 40, {"device": "sda"}, resource=RES)
    t = {"include": r"^container\.disk\.(?P<unused>nomatch)?(read|write)$", "match_type": "regexp",
         "action": "combine", "new_name": "io"}
    proc, _ = make([t])
    assert {n for n, _, _ in points(proc.process(b.build()))} == {"container.disk.read", "container.disk.write"}
    for how, value in (("sum", 140), ("max", 100), ("min", 40), ("mean", 70)):
        proc, _ = make([{**t, "aggregation_type": how}])
        assert points(proc.process(b.build())) == [("io", {"device": "sda"}, value)]


def test_transform_aggregation_type_outside_combine_is_refused():
    problems: list[str] = []
    validate_component(factory, {"transforms": [{"include": "a", "action": "update", "aggregation_type": "sum"}]},
                       "processors::metricstransform", problems)
    assert problems == ["processors::metricstransform::transforms::0: aggregation_type of a transform applies to "
                        "action combine only; for update, give it to an aggregate_labels or aggregate_label_values "
                        "operation"]


def test_experimental_match_labels_insert(tmp_path):
    """The collector README's "Create a new metric from an existing metric with matching label values": the copy
    has only the matching points. It was an unknown key, refused."""
    rc, err = validate_cli(tmp_path, """
metricstransform:
  transforms:
    - include: container.cpu.time
      action: insert
      new_name: container.cpu.user
      match_type: strict
      experimental_match_labels: {"cpu.mode": "user"}
    - include: container.cpu.time
      new_name: container.cpu.nonempty
      action: insert
      match_type: regexp
      experimental_match_labels: {"cpu": "\\\\S"}
""")
    assert rc == 0, err
    proc, _ = make([
        {"include": "container.cpu.time", "action": "insert", "new_name": "cpu_user",
         "experimental_match_labels": {"cpu.mode": "user"},
         "operations": [{"action": "experimental_scale_value", "experimental_scale": 100}]},
        {"include": "container.cpu.time", "action": "insert", "new_name": "cpu_1", "match_type": "regexp",
         "experimental_match_labels": {"cpu": "^1$"}},
        {"include": "container.cpu.time", "action": "insert", "new_name": "none",
         "experimental_match_labels": {"cpu.mode": "steal"}},
        # an absent attribute counts as "": {k: ""} selects the points without k
        {"include": "container.memory.usage", "action": "insert", "new_name": "mem_copy",
         "experimental_match_labels": {"gpu": ""}},
    ])
    out = proc.process(data())
    assert sorted((a["cpu"], v) for _, a, v in points(out, "cpu_user")) == [("0", 400.0), ("1", 800.0)]
    assert sorted(a["cpu.mode"] for _, a, _ in points(out, "cpu_1")) == ["iowait", "system", "user"]
    assert points(out, "none") == []
    assert len(points(out, "container.cpu.time")) == 6  # the original is whole
    assert len(points(out, "mem_copy")) == 1


def test_experimental_match_labels_update():
    """update: when every point matches, the whole transform applies; when only some do, the metric keeps its
    name and only the point-by-point operations change the matching points (the collector's transformMetric);
    when none does, nothing changes."""
    ops = [{"action": "update_label", "label": "cpu.mode", "value_actions": [{"value": "user", "new_value": "usr"}]},
           {"action": "experimental_scale_value", "experimental_scale": 10},
           {"action": "add_label", "new_label": "x", "new_value": "1"}]
    proc, _ = make([{"include": "container.cpu.time", "action": "update", "new_name": "cpu",
                     "experimental_match_labels": {"cpu.mode": "user"}, "operations": ops}])
    got = sorted((n, a["cpu.mode"], a["cpu"], v, "x" in a) for n, a, v in points(proc.process(data()))
                 if a.get("cpu.mode"))
    assert got == [("container.cpu.time", "iowait", "0", 0.5, False), ("container.cpu.time", "iowait", "1", 1.0, False),
                   ("container.cpu.time", "system", "0", 1.0, False), ("container.cpu.time", "system", "1", 2.0, False),
                   ("container.cpu.time", "usr", "0", 40.0, False), ("container.cpu.time", "usr", "1", 80.0, False)]
    proc, _ = make([{"include": "container.cpu.time", "action": "update", "new_name": "cpu", "match_type": "regexp",
                     "experimental_match_labels": {"cpu.mode": "."}, "operations": ops}])
    out = proc.process(data())
    assert points(out, "container.cpu.time") == []
    assert all(a["x"] == "1" for _, a, _ in points(out, "cpu")) and len(points(out, "cpu")) == 6
    proc, _ = make([{"include": "container.cpu.time", "action": "update", "new_name": "cpu",
                     "experimental_match_labels": {"cpu.mode": "steal"}, "operations": ops}])
    d = data()
    assert points(proc.process(d)) == points(d)


def test_experimental_match_labels_bad_regexp_is_a_config_error():
    problems: list[str] = []
    validate_component(factory, {"transforms": [{"include": "a", "match_type": "regexp", "action": "update",
                                                 "experimental_match_labels": {"k": "("}}]},
                       "processors::metricstransform", problems)
    assert len(problems) == 1 and "experimental_match_labels k '(' is not a valid regular expression" in problems[0]


def test_version_placeholder_in_new_values():
    """The collector README: "When adding or updating a label value, {{version}} will be replaced with this
    collector's version number". It was set literally."""
    from podmeter import __version__

    proc, _ = make([{"include": "container.memory.usage", "action": "update", "operations": [
        {"action": "add_label", "new_label": "version", "new_value": "podmeter {{version}}"}]},
        {"include": "container.cpu.time", "action": "update", "operations": [
            {"action": "update_label", "label": "cpu.mode",
             "value_actions": [{"value": "user", "new_value": "user-{{version}}"}]}]}])
    out = proc.process(data())
    assert points(out, "container.memory.usage")[0][1]["version"] == f"podmeter {__version__}"
    assert f"user-{__version__}" in {a["cpu.mode"] for _, a, _ in points(out, "container.cpu.time")}


@pytest.mark.parametrize("snippet, message", [
    # testdata/config_full.yaml of old collectors: the deprecated metric_name
    ("metricstransform:\n  transforms:\n    - metric_name: old_name\n      action: update\n      new_name: new_name\n",
     "processors::metricstransform::transforms::0::metric_name: the collector's deprecated form of include: "
     "write include: <name>"),
    # README "Group Metrics"
    ("metricstransform:\n  transforms:\n    - include: ^k8s\\.pod\\.(.*)$$\n      match_type: regexp\n"
     "      action: group\n      group_resource_labels: {\"resouce.type\": \"k8s.pod\", \"source\": \"kubelet\"}\n",
     "processors::metricstransform::transforms::0::group_resource_labels: action group is not supported"),
])
def test_collector_features_podmeter_has_not_are_refused_with_a_hint(tmp_path, snippet, message):
    rc, err = validate_cli(tmp_path, snippet)
    assert rc == 2 and message in err, err
