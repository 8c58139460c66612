"""Pipelined loading for fusion: stream stored chunk entries to the device one layer at a time
while earlier layers compute, and assemble each step of layers with one ``rerotate_scatter_layers``
launch.

    host: LMDB map (zero-copy views of the entries), or entries streamed into the staging's
          page-locked landing arena (``Staging.landing``)
            |                                  map page-locked (hostmap), or the arena: every
            |                                  part's copy for 8 layers in one
            |                                  cudaMemcpyBatchAsync ("direct");
            |  else one torch.cat per layer    into pinned slot l % depth, then one H2D copy
            v  (stager thread, copy stream)
          device slot  l % depth  --rerotate_scatter_packed (decode + rotate + write)-->  buf[l]
                                   on the side stream (high priority) behind the copy's event,
                                   then the checksum kernel; the compute stream waits for the
                                   assembly's event. Copies have a stream of their own, so the
                                   copy engine never waits behind a kernel.

Layer ``l`` is staged while layer ``l - 1`` computes; the only waits are on per-layer events (the
compute stream waits for layer ``l``'s assembly, the copy stream for a device slot's previous
tenant to be assembled and checked, the host for an old ``copied`` before it overwrites a pinned
slot), never a device-wide synchronisation.

What it knows: the entry format (``format.unpack_parts``), CUDA streams and events, the fusion's
``LayerSource`` hooks, whether a view lies in a registered map (``hostmap``). What it does not
know: selection, models' maths, where entries come from.
On CPU the same staging runs into plain memory and the torch reference kernels decode: the
results equal ``fuse_kv`` over the decoded chunks up to the codecs' one rounding step.

    staging = Staging(torch.device("cuda"))                      # pinned buffers, reused per query
    with entry_views(store, keys) as entries:
        res = fuse_entries(lm, prefix_kv, entries, prefix_ids, suffix_ids, FuseConfig(), staging)
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from chunkcache import kernels
from chunkcache import model as M
from chunkcache.errors import CorruptEntryError
from chunkcache.format import has_layer_sums, unpack_parts, verify_payload, verify_small_sections
from chunkcache.fuse import FuseConfig, FuseJob, FuseResult, StageTimer, exact_chunks, run_job
from chunkcache.model import LoadedModel

__all__ = ["LayerLoader", "LoadPlan", "Staging", "StagingPool", "entry_views", "fuse_entries"]

_PAGE = 4096  # alignment of each entry in a landing arena
_ALIGN = 16  # byte alignment of every part inside a slot (dtype views, 16-byte vector loads);
# parts of codecs are almost always multiples of it, so the per-layer copy needs few pad pieces


@contextmanager
def entry_views(store, keys: Sequence[str], staging: Staging | None = None) -> Iterator[list]:
    """The raw entries under ``keys``, through ``store.views`` (``Store.views``): zero-copy views
    of the LMDB map for an ``LMDBStore``, valid only inside the ``with`` block (no other thread's
    growing ``put`` can move the map meanwhile; a map grown by another process is adopted), else
    copies. Raises KeyError naming the first missing key. Hits are not counted (no access
    bookkeeping). With a CUDA ``staging``, the store's map is registered first
    (``Staging.register``) so that the views can be copied to the device directly."""
    if staging is not None:
        staging.register(store)
    with store.views(keys) as views:
        _missing(keys, views)
        yield views


def _direct_ok(maps, codec: str, parts: dict[str, torch.Tensor], pinned: torch.Tensor | None = None) -> bool:
    """Whether an entry's codec parts can be copied without host staging: all resident on the
    device (``devicecache``), every section inside a registered map, or all inside ``pinned``
    (page-locked host memory: the staging's landing arena, ``Staging.landing``)."""
    if all(parts[n].is_cuda for n in kernels.reference.CODEC_PARTS[codec]):
        return True
    if pinned is not None:
        lo, hi = pinned.data_ptr(), pinned.data_ptr() + pinned.numel()
        if all(lo <= a and b <= hi for a, b in _spans(parts)):
            return True
    return maps is not None and _covered(maps, parts)


def _spans(parts: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in parts.values() if t.numel()]


def _in_arena(arena: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether ``t`` is a view inside ``arena`` (same device, same storage)."""
    return t.device == arena.device and t.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()


def _covered(maps, parts: dict[str, torch.Tensor]) -> bool:
    """Whether the registry covers the span of an entry's sections (one lookup per entry)."""
    spans = _spans(parts)
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    return maps.covers(lo, hi - lo)


def _missing(keys, values) -> None:
    for k, v in zip(keys, values, strict=True):
        if v is None:
            raise KeyError(f"chunk {k} is not in the store")


class Staging:
    """Reusable staging memory for one device: ``depth`` pinned host slots, ``depth`` device slots
    and a side stream. Pinning costs ~0.1 s per GiB, so a
    server keeps one of these and hands it to every query (one query at a time); it grows when a
    query needs larger slots."""

    def __init__(
        self,
        device: torch.device | str,
        max_bytes: int = 1 << 30,
        copy_threads: int | None = None,
        graphs: bool = True,
        register_limit: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if copy_threads is None:  # measured on a 16-core H100 host: 4-8 fast, 16 starve the compute
            copy_threads = max(1, min(8, (os.cpu_count() or 2) // 2))
        self.copy_threads = copy_threads
        """Intra-op threads of the stager's copies (``torch.set_num_threads`` on its own thread)."""
        self.cuda = self.device.type == "cuda"
        self.max_bytes = max_bytes
        """Bytes of device slots allowed; the depth is max_bytes // slot size (at least 2)."""
        self.host: torch.Tensor | None = None  # [depth, slot_bytes] uint8 (pinned on CUDA)
        self.dev: torch.Tensor | None = None  # [depth, slot_bytes] uint8 on the device
        self.stream = torch.cuda.Stream(self.device, priority=-1) if self.cuda else None
        """Side stream of the assembly and checksum kernels (high priority: they are small and
        later layers wait for them)."""
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.prep_stream = torch.cuda.Stream(self.device) if self.cuda else None
        """Where a batched fusion's caller prepares it (``BatchConfig.prep_stream``): its small
        copies then need not wait behind the batch running on the compute stream."""
        """The host-to-device copies: on a stream of their own they never wait behind a kernel."""
        self.graphs = None
        """CUDA graphs of the layer loops and the padded KV buffers they read (``graphs.py``):
        a shape seen twice is recorded, then replayed. ``graphs=False`` runs eagerly."""
        if self.cuda and graphs:
            from chunkcache.graphs import FusionGraphs

            self.graphs = FusionGraphs()
        self.landed: torch.Tensor | None = None
        """The arena of ``landing`` (1-D uint8; pinned on CUDA), None until a query streams."""
        self.maps = None
        """CUDA registrations of LMDB stores' maps (``hostmap.MapRegistry``): entries inside them
        are copied straight from the page cache to the device, without the pinned staging copy.
        ``register_limit``: the largest store file registered (bytes; None: a quarter of physical
        memory; 0: never, always stage through pinned memory)."""
        self.batch = None
        """``hostmap.MemcpyBatch`` where the CUDA runtime has it: a group's direct copies in one call."""
        if self.cuda and register_limit != 0:
            from chunkcache.hostmap import MapRegistry, MemcpyBatch

            self.maps = MapRegistry(register_limit)
            self.batch = MemcpyBatch()
            if not self.batch.available:
                self.batch = None

    def slots(self, slot_bytes: int, layers: int, host: bool = True, multiple: int = 1) -> int:
        """Make sure there are slots of ``slot_bytes`` (``host=False``: device slots only, for
        copies straight from a registered map); return the depth (number of slots), a multiple of
        ``multiple`` and at least twice it."""
        fits = self.max_bytes // max(slot_bytes, 1) // multiple * multiple
        depth = max(2 * multiple, min(-(-layers // multiple) * multiple, fits))
        if self.dev is None or self.dev.shape[1] < slot_bytes or self.dev.shape[0] < depth:
            self.host = self.dev = None  # free the old pair before allocating the new one
            if self.cuda:
                self.dev = torch.empty((depth, slot_bytes), dtype=torch.uint8, device=self.device)
            else:
                self.dev = self.host = torch.empty((depth, slot_bytes), dtype=torch.uint8)
        if host and self.host is None:  # pinning costs ~0.1 s per GiB: only when a query needs it
            self.host = torch.empty(self.dev.shape, dtype=torch.uint8, pin_memory=True)
        return depth

    LANDING_LIMIT = 4 << 30
    """Largest landing arena kept (bytes); a query streaming more gets fresh, unpinned buffers."""

    def landing(self, sizes: Sequence[int]) -> list[np.ndarray]:
        """Writable host buffers of ``sizes`` bytes for entries streamed in (``stream.LayerStream``'s
        ``landing``), each aligned to a page, all in one arena kept from query to query (grown
        when a query needs more): page-locked on CUDA, so the loader copies from it straight to the
        device (``LoadPlan.direct``). Valid until the next call; one query at a time, as the staging."""
        at, offsets = 0, []
        for n in sizes:
            offsets.append(at)
            at += -(-int(n) // _PAGE) * _PAGE
        if at > self.LANDING_LIMIT:  # not kept (nor pinned): fresh zeroed arrays
            return [np.zeros(int(n), dtype=np.uint8) for n in sizes]
        if self.landed is None or self.landed.numel() < at:
            self.landed = None  # the old arena goes first
            grown = max(at, int(1.25 * at))  # headroom: a little more context next time need not re-pin
            self.landed = torch.empty(grown, dtype=torch.uint8, pin_memory=self.cuda)
        arena = self.landed.numpy()
        return [arena[a : a + int(n)] for a, n in zip(offsets, sizes, strict=True)]

    def register(self, store) -> bool:
        """Page-lock ``store``'s map for direct copies if it is an LMDB store within the limit
        (``hostmap.MapRegistry.register``); True when every entry in it is covered."""
        return self.maps is not None and self.maps.register(store)


_REGISTRIES: dict[int, object] = {}  # MapRegistry per limit, shared by every pool's stagings
_REGISTRIES_GUARD = threading.Lock()


class _Waiter:
    """One caller queued in ``StagingPool.take``: set with the staging it gets (None: make one)."""

    __slots__ = ("event", "staging")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.staging: Staging | None = None


class StagingPool:
    """``Staging``s for concurrent fusions: a fusion holds one for its whole run (its slots, streams,
    graphs and the padded KV buffer the graphs read are that fusion's alone), and hands it back
    when done. At most ``size`` exist (each holds up to ``max_bytes`` of device slots, pinned host
    slots and the graphs' buffers); further callers wait for one to be free. The stagings of
    every pool in the process share one ``hostmap.MapRegistry`` per limit: registering one map
    twice fails (measured: a second pool then fell back to pinned staging).

        pool = StagingPool(torch.device("cuda"), size=1)
        with pool.take() as staging:
            res = fuse_entries(lm, prefix_kv, entries, prefix_ids, suffix_ids, cfg, staging)
    """

    def __init__(self, device: torch.device | str, size: int = 1, **staging_kwargs) -> None:
        if size < 1:
            raise ValueError(f"a staging pool needs at least one staging, got size={size}")
        self.device, self.size, self.kwargs = torch.device(device), size, staging_kwargs
        self._free: list[Staging] = []
        self._made = 0
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()
        """Callers waiting, first come first served: a staging handed back goes straight to the
        first of them (no caller that arrives later can take it first, so no caller starves;
        measured on the H200: p99 TTFT 4.4x the median under 8 clients with a plain condition)."""

    @contextmanager
    def take(self) -> Iterator[Staging]:
        create, st, w = False, None, None
        with self._lock:
            if not self._waiters and self._free:
                st = self._free.pop()
            elif not self._waiters and self._made < self.size:
                self._made, create = self._made + 1, True
            else:
                w = _Waiter()
                self._waiters.append(w)
        if w is not None:
            try:
                w.event.wait()
            except BaseException:  # interrupted: leave the queue, or pass on what was handed over
                with self._lock:
                    if w in self._waiters:
                        self._waiters.remove(w)
                        w = None
                if w is not None:
                    self._pass_on(w.staging) if w.staging is not None else self._creation_failed()
                raise
            st, create = w.staging, w.staging is None
        if create:
            try:
                st = Staging(self.device, **self.kwargs)
                if st.maps is not None:  # one registry per process and limit: a map is page-locked once
                    with _REGISTRIES_GUARD:
                        st.maps = _REGISTRIES.setdefault(st.maps.limit, st.maps)
            except BaseException:
                self._creation_failed()
                raise
        try:
            yield st
        finally:
            self._pass_on(st)

    def _pass_on(self, st: Staging) -> None:
        """A staging handed back: to the first waiter, else to the free list."""
        with self._lock:
            if self._waiters:
                w = self._waiters.popleft()
                w.staging = st
                w.event.set()
            else:
                self._free.append(st)

    def _creation_failed(self) -> None:
        """A staging could not be made: the first waiter may try (it takes over the slot)."""
        with self._lock:
            if self._waiters:
                w = self._waiters.popleft()
                w.staging = None
                w.event.set()
            else:
                self._made -= 1

    def stagings(self) -> list[Staging]:
        """The stagings not in use now (diagnostics, tests)."""
        with self._lock:
            return list(self._free)


@dataclass
class _Part:
    chunk: int
    name: str
    slot_offset: int
    nbytes: int  # one layer (also the layer stride in the entry)
    sums: torch.Tensor | None  # [layers, 2] its sums (the entry's layer_sums section), None = not checked


@dataclass
class LoadPlan:
    """Where every byte of one query's entries goes, and what it must sum to: built once per
    query from the entries' headers and views, with no threads, streams or staging memory (so it
    can be built and tested alone); ``LayerLoader`` executes it.

    A slot holds one layer of every part of every chunk, each at an aligned ``slot_offset``; a
    direct copy (``direct``: every part lies in a registered map) moves ``group`` layers of a
    part at once into a group buffer of ``group`` consecutive slots, where part p's layer j sits
    at ``group * p.slot_offset + j * p.nbytes``: one launch table (``layouts[j]``) and one
    checksum table (``sum_tables[j]``) per position j of a group."""

    codec: str
    headers: list[dict]
    """The entries' headers, in prompt order."""
    parts: list[_Part]
    """Every codec part of every chunk, in slot order."""
    flat: list[torch.Tensor]
    """Per part its bytes as ``[L, per_layer]`` uint8 views of the entry."""
    pads: list[torch.Tensor | None]
    """Per part the zero pad after it in a slot (keeps the next part aligned)."""
    slot_bytes: int
    direct: bool
    """Copy straight from the registered map (else pack each layer in pinned memory first)."""
    group: int
    """Layers per copy (1 unless ``direct``)."""
    layouts: list[kernels.PackedLayout]
    """Per position j of a group, where the chunks' parts sit in the group buffer."""
    checked: list[_Part]
    """The parts whose per-layer sums are checked."""
    sum_tables: torch.Tensor
    """[group, P, 2] (byte offset in the group buffer, bytes) of each checked part, per j."""
    sum_longest: int
    expected: torch.Tensor
    """[L, P, 2] the checked parts' stored sums."""
    cos: torch.Tensor
    """[C, D] fp32 rotation of every chunk by its position delta (``model.rotations``)."""
    sin: torch.Tensor
    offsets: list[int]
    """First position of each chunk in the assembled cache."""
    arena: torch.Tensor | None = None
    """Zero copy: every codec part lies in this 1-D uint8 device tensor (``devicecache``), and
    ``layouts[l]`` places layer ``l`` of each part inside it: nothing is staged."""

    DIRECT_GROUP = 8
    """Layers per copy when copying straight from a registered map (a group's copies are one
    batch call, whose host cost is per call: 8 layers matches the fusion's graph groups); halved
    down to ``MIN_GROUP`` while two groups' slots exceed the staging budget."""
    MIN_GROUP = 4

    @classmethod
    def build(
        cls,
        lm: LoadedModel,
        parsed: Sequence[tuple[dict, dict[str, torch.Tensor]]],  # format.unpack_parts of each entry
        offsets: Sequence[int],  # first position of each chunk in the cache
        device: torch.device,  # where the cache, tables and sums live
        max_bytes: int = 1 << 30,  # staging budget (``Staging.max_bytes``)
        maps=None,  # hostmap.MapRegistry, or None: no direct copies
        check_layers: Sequence[bool] | None = None,  # per entry: check its layer sums while staging
        arena: torch.Tensor | None = None,  # devicecache arena: zero copy if every part lies in it
        pinned: torch.Tensor | None = None,  # page-locked host memory (a landing arena): direct copies
    ) -> LoadPlan:
        spec = lm.spec
        headers = []
        for header, _ in parsed:
            shape = header["kv_shape"]
            if shape[0] != spec.num_layers or shape[2] != spec.kv_heads or shape[4] != spec.head_dim:
                raise ValueError(
                    f"entry kv_shape {shape} does not fit the model ({spec.num_layers} layers, "
                    f"{spec.kv_heads} kv heads, head_dim {spec.head_dim}): it was made by another model"
                )
            headers.append(header)
        codecs = {h["codec"] for h in headers}
        if len(codecs) != 1:
            raise ValueError(f"entries mix codecs {sorted(codecs)}; fuse one codec at a time")
        codec = codecs.pop()
        check_layers = check_layers or [False] * len(parsed)
        # Per part: where it sits in a slot, its bytes as [L, per_layer] (indexed per layer by the
        # stager, off the critical path) and the zero pad after it, so one torch.cat of
        # [layer view, pad, layer view, ...] lands every part at its aligned slot offset; and, if
        # it is checked, its sums.
        zeros = torch.zeros(_ALIGN, dtype=torch.uint8)
        parts: list[_Part] = []
        flat: list[torch.Tensor] = []
        pads: list[torch.Tensor | None] = []
        shapes: list[dict[str, tuple[torch.dtype, tuple[int, ...]]]] = []
        off = 0
        for c, (header, entry_parts) in enumerate(parsed):
            shapes.append({})
            for name in kernels.reference.CODEC_PARTS[codec]:
                t = entry_parts[name]  # [L, ...] CPU view of the entry
                per_layer = t[0].numel() * t.element_size()
                sums = None
                if check_layers[c]:
                    sums = entry_parts["layer_sums"][header["layer_sums_parts"].index(name)]
                parts.append(_Part(c, name, off, per_layer, sums))
                shapes[c][name] = (t.dtype, tuple(t.shape[1:]))
                flat.append(t.reshape(t.shape[0], -1).view(torch.uint8))
                gap = -per_layer % _ALIGN  # keeps every part aligned to its dtype
                pads.append(zeros[:gap] if gap else None)
                off += per_layer + gap
        slot_bytes = off
        # Direct copies: every part lies in a registered map (hostmap), so the copy engine reads
        # the entries where they are; otherwise each layer is first packed into pinned memory.
        # A direct copy moves `group` layers of a part at once (its layers are contiguous in the
        # entry; per-copy overhead, not bytes, bounds the small parts of int8/int4).
        if pinned is not None and not pinned.is_pinned():
            pinned = None
        direct = all(_direct_ok(maps, codec, ps, pinned) for _, ps in parsed)
        aligned = all(p.nbytes % _ALIGN == 0 for p in parts)
        g = cls.DIRECT_GROUP
        while g > cls.MIN_GROUP and 2 * g * slot_bytes > max_bytes:
            g //= 2  # two groups' slots within the staging budget where possible
        g = min(g, spec.num_layers) if direct and aligned else 1
        base = kernels.PackedLayout(codec, spec.kv_heads, spec.head_dim)
        it = iter(parts)
        for c, dest in enumerate(offsets):
            where = {}
            for name, (dtype, shape) in shapes[c].items():
                p = next(it)
                where[name] = (g * p.slot_offset, dtype, shape)
            base.add(where, dest)
        # position j of a group: every part one layer (its nbytes) further per j
        step = [{} for _ in offsets]
        for p in parts:
            step[p.chunk][p.name] = p.nbytes
        # one launch table for the group's positions (one copy), so that a step's layers assemble
        # in one launch (``kernels.rerotate_scatter_layers``)
        layouts = base.series(step, g, device)
        for layout in layouts:
            layout.meta(device)  # (a series that is not linear: each table built now, off the layer loop)
        # Checksums: which parts, where in the slot (per j of a group), and what they must be.
        checked = [p for p in parts if p.sums is not None]
        sum_tables = (
            torch.tensor(
                [[[g * p.slot_offset + j * p.nbytes, p.nbytes] for p in checked] for j in range(g)],
                dtype=torch.int64,
            )
            .view(g, -1, 2)
            .to(device)
        )
        expected = (
            torch.stack([p.sums for p in checked], dim=1).to(device)  # [L, P, 2]
            if checked
            else torch.zeros(spec.num_layers, 0, 2, dtype=torch.int64, device=device)
        )
        if arena is not None and all(_in_arena(arena, ps[n]) for _, ps in parsed for n in shapes[0]):
            # Zero copy: the kernel reads each layer straight out of the arena (checked on admission).
            g, direct, checked = 1, True, []
            base = kernels.PackedLayout(codec, spec.kv_heads, spec.head_dim)
            for c, dest in enumerate(offsets):
                ps = parsed[c][1]
                base.add(
                    {n: (ps[n].data_ptr() - arena.data_ptr(), dt, sh) for n, (dt, sh) in shapes[c].items()},
                    dest,
                )
            layouts = base.series(step, spec.num_layers, device)  # one launch table, one copy
            sum_tables = torch.zeros(1, 0, 2, dtype=torch.int64, device=device)
            expected = torch.zeros(spec.num_layers, 0, 2, dtype=torch.int64, device=device)
        else:
            arena = None
        deltas = [o - int(h["base_pos"]) for o, h in zip(offsets, headers, strict=True)]
        cos, sin = M.rotations(lm.model, deltas, device)  # [C, D]
        return cls(
            codec=codec,
            headers=headers,
            parts=parts,
            flat=flat,
            pads=pads,
            slot_bytes=slot_bytes,
            direct=direct,
            group=g,
            layouts=layouts,
            checked=checked,
            sum_tables=sum_tables,
            sum_longest=max((p.nbytes for p in checked), default=0),
            expected=expected,
            cos=cos,
            sin=sin,
            offsets=list(offsets),
            arena=arena,
        )


class LayerLoader:
    """Stages the codec parts of a list of entries layer by layer on a background thread and
    assembles ``buf`` (a ``LayerSource`` for ``fuse.fuse_assembled``). It starts at the first
    ``ready`` (or ``start()``), so the fusion's own small uploads go before its copies.

    Stager thread (for direct CUDA copies of entries that are all here, the caller of
    ``start()``, queueing every step at once: ``inline``), per step of ``_ranges()`` (layer 0,
    layer 1, then groups of ``group`` layers):
    - copy: straight from the registered map, every part of the step's layers in one batch call
      into the step's group buffer (``direct``); otherwise one ``torch.cat`` into pinned slot
      ``l % depth`` (torch's intra-op threads copy outside the GIL: Python threads copying piece
      by piece were measured 3-5x slower, waiting on the GIL behind the compute thread), then one
      copy. On CUDA the copies go on the copy stream, behind the event that frees their slots;
    - CUDA: on the side stream behind the copy's event, one ``rerotate_scatter_layers`` launch for
      the step's layers (their launch tables are one series), then one checksum launch over the
      step's slots (the bytes the GPU uses are the bytes checked); CPU: the sums are checked
      before the layer can be used;
    - signal the compute thread.
    Compute thread, ``ready(l)``: wait for layer ``l``'s signal and make the compute stream wait
    for its assembly's event (device side; on CPU, assemble the layer there). ``check()``, once
    the fusion is done, compares all layers' sums with the
    entries' (one sync) and raises ``CorruptEntryError`` naming the first damaged chunk-layer: the
    result is then never returned. Where the bytes go is its ``LoadPlan`` (``plan``), built once
    per query: every layer of a chunk has the same part shapes, so the launch tables are built
    once (one per position in a group)."""

    def __init__(
        self,
        lm: LoadedModel,
        parsed: Sequence[tuple[dict, dict[str, torch.Tensor]]],  # format.unpack_parts of each entry
        buf: torch.Tensor,  # [L, 2, H, N, D] the cache to fill
        offsets: Sequence[int],  # first position of each chunk in buf
        staging: Staging,
        check_layers: Sequence[bool] | None = None,  # per entry: check its layer sums while staging
        arena: torch.Tensor | None = None,  # devicecache arena (zero copy when every part lies in it)
        arrival=None,  # entries still arriving: ``arrival.wait(l)`` before layer l is read (``stream``)
    ) -> None:
        self.buf, self.staging, self.arrival = buf, staging, arrival
        build = dict(maps=staging.maps, check_layers=check_layers, arena=arena, pinned=staging.landed)
        self.plan = plan = LoadPlan.build(lm, parsed, offsets, buf.device, staging.max_bytes, **build)
        self.codec, self.direct, self.group = plan.codec, plan.direct, plan.group
        self.num_layers = lm.spec.num_layers
        self.zero_copy = plan.arena is not None
        """Every part resident in the device cache's arena: each layer is decoded from there on the
        compute stream at its ``ready``; no stager thread, no slots, no copies."""
        g = self.group
        self.depth = (
            0 if self.zero_copy else staging.slots(plan.slot_bytes, self.num_layers, not self.direct, g)
        )
        # Batched direct copies: per part its first layer's address, bytes per layer, offset in a
        # group buffer (a group's copy list is then three vector operations).
        self.batched = self.direct and staging.cuda and staging.batch is not None
        if self.batched:
            self._src0 = np.array([f.data_ptr() for f in plan.flat], dtype=np.uint64)
            self._nb = np.array([p.nbytes for p in plan.parts], dtype=np.uint64)
            self._dst0 = np.array([g * p.slot_offset for p in plan.parts], dtype=np.uint64)
        self.got: torch.Tensor | None = None  # [L, P, blocks, 2] partial sums (CUDA), reduced in check()
        if plan.checked and staging.cuda:
            blocks = kernels.checksum_blocks(plan.sum_longest, staging.device)
            shape = (self.num_layers, len(plan.checked), blocks, 2)
            self.got = torch.zeros(shape, dtype=torch.int64, device=staging.device)
        self.staged = 0  # layers staged so far (stager thread)
        self.batch_copies = 0  # direct copies queued as one batch call
        self.assembled = 0  # layers assembled (CUDA: made ready) so far (compute thread)
        self.host_seconds = 0.0  # stager time spent copying and checking
        self._cond = threading.Condition()
        self._signals = [threading.Event() for _ in range(self.num_layers)]
        self._error: BaseException | None = None
        self._stop = False
        self._started = False  # start() ran: the stager thread runs, or (inline) every step is queued
        self._thread: threading.Thread | None = None
        # CUDA events: per layer the end of its H2D copy (copy stream), its assembly's start and
        # end, and the end of its checksum, after which its slot may be reused (side stream); the
        # start of the first copy, for the copy span.
        self.copied: list[torch.cuda.Event | None] = [None] * self.num_layers
        self.asm: list[tuple | None] = [None] * self.num_layers
        self.freed: list[torch.cuda.Event | None] = [None] * self.num_layers
        self.first_copy: torch.cuda.Event | None = None

    # -- LayerSource ---------------------------------------------------------------------------
    def ready(self, layer: int) -> None:
        if self.zero_copy:  # every layer at the first ask: one launch, no host work between graphs
            if self.assembled == 0:
                kernels.rerotate_scatter_layers(
                    self.plan.layouts,
                    self.plan.arena,
                    self.plan.cos,
                    self.plan.sin,
                    self.buf[:, 0],
                    self.buf[:, 1],
                )
                self.assembled = self.num_layers
            return
        while self.assembled <= layer:
            self._assemble(self.assembled)

    def issued(self, layer: int) -> None:
        if not self.zero_copy:
            self.start()  # staging runs on its own thread; this only makes sure it started

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def inline(self) -> bool:
        """Direct copies on CUDA of entries that are all here (no ``arrival``): ``start()`` queues
        every step's copy, assembly and checksum on the calling thread, without waiting: the
        streams order slot reuse (each copy waits on the device for its slots' previous tenants)
        and no host work remains. A stager thread would only compete with the compute thread for
        the GIL (measured on the H200: it doubled the host time of the checks that overlap it)."""
        return self.staging.cuda and self.direct and self.arrival is None

    def start(self) -> None:
        if not self._started:
            self._started = True
            if (
                self.staging.cuda
            ):  # the side streams write buf and slots: after what the compute stream queued
                main = torch.cuda.current_stream(self.staging.device)
                self.staging.stream.wait_stream(main)
                self.staging.copy_stream.wait_stream(main)
            if self.inline:
                self._run()
                return
            self._thread = threading.Thread(target=self._run, name="chunkcache-stager", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop staging and wait for the stager and for every copy it queued (idempotent). Call
        before the entries' memory goes: direct copies read the map until they finish."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        if self.staging.cuda:
            self.staging.copy_stream.synchronize()
            self.staging.stream.synchronize()

    def _run(self) -> None:
        default_threads = torch.get_num_threads()
        try:
            # this thread's copies (OpenMP threads are per calling thread); restored below, since
            # torch also keeps the number as the default of threads that start later
            if not self.direct:  # (direct copies use no CPU threads; changing the number costs)
                torch.set_num_threads(self.staging.copy_threads)
            for first, stop in self._ranges():
                with self._cond:  # CPU: the slots' previous tenants must be assembled
                    while (
                        not self.staging.cuda and not self._stop and stop - 1 - self.depth >= self.assembled
                    ):
                        self._cond.wait()
                    if self._stop:
                        return
                if self.arrival is not None:  # streamed entries: their bytes of these layers are in
                    self.arrival.wait(stop - 1)
                if self.direct:
                    self._stage_direct(first, stop)
                else:
                    self._stage(first)
                for layer in range(first, stop):
                    self._signals[layer].set()
        except BaseException as e:  # handed to the compute thread, raised there
            self._error = e
        finally:
            if not self.direct:
                torch.set_num_threads(default_threads)
            for s in self._signals:
                s.set()

    # -- internals ----------------------------------------------------------------------------
    def _ranges(self) -> list[tuple[int, int]]:
        """The stager's steps: whole groups, except that layers 0 and 1 go alone first, so the
        first layers (the check layers of most policies) need not wait for a whole group; for
        entries still arriving the last group goes in halving steps too (only the last layer's
        copy and assembly then follow the link's last byte)."""
        g, n = self.group, self.num_layers
        if g == 1:
            return [(i, i + 1) for i in range(n)]
        head = [(0, 1), (1, 2), (2, min(g, n))] if g > 2 else [(0, 1), (1, min(g, n))]
        from chunkcache.stream import layer_steps

        return [r for r in head if r[0] < r[1] <= n] + layer_steps(g, n, g, self.arriving)

    @property
    def arriving(self) -> bool:
        """The entries are still arriving (``arrival``): the last group goes in halving steps, here
        and in the probe's graphs (``stream.layer_steps``). Not for entries that are all here:
        their copies are queued at once and end before the probe does (session 14, H200), and
        the same graphs then serve the store's path and the device cache's."""
        return self.arrival is not None

    def _stage_direct(self, first: int, stop: int) -> None:
        """Layers ``first .. stop - 1`` (within one group) straight from the registered map into
        their group buffer: one contiguous copy per part, all queued by one batch call where the
        runtime has it."""
        st = self.staging
        t0 = time.perf_counter()
        g = self.group
        gbuf = self._slot(first)
        j0, j1 = first % g, first % g + stop - first  # positions inside the group buffer

        def pieces():
            src = [f[first:stop].reshape(-1) for f in self.plan.flat]
            dst = [
                gbuf[g * p.slot_offset + j0 * p.nbytes : g * p.slot_offset + j1 * p.nbytes]
                for p in self.plan.parts
            ]
            return dst, src

        if not st.cuda:  # (CPU: only where a test hands it a registry; checked before use)
            torch._foreach_copy_(*pieces())
            for layer in range(first, stop):
                if self.plan.checked:
                    got = kernels.checksums(gbuf, self.plan.sum_tables[layer % g], self.plan.sum_longest)
                    self._compare(layer, got)
        else:
            with torch.cuda.stream(st.copy_stream):
                self._copy_start(first, stop)
                if not self._batch_copy(gbuf, first, stop, j0):
                    torch._foreach_copy_(*pieces(), non_blocking=True)
                self._copied(first, stop, gbuf)
        self.host_seconds += time.perf_counter() - t0
        self.staged += stop - first

    def _batch_copy(self, gbuf: torch.Tensor, first: int, stop: int, j0: int) -> bool:
        """Every part's layers ``first .. stop - 1`` in one ``cudaMemcpyBatchAsync`` call on the
        copy stream; False (nothing queued) when batching is off or the runtime refused it."""
        if not self.batched:
            return False
        n = np.uint64(stop - first)
        srcs = self._src0 + np.uint64(first) * self._nb
        dsts = np.uint64(gbuf.data_ptr()) + self._dst0 + np.uint64(j0) * self._nb
        if self.staging.batch(dsts, srcs, n * self._nb, self.staging.copy_stream.cuda_stream):
            self.batch_copies += 1
            return True
        self.batched = False  # refused: piece by piece from here on (views built on demand)
        return False

    def _slot(self, layer: int) -> torch.Tensor:
        """The 1-D buffer that holds ``layer``: its group's consecutive slots, flattened."""
        s0 = (layer - layer % self.group) % self.depth
        return self.staging.dev[s0 : s0 + self.group].view(-1)

    def _stage(self, layer: int) -> None:
        st = self.staging
        s = layer % self.depth
        t0 = time.perf_counter()
        if st.cuda and layer >= self.depth:
            self.copied[layer - self.depth].synchronize()  # the pinned slot's previous copy is done
        pieces = []
        for flat, pad in zip(self.plan.flat, self.plan.pads, strict=True):
            pieces.append(flat[layer])
            if pad is not None:
                pieces.append(pad)
        torch.cat(pieces, out=st.host[s, : self.plan.slot_bytes])
        if self.plan.checked and not st.cuda:  # CPU: check before the layer can be used
            self._compare(
                layer, kernels.checksums(st.host[s], self.plan.sum_tables[0], self.plan.sum_longest)
            )
        self.host_seconds += time.perf_counter() - t0
        if st.cuda:
            with torch.cuda.stream(st.copy_stream):
                # few calls per layer: each one that releases the GIL may wait to get it back
                self._copy_start(layer, layer + 1)
                st.dev[s, : self.plan.slot_bytes].copy_(st.host[s, : self.plan.slot_bytes], non_blocking=True)
                self._copied(layer, layer + 1, st.dev[s])
        self.staged += 1

    def _copy_start(self, first: int, stop: int) -> None:
        """Before copying layers ``first .. stop - 1`` (on the copy stream): wait until their
        slots' previous tenants were assembled and checked; mark the first copy's start (the copy
        span)."""
        copy_stream = self.staging.copy_stream
        if stop - 1 >= self.depth:  # in order: the last tenant's event implies the rest
            copy_stream.wait_event(self.freed[stop - 1 - self.depth])
        if first == 0:
            self.first_copy = torch.cuda.Event(enable_timing=True)
            self.first_copy.record(copy_stream)

    def _copied(self, first: int, stop: int, dev_slot: torch.Tensor) -> None:
        """On the copy stream, after the copy of layers ``first .. stop - 1`` into ``dev_slot``
        (their slots) was queued: its event; then, on the side stream behind it, one assembly
        launch per layer and one checksum launch for them all (the compute does not wait for it;
        the slots are free once it ran)."""
        end = torch.cuda.Event(enable_timing=stop == self.num_layers)
        end.record(self.staging.copy_stream)
        for layer in range(first, stop):
            self.copied[layer] = end
        side = self.staging.stream
        side.wait_event(end)
        with torch.cuda.stream(side):
            start = torch.cuda.Event(enable_timing=True)
            start.record(side)
            j0 = first % self.group
            kernels.rerotate_scatter_layers(  # the step's layers in one launch (where their tables
                self.plan.layouts[j0 : j0 + stop - first],  # are one series; else one a layer)
                self._slot(first),
                self.plan.cos,
                self.plan.sin,
                self.buf[first:stop, 0],
                self.buf[first:stop, 1],
            )
            done = torch.cuda.Event(enable_timing=True)
            done.record(side)
            for layer in range(first, stop):
                self.asm[layer] = (start, done)  # one span per step
            if self.plan.checked:
                table = self.plan.sum_tables[j0 : j0 + stop - first].view(-1, 2)
                out = self.got[first:stop].view(-1, *self.got.shape[2:])
                kernels.checksum_partials(dev_slot, table, out)
            freed = torch.cuda.Event()
            freed.record(side)
        for layer in range(first, stop):
            self.freed[layer] = freed

    def _compare(self, layer: int, got: torch.Tensor) -> None:
        bad = (got.cpu() != self.plan.expected[layer].cpu()).any(dim=-1).nonzero()
        if bad.numel():
            p = self.plan.checked[int(bad[0, 0])]
            raise CorruptEntryError(
                f"chunk {p.chunk} ({p.name}, layer {layer}) fails its checksum: the stored entry is damaged"
            )

    def check(self) -> None:
        """Raise ``CorruptEntryError`` if any staged layer's checksum differs from its entry's (CUDA:
        compares every layer's sums at once, one sync; on CPU the stager already checked)."""
        if self.got is None:
            return
        if any(ev is None for ev in self.copied):
            raise RuntimeError("check() before every layer was staged")
        torch.cuda.current_stream(self.staging.device).wait_stream(self.staging.stream)
        got = self.got.sum(dim=2)  # [L, P, 2]
        bad = (got != self.plan.expected).any(dim=-1)  # [L, P]
        if bool(bad.any()):
            for layer in range(self.num_layers):
                self._compare(layer, got[layer])

    def _rerotate(self, layer: int) -> None:
        """CPU: assemble one staged layer (CUDA assembles a step at a time in ``_copied``; a zero-copy
        loader all layers at once in ``ready``)."""
        layout, src = self.plan.layouts[layer % self.group], self._slot(layer)
        kernels.rerotate_scatter_packed(
            layout, src, self.plan.cos, self.plan.sin, self.buf[layer, 0], self.buf[layer, 1]
        )

    def _assemble(self, layer: int) -> None:
        self.start()
        self._signals[layer].wait()
        if self._error is not None:
            raise self._error
        if self.staging.cuda:  # assembled on the side stream: the compute stream waits for it there
            torch.cuda.current_stream(self.staging.device).wait_event(self.asm[layer][1])
            self.assembled += 1
            return
        self._rerotate(layer)
        with self._cond:
            self.assembled += 1
            self._cond.notify_all()

    def seconds(self) -> dict[str, float]:
        """Load-side totals (call after the fusion synchronised): stager host time (copy + check),
        the span from the first H2D copy to the last (side stream), the device time of the assembly
        kernels (main stream).
        They overlap the compute; the fusion's stage times show what was not hidden."""
        out = {"stage_host": self.host_seconds, "h2d": 0.0, "assemble": 0.0}
        if self.staging.cuda:
            if self.first_copy is not None and self.copied[-1] is not None:  # span: first copy to last
                self.copied[-1].synchronize()
                out["h2d"] = self.first_copy.elapsed_time(self.copied[-1]) / 1e3
            spans = {id(a): (a, b) for a, b in filter(None, self.asm)}.values()  # (a step's layers share one)
            out["assemble"] = sum(a.elapsed_time(b) / 1e3 for a, b in spans)
        return out


class _PrefixByLayer:
    """The fusion's ``LayerSource`` when the prefix KV is still being computed layer by layer on
    another stream (``fuse_entries``' per-layer ``prefix_ready``): before layer ``l`` is first
    read, the current stream waits for ``events[l]`` and layer ``l``'s prefix rows are written;
    then the loader's ``ready``. Every other row of the layer is the loader's."""

    def __init__(self, loader: LayerLoader, buf: torch.Tensor, prefix_kv: torch.Tensor, events) -> None:
        self.loader, self.buf, self.prefix_kv, self.events = loader, buf, prefix_kv, list(events)
        self.placed = 0  # layers whose prefix rows are written

    @property
    def arriving(self) -> bool:
        return self.loader.arriving

    def ready(self, layer: int) -> None:
        p = self.prefix_kv.shape[3]
        while self.placed <= layer:
            li = self.placed
            self.events[li].wait()
            self.buf[li, :, :, :p] = self.prefix_kv[li]
            self.placed += 1
        self.loader.ready(layer)

    def issued(self, layer: int) -> None:
        self.loader.issued(layer)


@torch.no_grad()
def fuse_entries(
    lm: LoadedModel,
    prefix_kv: torch.Tensor,  # [L, 2, H, P, D] exact prefix KV
    entries: Sequence,  # raw stored entries (bytes or zero-copy views), one per chunk, in prompt order
    prefix_ids: list[int],
    suffix_ids: list[int],
    config: FuseConfig | None = None,
    staging: Staging | None = None,
    verify: bool = True,
    inspect: Callable[[int, dict, dict[str, torch.Tensor]], None] | None = None,
    resident: Sequence[tuple[dict, dict[str, torch.Tensor]] | None] | None = None,
    arena: torch.Tensor | None = None,
    run: Callable[[FuseJob], FuseResult] | None = None,
    preload: bool = True,
    arrival=None,
    prefix_ready: torch.cuda.Event | list | tuple | None = None,
) -> FuseResult:
    """``fuse.fuse_kv`` over stored entries, loading layer by layer behind the compute.

    Same selection, mask and outputs as ``fuse_kv`` on the decoded chunks (lossy codecs differ by
    one rounding: the kernel decodes and rotates in fp32 and rounds once). ``verify`` (the default)
    checks every byte that is used against the entry's checksums: the token sections' crc32 up
    front, each codec part's layers where they land (``LayerLoader``; on a GPU a kernel on the
    copy stream, overlapped with the compute), and an entry written before per-layer sums existed
    whole, up front. A damaged entry raises
    ``CorruptEntryError`` and no result is returned; it is never used silently. When: the header,
    section table and token sections before anything is staged; a codec part's layer on CPU as it
    is staged (before use), on CUDA after the fusion ran (``LayerLoader.check``, one sync at the
    end: the damaged layer may have been computed with, but that result is discarded).
    ``verify=False`` is only for a store checked by ``chunkcache verify`` since its last write.
    ``inspect(i, header, parts)`` is called for every entry once its header and token sections
    are checked and before anything is staged (the engine checks key inputs and token ids there;
    it may raise). ``resident``: per entry, its ``(header, parts)`` already verified and kept on
    the device (``devicecache.DeviceCache``; that entry's raw value may be None): no parsing and
    no checksums for it (it was checked when admitted), ``inspect`` still runs; with the cache's
    ``arena`` and every entry resident, nothing is copied (``LayerLoader.zero_copy``). ``run(job)``
    runs the fusion (default ``fuse.run_job``: alone; the engine's batching hands the job to
    ``batch.Batcher.run``, which fuses it with others' while this thread waits). ``preload``
    (the default): place the job's geometry and start the loader as soon as the entries' headers
    are parsed, so their layers stream in while the entries' token sections and ``inspect`` are
    checked and while the job waits for its batch (False: the loader starts at the fusion's first
    layer). A check that fails then stops the loader before anything is computed. ``arrival``:
    the entries are still arriving (``stream.LayerStream``: headers and small sections in, layers
    not yet): the loader stages layer ``l`` after ``arrival.wait(l)``, so the fusion runs behind
    the link, layer by layer;
    an entry without per-layer sums must have arrived whole. ``prefix_ready`` (CUDA): ``prefix_kv``
    is still being computed on another stream (an adaptive fusion's front) and is done at this
    event; the loader starts before the compute stream waits for it, so layers that arrive
    meanwhile are copied and assembled while it runs. ``prefix_ready`` may also be one event per
    layer (``encode_exact``'s ``on_layer``; any objects whose ``wait()`` makes the current stream
    wait for that layer): then layer ``l``'s prefix rows are written just before the fusion first
    reads layer ``l`` (``_PrefixByLayer``), so the probe runs behind the front layer by layer as it
    runs behind the link, instead of waiting for the whole front. ``stats["seconds"]`` gains
    ``read`` (headers parsed, entries checked), ``stage_host``, ``h2d`` and ``assemble``
    (overlapped work, see ``LayerLoader.seconds``).
    """
    if not suffix_ids:
        raise ValueError("the question suffix is empty: nothing to generate from")
    spec = lm.spec
    timer = StageTimer(lm.device)
    t0 = time.perf_counter()
    p, ns = prefix_kv.shape[3], len(suffix_ids)
    lengths, token_ids, scores = [], [], []
    resident = list(resident) if resident is not None else [None] * len(entries)
    if len(resident) != len(entries):
        raise ValueError(f"{len(entries)} entries but {len(resident)} resident slots")
    parsed = [  # zero-copy views, headers checked
        r if r is not None else unpack_parts(e, verify=False) for e, r in zip(entries, resident, strict=True)
    ]
    # per-layer sums are checked where layers land; older entries are checked whole, in checks()
    check_layers = [verify and resident[i] is None and has_layer_sums(h) for i, (h, _) in enumerate(parsed)]

    def checks() -> None:
        """Every entry's token sections (or whole payload) and the caller's ``inspect``: after the
        loader started (its copies overlap them), always before the fusion runs."""
        if verify:
            for i, (e, (header, _)) in enumerate(zip(entries, parsed, strict=True)):
                if resident[i] is not None:
                    continue  # verified when it was admitted
                if check_layers[i]:
                    verify_small_sections(e, header)
                else:
                    verify_payload(e, header)
        if inspect is not None:
            for i, (header, parts) in enumerate(parsed):
                inspect(i, header, parts)

    for header, parts in parsed:
        lengths.append(int(header["num_tokens"]))
        token_ids.append(parts["token_ids"])
        scores.append(parts.get("token_scores"))
    n = p + sum(lengths) + ns
    if len(prefix_ids) != p:
        raise ValueError(f"prefix KV covers {p} tokens but prefix_ids has {len(prefix_ids)}")
    st = staging or Staging(lm.device)
    graphs = st.graphs if st.cuda else None
    if graphs is not None:  # persistent (the graphs read it), padded; the result gets a copy
        buf = graphs.kv_buffer(lm, n)
    else:
        buf = torch.empty(
            spec.num_layers, 2, spec.kv_heads, n, spec.head_dim, dtype=lm.dtype, device=lm.device
        )
    by_layer = isinstance(prefix_ready, (list, tuple))  # (one event per layer; else one for all)
    if by_layer and len(prefix_ready) != spec.num_layers:
        raise ValueError(f"prefix_ready has {len(prefix_ready)} events for {spec.num_layers} layers")
    if prefix_ready is None:
        buf[:, :, :, :p] = prefix_kv
    buf[:, :, :, n - ns : n] = 0
    offsets = [p + sum(lengths[:i]) for i in range(len(lengths))]
    try:
        loader = LayerLoader(lm, parsed, buf, offsets, st, check_layers, arena, arrival)
    except Exception:
        checks()  # a foreign or damaged entry: its own error (ModelMismatchError, ...) first
        raise
    source = _PrefixByLayer(loader, buf, prefix_kv, prefix_ready) if by_layer else loader
    ids = torch.cat(
        [torch.tensor(list(prefix_ids), dtype=torch.long)]
        + [t.to(torch.long) for t in token_ids]
        + [torch.tensor(list(suffix_ids), dtype=torch.long)]
    )[None]
    token_scores = None
    if lengths and all(s is not None for s in scores):
        token_scores = torch.cat([s.float() for s in scores]).to(lm.device)
    config = config or FuseConfig()
    exact = exact_chunks(p, lengths, [int(h["base_pos"]) for h, _ in parsed])
    job = FuseJob(
        buf,
        ids,
        p,
        lengths,
        token_scores,
        config,
        source=source,
        timer=timer,
        graphs=graphs,
        exact_chunks=exact,
    )
    try:
        if by_layer:  # the loader starts now; each layer's prefix rows at its first ``ready``
            if not loader.zero_copy:
                loader.start()
            if buf.is_cuda:
                prefix_kv.record_stream(torch.cuda.current_stream(buf.device))
        elif prefix_ready is not None:
            if not buf.is_cuda:
                raise ValueError("prefix_ready is a CUDA event: only for a fusion on a GPU")
            # the loader's copies and assembly (chunk rows of buf) need not wait for the prefix's
            # stream; the compute stream does, before the prefix rows are written and read
            if not loader.zero_copy:
                loader.start()
            here = torch.cuda.current_stream(buf.device)
            here.wait_event(prefix_ready)
            prefix_kv.record_stream(here)  # (made on the other stream, read on this one)
            buf[:, :, :, :p] = prefix_kv
        elif preload and not loader.zero_copy:
            # The job's small uploads (token ids, chunk maps) first, then the layers stream in
            # while the checks below run and the job waits (for its batch): a synchronous
            # host-to-device copy queued behind the loader's copies would wait for all of them
            # (the copy engine runs them in order: at 8K int8 that held the compute stream idle
            # for 11 ms on the H100). Otherwise the loader starts at the fusion's first ``ready``.
            job.place()
            loader.start()
        checks()
        t_read = time.perf_counter() - t0
        timer.mark("read")
        if run is not None and buf.is_cuda:  # run elsewhere: there, wait for what was queued here
            job.ready = torch.cuda.Event()
            job.ready.record()
        res = run_job(lm, job) if run is None else run(job)
        loader.check()  # a damaged layer raises here: the result is never returned
    finally:
        loader.close()
    secs = res.stats["seconds"]
    load = loader.seconds()
    secs["read_host"] = t_read
    secs["stage_host"] = load["stage_host"]
    secs["h2d"] = load["h2d"]
    secs["assemble"] = load["assemble"]
    res.stats["codec"] = loader.codec
    res.stats["direct_copies"] = loader.direct
    res.stats["zero_copy"] = loader.zero_copy
    res.stats["pipeline_depth"] = loader.depth
    res.stats["copy_group"] = loader.group
    res.stats["batched_copies"] = loader.batch_copies
    return res
