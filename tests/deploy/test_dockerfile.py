"""The Dockerfile, checked without a container engine (none can run here, so `docker build` is not exercised):
its stages, labels and the paths it copies are parsed and checked, and what its build stage does is replayed
on the real toolchain (make the eBPF object, build the wheel, install it into a fresh virtual environment) to show
the runtime stage gets a working `podmeter` with the eBPF object inside.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from harness import require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(ROOT, "Dockerfile")
OCI_LABELS = {"title", "description", "version", "revision", "created", "licenses", "source"}


def parse(path: str = DOCKERFILE) -> tuple[dict[str, str], list[dict]]:
    """(global ARGs, stages): each stage {"from", "name", "instructions": [(INSTRUCTION, args)]}."""
    lines: list[str] = []
    buf = ""
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not buf and line.lstrip().startswith("#"):
                continue
            if line.endswith("\\"):
                buf += line[:-1] + " "
                continue
            buf += line
            if buf.strip():
                lines.append(buf.strip())
            buf = ""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append({"from": image, "name": name, "instructions": []})
        elif not stages:
            assert instr == "ARG", f"only ARG may precede the first FROM, found {instr}"
            key, _, default = rest.partition("=")
            global_args[key] = default
        else:
            stages[-1]["instructions"].append((instr, rest))
    return global_args, stages


def _labels(stage: dict) -> dict[str, str]:
    out = {}
    for instr, rest in stage["instructions"]:
        if instr == "LABEL":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                out[key] = value
    return out


def _runs(stage: dict) -> str:
    return " ".join(rest for instr, rest in stage["instructions"] if instr == "RUN")


def _copies(stage: dict) -> list[tuple[list[str], list[str], str]]:
    """(flags, sources, destination) of each COPY/ADD."""
    out = []
    for instr, rest in stage["instructions"]:
        if instr in ("COPY", "ADD"):
            parts = shlex.split(rest) if not rest.startswith("[") else __import__("json").loads(rest)
            flags = [p for p in parts if p.startswith("--")]
            paths = [p for p in parts if not p.startswith("--")]
            out.append((flags, paths[:-1], paths[-1]))
    return out


def _dockerignore() -> list[str]:
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    path = path.rstrip("/")
    for pat in patterns:
        pat = pat.removeprefix("**/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(os.path.basename(path), pat) or path.startswith(pat + "/"):
            return True
    return False


def test_stages_build_then_slim_runtime():
    global_args, stages = parse()
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    build, runtime = stages[0], stages[-1]
    assert build["name"] == "build"
    # the virtual environment is copied between stages: same Python image, so its interpreter links hold
    assert build["from"] == runtime["from"] and "slim" in runtime["from"], (build["from"], runtime["from"])
    runs = _runs(build)
    for pkg in ("clang", "bpftool", "libbpf-dev"):
        assert re.search(rf"apt-get install [^&]*\b{pkg}\b", runs), f"build stage installs {pkg}"
    assert "make -C receivers/ebpf" in runs
    assert "pip wheel" in runs and "python -m venv /opt/podmeter" in runs and "-c constraints.txt" in runs
    assert runs.index("make -C receivers/ebpf") < runs.index("pip wheel"), "the eBPF object goes into the wheel"
    rt_runs = _runs(runtime)
    assert re.search(r"apt-get install [^&]*\blibbpf1\b", rt_runs)
    for tool in ("clang", "llvm", "gcc", "bpftool", "libbpf-dev", "make"):
        assert not re.search(rf"apt-get install [^&]*\b{re.escape(tool)}\b", rt_runs), f"{tool} in the runtime image"
    assert "rm -rf /var/lib/apt/lists" in rt_runs
    assert any(f == ["--from=build"] and s == ["/opt/podmeter"] for f, s, _ in _copies(runtime))


def test_oci_labels_and_version():
    _, stages = parse()
    runtime = stages[-1]
    labels = _labels(runtime)
    keys = {k.removeprefix("org.opencontainers.image.") for k in labels if k.startswith("org.opencontainers.image.")}
    assert OCI_LABELS <= keys, OCI_LABELS - keys
    args = {rest.partition("=")[0]: rest.partition("=")[2] for instr, rest in runtime["instructions"] if instr == "ARG"}
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}" and args["VERSION"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]


def test_runtime_user_ports_and_entrypoint():
    _, stages = parse()
    runtime = dict((i, r) for i, r in stages[-1]["instructions"])
    user = runtime["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "non-root by default (the DaemonSet opts in to UID 0, see k8s/)"
    assert set(runtime["EXPOSE"].split()) == {"9464", "8888", "13133"}
    assert runtime["ENTRYPOINT"] == '["podmeter"]'
    assert "/opt/podmeter/bin" in runtime["ENV"]


def test_copied_paths_exist_and_are_in_the_build_context():
    _, stages = parse()
    ignore = _dockerignore()
    for stage in stages:
        for flags, sources, _ in _copies(stage):
            if any(f.startswith("--from=") for f in flags):
                continue
            for src in sources:
                matches = glob.glob(os.path.join(ROOT, src))
                assert matches, f"COPY {src}: no such path in the repository"
                assert not _ignored(src, ignore), f"COPY {src}: excluded by .dockerignore"
    # the wheel needs README.md (pyproject's readme) and the ebpf Makefile
    for needed in ("README.md", "pyproject.toml", "constraints.txt", "receivers/ebpf/Makefile"):
        assert not _ignored(needed, ignore), needed
    assert _ignored("receivers/ebpf/podmeter.bpf.o", ignore), "the eBPF object is built in the image, not copied"
    assert _ignored(".venv", ignore) and _ignored(".git", ignore)


def _daemonset_command() -> list[str]:
    import yaml

    with open(os.path.join(ROOT, "k8s", "base", "daemonset.yaml")) as f:
        ds = yaml.safe_load(f)
    return ds["spec"]["template"]["spec"]["containers"][0]["command"]


def test_daemonset_command_is_on_the_image_path():
    assert _daemonset_command() == ["podmeter"]


@pytest.mark.slow
def test_build_stage_replayed_gives_a_working_venv_with_the_bpf_object(tmp_path):
    """The build stage's steps on this machine's real toolchain, in a copy of exactly what the stage COPYs."""
    require(shutil.which("clang") is not None and shutil.which("bpftool") is not None,
            "needs clang and bpftool (make test-deps)")
    require(os.path.exists("/sys/kernel/btf/vmlinux") or os.path.exists(os.path.join(ROOT, "receivers/ebpf/vmlinux.h")),
            "needs kernel BTF for vmlinux.h")
    _, stages = parse()
    ctx = tmp_path / "src"
    ctx.mkdir()
    ignore = _dockerignore()
    for _flags, sources, dest in _copies(stages[0]):
        for src in sources:
            for path in glob.glob(os.path.join(ROOT, src)):
                rel = os.path.relpath(path, ROOT)
                target = ctx / (rel if dest.endswith("/") and os.path.isdir(path) else os.path.basename(rel))
                if os.path.isdir(path):
                    shutil.copytree(path, target, ignore=lambda d, names: [
                        n for n in names if _ignored(os.path.relpath(os.path.join(d, n), ROOT), ignore)])
                else:
                    shutil.copy(path, target)
    assert not list(ctx.glob("receivers/ebpf/*.bpf.o"))
    subprocess.run(["make", "-s", "-C", str(ctx / "receivers" / "ebpf")], check=True, capture_output=True, timeout=300)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir",
                    str(dist), str(ctx)], check=True, capture_output=True, timeout=300)
    wheels = list(dist.glob("podmeter-*.whl"))
    assert len(wheels) == 1
    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for needed in ("receivers/ebpf/podmeter.bpf.o", "podmeter/pipelines.yaml", "receivers/cri/api_pb2.py",
                   "receivers/podresources/api_pb2_grpc.py", "exporters/prometheus/__init__.py"):
        assert needed in names, needed
    eps = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheels[0]).read(eps).decode()
    assert "podmeter = podmeter.cli:main" in text and "ebpf = receivers.ebpf:factory" in text
    # the runtime venv: the wheel over the locked dependencies (taken from this venv: no network needed)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # dependencies come from this venv's site-packages through PYTHONPATH, after the new venv's own (PYTHONPATH
    # entries get no .pth processing, so the repository's editable install stays out); run from a neutral cwd
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    deps = [p for p in sys.path if p.endswith("site-packages")]
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in venv.glob("lib/python*/site-packages")) + os.pathsep + \
        os.pathsep.join(deps)
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import receivers.ebpf, os, podmeter; print(receivers.ebpf.__file__); "
                          "print(os.path.exists(os.path.join(os.path.dirname(receivers.ebpf.__file__), "
                          "'podmeter.bpf.o')))"],
                         capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    where, has_obj = out.stdout.split()
    assert where.startswith(str(venv)), f"imported from {where}, not the installed wheel"
    assert has_obj == "True"
    comps = subprocess.run([str(venv / "bin" / "podmeter"), "components"], capture_output=True, text=True,
                           cwd=str(tmp_path), env=env, timeout=60)
    assert comps.returncode == 0, comps.stderr
    for kind in ("cgroup", "nvml", "ebpf", "k8sattributes", "prometheus", "otlp", "health_check"):
        assert kind in comps.stdout
