"""Every receiver's metrics, together: one name has one meaning wherever it comes from, and the names the OTel
semantic conventions define are emitted as the conventions define them.

The semantic-convention tables below are copied from the registry (open-telemetry/semantic-conventions,
model/container/metrics.yaml, model/k8s/metrics.yaml, model/hardware/{gpu,common}-metrics.yaml,
model/system/metrics.yaml, model/process/metrics.yaml and the attribute registries); the points are checked on
what real receivers emit (the cgroup receiver on the fixture cgroup tree, the nvml receiver on the fake
libnvidia-ml.so.1, the one test double, as no NVIDIA GPU can run here).
"""

from __future__ import annotations

import logging
import os
import shutil

import pytest
from cgroup.helpers import make_receiver as make_cgroup_receiver
from cgroup.layouts import all_layouts, build
from harness import require
from opentelemetry.sdk.metrics.export import Gauge, Sum

from podmeter.component import registry

RECEIVERS = ("cgroup", "nvml", "ebpf", "cri", "podresources")

# name -> (instrument, unit, the point attributes the convention gives it)
SEMCONV = {
    # model/container/metrics.yaml
    "container.cpu.time": ("sum", "s", {"cpu.mode"}),
    "container.cpu.usage": ("gauge", "{cpu}", {"cpu.mode"}),
    "container.disk.io": ("sum", "By", {"disk.io.direction", "system.device"}),
    "container.filesystem.usage": ("updowncounter", "By", set()),
    "container.memory.paging.faults": ("sum", "{fault}", {"system.paging.fault.type"}),
    # model/k8s/metrics.yaml
    "k8s.pod.cpu.time": ("sum", "s", set()),
    "k8s.pod.cpu.usage": ("gauge", "{cpu}", set()),
    "k8s.pod.memory.paging.faults": ("sum", "{fault}", {"system.paging.fault.type"}),
    "k8s.pod.network.io": ("sum", "By", {"network.interface.name", "network.io.direction"}),
    "k8s.pod.network.errors": ("sum", "{error}", {"network.interface.name", "network.io.direction"}),
    # model/hardware/gpu-metrics.yaml
    "hw.gpu.io": ("sum", "By", {"network.io.direction"}),
    "hw.gpu.memory.limit": ("updowncounter", "By", set()),
    "hw.gpu.memory.usage": ("updowncounter", "By", set()),
    "hw.gpu.memory.utilization": ("gauge", "1", set()),
    "hw.gpu.utilization": ("gauge", "1", {"hw.gpu.task"}),
    # model/hardware/common-metrics.yaml (hw.id, hw.type on the resource)
    "hw.energy": ("sum", "J", set()),
    "hw.errors": ("sum", "{error}", {"error.type"}),
    "hw.power": ("gauge", "W", set()),
    "hw.status": ("updowncounter", "1", {"hw.state"}),
}
# Memory in use is a gauge here, as the collector's kubeletstats and docker_stats receivers emit it, where the
# conventions disagree with themselves (container.memory.usage a counter, k8s.pod.memory.usage a gauge, the
# working set and RSS updowncounters); receivers/cgroup/README.md says so.
MEMORY_GAUGES = {f"{level}.memory.{kind}" for level in ("container", "k8s.pod") for kind in ("usage", "working_set",
                                                                                             "rss")}
# Where a metric is named after a semantic-convention one, the style's units: process.context_switches
# ({context_switch}), system.network.packet.count / .dropped ({packet}), system.disk.operations ({operation}).
STYLE_UNITS = {
    "container.context_switches": "{context_switch}",
    "k8s.pod.network.packet.count": "{packet}",
    "k8s.pod.network.packet.dropped": "{packet}",
    "container.disk.operations": "{operation}",
    "k8s.pod.disk.operations": "{operation}",
}
# model/*/registry.yaml: the values an enumerated attribute may take (cpu.mode: `kernel` is deprecated for system)
ENUMS = {
    "cpu.mode": {"user", "system", "nice", "idle", "iowait", "interrupt", "steal"},
    "disk.io.direction": {"read", "write"},
    "network.io.direction": {"receive", "transmit"},
    "system.paging.fault.type": {"major", "minor"},
    "process.context_switch.type": {"voluntary", "involuntary"},
    "hw.state": {"degraded", "failed", "needs_cleaning", "ok", "predicted_failure"},
    # semconv's decoder, encoder, general (per-process too: NVML's SM utilization is `general`)
    "hw.gpu.task": {"decoder", "encoder", "general"},
    "error.type": {"corrected", "uncorrected"},
}


