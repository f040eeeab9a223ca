"""Sizes of every container (dict, list, set, deque) a component holds, found by walking its attributes.

The soak watches all of them, so a cache nobody listed (an attribution cache, a pod table, per-process state, a
cgroup path cache) cannot grow unnoticed; the names in the report are attribute paths like
`nvml._procs` or `k8sattributes.informer._pods`.
"""

from __future__ import annotations

import collections
import threading

CONTAINERS = (dict, list, set, frozenset, collections.deque, collections.OrderedDict)
PROJECT = ("receivers", "processors", "exporters", "podmeter", "harness")
SKIP_TYPES = (threading.Thread, threading.Event, type(threading.Lock()), type(threading.RLock()))


def _own(obj) -> bool:
    mod = type(obj).__module__ or ""
    return mod.split(".")[0] in PROJECT


def census(root, name: str, depth: int = 4) -> dict[str, int]:
    out: dict[str, int] = {}
    seen: set[int] = set()

    def walk(obj, path: str, d: int) -> None:
        if id(obj) in seen or d < 0:
            return
        seen.add(id(obj))
        attrs = {}
        if hasattr(obj, "__dict__"):
            attrs.update(vars(obj))
        for slot in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, slot):
                attrs[slot] = getattr(obj, slot)
        for key, value in attrs.items():
            if isinstance(value, SKIP_TYPES):
                continue
            p = f"{path}.{key}"
            if isinstance(value, CONTAINERS):
                try:
                    out[p] = out.get(p, 0) + len(value)  # summed over the items of a container walked below
                except TypeError:
                    continue
                # containers of project objects (a list of devices, a dict of informers): look inside the first few
                items = value.values() if isinstance(value, dict) else value
                if isinstance(value, (set, frozenset)):
                    continue
                for i, item in enumerate(items):
                    if i >= 64:
                        break
                    if _own(item):
                        walk(item, f"{p}[]", d - 1)
            elif _own(value) and not isinstance(value, type):
                walk(value, p, d - 1)

    walk(root, name, depth)
    return out
