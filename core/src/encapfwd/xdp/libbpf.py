"""A small ``ctypes`` binding to the distribution's ``libbpf.so.1`` (Debian ``libbpf1``).

    with BPFObject.open(build("echo.c")) as obj:        # open + load; close() unloads everything
        prog = obj.program("xdp_echo")                   # a program fd
        counters = obj.map("counters")                   # a Map: update/lookup/delete/update_batch/keys
        retval, out, ns = test_run(prog, frame)          # run once on a frame, no network needed
        xdp_attach(ifindex, prog, "native")              # or "generic"; xdp_query / xdp_detach

Every failure raises :class:`encapfwd.xdp.BPFError` with one line naming the operation and the kernel's
reason (``os.strerror``). libbpf's own messages go to the ``encapfwd.xdp`` logger at debug level; the most
telling line (of the verifier log, say) is put in the error message and the whole text in ``.log``.

Nothing is pinned: closing the object (or the process exiting) unloads its programs and maps, except a
program still attached to an interface, which the interface keeps until :func:`xdp_detach`.

Ownership of file descriptors: ``BPFObject.program``/``BPFObject.map`` fds belong to the object;
:meth:`Map.create` and :func:`load_verdict_program` return fds the caller closes (``Map.close``,
``os.close``).
Interface indexes are those of the calling thread's network namespace.
"""

from __future__ import annotations

import collections
import ctypes
import errno as errnos
import functools
import logging
import os
import re
import socket
import struct
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

from encapfwd.xdp import BPFError

log = logging.getLogger("encapfwd.xdp")

LIBBPF_SONAME = "libbpf.so.1"

# linux/bpf.h
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
BPF_PROG_TYPE_XDP = 6
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY = 1, 2
BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY = 5, 6
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS = 12, 13
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
PERCPU_MAP_TYPES = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
                              BPF_MAP_TYPE_LRU_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE})
MAP_IN_MAP_TYPES = frozenset({BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH_OF_MAPS})
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
# linux/if_link.h
XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "drv": XDP_FLAGS_DRV_MODE,
             "generic": XDP_FLAGS_SKB_MODE, "skb": XDP_FLAGS_SKB_MODE}
ENOTSUPP = 524  # kernel-internal "operation not supported", what the bpf() syscall returns for it
LIBBPF_ERRNO_START = 4000  # libbpf.h: LIBBPF_ERRNO__LIBELF and the codes after it

_u32 = ctypes.c_uint32


# -- structures (layouts of libbpf 1.1 bpf.h / libbpf.h and linux/bpf.h; libbpf checks ``sz``) ---------------
class _TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", _u32), ("data_size_out", _u32), ("ctx_in", ctypes.c_void_p),
                ("ctx_out", ctypes.c_void_p), ("ctx_size_in", _u32), ("ctx_size_out", _u32),
                ("retval", _u32), ("repeat", ctypes.c_int), ("duration", _u32), ("flags", _u32),
                ("cpu", _u32), ("batch_size", _u32)]


class _XdpMd(ctypes.Structure):
    _fields_ = [("data", _u32), ("data_end", _u32), ("data_meta", _u32), ("ingress_ifindex", _u32),
                ("rx_queue_index", _u32), ("egress_ifindex", _u32)]


class _XdpQueryOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_id", _u32), ("drv_prog_id", _u32), ("hw_prog_id", _u32),
                ("skb_prog_id", _u32), ("attach_mode", ctypes.c_uint8)]


class _MapCreateOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", _u32), ("btf_key_type_id", _u32),
                ("btf_value_type_id", _u32), ("btf_vmlinux_value_type_id", _u32), ("inner_map_fd", _u32),
                ("map_flags", _u32), ("map_extra", ctypes.c_uint64), ("numa_node", _u32),
                ("map_ifindex", _u32)]


class _MapBatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _MapInfo(ctypes.Structure):  # leading fields of struct bpf_map_info; the kernel fills what fits
    _fields_ = [("type", _u32), ("id", _u32), ("key_size", _u32), ("value_size", _u32),
                ("max_entries", _u32), ("map_flags", _u32), ("name", ctypes.c_char * 16)]


