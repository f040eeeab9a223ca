"""podmeter: a per-node metrics agent for Kubernetes, shaped like an OpenTelemetry Collector."""

__version__ = "0.1.0"
