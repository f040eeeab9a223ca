"""`make bench` / `python -m bench [options]`; `python -m bench soak [--cycles N]` runs only the soak.

Prints a table of absolute figures and ratios and records the dated results, with the machine, in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from . import machine, report
from .measure import Stats

LOG = logging.getLogger("bench")


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "scale", "soak", "ebpf"],
                   help="all (default): node sizes, peers, eBPF and the soak; or only one of them")
    p.add_argument("--pods", default="10,110,250", help="node sizes in pods (default 10,110,250)")
    p.add_argument("--containers", type=int, default=2, help="containers per pod (default 2)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs on the fake NVML library (default 8)")
    p.add_argument("--procs-per-gpu", type=int, default=32, help="GPU processes per GPU (default 32)")
    p.add_argument("--iterations", type=int, default=0,
                   help="collections measured per component (default: 20 at 10 pods down to 8 at 250, so that "
                        "make bench stays within a few minutes on 2 cores)")
    p.add_argument("--scrapes", type=int, default=20, help="scrapes measured per exporter (default 20)")
    p.add_argument("--cycles", type=int, default=10_000, help="soak pod create/delete cycles (default 10000)")
    p.add_argument("--quick", action="store_true", help="fewer iterations, one node size, a short soak")
    p.add_argument("--no-nvitop", action="store_true", help="skip nvitop-exporter")
    p.add_argument("--no-agent", action="store_true", help="skip the agent process (RSS, its /metrics)")
    p.add_argument("--no-write", action="store_true", help="do not record the results in BENCHMARKS.md")
    p.add_argument("--not-shared", action="store_true",
                   help="the machine had nothing else running (otherwise BENCHMARKS.md says it was shared)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when an acceptance criterion of issue 10 or a soak check is not met")
    p.add_argument("--quiet-table", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        if args.pods == "10,110,250":
            args.pods = "250"
        args.iterations = args.iterations or 6
        args.scrapes = min(args.scrapes, 10)
        if args.cycles == 10_000:
            args.cycles = 400
    return args


def _jsonable(obj):
    if isinstance(obj, Stats):
        return obj.as_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _jsonable(getattr(obj, k)) for k in obj.__dataclass_fields__ if k != "body"}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return None
    return obj


def _soak_subprocess(args) -> dict | None:
    import subprocess
    import tempfile

    from . import REPO

    LOG.info("soak: %d pod create/delete cycles (own process)", args.cycles)
    with tempfile.TemporaryDirectory(prefix="podmeter-bench-") as tmp:
        out = os.path.join(tmp, "soak.json")
        cmd = [sys.executable, "-m", "bench", "soak", "--cycles", str(args.cycles), "--no-write", "--json", out,
               "--quiet-table"]
        rc = subprocess.run(cmd, cwd=REPO).returncode
        try:
            with open(out) as f:
                return json.load(f)["soak"]
        except (OSError, ValueError, KeyError):
            LOG.error("the soak did not finish (exit status %d)", rc)
            return None


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    # components log their own warnings (counted, logged once); keep the bench output readable
    for name in ("bench.cgroup", "bench.nvml", "bench.k8sattributes", "bench.prometheus", "bench.prometheus/gpu",
                 "bench.ebpf", "kubernetes", "urllib3"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    if os.geteuid() != 0:
        print("make bench needs root: it creates pod-shaped cgroups on the kernel and loads eBPF programs",
              file=sys.stderr)
        return 2
    info = machine.describe()
    started = time.monotonic()
    results, ebpf_result, soak_result = [], None, None

    if args.what in ("all", "scale"):
        from .scale import run_scale
        try:
            sizes = [int(x) for x in args.pods.split(",") if x.strip()]
        except ValueError:
            print(f"--pods: expected a comma-separated list of numbers, got {args.pods!r}", file=sys.stderr)
            return 2
        for pods in sizes:
            LOG.info("node of %d pods (%d containers each), %d GPUs x %d processes", pods, args.containers,
                     args.gpus, args.procs_per_gpu)
            iterations = args.iterations or max(8, min(20, 2000 // max(1, pods)))
            results.append(run_scale(pods, args.gpus, args.procs_per_gpu, iterations, args.scrapes,
                                     args.containers, nvitop=not args.no_nvitop, agent=not args.no_agent))
    if args.what in ("all", "ebpf"):
        from . import ebpf
        LOG.info("eBPF overhead against no programs")
        ebpf_result = ebpf.run(quick=args.quick)
    if args.what == "soak":
        from .soak import run_soak
        LOG.info("soak: %d pod create/delete cycles", args.cycles)
        soak_result = run_soak(cycles=args.cycles, batch=50 if args.cycles >= 2000 else 5,
                               live=50 if args.cycles >= 2000 else 20,
                               progress=lambda t, n: LOG.info("  soak %d/%d collections", t, n))
    elif args.what == "all":
        # in a fresh process: the node sizes measured before leave a large heap behind, which would blur RSS
        soak_result = _soak_subprocess(args)
    info["load_after"] = machine.load_average()
    line = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    entry = report.render(info, results, ebpf_result, soak_result, line.strip(), shared=not args.not_shared)
    entry += f"\nTotal bench time: {time.monotonic() - started:.0f} s.\n"
    if not args.quiet_table:
        print()
        print(entry)
    if not args.no_write:
        report.write_benchmarks(entry)
        LOG.info("recorded in %s", report.BENCHMARKS)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_jsonable({"machine": info, "scales": results, "ebpf": ebpf_result, "soak": soak_result}), f,
                      indent=1, default=str)
    failed = [a for a in report.acceptance(results) if a[2] == "FAIL"]
    if soak_result is not None and not ((soak_result["rss_ok"] or soak_result.get("rss_disturbed"))
                                        and soak_result["stale"] == 0 and soak_result["caches_ok"]):
        failed.append(("soak", "", "FAIL"))
    # the numbers are the product: a criterion not met is always reported; --check also makes it the exit status
    if failed:
        LOG.info("%d acceptance criteria or soak checks not met (see the table)", len(failed))
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
