"""podmeter's benchmarks (`make bench`, `python -m bench`) and soak.

The benchmark builds a synthetic node (pod-shaped cgroups on the real kernel, a fake libnvidia-ml with real
processes in those cgroups, the pods in the project's API stand-in), measures podmeter's components on it and
runs the peers (nvitop-exporter, a raw read of the same cgroup files, eBPF against no programs) side by side in
the same run. Components plug in as they exist: a component that is not installed is reported as missing, and the
rest still runs.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

# The synthetic node is built with the project's test harness (tests/harness): it is the one place that knows how
# to make pod-shaped cgroups, a fake libnvidia-ml and an API stand-in.
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
