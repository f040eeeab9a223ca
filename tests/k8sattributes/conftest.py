from __future__ import annotations

import logging

import pytest
from harness.apiserver import ApiServer

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.telemetry import null_component_telemetry
from processors.k8sattributes import factory

NODE = "node-1"


@pytest.fixture
def api():
    server = ApiServer(bookmark_interval=0.3).start()
    server.create("namespaces", None, {"metadata": {"name": "ml", "labels": {"team": "vision"}}})
    server.create("namespaces", None, {"metadata": {"name": "other"}})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_processor(tmp_path):
    """Build and start k8sattributes processors against a kubeconfig for the stand-in; shut them down after."""
    made = []

    def make(api: ApiServer | None, host: Host | None = None, start: bool = True, **config):
        cfg = {"filter": {"node": NODE}, "request_timeout": "1s", "watch_timeout": "2s",
               "reconnect": {"initial_interval": "50ms", "max_interval": "200ms"}}
        if api is not None:
            cfg.update(auth_type="kubeConfig", kube_config_path=api.write_kubeconfig(tmp_path))
        else:
            cfg.update(auth_type="none")
        cfg.update(config)
        telemetry = null_component_telemetry("k8sattributes")
        settings = CreateSettings(id=ComponentID("k8sattributes"), kind="processor",
                                  logger=logging.getLogger("test.k8sattributes"), telemetry=telemetry)
        proc = factory.create(settings, factory.config_model.model_validate(cfg))
        made.append(proc)
        if start:
            proc.start(host or Host())
        return proc

    yield make
    for p in made:
        p.shutdown()
