"""A metric switched off (`metrics: {<name>: {enabled: false}}`) stops the reads only it needs, for containers, for
pods or both, while the rest of its group is still read and emitted with the same values. On the real kernel where
it allows (v1 memory, cpu and pids on this host; cgroup2 where it is the host's layout), on fixture trees for the
files of cgroup2 alone. The files are seen through the `open` audit hook: a file read once is opened once (then kept)
and limits are opened each time they are read, so a file never opened over collections that read limits was never
read; and the default configuration opens, keeps and re-reads exactly the files it did before the switches did."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest
from cgroup.helpers import make_receiver, opened_during, points, value
from cgroup.layouts import POD_LIMIT, all_layouts, build
from harness import require, require_root
from harness.cgroups import ROOT, PodCgroup, hierarchies

from podmeter.component import ComponentID, CreateSettings
from podmeter.telemetry import null_component_telemetry
from receivers.cgroup import factory
from receivers.cgroup.discovery import detect_layout
from receivers.cgroup.metrics import GROUP_OF, KINDS
from receivers.cgroup.stats import READS_OF, Reads

LAYOUTS = {lay.name: lay for lay in all_layouts()}
THROTTLING = ("cpu.throttling_data.periods", "cpu.throttling_data.throttled_periods",
              "cpu.throttling_data.throttled_time")
MEMORY_STAT = ("memory.rss", "memory.cache", "memory.kernel_stack", "memory.page_tables", "memory.paging.faults",
               "memory.working_set", "memory.swap")

# switch -> the metric suffixes it turns off
SWITCHES = {
    # the CPU quota is read for the limit and to gate the throttling counters: both off, it is not read
    "cpu.quota": (*THROTTLING, "cpu.limit"),
    "cpu.limit": ("cpu.limit",),
    "memory.limit": ("memory.limit",),
    "memory.swap": ("memory.swap",),
    "oom": ("memory.oom.events", "memory.oom.kills"),
    "memory.stat": MEMORY_STAT,
    "memory.usage": ("memory.usage", "memory.working_set"),
    "pids.limit": ("pids.limit",),
    "pids.count": ("pids.count",),
}
# limits and PSI do not add up: the only files a container skips when its pod still wants the metric
NOT_ADDITIVE = ("cpu.limit", "memory.limit", "pids.limit")


def skipped_files(switch: str, layout) -> list[tuple[str, str]]:
    """(hierarchy root, file name) that nothing but the switch's metrics needs on this layout."""
    mem, thr, pids = layout.memory, layout.throttle, layout.pids
    # v1 divides the quota by the cgroup's cpu.cfs_period_us, read for the limit alone (v2's cpu.max has both)
    period = [] if thr.v2 else [(thr.root, "cpu.cfs_period_us")]
    if switch == "cpu.limit":
        return period
    if switch == "cpu.quota":
        # (v1's period is the cpu.limit switch's: a container whose pod sums its throttling still reads the quota)
        out = [(thr.root, "cpu.max" if thr.v2 else "cpu.cfs_quota_us")]
        if not (thr.v2 and layout.cpu.v2 and thr.root == layout.cpu.root):
            out.append((thr.root, "cpu.stat"))  # v1: the counters' own cpu.stat, in the cpu hierarchy
        return out
    if switch == "pids.limit":
        return [(pids.root, "pids.max")]
    if switch == "pids.count":
        return [(pids.root, "pids.current")]
    v2 = mem.v2
    name = {"memory.limit": "memory.max" if v2 else "memory.limit_in_bytes",
            "memory.swap": "memory.swap.current" if v2 else None,  # v1: memory.stat's total_swap
            "oom": "memory.events" if v2 else "memory.oom_control",
            "memory.stat": "memory.stat",
            "memory.usage": "memory.current" if v2 else "memory.usage_in_bytes"}[switch]
    return [(mem.root, name)] if name else []


def off(switch: str, level: str) -> dict:
    prefixes = {"both": ("container.", "k8s.pod."), "container": ("container.",), "pod": ("k8s.pod.",)}[level]
    return {f"{pre}{suffix}": {"enabled": False} for pre in prefixes for suffix in SWITCHES[switch]}


