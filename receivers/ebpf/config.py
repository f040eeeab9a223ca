from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from podmeter.config import ComponentConfig, ScraperConfig

from .metrics import METRIC_NAMES
from .syscalls import TABLES

PROFILES: dict[str, frozenset[str]] = {
    # counters only: one map update per syscall, switch and OOM kill
    "minimal": frozenset({"context_switches", "syscalls", "oom_kills"}),
    # + run-queue latency, TCP, major faults, per-syscall counts for tracked_syscalls
    "standard": frozenset({"context_switches", "runqueue_latency", "syscalls", "tcp", "oom_kills", "page_faults"}),
    # + per-syscall latency histograms (a timestamp per tracked syscall entry)
    "comprehensive": frozenset({"context_switches", "runqueue_latency", "syscalls", "syscall_latency", "tcp",
                                "oom_kills", "page_faults"}),
    "custom": frozenset(),
}

ATTACH_KINDS = ("fentry", "tp_btf", "raw_tp")

# epoll_pwait beside epoll_wait: Go's runtime (kubelet, most controllers and many workloads) waits with
# epoll_pwait on every architecture, where C programs' epoll_wait() is the epoll_wait syscall on x86_64
DEFAULT_SYSCALLS = ["read", "write", "openat", "close", "connect", "accept4", "sendto", "recvfrom", "futex",
                    "epoll_wait", "epoll_pwait", "fsync", "mmap"]
# A default an architecture lacks -> the syscall its libc makes instead: the asm-generic table (arm64) has no
# epoll_wait, glibc's epoll_wait() calls epoll_pwait there.
DEFAULT_ALIASES = {"epoll_wait": "epoll_pwait"}


def default_syscalls(machine: str | None = None) -> list[str]:
    """DEFAULT_SYSCALLS in this machine's table (the defaults must validate on every supported architecture)."""
    table = TABLES.get(machine or os.uname().machine)
    if table is None:
        return list(DEFAULT_SYSCALLS)
    names = (n if n in table else DEFAULT_ALIASES.get(n, n) for n in DEFAULT_SYSCALLS)
    return list(dict.fromkeys(n for n in names if n in table))  # an alias already in the list is named once


class MetricToggle(ComponentConfig):
    enabled: bool = Field(True, description="Emit this metric")


class ProgramsConfig(ComponentConfig):
    """Per-program switches; unset (null) takes the profile's choice."""

    context_switches: bool | None = Field(None, description="Voluntary and involuntary context switches (sched_switch)")
    runqueue_latency: bool | None = Field(
        None, description="Run-queue latency histogram (sched_wakeup + sched_switch, a timestamp per wakeup)")
    syscalls: bool | None = Field(None, description="Syscall count and errors, per-syscall counts for tracked_syscalls")
    syscall_latency: bool | None = Field(
        None, description="Latency histogram per tracked syscall (adds a sys_enter program); needs syscalls")
    tcp: bool | None = Field(None, description="TCP bytes sent/received, retransmitted segments, connections")
    oom_kills: bool | None = Field(None, description="OOM kills, attributed to the victim's cgroup")
    page_faults: bool | None = Field(None, description="Major page faults (a software perf event per CPU)")


class EbpfConfig(ScraperConfig):
    profile: Literal["minimal", "standard", "comprehensive", "custom"] = Field(
        "standard", description="Programs to run: minimal, standard, comprehensive, or custom (only those enabled "
                                "under programs)")
    programs: ProgramsConfig = Field(default_factory=ProgramsConfig,
                                     description="Switch single programs on or off over the profile")
    latency_tracking: bool = Field(
        True, description="false turns off run-queue and syscall latency whatever the profile says (the costly "
                          "part: a timestamp per wakeup and per tracked syscall)")
    tracked_syscalls: list[str] = Field(
        default_factory=lambda: default_syscalls(),
        description="Syscalls counted (and, with syscall_latency, timed) by name; [] turns the breakdown off. "
                    "epoll_pwait is Go's runtime's wait (and, as arm64 has no epoll_wait, libc's epoll_wait() there)")
    max_cgroups: int = Field(10240, ge=16, le=1 << 20,
                             description="Entries of the per-cgroup LRU map (least recently used cgroups are evicted, "
                                         "before it is full): at least twice the cgroups active between two "
                                         "collections, see Sizing the maps")
    max_syscall_entries: int = Field(
        0, ge=0, le=1 << 22, description="Entries of the per-(cgroup, syscall) LRU map; 0 means max_cgroups * 4")
    cgroup_root: str = Field("/sys/fs/cgroup", description="Where cgroups are mounted; the cgroup2 hierarchy is "
                                                           "found there or through /proc/self/mountinfo")
    non_pod_cgroups: Literal["drop", "aggregate", "keep"] = Field(
        "drop", description="Cgroups outside pods: drop them, sum them into one resource with "
                            "podmeter.cgroup.scope=host, or keep each as a resource with cgroup.path")
    attach_order: list[Literal["fentry", "tp_btf", "raw_tp"]] = Field(
        default_factory=lambda: list(ATTACH_KINDS),
        description="Hook kinds to try, best first; a hook whose kind is refused falls back to the next")
    bpf_object: str = Field("", description="Path of podmeter.bpf.o; empty means the one built next to this "
                                            "receiver by `make bpf`")
    metrics: dict[str, MetricToggle] = Field(
        default_factory=dict, description="Per-metric settings, e.g. {container.syscall.errors: {enabled: false}}")

    @field_validator("tracked_syscalls")
    @classmethod
    def _known_syscalls(cls, names: list[str]) -> list[str]:
        table = TABLES.get(os.uname().machine, {})
        unknown = [n for n in names if n not in table]
        if table and unknown:
            raise ValueError(f"unknown syscall name(s) {', '.join(unknown)} for {os.uname().machine}")
        too_high = [n for n in names if table.get(n, 0) >= 512]
        if too_high:
            raise ValueError(f"syscall(s) {', '.join(too_high)} have numbers >= 512 and cannot be tracked")
        return list(dict.fromkeys(names))

    @field_validator("attach_order")
    @classmethod
    def _attach_order(cls, kinds: list[str]) -> list[str]:
        if not kinds:
            raise ValueError("attach_order needs at least one of fentry, tp_btf, raw_tp")
        return list(dict.fromkeys(kinds))

    @model_validator(mode="after")
    def _metric_names(self) -> EbpfConfig:
        unknown = sorted(set(self.metrics) - METRIC_NAMES)
        if unknown:
            raise ValueError(f"metrics: unknown metric(s) {', '.join(unknown)}; known: {', '.join(sorted(METRIC_NAMES))}")
        return self

    def features(self) -> set[str]:
        """The enabled programs: the profile, then the per-program switches, then latency_tracking."""
        on = set(PROFILES[self.profile])
        for name, value in self.programs.model_dump().items():
            if value is True:
                on.add(name)
            elif value is False:
                on.discard(name)
        if not self.latency_tracking:
            on -= {"runqueue_latency", "syscall_latency"}
        if "syscalls" not in on:
            on.discard("syscall_latency")
        return on

    def syscall_numbers(self) -> dict[int, str]:
        table = TABLES.get(os.uname().machine, {})
        return {table[n]: n for n in self.tracked_syscalls if n in table}
