"""`podmeter inspect`: JSON for every cgroup form, nulls for non-pod cgroups, exit 2 (no traceback) on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from attribution.test_parse import CASES, NOT_PODS

from podmeter import inspect


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "podmeter.cli", "inspect", *args], capture_output=True, text=True,
                          input=stdin, timeout=60)


@pytest.mark.parametrize("line,uid,cid,runtime,qos", CASES, ids=[c[0][:90] for c in CASES])
def test_inspect_cgroup_every_form(capsys, line, uid, cid, runtime, qos):
    assert inspect.main(["cgroup", line]) == 0
    assert json.loads(capsys.readouterr().out) == {"pod_uid": uid, "container_id": cid, "runtime": runtime,
                                                   "qos_class": qos}


@pytest.mark.parametrize("line", [x for x in NOT_PODS if x.strip()])
def test_inspect_cgroup_non_pods_are_nulls(capsys, line):
    assert inspect.main(["cgroup", line]) == 0
    assert json.loads(capsys.readouterr().out) == {"pod_uid": None, "container_id": None, "runtime": None,
                                                   "qos_class": None}


def test_through_the_cli_and_stdin():
    line, uid, cid, runtime, qos = CASES[10]  # the `:cri-containerd:` form
    res = run_cli("cgroup", line)
    assert res.returncode == 0 and json.loads(res.stdout) == {"pod_uid": uid, "container_id": cid,
                                                              "runtime": runtime, "qos_class": qos}
    # a whole /proc/<pid>/cgroup on stdin (hybrid: v1 lines and the v2 line)
    whole = "\n".join(["9:name=systemd:/", "4:memory:" + CASES[0][0].split(":", 2)[2], "3:cpuset:/", "0::/"])
    res = run_cli("cgroup", "-", stdin=whole)
    assert res.returncode == 0 and json.loads(res.stdout)["container_id"] == CASES[0][2]


@pytest.mark.parametrize("args", [[], ["cgroup"], ["cgroup", "a", "b"], ["pid"], ["pid", "abc"], ["pid", "-5"],
                                  ["pid", "0"], ["pid", "999999999"], ["what"], ["pid", "1", "--bogus"],
                                  ["pid", "1", "--config", "/nonexistent.yaml"]])
def test_bad_input_exits_2_without_traceback(args):
    res = run_cli(*args)
    assert res.returncode == 2, (args, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and res.stderr.strip()
    assert res.stdout == ""


def test_inspect_pid_of_this_process(capsys):
    import os

    assert inspect.main(["pid", str(os.getpid())]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pid"] == os.getpid() and doc["cgroup_lines"] and doc["attributes"]["process.pid"] == os.getpid()


def test_inspect_pid_with_a_config_without_k8sattributes(tmp_path, capsys):
    import os

    cfg = tmp_path / "c.yaml"
    cfg.write_text("receivers:\n  cgroup:\n    proc_root: /proc\nexporters:\n  debug:\nservice:\n  pipelines:\n"
                   "    metrics:\n      receivers: [cgroup]\n      exporters: [debug]\n")
    assert inspect.main(["pid", str(os.getpid()), "--config", str(cfg)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pod_metadata"] is None and doc["pod_metadata_note"]


def test_stdin_that_is_not_utf8_under_a_strict_locale():
    """`cat cgroup-dump | podmeter inspect cgroup -` in a UTF-8 locale (strict decoding) with a stray byte: parsed,
    not an "internal error"."""
    line, uid, cid, runtime, qos = CASES[0]
    res = subprocess.run([sys.executable, "-m", "podmeter.cli", "inspect", "cgroup", "-"], capture_output=True,
                         input=b"9:name=systemd:/\xff\xfe\n" + line.encode() + b"\n", timeout=60,
                         env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["pod_uid"] == uid


def test_cgroup_file_given_as_the_path_is_read(tmp_path):
    """`podmeter inspect cgroup /proc/1234/cgroup` (or a saved copy) reads the file's lines; it used to parse the file
    name itself and print nulls, as if the process were not in a pod."""
    line, uid, cid, _, _ = CASES[0]
    saved = tmp_path / "cgroup"
    saved.write_text("\n".join(["9:name=systemd:/", line, "0::/"]) + "\n")
    res = run_cli("cgroup", str(saved))
    assert res.returncode == 0, res.stderr
    assert (json.loads(res.stdout)["pod_uid"], json.loads(res.stdout)["container_id"]) == (uid, cid)


def test_inspect_pid_says_the_api_server_refused_the_pod_list(tmp_path, capsys):
    """A 403 on the pod list ends k8sattributes' wait at once: inspect says the list was refused, not that the API
    server gave no first sync within the wait (which sends the user looking for a slow or unreachable server)."""
    from harness import require_root
    from harness.apiserver import ApiServer
    from harness.cgroups import PodCgroup

    require_root()
    pod = PodCgroup(qos="burstable").create()
    sleeper = pod.spawn(["sleep", "60"], stdin=subprocess.DEVNULL)
    api = ApiServer().start()
    try:
        api.forbid("pods")
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"receivers:\n  cgroup:\n    proc_root: /proc\nprocessors:\n  k8sattributes:\n"
                       f"    auth_type: kubeConfig\n    kube_config_path: {api.write_kubeconfig(tmp_path)}\n"
                       "    filter: {node: n1}\nexporters:\n  debug:\nservice:\n  pipelines:\n    metrics:\n"
                       "      receivers: [cgroup]\n      processors: [k8sattributes]\n      exporters: [debug]\n")
        assert inspect.main(["pid", str(sleeper.pid), "--config", str(cfg), "--wait", "20"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["pod_metadata"] is None and "refused" in doc["pod_metadata_note"], doc["pod_metadata_note"]
    finally:
        api.stop()
        sleeper.kill()
        sleeper.wait()
        pod.destroy()
