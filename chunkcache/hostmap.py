"""Page-lock an LMDB store's memory map for CUDA, so fusion copies entries straight from the page
cache to the GPU.

Without it, every layer of every entry is first copied from the map into pinned staging memory
(host memcpy, about 20 GB/s on the H100 host, or per-part overhead for the small parts of int4
and int8) and only then to the device. With the map registered (``cudaHostRegister`` with the
read-only flag), the copy engine reads the map's pages itself: 1 GiB took 20 ms (54 GB/s) on the
H100 host measured here, with no host copy at all. The bytes are still checked on the GPU against
the entries' per-layer sums after they land (``pipeline.LayerLoader``).

    reg = MapRegistry(limit=8 << 30)
    if reg.register(store):                  # registers the written part of data.mdb (once, and
        ...                                  # again for what the file grew by since)
    reg.covers(ptr, nbytes)                  # is [ptr, ptr + nbytes) inside a registered extent?

Costs and rules:
- Registering pins the file's pages in RAM (about 0.2 s per GiB, once per process and extent):
  only files up to ``limit`` bytes are registered (default a quarter of physical memory); a
  larger store, a platform without ``/proc/self/maps`` or a failed registration fall back to
  the staged copy.
- Pinned pages cannot be dropped from the page cache, so a registered store is always warm.
- LMDB moves its map when it grows it (``set_mapsize``) and unmaps it on close: the store runs
  ``on_unmap`` hooks first, and the registration is dropped there (registered again lazily).
- Writes stay coherent: with ``writemap`` off LMDB writes through the page cache, the same pages
  the GPU reads (checked on the H100).

``MemcpyBatch`` queues many such host-to-device copies with one ``cudaMemcpyBatchAsync`` call
(CUDA >= 12.8, through ctypes), so a layer group costs one call, not one per codec part.
``own_stream`` makes a CUDA stream outside torch's stream pool (through the same runtime).

What it knows: LMDB's data file and mapping, CUDA host registration, batched copies and stream
creation through the CUDA runtime. What it does not know:
the entry format, fusion.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import warnings
import weakref

import torch

__all__ = ["MapRegistry", "MemcpyBatch", "default_limit", "own_stream"]

_READ_ONLY = 8  # cudaHostRegisterReadOnly: the map is mapped read-only (writemap is off)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def default_limit() -> int:
    """A quarter of physical memory (0 where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 0


def _mapping_base(path: str) -> int | None:
    """Start address of this process's mapping of ``path`` at file offset 0 (Linux), else None."""
    try:
        st = os.stat(path)
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                # start-end perms offset dev inode path
                if len(fields) >= 6 and int(fields[4]) == st.st_ino and int(fields[2], 16) == 0:
                    if os.path.realpath(fields[5]) == os.path.realpath(path):
                        return int(fields[0].split("-")[0], 16)
    except (OSError, ValueError):
        return None
    return None


def _cudarts() -> list[ctypes.CDLL]:
    """The CUDA runtime libraries loaded in this process (torch's), through ctypes."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libcudart" in line}
        return [ctypes.CDLL(lib) for lib in sorted(libs)]
    except OSError:
        return []


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's sticky-until-read last error after a failed registration, so the
    next kernel launch does not report it (torch's cudart bindings have no cudaGetLastError)."""
    for lib in _cudarts():
        lib.cudaGetLastError()


def own_stream(device) -> torch.cuda.Stream | None:
    """A new CUDA stream on ``device`` that no ``torch.cuda.Stream()`` can return, or None where no
    CUDA runtime library is loaded in this process (or it refused).

    ``torch.cuda.Stream()`` hands out one of 32 pooled streams per priority, round robin, so two of
    its objects may be one CUDA stream (pytorch/pytorch#173729), ``torch.cuda.graph``'s default
    capture stream included: a thread's copies queued on its staging's copy stream would then be
    recorded into the graph another thread is capturing, or invalidate that capture. Made with
    ``cudaStreamCreateWithFlags(cudaStreamNonBlocking)`` and wrapped as a
    ``torch.cuda.ExternalStream``; it is never destroyed (callers keep one for the process)."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.init()  # (the primary context the stream belongs to)
    for lib in _cudarts():
        create = getattr(lib, "cudaStreamCreateWithFlags", None)
        if create is None:
            continue
        handle, was = ctypes.c_void_p(0), ctypes.c_int(-1)
        lib.cudaGetDevice(ctypes.byref(was))
        if lib.cudaSetDevice(ctypes.c_int(index)) != 0:
            _clear_cuda_error()
            continue
        try:
            err = create(ctypes.byref(handle), ctypes.c_uint(1))  # cudaStreamNonBlocking
        finally:
            if was.value >= 0:
                lib.cudaSetDevice(was)
        if err == 0 and handle.value:
            return torch.cuda.ExternalStream(handle.value, device=torch.device("cuda", index))
        _clear_cuda_error()
    return None


class _CopyAttributes(ctypes.Structure):
    """cudaMemcpyAttributes: source access order, two cudaMemLocation hints, flags."""

    _fields_ = [
        ("src_access_order", ctypes.c_int),
        ("src_loc_type", ctypes.c_int),
        ("src_loc_id", ctypes.c_int),
        ("dst_loc_type", ctypes.c_int),
        ("dst_loc_id", ctypes.c_int),
        ("flags", ctypes.c_uint),
    ]


class MemcpyBatch:
    """``cudaMemcpyBatchAsync`` (CUDA runtime >= 12.8): many host-to-device copies queued with one
    call, where ``torch._foreach_copy_`` costs a Python slice and a driver call per piece (the
    direct path copies every part of every chunk, 8 layers at a time: 64-96 pieces at 8K tokens).
    ``available`` is False on older runtimes or where the symbol is missing; ``__call__`` returns
    False if the runtime refused the batch (the caller then copies piece by piece).

        batch = MemcpyBatch()
        batch(dsts, srcs, sizes, stream.cuda_stream)   # uint64 numpy arrays of addresses / bytes
    """

    _STREAM_ORDER = 1  # cudaMemcpySrcAccessOrderStream
    _OVERLAP_COMPUTE = 1  # cudaMemcpyFlagPreferOverlapWithCompute

    def __init__(self) -> None:
        self.fn = None
        self.fail_index = False  # CUDA 12.8-12.9 take a failIdx argument, 13 does not
        for lib in _cudarts():
            version = ctypes.c_int(0)
            if lib.cudaRuntimeGetVersion(ctypes.byref(version)) != 0 or version.value < 12080:
                continue
            fn = getattr(lib, "cudaMemcpyBatchAsync", None)
            if fn is None:
                continue
            self.fail_index = version.value < 13000
            fn.restype = ctypes.c_int
            args = [ctypes.c_void_p] * 3 + [
                ctypes.c_size_t,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_size_t,
            ]
            fn.argtypes = args + ([ctypes.c_void_p] if self.fail_index else []) + [ctypes.c_void_p]
            self.fn = fn
            break
        self.attrs = _CopyAttributes(self._STREAM_ORDER, 0, 0, 0, 0, self._OVERLAP_COMPUTE)
        self.attr_index = (ctypes.c_size_t * 1)(0)

    @property
    def available(self) -> bool:
        return self.fn is not None

    def __call__(self, dsts, srcs, sizes, stream: int) -> bool:
        """Queue ``sizes[i]`` bytes from ``srcs[i]`` to ``dsts[i]`` on ``stream`` (numpy uint64
        arrays; sources page-locked host memory, destinations device memory)."""
        n = len(sizes)
        args = [dsts.ctypes.data, srcs.ctypes.data, sizes.ctypes.data, n, ctypes.addressof(self.attrs)]
        args += [ctypes.addressof(self.attr_index), 1]
        if self.fail_index:
            fail = ctypes.c_size_t(0)
            args.append(ctypes.addressof(fail))
        err = self.fn(*args, ctypes.c_void_p(stream))
        if err != 0:
            _clear_cuda_error()
            return False
        return True


class _Registration:
    def __init__(self, base: int, data: str) -> None:
        self.base, self.data = base, data
        self.extents: list[tuple[int, int]] = []  # [start, end) addresses, registered
        self.failed = False


class MapRegistry:
    """CUDA registrations of LMDB stores' maps (one per store, shared by every query)."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = default_limit() if limit is None else limit
        """Largest data file registered, bytes (0: never register)."""
        self._regs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.seconds = 0.0  # time spent registering (diagnostics)

    def register(self, store) -> bool:
        """Register the written part of ``store``'s data file (a store with a ``mapping()``, i.e.
        an ``LMDBStore``; anything else: False). Idempotent; registers only what the file grew by since. True when every byte of
        the file is registered, so that every entry read from it is covered."""
        mapping = getattr(store, "mapping", None)  # LMDBStore.mapping: the map held in place
        if self.limit <= 0 or mapping is None or not torch.cuda.is_available():
            return False
        with mapping() as data, self._lock:
            reg = self._regs.get(store)
            if reg is not None and reg.failed:
                return False
            try:
                size = os.stat(data).st_size // _PAGE * _PAGE
            except OSError:
                return False
            if size > self.limit:
                return False
            if reg is None:
                base = _mapping_base(data)
                if base is None:
                    return False
                reg = _Registration(base, data)
                self._regs[store] = reg
                store.on_unmap(lambda r=reg: self._drop(r))
            end = reg.extents[-1][1] if reg.extents else reg.base
            if reg.base + size <= end:
                return True
            t0 = time.perf_counter()
            err = torch.cuda.cudart().cudaHostRegister(end, reg.base + size - end, _READ_ONLY)
            self.seconds += time.perf_counter() - t0
            if int(err) != 0:
                _clear_cuda_error()
                reg.failed = True
                warnings.warn(
                    f"chunkcache: could not page-lock {data} for direct GPU copies "
                    f"(cudaHostRegister: {torch.cuda.cudart().cudaGetErrorString(err)}); "
                    "entries go through pinned staging instead",
                    stacklevel=2,
                )
                return False
            reg.extents.append((end, reg.base + size))
            return True

    def covers(self, ptr: int, nbytes: int) -> bool:
        """Whether ``[ptr, ptr + nbytes)`` lies inside one registered extent (of any store)."""
        with self._lock:
            return any(a <= ptr and ptr + nbytes <= b for r in self._regs.values() for a, b in r.extents)

    def registered_bytes(self, store) -> int:
        reg = self._regs.get(store)
        return 0 if reg is None else sum(b - a for a, b in reg.extents)

    def _drop(self, reg: _Registration) -> None:
        """The store is about to unmap (close, or a map resize): unregister every extent."""
        with self._lock:
            for a, _ in reg.extents:
                try:
                    err = torch.cuda.cudart().cudaHostUnregister(a)
                    if int(err) != 0:
                        _clear_cuda_error()
                except Exception:  # interpreter shutdown, CUDA already torn down
                    pass
            reg.extents.clear()
            for store, r in list(self._regs.items()):
                if r is reg:
                    del self._regs[store]
