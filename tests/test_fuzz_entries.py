"""Fuzzed entries: thousands of mutations of real engine entries (bit flips, truncation, headers
edited or replaced with valid checksums, shape bombs) through ``format``, the engine's eager path
and ``verify``. Nothing may crash, allocate more than a small multiple of the entry, or be used
unless it decodes to exactly the original chunk.

The property, for every mutant ``m`` stored under the original key ``k``:
- ``unpack_chunk(m)`` raises ``CorruptEntryError`` (nothing else) or returns the original tensors;
- the engine's reader (``ChunkCache._load``, the eager path) returns None (dropped, warned) or the
  original chunk; if it accepts ``m``, ``verify_entry(m, k)`` accepts it too;
- the fast path's reader (``fuse_entries``, CPU here; ``test_gpu_fast_path_fuzz`` on CUDA) raises
  ``CorruptEntryError`` or gives the clean result exactly.
"""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model
from store_worker import craft

from chunkcache.codec import CODECS
from chunkcache.engine import ChunkCache
from chunkcache.errors import CorruptEntryError
from chunkcache.format import read_header, unpack_chunk, verify_entry

_VALUES = [None, -1, 0, 1, 3, 2**31, 10**12, 1.5, "x", "", [], [1], {}, {"a": 1}, True, "crc32:00000000"]


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(h, path, value):
    h = json.loads(json.dumps(h))
    node = h
    for p in path[:-1]:
        node = node[p]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return h


_DELETE = object()


def _bombs(h: dict) -> list[dict]:
    """Headers whose section shapes would broadcast in decode, or promise huge tensors."""
    out = []
    L, _, H, T, D = h["kv_shape"]
    for name, s in h["sections"].items():
        if len(s["shape"]) >= 2:
            out.append(_set(h, ("sections", name, "shape"), [*s["shape"][:-1], 1]))  # broadcasts
            out.append(_set(h, ("sections", name, "shape"), [s["shape"][0], 1, *s["shape"][2:]]))
    for t in (T + 10, 10**7, 0):
        out.append(_set(_set(h, ("kv_shape",), [L, 2, H, t, D]), ("num_tokens",), t))
    out.append(_set(h, ("kv_shape",), [L, 2, H * 1000, T, D]))
    out.append(_set(h, ("num_tokens",), T + 10))
    out.append(_set(h, ("base_pos",), h["base_pos"] + 7))
    return out


def mutants(raw: bytes, rng: random.Random, n_flip: int, n_cut: int, n_edit: int):
    h = read_header(raw)
    h.pop("payload_offset")
    yield "bit flips", [_flip(raw, rng) for _ in range(n_flip)]
    yield "truncation", [raw[: rng.randrange(len(raw))] for _ in range(n_cut)]
    paths = [p for p, _ in _paths(h) if p]
    edits = []
    for _ in range(n_edit):
        path = rng.choice(paths)
        value = rng.choice([*_VALUES, _DELETE])
        edits.append(craft(raw, lambda x, p=path, v=value: _set(x, p, v)))
    yield "crafted headers (valid checksums)", edits
    special = [
        craft(raw, lambda x: {**x, "sections": []}),
        craft(raw, lambda x: {**x, "meta": {"key_info": "x"}}),
        craft(raw, lambda x: {**x, "key": {}}),
        craft(raw, lambda x: {**x, "key": "x"}),
        craft(raw, header_bytes=b"[" * 100_000 + b"]" * 100_000),
        craft(raw, header_bytes=b"{" + b'"a":{' * 50_000 + b"}" * 50_001),
        craft(raw, header_bytes=b"[]"),
        craft(raw, header_bytes=b"null"),
        craft(raw, header_bytes=b'{"payload_nbytes": 0}'),
        craft(raw, header_bytes=b'{"num_tokens": 1' + b"0" * 5000 + b"}"),
    ]
    yield "malformed headers (valid checksums)", special
    yield "shape bombs (valid checksums)", [craft(raw, lambda x, b=b: b) for b in _bombs(h)]


def _flip(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.choice((1, 1, 2, 3))):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _same(a, b, base_pos: bool = True) -> bool:
    """Same tensors (and, unless told, the same base position: only the engine knows the one
    its sink gives, so ``format`` alone accepts an edited one)."""
    return (
        torch.equal(a.kv, b.kv)
        and torch.equal(a.token_ids, b.token_ids)
        and (a.base_pos == b.base_pos or not base_pos)
        and (a.token_scores is None) == (b.token_scores is None)
    )


@pytest.fixture
def exact_decode(monkeypatch):
    """Fail if any codec's ``decode`` is handed parts of other shapes than it writes (a crafted
    small part broadcasting into a huge tensor: the memory bomb). Whole or one layer."""

    def guard(codec):
        real, kv_shape = codec.decode, _KV_SHAPE[codec.name]

        def decode(parts, dtype):
            want = codec.part_shapes(kv_shape(parts), torch.float32)
            for n in codec.parts:
                got = list(parts[n].shape)
                assert got == list(want[n].shape), f"{codec.name}.decode got {n} {got}"
            return real(parts, dtype)

        monkeypatch.setattr(codec, "decode", decode)

    for name in _KV_SHAPE:
        guard(CODECS[name])


