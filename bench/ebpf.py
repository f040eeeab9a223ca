"""eBPF overhead against no programs, in one run: the receiver's own bench entry point when it has one
(receivers/ebpf/bench.py), else a microbenchmark here: ns per syscall and per context switch with no programs, then
with the ebpf receiver started in each profile (it is a black box here; only its start/shutdown are used)."""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import statistics
import subprocess
import tempfile

from .components import Built, create, start_all

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "ebpf_work.c")
LOG = logging.getLogger("bench")


def _workload() -> str:
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    exe = os.path.join(tempfile.gettempdir(), f"podmeter-bench-ebpf-work-{digest}")
    if not os.path.exists(exe):
        tmp = f"{exe}.{os.getpid()}"
        subprocess.run(["gcc", "-O2", "-o", tmp, SOURCE], check=True)
        os.replace(tmp, exe)
    return exe


def _run_workload(exe: str, syscalls: int, rounds: int, repeats: int) -> tuple[float, float]:
    sc, sw = [], []
    for _ in range(repeats):
        out = subprocess.run([exe, str(syscalls), str(rounds)], capture_output=True, text=True, check=True).stdout
        fields = dict(kv.split("=") for kv in out.split())
        sc.append(float(fields["syscall_ns"]))
        sw.append(float(fields["switch_ns"]))
    return statistics.median(sc), statistics.median(sw)


def entry_point():
    """The receiver's bench entry point, if it offers one: receivers.ebpf.bench with run() or main()."""
    try:
        mod = importlib.import_module("receivers.ebpf.bench")
    except ImportError:
        return None
    return getattr(mod, "run", None) or getattr(mod, "bench", None)


def from_entry_point(result) -> dict:
    """The receiver's own figures (receivers/ebpf/bench.py run()) in this report's shape; unknown shapes are shown
    as they are."""
    out: dict = {"source": "receivers.ebpf.bench (the receiver's own benchmark, run by make bench)", "rows": [],
                 "map_read": [], "result": result}
    try:
        ov = result["overhead"]
        base = ov["baseline_ns"]
        out["rows"].append({"profile": "none", "syscall_ns": base.get("getppid_ns", float("nan")),
                            "syscall_added_ns": 0.0, "tracked_added_ns": 0.0,
                            "switch_ns": base.get("switch_ns", float("nan")), "switch_added_ns": 0.0})
        for profile, v in ov.items():
            if not isinstance(v, dict) or "added_ns_per_syscall" not in v:
                continue
            out["rows"].append({"profile": profile, "syscall_ns": base.get("getppid_ns", 0) + v["added_ns_per_syscall"],
                                "syscall_added_ns": v["added_ns_per_syscall"],
                                "tracked_added_ns": v.get("added_ns_per_tracked_syscall", float("nan")),
                                "switch_ns": base.get("switch_ns", 0) + v.get("added_ns_per_pingpong_switch", 0),
                                "switch_added_ns": v.get("added_ns_per_context_switch", float("nan"))})
        for n, m in (result.get("map_read") or {}).items():
            out["map_read"].append({"cgroups": n, **m})
        out.pop("result")
    except (KeyError, TypeError):
        out["rows"] = []
    return out


def run(quick: bool = False) -> dict:
    """-> {"source": ..., "rows": [{"profile", "syscall_ns", "syscall_added_ns", "switch_ns", "switch_added_ns"}],
    "error": "..."}"""
    fn = entry_point()
    if fn is not None:
        import inspect

        params = inspect.signature(fn).parameters
        kwargs = {}
        if "rounds" in params:
            kwargs["rounds"] = 2 if quick else 3
        if "sizes" in params:
            kwargs["sizes"] = (1_000,) if quick else (1_000, 10_000)
        if "quick" in params:
            kwargs["quick"] = quick
        try:
            return from_entry_point(fn(**kwargs))
        except Exception as exc:  # noqa: BLE001
            LOG.warning("the ebpf bench entry point failed (%s: %s); measuring here instead", type(exc).__name__, exc)
    try:
        exe = _workload()
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"source": "bench", "rows": [], "error": f"cannot build the workload: {exc}"}
    syscalls, rounds, repeats = (300_000, 20_000, 3) if quick else (2_000_000, 100_000, 5)
    base_sc, base_sw = _run_workload(exe, syscalls, rounds, repeats)
    rows = [{"profile": "none", "syscall_ns": base_sc, "switch_ns": base_sw, "syscall_added_ns": 0.0,
             "switch_added_ns": 0.0}]
    errors = []
    for profile in ("minimal", "standard", "comprehensive"):
        built = Built()
        comp = create(built, "receiver", "ebpf", {"profile": profile})
        if comp is not None:
            start_all(built, [("receiver", "ebpf", comp)])
        if built.get("ebpf") is None:
            errors.append(f"{profile}: {built.missing.get('ebpf', 'not started')}")
            continue
        try:
            built.get("ebpf").collect()
            sc, sw = _run_workload(exe, syscalls, rounds, repeats)
            built.get("ebpf").collect()
        finally:
            built.shutdown()
        rows.append({"profile": profile, "syscall_ns": sc, "switch_ns": sw,
                     "syscall_added_ns": sc - base_sc, "switch_added_ns": sw - base_sw})
    # the baseline again, after: the machine is shared, drift shows here
    after_sc, after_sw = _run_workload(exe, syscalls, rounds, repeats)
    rows.append({"profile": "none (again, after)", "syscall_ns": after_sc, "switch_ns": after_sw,
                 "syscall_added_ns": after_sc - base_sc, "switch_added_ns": after_sw - base_sw})
    return {"source": "bench (ebpf_work.c against the receiver's profiles)", "rows": rows,
            "error": "; ".join(errors)}