class _ProgInfo(ctypes.Structure):  # leading fields of struct bpf_prog_info (linux/bpf.h)
    _fields_ = [("type", _u32), ("id", _u32), ("tag", ctypes.c_uint8 * 8), ("jited_prog_len", _u32),
                ("xlated_prog_len", _u32), ("jited_prog_insns", ctypes.c_uint64),
                ("xlated_prog_insns", ctypes.c_uint64), ("load_time", ctypes.c_uint64),
                ("created_by_uid", _u32), ("nr_map_ids", _u32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * 16)]


def _opts(struct_type):
    opts = struct_type()
    opts.sz = ctypes.sizeof(struct_type)
    return opts


# -- the library ----------------------------------------------------------------------------------------
_VP, _CP, _INT, _SZ = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
_SIGNATURES = {
    # name: (restype, argtypes)
    "bpf_object__open_file": (_VP, [_CP, _VP]),
    "bpf_object__load": (_INT, [_VP]),
    "bpf_object__close": (None, [_VP]),
    "bpf_object__find_program_by_name": (_VP, [_VP, _CP]),
    "bpf_object__next_program": (_VP, [_VP, _VP]),
    "bpf_object__find_map_by_name": (_VP, [_VP, _CP]),
    "bpf_object__next_map": (_VP, [_VP, _VP]),
    "bpf_program__fd": (_INT, [_VP]),
    "bpf_program__name": (_CP, [_VP]),
    "bpf_program__set_log_buf": (_INT, [_VP, _VP, _SZ]),
    "bpf_map__fd": (_INT, [_VP]),
    "bpf_map__name": (_CP, [_VP]),
    "bpf_map__type": (_INT, [_VP]),
    "bpf_map__key_size": (_u32, [_VP]),
    "bpf_map__value_size": (_u32, [_VP]),
    "bpf_map__max_entries": (_u32, [_VP]),
    "bpf_map__set_max_entries": (_INT, [_VP, _u32]),
    "bpf_map__map_flags": (_u32, [_VP]),
    "bpf_map__inner_map": (_VP, [_VP]),
    "bpf_map_create": (_INT, [_INT, _CP, _u32, _u32, _u32, _VP]),
    "bpf_map_update_elem": (_INT, [_INT, _VP, _VP, ctypes.c_uint64]),
    "bpf_map_lookup_elem": (_INT, [_INT, _VP, _VP]),
    "bpf_map_delete_elem": (_INT, [_INT, _VP]),
    "bpf_map_get_next_key": (_INT, [_INT, _VP, _VP]),
    "bpf_map_update_batch": (_INT, [_INT, _VP, _VP, ctypes.POINTER(_u32), _VP]),
    "bpf_obj_get_info_by_fd": (_INT, [_INT, _VP, ctypes.POINTER(_u32)]),
    "bpf_prog_load": (_INT, [_INT, _CP, _CP, _VP, _SZ, _VP]),
    "bpf_prog_get_fd_by_id": (_INT, [_u32]),
    "bpf_map_get_fd_by_id": (_INT, [_u32]),
    "bpf_prog_test_run_opts": (_INT, [_INT, ctypes.POINTER(_TestRunOpts)]),
    "bpf_xdp_attach": (_INT, [_INT, _INT, _u32, _VP]),
    "bpf_xdp_detach": (_INT, [_INT, _u32, _VP]),
    "bpf_xdp_query": (_INT, [_INT, _INT, ctypes.POINTER(_XdpQueryOpts)]),
    "libbpf_num_possible_cpus": (_INT, []),
    "libbpf_set_print": (_VP, [_VP]),
    "libbpf_strerror": (_INT, [_INT, _VP, _SZ]),
}

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_messages: "collections.deque[str]" = collections.deque(maxlen=64)  # recent libbpf warnings