def group_of(switch: str) -> str:
    return {"cpu.quota": "cpu", "cpu.limit": "cpu", "pids.limit": "pids", "pids.count": "pids"}.get(switch, "memory")


def by_metric(data, where: dict) -> dict[tuple, float]:
    """(metric, point attributes) -> value for the resource matching `where` (container: its id; pod: uid alone)."""
    out = {}
    for res, name, attrs, v in points(data):
        if all(res.get(k) == w for k, w in where.items()) and ("container.id" in res) == ("container.id" in where):
            out[name, tuple(sorted(attrs.items()))] = v
    return out


def check_switch(switch: str, level: str, root: str, dirs: dict[str, str], where: dict[str, dict],
                 **config) -> None:
    """dirs: cgroup path (relative to each hierarchy) -> `container` or `pod`; where: cgroup path -> the resource
    attributes that name it. Collects with the switch and, around it, with the default configuration."""
    layout = detect_layout(root)
    files = skipped_files(switch, layout)
    require(bool(files), f"{switch}: no file of its own on this layout")
    base = {"cgroup_root": root, "limits_every": 1, **config}
    default = make_receiver(**base)
    trimmed = make_receiver(**base, metrics=off(switch, level))
    try:
        before = default.collect()
        # two collections, both reading limits (limits_every 1): every file read is opened in one of them
        got, first = opened_during(trimmed.collect)
        got, second = opened_during(trimmed.collect)
        after = default.collect()
        opened = first + second
        kept = [path for fds in trimmed.reader._fds.values() for path in fds]
        for rel, kind in dirs.items():
            # a container reads what its pod's metrics that add up need (a pod may be the sum of its containers)
            skip = level == "both" or level == kind and (kind == "pod" or SWITCHES[switch][0] in NOT_ADDITIVE)
            for hier, name in files:
                path = f"{hier}{rel}/{name}"
                if skip:
                    assert path not in opened and path not in kept, f"{kind} {path} was read"
                else:
                    assert path in opened, f"{kind} {path} is still needed and was not read"
        # the group's other metrics at each level: emitted, with the values the default configuration read
        # around the trimmed one (the same where the kernel's numbers stand still)
        group = group_of(switch)
        for rel, kind in dirs.items():
            prefix = "container." if kind == "container" else "k8s.pod."
            lo, hi, mine = by_metric(before, where[rel]), by_metric(after, where[rel]), by_metric(got, where[rel])
            turned_off = {prefix + s for s in SWITCHES[switch]} if level in ("both", kind) else set()
            for key, v in hi.items():
                name = key[0]
                if GROUP_OF[name] != group or name.endswith((".cpu.usage", ".cpu.percent")):
                    continue
                if name in turned_off:
                    assert key not in mine, f"{name} switched off is emitted"
                    continue
                assert key in mine, f"{name} {key[1]} of {kind} {rel} is no longer emitted"
                a, b = sorted((lo.get(key, v), v))
                assert a * 0.98 - 1 <= mine[key] <= b * 1.02 + 1, (key, lo.get(key), mine[key], v)
    finally:
        default.shutdown()
        trimmed.shutdown()


# -- the real kernel --------------------------------------------------------------------------------------------------

@pytest.fixture
def pod():
    """A pod and its container with a sleeping process, a memory, pids and CPU limit on both."""
    require_root()
    require(bool(hierarchies()), "needs a mounted cgroup hierarchy")
    layout = detect_layout(ROOT)
    cg = PodCgroup(qos="burstable").create()
    try:
        for level in ("pod", "container"):
            path = cg.pod_path if level == "pod" else cg.container_path
            for hier, name, text in ((layout.memory, "memory.max" if layout.memory.v2 else "memory.limit_in_bytes",
                                      str(512 << 20)),
                                     (layout.pids, "pids.max", "100"),
                                     (layout.throttle, "cpu.max" if layout.throttle.v2 else "cpu.cfs_quota_us",
                                      "50000")):
                try:
                    with open(f"{hier.root}{path}/{name}", "w") as f:
                        f.write(text)
                except OSError as exc:
                    require(False, f"cannot set {name} here: {exc}")
        cg.spawn(["sleep", "600"], stdin=subprocess.DEVNULL)
        yield cg
    finally:
        cg.destroy()


