"""A PodResources gRPC server on the project's own proto, standing in for the kubelet (none runs here)."""

from __future__ import annotations

from concurrent import futures


def serve_podresources(path: str, assignments: dict[tuple[str, str, str], list[str]],
                       resource: str = "nvidia.com/gpu"):
    """Serve List and GetAllocatableResources on unix socket `path`: {(namespace, pod, container): [device ids]}.
    Returns the grpc server (stop it with `.stop(0).wait()`)."""
    import grpc

    from receivers.podresources import api_pb2 as pb
    from receivers.podresources import api_pb2_grpc as pbg

    pods = [pb.PodResources(name=name, namespace=ns, containers=[pb.ContainerResources(
        name=ctr, devices=[pb.ContainerDevices(resource_name=resource, device_ids=ids)])])
        for (ns, name, ctr), ids in assignments.items()]
    all_ids = [i for ids in assignments.values() for i in ids]

    class Servicer(pbg.PodResourcesListerServicer):
        def List(self, request, context):  # noqa: N802 - gRPC's naming
            return pb.ListPodResourcesResponse(pod_resources=pods)

        def GetAllocatableResources(self, request, context):  # noqa: N802
            return pb.AllocatableResourcesResponse(devices=[pb.ContainerDevices(resource_name=resource,
                                                                                device_ids=all_ids)])

    server = grpc.server(futures.ThreadPoolExecutor(2))
    pbg.add_PodResourcesListerServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"unix://{path}")
    server.start()
    return server
