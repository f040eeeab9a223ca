"""Every receiver's metrics, together: one name has one meaning wherever it comes from."""

from __future__ import annotations

from podmeter.component import registry

RECEIVERS = ("cgroup", "nvml", "ebpf", "cri", "podresources")


def test_a_metric_name_has_one_instrument_and_unit_across_receivers():
    """The cri receiver can emit what the cgroup receiver does (where cgroups cannot be read): a backend given
    `container.memory.usage` as a gauge by one and as a sum by the other sees two types under one name."""
    seen: dict[str, tuple[str, str, str]] = {}
    clashes = []
    for type_ in RECEIVERS:
        factory = registry().get("receiver", type_)
        assert factory is not None, type_
        for spec in factory.metrics:
            shape = (spec.instrument, spec.unit)
            first = seen.setdefault(spec.name, (*shape, type_))
            if first[:2] != shape:
                clashes.append(f"{spec.name}: {first[2]} {first[:2]}, {type_} {shape}")
    assert not clashes, clashes
    assert {"container.memory.usage", "container.cpu.time"} <= seen.keys()