def _libc():
    libc = ctypes.CDLL(None)
    libc.vsnprintf.restype = ctypes.c_int
    libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    return libc


_vsnprintf = _libc().vsnprintf


@_PRINT_FN
def _on_libbpf_print(level, fmt, args):
    # libbpf_print_fn_t(level, fmt, va_list): format with the C library, keep warnings for error messages
    buf = ctypes.create_string_buffer(4096)
    _vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip()
    if level == 0:
        _messages.append(text)
    log.debug("libbpf: %s", text)
    return 0


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL:
    """``libbpf.so.1`` with the signatures set and its messages routed to our logger (OSError if absent)."""
    lib = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    lib.libbpf_set_print(ctypes.cast(_on_libbpf_print, ctypes.c_void_p))
    return lib


def _error(op: str, err: int, detail: str = "", log_text: str = "") -> BPFError:
    err = abs(err)
    if err == ENOTSUPP:
        reason = "Operation not supported by the kernel"
    elif err >= LIBBPF_ERRNO_START:  # libbpf's own codes (bad ELF, relocation, ...)
        buf = ctypes.create_string_buffer(256)
        _lib().libbpf_strerror(err, buf, len(buf))
        reason = buf.value.decode(errors="replace")
    else:
        reason = os.strerror(err)
    return BPFError(f"{op}: {reason}" + (f" ({detail})" if detail else ""), errno=err, log=log_text)


def _check(ret: int, op: str) -> int:
    """Raise a BPFError for a libbpf return value < 0 (libbpf 1.x returns ``-errno``)."""
    if ret < 0:
        raise _error(op, ret)
    return ret


def _buffer(data: bytes):
    return ctypes.create_string_buffer(bytes(data), len(data))


def possible_cpus() -> int:
    """How many CPUs the kernel may ever bring online: the number of slots of a per-CPU map value."""
    return _check(_lib().libbpf_num_possible_cpus(), "counting possible CPUs")


def prog_id(prog_fd: int) -> int:
    """The kernel's id of the program behind *prog_fd* (what :func:`xdp_query` and ``ip link`` show)."""
    info = _ProgInfo()
    size = _u32(ctypes.sizeof(info))
    _check(_lib().bpf_obj_get_info_by_fd(prog_fd, ctypes.byref(info), ctypes.byref(size)),
           "reading program info")
    return info.id


def prog_by_id(prog_id_: int) -> Tuple[str, List["Map"]]:
    """The name and the maps (owned: close them) of the loaded program with kernel id *prog_id_* — e.g. the
    one :func:`xdp_query` finds on an interface."""
    lib = _lib()
    fd = _check(lib.bpf_prog_get_fd_by_id(prog_id_), f"opening program id {prog_id_}")
    try:
        ids = (_u32 * 64)()
        info = _ProgInfo(nr_map_ids=64, map_ids=ctypes.addressof(ids))
        size = _u32(ctypes.sizeof(info))
        _check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)), "reading program info")
        maps = []
        for i in range(min(info.nr_map_ids, 64)):
            map_fd = lib.bpf_map_get_fd_by_id(ids[i])
            if map_fd >= 0:
                maps.append(Map.from_fd(map_fd, owned=True))
        return info.name.decode(errors="replace"), maps
    finally:
        os.close(fd)


# -- maps -------------------------------------------------------------------------------------------------
class InnerTemplate(NamedTuple):
    """What an inner map of a map-in-map must look like (declared with ``__array(values, …)``)."""

    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


