"""The `podmeter` command: run, validate, components, collect --once, inspect.

Exit codes: 0 success (a clean stop on SIGTERM, SIGINT or SIGHUP included); 1 runtime failure, or stopped by a
second signal before shutdown completed; 2 bad usage or bad configuration. Expected failures print one clear
message and never a traceback (PODMETER_DEBUG=1 shows one for bugs).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time

from podmeter import __version__

log = logging.getLogger("podmeter")
FORCED_EXIT = 1  # a second SIGTERM/SIGINT/SIGHUP during shutdown: exit at once, not a clean stop


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", encoding: str = "console") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if encoding == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel({"warn": "WARNING"}.get(level, level.upper()))
    # libraries that log every retry or connection at INFO would drown the agent's own messages
    for noisy in ("kubernetes", "urllib3", "opentelemetry", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def _load(paths: list[str] | None, sets: list[str] | None = None):
    from podmeter.config import ConfigError, default_config_path, load

    paths = paths or [default_config_path()]
    try:
        return load(paths + (sets or []))
    except ConfigError as exc:
        files = ", ".join(paths) + (", --set" if sets else "")
        print(f"podmeter: invalid configuration ({files}):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_validate(args) -> int:
    _load(args.config, args.sets)
    print("configuration is valid", file=sys.stderr)
    return 0


def cmd_components(args) -> int:
    from podmeter.component import KINDS, registry

    reg = registry().load_all()
    for kind in KINDS:
        for type_ in reg.types(kind):
            f = reg.get(kind, type_)
            print(f"{kind:<10} {type_:<18} {f.stability.value:<12} {f.description}")
    for (kind, type_), error in sorted(reg.broken.items()):
        print(f"{kind:<10} {type_:<18} {'broken':<12} failed to load: {error}")
    return 0


def cmd_run(args) -> int:
    from podmeter.runtime import Service, StartError, tune_gc, tune_malloc

    tune_malloc()  # before the components allocate
    config = _load(args.config, args.sets)
    logs = config.service.telemetry.logs
    setup_logging(args.log_level or logs.level, logs.encoding)
    stop = threading.Event()
    signals: list[int] = []

    def on_signal(signum, _frame) -> None:
        if signals:
            # a second signal while stopping (a second Ctrl-C, a supervisor that has waited enough): the operator
            # wants it gone now, not after shutdown_timeout, which may be long or stuck behind a hung exporter
            log.warning("received %s while stopping: exiting now, without waiting for the rest to flush",
                        signal.Signals(signum).name)
            os._exit(FORCED_EXIT)  # the log handler has flushed that line; nothing else is waited for
        signals.append(signum)
        stop.set()

    # SIGHUP (a closed terminal, some supervisors) stops as SIGTERM does, flushing, rather than killing on the spot
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        service = Service(config, strict=args.strict, stopping=stop)  # a signal during start cuts it short
        service.start()
    except StartError as exc:
        log.error("start-up failed: %s", exc)
        return 1
    tune_gc()
    while not stop.wait(1.0):
        pass
    log.info("received %s: stopping receivers and flushing exporters (deadline %gs)",
             signal.Signals(signals[0]).name, config.service.shutdown_timeout)
    flushed = service.shutdown()
    log.info("stopped%s", "" if flushed else " (some data was not flushed before the deadline)")
    return 0


def cmd_collect(args) -> int:
    from podmeter.runtime import Service, StartError

    if not args.once:
        print("podmeter collect: only --once is supported (use `podmeter run` to run continuously)", file=sys.stderr)
        return 2
    config = _load(args.config, args.sets)
    # quieter than `run` by default (the result is the output), but in the configured encoding: a log collector
    # that parses the agent's JSON lines parses these too
    setup_logging(args.log_level or "warning", config.service.telemetry.logs.encoding)
    try:
        service = Service(config, strict=args.strict)
        data = service.collect_once(wait_timeout=args.wait)
    except StartError as exc:
        log.error("start-up failed: %s", exc)
        return 1
    if args.format == "otlp-json":
        from google.protobuf.json_format import MessageToJson
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

        from exporters.otlp.encode import Encoder

        # what the otlp exporters would send (their encoder: attributes that are not UTF-8 become U+FFFD instead of
        # being dropped with a logged traceback), as one request
        request = ExportMetricsServiceRequest()
        for body, _points in Encoder().requests(one_entry_per_resource(data), sys.maxsize):
            request.MergeFromString(body)
        print(MessageToJson(request))
    else:
        print(render_table(data))
    return 0


def one_entry_per_resource(data):
    """The batch with one ResourceMetrics per distinct resource, its receivers' scopes side by side. Receivers that
    describe one container (cgroup, cri, ebpf) give it equal resources once k8sattributes has run; the SDK's encoder
    keys its entries by Resource (which compares by attributes) and would keep only the last one's metrics."""
    from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics

    grouped: dict = {}
    for rm in data.resource_metrics:
        if not any(sm.metrics for sm in rm.scope_metrics):
            continue  # a receiver with nothing (yet): the exporters' marker, not data
        entry = grouped.get(rm.resource)
        if entry is None:
            grouped[rm.resource] = ResourceMetrics(resource=rm.resource, scope_metrics=list(rm.scope_metrics),
                                                   schema_url=rm.schema_url)
        else:
            entry.scope_metrics.extend(rm.scope_metrics)
    return MetricsData(resource_metrics=list(grouped.values()))


