"""Device-resident hot entries: verified chunk entries kept in GPU memory, least recently used out.

A fast-path fusion copies every stored entry from the host map to the device (at 8K tokens of
the Llama-3-8B shape in int8, 0.5 GB over PCIe) and parses its header first; under a serving
workload the same popular chunks come back again and again. ``DeviceCache`` keeps the codec parts
of entries that a fusion has just used, and checked, on the device, in the stored (encoded)
format, inside one preallocated byte arena of ``max_bytes``. A later fusion takes those entries
from here: no store read, no header parse, no host-to-device copy. When every entry of a fusion
is resident, the loader decodes each layer straight out of the arena (one launch per layer, no
copy, no stager thread); otherwise resident entries are copied device to device beside the
others. Decode, rotation, selection and recompute are the same code on the same bytes, so the
result is bit-identical to the fusion from the store.

Invariants:
- an entry is admitted only after a fusion verified it: its header and token sections (crc32),
  its key inputs and token ids (``engine._check_entry``) and every codec layer's checksum
  (``LayerLoader.check``); the copy is taken from the same host bytes, inside the same views;
- keys are content hashes (token ids, model, dtype, codec, settings), so a resident entry stays
  valid for its key whatever later happens to the store's copy (evicted, replaced, damaged);
- an entry handed out by ``acquire`` is pinned until ``release``: it is never evicted while a
  fusion may still queue reads of it; ``release`` records an event on the caller's stream after
  those reads, and the arena region of an evicted entry is reused only once that event passed.

What it does not know: stores, the entry format beyond ``(header, parts)``, fusion.

    cache = DeviceCache(torch.device("cuda"), max_bytes=8 << 30)
    cache.admit(key, header, parts, codec_parts)   # parts: format.unpack_parts views (host)
    hits = cache.acquire(keys)                      # [(header, arena views) or None]
    ...; cache.release(keys, hits)                  # after the reads were queued
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from chunkcache import checks

__all__ = ["DeviceCache"]

_ALIGN = 256  # byte alignment of every part in the arena (dtype views, vector loads)


@dataclass
class _Resident:
    header: dict
    parts: dict[str, torch.Tensor]  # codec parts: views of the arena; token ids etc.: host copies
    offset: int  # its region of the arena
    nbytes: int
    pins: int = 0
    last_use: object = field(default=None)  # torch.cuda.Event after the last queued read, or None


class DeviceCache:
    """A byte-budgeted LRU of ``(header, parts)`` with the codec parts in one device arena; thread-safe."""

    def __init__(self, device: torch.device | str, max_bytes: int) -> None:
        self.max_bytes = checks.nonnegative_int(max_bytes, "device_cache_bytes")
        self.device = torch.device(device)
        self.arena: torch.Tensor | None = None
        """[max_bytes] uint8 on ``device`` (allocated at the first admission)."""
        self._entries: OrderedDict[str, _Resident] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.admitted = self.evicted = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Arena bytes held by resident entries (their parts, alignment included)."""
        return self._bytes

    def acquire(self, keys: Sequence[str]) -> list[tuple[dict, dict[str, torch.Tensor]] | None]:
        """The resident ``(header, parts)`` of each key (now most recently used, and pinned until
        ``release``), or None."""
        out = []
        with self._lock:
            for k in keys:
                rec = self._entries.get(k)
                if rec is None or not rec.parts:  # absent, or being admitted by another thread
                    self.misses += 1
                    out.append(None)
                else:
                    self._entries.move_to_end(k)
                    rec.pins += 1
                    self.hits += 1
                    out.append((rec.header, rec.parts))
        return out

    def holds(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is resident now (nothing pinned, nothing counted: a hint, which
        ``acquire`` may contradict a moment later)."""
        with self._lock:
            return [k in self._entries for k in keys]

    def release(self, keys: Sequence[str], acquired: Sequence) -> None:
        """Unpin what ``acquire`` handed out for ``keys``: call once every read of them is queued
        on the current stream (an event there guards their regions' reuse)."""
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        with self._lock:
            for k, a in zip(keys, acquired, strict=True):
                rec = self._entries.get(k)
                if a is not None and rec is not None and rec.pins > 0:
                    rec.pins -= 1
                    rec.last_use = event

    def admit(
        self, key: str, header: dict, parts: dict[str, torch.Tensor], codec_parts: Sequence[str]
    ) -> bool:
        """Keep a verified entry: its ``codec_parts`` copied into the arena (on the current stream,
        synchronised before returning, so the host views may go right after), the other sections
        (token ids, scores) copied on the host. True if it was admitted now; False if it was
        resident already or no region can be freed for it."""
        sizes = [parts[n].numel() * parts[n].element_size() for n in codec_parts]
        nbytes = sum(-(-s // _ALIGN) * _ALIGN for s in sizes)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return False
            offset = self._region(nbytes)
            if offset is None:
                return False
            if self.arena is None:
                self.arena = torch.empty(self.max_bytes, dtype=torch.uint8, device=self.device)
            # reserved now (pinned: not evictable, not handed out: its parts are not written yet)
            rec = _Resident(header={}, parts={}, offset=offset, nbytes=nbytes, pins=1)
            self._entries[key] = rec
            self._bytes += nbytes
        kept = {n: t.clone() for n, t in parts.items() if n not in codec_parts and n != "layer_sums"}
        off = offset
        for n, size in zip(codec_parts, sizes, strict=True):
            t = parts[n]
            region = self.arena[off : off + size]
            region.copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
            kept[n] = region.view(t.dtype).view(t.shape)
            off += -(-size // _ALIGN) * _ALIGN
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the host views may go next
        with self._lock:
            rec.header, rec.parts, rec.pins = dict(header), kept, 0
            self.admitted += 1
        return True

    def _region(self, nbytes: int) -> int | None:
        """(lock held) A free arena offset for ``nbytes``, evicting least recently used unpinned
        entries until one fits (first fit); None if it cannot."""
        if nbytes > self.max_bytes:
            return None
        while True:
            start = 0
            for rec in sorted(self._entries.values(), key=lambda r: r.offset):
                if rec.offset - start >= nbytes:
                    return start
                start = max(start, rec.offset + rec.nbytes)
            if self.max_bytes - start >= nbytes:
                return start
            victim = next((k for k, r in self._entries.items() if r.pins == 0), None)
            if victim is None:
                return None
            rec = self._entries.pop(victim)
            self._bytes -= rec.nbytes
            self.evicted += 1
            if rec.last_use is not None:
                rec.last_use.synchronize()  # reads of it queued by earlier fusions are done

    def drop(self, key: str) -> None:
        with self._lock:
            rec = self._entries.get(key)
            if rec is not None and rec.pins == 0:
                del self._entries[key]
                self._bytes -= rec.nbytes
                if rec.last_use is not None:
                    rec.last_use.synchronize()

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "admitted": self.admitted,
                "evicted": self.evicted,
            }
