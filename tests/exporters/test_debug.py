"""debug exporter: what it writes, through the agent's real log setup (podmeter.cli.setup_logging)."""

from __future__ import annotations

import json
import logging

import pytest
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Metric,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from exporters.debug import factory
from podmeter.cli import setup_logging
from podmeter.config import validate_component


@pytest.fixture
def agent_logging():
    """The agent's log setup for one test (it replaces the root handlers; pytest's are put back after)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield setup_logging
    root.handlers[:], level = saved
    root.setLevel(level)


def _exponential_batch() -> MetricsData:
    from opentelemetry.sdk.metrics._internal.point import Buckets

    p = ExponentialHistogramDataPoint(
        attributes={"hw.gpu.task": "general"}, start_time_unix_nano=1, time_unix_nano=2, count=3, sum=4.5, scale=1,
        zero_count=0, positive=Buckets(2, [1, 2]), negative=Buckets(0, []), flags=0, min=0.5, max=3.0)
    m = Metric("gpu.kernel.duration", "Kernel time", "s",
               ExponentialHistogram([p], AggregationTemporality.CUMULATIVE))
    return MetricsData([ResourceMetrics(Resource({"hw.id": "GPU-0"}),
                                        [ScopeMetrics(InstrumentationScope("test"), [m], "")], "")])


def test_detailed_lists_every_kind_of_point(kit, agent_logging, capfd):
    """An exponential histogram (no bucket_counts) raised AttributeError: the whole batch failed, nothing shown.
    An explicit histogram's buckets were listed without their bounds."""
    agent_logging("info")
    exp, _ = kit.make(factory, {"verbosity": "detailed"})
    assert exp.export(_exponential_batch()).name == "SUCCESS"
    assert exp.export(kit.batch([1])).name == "SUCCESS"
    err = capfd.readouterr().err
    assert "gpu.kernel.duration (ExponentialHistogram, s) points=1" in err
    assert "{hw.gpu.task=general} count=3 sum=4.5 scale=1 zero_count=0 positive(offset=2)=[1, 2]" in err
    assert "{} count=6 sum=1.05 bounds=[0.001, 0.01] buckets=[1, 2, 3]" in err
    assert "{cpu.mode=user} 11.0" in err


def test_listing_follows_the_agents_log_encoding_and_level(kit, agent_logging, capfd):
    """normal/detailed wrote straight to stderr: with `logs::encoding: json` stderr held lines that are not JSON
    (a log shipper parsing it failed on each), and `--log-level warn` did not silence them."""
    agent_logging("info", "json")
    exp, _ = kit.make(factory, {"verbosity": "detailed"})
    exp.export(kit.batch([1, 2]))
    lines = capfd.readouterr().err.splitlines()
    records = [json.loads(line) for line in lines]  # a line that is not JSON fails here
    assert any("container.cpu.time (Sum, s) points=2" in r["msg"] and "{cpu.mode=user} 21.0" in r["msg"]
               for r in records), records

    agent_logging("warn")
    exp.export(kit.batch([3]))
    assert capfd.readouterr().err == ""


def test_verbosity_is_read_case_insensitively_as_the_collector():
    problems: list[str] = []
    config = validate_component(factory, {"verbosity": "Detailed"}, "exporters::debug", problems)
    assert problems == [] and config.verbosity == "detailed"
    validate_component(factory, {"verbosity": "loud"}, "exporters::debug", problems)
    assert problems == ["exporters::debug::verbosity: Input should be 'basic', 'normal' or 'detailed' (got 'loud')"]
