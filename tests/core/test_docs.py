"""Generated README blocks are fresh, and every built-in component has a README with both blocks."""

import os
import subprocess
import sys

from podmeter.component import KINDS, registry
from podmeter.docs import readme_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")


def test_generated_blocks_are_fresh():
    result = subprocess.run([sys.executable, "-m", "podmeter.docs", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_component_has_a_readme_with_generated_blocks():
    reg = registry().load_all()
    assert not reg.broken, f"components failed to load: {reg.broken}"
    for kind in KINDS:
        for type_ in reg.types(kind):
            factory = reg.get(kind, type_)
            module = sys.modules.get(factory.create.__module__)
            if os.path.abspath(getattr(module, "__file__", "") or "").startswith(TESTS + os.sep):
                continue  # a plug-in some test registered (however pytest named its module)
            path = readme_path(factory)
            text = open(path).read()
            assert "<!-- generated:config -->" in text and "<!-- generated:metrics -->" in text, path


def test_shipped_pipelines_yaml_is_the_top_level_one():
    from podmeter.config import default_config_path

    with open(default_config_path()) as shipped, open(os.path.join(ROOT, "pipelines.yaml")) as top:
        assert shipped.read() == top.read()
