"""The receiver on fixture trees of every cgroup layout: it finds exactly the pods and containers, with the right
pod uid, container id, runtime and QoS class, and reads the values the files hold."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
from cgroup.helpers import make_receiver, points, value
from cgroup.layouts import POD_LIMIT, POD_PIDS_LIMIT, all_layouts, build

from receivers.cgroup.discovery import detect_layout

LAYOUTS = all_layouts()

# what the fixture files hold (see tests/fixtures/cgroup/README.md)
USER, SYSTEM = 3.0, 2.0
USAGE, INACTIVE_FILE = 104857600, 20971520
RSS, CACHE = 52428800, 41943040


def _collect(tmp_path, layout, **config):
    root = build(str(tmp_path), layout)
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"), **config)
    return receiver, receiver.collect()


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_finds_every_pod_and_container(tmp_path, layout):
    _receiver, data = _collect(tmp_path, layout)
    containers, pods = set(), set()
    for rm in data.resource_metrics:
        a = dict(rm.resource.attributes)
        if "container.id" in a:
            containers.add((a["k8s.pod.uid"], a["container.id"], a.get("container.runtime.name"),
                            a["k8s.pod.qos_class"]))
        else:
            pods.add((a["k8s.pod.uid"], a["k8s.pod.qos_class"]))
    assert containers == {(pod.uid, cid, rt, pod.qos) for pod in layout.pods for _d, cid, rt in pod.containers}
    assert pods == {(pod.uid, pod.qos) for pod in layout.pods}


@pytest.mark.parametrize("layout", LAYOUTS, ids=[lay.name for lay in LAYOUTS])
def test_values_match_the_files(tmp_path, layout):
    _receiver, data = _collect(tmp_path, layout)
    assert _receiver.telemetry.failing() == {}  # files as the kernel writes them: nothing reported malformed
    v2 = layout.version == "v2"
    pod = layout.pods[0]
    _d, cid, _rt = pod.containers[0]
    c = {"container.id": cid}
    assert value(data, "container.cpu.time", c, {"cpu.mode": "user"}) == pytest.approx(USER)
    assert value(data, "container.cpu.time", c, {"cpu.mode": "system"}) == pytest.approx(SYSTEM)
    assert value(data, "container.cpu.throttling_data.periods", c) == 100
    assert value(data, "container.cpu.throttling_data.throttled_periods", c) == 7
    assert value(data, "container.cpu.throttling_data.throttled_time", c) == pytest.approx(0.25)
    # the first collection has no interval to compute usage over
    assert value(data, "container.cpu.usage", c) is None
    assert value(data, "container.memory.usage", c) == USAGE  # not the sub-cgroup's 1 byte
    assert value(data, "container.memory.working_set", c) == USAGE - INACTIVE_FILE
    assert value(data, "container.memory.rss", c) == RSS  # v1: total_rss, not the local rss
    assert value(data, "container.memory.cache", c) == CACHE
    assert value(data, "container.memory.swap", c) == 4096
    assert value(data, "container.memory.limit", c) is None  # unlimited
    assert value(data, "container.memory.oom.kills", c) == 1
    assert value(data, "container.memory.oom.events", c) == (2 if v2 else None)
    assert value(data, "container.memory.kernel_stack", c) == (327680 if v2 else None)
    assert value(data, "container.memory.page_tables", c) == (1048576 if v2 else None)
    assert value(data, "container.memory.paging.faults", c, {"system.paging.fault.type": "major"}) == 45
    assert value(data, "container.memory.paging.faults", c, {"system.paging.fault.type": "minor"}) == 12300
    # 8:0 is named from sysfs; 253:7 is not there and keeps its numbers
    vda = {"system.device": "vda"}
    assert value(data, "container.disk.io", c, {**vda, "disk.io.direction": "read"}) == 1048576
    assert value(data, "container.disk.io", c, {**vda, "disk.io.direction": "write"}) == 2097152
    assert value(data, "container.disk.operations", c, {**vda, "disk.io.direction": "write"}) == 20
    assert value(data, "container.disk.io", c, {"system.device": "253:7", "disk.io.direction": "read"}) == 4096
    assert value(data, "container.pids.count", c) == 12
    assert value(data, "container.pids.limit", c) is None
    psi = value(data, "container.pressure.stall_time", c, {"pressure.resource": "cpu", "pressure.type": "some"})
    assert psi == (pytest.approx(1.5) if layout.version in ("v2", "hybrid") else None)
    p = {"k8s.pod.uid": pod.uid}
    n = len(pod.containers)
    if pod.dir is not None:
        assert value(data, "k8s.pod.memory.usage", p) == USAGE
        assert value(data, "k8s.pod.memory.limit", p) == POD_LIMIT
        assert value(data, "k8s.pod.pids.limit", p) == POD_PIDS_LIMIT
        assert value(data, "k8s.pod.cpu.time", p, {"cpu.mode": "user"}) == pytest.approx(USER)
    else:
        # no pod cgroup: the pod is the sum of its containers; limits and pressure cannot be summed
        assert value(data, "k8s.pod.memory.usage", p) == n * USAGE
        assert value(data, "k8s.pod.cpu.time", p, {"cpu.mode": "user"}) == pytest.approx(n * USER)
        assert value(data, "k8s.pod.memory.limit", p) is None
        assert value(data, "k8s.pod.pressure.stall_time", p, {"pressure.resource": "cpu",
                                                               "pressure.type": "some"}) is None


def test_device_names_come_from_this_containers_sysfs_when_the_hosts_is_not_mounted(tmp_path):
    """The DaemonSet mounts the host's /sys/fs/cgroup at /host/sys/fs/cgroup but not the rest of its /sys: block
    devices are then named from the container's own /sys/dev/block, which shows the host's devices too."""
    layout = LAYOUTS[1]
    root = build(str(tmp_path), layout)
    shutil.rmtree(str(tmp_path / "sys" / "dev"))
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    assert receiver._block_dir == "/sys/dev/block"
    entries = sorted(os.listdir("/sys/dev/block"))
    if entries:  # a machine with a block device at all: it is named as the kernel names it
        dev = entries[0]
        assert receiver._device_name(dev) == os.path.basename(os.readlink(f"/sys/dev/block/{dev}"))
    assert receiver._device_name("4095:4095") == "4095:4095"


def test_layout_detection(tmp_path):
    v1 = detect_layout(build(str(tmp_path / "a"), next(x for x in LAYOUTS if x.version == "v1")))
    assert v1.kind == "v1" and not v1.memory.v2 and v1.psi is None and v1.walk.endswith("/memory")
    hybrid_root = build(str(tmp_path / "b"), next(x for x in LAYOUTS if x.version == "hybrid"))
    hybrid = detect_layout(hybrid_root)
    assert hybrid.kind == "hybrid" and hybrid.psi == f"{hybrid_root}/unified" and not hybrid.cpu.v2
    # a hybrid host with memory enabled on cgroup2 reads memory there, the rest from v1
    with open(f"{hybrid_root}/unified/cgroup.controllers", "w") as f:
        f.write("memory pids\n")
    mixed = detect_layout(hybrid_root)
    assert mixed.memory.v2 and mixed.memory.root.endswith("/unified") and mixed.pids.v2 and not mixed.io.v2
    v2 = detect_layout(build(str(tmp_path / "c"), LAYOUTS[1]))
    assert v2.kind == "v2" and v2.memory.v2 and v2.io.v2
    assert detect_layout(str(tmp_path / "empty")) is None


def test_second_collection_has_usage_and_percent(tmp_path):
    layout = LAYOUTS[1]
    receiver, _ = _collect(tmp_path, layout, metrics={"container.cpu.percent": {"enabled": True}})
    root = receiver.config.cgroup_root
    cdir, cid = layout.pods[0].containers[0][:2]
    # one more CPU second of user time since the first collection
    with open(f"{root}{cdir}/cpu.stat", "w") as f:
        f.write("usage_usec 6000000\nuser_usec 4000000\nsystem_usec 2000000\n")
    data = receiver.collect()
    usage = value(data, "container.cpu.usage", {"container.id": cid})
    percent = value(data, "container.cpu.percent", {"container.id": cid})
    assert usage is not None and usage > 0 and percent == pytest.approx(usage * 100)
    assert value(data, "container.cpu.time", {"container.id": cid}, {"cpu.mode": "user"}) == pytest.approx(4.0)


def test_cpu_percent_is_off_by_default(tmp_path):
    """It is cpu.usage times 100: one series per cgroup that says nothing new, on only when asked for."""
    receiver, _ = _collect(tmp_path, LAYOUTS[1])
    names = {name for _r, name, _a, _v in points(receiver.collect())}
    assert "container.cpu.usage" in names and "k8s.pod.cpu.usage" in names
    assert not any(name.endswith("cpu.percent") for name in names)


THROTTLING = ("container.cpu.throttling_data.periods", "container.cpu.throttling_data.throttled_periods",
              "container.cpu.throttling_data.throttled_time")


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=[lay.name for lay in LAYOUTS[:3]])
def test_throttling_only_for_a_cgroup_with_a_cpu_limit(tmp_path, layout):
    """Without a CFS quota the counters stay 0 forever: as cAdvisor, such a cgroup has no throttling series (and on
    v1 its cpu.stat is not read). A quota set later shows within limits_every collections."""
    root = build(str(tmp_path), layout)
    thr = detect_layout(root).throttle
    (cdir, cid, _rt), (_d, limited, _r) = layout.pods[0].containers[:2]
    quota = f"{thr.root}{cdir}/{'cpu.max' if thr.v2 else 'cpu.cfs_quota_us'}"
    with open(quota, "w") as f:
        f.write("max 100000\n" if thr.v2 else "-1\n")
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"), limits_every=3)
    data = receiver.collect()
    for name in THROTTLING:
        assert value(data, name, {"container.id": cid}) is None
    assert value(data, THROTTLING[0], {"container.id": limited}) == 100  # its sibling has a quota
    assert value(data, "container.cpu.time", {"container.id": cid}, {"cpu.mode": "user"}) == pytest.approx(USER)
    if not thr.v2:
        assert f"{thr.root}{cdir}/cpu.stat" not in receiver.reader._fds[cdir]
    with open(quota, "w") as f:
        f.write("20000 100000\n" if thr.v2 else "20000\n")
    assert value(receiver.collect(), THROTTLING[0], {"container.id": cid}) is None  # limits not read again yet
    receiver.collect()
    data = receiver.collect()  # the third collection since: limits (the quota among them) are read again
    assert value(data, THROTTLING[0], {"container.id": cid}) == 100
    assert value(data, THROTTLING[2], {"container.id": cid}) == pytest.approx(0.25)


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=[lay.name for lay in LAYOUTS[:3]])
def test_cpu_limit_is_the_cfs_quota_over_its_period(tmp_path, layout):
    """container.cpu.limit and k8s.pod.cpu.limit: the quota the runtime applied, in CPUs (v1 divides by the
    cgroup's own cpu.cfs_period_us, which kubelet's --cpu-cfs-quota-period changes); no series without a quota;
    an in-place resize shows within limits_every collections. The fixture's quota is 50000 of 100000 us."""
    root = build(str(tmp_path), layout)
    thr = detect_layout(root).throttle
    pod = layout.pods[0]
    (cdir, cid, _rt), (other_dir, other, _r) = pod.containers[:2]
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"), limits_every=2)
    data = receiver.collect()
    assert value(data, "container.cpu.limit", {"container.id": cid}) == pytest.approx(0.5)
    assert value(data, "k8s.pod.cpu.limit", {"k8s.pod.uid": pod.uid}) == pytest.approx(0.5)

    def write(rel, v2_text, quota, period=None):
        if thr.v2:
            with open(f"{thr.root}{rel}/cpu.max", "w") as f:
                f.write(v2_text)
            return
        with open(f"{thr.root}{rel}/cpu.cfs_quota_us", "w") as f:
            f.write(quota)
        if period is not None:
            with open(f"{thr.root}{rel}/cpu.cfs_period_us", "w") as f:
                f.write(period)

    write(cdir, "max 100000\n", "-1\n")  # the limit removed
    write(other_dir, "300000 200000\n", "300000\n", "200000\n")  # resized to 1.5 CPUs, over another period
    data = receiver.collect()  # limits are not read again yet
    assert value(data, "container.cpu.limit", {"container.id": cid}) == pytest.approx(0.5)
    data = receiver.collect()
    assert value(data, "container.cpu.limit", {"container.id": cid}) is None
    assert value(data, "container.cpu.limit", {"container.id": other}) == pytest.approx(1.5)
    assert value(data, "k8s.pod.cpu.limit", {"k8s.pod.uid": pod.uid}) == pytest.approx(0.5)
    # a quota file that says nothing sensible: no limit series, the line reported as malformed, and the
    # throttling counters read as they come (the quota cannot tell they mean nothing)
    write(other_dir, "lots 100000\n", "lots\n")
    receiver.collect()
    data = receiver.collect()
    assert value(data, "container.cpu.limit", {"container.id": other}) is None
    assert value(data, THROTTLING[0], {"container.id": other}) == 100
    assert receiver.reader.malformed
    receiver.shutdown()


