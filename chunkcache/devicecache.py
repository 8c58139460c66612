"""Device-resident hot entries: verified chunk entries kept in GPU memory, least recently used out.

A fast-path fusion copies every stored entry from the host map to the device (at 8K tokens of
the Llama-3-8B shape in int8, 0.5 GB over PCIe) and parses its header first; under a serving
workload the same popular chunks come back again and again. ``DeviceCache`` keeps the codec parts
of entries that a fusion has just used, and checked, on the device, in the stored (encoded)
format, under a byte budget. A later fusion takes those entries from here: no store read, no
header parse, no host-to-device copy; the loader's copies become device-to-device and every
other step (decode, rotation, selection, recompute) is the same code on the same bytes, so the
result is bit-identical to the fusion from the store.

Invariants:
- an entry is admitted only after a fusion verified it: its header and token sections (crc32),
  its key inputs and token ids (``engine._check_entry``) and every codec layer's checksum
  (``LayerLoader.check``); the copy is taken from the same host bytes, inside the same views;
- keys are content hashes (token ids, model, dtype, codec, settings), so a resident entry stays
  valid for its key whatever later happens to the store's copy (evicted, replaced, damaged);
- the resident tensors are never written; a fusion holds references to the ones it reads until
  its loader closed (which waits for its copies), so eviction never frees memory in use.

What it does not know: stores, the entry format beyond ``(header, parts)``, fusion.

    cache = DeviceCache(torch.device("cuda"), max_bytes=8 << 30)
    cache.admit(key, header, parts)     # parts: format.unpack_parts views (host)
    hit = cache.get(key)                # (header, device parts) or None
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from chunkcache import checks

__all__ = ["DeviceCache"]


class DeviceCache:
    """A byte-budgeted LRU of ``(header, parts)`` with the codec parts on ``device``; thread-safe."""

    def __init__(self, device: torch.device | str, max_bytes: int) -> None:
        self.max_bytes = checks.nonnegative_int(max_bytes, "device_cache_bytes")
        self.device = torch.device(device)
        self._entries: OrderedDict[str, tuple[dict, dict[str, torch.Tensor], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.admitted = self.evicted = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Device bytes held by resident entries."""
        return self._bytes

    def get_many(self, keys: Sequence[str]) -> list[tuple[dict, dict[str, torch.Tensor]] | None]:
        """The resident ``(header, parts)`` of each key (most recently used now), or None."""
        out = []
        with self._lock:
            for k in keys:
                rec = self._entries.get(k)
                if rec is None:
                    self.misses += 1
                    out.append(None)
                else:
                    self._entries.move_to_end(k)
                    self.hits += 1
                    out.append((rec[0], rec[1]))
        return out

    def admit(
        self, key: str, header: dict, parts: dict[str, torch.Tensor], codec_parts: Sequence[str]
    ) -> bool:
        """Keep a verified entry: its ``codec_parts`` copied to the device (on the current stream,
        synchronised before returning, so the host views may go right after), the other sections
        (token ids, scores) copied on the host. False when it cannot fit the budget at all."""
        nbytes = sum(parts[n].numel() * parts[n].element_size() for n in codec_parts)
        if nbytes > self.max_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
        kept = {n: t.clone() for n, t in parts.items() if n not in codec_parts and n != "layer_sums"}
        dev = {n: parts[n].to(self.device, non_blocking=True) for n in codec_parts}
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the host views may go next
        kept.update(dev)
        with self._lock:
            if key in self._entries:  # another thread admitted it meanwhile
                return True
            while self._entries and self._bytes + nbytes > self.max_bytes:
                _, (_, _, b) = self._entries.popitem(last=False)
                self._bytes -= b
                self.evicted += 1
            self._entries[key] = (dict(header), kept, nbytes)
            self._bytes += nbytes
            self.admitted += 1
        return True

    def drop(self, key: str) -> None:
        with self._lock:
            rec = self._entries.pop(key, None)
            if rec is not None:
                self._bytes -= rec[2]

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
