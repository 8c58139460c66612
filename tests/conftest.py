"""Shared fixtures: the real default model (session-scoped, loaded once) and tiny random models
of each supported architecture that reuse its tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from chunkcache.errors import UnsupportedModelError
    from chunkcache.model import resolve

    try:
        where, gguf = resolve("smollm2-135m")
    except UnsupportedModelError:
        # The GPU box lacks the 94 MB package; a save_pretrained copy travels there instead.
        saved = Path(__file__).resolve().parents[1] / ".tok"
        if not saved.is_dir():
            raise
        return AutoTokenizer.from_pretrained(saved)
    return AutoTokenizer.from_pretrained(where, gguf_file=gguf)


@pytest.fixture(scope="session")
def smol():
    """The real SmolLM2-135M-Instruct (fp32, CPU)."""
    from chunkcache.model import load_model

    return load_model("smollm2-135m", dtype=torch.float32, device="cpu")


def tiny_config(arch: str = "llama", **overrides):
    """A 3-layer random model of the given family with GQA (4 query heads, 2 kv heads)."""
    from transformers import AutoConfig

    base = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    base.update(overrides)
    return AutoConfig.for_model(arch, **base)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    # Larger-than-default weights so attention is far from uniform and mistakes show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random model saved as a plain Hugging Face folder (for CLI runs in subprocesses)."""
    d = tmp_path_factory.mktemp("tiny-hf-model")
    tiny_model(num_hidden_layers=2).save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_engine(smol_tokenizer):
    from chunkcache.engine import ChunkCache

    return ChunkCache(model=tiny_model("llama"), tokenizer=smol_tokenizer, store=None)


PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France, completed in 1889.",
    "Mount Kilimanjaro is a dormant volcano in Tanzania and the highest mountain in Africa.",
    "The Amazon River in South America is the largest river by discharge volume of water.",
    "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity.",
]
QUESTION = "Which tower was completed in 1889?"
