"""The cgroup and procfs file parsers: exact on real contents, and never raising on random or truncated input."""

from __future__ import annotations

import os

from cgroup.layouts import FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

from receivers.cgroup import parsers as p

NET_DEV = b"""Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 135178910   31980    0    0    0     0          0         0 135178910   31980    0    0    0     0       0          0
  eth0: 539685954   15483    2    3    0     0          0         0   838912    8590    4    5    0     0       0          0
"""

PARSERS = (p.parse_int, p.parse_flat, p.parse_psi, p.parse_io_stat, p.parse_blkio, p.parse_cpuacct_usage_all,
           p.parse_net_dev)


def _fixture_texts() -> list[bytes]:
    out = [NET_DEV]
    for dirpath, _dirs, files in os.walk(FIXTURES):
        out += [open(os.path.join(dirpath, f), "rb").read() for f in files if not f.endswith(".md")]
    return out


def test_exact_values():
    assert p.parse_int(b"max\n") is None and p.parse_int(b"12\n") == 12 and p.parse_int(b"") is None
    assert p.parse_int(b" 7\nx") == 7
    assert p.parse_flat(b"a 1\nb x\nc\n d 2\ne 3") == {b"a": 1, b"e": 3}
    assert p.parse_flat(b"a 1\nb 2\n") == {b"a": 1, b"b": 2}
    # with keys: only those (what is there of them), on both the fast and the line-by-line path
    assert p.parse_flat(b"a 1\nb 2\nc 3\n", (b"c", b"a", b"z")) == {b"c": 3, b"a": 1}
    assert p.parse_flat(b"a 1\nb x\nc 3\n", (b"c", b"b")) == {b"c": 3}
    assert p.parse_psi(b"some avg10=1.00 avg60=0.00 avg300=0.00 total=15\nfull avg10=0.00 total=7\n") == \
        {"some": 15, "full": 7}
    assert p.parse_psi(b"some total=3 avg10=1.00\nsomething total=9\n") == {"some": 3}
    assert p.parse_io_stat(b"8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0\n") == \
        {"8:0": {b"rbytes": 1, b"wbytes": 2, b"rios": 3, b"wios": 4, b"dbytes": 0, b"dios": 0}}
    assert p.parse_blkio(b"8:0 Read 5\n8:0 Write 6\n8:0 Total 11\nTotal 11\n") == \
        {"8:0": {b"read": 5, b"write": 6, b"total": 11}}
    assert p.parse_blkio(b"Total 0\n") == {}
    assert p.parse_cpuacct_usage_all(b"cpu user system\n0 10 20\n1 1 2\n") == (11, 22)
    net = p.parse_net_dev(NET_DEV)
    assert net["eth0"]["rx_bytes"] == 539685954 and net["eth0"]["tx_drop"] == 5 and net["lo"]["tx_packets"] == 31980


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_random_bytes_never_raise(text):
    for parse in PARSERS:
        parse(text)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_fixture_texts()), st.data())
def test_truncated_and_corrupted_files_never_raise(text, data):
    cut = data.draw(st.integers(0, len(text)))
    noise = data.draw(st.binary(max_size=5))
    at = data.draw(st.integers(0, cut))
    for candidate in (text[:cut], text[:at] + noise + text[at:cut]):
        for parse in PARSERS:
            parse(candidate)


@given(st.integers(0, 2**63), st.integers(0, 2**63), st.booleans())
def test_psi_kernel_lines_parse_to_both_totals(some, full, cpu_root):
    """The kernel's format, read through the fast path: `total=` last on each line (the root's cpu.pressure on old
    kernels has no `full` line)."""
    data = f"some avg10=1.25 avg60=0.50 avg300=0.00 total={some}\n".encode()
    if not cpu_root:
        data += f"full avg10=0.00 avg60=0.00 avg300=0.00 total={full}\n".encode()
    assert p.parse_psi(data) == ({"some": some} if cpu_root else {"some": some, "full": full})


def test_io_stat_fields_of_other_io_controllers_are_not_malformed():
    """io.stat lines carry the fields of every IO controller on the device, and not all are numbers: io.latency's
    `depth=max` (with blk_cgroup.blkcg_debug_stats), io.cost's `cost.vrate=100.00` (first-level cgroups). The
    counters are read and nothing is reported malformed; a counter that is not a number still is."""
    sink: list[bytes] = []
    p.report_malformed_to(sink)
    try:
        line = (b"259:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=5 dios=6 use_delay=0 delay_nsec=0"
                b" depth=max avg_lat=150 win=100 cost.vrate=100.00 cost.usage=7\n")
        got = p.parse_io_stat(line)["259:0"]
        assert (got[b"rbytes"], got[b"wbytes"], got[b"rios"], got[b"wios"]) == (1, 2, 3, 4)
        assert sink == []
        p.parse_io_stat(b"8:0 rbytes=x wbytes=2 rios=3 wios=4\n")
        assert len(sink) == 1
    finally:
        p.report_malformed_to(None)
