"""Soak: pods created and deleted through the API stand-in and pod-shaped cgroups, with PID churn on the fake GPUs,
a collection through the whole pipeline after every batch. Asserts boundedness, never time:

- RSS flat after warm-up (the largest RSS after warm-up within 10% of the RSS at the end of warm-up);
- no stale series: the prometheus exporter's exposition never holds a pod deleted before the previous collection
  (one collection of grace: a receiver may report a deleted pod's final counts once, as the ebpf receiver does);
- every container every component holds (census.py) stops growing after warm-up.

`python -m bench soak --cycles 10000` runs the full one (part of `make bench`); tests/soak runs a short one.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import subprocess
import tempfile
import time
from collections import deque

from harness import cgroups, free_port
from harness.fake_nvml import GPU, MiB, Process, Scenario, build_fake_nvml

from . import api as api_standin
from .census import census
from .components import Built, create, start_all
from .measure import proc_rss_bytes
from .node import NODE_NAME, BenchPod, make_pod

LOG = logging.getLogger("bench.soak")
UID_RE = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class _Node:
    """What the soak needs of a node: workdir, scenario path, nvml lib (for the API stand-in adapter)."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.scenario_path = os.path.join(workdir, "nvml-scenario.tsv")
        self.nvml_lib = build_fake_nvml()
        self.cgroup_root = cgroups.ROOT
        self.pods: list[BenchPod] = []


def _components(node: _Node, api, with_ebpf: bool) -> Built:
    built = Built()
    os.environ["FAKE_NVML_SCENARIO"] = node.scenario_path
    cfgs = [
        ("receiver", "cgroup", {"cgroup_root": node.cgroup_root}),
        ("receiver", "nvml", {"library_path": node.nvml_lib}),
        ("exporter", "prometheus", {"endpoint": f"127.0.0.1:{free_port()}"}),
    ]
    if with_ebpf:
        cfgs.append(("receiver", "ebpf", {"profile": "minimal"}))
    if api is not None:
        cfgs.append(("processor", "k8sattributes", api.k8sattributes_config(NODE_NAME, soak=True)))
    pending = []
    for kind, type_, cfg in cfgs:
        comp = create(built, kind, type_, cfg)
        if comp is not None:
            pending.append((kind, type_, comp))
    start_all(built, pending)
    k8s = built.get("k8sattributes")
    if k8s is not None and not k8s.ready(30.0):
        built.missing["k8sattributes"] = "no first sync from the API stand-in within 30 s"
    return built


class _LivePod:
    def __init__(self, pod: BenchPod, cg: cgroups.PodCgroup, proc: subprocess.Popen, gpu: int) -> None:
        self.pod, self.cg, self.proc, self.gpu = pod, cg, proc, gpu


