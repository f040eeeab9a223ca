"""resource, metricstransform and filter never change the batch they are given. The runtime hands one receiver's
batch, the same objects, to every pipeline the receiver is in, and receivers (cgroup, nvml) hand the same Resource
objects on collection after collection: a processor that changed them in place would put one pipeline's changes
into another pipeline's exporter, and into the next collections. Checked on the real cgroup receiver over a
fixture tree, once processor by processor and once through the real runtime with a real prometheus exporter per
pipeline."""

from __future__ import annotations

import json
import logging
import textwrap
import time
import urllib.request

from cgroup.helpers import make_receiver
from cgroup.layouts import all_layouts, build
from harness import free_port, wait_for

from podmeter.component import ComponentID, CreateSettings
from podmeter.config import load
from podmeter.runtime import Service
from podmeter.telemetry import ComponentTelemetry, Telemetry

RESOURCE = {"attributes": [
    {"key": "k8s.cluster.name", "value": "a", "action": "upsert"},
    {"key": "k8s.pod.qos_class", "value": "changed", "action": "update"},
    {"key": "service.instance.id", "from_attribute": "k8s.pod.uid", "action": "insert"},
    {"key": "k8s.pod.uid", "action": "hash"},
    {"key": "container.id", "pattern": "^(?P<short>.{12})", "action": "extract"},
    {"key": "container.id", "action": "delete"},
]}
METRICSTRANSFORM = {"transforms": [
    {"include": "container.cpu.time", "action": "update", "new_name": "cpu_a", "operations": [
        {"action": "add_label", "new_label": "pipeline", "new_value": "a"},
        {"action": "update_label", "label": "cpu.mode", "new_label": "mode",
         "value_actions": [{"value": "user", "new_value": "usr"}]},
        {"action": "copy_resource_attribute", "resource_attribute": "k8s.pod.uid", "new_label": "uid"},
        {"action": "experimental_scale_value", "experimental_scale": 1000},
        {"action": "toggle_scalar_data_type"}]},
    {"include": "container.disk.io", "action": "update", "operations": [
        {"action": "aggregate_labels", "label_set": ["disk.io.direction"], "aggregation_type": "sum"},
        {"action": "delete_label_value", "label": "disk.io.direction", "label_value": "write"}]},
    {"include": "container.memory.rss", "action": "insert", "new_name": "rss_copy", "operations": [
        {"action": "copy_label", "label": "nope", "new_label": "x"}]},
    {"include": "container.disk.operations", "action": "update", "operations": [
        {"action": "aggregate_label_values", "label": "system.device", "aggregated_values": ["vda", "253:7"],
         "new_value": "all", "aggregation_type": "max"},
        {"action": "delete_label", "label": "disk.io.direction", "aggregation_type": "sum"}]},
    {"include": r"^container\.cpu\.throttling_data\.(?P<what>\w*periods)$", "match_type": "regexp",
     "action": "combine", "new_name": "periods", "aggregation_type": "sum"},
]}
FILTER = {"metrics": {"exclude": {"match_type": "regexp", "metric_names": ["^k8s\\.pod\\.", "pressure"]}}}


def _snapshot(md) -> list:
    """Everything a processor could change in place: the objects and every value and attribute in them."""
    return [(rm.resource, dict(rm.resource.attributes), rm.schema_url, rm.scope_metrics, repr(rm.scope_metrics))
            for rm in md.resource_metrics]


def _same(before: list, after: list) -> bool:
    return len(before) == len(after) and all(
        b[0] is a[0] and b[1] == a[1] and b[2] == a[2] and b[3] is a[3] and b[4] == a[4]
        for b, a in zip(before, after, strict=True))


def _processor(kind: str, config: dict):
    import importlib

    factory = importlib.import_module(f"processors.{kind}").factory
    logger = logging.getLogger(f"test.{kind}")
    settings = CreateSettings(id=ComponentID(kind), kind="processor", logger=logger, pipeline="metrics/a",
                              telemetry=ComponentTelemetry(Telemetry(), kind, logger))
    return factory.create(settings, factory.config_model.model_validate(config))


def _layout():
    return next(lay for lay in all_layouts() if lay.name == "v2-cgroupfs-containerd")


