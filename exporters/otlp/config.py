"""Configuration of the otlp (gRPC) and otlphttp exporters: the collector's exporterhelper keys."""

from __future__ import annotations

import re
import urllib.parse
from typing import Literal

from pydantic import ByteSize, Field, field_validator, model_validator

from podmeter.config import ComponentConfig, Duration


class ClientTLSConfig(ComponentConfig):
    insecure: bool = Field(False, description="gRPC: plaintext instead of TLS (an http:// endpoint implies it)")
    insecure_skip_verify: bool = Field(False, description="Do not verify the server's certificate (testing only)")
    ca_file: str = Field("", description="PEM CA bundle to verify the server with (default: the system's)")
    cert_file: str = Field("", description="PEM client certificate for mutual TLS")
    key_file: str = Field("", description="PEM private key of cert_file")

    @model_validator(mode="after")
    def _pair(self):
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file must be given together")
        return self


class RetryConfig(ComponentConfig):
    enabled: bool = Field(True, description="Retry batches that failed with a retryable error")
    initial_interval: Duration = Field(5.0, gt=0, description="Wait after the first failure")
    max_interval: Duration = Field(30.0, gt=0, description="Upper bound of the wait between attempts")
    max_elapsed_time: Duration = Field(300.0, description="Give a batch up after this long; 0 retries forever")
    multiplier: float = Field(1.5, ge=1.0, description="Growth of the wait after each failed attempt")
    randomization_factor: float = Field(0.5, ge=0.0, le=1.0, description="Jitter: the wait is randomized by ±this")


class QueueConfig(ComponentConfig):
    enabled: bool = Field(True, description="Queue batches and send them from consumer threads")
    queue_size: int = Field(1000, gt=0, description="Batches the queue holds; when full the oldest is dropped")
    max_bytes: ByteSize = Field(64 << 20, ge=0, description="Encoded bytes the queue holds (64 MiB; units as "
                                                            "\"256MiB\" allowed); when full the oldest batch is "
                                                            "dropped; 0: no byte bound")
    num_consumers: int = Field(10, gt=0, le=100, description="Threads sending batches in parallel")
    storage: str = Field("", description="Absolute path of the directory of a persistent queue: batches survive a "
                                         "restart or kill (each exporter uses its own subdirectory); not a storage "
                                         "extension's name, as in the collector")
    fsync: bool = Field(False, description="With storage: flush each batch file and the directory to disk before "
                                           "it counts as queued, so batches also survive a power loss (one disk "
                                           "flush per batch)")

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str) -> str:
        # The collector's sending_queue.storage names a storage extension (`file_storage`, `file_storage/otc`);
        # copied here it would silently become a directory relative to the agent's working directory.
        if v and not v.startswith("/"):
            raise ValueError("must be an absolute directory path, like /var/lib/podmeter/queue; "
                             "podmeter has no storage extensions: where the collector names one (file_storage), "
                             "give the directory itself")
        return v


