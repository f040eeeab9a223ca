"""`podmeter inspect`: what podmeter makes of a cgroup line or path, or of a running process.

    podmeter inspect cgroup LINE_OR_PATH     one /proc/<pid>/cgroup line (`12:memory:/...`, `0::/...`) or a bare
                                             path; a file (`/proc/1234/cgroup`) or `-` (stdin): its lines
    podmeter inspect pid PID [--proc-root DIR] [--config F ...] [--wait SECONDS]

Prints JSON. Fields the input does not tell are null. Bad input is a message on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from podmeter.attribution import NOT_A_POD, cgroup_path_of, parse_cgroup, read_process

USAGE = ("usage: podmeter inspect cgroup LINE_OR_PATH\n"
         "       podmeter inspect pid PID [--proc-root DIR] [--config FILE ...] [--wait SECONDS]")


_PROC_CGROUP_FILE = re.compile(r"(?:^|/)proc/(?:[0-9]+|self|thread-self)(?:/task/[0-9]+)?/cgroup$")


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing its own usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise _Usage(message)


def main(argv: list[str]) -> int:
    try:
        return _main(list(argv))
    except _Usage as exc:
        print(f"podmeter inspect: {exc}\n{USAGE}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        if argv:
            print(__doc__.strip())
            return 0
        raise _Usage("what to inspect? `cgroup` or `pid`")
    what, rest = argv[0], argv[1:]
    if what in ("cgroup", "pid") and ("-h" in rest or "--help" in rest):
        print(__doc__.strip())
        return 0
    if what == "cgroup":
        return _cgroup(rest)
    if what == "pid":
        return _pid(rest)
    raise _Usage(f"unknown subject {what!r}: expected `cgroup` or `pid`")


def _cgroup(args: list[str]) -> int:
    if len(args) != 1:
        raise _Usage("`inspect cgroup` takes one cgroup line or path (quote it)")
    if not args[0].strip():
        raise _Usage("`inspect cgroup` got an empty line; give a cgroup line, a path or a file")
    if _PROC_CGROUP_FILE.search(args[0]) and not os.path.isfile(args[0]):
        # a process's cgroup file that is gone (the process exited) would otherwise be read as a cgroup path and
        # answer "not a pod", as if the process had been found outside any pod
        raise _Usage(f"cannot read {args[0]}: no such file (has the process exited?)")
    if args[0] == "-" or os.path.isfile(args[0]):
        # `-` or a file such as /proc/<pid>/cgroup (no cgroup path is a regular file): its lines. Bytes: a stray
        # non-UTF-8 byte is replaced, as when the receivers read /proc/<pid>/cgroup, whatever the locale
        try:
            if args[0] == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(args[0], "rb") as f:
                    data = f.read(1 << 20)
        except OSError as exc:
            raise _Usage(f"cannot read {args[0]}: {exc.strerror}") from None
        lines = [line for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
    else:
        lines = [line for line in args[0].splitlines() if line.strip()] or [args[0]]
    # several lines (a whole /proc/<pid>/cgroup): the one that says most, the v2 line first
    best = NOT_A_POD
    for line in sorted(lines, key=lambda line: not line.startswith("0::")):
        ref = parse_cgroup(line)
        if ref.in_pod and (not best.in_pod or ref.container_id and not best.container_id):
            best = ref
    _print(best.as_dict())
    return 0


def _pid(args: list[str]) -> int:
    from podmeter.cli import wait_seconds

    parser = _Parser(prog="podmeter inspect pid", add_help=False)
    parser.add_argument("pid")
    parser.add_argument("--proc-root", default=None)
    parser.add_argument("--config", action="append", default=[])
    parser.add_argument("--wait", type=wait_seconds, default=10.0)
    ns = parser.parse_args(args)
    # ASCII digits: str.isdigit() alone takes "²" (int() refuses it) and "٣" (int() reads 3)
    if not (ns.pid.isascii() and ns.pid.isdigit()) or int(ns.pid) <= 0:
        raise _Usage(f"PID must be a positive integer, not {ns.pid!r}")
    pid = int(ns.pid)
    config = None
    if ns.config:
        from podmeter.config import ConfigError, load

        try:
            config = load(ns.config)
        except ConfigError as exc:
            print("podmeter inspect: invalid configuration:\n" + "\n".join(f"  {p}" for p in exc.problems),
                  file=sys.stderr)
            return 2
    proc_root = ns.proc_root or _proc_root_from(config) or "/proc"
    proc_root = proc_root.rstrip("/") or "/"
    info = read_process(proc_root, pid)
    if info is None:
        print(f"podmeter inspect: no process {pid} under {proc_root} (exited, or not visible in this PID "
              "namespace: use the host's /proc with --proc-root)", file=sys.stderr)
        return 2
    out = {
        "pid": info.pid,
        "start_time": info.start_time,
        "nspid": list(info.nspid),
        "cgroup_lines": list(info.cgroup_lines),
        "cgroup_path": cgroup_path_of(info.cgroup_path),
        **info.ref.as_dict(),
        "attributes": info.attributes(),
    }
    if config is not None:
        out["pod_metadata"], note = _pod_metadata(config, info.ref.pod_uid, ns.wait)
        if note:
            out["pod_metadata_note"] = note
    _print(out)
    return 0


def _proc_root_from(config) -> str | None:
    """proc_root of the config's cgroup (else nvml) receiver: inspect sees processes as the agent would."""
    if config is None:
        return None
    for kind in ("cgroup", "nvml", "ebpf"):
        for cid, model in config.receivers.items():
            if cid.type == kind and getattr(model, "proc_root", None):
                return model.proc_root
    return None


def _pod_metadata(config, pod_uid: str | None, wait: float) -> tuple[dict | None, str | None]:
    """The pod's attributes from the config's k8sattributes processor (its informer), if it has one."""
    if pod_uid is None:
        return None, "the process is not in a pod cgroup"
    from podmeter.component import ComponentUnavailable, CreateSettings, Host, registry
    from podmeter.telemetry import null_component_telemetry

    entries = [(cid, model) for cid, model in config.processors.items() if cid.type == "k8sattributes"]
    if not entries:
        return None, "the configuration has no k8sattributes processor"
    factory = registry().get("processor", "k8sattributes")
    if factory is None:
        return None, "the k8sattributes processor is not installed"
    cid, model = entries[0]
    logger = logging.getLogger(f"podmeter.inspect.{cid}")
    settings = CreateSettings(id=cid, kind="processor", logger=logger, telemetry=null_component_telemetry(str(cid)))
    host = Host()
    processor = None
    try:
        processor = factory.create(settings, model)
        processor.start(host)
        if not processor.ready(wait):
            pods = getattr(processor, "pods_reflector", None)
            if pods is not None and pods.settled.is_set() and not pods.synced.is_set():
                # a 403 or 401 ends the wait at once: not a slow API server
                return None, ("the API server refused podmeter's pod list (403 or 401): grant list and watch on "
                              "pods to its service account, or check its token")
            return None, f"k8sattributes had no first sync from the API server within {wait:g}s"
        for provider in host.lookup("pod_metadata"):
            found = provider.pod(pod_uid)
            if found:
                return dict(found), None
        return None, f"pod {pod_uid} is not known to the API server (for this node)"
    except ComponentUnavailable as exc:
        return None, f"k8sattributes cannot run here: {exc}"
    except Exception as exc:  # a broken API connection must not turn inspect into a traceback
        return None, f"k8sattributes failed: {type(exc).__name__}: {exc}"
    finally:
        if processor is not None:
            try:
                processor.shutdown()
            except Exception:
                pass


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))
