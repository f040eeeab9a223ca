"""The printed table of absolute figures and ratios, and the dated entry in BENCHMARKS.md."""

from __future__ import annotations

import math
import os
import re

from . import REPO

BENCHMARKS = os.path.join(REPO, "BENCHMARKS.md")
MARKER = "<!-- results: newest first; `make bench` inserts here -->"
KEEP = 6  # dated entries kept in the file (older ones are in git history)

# Acceptance thresholds of issue 10
MAX_RATIO_VS_NVITOP = 0.25
MAX_FULL_COLLECTION_CPU = 0.050
MAX_RSS = 100 * 1024 * 1024


def ms(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    return f"{seconds * 1e3:.2f} ms"


def mib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**20:.1f} MiB"


def kib(n: int | None) -> str:
    return "-" if not n else f"{n / 1024:.0f} KiB"


OTLP_OURS, OTLP_SDK = "exporter/otlp: encode", "opentelemetry-exporter-otlp encode_metrics (same batch)"
GPU_PIPELINE = "gpu pipeline (nvml+k8sattributes+prometheus)"
GPU_PIPELINE_DAEMONSET = "gpu pipeline, per_container on (the shipped DaemonSet configuration)"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.3f}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def full_collection_cpu(r) -> float | None:
    """cgroup + nvml + k8sattributes per collection (the acceptance's 'full collection'), medians summed."""
    parts = [r.cpu.get(k) for k in ("receiver/cgroup", "receiver/nvml", "processor/k8sattributes")]
    if any(p is None for p in parts):
        return None
    return sum(p.median for p in parts)


def full_collection_floor(r) -> str | None:
    """What the full collection cannot go below on this machine with the shipped metric set, from floors measured
    in the same run: the cgroup files read through kept fds, the cgroup batch's OTel objects made from values at
    hand, and nvml and k8sattributes as measured (discovery and all parsing left out)."""
    kept = r.raw.get("files kept open, pread") if r.raw else None
    parts = [r.cpu.get(k) for k in ("receiver/nvml", "processor/k8sattributes")]
    if kept is None or r.model_floor is None or any(p is None for p in parts):
        return None
    total = kept.median + r.model_floor.median + sum(p.median for p in parts)
    return (f"Floor of the {r.pods}-pod full collection, from this run: {ms(kept.median)} reading the cgroup files "
            f"through kept fds + {ms(r.model_floor.median)} making the cgroup batch's OTel objects alone + "
            f"{ms(parts[0].median)} nvml + {ms(parts[1].median)} k8sattributes = {ms(total)}, before discovery "
            f"or any parsing (target: under {ms(MAX_FULL_COLLECTION_CPU)}).")


def acceptance(results) -> list[tuple[str, str, str]]:
    """(criterion, measured, verdict) rows."""
    rows = []
    for r in results:
        if r.gpus == 8 and r.procs == 256:
            pm = r.cpu.get(GPU_PIPELINE)
            nv = r.nvitop
            k8s_in = "processor/k8sattributes" in r.cpu
            if pm is not None and nv is not None:
                q = pm.median / nv.cpu_total.median
                rows.append((f"{r.pods} pods, 8x32: CPU per collection <= 1/4 of nvitop-exporter's"
                             + ("" if k8s_in else " (k8sattributes not in the pipeline yet)"),
                             f"{ms(pm.median)} vs {ms(nv.cpu_total.median)} = {q:.3f}", verdict(q <= MAX_RATIO_VS_NVITOP)))
            lat = r.gpu_scrape.get("latency")
            if lat is not None and nv is not None:
                q = lat.median / nv.scrape.latency.median
                rows.append((f"{r.pods} pods, 8x32: scrape latency <= 1/4 of nvitop-exporter's",
                             f"{ms(lat.median)} vs {ms(nv.scrape.latency.median)} = {q:.3f}",
                             verdict(q <= MAX_RATIO_VS_NVITOP)))
            if r.attribution:
                a = r.attribution
                ok = a["attributed"] == a["processes"] and a.get("named", a["processes"]) == a["processes"]
                named = f", {a['named']} named by k8sattributes" if "named" in a else " (names: k8sattributes missing)"
                rows.append((f"{r.pods} pods, 8x32: every GPU process attributed to its pod",
                             f"{a['attributed']}/{a['processes']} uid+container id{named}", verdict(ok)))
        if r.pods == 250:
            full = full_collection_cpu(r)
            parts = ", ".join(k for k in ("receiver/cgroup", "receiver/nvml", "processor/k8sattributes")
                              if k not in r.cpu)
            rows.append(("250 pods: full collection (cgroup+nvml+k8sattributes) < 50 ms CPU",
                         ms(full) if full is not None else f"not measurable: missing {parts}",
                         verdict(None if full is None else full < MAX_FULL_COLLECTION_CPU)))
            if r.agent is not None:
                comps = "+".join(r.agent.receivers)
                rows.append((f"250 pods: agent RSS < 100 MiB ({comps})", f"{mib(r.agent.rss)} (peak {mib(r.agent.rss_peak)})",
                             verdict(r.agent.rss_peak < MAX_RSS)))
    return rows