# on fixtures only: v2's memory.swap.current, v1's cpu.cfs_period_us (the kernel here may have either)
KERNEL_SWITCHES = [s for s in SWITCHES if s not in ("memory.swap", "cpu.limit")]


@pytest.mark.parametrize("level", ["both", "container", "pod"])
@pytest.mark.parametrize("switch", KERNEL_SWITCHES)
def test_a_switched_off_metric_skips_its_files_on_the_kernel(pod, switch, level):
    dirs = {pod.container_path: "container", pod.pod_path: "pod"}
    where = {pod.container_path: {"container.id": pod.container_id}, pod.pod_path: {"k8s.pod.uid": pod.uid}}
    check_switch(switch, level, ROOT, dirs, where)


def test_limits_and_counts_on_the_kernel_are_the_kernels(pod):
    """What the switches leave is right on its own terms too: the limits written and the one sleeping task."""
    r = make_receiver(metrics={**off("pids.count", "both"), **off("memory.usage", "both"),
                               **off("cpu.quota", "both")})
    try:
        data = r.collect()
        c, p = {"container.id": pod.container_id}, {"k8s.pod.uid": pod.uid}
        assert value(data, "container.memory.limit", c) == 512 << 20
        assert value(data, "k8s.pod.memory.limit", p) == 512 << 20
        assert value(data, "container.pids.limit", c) == 100
        assert value(data, "container.pids.count", c) is None
        assert value(data, "container.memory.rss", c) is not None
        assert value(data, "container.cpu.throttling_data.periods", c) is None
        assert value(data, "container.cpu.limit", c) is None
        assert value(data, "container.cpu.time", c, {"cpu.mode": "user"}) is not None
    finally:
        r.shutdown()


# -- fixture trees: cgroup2's own files (memory.swap.current, memory.events, cpu.max, memory.max) ------------------

FIXTURE_LAYOUTS = ["v2-cgroupfs-containerd", "v1-cgroupfs-containerd", "hybrid-cgroupfs-containerd"]


def _fixture_dirs(layout) -> tuple[dict, dict]:
    dirs, where = {}, {}
    for p in layout.pods:
        if p.dir:
            dirs[p.dir], where[p.dir] = "pod", {"k8s.pod.uid": p.uid}
        for cdir, cid, _rt in p.containers:
            dirs[cdir], where[cdir] = "container", {"container.id": cid}
    return dirs, where


# v1 reads swap from memory.stat, which other metrics need: memory.swap has no file of its own there; v2's
# cpu.max holds the period with the quota: cpu.limit has no file of its own there
FIXTURE_CASES = [(name, switch) for name in FIXTURE_LAYOUTS for switch in SWITCHES
                 if not (switch == "memory.swap" and not name.startswith("v2"))
                 and not (switch == "cpu.limit" and name.startswith("v2"))]


@pytest.mark.parametrize("level", ["both", "container", "pod"])
@pytest.mark.parametrize("name,switch", FIXTURE_CASES, ids=[f"{n}-{s}" for n, s in FIXTURE_CASES])
def test_a_switched_off_metric_skips_its_files_on_fixture_trees(tmp_path, name, switch, level):
    layout = LAYOUTS[name]
    root = build(str(tmp_path), layout)
    dirs, where = _fixture_dirs(layout)
    check_switch(switch, level, root, dirs, where, proc_root=str(tmp_path / "noproc"))


def test_swap_and_oom_events_off_leave_the_rest_of_cgroup2_memory(tmp_path):
    layout = LAYOUTS["v2-cgroupfs-containerd"]
    root = build(str(tmp_path), layout)
    r = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"),
                      metrics={**off("memory.swap", "both"), **off("oom", "both"), **off("memory.limit", "both")})
    try:
        data, opened = opened_during(r.collect)
        assert not [p for p in opened if p.endswith(("/memory.swap.current", "/memory.events", "/memory.max"))]
        c = {"container.id": layout.pods[0].containers[0][1]}
        assert value(data, "container.memory.usage", c) == 104857600
        assert value(data, "container.memory.working_set", c) == 104857600 - 20971520
        assert value(data, "container.memory.kernel_stack", c) == 327680
        assert value(data, "container.memory.swap", c) is None
        assert value(data, "container.memory.oom.events", c) is None
        assert value(data, "k8s.pod.memory.limit", {"k8s.pod.uid": layout.pods[0].uid}) is None
    finally:
        r.shutdown()


