"""The nvml receiver against the real nvidia-ml-py and the fake libnvidia-ml.so.1 (the only test double here: no
NVIDIA GPU can run on these machines), with real processes in real pod-shaped cgroups."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest
from harness import require, require_root
from harness.cgroups import PodCgroup
from harness.fake_nvml import Scenario, build_fake_nvml

from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.telemetry import null_component_telemetry
from receivers.nvml import factory


@pytest.fixture(scope="session")
def fake_lib() -> str:
    require(shutil.which("gcc") is not None, "needs gcc to build the fake libnvidia-ml.so.1")
    return build_fake_nvml()


class Fake:
    def __init__(self, lib: str, path: str) -> None:
        self.lib = lib
        self.path = path

    def write(self, scenario: Scenario) -> Scenario:
        scenario.write(self.path)
        return scenario


@pytest.fixture
def fake(fake_lib, tmp_path, monkeypatch) -> Fake:
    path = str(tmp_path / "scenario.txt")
    Scenario().write(path)
    monkeypatch.setenv("FAKE_NVML_SCENARIO", path)
    return Fake(fake_lib, path)


@pytest.fixture
def make_receiver(fake):
    made = []

    def make(host: Host | None = None, start: bool = True, **config):
        config.setdefault("library_path", fake.lib)
        telemetry = null_component_telemetry("nvml", logging.getLogger("podmeter.nvml.test"))
        settings = CreateSettings(id=ComponentID("nvml"), kind="receiver", logger=telemetry.logger,
                                  telemetry=telemetry)
        r = factory.create(settings, factory.config_model.model_validate(config))
        made.append(r)
        if start:
            r.start(host or Host())
        return r

    yield make
    for r in made:
        r.shutdown()


@pytest.fixture
def pods():
    """Factory of pod-shaped cgroups with a real sleeping process in each; all torn down afterwards."""
    require_root()
    made: list[PodCgroup] = []

    def pod(n_procs: int = 1, **kw) -> tuple[PodCgroup, list[subprocess.Popen]]:
        p = PodCgroup(**kw).create()
        made.append(p)
        return p, [p.spawn(["sleep", "300"]) for _ in range(n_procs)]

    yield pod
    for p in made:
        p.destroy()