def test_a_pod_summed_from_its_containers_keeps_their_throttling_when_a_cpu_limit_goes(tmp_path):
    """In-place resize removes a container's CPU limit: its throttling series go (as cAdvisor's), but a pod without
    a cgroup of its own sums its containers' counters, and that sum must not go backward (a reset to a backend,
    and `increase()` counting the whole remainder again): the kernel keeps the counters, so the pod keeps them
    too, and counts on when a limit comes back."""
    layout = next(x for x in LAYOUTS if x.name == "v2-containerd-colon-form")
    receiver, data = _collect(tmp_path, layout, limits_every=1)
    root = receiver.config.cgroup_root
    pod = {"k8s.pod.uid": layout.pods[0].uid}
    (first, cid, _), (second, _, _) = layout.pods[0].containers
    pod_throttling = [lambda d, n=name: value(d, "k8s.pod" + n[len("container"):], pod) for name in THROTTLING]
    before = [f(data) for f in pod_throttling]
    assert before[0] == 200 and before[2] == pytest.approx(0.5)
    with open(f"{root}{first}/cpu.max", "w") as f:
        f.write("max 100000\n")
    data = receiver.collect()
    assert value(data, THROTTLING[0], {"container.id": cid}) is None
    assert [f(data) for f in pod_throttling] == pytest.approx(before)
    # the limit comes back and the kernel's counters move on from where they were
    with open(f"{root}{first}/cpu.max", "w") as f:
        f.write("50000 100000\n")
    with open(f"{root}{first}/cpu.stat", "w") as f:
        f.write("usage_usec 6000000\nuser_usec 3500000\nsystem_usec 2500000\nnr_periods 110\nnr_throttled 8\n"
                "throttled_usec 260000\n")
    data = receiver.collect()
    assert pod_throttling[0](data) == 210 and pod_throttling[1](data) == 15
    receiver.shutdown()