class Map:
    """A BPF map by file descriptor. Keys and values are ``bytes`` of exactly ``key_size`` / ``value_size``
    (for a 4-byte key an ``int`` is accepted too, packed in host order).

    Per-CPU maps: :meth:`lookup_percpu` returns one value per possible CPU; :meth:`update` writes the same
    value on every CPU.
    """

    def __init__(self, fd: int, name: str, map_type: int, key_size: int, value_size: int, max_entries: int,
                 map_flags: int = 0, *, owned: bool = False, inner: Optional[InnerTemplate] = None):
        self.fd, self.name, self.map_type = fd, name, map_type
        self.key_size, self.value_size, self.max_entries, self.map_flags = (
            key_size, value_size, max_entries, map_flags)
        self.inner = inner
        self._owned = owned

    def __repr__(self) -> str:
        return (f"Map({self.name!r}, fd={self.fd}, type={self.map_type}, key_size={self.key_size}, "
                f"value_size={self.value_size}, max_entries={self.max_entries})")

    @property
    def id(self) -> int:
        """The kernel's id of this map (what a map-in-map slot reads as from user space)."""
        return self._info().id

    def _info(self) -> _MapInfo:
        info = _MapInfo()
        size = _u32(ctypes.sizeof(info))
        _check(_lib().bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size)),
               f"reading info of map {self.name}")
        return info

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_fd(cls, fd: int, *, owned: bool = False) -> "Map":
        """Describe the map behind *fd* from the kernel's map info; with *owned*, :meth:`close` closes it."""
        info = cls(fd, f"fd {fd}", 0, 0, 0, 0)._info()
        return cls(fd, info.name.decode(errors="replace"), info.type, info.key_size, info.value_size,
                   info.max_entries, info.map_flags, owned=owned)

    @classmethod
    def create(cls, map_type: int, key_size: int, value_size: int, max_entries: int, *, name: str = "",
               map_flags: int = 0, inner_map_fd: Optional[int] = None) -> "Map":
        """A new map not tied to any object (``bpf_map_create``); the caller closes it with :meth:`close`
        (a map-in-map slot or a program that holds it keeps it alive after that)."""
        opts = _opts(_MapCreateOpts)
        opts.map_flags = map_flags
        if inner_map_fd is not None:
            opts.inner_map_fd = inner_map_fd
        kernel_name = re.sub(r"[^A-Za-z0-9_.]", "_", name)[:15]
        fd = _check(_lib().bpf_map_create(map_type, kernel_name.encode() or None, key_size, value_size,
                                          max_entries, ctypes.byref(opts)),
                    f"creating map {name or '(unnamed)'}")
        return cls(fd, kernel_name, map_type, key_size, value_size, max_entries, map_flags, owned=True)

    def create_inner(self, name: str = "") -> "Map":
        """A fresh, empty map matching this map-in-map's inner template, ready for :meth:`set_inner`."""
        if self.inner is None:
            raise BPFError(f"map {self.name} has no inner map template (not a map-in-map from an object)")
        t = self.inner
        return Map.create(t.map_type, t.key_size, t.value_size, t.max_entries, map_flags=t.map_flags,
                          name=name or f"{self.name[:10]}_in")

    def close(self) -> None:
        """Close the fd if this Map owns it (one from :meth:`create` or ``from_fd(owned=True)``)."""
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "Map":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- elements -------------------------------------------------------------------------------------------
    @property
    def percpu(self) -> bool:
        """Whether each key has one value per possible CPU."""
        return self.map_type in PERCPU_MAP_TYPES

    @property
    def percpu_stride(self) -> int:
        """Bytes per CPU in a per-CPU value buffer: ``value_size`` rounded up to 8."""
        return (self.value_size + 7) & ~7

    def _key(self, key: Union[bytes, int]) -> ctypes.Array:
        if isinstance(key, int) and self.key_size == 4:
            key = struct.pack("=I", key)
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key of {len(key)} bytes, the map's keys have {self.key_size}")
        return _buffer(key)

    def _value(self, value: bytes) -> ctypes.Array:
        if len(value) != self.value_size:
            raise ValueError(f"map {self.name}: value of {len(value)} bytes, the map's values have "
                             f"{self.value_size}")
        if self.percpu:
            value = bytes(value).ljust(self.percpu_stride, b"\0") * possible_cpus()
        return _buffer(value)

    def update(self, key: Union[bytes, int], value: bytes, flags: int = BPF_ANY) -> None:
        """Set *key* to *value* (``flags``: BPF_ANY, BPF_NOEXIST, BPF_EXIST). Per-CPU: on every CPU."""
        _check(_lib().bpf_map_update_elem(self.fd, self._key(key), self._value(value), flags),
               f"updating map {self.name}")

    def _lookup_raw(self, key: Union[bytes, int], size: int) -> Optional[bytes]:
        out = ctypes.create_string_buffer(size)
        ret = _lib().bpf_map_lookup_elem(self.fd, self._key(key), out)
        if ret == -errnos.ENOENT:
            return None
        _check(ret, f"looking up map {self.name}")
        return out.raw

    def lookup(self, key: Union[bytes, int]) -> Optional[bytes]:
        """The value of *key*, or None when absent. (A map-in-map gives the inner map's id.)"""
        if self.percpu:
            raise ValueError(f"map {self.name} is per-CPU: use lookup_percpu()")
        return self._lookup_raw(key, self.value_size)

    def lookup_percpu(self, key: Union[bytes, int]) -> Optional[List[bytes]]:
        """A per-CPU map's values of *key*, one per possible CPU (index = CPU number), or None when absent."""
        if not self.percpu:
            raise ValueError(f"map {self.name} is not per-CPU: use lookup()")
        stride = self.percpu_stride
        raw = self._lookup_raw(key, stride * possible_cpus())
        if raw is None:
            return None
        return [raw[i:i + self.value_size] for i in range(0, len(raw), stride)]

    def delete(self, key: Union[bytes, int]) -> bool:
        """Remove *key*; False when it was absent. (Arrays cannot delete: BPFError.)"""
        ret = _lib().bpf_map_delete_elem(self.fd, self._key(key))
        if ret == -errnos.ENOENT:
            return False
        _check(ret, f"deleting from map {self.name}")
        return True

    def update_batch(self, keys: bytes, values: bytes, count: Optional[int] = None,
                     flags: int = BPF_ANY) -> None:
        """Set *count* elements in one call: *keys* and *values* are the concatenated keys and values
        (per-CPU maps: each value is ``percpu_stride * possible_cpus()`` bytes). Map types the kernel cannot
        batch (EINVAL, ENOTSUPP) are updated one element at a time."""
        value_size = self.percpu_stride * possible_cpus() if self.percpu else self.value_size
        if count is None:
            count = len(keys) // self.key_size
        if len(keys) != count * self.key_size or len(values) != count * value_size:
            raise ValueError(f"map {self.name}: update_batch needs {count} keys of {self.key_size} bytes and "
                             f"{count} values of {value_size} bytes")
        if count == 0:
            return
        done = _u32(count)
        opts = _opts(_MapBatchOpts)
        opts.elem_flags = flags
        key_buf, value_buf = _buffer(keys), _buffer(values)
        ret = _lib().bpf_map_update_batch(self.fd, key_buf, value_buf, ctypes.byref(done), ctypes.byref(opts))
        if ret == 0:
            return
        if -ret not in (errnos.EINVAL, ENOTSUPP, errnos.EOPNOTSUPP):
            raise _error(f"batch update of map {self.name}", ret)
        update = _lib().bpf_map_update_elem
        start = done.value if done.value < count else 0
        for i in range(start, count):
            key = ctypes.byref(key_buf, i * self.key_size)
            _check(update(self.fd, key, ctypes.byref(value_buf, i * value_size), flags),
                   f"updating map {self.name}")

    def keys(self) -> Iterator[bytes]:
        """Every key (``bpf_map_get_next_key``). On a hash map that changes meanwhile, keys may repeat."""
        current = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = _lib().bpf_map_get_next_key(self.fd, current, nxt)
            if ret == -errnos.ENOENT:
                return
            _check(ret, f"iterating map {self.name}")
            key = nxt.raw
            yield key
            current = _buffer(key)

    __iter__ = keys

    def set_inner(self, key: Union[bytes, int], inner: Union["Map", int]) -> None:
        """Put the map *inner* (a Map or a map fd) in slot *key* of this ARRAY_OF_MAPS / HASH_OF_MAPS; the
        kernel checks it matches the inner template. Programs see the new map from their next run."""
        if self.map_type not in MAP_IN_MAP_TYPES:
            raise BPFError(f"map {self.name} is not a map-in-map")
        fd = inner.fd if isinstance(inner, Map) else inner
        _check(_lib().bpf_map_update_elem(self.fd, self._key(key), _buffer(struct.pack("=I", fd)), BPF_ANY),
               f"putting an inner map into map {self.name}")


