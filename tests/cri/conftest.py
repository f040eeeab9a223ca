from __future__ import annotations

import logging

import pytest
from harness import require
from harness.containerd import Containerd, available

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.telemetry import null_component_telemetry
from receivers.cri import factory


@pytest.fixture(scope="module")
def ctrd():
    ok, why = available()
    require(ok, why)
    c = Containerd().start()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def make_receiver():
    """Build and start cri receivers; shut them all down after the test."""
    made = []

    def make(endpoint: str, **config):
        telemetry = null_component_telemetry("cri", logging.getLogger("test.cri"))
        settings = CreateSettings(id=ComponentID("cri"), kind="receiver", logger=telemetry.logger,
                                  telemetry=telemetry)
        receiver = factory.create(settings, factory.config_model.model_validate({"endpoint": endpoint, **config}))
        host = Host()
        receiver.start(host)
        made.append(receiver)
        (provider,) = host.lookup("container_metadata")
        return receiver, provider, telemetry

    yield make
    for r in made:
        r.shutdown()

