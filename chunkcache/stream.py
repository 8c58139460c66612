"""Entries that arrive layer by layer from a slow tier, so that fusion starts on the first layers
while the link still carries the last ones.

A whole-entry fetch makes the fusion wait for every byte of every chunk (TTFT = link + fusion).
An entry's codec parts are layer-major (``format``: every part ``[L, ...]``), so a reader can ask
for the same layers of every part of every entry in turn::

    entry:  | prefix, header | token ids | scores | layer sums | part A: layer 0 .. L-1 | part B: 0 .. L-1 |
    reads:    1. heads of all entries (prefix, header, the small sections): checked, then ``heads`` set
              2. layers 0 .. g-1 of every part of every entry, then g .. 2g-1, ...: ``wait(l)`` returns
                 once layer l of every entry is in

Each entry lands in a buffer of its full size (zeros between the spans read), so the
pipelined loader (``pipeline.fuse_entries(..., arrival=stream)``) reads it as it reads any entry
and waits on ``wait(l)`` before staging layer ``l``. Nothing is trusted for arriving: the header
and the small sections are checked as always, each layer against its stored sums where it lands
(``pipeline.LayerLoader``), and an entry without per-layer sums arrives whole with its head. The
reads go through ``store.span_reader`` (``store.base.SpanReader``): one round trip per step on
Redis, each piece once; other stores read whole entries at the first step.

Where the bytes land is the caller's ``landing(sizes)`` (default: fresh zeroed arrays, which the
kernel zeroes lazily). A GPU fusion hands its staging's page-locked arena
(``pipeline.Staging.landing``): reused from query to query, so no page is faulted in and nothing
is zeroed while the front is launched (a ``bytearray`` of the entries' size is zeroed with the
GIL held: 0.5 GB of int8 entries held the launching thread for ~0.2 s on the H200 host), and the
loader copies straight from it to the device (no pinned staging copy).

What it knows: the entry layout (``format``). What it does not: codecs, the fusion, the store's
wire protocol.

    stream = LayerStream(store, keys).start()
    entries = stream.entries_when_ready()          # after the heads; raises on a miss or damage
    res = fuse_entries(lm, prefix_kv, entries, prefix_ids, suffix_ids, cfg, staging, arrival=stream)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from chunkcache.errors import CorruptEntryError
from chunkcache.format import PREFIX_BYTES, head_spans, header_span, part_layer_spans, read_header

__all__ = ["LayerStream", "layer_steps"]


class LayerStream:
    """A thread that reads ``keys`` from ``store`` heads first, then layer by layer (see the module
    docstring). ``step_bytes``: about how many bytes one step (one read call) moves; at least
    one layer. ``landing(sizes)``: one writable buffer of at least each size (see the module
    docstring). Times (``time.perf_counter``) and byte counts of what arrived are kept for the
    caller's rates."""

    MAX_LAYERS = 8
    """Most layers one step reads (the pipelined loader copies and the fusion's graphs run groups
    of 8 layers: a later layer would not be used sooner)."""

    def __init__(
        self,
        store,
        keys: Sequence[str],
        step_bytes: int = 64 << 20,
        landing: Callable[[list[int]], list] | None = None,
    ) -> None:
        self.store, self.keys, self.step_bytes = store, list(keys), step_bytes
        self.landing = landing or _fresh
        self.entries: list = []
        self.headers: list[dict] = []
        self.layers = 0
        """Layers of every entry in so far."""
        self.num_layers = 0
        self.nbytes = 0
        """Bytes read so far."""
        self.t_start = self.t_heads = self.t_last = 0.0
        """When the reading started, when the heads were in, when the last layer was in."""
        self._cond = threading.Condition()
        self._heads = threading.Event()
        self._error: BaseException | None = None
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> LayerStream:
        self.t_start = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="chunkcache-stream", daemon=True)
        self._thread.start()
        return self

    def entries_when_ready(self) -> list:
        """The entry buffers once every head is in (re-raises the reader's error: a missing entry's
        KeyError, a damaged header's or piece's CorruptEntryError, a store fault)."""
        self._heads.wait()
        if self._error is not None:
            raise self._error
        return self.entries

    def wait(self, layer: int) -> None:
        """Block until layer ``layer`` of every entry is in (the loader's ``arrival``)."""
        with self._cond:
            while self.layers <= layer and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        """Stop reading (after the step under way) and wait for the reader thread."""
        self._stop = True
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        reader = None
        try:
            reader = self.store.span_reader(self.keys)
            n = len(self.keys)
            first = reader.read([(i, 0, PREFIX_BYTES) for i in range(n)])
            spans = [header_span(b) for b in first]
            raw = reader.read([(i, 0, spans[i]) for i in range(n)])
            headers = [read_header(b, whole=False) for b in raw]  # every field checked
            sizes = [h["payload_offset"] + h["payload_nbytes"] for h in headers]
            entries = [
                np.frombuffer(b, dtype=np.uint8)[:n] for b, n in zip(self.landing(sizes), sizes, strict=True)
            ]
            for h, buf, b in zip(headers, entries, raw, strict=True):
                _zero_gaps(buf, h, len(b))
                buf[: len(b)] = np.frombuffer(b, dtype=np.uint8)
                self.nbytes += len(b)
            want = [(i, a, b) for i, h in enumerate(headers) for a, b in head_spans(h)]
            self._place(entries, want, reader.read(want))
            self.entries, self.headers = entries, headers
            self.num_layers = max(h["kv_shape"][0] for h in headers) if headers else 0
            self.t_heads = time.perf_counter()
            self._heads.set()
            per_layer = sum(b - a for h in headers for a, b in part_layer_spans(h, range(0, 1)))
            # a step of several layers: one span per part of every entry whatever the layers, so
            # the Python work per byte shrinks (at 8B/8K one layer a step kept the reader busy
            # enough to stall the front's launching thread); at most the loader's copy group
            g = max(1, min(self.MAX_LAYERS, self.step_bytes // max(per_layer, 1)))
            # A step's bytes are placed on a second thread while this one waits for the next
            # step's (socket reads and the throttle release the GIL): copy and transfer overlap.
            # Placements run in order, one at a time; ``layers`` moves only after a step is placed.
            with ThreadPoolExecutor(1, thread_name_prefix="chunkcache-place") as placer:
                placed = None
                for l0, l1 in layer_steps(0, self.num_layers, g):
                    if self._stop:  # closed early (the fusion gave up): the rest is not needed
                        raise RuntimeError("the stream was closed before every layer arrived")
                    want = [
                        (i, a, b)
                        for i, h in enumerate(headers)
                        for a, b in part_layer_spans(h, range(l0, min(l1, h["kv_shape"][0])))
                    ]
                    got = reader.read(want)
                    if placed is not None:
                        placed.result()  # (raises a placement's error here)
                    placed = placer.submit(self._place_step, entries, want, got, l1)
                if placed is not None:
                    placed.result()
        except BaseException as e:  # handed to the waiting threads, raised there
            with self._cond:
                self._error = e
                self._cond.notify_all()
        finally:
            self._heads.set()
            if reader is not None:
                reader.close()

    def _place_step(self, entries: list, want: list, got: list, layers: int) -> None:
        self._place(entries, want, got)
        with self._cond:
            self.layers = layers
            self.t_last = time.perf_counter()
            self._cond.notify_all()

    def _place(self, entries: list, want: list[tuple[int, int, int]], got: list) -> None:
        for (i, a, b), v in zip(want, got, strict=True):
            if len(v) != b - a:  # a truncated entry
                raise CorruptEntryError(f"entry {self.keys[i]}: {len(v)} bytes at {a}, {b - a} expected")
            # numpy copies outside the GIL, so the reader thread runs meanwhile (a bytearray
            # slice assignment would hold it for the whole copy)
            entries[i][a:b] = np.frombuffer(v, dtype=np.uint8)
            self.nbytes += b - a


def layer_steps(first: int, stop: int, size: int, fine_tail: bool = True) -> list[tuple[int, int]]:
    """Ranges of ``size`` layers covering ``first .. stop - 1``; with ``fine_tail`` the last
    ``size`` in halving steps (8 -> 4, 2, 1, 1). For layers that arrive over a link: whatever waits
    for a whole range (a read's placement, a copy group, a CUDA graph of the probe) then waits for
    the link's last byte with one layer only. The one rule for the stream's reads, the loader's
    copies and the probe's graphs."""
    tail = max(first, stop - size) if fine_tail else stop
    out = [(a, min(a + size, tail)) for a in range(first, tail, size)]
    at = tail
    while at < stop:
        step = max(1, (stop - at) // 2)
        out.append((at, at + step))
        at += step
    return out


def _fresh(sizes: list[int]) -> list[np.ndarray]:
    """Zeroed arrays (``calloc``: fresh pages, zeroed by the kernel where first written, outside
    the GIL; ``bytearray(n)`` zeroes them itself with the GIL held)."""
    return [np.zeros(n, dtype=np.uint8) for n in sizes]


def _zero_gaps(buf: np.ndarray, header: dict, head: int) -> None:
    """Zero the bytes of ``buf`` that no read fills (the pads between sections; ``head``: the
    prefix and header read first), so a reused landing buffer holds exactly the stored entry once
    every layer is in."""
    layers = range(header["kv_shape"][0])
    spans = sorted([(0, head), *head_spans(header), *part_layer_spans(header, layers)])
    at = 0
    for a, b in spans:
        if a > at:
            buf[at:a] = 0
        at = max(at, b)
    buf[at:] = 0
