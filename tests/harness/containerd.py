"""A private, real containerd + runc serving CRI v1, with kubelet-shaped busybox pods (root only).

`Containerd` starts containerd (the Debian package) with its own config, root, state and socket under a temp
dir, imports a registry-free busybox OCI image, and runs pods the way kubelet asks for them: kubelet's labels
and annotations, host network (no CNI here) with an empty hostname, and `cgroup_parent`
`/kubepods/burstable/pod<uid>` with the cgroupfs driver, so container processes live in
`/kubepods/burstable/pod<uid>/<container id>` as on a real node.

Facts this relies on (see /work/shared/reference/HARNESS.md):
  - `restrict_oom_score_adj = true`: the VM lacks CAP_SYS_RESOURCE; without it every sandbox fails with
    "can't get final child's PID from pipe: EOF".
  - `sandbox_image` is the local busybox image (no registry to pull pause from); it runs `sleep infinity`.
  - `SystemdCgroup = false`: systemd is not PID 1 here.
  - busybox `sleep` is PID 1 of its PID namespace and ignores SIGTERM: StopContainer with timeout 0.
  - a SIGKILLed containerd leaves shims, runc containers and mounts behind: `close()` kills shims by PID,
    `runc delete --force`s leftovers, unmounts, and removes shim sockets and the pod cgroups it created.

Only one instance runs at a time on a machine (instances would share the `kubepods` cgroup tree and
`/run/containerd/s`): `start()` takes an exclusive flock on LOCK_PATH, so concurrent test runs serialize.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from harness import require, stop_process
from harness.cgroups import _rmdir_tree

LOCK_PATH = "/tmp/podmeter-containerd.lock"
IMAGE_REF = "localhost/podmeter-busybox:1.36"
CGROUP_ROOT = "/sys/fs/cgroup"


@contextlib.contextmanager
def running():
    """A started Containerd, closed afterwards; a missing prerequisite fails the test under CI=true (skips
    otherwise), as `require` does."""
    ok, why = available()
    require(ok, why)
    c = Containerd().start()
    try:
        yield c
    finally:
        c.close()


def available() -> tuple[bool, str]:
    """Whether this machine can run the harness, and why not."""
    if os.geteuid() != 0:
        return False, "needs root (containerd, runc, cgroups, mounts)"
    for binary in ("containerd", "runc", "ctr", "containerd-shim-runc-v2"):
        if shutil.which(binary) is None:
            return False, f"needs {binary} (apt-get install containerd runc; make test-deps)"
    if _busybox() is None:
        return False, "needs a static busybox (apt-get install busybox-static)"
    return True, ""


def _busybox() -> str | None:
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(path):
            out = subprocess.run(["ldd", path], capture_output=True, text=True)
            if out.returncode != 0 or "not a dynamic" in (out.stdout + out.stderr):
                return path
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------
# A one-layer OCI image around static busybox (no registry here)


def build_image(busybox: str, out: str, ref: str = IMAGE_REF) -> None:
    def digest(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def add(tf: tarfile.TarFile, name: str, data: bytes | None = None, mode: int = 0o644,
            kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime, ti.linkname = kind, mode, 0, link
        ti.size = len(data) if data is not None else 0
        tf.addfile(ti, io.BytesIO(data) if data is not None else None)

    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin", "etc", "dev", "proc", "sys", "tmp", "root", "var", "run"):
            add(tf, d, mode=0o1777 if d == "tmp" else 0o755, kind=tarfile.DIRTYPE)
        with open(busybox, "rb") as f:
            add(tf, "bin/busybox", f.read(), 0o755)
        for applet in sorted(set(applets) - {"busybox"}):
            add(tf, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        add(tf, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
        add(tf, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    layer = buf.getvalue()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = json.dumps({
        "architecture": arch, "os": "linux",
        # also the pod sandbox ("pause") image: it must run forever
        "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sleep", "infinity"],
                   "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [digest(layer)]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer),
                    "size": len(layer)}],
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(manifest),
                       "size": len(manifest), "platform": {"architecture": arch, "os": "linux"},
                       "annotations": {"io.containerd.image.name": ref,
                                       "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1]}}],
    }, sort_keys=True).encode()
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tf:
        add(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add(tf, "blobs", mode=0o755, kind=tarfile.DIRTYPE)
        add(tf, "blobs/sha256", mode=0o755, kind=tarfile.DIRTYPE)
        for blob in (layer, config, manifest):
            add(tf, "blobs/sha256/" + digest(blob)[7:], blob)
        add(tf, "index.json", index)


# ---------------------------------------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    namespace: str
    uid: str
    sandbox_id: str
    config: object
    containers: dict[str, str] = field(default_factory=dict)  # container name -> container id

    @property
    def cgroup_parent(self) -> str:
        return f"/kubepods/burstable/pod{self.uid}"


class Containerd:
    """Start with `start()` (or as a context manager); always `close()`."""

    def __init__(self, image_ref: str = IMAGE_REF) -> None:
        self.image_ref = image_ref
        self.work = ""
        self.socket = ""
        self.proc: subprocess.Popen | None = None
        self.pods: list[Pod] = []
        self._uids: set[str] = set()  # pod cgroups to remove at close
        self._lock_fd: int | None = None
        self._channel = None
        self.rt = self.img = None
        self.snapshotter = "native"
        self._pre_run_containerd = os.path.exists("/run/containerd")

    # -- lifecycle ------------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def start(self, lock_timeout: float = 600.0) -> Containerd:
        self._lock(lock_timeout)
        try:
            # short path: unix socket paths are limited to 107 bytes
            self.work = tempfile.mkdtemp(prefix="pmctrd.", dir="/tmp")
            self.socket = f"{self.work}/c.sock"
            for d in ("cni/net.d", "cni/bin", "logs"):
                os.makedirs(f"{self.work}/{d}")
            self.snapshotter = self._probe_snapshotter()
            self._write_config()
            self.launch()
            image = f"{self.work}/busybox-oci.tar"
            build_image(_busybox() or "/bin/busybox", image, self.image_ref)
            subprocess.run(["ctr", "-a", self.socket, "-n", "k8s.io", "images", "import", "--snapshotter",
                            self.snapshotter, image], check=True, capture_output=True, timeout=60)
        except BaseException:
            self.close()
            raise
        return self

    def launch(self) -> None:
        """Start (or restart) containerd on the same config, root and state, and wait until CRI answers."""
        log = open(f"{self.work}/containerd.log", "ab")
        self.proc = subprocess.Popen(["containerd", "--config", f"{self.work}/config.toml", "--log-level", "info"],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self._connect()
        deadline = time.monotonic() + 30
        from receivers.cri import api_pb2 as pb

        while True:
            try:
                self.rt.Version(pb.VersionRequest(version="v1"), timeout=2)
                return
            except Exception as exc:  # the CRI plugin starts asynchronously
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"containerd did not serve CRI: {exc}\n{self.log_tail()}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL containerd (its shims and containers keep running, as on a real node)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.launch()

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(f"{self.work}/containerd.log", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None and self.rt is not None:
                with contextlib.suppress(Exception):
                    for pod in list(self.pods):
                        self.remove_pod(pod)
            stop_process(self.proc)
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            if self.work:
                self._sweep()
        finally:
            self._unlock()

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- CRI -------------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        import grpc

        from receivers.cri import api_pb2_grpc as pbg

        if self._channel is not None:
            self._channel.close()
        self._channel = grpc.insecure_channel(self.endpoint)
        self.rt = pbg.RuntimeServiceStub(self._channel)
        self.img = pbg.ImageServiceStub(self._channel)

    def run_pod(self, name: str, namespace: str = "default", containers: dict[str, list[str]] | None = None,
                labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
                uid: str | None = None, memory_limit: int = 64 << 20, attempt: int = 0) -> Pod:
        """A pod sandbox plus containers (name -> argv), shaped like kubelet's requests."""
        from receivers.cri import api_pb2 as pb

        uid = uid or str(uuid.uuid4())
        containers = containers if containers is not None else {"main": ["/bin/sleep", "3600"]}
        self._uids.add(uid)
        ns_opts = pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD)
        log_dir = f"{self.work}/logs/{namespace}_{name}_{uid}"
        os.makedirs(log_dir, exist_ok=True)
        kube = {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                "io.kubernetes.pod.uid": uid}
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt),
            hostname="",  # host network shares the host UTS namespace: a hostname would fail in runc
            log_directory=log_dir,
            labels={**(labels or {}), **kube},
            annotations={"kubernetes.io/config.source": "api", **(annotations or {})},
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=f"/kubepods/burstable/pod{uid}",
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=ns_opts)),
        )
        sandbox_id = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
        pod = Pod(name, namespace, uid, sandbox_id, config)
        self.pods.append(pod)
        for cname, argv in containers.items():
            pod.containers[cname] = self.add_container(pod, cname, argv, memory_limit=memory_limit)
        return pod

    def add_container(self, pod: Pod, name: str, argv: list[str], attempt: int = 0,
                      memory_limit: int = 64 << 20) -> str:
        from receivers.cri import api_pb2 as pb

        ns_opts = pb.NamespaceOption(network=pb.NODE, pid=pb.CONTAINER, ipc=pb.POD)
        cfg = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt),
            image=pb.ImageSpec(image=self.image_ref),
            command=argv[:1], args=argv[1:], working_dir="/",
            labels={"io.kubernetes.container.name": name, "io.kubernetes.pod.name": pod.name,
                    "io.kubernetes.pod.namespace": pod.namespace, "io.kubernetes.pod.uid": pod.uid},
            annotations={"io.kubernetes.container.restartCount": str(attempt),
                         "io.kubernetes.container.terminationMessagePath": "/dev/termination-log"},
            log_path=f"{name}/{attempt}.log",
            linux=pb.LinuxContainerConfig(
                resources=pb.LinuxContainerResources(cpu_shares=102, cpu_period=100000, cpu_quota=50000,
                                                     memory_limit_in_bytes=memory_limit, oom_score_adj=999),
                security_context=pb.LinuxContainerSecurityContext(namespace_options=ns_opts)),
        )
        cid = self.rt.CreateContainer(pb.CreateContainerRequest(pod_sandbox_id=pod.sandbox_id, config=cfg,
                                                                sandbox_config=pod.config), timeout=60).container_id
        self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        pod.containers[name] = cid
        return cid

    def remove_container(self, container_id: str) -> None:
        from receivers.cri import api_pb2 as pb

        self.rt.StopContainer(pb.StopContainerRequest(container_id=container_id, timeout=0), timeout=30)
        self.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id), timeout=30)
        for pod in self.pods:
            for name, cid in list(pod.containers.items()):
                if cid == container_id:
                    del pod.containers[name]

    def stop_pod(self, pod: Pod) -> None:
        """Stop the sandbox but keep it (NOT_READY), as kubelet does before it makes a new attempt."""
        from receivers.cri import api_pb2 as pb

        self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=30)

    def remove_pod(self, pod: Pod) -> None:
        from receivers.cri import api_pb2 as pb

        for cid in list(pod.containers.values()):
            self.remove_container(cid)
        self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=30)
        self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id), timeout=30)
        if pod in self.pods:
            self.pods.remove(pod)

    def container_pid(self, container_id: str) -> int:
        from receivers.cri import api_pb2 as pb

        resp = self.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=container_id, verbose=True), timeout=10)
        return int(json.loads(resp.info["info"])["pid"])

    def exec(self, container_id: str, argv: list[str], timeout: int = 30) -> bytes:
        from receivers.cri import api_pb2 as pb

        resp = self.rt.ExecSync(pb.ExecSyncRequest(container_id=container_id, cmd=argv, timeout=timeout),
                                timeout=timeout + 5)
        if resp.exit_code != 0:
            raise RuntimeError(f"exec {argv} exited {resp.exit_code}: {resp.stderr.decode(errors='replace')}")
        return resp.stdout

    # -- internals --------------------------------------------------------------------------------------------

    def _lock(self, timeout: float) -> None:
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise RuntimeError(f"another containerd harness holds {LOCK_PATH}") from None
                time.sleep(0.2)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _probe_snapshotter(self) -> str:
        d = f"{self.work}/ovl"
        for sub in ("l", "u", "w", "m"):
            os.makedirs(f"{d}/{sub}")
        ok = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                             f"lowerdir={d}/l,upperdir={d}/u,workdir={d}/w", f"{d}/m"],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", f"{d}/m"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)
        return "overlayfs" if ok else "native"

    def _write_config(self) -> None:
        w = self.work
        with open(f"{w}/config.toml", "w") as f:
            f.write(f"""version = 2
root = "{w}/root"
state = "{w}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
oom_score = 0

[grpc]
  address = "{self.socket}"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{w}/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{self.image_ref}"
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    disable_apparmor = true
    restrict_oom_score_adj = true
    tolerate_missing_hugetlb_controller = true
    disable_hugetlb_controller = true
    stats_collect_period = 1
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{w}/cni/bin"
      conf_dir = "{w}/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "{self.snapshotter}"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "{w}/runc"
""")

    def _sweep(self) -> None:
        """Remove whatever a killed containerd left: shims, runc containers, mounts, sockets, cgroups, files."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if not argv or b"containerd-shim" not in argv[0] or self.socket.encode() not in argv:
                continue
            with contextlib.suppress(OSError):
                os.kill(int(entry), signal.SIGKILL)
            # a SIGKILLed shim leaves its socket /run/containerd/s/sha256(<address>/<namespace>/<id>)
            with contextlib.suppress(ValueError, IndexError):
                sid = argv[argv.index(b"-id") + 1].decode()
                key = hashlib.sha256(f"{self.socket}/k8s.io/{sid}".encode()).hexdigest()
                with contextlib.suppress(OSError):
                    os.unlink(f"/run/containerd/s/{key}")
        runc_root = f"{self.work}/runc/k8s.io"
        if os.path.isdir(runc_root):
            listed = subprocess.run(["runc", "--root", runc_root, "list", "-q"], capture_output=True, text=True)
            for cid in listed.stdout.split():
                subprocess.run(["runc", "--root", runc_root, "delete", "--force", cid], capture_output=True)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f]
        for mnt in sorted((m for m in mounts if m.startswith(self.work + "/")), reverse=True):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        for uid in self._uids:
            for hierarchy in os.listdir(CGROUP_ROOT):
                _rmdir_tree(f"{CGROUP_ROOT}/{hierarchy}/kubepods/burstable/pod{uid}")
        if not self._pre_run_containerd:
            for d in ("/run/containerd/s", "/run/containerd"):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        shutil.rmtree(self.work, ignore_errors=True)