def _qshape(p: dict, pack: int) -> list[int]:
    L, H, T, d = p["k_q"].shape
    return [L, 2, H, T, d * pack]


_KV_SHAPE = {  # the kv shape a codec's parts imply, from the part that carries every dimension
    "raw": lambda p: list(p["kv"].shape),
    "int8": lambda p: _qshape(p, 1),
    "int4": lambda p: _qshape(p, 2),
}


@pytest.mark.parametrize("codec", ["raw", "int8", "int4"])
def test_fuzzed_entries_are_never_used(codec, smol_tokenizer, exact_decode):
    eng = ChunkCache(model=tiny_model(num_hidden_layers=2), tokenizer=smol_tokenizer, store=None, codec=codec)
    ids = eng._chunk_ids(PASSAGES[0])
    key = eng.precompute_ids([ids])[0]
    raw = eng.store.get(key)
    clean = unpack_chunk(raw, eng.lm.dtype)
    rng = random.Random(1234 + len(codec))
    counts = {}
    for kind, group in mutants(raw, rng, n_flip=300, n_cut=100, n_edit=350):
        used = 0
        for m in group:
            try:
                got = unpack_chunk(m, eng.lm.dtype)
                assert _same(got, clean, base_pos=False), f"{kind}: a changed entry decoded to other tensors"
            except CorruptEntryError:
                pass
            eng.store.put(key, m)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "dropping damaged entry"
                loaded = eng._load(key, ids)
            if loaded is not None:
                used += 1
                assert _same(loaded, clean), f"{kind}: the engine used a changed entry"
                assert verify_entry(m, key) is None, f"{kind}: the engine used what verify rejects"
            else:
                reason = verify_entry(m, key)
                assert reason is not None or _engine_only(m, clean)
                stale = reason is not None and reason.startswith("stale:")  # a miss, left for verify
                assert stale == eng.store.contains(key)  # else dropped: the chunk is recomputed
        counts[kind] = (len(group), used)
    assert counts["shape bombs (valid checksums)"][1] == 0 and counts["truncation"][1] == 0
    total = sum(n for n, _ in counts.values())
    assert total >= 750, counts  # x 3 codecs
    eng.store.put(key, raw)
    assert eng._load(key, ids) is not None  # the clean entry itself is still accepted
    print(codec, counts)


def _engine_only(m: bytes, clean) -> bool:
    """A mutant verify accepts but the engine refuses: geometry only the engine knows (base_pos)."""
    try:
        return read_header(m)["base_pos"] != clean.base_pos
    except CorruptEntryError:
        return False


def test_fuzzed_entries_through_the_fast_path_reader(smol_tokenizer, exact_decode):
    """``fuse_entries`` (the fast path; CPU staging here) over mutants of one chunk's entry: a
    CorruptEntryError or exactly the clean logits."""
    from chunkcache.fuse import FuseConfig
    from chunkcache.pipeline import fuse_entries

    eng = ChunkCache(
        model=tiny_model(num_hidden_layers=2), tokenizer=smol_tokenizer, store=None, codec="int8"
    )
    ids = eng._chunk_ids(PASSAGES[1])
    key = eng.precompute_ids([ids])[0]
    raw = eng.store.get(key)
    sfx = eng.template.suffix_ids(QUESTION)
    cfg = FuseConfig(recompute_ratio=0.25)
    ref = fuse_entries(eng.lm, eng.prefix_kv(), [raw], eng._prefix_ids, sfx, cfg).logits
    rng = random.Random(7)
    n = 0
    for _kind, group in mutants(raw, rng, n_flip=40, n_cut=10, n_edit=40):
        for m in group:
            n += 1
            try:
                got = fuse_entries(
                    eng.lm, eng.prefix_kv(), [m], eng._prefix_ids, sfx, cfg,
                    inspect=lambda i, h, p: eng._check_entry(key, h, p["token_ids"], ids),
                ).logits  # fmt: skip
            except CorruptEntryError:
                continue
            assert torch.equal(got, ref)
    assert n > 100


@pytest.mark.gpu
def test_gpu_fast_path_fuzz(smol_tokenizer):
    """The same on CUDA: entries checked by the GPU layer checksums, through the engine's fast path."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    eng = ChunkCache(
        model=tiny_model(num_hidden_layers=2).to("cuda", torch.bfloat16), tokenizer=smol_tokenizer,
        store=None, codec="int8", fast_path=True,
    )  # fmt: skip
    ref = eng.fuse(PASSAGES[:2], QUESTION)
    assert ref.stats.get("fast_path") is True
    eng.fast_path = False
    ref_eager = eng.fuse(PASSAGES[:2], QUESTION)  # a dropped entry is recomputed on the eager path
    eng.fast_path = True
    key = eng.key(PASSAGES[0])
    raw = eng.store.get(key)
    rng = random.Random(11)
    n = 0
    for _kind, group in mutants(raw, rng, n_flip=150, n_cut=20, n_edit=150):
        for m in group:
            n += 1
            eng.store.put(key, m)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = eng.fuse(PASSAGES[:2], QUESTION)
            want = ref if got.stats.get("fast_path") else ref_eager
            torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert n > 300
