"""Shared by the podresources tests: the kubelet's PodResources server and the receiver under test.

No kubelet can run here, so the server is the tests' own (a double built on the project's proto, serving over a
real unix socket with real gRPC): it stands in for the kubelet only, the client side is the real receiver.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures

import grpc
import pytest

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.telemetry import null_component_telemetry
from receivers.podresources import api_pb2 as pb
from receivers.podresources import api_pb2_grpc as pbg
from receivers.podresources import factory

GPU0 = "GPU-6b7a1c2e-0d4f-4c1e-9f7e-1a2b3c4d5e60"
GPU1 = "GPU-6b7a1c2e-0d4f-4c1e-9f7e-1a2b3c4d5e61"
GPU2 = "GPU-6b7a1c2e-0d4f-4c1e-9f7e-1a2b3c4d5e62"
MIG_A = "MIG-2f1c9d3a-7b4e-5a6f-8c9d-0e1f2a3b4c5d"
MIG_B = "MIG-3a2b1c0d-9e8f-5a6b-7c8d-9e0f1a2b3c4d"


def pod(name, namespace, containers):
    return pb.PodResources(name=name, namespace=namespace, containers=[
        pb.ContainerResources(name=cname, devices=[pb.ContainerDevices(resource_name=r, device_ids=ids)
                                                   for r, ids in devices])
        for cname, devices in containers.items()])


class Kubelet(pbg.PodResourcesListerServicer):
    def __init__(self, pods, allocatable=None, implement_allocatable=True, allocatable_gate=True):
        self.pods, self.allocatable, self.implement_allocatable = pods, allocatable or [], implement_allocatable
        self.allocatable_gate = allocatable_gate
        self.calls = 0
        self.allocatable_calls = 0

    def List(self, request, context):
        self.calls += 1
        return pb.ListPodResourcesResponse(pod_resources=self.pods)

    def GetAllocatableResources(self, request, context):
        self.allocatable_calls += 1
        if not self.implement_allocatable:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "unknown method")
        if not self.allocatable_gate:
            # kubelet 1.21-1.22 with KubeletPodResourcesGetAllocatable off (its default) returns a plain Go error,
            # `fmt.Errorf("PodResources API GetAllocatableResources disabled")`, which gRPC-Go sends as UNKNOWN
            context.abort(grpc.StatusCode.UNKNOWN, "PodResources API GetAllocatableResources disabled")
        return pb.AllocatableResourcesResponse(devices=[pb.ContainerDevices(resource_name=r, device_ids=ids)
                                                        for r, ids in self.allocatable])


class Server:
    """A PodResources server on <root>/pod-resources/kubelet.sock, restartable on the same path."""

    def __init__(self, root):
        self.root = str(root)
        os.makedirs(f"{self.root}/pod-resources", exist_ok=True)
        self.path = f"{self.root}/pod-resources/kubelet.sock"
        self.server = None

    def start(self, servicer):
        if os.path.exists(self.path):
            os.unlink(self.path)  # as kubelet does at start
        self.server = grpc.server(futures.ThreadPoolExecutor(4),
                                  options=[("grpc.max_send_message_length", -1)])
        pbg.add_PodResourcesListerServicer_to_server(servicer, self.server)
        self.server.add_insecure_port(f"unix://{self.path}")
        self.server.start()
        return self

    def stop(self):
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "kubelet")
    yield s
    s.stop()


@pytest.fixture
def make_receiver():
    made = []

    def make(host=None, **config):
        telemetry = null_component_telemetry("podresources", logging.getLogger("test.podresources"))
        settings = CreateSettings(id=ComponentID("podresources"), kind="receiver", logger=telemetry.logger,
                                  telemetry=telemetry)
        receiver = factory.create(settings, factory.config_model.model_validate(config))
        host = host or Host()
        receiver.start(host)
        made.append(receiver)
        (provider,) = host.lookup("device_assignments")
        return receiver, provider, telemetry

    yield make
    for r in made:
        r.shutdown()
