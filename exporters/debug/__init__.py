"""debug exporter: writes what reaches it to the log, like the collector's debug exporter."""

from __future__ import annotations

import sys
from typing import Literal

from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData
from pydantic import Field

from podmeter.component import Exporter, Factory, Stability
from podmeter.config import ComponentConfig
from podmeter.metrics import count_points


class DebugConfig(ComponentConfig):
    verbosity: Literal["basic", "normal", "detailed"] = Field(
        "basic", description="basic: counts; normal: one line per metric; detailed: every data point")


class DebugExporter(Exporter):
    def __init__(self, settings, config: DebugConfig, stream=None) -> None:
        super().__init__()
        self.logger = settings.logger
        self.verbosity = config.verbosity
        self.stream = stream

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        n_metrics = sum(len(sm.metrics) for rm in metrics_data.resource_metrics for sm in rm.scope_metrics)
        self.logger.info("MetricsExporter resource metrics: %d, metrics: %d, data points: %d",
                         len(metrics_data.resource_metrics), n_metrics, count_points(metrics_data))
        if self.verbosity != "basic":
            (self.stream or sys.stderr).write(render(metrics_data, self.verbosity == "detailed"))
        return MetricExportResult.SUCCESS


def render(data: MetricsData, detailed: bool) -> str:
    lines = []
    for i, rm in enumerate(data.resource_metrics):
        attrs = ", ".join(f"{k}={v}" for k, v in sorted(rm.resource.attributes.items()))
        lines.append(f"ResourceMetrics #{i} {{{attrs}}}")
        for sm in rm.scope_metrics:
            lines.append(f"  ScopeMetrics {sm.scope.name} {sm.scope.version or ''}".rstrip())
            for m in sm.metrics:
                kind = type(m.data).__name__
                lines.append(f"    {m.name} ({kind}, {m.unit or '-'}) points={len(m.data.data_points)}")
                if detailed:
                    for p in m.data.data_points:
                        pattrs = ", ".join(f"{k}={v}" for k, v in sorted(p.attributes.items()))
                        value = getattr(p, "value", None)
                        if value is None:
                            value = f"count={p.count} sum={p.sum} buckets={list(p.bucket_counts)}"
                        lines.append(f"      {{{pattrs}}} {value}")
    return "\n".join(lines) + "\n"


factory = Factory(kind="exporter", type="debug", config_model=DebugConfig, create=DebugExporter,
                  stability=Stability.DEVELOPMENT, description="Writes metrics to the log for debugging")