def test_a_file_that_appears_later_is_found_within_limits_every_collections(tmp_path):
    """A cgroup whose files are all kept is read in one pass over them; a file it did not have then (a controller
    enabled after the cgroup was made) is looked for again whenever limits are read."""
    layout = LAYOUTS[1]
    root = build(str(tmp_path), layout)
    cdir, cid = layout.pods[0].containers[0][:2]
    pids_file = f"{root}{cdir}/pids.current"
    os.remove(pids_file)
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"), limits_every=3)
    for _ in range(2):
        assert value(receiver.collect(), "container.pids.count", {"container.id": cid}) is None
    assert cdir in receiver.reader._whole  # read in one pass, without pids.current
    with open(pids_file, "w") as f:
        f.write("7\n")
    seen = [value(receiver.collect(), "container.pids.count", {"container.id": cid}) for _ in range(3)]
    assert seen[-1] == 7
    receiver.shutdown()


def test_groups_and_metric_switches(tmp_path):
    layout = LAYOUTS[1]
    _r, data = _collect(tmp_path, layout, groups={"io": False, "pressure": False},
                        metrics={"container.memory.rss": {"enabled": False}}, per_pod=False)
    names = {n for _res, n, _a, _v in points(data)}
    assert "container.memory.usage" in names and "container.memory.rss" not in names
    assert not any(n.startswith(("container.disk.", "container.pressure.", "k8s.pod.")) for n in names)


