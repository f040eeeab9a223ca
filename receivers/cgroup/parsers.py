"""Parsers for the cgroup and procfs files the receiver reads.

Every parser takes the file's bytes as read (kernel files are ASCII: decoding them first would be one more copy
per file, thousands per collection) and returns what it could make of them: malformed lines are skipped, never
raised on, since a file read while its cgroup is being removed may come back short. Keys read from the files
stay bytes; names that become attribute values (pressure kinds, devices, interfaces) are str.
"""

from __future__ import annotations

import threading

# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages in bytes (9223372036854771712 with 4 KiB pages); anything
# this large is no limit on any page size
V1_UNLIMITED = 1 << 62


# Lines the parsers skip as malformed go to the list the current thread's reader set (report_malformed_to), so a
# receiver can count and log them; only the slow paths, which well-formed kernel files never take, look it up.
_sink = threading.local()
MALFORMED_KEPT = 64  # lines kept per collection: the count is what matters, the first lines show what they were


def report_malformed_to(sink: list | None) -> None:
    """Malformed lines the parsers skip on this thread are appended to `sink` from now on (None: not kept)."""
    _sink.lines = sink


def _malformed(line: bytes) -> None:
    sink = getattr(_sink, "lines", None)
    if sink is not None and len(sink) < MALFORMED_KEPT:
        sink.append(bytes(line[:120]))


def parse_int(data: bytes | None) -> int | None:
    """A single-number file (memory.current, pids.max...). "max" (no limit) and garbage give None."""
    if not data:
        return None
    try:
        return int(data)  # the usual b"123\n"
    except ValueError:
        pass
    word = data.strip().split(b"\n", 1)[0].strip()
    try:
        return int(word)
    except ValueError:
        if word != b"max":  # "no limit" in pids.max, memory.max...
            _malformed(data)
        return None


def parse_cpu_max(data: bytes | None) -> float | None:
    """cgroup v2 cpu.max, `quota period` in microseconds: the limit in CPUs; `max ...` (no limit) gives 0.0;
    nothing or garbage gives None."""
    if not data:
        return None
    words = data.split()
    if len(words) == 2:
        if words[0] == b"max":
            return 0.0
        try:
            quota, period = int(words[0]), int(words[1])
        except ValueError:
            pass
        else:
            if quota > 0 and period > 0:
                return quota / period
    _malformed(data)
    return None


def parse_flat(data: bytes | None, keys: tuple[bytes, ...] | None = None) -> dict[bytes, int]:
    """Flat keyed files: `key value` per line (cpu.stat, memory.stat, memory.events, memory.oom_control...).

    With `keys`, only those are converted and returned: memory.stat has 40 to 60 lines of which the receiver
    uses 6, and converting them all was a third of its cost."""
    if not data:
        return {}
    # fast path: well-formed files (every line one key and one number) pair up their words
    words = data.split()
    if len(words) == 2 * (data.count(b"\n") + (data[-1] != 10)) and b"\t" not in data:
        try:
            if keys is None:
                return dict(zip(words[::2], map(int, words[1::2]), strict=True))
            raw = dict(zip(words[::2], words[1::2], strict=True))
            return {k: int(raw[k]) for k in keys if k in raw}
        except ValueError:
            pass
    out: dict[bytes, int] = {}
    for line in data.splitlines():
        key, _, value = line.partition(b" ")
        if not value:
            if line.strip():
                _malformed(line)
            continue
        if keys is not None and key not in keys:
            continue
        try:
            out[key] = int(value)
        except ValueError:
            _malformed(line)
    return out


_PSI_KINDS = {b"some": "some", b"full": "full"}


def parse_psi(data: bytes | None) -> dict[str, int]:
    """Pressure files (cpu.pressure...): `some avg10=0.00 avg60=0.00 avg300=0.00 total=281431` -> {"some": total_us}."""
    out: dict[str, int] = {}
    if not data:
        return out
    # fast path: the two lines as the kernel writes them, `total=` last on each (three thousand files a collection)
    parts = data.split(b" total=")
    if len(parts) == 3 and data.startswith(b"some ") and b"\nfull " in parts[1]:
        try:
            return {"some": int(parts[1][:parts[1].index(b"\n")]), "full": int(parts[2])}
        except ValueError:
            pass
    for line in data.split(b"\n"):
        kind = _PSI_KINDS.get(line[:4])
        if kind is None or line[4:5] != b" ":
            if line.strip():
                _malformed(line)
            continue
        at = line.rfind(b" total=")
        if at > 0:  # fast path: total= is the last field
            try:
                out[kind] = int(line[at + 7:])
                continue
            except ValueError:
                pass
        for field in line.split()[1:]:
            if field.startswith(b"total="):
                try:
                    out[kind] = int(field[6:])
                except ValueError:
                    pass
        if kind not in out:
            _malformed(line)
    return out