def all_specs():
    for type_ in RECEIVERS:
        factory = registry().get("receiver", type_)
        assert factory is not None, type_
        for spec in factory.metrics:
            yield type_, spec


def test_a_metric_name_has_one_instrument_and_unit_across_receivers():
    """The cri receiver can emit what the cgroup receiver does (where cgroups cannot be read): a backend given
    `container.memory.usage` as a gauge by one and as a sum by the other sees two types under one name."""
    seen: dict[str, tuple[str, str, str]] = {}
    clashes = []
    for type_, spec in all_specs():
        shape = (spec.instrument, spec.unit)
        first = seen.setdefault(spec.name, (*shape, type_))
        if first[:2] != shape:
            clashes.append(f"{spec.name}: {first[2]} {first[:2]}, {type_} {shape}")
    assert not clashes, clashes
    assert {"container.memory.usage", "container.cpu.time"} <= seen.keys()


def test_semantic_convention_metrics_have_the_conventions_shape():
    declared = {}
    for type_, spec in all_specs():
        declared.setdefault(spec.name, []).append((type_, spec))
        if spec.name in SEMCONV:
            instrument, unit, attributes = SEMCONV[spec.name]
            assert (spec.instrument, spec.unit) == (instrument, unit), f"{type_} {spec.name}"
            # a convention's attributes only; cpu.mode may be left out (all points with a mode, or none), and the
            # pod's CPU time has it as the container's does (semconv gives k8s.pod.cpu.time none)
            assert set(spec.attributes) - {"cpu.mode"} <= attributes, f"{type_} {spec.name}: {spec.attributes}"
            assert attributes - {"cpu.mode"} <= set(spec.attributes), f"{type_} {spec.name}: {spec.attributes}"
        if spec.name in MEMORY_GAUGES:
            assert (spec.instrument, spec.unit) == ("gauge", "By"), f"{type_} {spec.name}"
        if spec.name in STYLE_UNITS:
            assert spec.unit == STYLE_UNITS[spec.name], f"{type_} {spec.name}: {spec.unit}"
    # every one of them is emitted by some receiver, under the convention's name
    assert (SEMCONV.keys() | MEMORY_GAUGES | STYLE_UNITS.keys()) <= declared.keys()


def test_one_concept_one_name_across_receivers():
    """Names that differ from a receiver to another for the same measurement would split a dashboard's query."""
    names = {spec.name for _t, spec in all_specs()}
    # the CPU, memory and network of a container or pod: the cgroup receiver's names, which cri reuses
    for type_, spec in all_specs():
        if type_ == "cri" and spec.name.startswith(("container.cpu", "container.memory", "k8s.pod.")):
            assert spec.name in {s.name for t, s in all_specs() if t == "cgroup"}, spec.name
    # no semantic-convention name under an old or misspelled form
    for old in ("container.cpu.utilization", "k8s.pod.network.io.bytes", "container.memory.working_set_bytes",
                "gpu.utilization", "gpu.memory.usage", "hw.gpu.power", "k8s.pod.memory.major_page_faults"):
        assert old not in names, old
    # the ebpf receiver's OOM kills are the cgroup receiver's metric, same name and unit
    ebpf = {s.name: s for t, s in all_specs() if t == "ebpf"}
    assert ebpf["container.memory.oom.kills"].unit == "{process}"