# -- objects ----------------------------------------------------------------------------------------------
_LOG_SIZE = 1 << 20


def _verifier_line(text: str) -> str:
    """The line of a verifier log that says what went wrong (the last that is not a summary)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    skip = ("processed ", "verification time", "stack depth", "-- ", "libbpf:", "Error:")
    for line in reversed(lines):
        if not line.startswith(skip):
            return line
    return ""


class BPFObject:
    """A BPF ELF object opened and loaded into the kernel; :meth:`close` (or ``with``) unloads it."""

    def __init__(self, handle: int, path: str, inner: dict):
        self._obj = handle
        self.path = path
        self._inner = inner

    @classmethod
    def open(cls, path: Union[str, os.PathLike], max_entries: Optional[Dict[str, int]] = None) -> "BPFObject":
        """Open the object file at *path* and load every program and map (the verifier runs here).

        :param max_entries: map name -> its size, set before the maps are created (sizes known only at
            run time: a flow table's bound, a selection table's slots).
        """
        lib = _lib()
        path = os.fspath(path)
        name = os.path.basename(path)
        _messages.clear()
        handle = lib.bpf_object__open_file(path.encode(), None)
        if not handle:
            raise _error(f"opening BPF object {name}", ctypes.get_errno() or errnos.EINVAL, _last_message())
        inner, logs = {}, []
        try:
            prog = lib.bpf_object__next_program(handle, None)
            while prog:
                buf = ctypes.create_string_buffer(_LOG_SIZE)
                logs.append(buf)
                lib.bpf_program__set_log_buf(prog, buf, _LOG_SIZE)
                prog = lib.bpf_object__next_program(handle, prog)
            m = lib.bpf_object__next_map(handle, None)
            while m:
                size = (max_entries or {}).get(lib.bpf_map__name(m).decode())
                if size is not None:
                    _check(lib.bpf_map__set_max_entries(m, size), f"sizing map {lib.bpf_map__name(m).decode()}")
                template = lib.bpf_map__inner_map(m)   # freed by libbpf once the outer map is created
                if template:
                    inner[lib.bpf_map__name(m).decode()] = InnerTemplate(
                        lib.bpf_map__type(template), lib.bpf_map__key_size(template),
                        lib.bpf_map__value_size(template), lib.bpf_map__max_entries(template),
                        lib.bpf_map__map_flags(template))
                m = lib.bpf_object__next_map(handle, m)
            ret = lib.bpf_object__load(handle)
            if ret < 0:
                verifier = "\n".join(b.value.decode(errors="replace") for b in logs if b.value)
                detail = _verifier_line(verifier) or _last_message()
                raise _error(f"loading BPF object {name}", ret, detail, verifier or "\n".join(_messages))
        except BaseException:
            lib.bpf_object__close(handle)
            raise
        return cls(handle, path, inner)

    def _handle(self) -> int:
        if not self._obj:
            raise BPFError(f"BPF object {os.path.basename(self.path)} is closed")
        return self._obj

    def program(self, name: str) -> int:
        """The fd of the program whose C function is *name* (valid until :meth:`close`)."""
        prog = _lib().bpf_object__find_program_by_name(self._handle(), name.encode())
        if not prog:
            raise BPFError(f"no program {name!r} in {os.path.basename(self.path)}")
        return _check(_lib().bpf_program__fd(prog), f"program {name}")

    def map(self, name: str) -> Map:
        """The map *name* of this object (its fd is valid until :meth:`close`)."""
        lib = _lib()
        m = lib.bpf_object__find_map_by_name(self._handle(), name.encode())
        if not m:
            raise BPFError(f"no map {name!r} in {os.path.basename(self.path)}")
        return Map(_check(lib.bpf_map__fd(m), f"map {name}"), name, lib.bpf_map__type(m),
                   lib.bpf_map__key_size(m), lib.bpf_map__value_size(m), lib.bpf_map__max_entries(m),
                   lib.bpf_map__map_flags(m), inner=self._inner.get(name))

    def close(self) -> None:
        """Unload the object's programs and maps (``bpf_object__close``); idempotent."""
        if self._obj:
            _lib().bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> "BPFObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _last_message() -> str:
    return _messages[-1].replace("libbpf: ", "") if _messages else ""