ONLY = [(lay, only) for lay in LAYOUTS if lay.name in ("v1-cgroupfs-containerd", "v2-systemd-containerd",
                                                         "hybrid-cgroupfs-containerd", "v2-containerd-colon-form")
        for only in ("io", "pressure") if not (only == "pressure" and lay.version == "v1")]  # v1: no PSI files


@pytest.mark.parametrize("layout,only", ONLY, ids=[f"{lay.name}-{only}" for lay, only in ONLY])
def test_a_receiver_reading_only_io_or_pressure_reports_them(tmp_path, layout, only):
    """A cgroup counted as there only when its CPU, memory or PIDs files were read made a receiver configured for
    IO or pressure alone (a second pipeline with its own interval, say) report nothing at all."""
    groups = {g: g == only for g in ("cpu", "memory", "io", "pids", "pressure", "network")}
    receiver, data = _collect(tmp_path, layout, groups=groups)
    pod, (_d, cid, _rt) = layout.pods[0], layout.pods[0].containers[0]
    c, p = {"container.id": cid}, {"k8s.pod.uid": pod.uid}
    if only == "io":
        read = {"system.device": "vda", "disk.io.direction": "read"}
        assert value(data, "container.disk.io", c, read) == 1048576
        assert value(data, "k8s.pod.disk.io", p, read) == 1048576 * (1 if pod.dir else len(pod.containers))
    else:
        some_cpu = {"pressure.resource": "cpu", "pressure.type": "some"}
        assert value(data, "container.pressure.stall_time", c, some_cpu) == pytest.approx(1.5)
        if pod.dir:
            assert value(data, "k8s.pod.pressure.stall_time", p, some_cpu) == pytest.approx(1.5)
    assert not [n for _r, n, _a, _v in points(data) if ".memory." in n or ".cpu." in n or ".pids." in n]
    # and the files stay kept between collections: a cgroup found is not taken for gone
    assert receiver.reader.kept(layout.pods[0].containers[0][0]) > 0
    receiver.shutdown()


