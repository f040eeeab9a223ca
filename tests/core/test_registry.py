"""The registry imports a component only when a configuration names it: an agent running the cgroup receiver
alone never imports the kubernetes client or grpc (tens of MiB of RSS)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_only_named_components_are_imported(tmp_path):
    cfg = tmp_path / "cgroup-only.yaml"
    cfg.write_text(textwrap.dedent("""
        receivers:
          cgroup:
        exporters:
          debug:
        service:
          pipelines:
            metrics: {receivers: [cgroup], exporters: [debug]}
        """))
    probe = textwrap.dedent(f"""
        import sys
        from podmeter.config import load
        from podmeter.component import registry
        load([{str(cfg)!r}])
        heavy = sorted(m for m in ("kubernetes", "grpc", "pynvml", "receivers.cri", "processors.k8sattributes")
                       if m in sys.modules)
        print(",".join(heavy))
        print(",".join(registry().types("receiver")))
        """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imported, receivers = out.stdout.splitlines()
    assert imported == ""
    # every installed type is still known (for "did you mean" and `podmeter components`)
    assert {"cgroup", "cri", "nvml", "ebpf", "podresources"} <= set(receivers.split(","))
