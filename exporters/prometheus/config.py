"""Configuration of the prometheus exporter (keys as the collector's prometheusexporter where one exists)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from podmeter.config import ComponentConfig, Duration, Endpoint

# Resource attributes that identify what was measured: promoted to labels by default so that per-pod,
# per-container, per-process and per-GPU queries need no join with target_info. Glob patterns; a leading `!`
# excludes. Identifying only: the names and uids of Kubernetes objects (pod, namespace, container, node, the
# workload), the container id, the process id, and the GPU's identity as the nvml receiver sets it (`hw.id`: the
# GPU or MIG device UUID; `hw.gpu.index`; for a MIG device its parent GPU's UUID and instance ids). Descriptive
# attributes (hw.model, hw.name, hw.vendor, hw.driver_version, hw.gpu.pci_bus_id, process.executable.name,
# container.image.name, k8s.pod.ip, pod labels and annotations (k8s.pod.label.* as the semantic conventions and
# k8sattributes name them, k8s.pod.labels.* as the collector's k8sattributes did), ...) stay in target_info; promote
# one explicitly where a query needs it as a label.
DEFAULT_PROMOTED = (
    "k8s.*.name",
    "k8s.*.uid",
    "!k8s.*.label.*",
    "!k8s.*.labels.*",
    "!k8s.*.annotation.*",
    "!k8s.*.annotations.*",
    "container.id",
    "process.pid",
    "hw.id",
    "hw.gpu.index",
    "hw.parent",
    "hw.gpu.mig.gpu_instance_id",
    "hw.gpu.mig.compute_instance_id",
)


class ResourceToTelemetryConfig(ComponentConfig):
    enabled: bool = Field(False, description="Copy every resource attribute onto every series as a label")


class TargetInfoConfig(ComponentConfig):
    enabled: bool = Field(True, description="Expose one `target_info` series per resource holding all its attributes")


# confighttp's TLS versions (configtls): "1.0" to "1.3"
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")

# translation_strategy values (the collector's prometheusexporter) -> whether suffixes are added. Only the
# underscore-escaping ones: the exposition is rendered once per export in text 0.0.4 and OpenMetrics 1.0, whose
# names are the classic [a-zA-Z_:][a-zA-Z0-9_:]*; UTF-8 names would need the quoted syntax that only a scraper
# negotiating `escaping=allow-utf-8` parses, and a second rendering for every other one.
TRANSLATION_STRATEGIES = {"UnderscoreEscapingWithSuffixes": True, "UnderscoreEscapingWithoutSuffixes": False}
UTF8_STRATEGIES = ("NoUTF8EscapingWithSuffixes", "NoTranslation")


def _tls_version(v):
    # YAML reads an unquoted `min_version: 1.2` as a number (the collector's config decoding takes it too)
    if isinstance(v, float):
        v = repr(v)
    if not isinstance(v, str) or (v and v not in TLS_VERSIONS):
        raise ValueError(f"unsupported TLS version; use one of {', '.join(TLS_VERSIONS)}")
    return v


class ServerTLSConfig(ComponentConfig):
    cert_file: str = Field("", description="PEM certificate (chain) served; with key_file enables HTTPS")
    key_file: str = Field("", description="PEM private key of cert_file")
    client_ca_file: str = Field("", description="PEM CA bundle; when set, scrapers must present a client "
                                                "certificate signed by it (mutual TLS)")
    min_version: str = Field("1.2", description="Lowest TLS version accepted (1.0, 1.1, 1.2, 1.3); below 1.2 "
                                                "also lowers OpenSSL's security level to 0, which 1.0/1.1 need")
    max_version: str = Field("", description="Highest TLS version accepted (1.0 to 1.3); empty: the highest "
                                             "supported")

    @field_validator("min_version", "max_version", mode="before")
    @classmethod
    def _version(cls, v):
        return _tls_version(v)

    @model_validator(mode="after")
    def _pair(self):
        # (the versions compare as strings: "1.0" < "1.1" < "1.2" < "1.3")
        if self.max_version and (self.min_version or "1.2") > self.max_version:
            raise ValueError(f"min_version {self.min_version or '1.2'} is above max_version {self.max_version} "
                             "(min_version defaults to 1.2)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file must be given together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("client_ca_file needs cert_file and key_file (mutual TLS is served over HTTPS)")
        if not self.cert_file:
            # `tls` given without a certificate (a template's empty values) served plain HTTP, silently
            raise ValueError("needs cert_file and key_file (leave tls out to serve plain HTTP)")
        return self


class BasicAuthConfig(ComponentConfig):
    username: str = Field("", description="User name scrapers must send; empty disables basic auth")
    password: str = Field("", description="Password (use ${env:VAR} rather than writing it in the file)")


class PrometheusConfig(ComponentConfig):
    endpoint: Endpoint = Field("0.0.0.0:9464", description="Address the /metrics endpoint listens on")
    namespace: str = Field("", description="Prefix added to every metric name (`namespace_name`)")
    const_labels: dict[str, str] = Field(default_factory=dict, description="Labels added to every series")
    metric_expiration: Duration = Field(300.0, gt=0, description="Series not updated for this long are removed")
    add_metric_suffixes: bool = Field(
        True, description="Add unit and `_total` suffixes by the OTel-to-Prometheus rules; false keeps names "
                          "as given (only invalid characters are replaced). Ignored when translation_strategy "
                          "is set (deprecated in the collector for it)")
    translation_strategy: str | None = Field(
        None, description="The collector's successor of add_metric_suffixes, and taking precedence over it: "
                          "UnderscoreEscapingWithSuffixes (as add_metric_suffixes: true) or "
                          "UnderscoreEscapingWithoutSuffixes (as false). NoUTF8EscapingWithSuffixes and "
                          "NoTranslation (UTF-8 names) are refused: names are always escaped to `_`")
    promote_resource_attributes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMOTED),
        description="Resource attributes copied onto every series as labels (glob patterns like k8s.*; a leading ! "
                    "excludes). The default is the identifying ones; the others are in target_info")
    resource_to_telemetry_conversion: ResourceToTelemetryConfig = Field(
        default_factory=ResourceToTelemetryConfig, description="Promote all resource attributes to labels")
    target_info: TargetInfoConfig = Field(default_factory=TargetInfoConfig, description="The target_info series")
    tls: ServerTLSConfig | None = Field(None, description="Serve HTTPS (cert_file, key_file, client_ca_file, "
                                                               "min_version, max_version)")
    basic_auth: BasicAuthConfig | None = Field(None, description="Require HTTP basic authentication")
    enable_open_metrics: bool = Field(
        True, description="Serve OpenMetrics to scrapers that ask for it; false serves the text format only (the "
                          "collector's key; its default is false)")
    send_timestamps: bool = Field(False, description="The collector's key; only false (no sample timestamps, as "
                                                     "its default) is supported")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        import re

        if v and not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", v):
            raise ValueError("namespace must be a valid Prometheus name prefix ([a-zA-Z_][a-zA-Z0-9_]*)")
        return v

    @field_validator("const_labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for k in v:
            if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", k) or k.startswith("__"):
                raise ValueError(f"const label name {k!r} is not a valid Prometheus label name")
        return v

    @field_validator("translation_strategy")
    @classmethod
    def _strategy(cls, v: str | None) -> str | None:
        if v is None or v in TRANSLATION_STRATEGIES:
            return v
        if v in UTF8_STRATEGIES:
            raise ValueError("UTF-8 metric and label names are not supported: podmeter serves only "
                             "underscore-escaped names, valid for every Prometheus; use "
                             "UnderscoreEscapingWithSuffixes or UnderscoreEscapingWithoutSuffixes")
        raise ValueError("unknown strategy; use UnderscoreEscapingWithSuffixes or UnderscoreEscapingWithoutSuffixes")

    @property
    def add_suffixes(self) -> bool:
        """Whether names get unit and `_total` suffixes: translation_strategy when it is set (as the collector,
        which then ignores add_metric_suffixes), else add_metric_suffixes."""
        if self.translation_strategy is not None:
            return TRANSLATION_STRATEGIES[self.translation_strategy]
        return self.add_metric_suffixes

    @field_validator("send_timestamps")
    @classmethod
    def _timestamps(cls, v: bool) -> bool:
        if v:
            # Prometheus stamps each sample with the scrape's time; a sample timestamp would be the collection's,
            # up to an interval old, which makes staleness and rate() windows lag
            raise ValueError("sample timestamps are not supported: leave send_timestamps out (or false); "
                             "Prometheus stamps samples with the scrape's time")
        return v

    @model_validator(mode="after")
    def _auth(self):
        if self.basic_auth is not None and not self.basic_auth.username:
            raise ValueError("basic_auth needs a username")
        return self