def parse_io_stat(data: bytes | None) -> dict[str, dict[bytes, int]]:
    """cgroup v2 io.stat: `8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=0 dios=0` -> {"8:0": {b"rbytes": 1, ...}}."""
    out: dict[str, dict[bytes, int]] = {}
    if not data:
        return out
    for line in data.splitlines():
        fields = line.split()
        if len(fields) < 2 or b":" not in fields[0]:
            if fields:
                _malformed(line)
            continue
        stats = out.setdefault(fields[0].decode("ascii", "replace"), {})
        for field in fields[1:]:
            key, _, value = field.partition(b"=")
            try:
                stats[key] = int(value)
            except ValueError:
                # IO controllers' extra fields need not be numbers (io.latency's `depth=max` with
                # blk_cgroup.blkcg_debug_stats, io.cost's `cost.vrate=100.00`): only the counters read here count
                if key in _IO_STAT_KEYS:
                    _malformed(line)
    return out


_IO_STAT_KEYS = frozenset((b"rbytes", b"wbytes", b"rios", b"wios", b"dbytes", b"dios"))


def parse_blkio(data: bytes | None) -> dict[str, dict[bytes, int]]:
    """cgroup v1 blkio.throttle.io_service_bytes(_recursive) / io_serviced: `8:0 Read 4096` -> {"8:0": {b"read": 4096}}.

    The trailing `Total N` line has no device and is skipped.
    """
    out: dict[str, dict[bytes, int]] = {}
    if not data or data.startswith(b"Total "):  # no device: the usual file of an idle cgroup
        return out
    for line in data.splitlines():
        fields = line.split()
        if len(fields) != 3 or b":" not in fields[0]:
            if fields and not (len(fields) == 2 and fields[0] == b"Total"):  # the closing `Total N` is no device
                _malformed(line)
            continue
        try:
            out.setdefault(fields[0].decode("ascii", "replace"), {})[fields[1].lower()] = int(fields[2])
        except ValueError:
            _malformed(line)
    return out


def parse_cpuacct_usage_all(data: bytes | None) -> tuple[int, int] | None:
    """cgroup v1 cpuacct.usage_all: `cpu user system` then one row per CPU in ns -> (user_ns, system_ns)."""
    if not data:
        return None
    # fast path: the header and then rows of three numbers
    words = data.split()
    if len(words) > 3 and len(words) % 3 == 0 and words[:3] == [b"cpu", b"user", b"system"] \
            and len(words) == 3 * (data.count(b"\n") + (data[-1] != 10)):
        try:
            return sum(map(int, words[4::3])), sum(map(int, words[5::3]))
        except ValueError:
            pass
    user = system = 0
    rows = 0
    for line in data.splitlines()[1:]:
        fields = line.split()
        if len(fields) != 3:
            if fields:
                _malformed(line)
            continue
        try:
            user += int(fields[1])
            system += int(fields[2])
        except ValueError:
            _malformed(line)
            continue
        rows += 1
    return (user, system) if rows else None


NET_DEV_FIELDS = ("rx_bytes", "rx_packets", "rx_errs", "rx_drop", "rx_fifo", "rx_frame", "rx_compressed",
                  "rx_multicast", "tx_bytes", "tx_packets", "tx_errs", "tx_drop", "tx_fifo", "tx_colls",
                  "tx_carrier", "tx_compressed")


def parse_net_dev(data: bytes | None) -> dict[str, dict[str, int]]:
    """/proc/<pid>/net/dev: two header lines, then `  eth0: rx(8 fields) tx(8 fields)` per interface."""
    out: dict[str, dict[str, int]] = {}
    if not data:
        return out
    for line in data.splitlines():
        name, sep, rest = line.partition(b":")
        if not sep:
            continue
        values = rest.split()
        if len(values) < 16:
            _malformed(line)
            continue
        try:
            out[name.strip().decode("ascii", "replace")] = dict(zip(NET_DEV_FIELDS, (int(v) for v in values[:16]),
                                                                   strict=True))
        except ValueError:
            _malformed(line)
    return out
