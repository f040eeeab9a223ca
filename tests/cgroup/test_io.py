"""Block IO per device: cgroup v1 counts it in the IO scheduler's files (BFQ; CFQ before kernel 5.0) for the devices
using that scheduler, and in blk-throttle's, which since kernel 6.10 count only on devices where a throttle rule
was ever set. Fixture trees for each combination; the real kernel with a loop device on BFQ."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from cgroup.helpers import make_receiver, value
from cgroup.layouts import all_layouts, build
from harness import require, require_binary, require_root
from harness.cgroups import ROOT, PodCgroup, hierarchies

from receivers.cgroup import parsers
from receivers.cgroup.discovery import detect_layout

LAYOUTS = {lay.name: lay for lay in all_layouts()}
EMPTY = "Total 0\n"  # what a blkio file of a cgroup with no IO on any device it counts says


def _blkio(*rows: tuple[str, int, int]) -> str:
    """A v1 blkio file: `(device, read, write)` rows as the kernel writes them."""
    out, total = [], 0
    for dev, read, write in rows:
        out += [f"{dev} Read {read}", f"{dev} Write {write}", f"{dev} Sync {read + write}", f"{dev} Async 0",
                f"{dev} Discard 0", f"{dev} Total {read + write}"]
        total += read + write
    return "\n".join([*out, f"Total {total}"]) + "\n"


def _v1_io_tree(tmp_path, files: dict[str, str]):
    """The v1 layout with the first container's blkio files replaced by `files` (name -> content)."""
    layout = LAYOUTS["v1-cgroupfs-containerd"]
    root = build(str(tmp_path), layout)
    cdir, cid = layout.pods[0].containers[0][:2]
    for name, text in files.items():
        with open(f"{root}/blkio{cdir}/{name}", "w") as f:
            f.write(text)
    return root, {"container.id": cid}


def _io(data, where, device, direction, metric="container.disk.io"):
    return value(data, metric, where, {"system.device": device, "disk.io.direction": direction})


@pytest.mark.parametrize("scheduler", ["bfq.", ""], ids=["bfq", "cfq"])
def test_v1_io_comes_from_the_schedulers_files_when_throttles_are_empty(tmp_path, scheduler):
    """Kernel 6.10 on: blk-throttle counts nothing on a device without a throttle rule, and the files of an idle
    throttle say `Total 0`; the BFQ (or, before 5.0, CFQ) files hold the container's IO."""
    root, c = _v1_io_tree(tmp_path, {
        "blkio.throttle.io_service_bytes_recursive": EMPTY, "blkio.throttle.io_serviced_recursive": EMPTY,
        f"blkio.{scheduler}io_service_bytes_recursive": _blkio(("8:0", 4096, 8192)),
        f"blkio.{scheduler}io_serviced_recursive": _blkio(("8:0", 1, 2)),
    })
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    for data in (receiver.collect(), receiver.collect()):  # the first reading by path, the next through kept fds
        assert _io(data, c, "vda", "read") == 4096
        assert _io(data, c, "vda", "write") == 8192
        assert _io(data, c, "vda", "read", "container.disk.operations") == 1
        assert _io(data, c, "vda", "write", "container.disk.operations") == 2
    assert receiver.telemetry.failing() == {}


def test_v1_io_takes_each_device_from_the_first_file_that_lists_it(tmp_path):
    """One device throttled (so counted by blk-throttle), another on BFQ: both are reported, and a device both count
    is taken from the scheduler's files, as runc and so cAdvisor do, never added twice."""
    root, c = _v1_io_tree(tmp_path, {
        "blkio.throttle.io_service_bytes_recursive": _blkio(("8:0", 100, 200), ("253:7", 300, 400)),
        "blkio.throttle.io_serviced_recursive": _blkio(("8:0", 1, 2), ("253:7", 3, 4)),
        "blkio.bfq.io_service_bytes_recursive": _blkio(("7:0", 5000, 6000), ("253:7", 310, 390)),
        "blkio.bfq.io_serviced_recursive": _blkio(("7:0", 5, 6), ("253:7", 2, 3)),
    })
    data = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc")).collect()
    assert _io(data, c, "vda", "read") == 100  # throttle only
    assert _io(data, c, "7:0", "write") == 6000  # BFQ only (no 7:0 in the fixture's sysfs: named by numbers)
    assert _io(data, c, "253:7", "read") == 310  # both: BFQ's
    assert _io(data, c, "253:7", "write", "container.disk.operations") == 3


def test_v1_io_that_starts_after_the_first_reading_has_its_operations(tmp_path):
    """An idle cgroup's scheduler file lists no device, so its operations twin is not read; when IO starts, the
    next collection (one pass over the kept fds) reads the twin too: operations are right from the first points."""
    root, c = _v1_io_tree(tmp_path, {
        "blkio.throttle.io_service_bytes_recursive": EMPTY, "blkio.throttle.io_serviced_recursive": EMPTY,
        "blkio.bfq.io_service_bytes_recursive": EMPTY, "blkio.bfq.io_serviced_recursive": EMPTY,
    })
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    assert _io(receiver.collect(), c, "vda", "read") is None
    cdir = LAYOUTS["v1-cgroupfs-containerd"].pods[0].containers[0][0]
    assert cdir in receiver.reader._whole  # the next collection is one pass over the kept fds
    for name, text in (("blkio.bfq.io_service_bytes_recursive", _blkio(("8:0", 4096, 0))),
                       ("blkio.bfq.io_serviced_recursive", _blkio(("8:0", 3, 0)))):
        with open(f"{root}/blkio{cdir}/{name}", "w") as f:
            f.write(text)
    for _ in range(3):
        data = receiver.collect()
        assert _io(data, c, "vda", "read") == 4096
        assert _io(data, c, "vda", "read", "container.disk.operations") == 3
    assert cdir in receiver.reader._whole
    assert receiver.telemetry.failing() == {}


