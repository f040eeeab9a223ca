"""What `podmeter run` tunes in the interpreter once started: the cyclic GC's young generation threshold (a
collection's batch is freed by reference counting before a pass walks it) and glibc's malloc thresholds. Each
probe runs in its own interpreter: both settings are process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def probe(code: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold():
    out = probe("""
import gc, json
from podmeter.runtime import GC_YOUNG_THRESHOLD, tune_gc
before = gc.get_threshold()
tune_gc()
print(json.dumps({"before": before, "after": gc.get_threshold(), "frozen": gc.get_freeze_count(),
                  "want": GC_YOUNG_THRESHOLD}))
""")
    assert out["after"] == [out["want"], *out["before"][1:]]
    assert out["frozen"] > 0


def test_a_batch_is_freed_without_a_young_pass_once_tuned():
    """A batch the size of a 250-pod collection (60,000 container objects, no cycles), made and dropped: with the
    default threshold young passes walk it, tuned none comes."""
    code = """
import gc, json
from podmeter.runtime import tune_gc
passes = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 0 and passes.append(1))
def batch():
    data = [[{"v": i}, [i]] for i in range(20_000)]
    del data
if TUNED:
    tune_gc()
passes.clear()
batch()
print(json.dumps({"passes": len(passes)}))
"""
    assert probe(code.replace("TUNED", "False"))["passes"] > 0
    assert probe(code.replace("TUNED", "True"))["passes"] == 0


def test_tune_malloc_pins_glibc_thresholds_unless_the_environment_sets_them():
    code = "import json; from podmeter.runtime import tune_malloc; print(json.dumps({'tuned': tune_malloc()}))"
    assert probe(code)["tuned"] is True  # this image's Python runs on glibc
    assert probe(code, MALLOC_TRIM_THRESHOLD_="65536")["tuned"] is False