_BAD_HOST = re.compile(r"[\s/?#@]")  # whitespace, or URL syntax in a host name
_DNS_TARGET = re.compile(r"^dns://[^/]*/([^/]+)$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_METADATA_KEY = re.compile(r"^[0-9a-z_.-]+$")


class _OTLPBase(ComponentConfig):
    tls: ClientTLSConfig = Field(default_factory=ClientTLSConfig, description="Client TLS settings")
    headers: dict[str, str] = Field(default_factory=dict, description="Headers (gRPC metadata) sent with every request")
    compression: Literal["gzip", "none", ""] = Field("gzip", description="gzip or none")
    timeout: Duration = Field(5.0, gt=0, description="Deadline of one send attempt")
    retry_on_failure: RetryConfig = Field(default_factory=RetryConfig, description="Retries with backoff")
    sending_queue: QueueConfig = Field(default_factory=QueueConfig, description="The sending queue")
    temporality_preference: Literal["cumulative", "delta"] = Field(
        "cumulative", description="cumulative sends sums and histograms as collected; delta sends the change "
                                  "since the previous collection (a series already running when the agent started "
                                  "is held back once, as the baseline)")


    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for k, value in v.items():
            if not _HEADER_NAME.match(k):
                raise ValueError(f"header name {k!r} is not a valid HTTP header / gRPC metadata key")
            if "\n" in str(value) or "\r" in str(value):
                raise ValueError(f"header {k!r}: the value must be one line")
            # control characters are refused by every HTTP client (the collector's Go one too); anything else
            # goes out as its UTF-8 bytes, as the collector sends it
            if any((c < " " and c != "\t") or c == "\x7f" for c in str(value)):
                raise ValueError(f"header {k!r}: the value must not hold control characters")
        return v


class OTLPGrpcConfig(_OTLPBase):
    endpoint: str = Field("localhost:4317", description="host:port of the OTLP gRPC receiver "
                                                       "(http:// means plaintext, https:// TLS; dns:///host:port "
                                                       "as the collector takes it)")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        rest = v.split("://", 1)[1] if "://" in v else v
        if v.startswith("dns:"):
            # gRPC's name syntax, which the collector's otlp exporter accepts: dns:///host:port (an authority,
            # dns://server/host:port, is ignored: the system's resolver is used)
            m = _DNS_TARGET.match(v)
            if not m:
                raise ValueError(f"invalid endpoint {v!r}: expected dns:///host:port")
            rest = m.group(1)
        elif "://" in v and not v.startswith(("http://", "https://")):
            raise ValueError("the scheme must be http://, https:// or dns:///, or none (host:port)")
        host, sep, port = rest.rstrip("/").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or _BAD_HOST.search(host):
            raise ValueError(f"invalid endpoint {v!r}: expected host:port, like otel-gateway:4317")
        return v

    @field_validator("headers")
    @classmethod
    def _metadata(cls, v: dict[str, str]) -> dict[str, str]:
        # gRPC refuses at every call what HTTP takes (grpcio with INTERNAL "Invalid metadata", as if the backend had
        # refused the batch; grpc-go, so the collector, the same): a key outside [0-9a-z_.-] once lower-cased, or a
        # value that is not printable ASCII unless the key ends in -bin (binary metadata: any bytes)
        for k, value in v.items():
            if not _METADATA_KEY.match(k.lower()):
                raise ValueError(f"header name {k!r}: a gRPC metadata key has only letters, digits, '-', '_' "
                                 "and '.'")
            if not k.lower().endswith("-bin") and not all(" " <= c <= "~" for c in str(value)):  # a tab neither
                raise ValueError(f"header {k!r}: the value must be printable ASCII (percent- or base64-encode "
                                 "anything else, or send it as binary metadata: a key ending in -bin)")
        return v

    @model_validator(mode="after")
    def _tls(self):
        if self.tls.insecure_skip_verify:
            raise ValueError("tls::insecure_skip_verify is not supported by the gRPC exporter: give tls::ca_file "
                             "(the server's CA) or use tls::insecure for plaintext")
        return self


class OTLPHttpConfig(_OTLPBase):
    endpoint: str = Field("http://localhost:4318", description="Base URL; metrics are POSTed to <endpoint>/v1/metrics")
    metrics_endpoint: str = Field("", description="Full URL for metrics, used as is instead of endpoint + /v1/metrics")
    # the collector's otlphttp default: its HTTP client's deadline covers connecting, sending and reading the reply
    timeout: Duration = Field(30.0, gt=0, description="Deadline of one send attempt")
    encoding: Literal["proto", "json"] = Field("proto", description="Body encoding: proto (application/x-protobuf) "
                                                                 "or json (OTLP/JSON, application/json)")

    @field_validator("endpoint", "metrics_endpoint")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://")):
            raise ValueError(f"invalid URL {v!r}: must start with http:// or https://")
        if v:
            # checked here: a URL the HTTP client cannot parse failed every send, retried as if the backend
            # were away
            url = urllib.parse.urlsplit(v)
            try:
                url.port  # noqa: B018 - raises on a port that is not a number in range
            except ValueError:
                raise ValueError(f"invalid URL {v!r}: the port must be a number from 1 to 65535") from None
            if not url.hostname or _BAD_HOST.search(url.hostname) or url.port == 0:
                raise ValueError(f"invalid URL {v!r}: expected http(s)://host[:port][/path], like "
                                 "https://otlp.example.com:4318")
        return v

    @model_validator(mode="after")
    def _some_url(self):
        if not self.endpoint and not self.metrics_endpoint:  # e.g. ${env:OTLP_ENDPOINT} unset
            raise ValueError("either endpoint or metrics_endpoint must be given")
        return self