# -- running programs -------------------------------------------------------------------------------------
class RunResult(NamedTuple):
    """What one ``BPF_PROG_TEST_RUN`` gave: the verdict, the frame as the program left it, ns per run."""

    retval: int
    data: bytes
    duration: int


def test_run(prog_fd: int, data: bytes, repeat: int = 1, data_size_out: Optional[int] = None) -> RunResult:
    """Run the XDP program *prog_fd* on the frame *data* (at least 14 bytes) without any network and return
    ``(retval, out_bytes, duration_ns)``; ``out_bytes`` includes headers added by ``bpf_xdp_adjust_head``.
    ``repeat > 1`` reruns on the already modified buffer (the result is the last run's)."""
    size_out = data_size_out if data_size_out is not None else len(data) + 4096
    data_in, data_out = _buffer(data), ctypes.create_string_buffer(size_out)
    opts = _opts(_TestRunOpts)
    opts.data_in, opts.data_size_in = ctypes.cast(data_in, ctypes.c_void_p), len(data)
    opts.data_out, opts.data_size_out = ctypes.cast(data_out, ctypes.c_void_p), size_out
    opts.repeat = repeat
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)), "test run of an XDP program")
    return RunResult(opts.retval, data_out.raw[:opts.data_size_out], opts.duration)