def render(machine: dict, results, ebpf: dict | None, soak: dict | None, args_line: str, shared: bool) -> str:
    lines = [f"### {machine['date']}: `{args_line}`", ""]
    lines.append(f"Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_mib']} MiB, kernel "
                 f"{machine['kernel']}, {machine['cgroups']}, Python {machine['python']}. Load average before the "
                 f"run: {machine['load_before'][0]:.2f}; after: {machine.get('load_after', (0,))[0]:.2f}."
                 + (" **The machine was shared with other work during the run** (other engineers' builds and "
                    "tests): absolute figures are noisy; ratios come from the same run." if shared else ""))
    lines.append("")

    acc = acceptance(results)
    if acc:
        lines += ["Acceptance (issue 10):", ""]
        lines += _table(["criterion", "measured", "verdict"], [list(a) for a in acc])
        lines.append("")
        for r in results:
            floor = full_collection_floor(r) if r.pods == 250 else None
            if floor:
                lines += [floor, ""]

    for r in results:
        kind = "real cgroups" if r.real_cgroups else "fixture tree"
        lines.append(f"**{r.pods} pods** ({r.containers} containers, {kind}), {r.gpus} GPUs x "
                     f"{r.procs // max(1, r.gpus)} processes ({r.procs} real PIDs in pod cgroups)")
        lines.append("")
        rows = []
        for stage, st in r.cpu.items():
            note = ""
            if stage == OTLP_SDK and OTLP_OURS in r.cpu:
                note = f"podmeter otlp encode / SDK = {ratio(r.cpu[OTLP_OURS].median, st.median)}"
            elif stage == GPU_PIPELINE_DAEMONSET and r.nvitop is not None:
                # not an acceptance row: issue 10 compares the code's defaults (per process) with nvitop-exporter
                note = f"/ nvitop = {ratio(st.median, r.nvitop.cpu_total.median)}"
            rows.append([stage, ms(st.median), ms(st.mean), str(r.points.get(stage, "")), note])
        if r.raw:
            cg = r.cpu.get("receiver/cgroup")
            for k, st in r.raw.items():
                what = (f"raw read, {k} ({r.raw_files} files"
                        + (f", {r.raw_dirs} dirs)" if k == "files+listing" else ")"))
                rows.append([what, ms(st.median), ms(st.mean), "",
                             f"cgroup receiver / raw = {ratio(cg.median if cg else None, st.median)}"])
        if r.model_floor is not None:
            cg = r.cpu.get("receiver/cgroup")
            rows.append([f"OTel objects of the cgroup batch alone ({r.model_metrics} metrics, nothing read)",
                         ms(r.model_floor.median), ms(r.model_floor.mean), str(r.points.get("receiver/cgroup", "")),
                         f"cgroup receiver / objects = {ratio(cg.median if cg else None, r.model_floor.median)}"])
        if r.nvitop is not None:
            nv = r.nvitop
            pm = r.cpu.get(GPU_PIPELINE)
            nvml = r.cpu.get("receiver/nvml")
            rows.append([f"nvitop-exporter {nv.version}: collection (host+devices)", ms(nv.cpu_total.median),
                         ms(nv.cpu_total.mean), "", f"podmeter gpu pipeline / nvitop = "
                         f"{ratio(pm.median if pm else None, nv.cpu_total.median)}"])
            rows.append(["nvitop-exporter: devices part only", ms(nv.cpu_devices.median), ms(nv.cpu_devices.mean), "",
                         f"podmeter nvml receiver / nvitop devices = "
                         f"{ratio(nvml.median if nvml else None, nv.cpu_devices.median)}"])
            rows.append(["nvitop-exporter: CPU per scrape (renders on scrape)", ms(nv.scrape.cpu_per_scrape), "", "",
                         ""])
        lines += _table(["CPU per call", "median", "mean", "points", "ratio"], rows)
        lines.append("")
        srows = []
        for label, s in (("podmeter, in-process exporter, all receivers", r.scrape),
                         ("podmeter, in-process exporter, GPU pipeline only", r.gpu_scrape)):
            if s:
                srows.append([label, ms(s["latency"].median), ms(s["latency"].p90), str(s["series"]),
                              kib(s["bytes"]), kib(s["bytes_gzip"]), ""])
        if r.agent is not None:
            a = r.agent
            srows.append([f"podmeter agent process ({'+'.join(a.receivers)})", ms(a.scrape.latency.median),
                          ms(a.scrape.latency.p90), str(a.scrape.series), kib(a.scrape.bytes_plain),
                          kib(a.scrape.bytes_gzip), ""])
        if r.nvitop is not None:
            nv = r.nvitop
            lat = r.gpu_scrape.get("latency") if r.gpu_scrape else None
            srows.append([f"nvitop-exporter {nv.version}", ms(nv.scrape.latency.median), ms(nv.scrape.latency.p90),
                          str(nv.scrape.series), kib(nv.scrape.bytes_plain), kib(nv.scrape.bytes_gzip),
                          f"podmeter GPU / nvitop = {ratio(lat.median if lat else None, nv.scrape.latency.median)}"])
        if srows:
            lines += _table(["/metrics scrape", "median", "p90", "series", "bytes", "gzip", "ratio"], srows)
            lines.append("")
        mrows = []
        if r.agent is not None:
            a = r.agent
            mrows.append([f"podmeter agent ({'+'.join(a.receivers)}"
                          + (", k8sattributes" if "processor/k8sattributes" in r.cpu else "") + ")",
                          mib(a.rss), mib(a.rss_peak), f"{ms(a.cpu_per_interval)} per interval over {a.intervals}"])
        if r.nvitop is not None:
            mrows.append([f"nvitop-exporter {r.nvitop.version}", mib(r.nvitop.rss), "", ""])
        mrows.append(["bench process (everything in-process + harness)", mib(r.rss_in_process), "", ""])
        lines += _table(["process", "RSS", "peak RSS", "CPU (whole process)"], mrows)
        lines.append("")
        for k, why in r.missing.items():
            lines.append(f"- not measured: `{k}`: {why}")
        for n in r.notes:
            lines.append(f"- note: {n}")
        if r.missing or r.notes:
            lines.append("")

    if ebpf is not None:
        lines.append(f"**eBPF overhead against no programs** ({ebpf.get('source')})")
        lines.append("")
        if ebpf.get("rows"):
            lines += _table(["profile", "ns per syscall", "added", "added per tracked syscall",
                             "ns per context switch (ping-pong)", "added per switch"],
                            [[x["profile"], f"{x['syscall_ns']:.0f}", f"{x['syscall_added_ns']:+.0f}",
                              f"{x['tracked_added_ns']:+.0f}" if "tracked_added_ns" in x else "-",
                              f"{x['switch_ns']:.0f}", f"{x['switch_added_ns']:+.0f}"] for x in ebpf["rows"]])
        if ebpf.get("map_read"):
            lines.append("")
            lines += _table(["cgroups in the map", "batch read", "first collect()", "collect()", "points"],
                            [[str(m["cgroups"]), f"{m.get('batch_read_ms', '-')} ms",
                              f"{m.get('first_collect_ms', '-')} ms", f"{m.get('collect_ms', '-')} ms",
                              str(m.get("points", "-"))] for m in ebpf["map_read"]])
            lines.append("")
            lines.append("(map read figures are wall time, from the receiver's own benchmark)")
        if "result" in ebpf:
            lines.append("```")
            lines.append(str(ebpf["result"]))
            lines.append("```")
        if ebpf.get("error"):
            lines.append("")
            lines.append(f"- not measured: {ebpf['error']}")
        lines.append("")

    if soak is not None:
        lines += soak_lines(soak)
    return "\n".join(lines) + "\n"


