from __future__ import annotations

import logging

import pytest
from harness import wait_for
from harness.containerd import running

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.telemetry import null_component_telemetry
from receivers.cri import api_pb2 as pb
from receivers.cri import factory


@pytest.fixture(scope="module")
def ctrd():
    with running() as c:
        yield c


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



@pytest.fixture
def layers_measured(ctrd):
    """Wait until containerd's snapshot syncer has measured these containers' writable layers (until then it
    answers timestamp 0, and the receiver omits the layer rather than emit a 0)."""
    def wait(*cids: str) -> None:
        def measured():
            stats = ctrd.rt.ListContainerStats(pb.ListContainerStatsRequest(), timeout=10).stats
            return all(s.writable_layer.timestamp for s in stats if s.attributes.id in cids)

        wait_for(measured, timeout=15, interval=0.2, what="containerd to measure the writable layers")

    return wait
