"""A kernel with PSI switched off at boot (`psi=0`, or CONFIG_PSI_DEFAULT_DISABLED without `psi=1`, as CentOS Stream
9's): its cgroup2 pressure files are there but every read answers EOPNOTSUPP. The kernel cannot be switched
so at run time, so a test double stands in for it here: reads of the fixture tree's pressure files raise that
error, as the kernel's psi_show() returns it."""

from __future__ import annotations

import errno
import os

import pytest
from cgroup.helpers import make_receiver, opened_during, value
from cgroup.layouts import all_layouts, build

from receivers.cgroup import stats

LAYOUTS = {lay.name: lay for lay in all_layouts()}


def _psi_off(monkeypatch):
    real_pread, real_read = os.pread, os.read

    def refuse(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".pressure"):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def pread(fd, n, offset):
        refuse(fd)
        return real_pread(fd, n, offset)

    def read(fd, n):
        refuse(fd)
        return real_read(fd, n)

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "read", read)
    monkeypatch.setattr(stats, "_pread", pread)


@pytest.mark.parametrize("name", ["v2-systemd-containerd", "hybrid-cgroupfs-containerd"])
@pytest.mark.parametrize("max_open_files", [16384, 0])
def test_psi_switched_off_is_no_error_and_not_read_again(tmp_path, monkeypatch, caplog, name, max_open_files):
    layout = LAYOUTS[name]
    root = build(str(tmp_path), layout)
    _psi_off(monkeypatch)
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"), limits_every=2,
                             max_open_files=max_open_files)
    cid = layout.pods[0].containers[0][1]
    c = {"container.id": cid}
    with caplog.at_level("WARNING"):
        data = receiver.collect()
        later = [opened_during(receiver.collect) for _ in range(3)]  # the second and fourth read limits too
    # no error of any cgroup, nothing logged as one; the rest of the cgroup is read as ever
    assert receiver.telemetry.failing() == {}
    assert value(data, "container.pressure.stall_time", c, {"pressure.resource": "cpu", "pressure.type": "some"}) \
        is None
    assert value(data, "container.memory.usage", c) == 104857600
    warned = [r.getMessage() for r in caplog.records if "psi=1" in r.getMessage()]
    assert len(warned) == 1, warned
    # and pressure files are not opened again, not even on the collections that read limits
    for data, opened in later:
        assert [path for path in opened if path.endswith(".pressure")] == []
        assert value(data, "container.memory.usage", c) == 104857600


@pytest.mark.parametrize("name", ["v2-systemd-containerd", "hybrid-cgroupfs-containerd", "v1-cgroupfs-containerd"])
@pytest.mark.parametrize("max_open_files", [16384, 0])
def test_pods_read_for_pressure_and_network_alone_keep_their_network_without_psi(tmp_path, monkeypatch, name,
                                                                                  max_open_files):
    """With only the pressure and network groups on, a pod whose pressure cannot be read (PSI off; pure v1 has no
    pressure files at all) is still there as discovery listed it: its network counters come all the same."""
    from cgroup.test_netns import HOST_NETNS, RX, _in_pod, _process

    layout = LAYOUTS[name]
    root = build(str(tmp_path), layout)
    proc = str(tmp_path / "proc")
    _process(proc, 1, HOST_NETNS)
    _process(proc, 123, "net:[4026532001]", rx=1000, tx=2000)
    pod = layout.pods[0]
    cdir = pod.containers[0][0]
    walk = f"{root}/memory" if layout.version in ("v1", "hybrid") else root
    _in_pod(f"{walk}{cdir}/cgroup.procs", 123)
    _psi_off(monkeypatch)
    receiver = make_receiver(cgroup_root=root, proc_root=proc, max_open_files=max_open_files, limits_every=2,
                             groups={"cpu": False, "memory": False, "io": False, "pids": False,
                                     "pressure": True, "network": True})
    for _ in range(3):  # the first collection finds PSI off, the later ones no longer read it
        data = receiver.collect()
        assert value(data, "k8s.pod.network.io", {"k8s.pod.uid": pod.uid}, RX) == 1000
    assert receiver.telemetry.failing() == {}
    receiver.shutdown()