test_run.__test__ = False  # not a pytest test


def live_frames(prog_fd: int, data: bytes, repeat: int, ifindex: int, batch_size: int = 0) -> int:
    """Traffic generator: run the XDP program *repeat* times on copies of *data* as if received on
    *ifindex*, and really perform its verdicts (XDP_TX leaves by *ifindex*, XDP_REDIRECT goes where the
    program sends it, XDP_PASS enters the stack). Pages are recycled with what the program wrote in them, so
    it must rewrite its headers every time. Returns the kernel's duration (ns)."""
    data_in = _buffer(data)
    ctx = _XdpMd(data=0, data_end=len(data), ingress_ifindex=ifindex)
    opts = _opts(_TestRunOpts)
    opts.data_in, opts.data_size_in = ctypes.cast(data_in, ctypes.c_void_p), len(data)
    opts.ctx_in, opts.ctx_size_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p), ctypes.sizeof(ctx)
    opts.repeat, opts.flags, opts.batch_size = repeat, BPF_F_TEST_XDP_LIVE_FRAMES, batch_size
    _check(_lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts)),
           f"live-frames test run on {_ifname(ifindex)}")
    return opts.duration


def load_verdict_program(verdict: int = XDP_PASS, name: str = "verdict") -> int:
    """Load a 2-instruction XDP program (``r0 = verdict; exit``) and return its fd (the caller closes it):
    a pass-through for a veth peer that must have an XDP program, or a probe that BPF works."""
    insns = struct.pack("<BBhi", 0xB7, 0x00, 0, verdict) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    buf = _buffer(insns)
    return _check(_lib().bpf_prog_load(BPF_PROG_TYPE_XDP, name.encode(), b"GPL", buf, 2, None),
                  "loading an XDP program")


# -- interfaces -------------------------------------------------------------------------------------------
def _ifname(ifindex: int) -> str:
    try:
        return f"{socket.if_indextoname(ifindex)} (ifindex {ifindex})"
    except OSError:
        return f"ifindex {ifindex}"