def test_a_metric_switched_off_for_containers_only_is_not_read_for_containers(tmp_path):
    """Files are read per kind of cgroup for the metrics enabled at that level: with container PSI off, pods keep
    theirs and containers' pressure files are never opened."""
    layout = LAYOUTS[1]
    receiver, data = _collect(tmp_path, layout, metrics={"container.pressure.stall_time": {"enabled": False}})
    pod, (cdir, cid, _rt) = layout.pods[0], layout.pods[0].containers[0]
    some_cpu = {"pressure.resource": "cpu", "pressure.type": "some"}
    assert value(data, "k8s.pod.pressure.stall_time", {"k8s.pod.uid": pod.uid}, some_cpu) is not None
    assert value(data, "container.pressure.stall_time", {"container.id": cid}, some_cpu) is None
    assert value(data, "container.cpu.time", {"container.id": cid}, {"cpu.mode": "user"}) is not None
    assert not [path for path in receiver.reader._fds[cdir] if path.endswith(".pressure")]
    assert [path for path in receiver.reader._fds[pod.dir] if path.endswith(".pressure")]
    receiver.shutdown()


def test_unknown_metric_name_is_a_config_error():
    from pydantic import ValidationError

    from receivers.cgroup import factory

    with pytest.raises(ValidationError, match="unknown metric"):
        factory.config_model.model_validate({"metrics": {"container.cpu.tme": {"enabled": False}}})
    with pytest.raises(ValidationError, match="absolute"):
        factory.config_model.model_validate({"cgroup_root": "sys/fs/cgroup"})


def test_vanished_pods_disappear_and_nothing_raises(tmp_path):
    layout = LAYOUTS[1]
    receiver, data = _collect(tmp_path, layout)
    root = receiver.config.cgroup_root
    gone = layout.pods[0]
    assert value(data, "k8s.pod.memory.usage", {"k8s.pod.uid": gone.uid}) is not None
    shutil.rmtree(root + gone.dir)
    data = receiver.collect()
    assert not [p for p in points(data) if p[0].get("k8s.pod.uid") == gone.uid]
    assert value(data, "k8s.pod.memory.usage", {"k8s.pod.uid": layout.pods[1].uid}) == USAGE
    # the whole kubepods tree goes (kubelet reset): empty, no error; it comes back: found again
    shutil.rmtree(root + "/kubepods")
    assert points(receiver.collect()) == []
    build(str(tmp_path / "again"), layout)
    shutil.copytree(str(tmp_path / "again/sys/fs/cgroup/kubepods"), root + "/kubepods")
    assert value(receiver.collect(), "k8s.pod.memory.usage", {"k8s.pod.uid": gone.uid}) == USAGE
    assert receiver.telemetry.failing() == {}