def run_soak(cycles: int = 10_000, live: int = 40, batch: int = 20, gpus: int = 2, warmup_fraction: float = 0.25,
             with_ebpf: bool = True, progress=None) -> dict:
    """One cycle = one pod created and, later, deleted. Returns the figures and verdicts (see report.soak_lines)."""
    if not (os.geteuid() == 0 and cgroups.hierarchies()):
        raise RuntimeError("the soak needs root and mounted cgroups")
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="podmeter-soak-")
    node = _Node(workdir)
    Scenario(gpus=[GPU(uuid=f"GPU-soak-{g}") for g in range(gpus)]).write(node.scenario_path)
    api, why = api_standin.start(node)
    notes = [] if api is not None else [why]
    built = _components(node, api, with_ebpf)
    for k, v in built.missing.items():
        notes.append(f"`{k}` not in the soak: {v}")
    receivers = [built.get(t) for t in ("cgroup", "nvml", "ebpf") if built.get(t) is not None]
    k8s = built.get("k8sattributes")
    prom = built.get("prometheus")

    alive: deque[_LivePod] = deque()
    deleted: set[str] = set()
    just_deleted: list[str] = []
    previous_deleted: list[str] = []
    ticks = max(1, cycles // batch)
    warm_tick = max(1, int(ticks * warmup_fraction))
    rss: list[int] = []
    sample_ticks: list[int] = []
    sizes: list[dict[str, int]] = []
    stale = 0
    stale_examples: list[str] = []
    created = 0

    def create_pod(i: int) -> None:
        pod = make_pod(i, containers=1, tag="s")
        cg = cgroups.PodCgroup(uid=pod.uid, container_id=pod.containers[0][1], qos=pod.qos).create()
        # spawned outside (vfork, cheap) and moved in: PID churn at 10,000 processes stays fast
        proc = subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        cg.join(proc.pid)
        cg.procs.append(proc)
        if api is not None:
            api.add_pod(pod)
        alive.append(_LivePod(pod, cg, proc, i % gpus))

    def delete_oldest() -> None:
        lp = alive.popleft()
        if api is not None:
            api.delete_pod(lp.pod)
        lp.proc.send_signal(signal.SIGKILL)
        lp.proc.wait()
        lp.cg.destroy()
        deleted.add(lp.pod.uid)
        just_deleted.append(lp.pod.uid)

    def write_scenario() -> None:
        Scenario(gpus=[GPU(uuid=f"GPU-soak-{g}", mem_used=(g + 1) << 30) for g in range(gpus)],
                 processes=[Process(pid=lp.proc.pid, gpu=lp.gpu, used_mem=(100 + n) * MiB, sm=n % 100)
                            for n, lp in enumerate(alive)]).write(node.scenario_path)

    def caught_up(timeout: float = 5.0) -> None:
        """Wait until k8sattributes has seen the API changes made so far (the watch delivers them on its own
        thread): what the census finds then does not depend on where in a collection the events landed."""
        if k8s is None or api is None or not alive:
            return
        newest, gone = alive[-1].pod.uid, list(just_deleted)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = k8s.cache.get(newest)
            if rec is not None and all((r := k8s.cache.get(u)) is None or r.deleted_at is not None for u in gone):
                return
            time.sleep(0.002)

    def collect() -> None:
        caught_up()
        for r in receivers:
            data = r.collect()
            if k8s is not None:
                data = k8s.process(data) or data
            if prom is not None:
                prom.export(data)

    foreign = []
    try:
        for _ in range(live):
            create_pod(created)
            created += 1
        write_scenario()
        collect()
        for tick in range(ticks):
            previous_deleted[:] = just_deleted
            just_deleted.clear()
            for _ in range(batch):
                delete_oldest()
                create_pod(created)
                created += 1
            write_scenario()
            collect()
            if prom is not None:
                # a receiver may report a deleted pod's final counts once, in the collection right after the
                # deletion (the ebpf receiver does, so no events are lost); one collection later it must be gone
                text = prom.rendering().text
                for uid in previous_deleted:
                    if uid.encode() in text:
                        stale += 1
                        if len(stale_examples) < 3:
                            stale_examples.append(uid)
            if tick % 5 == 0 or tick == ticks - 1:
                gc.collect()
                rss.append(proc_rss_bytes())
                sample_ticks.append(tick)
                foreign.append(foreign_pods({lp.pod.uid for lp in alive}))
                sizes.append(_census(built, api))
            if progress is not None and tick % max(1, ticks // 10) == 0:
                progress(tick, ticks)
        # the final exposition, all of it, one collection after the last deletions: no uid of any deleted pod
        collect()
        if prom is not None:
            final_uids = {m.decode() for m in UID_RE.findall(prom.rendering().text)}
            leftover = final_uids & deleted
            stale += len(leftover)
            stale_examples += sorted(leftover)[:3]
    finally:
        while alive:
            lp = alive.popleft()
            lp.proc.kill()
            lp.proc.wait()
            lp.cg.destroy()
        built.shutdown()
        if api is not None:
            api.stop()
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)

    warm_index = next((i for i, t in enumerate(sample_ticks) if t >= warm_tick), len(sample_ticks) - 1)
    return summarize(rss, sizes, warm_index, foreign=foreign, cycles=ticks * batch, ticks=ticks, live=live, stale=stale,
                     stale_examples=stale_examples, seconds=time.monotonic() - started, notes=notes)


def foreign_pods(mine: set[str]) -> int:
    """Pod cgroups on this kernel that the soak did not create (other work on a shared machine): the receivers
    see them too, so the report says how many there were."""
    root = cgroups.v2_root() or (cgroups.hierarchies() or [cgroups.ROOT])[0]
    n = 0
    for qos in ("", "/burstable", "/besteffort"):
        try:
            entries = os.listdir(f"{root}/kubepods{qos}")
        except OSError:
            continue
        n += sum(1 for e in entries if e.startswith("pod") and e[3:] not in mine)
    return n


def _census(built: Built, api) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, comp in built.components.items():
        out.update(census(comp, key))
    return out


def summarize(rss: list[int], sizes: list[dict[str, int]], warm_index: int, foreign: list[int] | None = None,
              **extra) -> dict:
    """Verdicts from the samples; index warm_index is the first sample after warm-up.

    RSS: the largest RSS after warm-up within 10% of the RSS at the end of warm-up. A container is unbounded when
    it keeps growing: the largest size in the last third of the post-warm-up samples exceeds the largest in the
    first third by more than 10% (and a few entries), the middle third's largest lies strictly between them, and the
    final size is still near that maximum. A leak grows with the cycles and fails this; a cache whose size wanders
    between levels with timing (a grace period, a cache reset by pod events that arrive while a collection runs)
    does not, even when the samples happen to catch its low level early and its high level late.

    `foreign`: pod cgroups on the machine the soak did not make, per sample. When their number changes after
    warm-up (other work on a shared machine), the RSS verdict is disturbed: RSS follows what the receivers see.
    """
    warm_index = max(1, min(warm_index, len(rss) - 1))
    rss_warm = rss[warm_index - 1]
    rss_max = max(rss[warm_index:]) if rss[warm_index:] else rss_warm
    growth = rss_max / rss_warm - 1 if rss_warm else 0.0
    caches = {}
    names = set().union(*sizes) if sizes else set()
    for name in names:
        series = [s.get(name, 0) for s in sizes]
        post = series[warm_index:] or series[-1:]
        third = max(1, len(post) // 3)
        early, middle, late = max(post[:third]), max(post[third:-third] or post[-third:]), max(post[-third:])
        grew = late > max(early * 1.10, early + 8) and early < middle < late
        ok = not (grew and series[-1] >= 0.9 * late)
        caches[name] = {"warm": series[warm_index - 1], "early": early, "max_late": late, "final": series[-1],
                        "ok": ok}
    # the report lists the containers that matter (state that scales with pods or processes); config and
    # telemetry registries are checked all the same
    interesting = {k: v for k, v in caches.items()
                   if not v["ok"] or (v["max_late"] >= 8 and ".config." not in k and ".settings." not in k
                                      and not k.endswith(("_specs", "_enabled", "tracked", "_error_names")))}
    notes = list(extra.pop("notes", []))
    if extra.get("stale_examples"):
        notes.append("stale pods in the exposition, e.g. " + ", ".join(extra["stale_examples"]))
    post_foreign = (foreign or [0])[warm_index - 1:] or [0]
    disturbed = max(post_foreign) - min(post_foreign) > 4
    if disturbed:
        notes.append(f"RSS verdict disturbed: other pod cgroups on this shared machine went from "
                     f"{min(post_foreign)} to {max(post_foreign)} after warm-up, and the receivers saw them")
    return {"rss_warm": rss_warm, "rss_max": rss_max, "rss_growth": growth, "rss_ok": growth <= 0.10,
            "rss_disturbed": disturbed,
            "caches": interesting, "caches_all": caches, "caches_ok": all(v["ok"] for v in caches.values()),
            "notes": notes, **extra}