def _mode_flags(mode: Union[str, int]) -> int:
    if isinstance(mode, int):
        return mode
    try:
        return XDP_MODES[mode]
    except KeyError:
        raise ValueError(f"XDP mode must be one of {', '.join(XDP_MODES)}: {mode!r}") from None


def xdp_query(ifindex: int, mode: Union[str, int, None] = None) -> int:
    """The id of the XDP program on *ifindex* (in *mode*, or in any mode when None), 0 when none."""
    opts = _opts(_XdpQueryOpts)
    _check(_lib().bpf_xdp_query(ifindex, 0, ctypes.byref(opts)), f"XDP query on {_ifname(ifindex)}")
    if not (opts.prog_id or opts.drv_prog_id or opts.skb_prog_id or opts.hw_prog_id):
        try:
            socket.if_indextoname(ifindex)  # an unknown ifindex answers "no program": say so instead
        except OSError:
            raise _error(f"XDP query on ifindex {ifindex}", errnos.ENODEV) from None
    if mode is None:
        return opts.prog_id or opts.drv_prog_id or opts.skb_prog_id or opts.hw_prog_id
    flags = _mode_flags(mode)
    return opts.drv_prog_id if flags & XDP_FLAGS_DRV_MODE else opts.skb_prog_id


def xdp_attach(ifindex: int, prog_fd: int, mode: Union[str, int] = "native", replace: bool = False) -> None:
    """Attach *prog_fd* to *ifindex* in *mode* ("native"/"drv" or "generic"/"skb"). Refuses, with one clear
    error, when a program is already attached there (detach it first) — unless *replace*: then the new
    program takes the old one's place atomically (no frame meets neither)."""
    flags = _mode_flags(mode) | (0 if replace else XDP_FLAGS_UPDATE_IF_NOEXIST)
    ret = _lib().bpf_xdp_attach(ifindex, prog_fd, flags, None)
    if ret in (-errnos.EBUSY, -errnos.EEXIST):
        current = xdp_query(ifindex)
        raise _error(f"XDP attach on {_ifname(ifindex)}", ret,
                     f"program id {current} is already attached; detach it first")
    _check(ret, f"XDP attach ({mode}) on {_ifname(ifindex)}")


def xdp_detach(ifindex: int, mode: Union[str, int] = "native") -> None:
    """Remove the XDP program attached to *ifindex* in *mode* (nothing happens when there is none)."""
    _check(_lib().bpf_xdp_detach(ifindex, _mode_flags(mode), None),
           f"XDP detach ({mode}) on {_ifname(ifindex)}")


# -- can this machine do it? ------------------------------------------------------------------------------
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def _effective_caps() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def available() -> Tuple[bool, str]:
    """``(True, "")`` when this process can load BPF programs, else ``(False, one-line reason)``: needs
    CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN, a loadable ``libbpf.so.1`` and a kernel that accepts a
    2-instruction XDP program."""
    caps = _effective_caps()
    if not (caps >> CAP_BPF & 1 or caps >> CAP_SYS_ADMIN & 1) or not caps >> CAP_NET_ADMIN & 1:
        return False, "BPF needs root (CAP_BPF and CAP_NET_ADMIN)"
    try:
        _lib()
    except (OSError, AttributeError) as exc:
        return False, f"{LIBBPF_SONAME} cannot be loaded ({exc}): apt-get install libbpf1"
    try:
        os.close(load_verdict_program(XDP_PASS, "probe"))
    except BPFError as exc:
        return False, f"the kernel refuses BPF: {exc}"
    return True, ""


__all__ = [
    "BPFObject", "InnerTemplate", "Map", "RunResult", "available", "live_frames", "load_verdict_program",
    "possible_cpus", "prog_id", "test_run", "xdp_attach", "xdp_detach", "xdp_query",
    "XDP_ABORTED", "XDP_DROP", "XDP_PASS", "XDP_TX", "XDP_REDIRECT", "BPF_ANY", "BPF_NOEXIST", "BPF_EXIST",
]