def test_churn_while_collecting_never_raises(tmp_path):
    """Pods and containers created and removed while collections run: every collection completes."""
    layout = LAYOUTS[4]  # v2 systemd
    receiver, _ = _collect(tmp_path, layout)
    root = receiver.config.cgroup_root
    src = str(tmp_path / "src")
    os.makedirs(src)
    template = build(src, layout) + layout.pods[0].dir
    target = root + layout.pods[0].dir
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(template, target, dirs_exist_ok=True)

    t = threading.Thread(target=churn, daemon=True)
    t.start()
    try:
        for _ in range(200):
            data = receiver.collect()
            # the pods not churned are always complete
            assert value(data, "container.memory.usage", {"container.id": layout.pods[1].containers[0][1]}) == USAGE
    finally:
        stop.set()
        t.join()
    assert len(receiver._prev_cpu) <= 3 + 4  # pods + containers: no growth from churn


def test_pods_without_their_own_cgroup_with_per_container_off(tmp_path):
    layout = next(x for x in LAYOUTS if x.name == "v2-containerd-colon-form")
    _r, data = _collect(tmp_path, layout, per_container=False)
    assert not [p for p in points(data) if p[1].startswith("container.")]
    assert value(data, "k8s.pod.memory.usage", {"k8s.pod.uid": layout.pods[0].uid}) == 2 * USAGE


def test_a_pod_summed_from_its_containers_keeps_what_a_gone_container_counted(tmp_path):
    """A pod without a cgroup of its own is the sum of its containers. When one exits, the pod's counters keep
    what it counted, as a pod cgroup's do: a cumulative series that went backward would read as a reset (and
    `increase()` would count the whole remainder again). Its gauges are those of the containers still there."""
    layout = next(x for x in LAYOUTS if x.name == "v2-containerd-colon-form")
    # files read by path every time (no kept fds), so that a container's files removed are unreadable at once
    receiver, data = _collect(tmp_path, layout, max_open_files=0)
    root = receiver.config.cgroup_root
    pod = {"k8s.pod.uid": layout.pods[0].uid}
    (first, _, _), (second, _, _) = layout.pods[0].containers

    def counters(data):
        return (value(data, "k8s.pod.cpu.time", pod, {"cpu.mode": "user"}),
                value(data, "k8s.pod.memory.paging.faults", pod, {"system.paging.fault.type": "major"}))

    full = counters(data)
    assert full[0] == 2 * USER and full[1] > 0
    assert value(data, "k8s.pod.memory.usage", pod) == 2 * USAGE
    # the second container's files go first (listed, unreadable: its last reading is kept), then its cgroup
    for name in os.listdir(root + second):
        os.remove(os.path.join(root + second, name))
    assert counters(receiver.collect()) == full
    os.rmdir(root + second)
    data = receiver.collect()
    assert counters(data) == full
    assert value(data, "k8s.pod.memory.usage", pod) == USAGE
    # the first one counts on: the pod with it, on top of what the gone one counted
    with open(root + first + "/cpu.stat", "w") as f:
        f.write("usage_usec 9000000\nuser_usec 7000000\nsystem_usec 2000000\n")
    assert counters(receiver.collect())[0] == 7.0 + USER
    # a pod whose last container is gone has no series, and nothing is kept of it
    shutil.rmtree(root + first)
    data = receiver.collect()
    assert value(data, "k8s.pod.memory.usage", pod) is None
    assert pod["k8s.pod.uid"] not in receiver._summed


def test_unreadable_files_are_counted_once_and_the_rest_is_read(tmp_path, caplog):
    layout = LAYOUTS[1]
    root = build(str(tmp_path), layout)
    cdir, cid = layout.pods[0].containers[0][:2]
    # a file the kernel would refuse (here: a directory in its place reads as EISDIR, as root cannot be denied)
    os.remove(f"{root}{cdir}/memory.stat")
    os.mkdir(f"{root}{cdir}/memory.stat")
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    with caplog.at_level("WARNING"):
        data = receiver.collect()
        receiver.collect()
    assert "read" in receiver.telemetry.failing()
    assert len([r for r in caplog.records if "cgroup files unreadable" in r.getMessage()]) == 1
    assert value(data, "container.memory.usage", {"container.id": cid}) == USAGE
    assert value(data, "container.memory.rss", {"container.id": cid}) is None
    assert value(data, "container.cpu.time", {"container.id": cid}, {"cpu.mode": "user"}) == pytest.approx(USER)
    # repaired: recovered
    os.rmdir(f"{root}{cdir}/memory.stat")
    shutil.copyfile(f"{root}{layout.pods[1].containers[0][0]}/memory.stat", f"{root}{cdir}/memory.stat")
    receiver.collect()
    assert receiver.telemetry.failing() == {}


