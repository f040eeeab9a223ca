"""A small ctypes binding to libbpf.so.1 (Debian `libbpf1`, libbpf >= 1.0): open a CO-RE object, choose which
programs load, size maps, write .rodata, load, attach, batch-read maps. No compiler or Python package at run time.

libbpf 1.x returns negative error codes directly (and sets errno); functions returning pointers return NULL and
set errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterable

BPF_ANY, BPF_NOEXIST = 0, 1
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2

BPF_MAP_TYPE_TASK_STORAGE = 29  # kernel 5.11+

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_PAGE_FAULTS_MAJ = 6
PERF_FLAG_FD_CLOEXEC = 1 << 3
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(os.uname().machine)


class BPFError(OSError):
    """A libbpf or bpf(2) failure, with errno and libbpf's log lines that came with it."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.log = log


class LibbpfMissing(Exception):
    pass


class _PerfEventAttr(ctypes.Structure):
    # struct perf_event_attr up to config3 (PERF_ATTR_SIZE_VER8, 136 bytes); older kernels accept smaller sizes
    _fields_ = [
        ("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64), ("sample_type", ctypes.c_uint64), ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64), ("wakeup_events", ctypes.c_uint32), ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64), ("config2", ctypes.c_uint64), ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64), ("sample_stack_user", ctypes.c_uint32), ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64), ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16), ("_r2", ctypes.c_uint16), ("aux_sample_size", ctypes.c_uint32),
        ("_r3", ctypes.c_uint32), ("sig_data", ctypes.c_uint64), ("config3", ctypes.c_uint64),
    ]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long
_log: list[str] = []
_print_cb = None


def _bind(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path, use_errno=True)
    P, INT, U32, C = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
    U32P = ctypes.POINTER(U32)
    for name, res, args in (
        ("libbpf_major_version", U32, []), ("libbpf_minor_version", U32, []),
        ("libbpf_set_print", P, [_PRINT_FN]),
        ("bpf_object__open_file", P, [C, P]), ("bpf_object__load", INT, [P]), ("bpf_object__close", None, [P]),
        ("bpf_object__next_program", P, [P, P]), ("bpf_object__next_map", P, [P, P]),
        ("bpf_program__name", C, [P]), ("bpf_program__section_name", C, [P]),
        ("bpf_program__set_autoload", INT, [P, ctypes.c_bool]),
        ("bpf_program__attach", P, [P]), ("bpf_program__attach_perf_event", P, [P, INT]),
        ("bpf_link__destroy", INT, [P]),
        ("bpf_map__name", C, [P]), ("bpf_map__fd", INT, [P]), ("bpf_map__set_max_entries", INT, [P, U32]),
        ("bpf_map__set_autocreate", INT, [P, ctypes.c_bool]), ("libbpf_probe_bpf_map_type", INT, [INT, P]),
        ("bpf_map__max_entries", U32, [P]), ("bpf_map__key_size", U32, [P]), ("bpf_map__value_size", U32, [P]),
        ("bpf_map__initial_value", P, [P, ctypes.POINTER(ctypes.c_size_t)]),
        ("bpf_map_lookup_batch", INT, [INT, P, P, P, P, U32P, P]),
        ("bpf_map_delete_batch", INT, [INT, P, U32P, P]),
        ("bpf_map_get_next_key", INT, [INT, P, P]), ("bpf_map_lookup_elem", INT, [INT, P, P]),
        ("bpf_map_update_elem", INT, [INT, P, P, ctypes.c_uint64]), ("bpf_map_delete_elem", INT, [INT, P]),
        ("btf__load_vmlinux_btf", P, []), ("btf__parse", P, [C, P]), ("btf__free", None, [P]),
        ("btf__find_by_name_kind", INT, [P, C, U32]), ("btf__type_by_id", P, [P, U32]),
        ("btf__resolve_type", INT, [P, U32]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def lib() -> ctypes.CDLL:
    """libbpf, loaded once ($LIBBPF_SO overrides the library path)."""
    global _lib, _print_cb
    with _lock:
        if _lib is None:
            path = os.environ.get("LIBBPF_SO") or "libbpf.so.1"
            try:
                loaded = _bind(path)
            except (OSError, AttributeError) as exc:
                raise LibbpfMissing(f"cannot load {path} (install Debian libbpf1, libbpf >= 1.0): {exc}") from None

            # libbpf logs through printf-style callbacks: format into a buffer and keep the lines, so load
            # failures can name the programs that failed instead of printing to stderr.
            def cb(level, fmt, args):
                if level <= LIBBPF_INFO:
                    buf = ctypes.create_string_buffer(2048)
                    _libc.vsnprintf(buf, len(buf), fmt, args)
                    _log.append(buf.value.decode(errors="replace"))
                    del _log[:-400]  # bounded
                return 0

            _print_cb = _PRINT_FN(cb)
            loaded.libbpf_set_print(_print_cb)
            _lib = loaded
        return _lib


def version() -> str:
    L = lib()
    return f"{L.libbpf_major_version()}.{L.libbpf_minor_version()}"


def map_type_supported(map_type: int) -> bool:
    """Whether the running kernel can make maps of this type (libbpf's probe: it creates a small one). A probe
    that cannot tell (no privilege to make maps) says yes: the load then reports what is wrong."""
    return lib().libbpf_probe_bpf_map_type(map_type, None) != 0


def take_log() -> str:
    with _lock:
        text = "".join(_log)
        _log.clear()
    return text


def _fail(what: str, rc: int | None = None) -> BPFError:
    err = -rc if rc is not None and rc < 0 else (ctypes.get_errno() or errno.EINVAL)
    return BPFError(err, what, take_log())


def online_cpus() -> list[int]:
    cpus: list[int] = []
    with open("/sys/devices/system/cpu/online") as f:
        for part in f.read().strip().split(","):
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def perf_event_open_sw(config: int, cpu: int, sample_period: int = 1) -> int:
    if _NR_PERF_EVENT_OPEN is None:
        raise BPFError(errno.ENOSYS, f"perf_event_open: unsupported machine {os.uname().machine}")
    attr = _PerfEventAttr(type=PERF_TYPE_SOFTWARE, size=ctypes.sizeof(_PerfEventAttr), config=config,
                          sample_period=sample_period)
    fd = _libc.syscall(_NR_PERF_EVENT_OPEN, ctypes.byref(attr), -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        raise BPFError(ctypes.get_errno(), f"perf_event_open(software {config}, cpu {cpu})")
    return fd


class Map:
    """A loaded map: fixed key and value sizes, read in batches."""

    def __init__(self, fd: int, name: str, key_size: int, value_size: int, max_entries: int) -> None:
        self.fd, self.name = fd, name
        self.key_size, self.value_size, self.max_entries = key_size, value_size, max_entries
        self._bufs: tuple | None = None
        self._batch = True

    def lookup(self, key: bytes) -> bytes | None:
        val = ctypes.create_string_buffer(self.value_size)
        rc = lib().bpf_map_lookup_elem(self.fd, key, val)
        if rc == -errno.ENOENT:
            return None
        if rc < 0:
            raise _fail(f"lookup in map {self.name}", rc)
        return val.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        rc = lib().bpf_map_update_elem(self.fd, key, value, flags)
        if rc < 0:
            raise _fail(f"update in map {self.name}", rc)

    def delete(self, keys: Iterable[bytes]) -> int:
        """Delete keys (absent ones are fine); returns how many were deleted."""
        n = 0
        L = lib()
        for key in keys:
            if L.bpf_map_delete_elem(self.fd, key) == 0:
                n += 1
        return n

    def items(self, chunk: int = 4096) -> tuple[bytes, bytes, int]:
        """All entries as (concatenated keys, concatenated values, count): BPF_MAP_LOOKUP_BATCH, one syscall per
        `chunk` entries; a get_next_key walk on kernels without batch ops (< 5.6). Not a snapshot: entries may
        change while reading, which cumulative counters tolerate."""
        if self._batch:
            try:
                return self._items_batch(chunk)
            except BPFError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                self._batch = False
        return self._items_walk()

    def _items_batch(self, chunk: int) -> tuple[bytes, bytes, int]:
        L = lib()
        ks, vs = self.key_size, self.value_size
        chunk = max(1, min(chunk, self.max_entries))
        if self._bufs is None or self._bufs[0] != chunk:
            self._bufs = (chunk, ctypes.create_string_buffer(ks * chunk), ctypes.create_string_buffer(vs * chunk))
        _, kbuf, vbuf = self._bufs
        token_in, token_out, count = ctypes.c_uint64(0), ctypes.c_uint64(0), ctypes.c_uint32()
        keys, vals, total, first = [], [], 0, True
        while True:
            count.value = chunk
            rc = L.bpf_map_lookup_batch(self.fd, None if first else ctypes.byref(token_in), ctypes.byref(token_out),
                                        kbuf, vbuf, ctypes.byref(count), None)
            if rc < 0 and rc != -errno.ENOENT:
                if rc == -errno.ENOSPC and count.value == 0:
                    # a hash bucket holds more entries than the chunk: retry with room for it
                    chunk *= 2
                    self._bufs = (chunk, ctypes.create_string_buffer(ks * chunk),
                                  ctypes.create_string_buffer(vs * chunk))
                    _, kbuf, vbuf = self._bufs
                    continue
                raise _fail(f"batch lookup in map {self.name}", rc)
            n = count.value
            if n:
                keys.append(ctypes.string_at(kbuf, n * ks))
                vals.append(ctypes.string_at(vbuf, n * vs))
                total += n
            if rc == -errno.ENOENT:
                break
            token_in.value = token_out.value
            first = False
        return b"".join(keys), b"".join(vals), total

    def _items_walk(self) -> tuple[bytes, bytes, int]:
        L = lib()
        key = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        val = ctypes.create_string_buffer(self.value_size)
        keys, vals, n, prev = bytearray(), bytearray(), 0, None
        while L.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            ctypes.memmove(key, nxt, self.key_size)
            prev = key
            if L.bpf_map_lookup_elem(self.fd, key, val) == 0:
                keys += key.raw
                vals += val.raw
                n += 1
        return bytes(keys), bytes(vals), n

    def count(self) -> int:
        return self.items()[2]


BTF_KIND_PTR, BTF_KIND_TYPEDEF, BTF_KIND_FUNC_PROTO = 2, 8, 13


class BTF:
    """Type information: the running kernel's (`BTF()`) or a file's (`BTF(path)`: raw BTF or an ELF object
    built with -g). Used to check hook prototypes before choosing programs."""

    def __init__(self, path: str | None = None) -> None:
        self._lib = lib()
        take_log()
        self.btf = self._lib.btf__load_vmlinux_btf() if path is None else self._lib.btf__parse(path.encode(), None)
        if not self.btf:
            raise _fail(f"read BTF of {path or 'the running kernel'}")

    def find(self, name: str, kind: int) -> int | None:
        tid = self._lib.btf__find_by_name_kind(self.btf, name.encode(), kind)
        return tid if tid > 0 else None

    def _words(self, tid: int, n: int) -> list[int]:
        ptr = self._lib.btf__type_by_id(self.btf, tid)
        if not ptr:
            raise _fail(f"BTF type {tid}")
        return list((ctypes.c_uint32 * n).from_address(ptr))

    def kind(self, tid: int) -> int:
        # struct btf_type { u32 name_off; u32 info; u32 size_or_type; }: kind is info bits 24-28
        return self._words(tid, 3)[1] >> 24 & 0x1F

    def target(self, tid: int) -> int:
        """The type a PTR / TYPEDEF / modifier refers to, or a FUNC_PROTO's return type."""
        return self._words(tid, 3)[2]

    def resolve(self, tid: int) -> int | None:
        """`tid` with typedefs and const/volatile stripped; None for void."""
        rid = self._lib.btf__resolve_type(self.btf, tid)
        return rid if rid > 0 else None

    def params(self, proto: int) -> list[int]:
        """A FUNC_PROTO's parameter types (struct btf_param { u32 name_off; u32 type; } follow the btf_type)."""
        vlen = self._words(proto, 3)[1] & 0xFFFF
        words = self._words(proto, 3 + 2 * vlen)
        return words[4::2]

    def close(self) -> None:
        if self.btf:
            self._lib.btf__free(self.btf)
            self.btf = None

    def __enter__(self) -> BTF:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BPFObject:
    """bpf_object lifecycle: open -> choose programs, size maps, write .rodata -> load -> attach -> close."""

    def __init__(self, path: str) -> None:
        self._lib = lib()
        take_log()
        self.obj = self._lib.bpf_object__open_file(path.encode(), None)
        if not self.obj:
            raise _fail(f"open {path}")
        self.links: dict[str, list[int]] = {}
        self._programs = self._walk(self._lib.bpf_object__next_program, self._lib.bpf_program__name)
        self._maps = self._walk(self._lib.bpf_object__next_map, self._lib.bpf_map__name)

    def _walk(self, next_fn, name_fn) -> dict[str, int]:
        out, item = {}, None
        while True:
            item = next_fn(self.obj, item)
            if not item:
                return out
            out[name_fn(item).decode()] = item

    @property
    def programs(self) -> list[str]:
        return list(self._programs)

    def section(self, prog: str) -> str:
        return self._lib.bpf_program__section_name(self._programs[prog]).decode()

    def only_load(self, names: Iterable[str]) -> None:
        wanted = set(names)
        for name, prog in self._programs.items():
            rc = self._lib.bpf_program__set_autoload(prog, name in wanted)
            if rc < 0:
                raise _fail(f"set autoload of {name}", rc)

    def skip_maps(self, names: Iterable[str]) -> None:
        """Do not create these maps at load: no program loaded uses them (or the kernel cannot make them)."""
        for name in names:
            rc = self._lib.bpf_map__set_autocreate(self._maps[name], False)
            if rc < 0:
                raise _fail(f"skip map {name}", rc)

    def set_max_entries(self, map_name: str, n: int) -> None:
        rc = self._lib.bpf_map__set_max_entries(self._maps[map_name], n)
        if rc < 0:
            raise _fail(f"size map {map_name}", rc)

    def rodata(self) -> ctypes.Array:
        """Writable view of .rodata (the `const volatile` globals) before load."""
        for name, m in self._maps.items():
            if name.endswith(".rodata"):
                size = ctypes.c_size_t()
                ptr = self._lib.bpf_map__initial_value(m, ctypes.byref(size))
                return (ctypes.c_char * size.value).from_address(ptr)
        raise KeyError(".rodata")

    def load(self) -> None:
        take_log()
        rc = self._lib.bpf_object__load(self.obj)
        if rc < 0:
            raise _fail("load", rc)

    def attach(self, prog: str) -> None:
        link = self._lib.bpf_program__attach(self._programs[prog])
        if not link:
            raise _fail(f"attach {prog} ({self.section(prog)})")
        self.links.setdefault(prog, []).append(link)

    def attach_perf_sw(self, prog: str, config: int) -> None:
        """One software perf event per online CPU, each running `prog` at every event."""
        p = self._programs[prog]
        links = []
        try:
            for cpu in online_cpus():
                fd = perf_event_open_sw(config, cpu)
                link = self._lib.bpf_program__attach_perf_event(p, fd)
                if not link:
                    err = _fail(f"attach {prog} to perf event on cpu {cpu}")
                    os.close(fd)
                    raise err
                links.append(link)  # the link owns the fd now
        except BaseException:
            for link in links:
                self._lib.bpf_link__destroy(link)
            raise
        self.links.setdefault(prog, []).extend(links)

    def map(self, name: str) -> Map:
        m = self._maps[name]
        fd = self._lib.bpf_map__fd(m)
        if fd < 0:
            raise _fail(f"fd of map {name}", fd)
        L = self._lib
        return Map(fd, name, L.bpf_map__key_size(m), L.bpf_map__value_size(m), L.bpf_map__max_entries(m))

    def close(self) -> None:
        for links in self.links.values():
            for link in links:
                self._lib.bpf_link__destroy(link)
        self.links.clear()
        if self.obj:
            self._lib.bpf_object__close(self.obj)
            self.obj = None
