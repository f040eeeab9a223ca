"""`podmeter validate` on a minimal pipeline around a processors section, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import yaml


def validate_cli(tmp_path, processors: str) -> tuple[int, str]:
    """(exit status, stderr) of `podmeter validate` on cgroup -> the given processors -> debug; never a traceback."""
    names = list(yaml.safe_load(processors))
    f = tmp_path / "c.yaml"
    f.write_text("receivers: {cgroup: {}}\nprocessors:\n" + textwrap.indent(textwrap.dedent(processors), "  ")
                 + "exporters: {debug: {}}\nservice: {pipelines: {metrics: {receivers: [cgroup], processors: ["
                 + ", ".join(names) + "], exporters: [debug]}}}\n")
    proc = subprocess.run([sys.executable, "-m", "podmeter.cli", "validate", "--config", str(f)],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr
