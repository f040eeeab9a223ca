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


def test_no_component_hides_a_method_the_runtime_calls():
    """An instance attribute named like a method of its class hides it: the nvml receiver once kept a bool in
    `ready`, and `podmeter collect`, which calls every receiver's ready(timeout), failed with an internal error."""
    import logging
    from importlib.metadata import entry_points

    from podmeter.component import ComponentID, CreateSettings, registry
    from podmeter.telemetry import null_component_telemetry

    reg = registry()
    checked = 0
    for kind in ("receiver", "processor", "exporter", "extension"):
        # the built-in ones, as pyproject.toml registers them (other tests add plug-ins of their own to the registry)
        for type_ in sorted(ep.name for ep in entry_points(group=f"podmeter.{kind}s")):
            factory = reg.get(kind, type_)
            telemetry = null_component_telemetry(type_, logging.getLogger(f"test.{type_}"))
            component = factory.create(CreateSettings(id=ComponentID(type_), kind=kind, logger=telemetry.logger,
                                                      telemetry=telemetry, pipeline="metrics"),
                                       factory.config_model.model_validate({}))
            cls = type(component)
            methods = {n for n in dir(cls) if not n.startswith("__") and callable(getattr(cls, n, None))}
            assert not set(vars(component)) & methods, (kind, type_, set(vars(component)) & methods)
            checked += 1
    assert checked >= 14  # every built-in component
