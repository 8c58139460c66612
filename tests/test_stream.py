"""Entries streamed layer by layer (``stream.LayerStream``) over a store's span reader: heads
first, then the same layers of every part of every entry in turn; what lands equals the stored
bytes; a missing or damaged entry is an error, never data; and the fusion over a stream equals
the fusion over whole entries. CPU, tiny shapes; a throttled store stands in for a slow link."""

from __future__ import annotations

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model
from store_worker import entry

from chunkcache.adaptive import AdaptiveConfig
from chunkcache.engine import ChunkCache
from chunkcache.errors import CorruptEntryError
from chunkcache.format import head_spans, part_layer_spans, read_header
from chunkcache.store import MemoryStore
from chunkcache.store.base import SpanReader
from chunkcache.store.throttled import ThrottledStore
from chunkcache.stream import LayerStream


class Recording(MemoryStore):
    """Records every span read call (one list of spans per call)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[tuple[int, int, int]]] = []

    def span_reader(self, keys):
        store = self

        class Reader(SpanReader):
            def read(self, spans):
                store.calls.append(list(spans))
                return super().read(spans)

        return Reader(self, keys)


def test_heads_first_then_layer_by_layer_and_the_bytes_are_the_stored_ones():
    store = Recording()
    items = [entry(i, codec=c, tokens=40 + 9 * i, layers=5) for i, c in enumerate(["int8", "int2m"])]
    store.put_many(items)
    stream = LayerStream(store, [k for k, _ in items], step_bytes=1).start()  # one layer a step
    entries = stream.entries_when_ready()
    stream.wait(4)
    stream.close()
    for (_, v), got in zip(items, entries, strict=True):
        assert bytes(got) == v  # header, small sections, parts and the zero pads between them
    headers = [read_header(v) for _, v in items]
    heads = [(i, a, b) for i, h in enumerate(headers) for a, b in head_spans(h)]
    assert store.calls[2] == heads and len(store.calls) == 3 + 5
    for layer, call in enumerate(store.calls[3:]):
        one = range(layer, layer + 1)
        assert call == [(i, a, b) for i, h in enumerate(headers) for a, b in part_layer_spans(h, one)]
    # what moved: the heads and every layer of every part, not the pads between sections
    parts = sum(b - a for h in headers for a, b in part_layer_spans(h, range(5)))
    assert stream.layers == 5 and stream.nbytes == sum(b - a for _, a, b in store.calls[1] + heads) + parts
    # larger steps: several layers a step (one span per part of every entry), at most 8, the
    # last 8 in halving steps (the last step is placed soon after the link's last byte)
    store.calls.clear()
    k, v = entry(9, codec="int2m", tokens=24, layers=20)
    store.put(k, v)
    big = LayerStream(store, [k]).start()
    big.wait(19)
    big.close()
    h = read_header(v)
    steps = [(0, 8), (8, 12), (12, 16), (16, 18), (18, 19), (19, 20)]
    assert bytes(big.entries[0]) == v and len(store.calls) == 3 + len(steps)
    for call, (a, b) in zip(store.calls[3:], steps, strict=True):
        assert call == [(0, x, y) for x, y in part_layer_spans(h, range(a, b))]


def test_layer_steps_cover_every_layer_once_and_end_fine_over_a_link():
    """The one grouping rule of the stream's reads, the loader's copies and the probe's graphs:
    groups of ``size``; over a link the last ``size`` layers in halving steps."""
    from chunkcache.stream import layer_steps

    assert layer_steps(0, 32, 8) == [(0, 8), (8, 16), (16, 24), (24, 28), (28, 30), (30, 31), (31, 32)]
    assert layer_steps(3, 32, 8, fine_tail=False) == [(3, 11), (11, 19), (19, 27), (27, 32)]  # as before
    assert layer_steps(0, 5, 1) == [(i, i + 1) for i in range(5)] and layer_steps(7, 7, 8) == []
    for first, stop, size in [(0, 30, 8), (2, 17, 3), (0, 1, 8), (5, 40, 16)]:
        for fine in (True, False):
            steps = layer_steps(first, stop, size, fine)
            assert [a for a, _ in steps] == [first] + [b for _, b in steps[:-1]] and steps[-1][1] == stop
            assert all(0 < b - a <= size for a, b in steps) and (not fine or steps[-1][1] - steps[-1][0] == 1)


def test_a_missing_or_truncated_entry_is_an_error_not_data():
    store = MemoryStore()
    k, v = entry(3, codec="int8", tokens=32, layers=3)
    store.put(k, v)
    stream = LayerStream(store, [k, "f" * 64]).start()
    with pytest.raises(KeyError):
        stream.entries_when_ready()
    with pytest.raises(KeyError):
        stream.wait(0)
    stream.close()
    store.put(k, v[: len(v) - 100])  # shorter than its header says (its layer sums are last)
    stream = LayerStream(store, [k]).start()
    with pytest.raises(CorruptEntryError, match="expected"):
        stream.entries_when_ready()
    stream.close()


def test_a_layer_is_ready_before_the_later_ones_arrive_and_lmdb_spans_are_the_bytes(tmp_path):
    """``wait(l)`` returns once layer l is in, while later layers are still on the way (a gate
    holds them); over LMDB behind a throttled link the bytes are the stored ones and the link
    carried exactly what the stream counts."""
    import threading

    from chunkcache.store import LMDBStore

    gate = threading.Event()

    class Gated(Recording):
        def span_reader(self, keys):
            inner = super().span_reader(keys)
            store = self

            class Reader(SpanReader):
                def read(self, spans):
                    if len(store.calls) >= 4:  # heads (3 calls) and layer 0 pass, the rest wait
                        gate.wait()
                    return inner.read(spans)

            return Reader(self, keys)

    store = Gated()
    k, v = entry(7, codec="int8", tokens=48, layers=4)
    store.put(k, v)
    stream = LayerStream(store, [k], step_bytes=1).start()
    stream.entries_when_ready()
    stream.wait(0)
    assert stream.layers == 1
    gate.set()
    stream.wait(3)
    stream.close()
    assert bytes(stream.entries[0]) == v
    with LMDBStore(tmp_path / "s") as lm:
        items = [entry(8 + i, codec=c, tokens=40, layers=3) for i, c in enumerate(["int8", "int4"])]
        lm.put_many(items)
        slow = ThrottledStore(lm, bytes_per_s=1e9)
        stream = LayerStream(slow, [k for k, _ in items]).start()
        stream.wait(2)
        stream.close()
        assert [bytes(e) for e in stream.entries] == [v for _, v in items]
        assert slow.sent == stream.nbytes + 2 * 24  # (each prefix is read twice: alone, then with its header)


def test_a_reused_landing_arena_holds_exactly_the_stored_entries():
    """Streamed into a staging's landing arena that still holds an earlier query's bytes (0xAB
    everywhere), the entries equal the stored ones once every layer is in (the pads between
    sections are zeroed, everything else read); each lies page-aligned inside the one arena, and
    a later query of no more bytes reuses it."""
    import numpy as np

    from chunkcache.pipeline import Staging

    store = MemoryStore()
    items = [
        entry(20 + i, codec=c, tokens=37 + 5 * i, layers=4) for i, c in enumerate(["int8", "int2m", "int4"])
    ]
    store.put_many(items)
    st = Staging(torch.device("cpu"))
    for _ in range(2):
        if st.landed is not None:
            st.landed.fill_(0xAB)
            arena = st.landed
        stream = LayerStream(store, [k for k, _ in items], landing=st.landing).start()
        entries = stream.entries_when_ready()
        stream.wait(3)
        stream.close()
        assert [bytes(e) for e in entries] == [v for _, v in items]
        base = st.landed.data_ptr()
        assert all(
            np.shares_memory(e, st.landed.numpy()) and (e.ctypes.data - base) % 4096 == 0 for e in entries
        )
    assert st.landed is arena  # the second query reused the first one's arena


def test_a_cuda_event_for_the_prefix_is_refused_on_the_cpu(model, smol_tokenizer):
    """``fuse_entries(prefix_ready=)`` is for a front computed on another CUDA stream: on the CPU
    it is a ValueError before anything is staged, and the loader's thread is not left running."""
    import threading

    from chunkcache.pipeline import entry_views, fuse_entries

    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=MemoryStore(), codec="int8")
    eng.precompute(PASSAGES)
    keys, _ = eng.resolve(PASSAGES)
    before = {t.name for t in threading.enumerate()}
    with entry_views(eng.store, keys) as entries, pytest.raises(ValueError, match="CUDA event"):
        fuse_entries(eng.lm, eng.prefix_kv(), entries, eng._prefix_ids, eng._suffix_ids(QUESTION),
                     prefix_ready=object())  # fmt: skip
    assert "chunkcache-stager" not in {t.name for t in threading.enumerate()} - before


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_fused_over_a_stream_equals_fused_over_whole_entries(model, smol_tokenizer):
    """The streamed path (fast path on CPU, the back chunks through a throttled store) gives the
    plain fast path's result bit for bit with no front, and behind a recomputed front the result
    of the whole-entry path; a damaged layer is caught, warned about and repaired, never used."""
    kw = dict(model=model, tokenizer=smol_tokenizer, codec="int8", fast_path=True)
    inner = MemoryStore()
    plain = ChunkCache(store=inner, **kw)
    want = plain.fuse(PASSAGES, QUESTION)
    slow = ThrottledStore(inner, bytes_per_s=2e8)
    got = ChunkCache(store=slow, adaptive=AdaptiveConfig(recompute_chunks=0), **kw).fuse(PASSAGES, QUESTION)
    assert got.stats["fast_path"] and got.stats["adaptive"]["repaired"] == []
    assert torch.equal(got.logits, want.logits) and torch.equal(got.kv, want.kv)
    assert torch.equal(got.selected, want.selected)
    front = ChunkCache(store=slow, adaptive=AdaptiveConfig(recompute_chunks=2), **kw)
    eager = ChunkCache(store=inner, adaptive=AdaptiveConfig(recompute_chunks=2), **{**kw, "fast_path": False})
    a, b = front.fuse(PASSAGES, QUESTION), eager.fuse(PASSAGES, QUESTION)
    assert a.stats["fast_path"] and not b.stats.get("fast_path")
    assert torch.equal(a.selected, b.selected)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)  # (staged decode: one rounding)
    key = plain.key(PASSAGES[3])
    raw = bytearray(inner.get(key))
    raw[len(raw) // 2] ^= 0xFF  # inside a layer of the codes
    inner.put(key, bytes(raw))
    with pytest.warns(RuntimeWarning, match="damaged|checksum"):
        c = front.fuse(PASSAGES, QUESTION)
    assert c.stats["adaptive"]["repaired"] == [3] and inner.contains(key)  # recomputed and stored again
    torch.testing.assert_close(c.logits, a.logits, rtol=1e-4, atol=1e-4)
