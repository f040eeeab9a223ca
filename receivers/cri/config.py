from __future__ import annotations

from pydantic import Field, field_validator

from podmeter.config import ComponentConfig, Duration, ScraperConfig


class MetricToggle(ComponentConfig):
    enabled: bool = Field(description="Emit this metric")


def parse_unix_endpoint(value: str, key: str = "endpoint") -> str:
    """`unix:///path`, `unix:/path` or a bare absolute path (all three as kubelet's --container-runtime-endpoint
    takes them) -> `unix:///path`; anything else is a config error."""
    text = str(value).strip()
    if text.startswith("unix://"):
        path = text[len("unix://"):]
    elif text.startswith("unix:/"):
        path = text[len("unix:"):]
    elif text.startswith("/"):
        path = text
    else:
        raise ValueError(f"{key} {text!r} must be a unix socket, like unix:///run/containerd/containerd.sock")
    if not path.startswith("/"):
        raise ValueError(f"{key} {text!r}: the socket path must be absolute (unix:///path has three slashes)")
    return "unix://" + path


class CriConfig(ScraperConfig):
    endpoint: str = Field(
        "unix:///run/containerd/containerd.sock",
        description="CRI v1 socket of the container runtime (CRI-O: unix:///var/run/crio/crio.sock)")
    request_timeout: Duration = Field(5.0, gt=0, description="Deadline of every CRI call")
    metadata_refresh_interval: Duration = Field(
        30.0, gt=0, description="How often the container/pod metadata cache is listed again in full")
    on_demand_refresh_min_interval: Duration = Field(
        2.0, ge=0, description="Least time between refreshes triggered by an unknown container id")
    container_pids: bool = Field(
        True, description="Ask ContainerStatus (verbose) once per new container for its host PID and image name")
    max_containers: int = Field(
        20000, gt=0, description="Most containers kept in the metadata cache (the rest are counted as dropped)")
    metrics: dict[str, MetricToggle] = Field(
        default_factory=dict, description="Per-metric settings, e.g. {container.cpu.time: {enabled: true}}; see the metrics table")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return parse_unix_endpoint(value)

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, value: dict) -> dict:
        from . import METRIC_NAMES  # the package is loaded by the time a config is validated

        unknown = sorted(set(value) - METRIC_NAMES)
        if unknown:
            raise ValueError(f"unknown metric {', '.join(unknown)}; known: {', '.join(sorted(METRIC_NAMES))}")
        return value
