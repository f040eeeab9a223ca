"""debug exporter: writes what reaches it to the log, like the collector's debug exporter."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from opentelemetry.sdk.metrics.export import MetricExportResult, MetricsData
from pydantic import BeforeValidator, Field

from podmeter.component import Exporter, Factory, Stability
from podmeter.config import ComponentConfig
from podmeter.metrics import count_points


def _lower(value):
    # the collector reads verbosity case-insensitively (configtelemetry.Level): `Detailed` is `detailed`
    return value.lower() if isinstance(value, str) else value


class DebugConfig(ComponentConfig):
    verbosity: Annotated[Literal["basic", "normal", "detailed"], BeforeValidator(_lower)] = Field(
        "basic", description="basic: counts; normal: one line per metric; detailed: every data point")


class DebugExporter(Exporter):
    def __init__(self, settings, config: DebugConfig) -> None:
        super().__init__()
        self.logger = settings.logger
        self.verbosity = config.verbosity

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs) -> MetricExportResult:
        n_metrics = sum(len(sm.metrics) for rm in metrics_data.resource_metrics for sm in rm.scope_metrics)
        self.logger.info("MetricsExporter resource metrics: %d, metrics: %d, data points: %d",
                         len(metrics_data.resource_metrics), n_metrics, count_points(metrics_data))
        # through the agent's log, as the collector's (use_internal_logger): one record, so that it obeys the log
        # level and `logs::encoding: json` keeps every line of stderr JSON
        if self.verbosity != "basic" and self.logger.isEnabledFor(logging.INFO):
            self.logger.info("%s", render(metrics_data, self.verbosity == "detailed"))
        return MetricExportResult.SUCCESS


def _value(p) -> str:
    """A data point's value: the number, or a histogram's count, sum and buckets (with their bounds)."""
    value = getattr(p, "value", None)
    if value is not None:
        return str(value)
    if hasattr(p, "explicit_bounds"):
        return f"count={p.count} sum={p.sum} bounds={list(p.explicit_bounds)} buckets={list(p.bucket_counts)}"
    # an exponential histogram (no bucket_counts: it failed the whole export)
    return (f"count={p.count} sum={p.sum} scale={p.scale} zero_count={p.zero_count} "
            f"positive(offset={p.positive.offset})={list(p.positive.bucket_counts)} "
            f"negative(offset={p.negative.offset})={list(p.negative.bucket_counts)}")


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
                        pattrs = ", ".join(f"{k}={v}" for k, v in sorted((p.attributes or {}).items()))
                        lines.append(f"      {{{pattrs}}} {_value(p)}")
    return "\n".join(lines)


factory = Factory(kind="exporter", type="debug", config_model=DebugConfig, create=DebugExporter,
                  stability=Stability.DEVELOPMENT, description="Writes metrics to the log for debugging")
