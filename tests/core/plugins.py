"""Test plug-ins for the core's tests: a counting receiver, processors and exporters that record, fail or hang.

They register through `registry().register()`, exactly as entry-point factories do once loaded; they are the
core's own test subjects (the runtime is real), not stand-ins for real parts.
"""

from __future__ import annotations

import json
import threading
import time

from opentelemetry.sdk.metrics.export import MetricExportResult
from pydantic import Field

from podmeter.component import (
    ComponentUnavailable,
    Exporter,
    Factory,
    Processor,
    Receiver,
    RestartRequired,
    registry,
)
from podmeter.config import ComponentConfig, ScraperConfig
from podmeter.metrics import MetricsBuilder, MetricSpec, iter_points, now_ns, with_resource

VALUE = MetricSpec("test.value", "gauge", "1", "Collections so far")
RECORDS: dict[str, list] = {}


class CounterConfig(ScraperConfig):
    unavailable: str = ""
    fail_start: bool = False
    hang_start: bool = False  # start() never returns, as nvmlInit on a GPU in a bad state
    # its metadata (here: the namespace) arrives this long after start, as a CRI cache whose first sync failed
    sync_delay: float = 0.0
    fail_every: int = 0
    restart_after: int = 0  # from this collection on, raise RestartRequired (a driver replaced under the agent)
    pods: int = Field(1, ge=0)
    namespace: str = "default"


class CounterReceiver(Receiver):
    def __init__(self, settings, config: CounterConfig) -> None:
        self.settings, self.config, self.calls = settings, config, 0
        self.start_ns = now_ns()
        self.synced = threading.Event()

    def start(self, host) -> None:
        if self.config.unavailable:
            raise ComponentUnavailable(self.config.unavailable)
        if self.config.fail_start:
            raise RuntimeError("cannot start")
        if self.config.hang_start:
            threading.Event().wait()
        timer = threading.Timer(self.config.sync_delay, self.synced.set)
        timer.daemon = True
        timer.start()

    def ready(self, timeout: float) -> bool:
        return self.synced.wait(timeout)

    def collect(self):
        self.calls += 1
        if self.config.fail_every and self.calls % self.config.fail_every == 0:
            raise OSError("flaky source")
        if self.config.restart_after and self.calls >= self.config.restart_after:
            raise RestartRequired("the driver was replaced under the agent")
        b = MetricsBuilder(f"podmeter/receiver/{self.settings.id}", self.start_ns)
        for i in range(self.config.pods):
            b.add(VALUE, self.calls, resource={"k8s.pod.uid": f"uid-{i}", "k8s.pod.name": f"pod-{i}",
                                               "k8s.namespace.name": self.config.namespace
                                               if self.synced.is_set() else "(not synced)"})
        return b.build()


class TagConfig(ComponentConfig):
    key: str = "tagged"
    value: str = "yes"
    fail: bool = False


class TagProcessor(Processor):
    def __init__(self, settings, config: TagConfig) -> None:
        self.config = config
        self.pipeline = settings.pipeline

    def process(self, data):
        if self.config.fail:
            raise ValueError("processor bug")
        from opentelemetry.sdk.metrics.export import MetricsData

        return MetricsData([with_resource(rm, {**rm.resource.attributes, self.config.key: self.config.value,
                                               "pipeline": self.pipeline}) for rm in data.resource_metrics])


class RecordConfig(ComponentConfig):
    name: str = "default"
    path: str = ""
    fail: bool = False
    hang: bool = False
    delay: float = 0.0


class RecordExporter(Exporter):
    def __init__(self, settings, config: RecordConfig) -> None:
        super().__init__()
        self.config = config
        self.records = RECORDS.setdefault(config.name, [])
        self.release = threading.Event()

    def export(self, metrics_data, timeout_millis=10_000, **kwargs):
        if self.config.hang:
            self.release.wait()
        if self.config.delay:
            time.sleep(self.config.delay)
        if self.config.fail:
            raise ConnectionError("backend down")
        points = [(rm.resource.attributes.get("k8s.pod.uid"), m.name, p.value,
                   rm.resource.attributes.get("pipeline")) for rm, _, m, p in iter_points(metrics_data)]
        self.records.append(points)
        if self.config.path:
            with open(self.config.path, "a") as f:
                f.write(json.dumps(points) + "\n")
        return MetricExportResult.SUCCESS


FACTORIES = [
    Factory("receiver", "counter", CounterConfig, CounterReceiver),
    Factory("processor", "tag", TagConfig, TagProcessor),
    Factory("exporter", "record", RecordConfig, RecordExporter),
]


def register() -> None:
    for f in FACTORIES:
        registry().register(f)


if __name__ == "__main__":  # the CLI with the test plug-ins loaded, for subprocess tests
    import sys

    register()
    from podmeter.cli import main

    sys.exit(main(sys.argv[1:]))
