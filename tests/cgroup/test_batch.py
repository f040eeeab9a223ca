"""The receiver's lean batch builds the same MetricsData as podmeter.metrics.MetricsBuilder."""

from __future__ import annotations

from podmeter.metrics import MetricsBuilder, MetricSpec
from receivers.cgroup.batch import Batch

SUM = MetricSpec("container.cpu.time", "sum", "s", "cpu", ("cpu.mode",))
GAUGE = MetricSpec("container.memory.usage", "gauge", "By", "mem")
OFF = MetricSpec("container.memory.rss", "gauge", "By", "rss", enabled=False)


def _shape(data):
    return sorted(
        (tuple(sorted(rm.resource.attributes.items())), sm.scope.name, m.name, m.unit, type(m.data).__name__,
         getattr(m.data, "is_monotonic", None), tuple(sorted(p.attributes.items())), p.value, p.start_time_unix_nano)
        for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics for p in m.data.data_points)


def test_same_output_as_metrics_builder():
    a, b = {"k8s.pod.uid": "u1", "container.id": "c1"}, {"k8s.pod.uid": "u2"}
    batch, builder = Batch("podmeter/receiver/cgroup", 123), MetricsBuilder("podmeter/receiver/cgroup", 123)
    for target in (batch, builder):
        target.add(SUM, 1.5, {"cpu.mode": "user"}, a)
        target.add(SUM, 0.5, {"cpu.mode": "system"}, a)
        target.add(GAUGE, 42, None, a)
        target.add(GAUGE, None, None, a)
        target.add(OFF, 7, None, a)
        target.add(GAUGE, 9, None, b)
        target.add(SUM, 2.0, {"cpu.mode": "user"}, dict(a))  # an equal resource given as another dict: same bucket
    assert _shape(batch.build()) == _shape(builder.build())
    assert len(batch.build().resource_metrics) == 2