def _check_points(data, specs: dict, where: str) -> set[str]:
    """Every point's metric is declared, with its instrument, unit, attribute keys and semconv values; returns the
    names seen."""
    seen = set()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                spec = specs.get(m.name)
                assert spec is not None, f"{where}: {m.name} is emitted but not declared"
                seen.add(m.name)
                assert m.unit == spec.unit, m.name
                if spec.instrument == "gauge":
                    assert isinstance(m.data, Gauge), m.name
                else:
                    assert isinstance(m.data, Sum), m.name
                    assert m.data.is_monotonic == (spec.instrument == "sum"), m.name
                for p in m.data.data_points:
                    assert set(p.attributes) <= set(spec.attributes), f"{m.name}: {dict(p.attributes)}"
                    for k, v in p.attributes.items():
                        if k in ENUMS:
                            assert v in ENUMS[k], f"{m.name}: {k}={v!r}"
                    if spec.unit == "By" or spec.unit.startswith("{") and spec.unit != "{cpu}":
                        # bytes and counts of things are integers (semconv's value type int; CPUs are an average)
                        assert isinstance(p.value, int), f"{m.name}: {p.value!r}"
    return seen


def test_cgroup_points_are_what_the_catalog_says(tmp_path):
    layout = next(lay for lay in all_layouts() if lay.name == "v2-systemd-containerd")
    root = build(str(tmp_path), layout)
    receiver = make_cgroup_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    try:
        receiver.collect()
        data = receiver.collect()  # the second one has CPU usage too
    finally:
        receiver.shutdown()
    specs = {s.name: s for t, s in all_specs() if t == "cgroup"}
    seen = _check_points(data, specs, "cgroup")
    assert {"container.cpu.time", "container.memory.working_set", "container.disk.io",
            "container.memory.paging.faults", "k8s.pod.cpu.time"} <= seen
    declared = set(registry().get("receiver", "cgroup").resource_attributes)
    for rm in data.resource_metrics:
        assert set(rm.resource.attributes) <= declared, dict(rm.resource.attributes)


def test_nvml_points_are_what_the_catalog_says(tmp_path, monkeypatch):
    require(shutil.which("gcc") is not None, "needs gcc to build the fake libnvidia-ml.so.1")
    from harness.fake_nvml import GPU, Process, Scenario, build_fake_nvml

    from podmeter.component import ComponentID, CreateSettings, Host
    from podmeter.telemetry import null_component_telemetry
    from receivers.nvml import factory

    path = str(tmp_path / "scenario.txt")
    # this test's own process stands for a process on the GPU (NVML reports host PIDs; /proc has this one)
    Scenario(gpus=[GPU(uuid="GPU-00000000-1111-2222-3333-444444444444", mem_used=1 << 30, util_gpu=30,
                       ecc_corr=1, pcie_tx=10, pcie_rx=20, throttle=4)],
             processes=[Process(pid=os.getpid(), used_mem=1 << 20, sm=30, mem=10)]).write(path)
    monkeypatch.setenv("FAKE_NVML_SCENARIO", path)
    telemetry = null_component_telemetry("nvml", logging.getLogger("podmeter.nvml.test"))
    settings = CreateSettings(id=ComponentID("nvml"), kind="receiver", logger=telemetry.logger, telemetry=telemetry)
    receiver = factory.create(settings, factory.config_model.model_validate({"library_path": build_fake_nvml()}))
    receiver.start(Host())
    try:
        data = receiver.collect()
    finally:
        receiver.shutdown()
    specs = {s.name: s for t, s in all_specs() if t == "nvml"}
    seen = _check_points(data, specs, "nvml")
    assert {"hw.gpu.utilization", "hw.gpu.memory.usage", "hw.gpu.io", "hw.errors", "hw.status", "hw.energy",
            "hw.power", "process.gpu.memory.usage", "process.gpu.utilization"} <= seen
    for rm in data.resource_metrics:
        res = dict(rm.resource.attributes)
        assert res["hw.type"] == "gpu" and res["hw.id"].startswith("GPU-"), res
        assert set(res) <= set(factory.resource_attributes), res


@pytest.mark.parametrize("type_", RECEIVERS)
def test_declared_attributes_are_namespaced(type_):
    """Attribute keys are dotted OTel-style names (a bare `direction` or `interface`, as kubeletstats once wrote,
    is not one)."""
    for spec in registry().get("receiver", type_).metrics:
        for a in spec.attributes:
            assert "." in a and a == a.lower(), f"{spec.name}: {a}"
