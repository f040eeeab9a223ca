"""The `podmeter` command as a shell user meets it: a reader that goes away (`| head -1`), `inspect --help`."""

from __future__ import annotations

import os
import subprocess
import sys

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