def render_table(data) -> str:
    """A readable summary grouped per pod and container (other resources: GPUs, nodes, processes)."""
    groups: dict[tuple, list[str]] = {}
    for rm in data.resource_metrics:
        a = rm.resource.attributes
        if a.get("k8s.pod.uid") or a.get("k8s.pod.name"):
            pod = f"{a.get('k8s.namespace.name', '?')}/{a.get('k8s.pod.name', '?')} uid={a.get('k8s.pod.uid', '?')}"
            container = a.get("k8s.container.name") or (str(a.get("container.id", ""))[:12] or "(pod)")
            key = ("pod", pod, container)
        else:
            other = {k: v for k, v in a.items() if k in ("hw.id", "hw.name", "process.pid", "k8s.node.name")}
            key = ("other", ", ".join(f"{k}={v}" for k, v in sorted(other.items())) or "(node)", "")
        lines = groups.setdefault(key, [])
        extra = {k: v for k, v in a.items() if k.startswith(("process.", "hw.")) and key[0] == "pod"}
        if extra and not any(line.startswith("  #") for line in lines):
            lines.append("  # " + ", ".join(f"{k}={v}" for k, v in sorted(extra.items())))
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                for p in m.data.data_points:
                    attrs = ",".join(f"{k}={v}" for k, v in sorted(p.attributes.items()))
                    value = getattr(p, "value", None)
                    shown = (f"{value:.6g}" if isinstance(value, float) else str(value)) if value is not None \
                        else f"count={p.count} sum={p.sum:.6g}"
                    lines.append(f"  {m.name}{'{' + attrs + '}' if attrs else ''} = {shown} {m.unit or ''}".rstrip())
    out = []
    for (kind, what, container), lines in sorted(groups.items()):
        if not lines:
            continue
        out.append(f"POD {what}  CONTAINER {container}" if kind == "pod" else f"RESOURCE {what}")
        out.extend(lines)
    return "\n".join(out) if out else "(no data points)"


def cmd_inspect(args) -> int:
    try:
        from podmeter import inspect as inspect_cmd
    except ImportError as exc:
        print(f"podmeter inspect is not available: {exc}", file=sys.stderr)
        return 2
    return inspect_cmd.main(args.rest)


