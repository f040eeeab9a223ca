"""The one-pass reading over a cgroup's kept fds stays on the files it kept: when a reading by path closes a kept fd
(a read that failed), the fd numbers of the one-pass tuple are not kept past it. The kernel cannot be made to fail
one read of a cgroup file on demand, so a test double stands in for it here: one pread of the fixture tree's
memory.stat raises EIO (as a kernel file can, ENOMEM under memory pressure too)."""

from __future__ import annotations

import errno
import os

from cgroup.helpers import make_receiver, value
from cgroup.layouts import all_layouts, build

LAYOUTS = {lay.name: lay for lay in all_layouts()}


def test_a_fd_closed_by_a_failed_read_is_not_read_again_in_one_pass(tmp_path, monkeypatch):
    layout = LAYOUTS["v1-cgroupfs-containerd"]
    root = build(str(tmp_path), layout)
    cdir, cid = layout.pods[0].containers[0][:2]
    c = {"container.id": cid}
    receiver = make_receiver(cgroup_root=root, proc_root=str(tmp_path / "noproc"), limits_every=2)
    rss = value(receiver.collect(), "container.memory.rss", c)  # by path: every file kept
    assert rss is not None
    receiver.collect()  # one pass over the kept fds
    reader = receiver.reader
    path = f"{root}/memory{cdir}/memory.stat"
    fd = reader._fds[cdir][path]
    real_pread = os.pread

    def pread(f, n, offset):
        if f == fd:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_pread(f, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    receiver.collect()  # limits due: read by path, where memory.stat fails and its fd is closed
    monkeypatch.setattr(os, "pread", real_pread)
    assert path not in reader._fds[cdir]
    for _paths, fds in reader._whole.values():
        assert fd not in fds, "a closed fd is still in a one-pass tuple"
    # the closed fd's number is soon another file's (here another cgroup's memory.stat): never read as this one's
    other = tmp_path / "other.stat"
    other.write_text("total_rss 999\ntotal_cache 1\n")
    reused = os.open(other, os.O_RDONLY)
    try:
        if reused != fd:
            os.dup2(reused, fd)
            os.close(reused)
        assert value(receiver.collect(), "container.memory.rss", c) == rss
    finally:
        os.close(fd)
    receiver.shutdown()
