"""cgroup id -> path -> pod attribution on the real cgroup2 tree (root): by file handle, by walking the tree where
handles are refused, and forgetting removed cgroups."""

from __future__ import annotations

import os

import pytest
from harness import require, require_root
from harness.cgroups import PodCgroup, v2_root

from receivers.ebpf.cgroups import CgroupPaths

pytestmark = pytest.mark.root


@pytest.fixture
def paths():
    require_root()
    root = v2_root()
    require(root is not None, "needs a cgroup2 hierarchy")
    p = CgroupPaths(root)
    yield p
    p.close()


@pytest.mark.parametrize("handles", [True, False], ids=["open_by_handle_at", "tree_walk"])
def test_resolves_pod_and_container(paths, handles):
    paths._handles = handles
    with PodCgroup() as pod:
        cgid = pod.cgroup_id()
        pod_id = os.stat(v2_root() + pod.pod_path).st_ino
        got = paths.resolve([cgid, pod_id])
        path, ref = got[cgid]
        assert path == pod.container_path
        assert (ref.pod_uid, ref.container_id) == (pod.uid, pod.container_id)
        assert got[pod_id][1].pod_uid == pod.uid and got[pod_id][1].container_id is None
        if handles:
            assert paths.walks == 0 and paths.handle_lookups == 2
        else:
            assert paths.walks == 1


def test_gone_ids_are_negative_cached_and_removed_ones_forgotten(paths):
    with PodCgroup() as pod:
        cgid = pod.cgroup_id()
        assert paths.resolve([cgid])[cgid] is not None
    # removed: still cached until the receiver forgets it (after emitting its last sample)
    paths.forget([cgid])
    assert paths.resolve([cgid]) == {cgid: None}
    lookups = paths.handle_lookups + paths.walks
    assert paths.resolve([cgid]) == {cgid: None}
    assert paths.handle_lookups + paths.walks == lookups  # not looked up again


def test_retain_bounds_the_cache(paths):
    paths._handles = False
    paths.refresh()
    assert len(paths) >= 1
    paths.retain([1])
    assert len(paths) <= 1
