"""Shared helpers for the exporter tests: building components directly and batches like a receiver's."""

from __future__ import annotations

import logging

import pytest

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.metrics import MetricsBuilder, MetricSpec
from podmeter.telemetry import ComponentTelemetry, Telemetry

CPU = MetricSpec("container.cpu.time", "sum", "s", "CPU time by mode", attributes=("cpu.mode",))
MEM = MetricSpec("container.memory.usage", "updowncounter", "By", "Memory in use")
UTIL = MetricSpec("hw.gpu.utilization", "gauge", "1", "GPU utilization", attributes=("hw.gpu.task",))
LAT = MetricSpec("k8s.pod.run_queue.latency", "histogram", "s", "Run queue latency")
START_NS = 1_700_000_000_000_000_000
FAST = {"initial_interval": "50ms", "max_interval": "200ms", "max_elapsed_time": "20s"}  # retries a test can wait for


def pod_resource(i: int) -> dict:
    return {"k8s.pod.uid": f"uid-{i}", "k8s.pod.name": f"pod-{i}", "k8s.namespace.name": "ml",
            "container.id": f"{i:064x}", "k8s.container.name": "train", "host.name": "node-1",
            "k8s.pod.label.app": "trainer"}


def batch(pods, scope: str = "podmeter/receiver/cgroup", step: int = 1):
    """One collection for pods `pods` (ints): values derived from the pod number and `step`."""
    b = MetricsBuilder(scope, START_NS)
    for i in pods:
        r = pod_resource(i)
        b.add(CPU, 10.0 * i + step, {"cpu.mode": "user"}, resource=r)
        b.add(CPU, 1.0 * i + step, {"cpu.mode": "system"}, resource=r)
        b.add(MEM, 1_048_576 * (i + 1), resource=r)
        b.add(UTIL, 0.25 * (i % 4), {"hw.gpu.task": "general"}, resource=r)
        b.add_histogram(LAT, [1, 2, 3], [0.001, 0.01], total=0.05 + i, resource=r)
    return b.build()


def make(factory, config: dict, name: str = ""):
    """Create (not start) a component of `factory` with `config`; returns (component, telemetry registry)."""
    telemetry = Telemetry()
    cid = ComponentID(factory.type, name)
    logger = logging.getLogger(f"test.{cid}")
    settings = CreateSettings(id=cid, kind=factory.kind, logger=logger,
                              telemetry=ComponentTelemetry(telemetry, str(cid), logger))
    return factory.create(settings, factory.config_model.model_validate(config)), telemetry


def sample(telemetry: Telemetry, name: str, **labels) -> float:
    value = telemetry.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.fixture
def host():
    return Host()


@pytest.fixture
def make_exporter(host):
    """make_exporter(factory, **config) -> (started exporter, telemetry): fast retries, one consumer unless
    `config` says otherwise; each is shut down after the test."""
    made = []

    def start(factory, **config):
        exp, telemetry = make(factory, {"retry_on_failure": FAST, "sending_queue": {"num_consumers": 1}, **config})
        exp.start(host)
        made.append(exp)
        return exp, telemetry

    yield start
    for exp in made:
        exp.shutdown(timeout_millis=2000)


@pytest.fixture
def kit():
    """This module's helpers (make, batch, sample, ...): test files cannot import conftest by name."""
    import sys

    return sys.modules[__name__]
