"""A small CRI v1 client: one channel to the runtime's unix socket, a deadline on every call.

The channel is dropped after a call fails with UNAVAILABLE, so the next call dials afresh: a runtime restart
(the socket replaced) is picked up at once instead of after gRPC's growing reconnect backoff.
"""

from __future__ import annotations

import os
import threading

import grpc

from . import api_pb2 as pb
from . import api_pb2_grpc as pbg

# A container list on a dense node stays far below this; 64 MiB leaves room (gRPC's default is 4 MiB).
MAX_RECEIVE_BYTES = 64 << 20


class CriClient:
    def __init__(self, endpoint: str, timeout: float) -> None:
        self.endpoint = endpoint
        self.path = endpoint[len("unix://"):]
        self.timeout = timeout
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._rt: pbg.RuntimeServiceStub | None = None

    def socket_exists(self) -> bool:
        return os.path.exists(self.path)

    def _stub(self) -> pbg.RuntimeServiceStub:
        with self._lock:
            if self._rt is None:
                self._channel = grpc.insecure_channel(self.endpoint, options=[
                    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 5000),
                ])
                self._rt = pbg.RuntimeServiceStub(self._channel)
            return self._rt

    def reset(self) -> None:
        """Forget the channel; the next call dials afresh. It is not closed here: closing would cancel a call
        another thread (refresher or collector) has in flight on it; it is released with its last user."""
        with self._lock:
            self._channel = self._rt = None

    def call(self, name: str, request, timeout: float | None = None):
        """Call one RuntimeService RPC; raises grpc.RpcError (the channel is reset on UNAVAILABLE)."""
        try:
            return getattr(self._stub(), name)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.reset()
            raise

    def version(self) -> pb.VersionResponse:
        return self.call("Version", pb.VersionRequest(version="v1"))

    def list_pod_sandboxes(self) -> list:
        return list(self.call("ListPodSandbox", pb.ListPodSandboxRequest()).items)

    def list_containers(self) -> list:
        return list(self.call("ListContainers", pb.ListContainersRequest()).containers)

    def container_status(self, container_id: str) -> pb.ContainerStatusResponse:
        return self.call("ContainerStatus", pb.ContainerStatusRequest(container_id=container_id, verbose=True))

    def list_container_stats(self) -> list:
        return list(self.call("ListContainerStats", pb.ListContainerStatsRequest()).stats)

    def list_pod_sandbox_stats(self) -> list:
        return list(self.call("ListPodSandboxStats", pb.ListPodSandboxStatsRequest()).stats)

    def pod_sandbox_stats(self, sandbox_id: str, timeout: float | None = None):
        return self.call("PodSandboxStats", pb.PodSandboxStatsRequest(pod_sandbox_id=sandbox_id), timeout).stats

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._rt = None


def describe(exc: BaseException) -> str:
    """A one-line cause for logs: `UNAVAILABLE: connect failed` rather than a gRPC debug string."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        details = (exc.details() or "").splitlines()[0] if exc.details() else ""
        return f"{exc.code().name}: {details}" if details else exc.code().name
    return f"{type(exc).__name__}: {exc}"


def code_of(exc: BaseException) -> grpc.StatusCode | None:
    return exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None


def is_unimplemented(exc: BaseException) -> bool:
    return code_of(exc) == grpc.StatusCode.UNIMPLEMENTED
