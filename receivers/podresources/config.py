from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from podmeter.config import ComponentConfig, Duration, ScraperConfig
from receivers.cri.config import parse_unix_endpoint

DEFAULT_ROOT = "/var/lib/kubelet"


class DraConfig(ComponentConfig):
    drivers: list[str] = Field(
        default_factory=lambda: ["gpu.nvidia.com"],
        description="DRA drivers whose claimed devices are tracked (shell-style patterns); empty: claims are ignored")
    uuid_attribute: str = Field(
        "uuid", min_length=1,
        description="The device attribute in the driver's ResourceSlices that holds the device's UUID (NVIDIA's "
                    "driver: uuid, for GPUs and MIG devices)")
    auth_type: Literal["serviceAccount", "kubeConfig", "none"] = Field(
        "serviceAccount",
        description="How this node's ResourceSlices are read from the API server, to turn a claimed device's name "
                    "into its UUID; none: devices are reported as <driver>/<pool>/<device>")
    kube_config_path: str = Field("", description="With kubeConfig: the file (default: $KUBECONFIG, then "
                                                  "~/.kube/config)")
    node_name: str = Field("", description="This node's name, whose ResourceSlices are read; empty: "
                                           "$K8S_NODE_NAME, else the host name")
    refresh_interval: Duration = Field(
        300.0, gt=0, description="How often the node's ResourceSlices are listed again while it holds claims "
                                 "(sooner, at most every 30s, when a claimed device is not in them)")


class PodResourcesConfig(ScraperConfig):
    endpoint: str = Field(
        f"unix://{DEFAULT_ROOT}/pod-resources/kubelet.sock",
        description="The kubelet's PodResources socket; derived from kubelet_root_dir when that is set instead")
    kubelet_root_dir: str = Field(
        "", description="The kubelet's --root-dir where a distribution moves it (e.g. /var/snap/microk8s/common/"
                        "var/lib/kubelet); the socket is <root>/pod-resources/kubelet.sock")
    resource_names: list[str] = Field(
        # nvidia.com/gpu.shared: the NVIDIA device plugin's name for time-sliced or MPS-shared GPUs under
        # `renameByDefault: true` (shared MIG devices are nvidia.com/mig-<profile>.shared)
        default_factory=lambda: ["nvidia.com/gpu", "nvidia.com/gpu.shared", "nvidia.com/mig-*"],
        description="Device plugin resource names to track (shell-style patterns, e.g. amd.com/gpu, "
                    "gpu.intel.com/*)")
    refresh_interval: Duration = Field(
        10.0, gt=0, description="How often the allocation map shared with other components is refreshed")
    request_timeout: Duration = Field(5.0, gt=0, description="Deadline of every PodResources call")
    max_recv_msg_size_mib: int = Field(
        64, ge=4, le=2048, description="Largest reply accepted, MiB (gRPC's default of 4 MiB is too small on "
                                       "busy nodes)")
    allocatable: bool = Field(True, description="Also call GetAllocatableResources (kubelet >= 1.21)")
    dra: DraConfig = Field(default_factory=DraConfig,
                           description="Devices claimed through Dynamic Resource Allocation (ResourceClaims)")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        return parse_unix_endpoint(value)

    @field_validator("kubelet_root_dir")
    @classmethod
    def _root(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith("/"):
            raise ValueError(f"kubelet_root_dir {value!r} must be an absolute path")
        return value

    @model_validator(mode="after")
    def _derive(self):
        if self.kubelet_root_dir:
            if "endpoint" in self.model_fields_set:
                raise ValueError("set endpoint or kubelet_root_dir, not both")
            self.endpoint = f"unix://{self.kubelet_root_dir}/pod-resources/kubelet.sock"
        if not self.resource_names:
            raise ValueError("resource_names is empty: nothing would be tracked")
        return self