# -- what pods need of their containers ---------------------------------------------------------------------------

def test_a_pod_without_a_cgroup_still_sums_what_its_containers_no_longer_emit(tmp_path):
    """containerd's `slice:cri-containerd:<id>` form: the pod is its containers' sum, so a metric switched off for
    containers alone is still read of them."""
    layout = LAYOUTS["v2-containerd-colon-form"]
    root = build(str(tmp_path), layout)
    r = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"),
                      metrics={**off("memory.usage", "container"), **off("pids.count", "container"),
                               **off("memory.limit", "both")})
    try:
        data, opened = opened_during(r.collect)
        pod = layout.pods[0]
        cdir, cid, _rt = pod.containers[0]
        assert f"{root}{cdir}/memory.current" in opened and f"{root}{cdir}/pids.current" in opened
        assert f"{root}{cdir}/memory.max" not in opened
        assert value(data, "container.memory.usage", {"container.id": cid}) is None
        assert value(data, "container.pids.count", {"container.id": cid}) is None
        n = len(pod.containers)
        assert value(data, "k8s.pod.memory.usage", {"k8s.pod.uid": pod.uid}) == n * 104857600
        assert value(data, "k8s.pod.memory.working_set", {"k8s.pod.uid": pod.uid}) == n * (104857600 - 20971520)
        assert value(data, "k8s.pod.pids.count", {"k8s.pod.uid": pod.uid}) == n * 12
    finally:
        r.shutdown()


def test_v1_pod_oom_kills_still_count_containers_that_no_longer_emit_theirs(tmp_path):
    """cgroup v1 counts a kill in the victim's cgroup alone: the pod's count adds its containers', so their
    memory.oom_control is read for the pod even with container.memory.oom.kills off."""
    layout = LAYOUTS["v1-cgroupfs-containerd"]
    root = build(str(tmp_path), layout)
    r = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"),
                      metrics={"container.memory.oom.kills": {"enabled": False}})
    try:
        data, opened = opened_during(r.collect)
        pod = layout.pods[0]
        for cdir, cid, _rt in pod.containers:
            assert f"{root}/memory{cdir}/memory.oom_control" in opened
            assert value(data, "container.memory.oom.kills", {"container.id": cid}) is None
        # the fixture's oom_control counts 1 kill in every cgroup: the pod's own and its two containers'
        assert value(data, "k8s.pod.memory.oom.kills", {"k8s.pod.uid": pod.uid}) == 1 + len(pod.containers)
    finally:
        r.shutdown()


# -- whether a cgroup is there when few files are read --------------------------------------------------------------

GROUPS_PIDS_ONLY = {"cpu": False, "memory": False, "io": False, "pids": True, "pressure": False, "network": False}


def test_a_cgroup_with_only_pids_current_read_is_found(tmp_path):
    layout = LAYOUTS["v1-cgroupfs-containerd"]
    root = build(str(tmp_path), layout)
    r = make_receiver(cgroup_root=root, groups=GROUPS_PIDS_ONLY, metrics=off("pids.limit", "both"))
    try:
        for _ in range(2):
            data, opened = opened_during(r.collect)
            assert not [p for p in opened if p.endswith("/pids.max")]
            assert value(data, "container.pids.count", {"container.id": layout.pods[0].containers[0][1]}) == 12
            assert value(data, "k8s.pod.pids.count", {"k8s.pod.uid": layout.pods[0].uid}) == 12
        assert r.reader.kept(layout.pods[0].containers[0][0]) == 1  # pids.current, kept and re-read
    finally:
        r.shutdown()