@pytest.mark.parametrize("layout", [x for x in LAYOUTS if x.name in ("v1-cgroupfs-containerd", "v2-systemd-containerd")],
                         ids=lambda x: x.name)
def test_malformed_lines_are_counted_once_and_the_rest_is_read(tmp_path, caplog, layout):
    """Garbage where a statistics file's lines should be (a file read while the kernel changed its format, a bind
    mount of something else): the lines are skipped, counted and logged once with where and what; the values that
    parse are still emitted."""
    root = build(str(tmp_path), layout)
    cdir, cid = layout.pods[0].containers[0][:2]
    mem = f"{root}{cdir}/memory.stat" if layout.version == "v2" else f"{root}/memory{cdir}/memory.stat"
    good = open(mem, "rb").read()
    with open(mem, "ab") as f:
        f.write(b"\x00\xff garbage here\n" + (b"anon" if layout.version == "v2" else b"total_rss") + b" not-a-number\n")
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    with caplog.at_level("WARNING"):
        data = receiver.collect()
        receiver.collect()
    assert "malformed" in receiver.telemetry.failing()
    logged = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(logged) == 1 and cdir in logged[0] and "not-a-number" in logged[0], logged
    assert value(data, "container.memory.working_set", {"container.id": cid}) == USAGE - INACTIVE_FILE
    with open(mem, "wb") as f:
        f.write(good)
    receiver.collect()
    assert receiver.telemetry.failing() == {}


def test_collections_list_only_kubepods_trees(tmp_path, monkeypatch):
    """After the first search, a collection lists the kubepods tree, its QoS levels and pod directories only:
    host services, container directories and sub-cgroups are never listed."""
    layout = next(x for x in LAYOUTS if x.name == "v2-sub-cgroups")
    receiver, _ = _collect(tmp_path, layout)
    root = receiver.config.cgroup_root
    listed = []
    real = os.scandir

    def scandir(path="."):
        listed.append(os.fspath(path)[len(root):])
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    receiver.collect()
    monkeypatch.undo()
    pods = {pod.dir for pod in layout.pods}
    qos = {"/kubepods.slice/kubepods-burstable.slice", "/kubepods.slice/kubepods-besteffort.slice"}
    assert set(listed) == {"/kubepods.slice"} | qos | pods
    assert receiver.discovery.searches == 1


def test_search_depth_is_bounded(tmp_path):
    layout = next(x for x in LAYOUTS if x.name == "v2-kind-from-host")  # kubepods tree is the 4th level
    root = build(str(tmp_path), layout)
    assert points(make_receiver(cgroup_root=root, max_depth=4).collect()) != []
    assert points(make_receiver(cgroup_root=root, max_depth=3).collect()) == []


def test_a_device_number_given_to_another_disk_is_named_anew(tmp_path):
    """Block majors such as NVMe's and partitions' (259) are handed out dynamically: once a disk is gone its
    major:minor can name another one. The name cache is dropped at each discovery search, so the new disk's name
    shows within `discovery_interval` (sysfs here is the fixture's: a real one cannot be re-pointed)."""
    layout = next(x for x in LAYOUTS if x.version == "v1")
    root = build(str(tmp_path), layout)
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    receiver.collect()
    assert receiver._device_name("8:0") == "vda"
    link = tmp_path / "sys" / "dev" / "block" / "8:0"
    link.unlink()
    os.symlink("../../devices/pci0000:00/0000:00:05.0/nvme/nvme0/nvme0n1", str(link))
    receiver._next_search = 0.0  # the next collection searches, as it does every discovery_interval
    receiver.collect()
    assert receiver._device_name("8:0") == "nvme0n1"
