"""The `kubernetes` client library, loaded and called without the parts of it that podmeter does not use.

k8sattributes reads the API server's JSON itself (`_preload_content=False`: no model objects) and makes five kinds
of GET requests: list/watch pods, list/watch namespaces, get a ReplicaSet, get a Job (and the podresources
receiver a sixth: list ResourceSlices). Used the usual way, the
library costs the agent about 38 MiB of RSS for that (measured next to the agent's other components, 37.0.2), from
two sources, each avoided here without leaving the library:

1. `kubernetes/__init__.py` imports `config`, `dynamic` (which pulls kubernetes_validate and jsonschema), `stream`
   (websocket), `leaderelection` and `informer` eagerly: about 10 MiB. The package's own `__init__.py` is run
   unchanged, but with those five names already bound on the package (to a placeholder), so that its
   `from . import name` lines take the placeholder instead of importing the submodule; the placeholders are then
   replaced by a module `__getattr__` (PEP 562, as kubernetes.client itself uses) that imports a submodule the
   first time someone asks the package for it (`config`, with auth_type kubeConfig; the others never, here).
   Nothing is left half-imported: `import kubernetes.stream` or `from kubernetes.config.x import y` elsewhere in
   the process are ordinary imports. (Not importlib.util.LazyLoader: importing a submodule of a package it keeps
   lazy executes that submodule twice, giving two copies of its classes.)

2. The generated API classes (CoreV1Api, AppsV1Api, BatchV1Api) import, at module level, the pydantic model of
   every resource any of their methods takes or returns: 304 model modules, about 20 MiB of code and schemas that
   nothing here uses. The requests are made instead through the library's generic client calls, which are what
   every generated method calls itself: `ApiClient.param_serialize` (host, auth, token refresh, headers, URL
   encoding) and `ApiClient.call_api` (its REST client: TLS, pools, timeouts), with the path, query parameters,
   Accept header and auth setting the generated methods use, and the same ApiException on an error status.

Both fall back to the plain library where its layout differs (no such submodule, no `param_serialize`: older
generated clients), so a library upgrade costs memory at worst, not function.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys

log = logging.getLogger(__name__)

# kubernetes/__init__.py's eager submodule imports that podmeter does not need at import time ("client", "watch",
# and "utils", which the REST client imports, are needed; "config" only with kubeConfig, and it is imported then)
DEFERRED_SUBMODULES = ("config", "dynamic", "stream", "leaderelection", "informer")


def _submodule_on_first_use(name: str):
    """The `kubernetes` package's module __getattr__: a deferred submodule is imported when first asked for (the
    import binds it on the package, so this runs once per submodule)."""
    if name in DEFERRED_SUBMODULES:
        return importlib.import_module(f"kubernetes.{name}")
    raise AttributeError(f"module 'kubernetes' has no attribute {name!r}")


def _import_kubernetes() -> bool:
    """Import the `kubernetes` package without executing DEFERRED_SUBMODULES; False when it was imported already or
    could not be imported that way (the plain import that follows then does it, or fails as it would anyway)."""
    if "kubernetes" in sys.modules:
        return False  # imported already, by other code in this process: nothing left to save
    try:
        spec = importlib.util.find_spec("kubernetes")
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return False
        pkg = importlib.util.module_from_spec(spec)
        placeholder = object()
        for name in DEFERRED_SUBMODULES:
            setattr(pkg, name, placeholder)  # `from . import name` in __init__.py takes this and imports nothing
        sys.modules["kubernetes"] = pkg
        spec.loader.exec_module(pkg)
        if "__getattr__" in vars(pkg):
            raise ImportError("the package defines its own __getattr__")
        for name in DEFERRED_SUBMODULES:
            if vars(pkg).get(name) is placeholder:  # (not imported by __init__.py another way)
                delattr(pkg, name)
        # a module that took a placeholder at import (`from kubernetes import config` at its top) would fail later,
        # when it uses it: then the whole library is imported the plain way
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("kubernetes") and \
                    any(v is placeholder for v in vars(mod).values()):
                raise ImportError(f"{mod.__name__} took a deferred submodule at import")
        pkg.__getattr__ = _submodule_on_first_use
        return True
    except Exception as exc:  # any surprise (a placeholder used, a new layout): undo, and import the plain way
        for name in [m for m in sys.modules if m == "kubernetes" or m.startswith("kubernetes.")]:
            del sys.modules[name]
        log.debug("kubernetes imported the plain way: %s: %s", type(exc).__name__, exc)
        return False


_import_kubernetes()

from kubernetes import client, watch  # noqa: E402  (after the lazy set-up above)
from kubernetes.client.rest import ApiException  # noqa: E402


def _has_generic_calls() -> bool:
    """Whether ApiClient has the generic calls of openapi-generator 7's python client, which the library is
    generated with today, with the parameters used here (older releases of the library have another call_api)."""
    try:
        serialize = inspect.signature(client.ApiClient.param_serialize).parameters
        call = inspect.signature(client.ApiClient.call_api).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return ({"method", "resource_path", "path_params", "query_params", "header_params", "auth_settings"}
            <= serialize.keys() and {"method", "url", "header_params", "_request_timeout"} <= call.keys())


GENERIC_CALLS = _has_generic_calls()

# keyword argument -> query parameter, as the generated methods name them
_QUERY = {
    "field_selector": "fieldSelector",
    "label_selector": "labelSelector",
    "resource_version": "resourceVersion",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "timeout_seconds": "timeoutSeconds",
    "watch": "watch",
}


class Api:
    """The GET requests k8sattributes makes. Each returns the raw response (a urllib3 response: `.data` is the
    body; a watch streams it), like the generated method with `_preload_content=False`, and raises the library's
    ApiException on an error status. Keyword arguments are the generated methods' (field_selector, watch, ...)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    def list_pods(self, namespace: str | None = None, **kwargs):
        if namespace:
            return self._get("/api/v1/namespaces/{namespace}/pods", {"namespace": namespace},
                             ("CoreV1Api", "list_namespaced_pod"), kwargs)
        return self._get("/api/v1/pods", {}, ("CoreV1Api", "list_pod_for_all_namespaces"), kwargs)

    def list_namespaces(self, **kwargs):
        return self._get("/api/v1/namespaces", {}, ("CoreV1Api", "list_namespace"), kwargs)

    def read_replica_set(self, name: str, namespace: str, **kwargs):
        return self._get("/apis/apps/v1/namespaces/{namespace}/replicasets/{name}",
                         {"name": name, "namespace": namespace}, ("AppsV1Api", "read_namespaced_replica_set"), kwargs)

    def read_job(self, name: str, namespace: str, **kwargs):
        return self._get("/apis/batch/v1/namespaces/{namespace}/jobs/{name}", {"name": name, "namespace": namespace},
                         ("BatchV1Api", "read_namespaced_job"), kwargs)

    def list_resource_slices(self, version: str, **kwargs):
        """ResourceSlices (DRA) at one version of resource.k8s.io (v1 from Kubernetes 1.34, v1beta2 1.33, v1beta1
        1.32), for the podresources receiver. The older library's fallback is the generic custom-object call, as
        no one generated method covers every version."""
        return self._get("/apis/{group}/{version}/{plural}",
                         {"group": "resource.k8s.io", "version": version, "plural": "resourceslices"},
                         ("CustomObjectsApi", "list_cluster_custom_object"), kwargs)

    def _get(self, path: str, path_params: dict, generated: tuple[str, str], kwargs: dict):
        if kwargs.pop("_preload_content", False):
            raise ValueError("k8sattributes reads raw responses: _preload_content must be False")
        timeout = kwargs.pop("_request_timeout", None)
        if not GENERIC_CALLS:  # an older library: its generated method (imports that API's models)
            api = getattr(client, generated[0])(self.api_client)
            return getattr(api, generated[1])(**path_params, **kwargs, _preload_content=False,
                                              _request_timeout=timeout)
        unknown = set(kwargs) - _QUERY.keys()
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        query = [(_QUERY[k], v) for k, v in kwargs.items() if v is not None]
        # as a generated method does it (list_pod_for_all_namespaces, ...): the same serialization and call
        request = self.api_client.param_serialize(
            method="GET", resource_path=path, path_params=path_params, query_params=query,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        resp = self.api_client.call_api(*request, _request_timeout=timeout)
        if not 200 <= resp.status <= 299:
            resp.read()  # the error body, for the exception's message
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        return resp.response


__all__ = ["Api", "ApiException", "GENERIC_CALLS", "client", "watch"]
