"""The UUIDs of devices handed out by Dynamic Resource Allocation (DRA).

The kubelet's PodResources API names a claimed device as its DRA driver does (`gpu.nvidia.com`, pool `node-1`,
device `gpu-0`). What the rest of podmeter knows a GPU by (nvml, dcgm-exporter, nvidia-smi) is its UUID, which the
driver publishes as a device attribute in this node's ResourceSlices (NVIDIA's: `uuid`, for GPUs and MIG devices).
The slices are listed from the API server only while this node holds claims of a tracked driver: at the first, when
a device is claimed that the last listing did not have (a new driver, a MIG reconfiguration; at most every
RELIST_MIN), and every `refresh_interval`, sooner after a failure. A node without DRA claims never asks.
"""

from __future__ import annotations

import json
import os
import time

from .config import DraConfig

RELIST_MIN = 30.0  # seconds between listings asked for by a claimed device that the last listing did not have
VERSIONS = ("v1", "v1beta2", "v1beta1")  # resource.k8s.io: Kubernetes 1.34, 1.33, 1.32


class ResourceSlices:
    """(driver, pool, device) -> UUID, from this node's ResourceSlices."""

    def __init__(self, config: DraConfig, telemetry, logger, request_timeout: float) -> None:
        self.config, self.tel, self.log = config, telemetry, logger
        self.timeout = request_timeout
        self.node = config.node_name or os.environ.get("K8S_NODE_NAME", "").strip() or os.uname().nodename
        self._uuids: dict[tuple[str, str, str], str] = {}
        self._listed_at: float | None = None
        self._wait = config.refresh_interval  # until the next listing: refresh_interval, less after a failure
        self._failed = False
        self._unresolved: set[tuple[str, str, str]] = set()  # claimed devices the last listing had no UUID for
        self._version: str | None = None  # the resource.k8s.io version the API server answered
        self._api = None
        self._unavailable: str | None = None  # why there is no API access (said once)

    def resolve(self, devices: set[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
        """The UUIDs of those claimed devices that the node's ResourceSlices give one for."""
        if devices and self.config.auth_type != "none":
            now = time.monotonic()
            if self._listed_at is None or now >= self._listed_at + self._wait or (
                    devices - self._uuids.keys() - self._unresolved and now >= self._listed_at + RELIST_MIN):
                self._listed_at = now
                ok = self._list()
                # a device the listing did not have (a driver without the UUID attribute) is not looked up again
                # before the next regular listing; a failed listing is tried again sooner, backing off towards it
                self._unresolved = devices - self._uuids.keys()
                interval = self.config.refresh_interval
                self._wait = interval if ok else min(interval, self._wait * 2 if self._failed else RELIST_MIN)
                self._failed = not ok
        return {d: self._uuids[d] for d in devices if d in self._uuids}

    def _client(self):
        if self._api is None and self._unavailable is None:
            # imported on first use: the kubernetes library costs memory that nodes without DRA claims never need
            from processors.k8sattributes.informer import ConfigurationError, build_api_client
            from processors.k8sattributes.kube import Api
            try:
                self._api = Api(build_api_client(self.config.auth_type, self.config.kube_config_path))
            except ConfigurationError as exc:
                self._unavailable = str(exc)
                self.log.warning("DRA devices are reported by their driver's names, not UUIDs: no Kubernetes API "
                                 "access to read ResourceSlices (dra.auth_type %s: %s)", self.config.auth_type, exc)
        return self._api

    def _list(self) -> bool:
        """Whether the node's slices could be listed (they are then the ones used)."""
        api = self._client()
        if api is None:
            return False
        from processors.k8sattributes.kube import ApiException
        versions = (self._version,) if self._version else VERSIONS
        for version in versions:
            try:
                resp = api.list_resource_slices(version, field_selector=f"spec.nodeName={self.node}",
                                                _request_timeout=self.timeout)
                doc = json.loads(resp.data)
            except ApiException as exc:
                if exc.status == 404 and version != versions[-1]:
                    continue  # not served at this version: an older API server
                if exc.status == 404:
                    self._version = None  # none served (DRA off): asked again at the next listing
                    self.tel.error("resourceslices", "the API server serves no ResourceSlices (resource.k8s.io "
                                                     f"{', '.join(VERSIONS)}): DRA devices keep their driver's names")
                elif exc.status in (401, 403):
                    self.tel.error("resourceslices", f"listing ResourceSlices was refused ({exc.status} {exc.reason})"
                                                     ": grant the agent's ClusterRole list on resourceslices in API "
                                                     "group resource.k8s.io; DRA devices keep their driver's names")
                else:
                    self.tel.error("resourceslices", f"listing ResourceSlices failed: {exc.status} {exc.reason}")
                return False
            except Exception as exc:  # noqa: BLE001 - connection refused, timeout, TLS, a body that is not JSON
                self.tel.error("resourceslices", f"listing ResourceSlices failed: {type(exc).__name__}: {exc}")
                return False
            self._version = version
            try:
                self._uuids = self._uuids_of(doc["items"] or [])
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                # the API server validates slices, so this is a proxy's or a broken server's answer: the UUIDs
                # known before are kept
                self.tel.error("resourceslices", f"the ResourceSlices listing is malformed ({type(exc).__name__}: "
                                                 f"{exc}): DRA devices not named in it keep their driver's names")
                return False
            self.tel.recovered("resourceslices")
            return True
        return False

    def _uuids_of(self, slices: list) -> dict[tuple[str, str, str], str]:
        attr = self.config.uuid_attribute
        # a pool being republished has slices of two generations: only the newest counts
        newest: dict[tuple[str, str], int] = {}
        for s in slices:
            spec = s.get("spec") or {}
            pool = spec.get("pool") or {}
            key = (spec.get("driver") or "", pool.get("name") or "")
            newest[key] = max(newest.get(key, 0), int(pool.get("generation") or 0))
        out: dict[tuple[str, str, str], str] = {}
        for s in slices:
            spec = s.get("spec") or {}
            pool = spec.get("pool") or {}
            driver, pool_name = spec.get("driver") or "", pool.get("name") or ""
            if int(pool.get("generation") or 0) != newest[driver, pool_name]:
                continue
            for device in spec.get("devices") or ():
                # v1 and v1beta2 have the attributes on the device, v1beta1 under `basic`; a name may be qualified
                # with the driver's domain
                attrs = device.get("attributes") or (device.get("basic") or {}).get("attributes") or {}
                value = attrs.get(attr) or attrs.get(f"{driver}/{attr}") or {}
                uuid = value.get("string") if isinstance(value, dict) else None
                if uuid and device.get("name"):
                    out[driver, pool_name, device["name"]] = uuid
        return out