def test_a_cgroup_with_only_limits_read_is_found_and_goes_when_removed(tmp_path):
    """Nothing but pids.max: read with the limits (every `limits_every`), the cgroup is there as listed between,
    and gone when it is removed."""
    layout = LAYOUTS["v1-cgroupfs-containerd"]
    root = build(str(tmp_path), layout)
    r = make_receiver(cgroup_root=root, groups=GROUPS_PIDS_ONLY, metrics=off("pids.count", "both"),
                      limits_every=2)
    pod = layout.pods[0]
    p = {"k8s.pod.uid": pod.uid}
    try:
        for i in range(3):
            data, opened = opened_during(r.collect)
            assert not [path for path in opened if path.endswith("/pids.current")]
            assert bool([path for path in opened if path.endswith("/pids.max")]) == (i % 2 == 0)
            assert value(data, "k8s.pod.pids.limit", p) == 1000
            assert value(data, "k8s.pod.pids.count", p) is None
        assert r.reader.kept() == 0
        # the pod's pids.max goes unreadable as a removed cgroup's would, but discovery still lists it (removed
        # between listing and reading): on a collection reading limits it is not reported
        for cdir, _cid, _rt in pod.containers:
            shutil.rmtree(f"{root}/pids{cdir}")
        (tmp_path / "sys/fs/cgroup/pids" / pod.dir.lstrip("/") / "pids.max").unlink()
        data = r.collect()  # collection 4: limits from before, the pod as listed
        assert value(data, "k8s.pod.pids.limit", p) == 1000
        data = r.collect()  # collection 5: limits read again: the pod's are gone
        assert value(data, "k8s.pod.pids.limit", p) is None
        assert not [res for res, _n, _a, _v in points(data) if res.get("k8s.pod.uid") == pod.uid]
    finally:
        r.shutdown()


# -- the default configuration ------------------------------------------------------------------------------------

# the IO schedulers' (BFQ, CFQ) files are looked for first, and again with the limits: the fixtures have none
V1_SCHEDULER_IO = ["blkio/blkio.bfq.io_service_bytes_recursive", "blkio/blkio.io_service_bytes_recursive"]
V1_FILES = ["cpuacct/cpuacct.usage_all", "cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us", "cpu/cpu.stat", "memory/memory.usage_in_bytes",
            "memory/memory.stat", "memory/memory.limit_in_bytes", "memory/memory.oom_control",
            *V1_SCHEDULER_IO, "blkio/blkio.throttle.io_service_bytes_recursive",
            "blkio/blkio.throttle.io_serviced_recursive", "pids/pids.current", "pids/pids.max"]
V2_FILES = ["cpu.stat", "cpu.max", "memory.current", "memory.stat", "memory.max", "memory.swap.current",
            "memory.events", "io.stat", "pids.current", "pids.max", "cpu.pressure", "memory.pressure", "io.pressure"]
PSI_HYBRID = ["unified/cpu.pressure", "unified/memory.pressure", "unified/io.pressure"]
V1_LIMITS = ["cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us", "memory/memory.limit_in_bytes", *V1_SCHEDULER_IO, "pids/pids.max"]
V2_LIMITS = ["cpu.max", "memory.max", "pids.max"]
# what the receiver read of each cgroup, in this order, before metric switches skipped files (the same for pods and
# containers with the default configuration): on the first collection, and on a later one that reads limits
DEFAULT_READS = {
    "v1-cgroupfs-containerd": (V1_FILES, V1_LIMITS),
    "v1-comounted-systemd-containerd": (V1_FILES, V1_LIMITS),
    "hybrid-cgroupfs-containerd": (V1_FILES + PSI_HYBRID, V1_LIMITS),
    "v2-cgroupfs-containerd": (V2_FILES, V2_LIMITS),
    "v2-containerd-colon-form": (V2_FILES, V2_LIMITS),
}


