"""The process.* resource attributes of the nvml receiver, read from real processes: one that renames its main
thread as PyTorch does (`pt_main_thread`), non-dumpable ones under another uid, and podmeter reading them without
CAP_SYS_PTRACE as the DaemonSet runs it. NVML is the fake libnvidia-ml.so.1 (no GPU can run here)."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys

import pytest
from harness import require_binary, require_root
from harness.fake_nvml import GPU, GiB, Process, Scenario

from receivers.nvml.receiver import MAX_OWNERS

from .test_nvml_receiver import points

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = 65534

# prctl options: PR_SET_DUMPABLE 4, PR_SET_NAME 15
_CHILD = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
name, uids, dumpable = sys.argv[1], sys.argv[2], sys.argv[3]
if uids:
    r, e, s = (int(x) for x in uids.split(","))
    if r and e and s:
        os.setresgid(r, e, s)
        os.setgroups([])
    os.setresuid(r, e, s)
if name:
    assert libc.prctl(15, name.encode(), 0, 0, 0) == 0
if dumpable == "0":
    assert libc.prctl(4, 0, 0, 0, 0) == 0
print("ready", flush=True)
time.sleep(300)
"""


@pytest.fixture
def spawn():
    """Start a real Python process (renamed, under other uids, non-dumpable); killed afterwards."""
    made: list[subprocess.Popen] = []

    def start(name: str = "", uids: tuple[int, int, int] | None = None, dumpable: bool = True) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", _CHILD, name, ",".join(map(str, uids or ())),
                              "1" if dumpable else "0"], stdout=subprocess.PIPE, text=True)
        made.append(p)
        assert p.stdout.readline().strip() == "ready"
        return p

    yield start
    for p in made:
        p.kill()
        p.wait()


def process_res(md) -> dict[int, dict]:
    return {res["process.pid"]: res for res, _, _ in points(md, "process.gpu.memory.usage")}


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_executable_name_is_the_exe_not_the_renamed_main_thread(fake, make_receiver, spawn):
    p = spawn(name="pt_main_thread")
    assert comm(p.pid) == "pt_main_thread"  # what /proc/<pid>/comm (and nvidia-smi's name) says
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=p.pid, used_mem=GiB)]))
    res = process_res(make_receiver().collect())[p.pid]
    exe = os.path.realpath(sys.executable)  # the interpreter the venv's python links to
    assert res["process.executable.path"] == exe
    assert res["process.executable.name"] == os.path.basename(exe)  # python3.11, not pt_main_thread
    assert res["process.command"] == sys.executable  # argv[0], as started


def test_owner_is_the_real_uid_not_the_owner_of_proc(fake, make_receiver, spawn):
    """/proc/<pid> belongs to the effective uid; the owner is the real one, as psutil's username() (nvitop-exporter's
    `username`) says. Also a non-dumpable process under another uid (whose /proc files, not its directory on this
    kernel, belong to root)."""
    require_root()
    # real uid nobody, effective root (a setuid-root program run by nobody looks the same)
    real_only = spawn(uids=(NOBODY, 0, 0))
    assert os.stat(f"/proc/{real_only.pid}").st_uid == 0  # the case: the directory says root
    other = spawn(uids=(NOBODY, NOBODY, NOBODY), dumpable=False)
    assert os.stat(f"/proc/{other.pid}/status").st_uid == 0
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=other.pid, used_mem=GiB),
                                                           Process(pid=real_only.pid, used_mem=GiB)]))
    res = process_res(make_receiver().collect())
    nobody = pwd.getpwuid(NOBODY).pw_name
    assert res[real_only.pid]["process.owner"] == nobody
    assert res[other.pid]["process.owner"] == nobody


_CAPPED = r"""
import json, logging, os, sys
from podmeter.component import ComponentID, CreateSettings, Host
from podmeter.telemetry import null_component_telemetry
from receivers.nvml import factory
pid, lib = int(sys.argv[1]), sys.argv[2]
try:
    os.readlink(f"/proc/{pid}/exe")
    readable = True
except PermissionError:
    readable = False
t = null_component_telemetry("nvml", logging.getLogger("nvml"))
s = CreateSettings(id=ComponentID("nvml"), kind="receiver", logger=t.logger, telemetry=t)
r = factory.create(s, factory.config_model.model_validate({"library_path": lib}))
r.start(Host())
md = r.collect()
r.shutdown()
res = [dict(rm.resource.attributes) for rm in md.resource_metrics]
print(json.dumps({"readable": readable, "res": [a for a in res if a.get("process.pid") == pid]}))
"""


def test_without_ptrace_access_the_name_falls_back_to_comm(fake, spawn):
    """podmeter as the DaemonSet runs it (root without CAP_SYS_PTRACE) cannot read the exe link of another user's
    non-dumpable process: the name is comm, nothing else is lost, nothing fails."""
    require_root()
    setpriv = require_binary("setpriv")
    p = spawn(name="pt_main_thread", uids=(NOBODY, NOBODY, NOBODY), dumpable=False)
    fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=p.pid, used_mem=GiB)]))
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run([setpriv, "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace", "--",
                          sys.executable, "-c", _CAPPED, str(p.pid), fake.lib],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["readable"] is False  # the case: no ptrace-read access
    res = got["res"][0]
    assert res["process.executable.name"] == "pt_main_thread"
    assert "process.executable.path" not in res
    assert res["process.command"] == sys.executable
    assert res["process.owner"] == pwd.getpwuid(NOBODY).pw_name
    assert res["process.creation.time"].endswith("Z")


def test_owner_cache_is_bounded(make_receiver):
    """Random uids (OpenShift gives each namespace its own range) must not grow the uid -> name cache forever."""
    r = make_receiver(start=False)
    for uid in range(2_000_000, 2_000_000 + MAX_OWNERS + 200):
        assert r._owner(uid) == str(uid)  # unknown to this image's passwd
    assert len(r._owners) <= MAX_OWNERS
    assert r._owner(0) == "root"


def test_a_replaced_binary_keeps_its_name(fake, make_receiver, tmp_path):
    """A job whose binary was deleted since it started (a package upgrade) reads `<path> (deleted)` from exe: the
    name and path stay those of the binary, so its series do not change name."""
    binary = tmp_path / "trainer"
    with open("/bin/sleep", "rb") as src:
        binary.write_bytes(src.read())
    binary.chmod(0o755)
    p = subprocess.Popen([str(binary), "300"])
    try:
        binary.unlink()
        assert os.readlink(f"/proc/{p.pid}/exe").endswith(" (deleted)")  # the case
        fake.write(Scenario(gpus=[GPU(uuid=UUID0)], processes=[Process(pid=p.pid, used_mem=GiB)]))
        res = process_res(make_receiver().collect())[p.pid]
        assert res["process.executable.name"] == "trainer"
        assert res["process.executable.path"] == str(binary)
    finally:
        p.kill()
        p.wait()
