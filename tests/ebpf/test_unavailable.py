"""Hosts the receiver cannot run on: a clear ComponentUnavailable at start (the runtime runs on without it), and
configuration problems reported as clear errors."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
from harness import require, require_binary, require_root
from pydantic import ValidationError

from podmeter.component import ComponentID, ComponentUnavailable, CreateSettings, Host
from podmeter.telemetry import null_component_telemetry
from receivers.ebpf import factory
from receivers.ebpf.cgroups import find_cgroup2
from receivers.ebpf.syscalls import TABLES

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make(**config):
    settings = CreateSettings(id=ComponentID("ebpf"), kind="receiver", logger=logging.getLogger("test.ebpf"),
                              telemetry=null_component_telemetry("ebpf"))
    return factory.create(settings, factory.config_model.model_validate(config))


def test_missing_object_says_run_make_bpf(tmp_path):
    r = make(bpf_object=str(tmp_path / "podmeter.bpf.o"))
    with pytest.raises(ComponentUnavailable, match="make bpf"):
        r.start(Host())


def test_cgroup_v1_only_is_unavailable(tmp_path):
    obj = tmp_path / "podmeter.bpf.o"
    obj.write_bytes(b"")  # the cgroup check comes before loading
    (tmp_path / "cpu").mkdir()  # a v1-looking tree without cgroup2
    r = make(bpf_object=str(obj), cgroup_root=str(tmp_path))
    require(os.path.exists("/sys/kernel/btf/vmlinux"), "needs a kernel with BTF (checked before cgroups)")
    with pytest.raises(ComponentUnavailable, match="no cgroup2 hierarchy"):
        r.start(Host())


def test_find_cgroup2_via_mountinfo(tmp_path):
    root = tmp_path / "cg"
    (root / "v2").mkdir(parents=True)
    info = tmp_path / "mountinfo"
    info.write_text(f"30 25 0:26 / {root}/cpu rw - cgroup cgroup rw,cpu\n"
                    f"31 25 0:27 / {root}/v2 rw,relatime - cgroup2 cgroup2 rw\n")
    assert find_cgroup2(str(root), str(info)) == f"{root}/v2"
    assert find_cgroup2(str(tmp_path / "elsewhere"), str(info)) is None


def test_without_capabilities_is_unavailable(built_object):
    require_root()
    setpriv = shutil.which("setpriv")
    require(setpriv is not None, "needs setpriv (util-linux) to drop privileges")
    nobody = pwd.getpwnam("nobody")
    code = (
        "import logging\n"
        "from podmeter.component import ComponentID, ComponentUnavailable, CreateSettings, Host\n"
        "from podmeter.telemetry import null_component_telemetry\n"
        "from receivers.ebpf import factory\n"
        "s = CreateSettings(ComponentID('ebpf'), 'receiver', logging.getLogger('t'), null_component_telemetry('ebpf'))\n"
        "r = factory.create(s, factory.config_model.model_validate({}))\n"
        "try:\n"
        "    r.start(Host())\n"
        "except ComponentUnavailable as e:\n"
        "    print('UNAVAILABLE', e)\n"
    )
    proc = subprocess.run([setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
                           "--inh-caps=-all", sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    require("Permission denied" not in proc.stderr, f"the checkout is not readable by nobody: {proc.stderr[-300:]}")
    assert "UNAVAILABLE missing capabilities" in proc.stdout, proc.stdout + proc.stderr
    assert "CAP_BPF" in proc.stdout


@pytest.mark.parametrize("config, message", [
    ({"profile": "fast"}, "profile"),
    ({"tracked_syscalls": ["read", "nosuchcall"]}, "nosuchcall"),
    ({"attach_order": []}, "attach_order"),
    ({"attach_order": ["kprobe"]}, "attach_order"),
    ({"max_cgroups": 0}, "max_cgroups"),
    ({"metrics": {"container.nope": {"enabled": False}}}, "container.nope"),
    ({"programs": {"tcpp": True}}, "tcpp"),
])
def test_bad_config_is_a_clear_error(config, message):
    with pytest.raises(ValidationError, match=message):
        factory.config_model.model_validate(config)


def test_profiles_and_switches():
    f = lambda **c: factory.config_model.model_validate(c).features()  # noqa: E731
    assert f(profile="minimal") == {"context_switches", "syscalls", "oom_kills"}
    assert "syscall_latency" not in f(profile="standard")
    assert "runqueue_latency" in f(profile="standard")
    assert "syscall_latency" in f(profile="comprehensive")
    assert f(profile="custom") == set()
    assert f(profile="custom", programs={"tcp": True}) == {"tcp"}
    assert "tcp" not in f(profile="standard", programs={"tcp": False})
    off = f(profile="comprehensive", latency_tracking=False)
    assert not off & {"runqueue_latency", "syscall_latency"} and "syscalls" in off
    # syscall latency rides on the syscall program
    assert "syscall_latency" not in f(profile="comprehensive", programs={"syscalls": False})


def test_custom_profile_with_nothing_enabled_is_unavailable(built_object):
    r = make(profile="custom")
    require(os.path.exists("/sys/kernel/btf/vmlinux") and find_cgroup2("/sys/fs/cgroup") is not None,
            "needs BTF and cgroup2 (checked first)")
    require_root()
    with pytest.raises(ComponentUnavailable, match="enables nothing"):
        r.start(Host())


def test_histogram_fold_is_exact():
    from receivers.ebpf.receiver import BOUNDS_US, SLOT_TO_BUCKET, fold

    # slot k holds values below 2^k us (slot 0: below 1 us): every bound is a power of 4, so each slot falls
    # entirely inside one exported bucket
    for k, j in enumerate(SLOT_TO_BUCKET[:-1]):
        upper = 1 if k == 0 else 2 ** k
        lower = 0 if k == 0 else 2 ** (k - 1)
        assert j == len(BOUNDS_US) or upper <= BOUNDS_US[j]
        assert j == 0 or lower >= BOUNDS_US[j - 1]
    assert SLOT_TO_BUCKET[-1] == len(BOUNDS_US)
    slots = list(range(1, 28))
    assert sum(fold(slots)) == sum(slots) and len(fold(slots)) == len(BOUNDS_US) + 1


def test_corrupt_object_is_unavailable_with_the_reason(tmp_path):
    require_root()
    require(os.path.exists("/sys/kernel/btf/vmlinux") and find_cgroup2("/sys/fs/cgroup") is not None,
            "needs BTF and cgroup2 (checked first)")
    bad = tmp_path / "podmeter.bpf.o"
    bad.write_bytes(b"not an ELF object")
    with pytest.raises(ComponentUnavailable, match="cannot load"):
        make(bpf_object=str(bad)).start(Host())


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_object_not_matching_leaves_nothing_attached(tmp_path):
    """An object that loads and attaches but lacks a map this podmeter reads (an old build): the receiver is
    unavailable, and its programs are detached and every fd closed, not left running for the agent's life."""
    require_root()
    require(os.path.exists("/sys/kernel/btf/vmlinux") and find_cgroup2("/sys/fs/cgroup") is not None,
            "needs BTF and cgroup2 (checked first)")
    clang = require_binary("clang")
    ebpf = os.path.join(REPO, "receivers", "ebpf")
    require(os.path.exists(os.path.join(ebpf, "vmlinux.h")), "vmlinux.h not generated: run make bpf")
    src = open(os.path.join(ebpf, "podmeter.bpf.c")).read()
    src = src.replace("} diag SEC", "} diag_renamed SEC").replace("&diag,", "&diag_renamed,")
    (tmp_path / "podmeter.bpf.c").write_text(src)
    obj = tmp_path / "podmeter.bpf.o"
    arch = {"x86_64": "x86", "aarch64": "arm64"}[os.uname().machine]
    build = subprocess.run([clang, "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", f"-I{ebpf}", "-c",
                            str(tmp_path / "podmeter.bpf.c"), "-o", str(obj)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    before = _fds()
    with pytest.raises(ComponentUnavailable, match="lacks program or map 'diag'"):
        make(profile="minimal", bpf_object=str(obj)).start(Host())
    assert _fds() == before


def test_start_shutdown_cycles_leak_no_fds(built_object):
    require_root()
    require(os.path.exists("/sys/kernel/btf/vmlinux") and find_cgroup2("/sys/fs/cgroup") is not None,
            "needs BTF and cgroup2")
    r = make(profile="comprehensive")  # the first start loads libbpf and opens what stays open (the library)
    r.start(Host())
    r.collect()
    r.shutdown()
    before = _fds()
    for profile in ("minimal", "standard", "comprehensive"):
        r = make(profile=profile)
        r.start(Host())
        r.collect()
        r.shutdown()
        assert r.collect().resource_metrics[0].scope_metrics[0].metrics == []  # nothing after shutdown
    assert _fds() == before


@pytest.mark.parametrize("machine", sorted(TABLES))
def test_default_config_validates_on_every_architecture(monkeypatch, machine):
    # No arm64 machine here: os.uname is replaced so the validator checks against that architecture's table, as
    # it would on a Grace or Graviton node. arm64 (asm-generic) has no epoll_wait: the default named it anyway (a
    # default is not validated), so arm64 nodes silently tracked no epoll wait at all.
    import receivers.ebpf.config as cfg

    real = os.uname()
    monkeypatch.setattr(cfg.os, "uname", lambda: SimpleNamespace(**{
        f: getattr(real, f) for f in ("sysname", "nodename", "release", "version")}, machine=machine))
    c = factory.config_model.model_validate({})
    assert c.tracked_syscalls and all(TABLES[machine][n] < 512 for n in c.tracked_syscalls)
    assert len(c.syscall_numbers()) == len(c.tracked_syscalls)
    # the same choice of calls on every architecture: epoll_wait() is the epoll_pwait syscall on arm64, which the
    # defaults name anyway (Go's runtime waits with it everywhere): named once
    assert len(c.tracked_syscalls) == len(set(c.tracked_syscalls))
    assert set(c.tracked_syscalls) == {n if n in TABLES[machine] else cfg.DEFAULT_ALIASES[n]
                                       for n in cfg.DEFAULT_SYSCALLS}
    assert "epoll_pwait" in c.tracked_syscalls
    assert ("epoll_wait" in c.tracked_syscalls) == ("epoll_wait" in TABLES[machine])
    # arm64's fstatat is named newfstatat by the kernel (__NR_newfstatat)
    assert factory.config_model.model_validate({"tracked_syscalls": ["newfstatat"]}).syscall_numbers()
