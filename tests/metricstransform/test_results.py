"""metricstransform: what the collector's processor does with results it would not send on (a metric all of whose
points were deleted, sums of different temporalities combined, an empty submatch), checked on MetricsData built
the way receivers build it."""

from __future__ import annotations

from dataclasses import replace

from metricstransform.test_metricstransform import RES, _names, _one, data, make, points
from opentelemetry.sdk.metrics.export import AggregationTemporality, MetricsData, ResourceMetrics, ScopeMetrics

from podmeter.metrics import MetricsBuilder, MetricSpec

DROP_SDA = {"action": "delete_label_value", "label": "device", "label_value": "sda"}


def test_a_metric_whose_points_are_all_deleted_is_dropped():
    """The collector drops a metric its operations emptied (transformMetric returns false): sent on, it would be a
    metric with no points in every OTLP request."""
    proc, settings = make([
        {"include": "container.disk.read", "action": "update", "operations": [DROP_SDA]},
        {"include": "container.disk.write", "action": "insert", "new_name": "disk_write_copy",
         "operations": [DROP_SDA]},
    ])
    names = _names(proc.process(data()))
    assert "container.disk.read" not in names  # updated to nothing: gone
    assert "disk_write_copy" not in names and "container.disk.write" in names  # no empty copy; original kept
    assert "container.memory.usage" in names and not settings.telemetry.failing()

    proc, _ = make([{"include": r"^container\.disk\.(?P<direction>\w+)$", "match_type": "regexp",
                     "action": "combine", "new_name": "container.disk.io", "operations": [DROP_SDA]}])
    names = _names(proc.process(data()))
    assert not any(n.startswith("container.disk") for n in names)
    assert "container.cpu.time" in names


def test_a_metric_that_had_no_points_is_still_renamed():
    """Only a metric the operations emptied goes; one that came without points passes, as in the collector."""
    md = data()
    rm = md.resource_metrics[0]
    sm = rm.scope_metrics[0]
    metrics = [replace(m, data=replace(m.data, data_points=[])) if m.name == "container.disk.read" else m
               for m in sm.metrics]
    md = MetricsData([ResourceMetrics(rm.resource, [ScopeMetrics(sm.scope, metrics, "")], "")])
    proc, _ = make([{"include": "container.disk.read", "action": "update", "new_name": "disk_read",
                     "operations": [DROP_SDA]}])
    assert "disk_read" in _names(proc.process(md))


def test_the_scope_of_a_batch_emptied_by_operations_still_goes_on():
    """Every metric dropped: the receiver's scope still goes on, empty, as MetricsBuilder's marker of "nothing now"
    (exporters drop that scope's previous series)."""
    spec = MetricSpec("g", "gauge", "1", "g", attributes=("device",))
    proc, _ = make([{"include": "g", "action": "update", "operations": [DROP_SDA]}])
    out = proc.process(_one(spec, [(1, {"device": "sda"})]))
    assert [len(sm.metrics) for rm in out.resource_metrics for sm in rm.scope_metrics] == [0]


def test_combine_refuses_sums_of_different_temporalities():
    """The collector's canBeCombined: a delta and a cumulative sum under one name would mean different things."""
    md = data()
    rm = md.resource_metrics[0]
    sm = rm.scope_metrics[0]
    metrics = [replace(m, data=replace(m.data, aggregation_temporality=AggregationTemporality.DELTA))
               if m.name == "container.disk.write" else m for m in sm.metrics]
    md = MetricsData([ResourceMetrics(rm.resource, [ScopeMetrics(sm.scope, metrics, "")], "")])
    proc, settings = make([{"include": r"^container\.disk\.(?P<direction>\w+)$", "match_type": "regexp",
                            "action": "combine", "new_name": "container.disk.io"}])
    names = _names(proc.process(md))
    assert "container.disk.io" not in names
    assert {"container.disk.read", "container.disk.write"} <= set(names)
    assert "transform" in settings.telemetry.failing()


def test_combine_sets_no_attribute_from_an_empty_submatch():
    """The collector puts a group's match on the points only when it is not empty: an empty one neither adds an
    empty-valued attribute nor overwrites the one the points have."""
    spec_a = MetricSpec("net.io", "sum", "By", "io", attributes=("direction",))
    spec_b = MetricSpec("net.io.receive", "sum", "By", "received")
    b = MetricsBuilder("podmeter/receiver/test", 1)
    b.add(spec_a, 5, {"direction": "transmit"}, resource=RES)
    b.add(spec_b, 7, resource=RES)
    proc, settings = make([{"include": r"^net\.io\.?(?P<direction>\w*)$", "match_type": "regexp",
                            "action": "combine", "new_name": "network.io"}])
    out = points(proc.process(b.build()), "network.io")
    assert sorted((a["direction"], v) for _, a, v in out) == [("receive", 7), ("transmit", 5)]
    assert not settings.telemetry.failing()


def test_toggle_scalar_data_type_passes_a_histogram_on_renamed():
    """The collector's toggle leaves a histogram alone (it has no scalar type) and the transform goes on: one
    regexp transform renaming a family of metrics renames its histograms too."""
    proc, settings = make([{"include": r"^(lat|container\.memory\.usage)$", "match_type": "regexp",
                            "action": "update", "new_name": "app.${1}",
                            "operations": [{"action": "toggle_scalar_data_type"}]}])
    names = _names(proc.process(data()))
    assert {"app.lat", "app.container.memory.usage"} <= set(names) and "lat" not in names
    assert not settings.telemetry.failing()