@pytest.mark.parametrize("name", list(DEFAULT_READS))
def test_the_default_configuration_reads_what_it_read_before(tmp_path, name):
    layout = LAYOUTS[name]
    root = build(str(tmp_path), layout)
    files, limits = DEFAULT_READS[name]
    dirs, _where = _fixture_dirs(layout)
    r = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    try:
        def per_cgroup(opened: list[str]) -> dict[str, list[str]]:
            out: dict[str, list[str]] = {rel: [] for rel in dirs}
            for path in opened:
                if path.endswith("/cgroup.procs"):
                    continue  # the pod's network, not a statistics file
                head, file = path[len(root):].rsplit("/", 1)
                rel = next(rel for rel in dirs if head.endswith(rel))
                out[rel].append(f"{head[: -len(rel)]}/{file}".lstrip("/"))
            return out

        for i in range(7):  # limits_every 6: collections 1 and 7 read limits
            _data, opened = opened_during(r.collect)
            want = files if i == 0 else limits if i == 6 else []
            assert per_cgroup(opened) == {rel: want for rel in dirs}, f"collection {i + 1}"
        # every other file is kept, and a collection re-reads them in one pass
        for rel in dirs:
            paths, _fds = r.reader._whole[rel]
            assert sorted(paths) == sorted(f"{root}{_hier_path(f, rel)}" for f in files if f not in limits), rel
    finally:
        r.shutdown()


def _hier_path(file: str, rel: str) -> str:
    """`memory/memory.stat` -> `/memory<rel>/memory.stat`; `cpu.stat` (cgroup2) -> `<rel>/cpu.stat`."""
    if "/" in file:
        hier, name = file.split("/")
        return f"/{hier}{rel}/{name}"
    return f"{rel}/{file}"


def test_every_metric_says_what_it_reads():
    """A metric the reader does not know would read nothing of its own: every cgroup metric is in READS_OF, and a
    reading of all of them is the reader's default."""
    assert set(READS_OF) == {k.suffix for k in KINDS if k.group != "network"}
    everything = Reads()
    derived = ("listed", "nothing", "listed_but_psi", "nothing_but_psi")
    assert all(getattr(everything, flag) for flag in Reads.__slots__ if flag not in derived)
    assert not any(getattr(everything, flag) for flag in derived)
    assert Reads(("pressure.stall_time",)).nothing_but_psi and not Reads(("pressure.stall_time",)).nothing
    assert Reads(()).nothing and Reads(("pids.limit",)).listed and not Reads(("pids.limit",)).nothing
    assert not Reads(("memory.limit",)).mem_stat and Reads(("memory.swap",)).mem_stat_v1
    assert not Reads(("memory.swap",)).mem_stat  # v2: memory.swap.current
    assert Reads(("memory.oom.events",)).oom_v2 and not Reads(("memory.oom.events",)).oom_v1
    # the default configuration reads everything of both kinds of cgroup
    settings = CreateSettings(id=ComponentID("cgroup"), kind="receiver", logger=logging.getLogger("test.cgroup"),
                              telemetry=null_component_telemetry("cgroup"))
    r = factory.create(settings, factory.config_model.model_validate({}))
    assert repr(r.container_reads) == repr(r.pod_reads) == repr(everything)


@pytest.mark.parametrize("name", ["v1-cgroupfs-containerd", "v2-cgroupfs-containerd"])
def test_a_trimmed_metric_set_keeps_fewer_files(tmp_path, name):
    """What users trimming the metric set get: fewer files read (and kept) per cgroup, the same values for the rest."""
    layout = LAYOUTS[name]
    root = build(str(tmp_path), layout)
    trim = {**off("cpu.quota", "both"), **off("memory.limit", "both"), **off("oom", "both"),
            **off("pids.limit", "both"), **off("memory.swap", "both")}
    full = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    trimmed = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"), metrics=trim)
    try:
        a, b = full.collect(), trimmed.collect()
        cdir, cid, _rt = layout.pods[0].containers[0]
        c = {"container.id": cid}
        assert trimmed.reader.kept(cdir) < full.reader.kept(cdir)
        for metric in ("container.memory.usage", "container.memory.rss", "container.pids.count"):
            assert value(b, metric, c) == value(a, metric, c)
        assert value(b, "k8s.pod.memory.limit", {"k8s.pod.uid": layout.pods[0].uid}) is None
        assert value(a, "k8s.pod.memory.limit", {"k8s.pod.uid": layout.pods[0].uid}) == POD_LIMIT
    finally:
        full.shutdown()
        trimmed.shutdown()