def test_v1_idle_cgroup_has_no_io_series_and_nothing_reported(tmp_path):
    root, c = _v1_io_tree(tmp_path, {
        "blkio.throttle.io_service_bytes_recursive": EMPTY, "blkio.throttle.io_serviced_recursive": EMPTY,
        "blkio.bfq.io_service_bytes_recursive": EMPTY, "blkio.bfq.io_serviced_recursive": EMPTY,
    })
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"), groups={
        "cpu": False, "memory": False, "pids": False, "pressure": False, "network": False})
    data = receiver.collect()
    assert value(data, "container.disk.io", c) is None
    assert receiver.telemetry.failing() == {}


def test_v2_io_stat_devices_come_and_go(tmp_path):
    """io.stat lists each device the cgroup did IO on; one that is gone (unplugged, a removed device-mapper
    target) stops being reported, the others are not disturbed, and nothing is an error."""
    layout = LAYOUTS["v2-cgroupfs-containerd"]
    root = build(str(tmp_path), layout)
    cdir, cid = layout.pods[0].containers[0][:2]
    c = {"container.id": cid}
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"))
    data = receiver.collect()
    assert _io(data, c, "253:7", "read") == 4096
    with open(f"{root}{cdir}/io.stat", "w") as f:
        f.write("8:0 rbytes=2048576 wbytes=2097152 rios=11 wios=20 dbytes=512 dios=1\n"
                "259:0 rbytes=0 wbytes=65536 rios=0 wios=16 dbytes=0 dios=0\n")
    data = receiver.collect()
    assert _io(data, c, "253:7", "read") is None
    assert _io(data, c, "vda", "read") == 2048576
    assert _io(data, c, "259:0", "write", "container.disk.operations") == 16
    assert receiver.telemetry.failing() == {}


# -- the real kernel ------------------------------------------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path):
    """A loop device, on BFQ when the kernel has it (v1 counts its IO in BFQ's files, the case cAdvisor misses),
    else on `none` (counted by blk-throttle once a throttle rule is set for it, which the test does); v2 counts
    either in io.stat. Yields (device path, whether it is on BFQ)."""
    require_root()
    losetup = require_binary("losetup")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    dev = subprocess.run([losetup, "--find", "--show", str(image)], capture_output=True, text=True)
    require(dev.returncode == 0, f"needs a free loop device: {dev.stderr.strip()}")
    path = dev.stdout.strip()
    sched = f"/sys/block/{os.path.basename(path)}/queue/scheduler"
    before = open(sched).read()  # `[none] mq-deadline kyber bfq`: put back as found (loop devices outlive this)
    # kernels built without CONFIG_IOSCHED_BFQ (and booted with modules off) have no BFQ to switch to
    on_bfq = "bfq" in before.replace("[", " ").replace("]", " ").split()
    try:
        with open(sched, "w") as f:
            f.write("bfq" if on_bfq else "none")
        yield path, on_bfq
    finally:
        subprocess.run([losetup, "--detach", path], check=False)
        if "[" in before:
            with open(sched, "w") as f:
                f.write(before.split("[", 1)[1].split("]", 1)[0])


def test_io_on_the_kernel_is_the_kernels(loop_device):
    device, on_bfq = loop_device
    require(bool(hierarchies()), "needs a mounted cgroup hierarchy")
    layout = detect_layout(ROOT)
    require(layout.io is not None, "needs the blkio (v1) or io (v2) controller")
    dd = shutil.which("dd")
    require(dd is not None, "needs dd")
    name = os.path.basename(device)
    majmin = open(f"/sys/block/{name}/dev").read().strip()
    with PodCgroup(qos="besteffort") as pod:
        if layout.io.v2:
            require(os.path.exists(f"{layout.io.root}{pod.container_path}/io.stat"),
                    "needs the io controller enabled down to the pod's cgroup2 directory")
        elif not on_bfq:
            # a rule far above what a loop device does: nothing is slowed, and blk-throttle counts the device
            with open(f"{layout.io.root}{pod.container_path}/blkio.throttle.read_bps_device", "w") as f:
                f.write(f"{majmin} {1 << 40}")
        # direct IO: the bytes reach the device from this cgroup, not later from writeback (charged to the root)
        writer = pod.spawn([dd, "if=/dev/zero", f"of={device}", "bs=64k", "count=32", "oflag=direct"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert writer.wait(timeout=30) == 0
        reader = pod.spawn([dd, f"if={device}", "of=/dev/null", "bs=64k", "count=16", "iflag=direct"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert reader.wait(timeout=30) == 0
        if layout.io.v2:
            kernel = parsers.parse_io_stat(open(f"{layout.io.root}{pod.container_path}/io.stat", "rb").read())
            want = kernel[majmin][b"rbytes"], kernel[majmin][b"wbytes"]
        else:
            # what the kernel counted for this device, in the files of the path it took
            counted = "bfq" if on_bfq else "throttle"
            got = parsers.parse_blkio(open(
                f"{layout.io.root}{pod.container_path}/blkio.{counted}.io_service_bytes_recursive", "rb").read())
            want = got[majmin][b"read"], got[majmin][b"write"]
        assert want == (16 * 65536, 32 * 65536)
        data = make_receiver().collect()
        c = {"container.id": pod.container_id}
        assert (_io(data, c, name, "read"), _io(data, c, name, "write")) == want
        p = {"k8s.pod.uid": pod.uid}
        assert _io(data, p, name, "write", "k8s.pod.disk.io") == want[1]