def soak_lines(soak: dict) -> list[str]:
    lines = [f"**Soak**: {soak['cycles']} pod create/delete cycles ({soak['ticks']} collections, "
             f"{soak['live']} pods alive at a time, a GPU process per pod), {soak['seconds']:.0f} s", ""]
    rows = [["RSS after warm-up", f"{mib(soak['rss_warm'])} -> max {mib(soak['rss_max'])} "
             f"(+{soak['rss_growth'] * 100:.1f}%)",
             verdict(soak["rss_ok"]) if soak["rss_ok"] or not soak.get("rss_disturbed") else "INCONCLUSIVE"],
            ["stale series of deleted pods in the exposition", str(soak["stale"]), verdict(soak["stale"] == 0)]]
    for name, c in sorted(soak["caches"].items()):
        rows.append([f"`{name}`", f"{c['warm']} at warm-up; max {c['early']} early, {c['max_late']} late; "
                     f"{c['final']} at the end",
                     verdict(c["ok"])])
    lines += _table(["check", "measured", "verdict"], rows)
    for n in soak.get("notes", []):
        lines.append(f"- {n}")
    lines.append("")
    return lines


def write_benchmarks(entry: str) -> None:
    """Insert the entry under the marker, newest first, keeping the last KEEP entries."""
    try:
        with open(BENCHMARKS) as f:
            text = f.read()
    except FileNotFoundError:
        text = ""
    if MARKER not in text:
        text = text.rstrip() + "\n\n## Results\n\n" + MARKER + "\n"
    head, _, tail = text.partition(MARKER)
    entries = [e for e in re.split(r"(?m)^(?=### )", tail.strip()) if e.strip()]
    entries = [entry.strip() + "\n"] + [e.strip() + "\n" for e in entries]
    with open(BENCHMARKS, "w") as f:
        f.write(head + MARKER + "\n\n" + "\n".join(entries[:KEEP]))
