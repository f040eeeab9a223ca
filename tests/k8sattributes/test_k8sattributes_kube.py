"""k8sattributes' use of the `kubernetes` library (processors/k8sattributes/kube.py): imported without the
submodules and generated API classes podmeter does not use, its requests made through the library's ApiClient
against the API stand-in, and the plain library where that way does not apply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from harness.apiserver import ApiServer, owned, pod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(REPO, "tests")


def probe(code: str) -> dict:
    """Run `code` in a fresh interpreter (imports are per process) and return the JSON it prints last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, REPO])}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


LOADED = """
    def loaded():
        mods = set(sys.modules)
        return {"deferred": sorted(n for n in ("config", "dynamic", "stream", "leaderelection", "informer")
                                   if f"kubernetes.{n}" in mods),
                "models": sum(m.startswith("kubernetes.client.models.") for m in mods),
                "apis": sum(m.startswith("kubernetes.client.api.") for m in mods)}
"""


def test_requests_go_through_the_library_without_its_unused_parts(tmp_path):
    out = probe(LOADED + f"""
    import json, sys, tempfile
    from harness.apiserver import ApiServer, owned, pod
    from processors.k8sattributes import informer, kube

    at_import = loaded()
    api = ApiServer(bookmark_interval=0.2).start()
    api.create("namespaces", None, {{"metadata": {{"name": "ml"}}}})
    api.create("replicasets", "ml", owned("ReplicaSet", "web-1", owner=("Deployment", "web")))
    api.create("jobs", "ml", owned("Job", "nightly-1", owner=("CronJob", "nightly")))
    api.create("pods", "ml", pod("a", "node-1", uid="u-a"))
    api.create("pods", "ml", pod("b", "node-2", uid="u-b"))
    path = api.write_kubeconfig({str(tmp_path)!r})
    client = informer.build_api_client("kubeConfig", path)
    k = kube.Api(client)
    got = {{}}
    doc = json.loads(k.list_pods(field_selector="spec.nodeName=node-1", _preload_content=False,
                                 _request_timeout=(5, 5)).data)
    got["pods"] = [p["metadata"]["name"] for p in doc["items"]]
    rv = doc["metadata"]["resourceVersion"]
    got["ns_pods"] = len(json.loads(k.list_pods(namespace="ml", _preload_content=False).data)["items"])
    got["namespaces"] = [n["metadata"]["name"] for n in json.loads(k.list_namespaces(_preload_content=False).data)["items"]]
    got["rs_owner"] = informer.controller_of(json.loads(k.read_replica_set("web-1", "ml", _preload_content=False).data))
    got["job_owner"] = informer.controller_of(json.loads(k.read_job("nightly-1", "ml", _preload_content=False).data))
    try:
        k.read_job("missing", "ml", _preload_content=False)
    except kube.ApiException as exc:
        got["missing"] = exc.status
    api.create("pods", "ml", pod("c", "node-1", uid="u-c"))
    w = informer._RawWatch()
    for event in w.stream(k.list_pods, field_selector="spec.nodeName=node-1", resource_version=rv,
                          allow_watch_bookmarks=True, timeout_seconds=2, _request_timeout=(5, 10)):
        if event["type"] == "ADDED":
            got["watched"] = event["raw_object"]["metadata"]["name"]
            break
    got["query"] = api.asked("pods", "watch")[0].query
    after_use = loaded()
    # the rest of the library is still there for whoever asks for it
    import kubernetes
    import kubernetes.stream
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.dynamic import DynamicClient
    got["same_exception"] = ConfigException is kubernetes.config.ConfigException
    got["version"] = kubernetes.__version__
    client.close()
    api.stop()
    print(json.dumps({{"at_import": at_import, "after_use": after_use, "got": got}}))
    """)
    # nothing of what podmeter does not use was executed: not at import, not after lists, gets and a watch
    assert out["at_import"] == {"deferred": [], "models": 0, "apis": 0}
    assert out["after_use"] == {"deferred": ["config"], "models": 0, "apis": 0}  # config: auth_type kubeConfig
    got = out["got"]
    assert got["pods"] == ["a"] and got["ns_pods"] == 2 and got["namespaces"] == ["ml"]
    assert got["rs_owner"] == ["Deployment", "web"] and got["job_owner"] == ["CronJob", "nightly"]
    assert got["missing"] == 404
    assert got["watched"] == "c"
    assert got["query"]["watch"] == "true" and got["query"]["allowWatchBookmarks"] == "true"
    assert got["query"]["fieldSelector"] == "spec.nodeName=node-1" and got["query"]["timeoutSeconds"] == "2"
    assert got["same_exception"] is True
    with open(os.path.join(REPO, "constraints.txt")) as f:
        assert f"kubernetes=={got['version']}\n" in f.read()


