"""The checked-in gRPC stubs must be what `make proto` generates from each receiver's api.proto."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
from harness import require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("component", ["cri", "podresources"])
def test_generated_stubs_are_fresh(tmp_path, component):
    require(shutil.which("make") is not None, "needs make")
    require(importlib.util.find_spec("grpc_tools") is not None, "needs grpcio-tools (pip install -e '.[dev]')")
    folder = os.path.join(ROOT, "receivers", component)
    subprocess.run(["make", "-s", "-C", folder, "proto", f"PY={sys.executable}", f"OUT={tmp_path}"], check=True)
    for name in ("api_pb2.py", "api_pb2_grpc.py"):
        with open(os.path.join(folder, name)) as f:
            checked_in = f.read()
        with open(tmp_path / name) as f:
            fresh = f.read()
        assert checked_in == fresh, f"receivers/{component}/{name} is stale: run `make proto`"


def test_both_protos_load_in_one_process():
    # both files are named api.proto upstream; registered as cri/api.proto and podresources/api.proto
    from receivers.cri import api_pb2 as cri
    from receivers.podresources import api_pb2 as podresources

    assert cri.DESCRIPTOR.name == "cri/api.proto" and cri.DESCRIPTOR.package == "runtime.v1"
    assert podresources.DESCRIPTOR.name == "podresources/api.proto" and podresources.DESCRIPTOR.package == "v1"


def _minimum(requirement_prefix: str) -> tuple[int, ...]:
    import re
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(rf"{requirement_prefix}\s*[<>=~!]", d)]
    return tuple(int(x) for x in re.search(r">=([\d.]+)", spec).group(1).split("."))


@pytest.mark.parametrize("component", ["cri", "podresources"])
def test_declared_minimums_run_the_checked_in_stubs(component):
    """A plain `pip install` (no constraints.txt) may pick any version pyproject.toml allows: the generated code
    refuses a protobuf runtime older than (or of another major than) its gencode, and a grpcio older than the
    grpcio-tools that made it, at import. The declared minimums must be at least those."""
    import re

    folder = os.path.join(ROOT, "receivers", component)
    with open(os.path.join(folder, "api_pb2.py")) as f:
        gencode = tuple(int(x) for x in re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),",
            f.read()).groups())
    with open(os.path.join(folder, "api_pb2_grpc.py")) as f:
        grpc_made = tuple(int(x) for x in re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", f.read()).group(1).split("."))
    assert _minimum("protobuf") >= gencode
    assert _minimum("protobuf")[0] == gencode[0]
    assert _minimum("grpcio") >= grpc_made