def wait_seconds(text: str) -> float:
    """A `--wait` value: seconds (`30`, `0.5`, `inf`) or a duration (`30s`, `2m`). inf and anything longer than
    the longest config duration (87600h) mean no limit and become that: the threading waits the value reaches
    raise OverflowError past the platform's limit."""
    from podmeter.config import MAX_DURATION, parse_duration

    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parse_duration(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds or a duration like 30s or 2m, not {text!r}") from None
    if math.isnan(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, 0 or more, not {text!r}")
    return min(seconds, MAX_DURATION)


_PLAIN_KEY_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_/-]*(?:::[A-Za-z0-9_][A-Za-z0-9_/-]*)*")


class _SetAction(argparse.Action):
    """`--set=a.b.c=VALUE` as the collector's flag reads it: inline YAML `a::b::c: VALUE` merged after every
    --config (so it wins), the key split on dots and the value read as YAML."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        key, sep, rest = value.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set {value!r}: expected KEY.PATH=VALUE, e.g. --set=exporters.debug.verbosity=detailed")
        parts = key.strip().split(".")
        if not all(part.strip() for part in parts):
            parser.error(f"--set {value!r}: an empty key in {key.strip()!r} (a leading, trailing or doubled dot)")
        # as the collector writes it, but quoted when not a plain name: as YAML, `&a`, `*a`, `!a`, `#a`, `[a]` would
        # be read as an anchor, alias, tag, comment or list, and the problem reported for a key path the user never
        # wrote (an empty one for `&a.y`)
        path = "::".join(part.strip() for part in parts)
        if not _PLAIN_KEY_PATH.fullmatch(path):
            path = json.dumps(path)
        # a new list each time: argparse would share (and grow) a mutable default between parses
        sets = [*(getattr(namespace, self.dest) or []), f"yaml:{path}: {rest.strip()}"]
        setattr(namespace, self.dest, sets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="podmeter", description="Per-pod metrics agent for Kubernetes nodes.")
    parser.add_argument("--version", action="version", version=f"podmeter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def config_arg(p, required=False):
        p.add_argument("--config", action="append", metavar="FILE", required=required,
                       help="configuration file, or file:PATH, env:VAR, yaml:KEY::PATH: VALUE as for the collector; "
                            "repeat to merge several in order (default: the shipped pipelines.yaml)")
        p.add_argument("--set", action=_SetAction, dest="sets", metavar="KEY.PATH=VALUE",
                       help="set one config value over the files, as the collector's --set: "
                            "--set=receivers.cgroup.collection_interval=5s (repeatable)")

    p = sub.add_parser("run", help="run the agent")
    config_arg(p)
    p.add_argument("--strict", action="store_true", help="fail if any component cannot start on this host")
    p.add_argument("--log-level", choices=["debug", "info", "warn", "warning", "error"], type=str.lower)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check configuration files and exit (2 on any problem)")
    config_arg(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("components", help="list every receiver, processor, exporter and extension type")
    p.set_defaults(func=cmd_components)

    p = sub.add_parser("collect", help="collect once, process, and print instead of exporting")
    config_arg(p)
    p.add_argument("--once", action="store_true", help="collect once (required)")
    p.add_argument("--format", choices=["table", "otlp-json"], default="table")
    p.add_argument("--wait", type=wait_seconds, default=30.0, metavar="SECONDS",
                   help="longest wait for metadata (the first sync of k8sattributes and of the cri and "
                        "podresources receivers); seconds or a duration (30s, 2m); inf: no limit")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--log-level", choices=["debug", "info", "warn", "warning", "error"], type=str.lower)
    p.set_defaults(func=cmd_collect)

    # inspect parses its own arguments, --help included (podmeter.inspect); argparse only routes to it
    p = sub.add_parser("inspect", help="what podmeter knows of a cgroup line/path or a PID", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    # parsing is inside the try: a Ctrl-C while argparse imports what it needs is an interrupt, not a traceback
    try:
        parser = build_parser()
        # REMAINDER takes nothing that starts with "-" before inspect's first word (`inspect --help`): pass it on
        args, unknown = parser.parse_known_args(argv)
        if getattr(args, "command", None) == "inspect":
            args.rest = unknown + args.rest
        elif unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        code = args.func(args)
        sys.stdout.flush()  # here, not at interpreter exit, so that a reader gone away is caught below
        return code
    except SystemExit as exc:
        return int(exc.code or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`podmeter components | head -1`): stop quietly; what is still buffered goes nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug: one line, not a traceback, unless asked
        if os.environ.get("PODMETER_DEBUG"):
            raise
        print(f"podmeter: internal error: {type(exc).__name__}: {exc} (set PODMETER_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
