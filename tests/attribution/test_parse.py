"""parse_cgroup on cgroup lines from every runtime, driver and cgroup version, and on garbage (never raises)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podmeter.attribution import NOT_A_POD, CgroupRef, cgroup_path_of, container_of, parse_cgroup, pod_uid_of

UID = "0f1c2d3e-4a5b-4c6d-8e9f-0123456789ab"
SD = UID.replace("-", "_")
STATIC = "6d5a1c3b9e8f7a6b5c4d3e2f1a0b9c8d"
CID = "8a797c5477284c0ebabd61b1f221c63609ba76952a1b41759201d8231b7ab340"

# (line or path, pod_uid, container_id, runtime, qos_class)
CASES = [
    # cgroup v1, kubelet cgroupfs driver (containerd / Docker name the container by its bare id)
    (f"12:memory:/kubepods/burstable/pod{UID}/{CID}", UID, CID, None, "Burstable"),
    (f"4:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{CID}", UID, CID, None, "BestEffort"),
    (f"9:name=systemd:/kubepods/pod{UID}/{CID}", UID, CID, None, "Guaranteed"),
    (f"1:cpu:/kubepods/burstable/pod{UID}/crio-{CID}", UID, CID, "cri-o", "Burstable"),
    # cgroup v2, cgroupfs
    (f"0::/kubepods/burstable/pod{UID}/{CID}", UID, CID, None, "Burstable"),
    # systemd driver, every runtime's scope
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SD}.slice/cri-containerd-{CID}.scope",
     UID, CID, "containerd", "Burstable"),
    (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SD}.slice/crio-{CID}.scope",
     UID, CID, "cri-o", "BestEffort"),
    (f"0::/kubepods.slice/kubepods-pod{SD}.slice/crio-conmon-{CID}.scope", UID, CID, "cri-o", "Guaranteed"),
    (f"0::/kubepods.slice/kubepods-pod{SD}.slice/docker-{CID}.scope", UID, CID, "docker", "Guaranteed"),
    (f"11:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SD}.slice/docker-{CID}.scope",
     UID, CID, "docker", "Burstable"),
    # containerd's systemd driver outside systemd: pod slice and container in one segment
    (f"0::/system.slice/containerd.service/kubepods-burstable-pod{SD}.slice:cri-containerd:{CID}",
     UID, CID, "containerd", "Burstable"),
    (f"0::/system.slice/containerd.service/kubepods-pod{SD}.slice:cri-containerd:{CID}",
     UID, CID, "containerd", "Guaranteed"),
    # kind: kubelet's tree nested in kubelet.slice (and, seen from the host, inside the node's container)
    (f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{SD}.slice/cri-containerd-{CID}.scope", UID, CID, "containerd", "BestEffort"),
    (f"0::/system.slice/docker-{'9' * 64}.scope/kubelet.slice/kubelet-kubepods.slice/"
     f"kubelet-kubepods-pod{SD}.slice/cri-containerd-{CID}.scope", UID, CID, "containerd", "Guaranteed"),
    (f"0::/docker/{'9' * 64}/kubepods/burstable/pod{UID}/{CID}", UID, CID, None, "Burstable"),
    # static pods: 32-hex uids (the manifest's hash), both drivers
    (f"0::/kubepods/pod{STATIC}/{CID}", STATIC, CID, None, "Guaranteed"),
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice/cri-containerd-{CID}.scope",
     STATIC, CID, "containerd", "Burstable"),
    # sub-cgroups made inside a container belong to that container
    (f"0::/kubepods/burstable/pod{UID}/{CID}/init.scope", UID, CID, None, "Burstable"),
    (f"0::/kubepods.slice/kubepods-pod{SD}.slice/cri-containerd-{CID}.scope/system.slice/x.service",
     UID, CID, "containerd", "Guaranteed"),
    # the pod's own cgroup, no container
    (f"0::/kubepods/burstable/pod{UID}", UID, None, None, "Burstable"),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SD}.slice", UID, None, None, "Burstable"),
    # read from a cgroup namespace of its own (podmeter's pod's, the default on cgroup v2): paths relative to its
    # root, with kubepods (and, for cgroupfs, the QoS level) hidden above the `..`s
    (f"0::/../../pod{UID}/{CID}", UID, CID, None, None),
    (f"0::/../../../besteffort/pod{UID}/{CID}", UID, CID, None, "BestEffort"),
    (f"0::/../../../../kubepods/pod{UID}/{CID}", UID, CID, None, "Guaranteed"),
    (f"0::/../../../kubepods-pod{SD}.slice/cri-containerd-{CID}.scope", UID, CID, "containerd", "Guaranteed"),
    (f"0::/../../kubepods-burstable-pod{SD}.slice/cri-containerd-{CID}.scope", UID, CID, "containerd", "Burstable"),
    # bare paths, uppercase uids, a removed cgroup
    (f"/kubepods/burstable/pod{UID.upper()}/{CID}", UID, CID, None, "Burstable"),
    (f"0::/kubepods/burstable/pod{UID}/{CID} (deleted)", UID, CID, None, "Burstable"),
    (f"  0::/kubepods/besteffort/pod{UID}/{CID}\n", UID, CID, None, "BestEffort"),
]

NOT_PODS = [
    "0::/", "/", "", "   ", "0::/init.scope", "0::/system.slice/containerd.service",
    "9:name=systemd:/user.slice/user-0.slice/session-1.scope", "4:memory:/process_api/531ef62c9984190fae6db6dc33a20126",
    "0::/kubepods", "0::/kubepods/burstable", "0::/kubepods.slice/kubepods-besteffort.slice",
    f"0::/system.slice/docker-{CID}.scope",  # a plain Docker container, not a pod
    f"0::/machine.slice/pod{UID}/{CID}",  # pod-shaped but not kubelet's
    "garbage", ":::", "0::", "12:memory:", f"pod{UID}", "0::/../..", f"0::/../../docker-{CID}.scope",
]


@pytest.mark.parametrize("line,uid,cid,runtime,qos", CASES, ids=[c[0][:90] for c in CASES])
def test_every_layout(line, uid, cid, runtime, qos):
    assert parse_cgroup(line) == CgroupRef(uid, cid, runtime, qos)


@pytest.mark.parametrize("line", NOT_PODS)
def test_not_pods_are_nulls(line):
    assert parse_cgroup(line) == NOT_A_POD
    assert parse_cgroup(line).as_dict() == {"pod_uid": None, "container_id": None, "runtime": None, "qos_class": None}


def test_helpers():
    assert cgroup_path_of("12:cpu,cpuacct:/a/b") == "/a/b"
    assert cgroup_path_of("0::/a (deleted)") == "/a"
    assert cgroup_path_of("/bare") == "/bare"
    assert pod_uid_of(f"kubepods-besteffort-pod{SD}.slice") == UID
    assert pod_uid_of("kubepods-besteffort.slice") is None
    assert container_of(f"crio-{CID}.scope") == (CID, "cri-o")
    assert container_of(CID) == (CID, None)
    assert container_of("init.scope") is None
    assert parse_cgroup(None) == NOT_A_POD  # type: ignore[arg-type]


# -- properties ------------------------------------------------------------------------------------------------------

SEGMENTS = st.sampled_from([
    "kubepods", "kubepods.slice", "burstable", "besteffort", "kubepods-burstable.slice", f"pod{UID}",
    f"kubepods-pod{SD}.slice", f"kubepods-besteffort-pod{SD}.slice", CID, f"cri-containerd-{CID}.scope",
    f"crio-{CID}", f"docker-{CID}.scope", f"kubepods-pod{SD}.slice:cri-containerd:{CID}", "system.slice",
    "kubelet.slice", "init.scope", ":", "pod", "kubepods-", ".slice", "-pod", f"pod{STATIC}", "", "..", " (deleted)",
])


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_random_text_never_raises(text):
    ref = parse_cgroup(text)
    assert isinstance(ref, CgroupRef)
    assert ref.pod_uid is None or ref.qos_class in ("Guaranteed", "Burstable", "BestEffort", None)


@settings(max_examples=1000, deadline=None)
@given(st.lists(SEGMENTS, max_size=8), st.sampled_from(["", "0::", "12:memory:", "3:cpu,cpuacct:"]))
def test_plausible_paths_never_raise_and_are_consistent(segments, prefix):
    path = "/" + "/".join(segments)
    ref = parse_cgroup(prefix + path)
    assert isinstance(ref, CgroupRef)
    relative = [p for p in path.split("/") if p][:1] == [".."]  # kubepods may be hidden above a cgroup namespace
    if ref.pod_uid is not None:
        assert ref.pod_uid in (UID, STATIC)
        assert "kubepods" in path or relative
        assert ref.qos_class is not None or relative
    if ref.container_id is not None:
        assert ref.pod_uid is not None and ref.container_id == CID
    if ref.pod_uid is None:
        assert ref == NOT_A_POD


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([c[0] for c in CASES]), st.data())
def test_truncated_lines_never_raise(line, data):
    cut = data.draw(st.integers(0, len(line)))
    ref = parse_cgroup(line[:cut])
    assert isinstance(ref, CgroupRef)
    # a truncated line never invents a different pod or container
    full = parse_cgroup(line)
    assert ref.pod_uid in (None, full.pod_uid)
    assert ref.container_id in (None, full.container_id)
