"""The `podmeter` command as a shell user meets it: a reader that goes away (`| head -1`), `inspect --help`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "podmeter.cli", *args], capture_output=True, text=True, timeout=60,
                          **kwargs)


@pytest.mark.parametrize("args", [["components"], ["inspect", "cgroup", "0::/"], ["--version"]])
def test_output_into_a_closed_pipe_is_quiet(args):
    """`podmeter components | head -1`: the reader has gone; no BrokenPipeError, no "internal error"."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to write_end now fails with EPIPE, as after `head -1` exits
    try:
        res = subprocess.run([sys.executable, "-m", "podmeter.cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                             text=True, timeout=60)
    finally:
        os.close(write_end)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr


@pytest.mark.parametrize("args", [["inspect", "--help"], ["inspect", "-h"], ["inspect", "pid", "--help"],
                                  ["inspect", "cgroup", "--help"]])
def test_inspect_help_is_inspects_own(args):
    """The help a user asks for names every option of inspect (`--proc-root` is what deploy.md tells them to use)."""
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert "--proc-root" in res.stdout and "inspect cgroup LINE_OR_PATH" in res.stdout


def test_unknown_option_of_another_command_is_still_refused():
    res = cli("validate", "--bogus")
    assert res.returncode == 2 and "unrecognized arguments: --bogus" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("value", ["inf", "1e999", "infinity"])
def test_collect_wait_without_limit_can_be_waited_on(value):
    """`collect --wait inf` (no limit): the value reaches threading waits (the cri, podresources and k8sattributes
    first syncs), which raised OverflowError for inf, shown as an internal error as soon as anything waited."""
    from podmeter.cli import build_parser

    wait = build_parser().parse_args(["collect", "--once", "--wait", value]).wait
    synced = threading.Event()
    timer = threading.Timer(0.05, synced.set)  # a first sync that arrives a moment later
    timer.start()
    try:
        assert synced.wait(wait) is True
    finally:
        timer.cancel()


@pytest.mark.parametrize("args", [["collect", "--once"], ["inspect", "pid", "1"]])
@pytest.mark.parametrize("value", ["nan", "-1", "soon"])
def test_bad_wait_is_a_usage_error(args, value):
    res = cli(*args, "--wait", value)
    assert res.returncode == 2, res.stderr
    assert "--wait" in res.stderr and repr(value) in res.stderr and "Traceback" not in res.stderr


def test_wait_takes_a_duration_too():
    from podmeter.cli import build_parser

    assert build_parser().parse_args(["collect", "--once", "--wait", "2m"]).wait == 120.0


@pytest.mark.parametrize("key, shown", [("&a.y", "&a: unknown top-level key"), ("*a.y", "*a: unknown top-level key"),
                                        ("#a.y", "#a: unknown top-level key"), ("!a.y", "!a: unknown top-level key"),
                                        ("[a].y", "[a]: unknown top-level key")])
def test_set_reports_the_key_path_as_written(key, shown):
    """The key of --set is a key path, not YAML: `&a` was read as an anchor, and the problem named an empty key."""
    res = cli("validate", f"--set={key}=1")
    assert res.returncode == 2, res.stderr
    assert f"  {shown}" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("key", [".a", "a..b", "receivers.cgroup."])
def test_set_refuses_an_empty_key(key):
    res = cli("validate", f"--set={key}=1")
    assert res.returncode == 2 and "an empty key" in res.stderr, res.stderr


def test_set_still_sets_a_value():
    res = cli("validate", "--set=receivers.cgroup.collection_interval=5s")
    assert res.returncode == 0, res.stderr
    res = cli("validate", "--set=receivers.cgroup.collection_interval=5")
    assert res.returncode == 2 and "receivers::cgroup::collection_interval: invalid duration" in res.stderr


def test_collect_once_logs_in_the_configured_encoding(tmp_path):
    """service::telemetry::logs::encoding: json applies to `collect --once` as to `run`; the real cri receiver
    warns once at start about its missing socket."""
    config = tmp_path / "config.yaml"
    config.write_text(f"""
receivers:
  cri:
    endpoint: unix://{tmp_path}/absent.sock
exporters:
  debug:
service:
  telemetry:
    logs: {{encoding: json}}
  pipelines:
    metrics: {{receivers: [cri], exporters: [debug]}}
""")
    res = cli("collect", "--once", "--wait", "0", "--config", str(config))
    assert res.returncode == 0, res.stderr
    lines = res.stderr.splitlines()
    assert any("absent.sock" in line for line in lines), res.stderr
    for line in lines:
        assert json.loads(line)["level"] in ("warning", "error"), line


def test_inspect_cgroup_of_an_exited_process_says_so():
    """`inspect cgroup /proc/PID/cgroup` after the process exited: the file is gone, and its name was read as a
    cgroup path, answering nulls ("not a pod") with exit 0 as if the process had been found outside any pod."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: /proc/<pid> is gone
    res = cli("inspect", "cgroup", f"/proc/{proc.pid}/cgroup")
    assert res.returncode == 2, res.stdout
    assert f"cannot read /proc/{proc.pid}/cgroup" in res.stderr and "Traceback" not in res.stderr
    res = cli("inspect", "cgroup", "/proc/self/cgroup")  # one that exists is still read
    assert res.returncode == 0 and '"pod_uid"' in res.stdout, res.stderr


def test_inspect_cgroup_of_nothing_is_a_usage_error():
    res = cli("inspect", "cgroup", " ")
    assert res.returncode == 2 and "empty line" in res.stderr, (res.stdout, res.stderr)