def test_a_library_imported_before_is_used_as_it_is():
    out = probe(LOADED + """
    import json, sys
    import kubernetes  # the plain way, all of it
    from processors.k8sattributes import kube
    print(json.dumps({"loaded": loaded(), "same": kube.client is kubernetes.client}))
    """)
    assert out["same"] is True and out["loaded"]["deferred"] == ["config", "dynamic", "informer", "leaderelection",
                                                                  "stream"]


def test_a_layout_the_deferral_does_not_fit_falls_back_to_the_plain_import(tmp_path):
    """A library whose modules take a deferred submodule at their import (`from kubernetes import config` at the
    top of one) would fail later, when that module uses it: the deferral is undone at once and the library is
    imported the plain way. Shown with a small stand-in package of that shape."""
    fake = tmp_path / "kubernetes"
    fake.mkdir()
    (fake / "__init__.py").write_text("from . import config\nfrom . import watch\n")
    (fake / "config.py").write_text("def load():\n    return 'loaded'\n")
    (fake / "watch.py").write_text("from kubernetes import config\n\ndef use():\n    return config.load()\n")
    out = probe(f"""
    import importlib, json, sys
    from processors.k8sattributes import kube  # (with the real library)

    for name in [m for m in sys.modules if m == "kubernetes" or m.startswith("kubernetes.")]:
        del sys.modules[name]
    sys.path.insert(0, {str(tmp_path)!r})
    importlib.invalidate_caches()
    kube.DEFERRED_SUBMODULES = ("config",)
    deferred = kube._import_kubernetes()
    left = sorted(m for m in sys.modules if m == "kubernetes" or m.startswith("kubernetes."))
    import kubernetes
    print(json.dumps({{"deferred": deferred, "left": left, "file": kubernetes.__file__,
                      "use": kubernetes.watch.use()}}))
    """)
    assert out == {"deferred": False, "left": [], "file": str(fake / "__init__.py"), "use": "loaded"}


@pytest.fixture
def api():
    server = ApiServer().start()
    server.create("namespaces", None, {"metadata": {"name": "ml"}})
    server.create("replicasets", "ml", owned("ReplicaSet", "web-1", owner=("Deployment", "web")))
    server.create("jobs", "ml", owned("Job", "nightly-1", owner=("CronJob", "nightly")))
    server.create("pods", "ml", pod("a", "node-1", uid="u-a"))
    try:
        yield server
    finally:
        server.stop()


def test_without_the_generic_calls_the_generated_api_classes_answer_the_same(api, tmp_path, monkeypatch):
    """An older library (no ApiClient.param_serialize): the same requests through its generated API classes."""
    from processors.k8sattributes import informer, kube

    client = informer.build_api_client("kubeConfig", api.write_kubeconfig(tmp_path))
    k = kube.Api(client)

    def answers() -> list:
        out = [json.loads(k.list_pods(field_selector="spec.nodeName=node-1", _preload_content=False).data)["items"],
               json.loads(k.list_pods(namespace="ml", _preload_content=False).data)["items"],
               json.loads(k.list_namespaces(_preload_content=False).data)["items"],
               json.loads(k.read_replica_set("web-1", "ml", _preload_content=False).data),
               json.loads(k.read_job("nightly-1", "ml", _preload_content=False).data)]
        with pytest.raises(kube.ApiException) as exc:
            k.read_replica_set("missing", "ml", _preload_content=False)
        return [*out, exc.value.status]

    try:
        generic = answers()
        monkeypatch.setattr(kube, "GENERIC_CALLS", False)
        generated = answers()
    finally:
        client.close()
    assert generic == generated and generic[-1] == 404
    assert [r.verb for r in api.asked("replicasets")] == ["get", "get", "get", "get"]