def test_processors_leave_the_receivers_batch_as_it_was(tmp_path):
    root = build(str(tmp_path), _layout())
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    chain = [_processor("resource", RESOURCE), _processor("metricstransform", METRICSTRANSFORM),
             _processor("filter", FILTER)]
    outputs = []
    for _ in range(2):  # the second collection hands on the same Resource objects
        data = receiver.collect()
        before = _snapshot(data)
        out = data
        for proc in chain:
            given = _snapshot(out)
            result = proc.process(out)
            assert _same(given, _snapshot(out)), f"{type(proc).__name__} changed its input"
            out = result
        assert _same(before, _snapshot(data))
        outputs.append(sorted(sorted(rm.resource.attributes.items()) for rm in out.resource_metrics))
    # the processors did act (else the test proves nothing) ...
    names = {m.name for rm in out.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"cpu_a", "rss_copy", "periods", "container.memory.rss"} <= names and "container.cpu.time" not in names
    assert all(rm.resource.attributes.get("k8s.cluster.name") == "a" for rm in out.resource_metrics if rm.scope_metrics
               and rm.scope_metrics[0].metrics)
    # ... and the second collection's Resources (the same objects) came out as the first's
    assert outputs[0] == outputs[1]


def test_two_pipelines_sharing_the_cgroup_receiver_each_export_their_own(tmp_path):
    """Pipeline a renames, reshapes and filters; pipeline b, fed the same batches, exposes them untouched."""
    root = build(str(tmp_path), _layout())
    port_a, port_b = free_port(), free_port()
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        receivers:
          cgroup:
            collection_interval: 100ms
            initial_delay: 0s
            cgroup_root: {root}
            proc_root: {tmp_path / "noproc"}
        processors:
          resource: {json.dumps(RESOURCE)}
          metricstransform: {json.dumps(METRICSTRANSFORM)}
          filter: {json.dumps(FILTER)}
        exporters:
          prometheus/a:
            endpoint: 127.0.0.1:{port_a}
            resource_to_telemetry_conversion: {{enabled: true}}
          prometheus/b:
            endpoint: 127.0.0.1:{port_b}
            resource_to_telemetry_conversion: {{enabled: true}}
        service:
          telemetry: {{metrics: {{level: none}}}}
          pipelines:
            metrics/a: {{receivers: [cgroup], processors: [resource, metricstransform, filter],
                         exporters: [prometheus/a]}}
            metrics/b: {{receivers: [cgroup], exporters: [prometheus/b]}}
        """))
    # what pipeline b must show: the receiver's own output, through a prometheus exporter of its own
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))

    def scrape(port: int) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()

    def samples(text: str) -> set[str]:
        return {line for line in text.splitlines() if line and not line.startswith("#")}

    service = Service(load([str(path)], env={}))
    service.start()
    try:
        wait_for(lambda: "cpu_a" in scrape(port_a) and "container_cpu_time" in scrape(port_b), timeout=20,
                 what="both pipelines exported")
        # a few collections more, on the receiver's same Resource objects: nothing of a's may show in b
        for _ in range(5):
            time.sleep(0.1)  # spacing, about one collection interval (nothing is timed)
            a, b = scrape(port_a), scrape(port_b)
            assert "cluster_name" not in b and "service_instance_id" not in b and "short=" not in b
    finally:
        service.shutdown(timeout=5)
    expected = {line for line in samples(_exposition(receiver.collect())) if "pressure" not in line}
    assert expected <= samples(b)  # b: exactly the receiver's series (pressure values move with the kernel's)
    assert 'cpu_mode="user"' in b and "cpu_a" not in b and "rss_copy" not in b and "k8s_pod_cpu_time" in b
    assert 'k8s_cluster_name="a"' in a and 'mode="usr"' in a and "container_cpu_time" not in a
    assert not any(line.startswith("k8s_pod_") for line in samples(a))
    assert "pressure" not in a and 'container_id="' not in a


def _exposition(data) -> str:
    from exporters.prometheus import factory
    from podmeter.component import Host

    port = free_port()
    logger = logging.getLogger("test.prometheus")
    settings = CreateSettings(id=ComponentID("prometheus"), kind="exporter", logger=logger,
                              telemetry=ComponentTelemetry(Telemetry(), "prometheus", logger))
    exporter = factory.create(settings, factory.config_model.model_validate(
        {"endpoint": f"127.0.0.1:{port}", "resource_to_telemetry_conversion": {"enabled": True}}))
    exporter.start(Host())
    try:
        exporter.export(data)
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        exporter.shutdown()
