"""GPU kernels of chunkcache, each with a plain-torch reference the CPU path runs instead.

    rerotate_scatter    decode a chunk-layer (raw/int8/int4), rotate keys by the position delta,
                        write it into the assembled cache at an offset
    rerotate_scatter_packed  the same for every chunk of a layer packed in one buffer, one launch
    rerotate_scatter_layers  the same for every layer of a series (zero copy), one launch
    selected_attention  attention of selected query tokens over the full KV, exact causal mask
    probe_attention     the question's attention over the whole cache: output and the mass each
                        key receives, without materialising the probabilities
    checksums           position-weighted 16-bit word sums of byte ranges (checks staged layers)
    rms_norm            Llama RMSNorm, optionally after the residual add (returns both)
    silu_mul            silu(gate) * up, the Llama MLP's activation
    rope_qkv_scatter    rotary on q and k, q out head-major, k and v written into cache slots

The functions here dispatch: CUDA tensors and an importable triton -> the Triton launcher in
``kernels/<name>.py``; anything else -> ``kernels/reference.py``. Importing this package imports
neither triton nor CUDA; the kernel modules are imported on first GPU use.

    from chunkcache.kernels import selected_attention
    out = selected_attention(q, q_pos, k, v, scale=d**-0.5)    # [Hq, n, D]
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from functools import cache

import torch

from .reference import (
    PackedLayout,
    checksum_partials_reference,
    checksums_reference,
    probe_attention_reference,
    rerotate_scatter_packed_reference,
    rerotate_scatter_reference,
    rms_norm_reference,
    rope_qkv_scatter_reference,
    selected_attention_reference,
    silu_mul_reference,
)

__all__ = [
    "PackedLayout",
    "checksum_blocks",
    "checksum_partials",
    "checksum_partials_reference",
    "checksums",
    "checksums_reference",
    "probe_attention",
    "probe_attention_reference",
    "rerotate_scatter",
    "rerotate_scatter_packed",
    "rerotate_scatter_layers",
    "rerotate_scatter_packed_reference",
    "rerotate_scatter_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_qkv_scatter",
    "rope_qkv_scatter_reference",
    "selected_attention",
    "selected_attention_reference",
    "silu_mul",
    "silu_mul_reference",
    "triton_available",
]


@cache
def triton_available() -> bool:
    """True if triton can be imported (says nothing about a driver: callers also need CUDA tensors)."""
    return importlib.util.find_spec("triton") is not None


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton_available()


def rerotate_scatter(
    codec: str,
    parts: Mapping[str, torch.Tensor],  # one layer of the codec's tensors, see reference.decode_layer
    cos: torch.Tensor,  # [D] fp32, for the position delta
    sin: torch.Tensor,  # [D] fp32
    k_out: torch.Tensor,  # [kv_heads, N, D] model dtype, may be a strided view
    v_out: torch.Tensor,  # [kv_heads, N, D]
    offset: int,
) -> None:
    """Decode, re-rotate and write one chunk-layer into ``k_out``/``v_out`` at ``offset`` (in place)."""
    if _use_triton(k_out):
        fn = importlib.import_module(".rerotate_scatter_triton", __name__).rerotate_scatter
    else:
        fn = rerotate_scatter_reference
    fn(codec, parts, cos, sin, k_out, v_out, offset)


def rerotate_scatter_packed(
    layout: PackedLayout,
    buf: torch.Tensor,  # 1-D uint8: every chunk's parts of one layer, at layout's byte offsets
    cos: torch.Tensor,  # [C, D] fp32, chunk c rotated by cos[c], sin[c]
    sin: torch.Tensor,
    k_out: torch.Tensor,  # [kv_heads, N, D]
    v_out: torch.Tensor,
) -> None:
    """``rerotate_scatter`` for every chunk of a layer at once: one launch on the GPU."""
    if _use_triton(k_out):
        fn = importlib.import_module(".rerotate_scatter_triton", __name__).rerotate_scatter_packed
    else:
        fn = rerotate_scatter_packed_reference
    fn(layout, buf, cos, sin, k_out, v_out)


def rerotate_scatter_layers(
    layouts: list[PackedLayout],  # one per layer (``PackedLayout.series``)
    buf: torch.Tensor,  # 1-D uint8: every layer's parts at the layouts' offsets
    cos: torch.Tensor,  # [C, D] fp32
    sin: torch.Tensor,
    k_out: torch.Tensor,  # [L, kv_heads, N, D], e.g. kv[:, 0]
    v_out: torch.Tensor,
) -> None:
    """``rerotate_scatter_packed`` of layer j of ``layouts`` into ``k_out[j]``, ``v_out[j]`` for every
    j: on the GPU one launch for all layers when their launch tables are one series (else one a
    layer)."""
    if _use_triton(k_out):
        rr = importlib.import_module(".rerotate_scatter_triton", __name__)
        if rr.rerotate_scatter_layers(layouts, buf, cos, sin, k_out, v_out):
            return
    for j, lay in enumerate(layouts):
        rerotate_scatter_packed(lay, buf, cos, sin, k_out[j], v_out[j])


def checksums(buf: torch.Tensor, table: torch.Tensor, longest: int | None = None) -> torch.Tensor:
    """[P, 2] int64 ``reference.sum64`` of the byte ranges ``table`` [P, 2] (offset, count) of
    ``buf`` (1-D uint8); on the GPU one launch, no host sync when ``longest`` is given."""
    if _use_triton(buf):
        fn = importlib.import_module(".checksum_triton", __name__).checksums
    else:
        fn = checksums_reference
    return fn(buf, table, longest)


def checksum_blocks(longest: int, device: torch.device | str) -> int:
    """Blocks per range that ``checksum_partials`` fills on ``device`` for ranges of at most
    ``longest`` bytes (the size of ``out``'s dim 1)."""
    if torch.device(device).type == "cuda" and triton_available():
        return importlib.import_module(".checksum_triton", __name__).partial_blocks(longest)
    return 1


def checksum_partials(buf: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    """Per-block partial ``checksums`` into ``out`` [P, checksum_blocks(...), 2] int64, whose
    ``sum(dim=1)`` is the sums: one launch and no allocation on the GPU, for loops that check many
    layers and reduce once."""
    if _use_triton(buf):
        fn = importlib.import_module(".checksum_triton", __name__).checksums_partial
    else:
        fn = checksum_partials_reference
    fn(buf, table, out)


def selected_attention(
    q: torch.Tensor,  # [Hq, n, D], already RoPE'd
    q_pos: torch.Tensor,  # [n] int64 absolute positions, sorted ascending
    k: torch.Tensor,  # [Hkv, N, D], key j at position j
    v: torch.Tensor,  # [Hkv, N, D]
    scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of the selected queries over all keys at positions <= their own (see the reference)."""
    if _use_triton(q):
        fn = importlib.import_module(".selected_attention_triton", __name__).selected_attention
    else:
        fn = selected_attention_reference
    return fn(q, q_pos, k, v, scale=scale, window=window, return_lse=return_lse)


def probe_attention(
    q: torch.Tensor,  # [Hq, n, D], already RoPE'd
    q_pos: torch.Tensor,  # [n] int64 absolute positions
    k: torch.Tensor,  # [Hkv, N, D]
    v: torch.Tensor,  # [Hkv, N, D]
    scale: float | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Hq, n, D], mass [N] fp32): the attention of a few queries over every key and the
    probability mass each key gets, averaged over heads and queries (see the reference)."""
    if _use_triton(q):
        fn = importlib.import_module(".probe_attention_triton", __name__).probe_attention
    else:
        fn = probe_attention_reference
    return fn(q, q_pos, k, v, scale=scale, window=window)


def rms_norm(
    x: torch.Tensor,  # [..., hidden], last dim contiguous
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [..., hidden] like x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face LlamaRMSNorm of x; with a residual, ``(rms_norm(h), h)`` for h = x + residual."""
    if _use_triton(x):
        fn = importlib.import_module(".layer_triton", __name__).rms_norm
    else:
        fn = rms_norm_reference
    return fn(x, weight, eps, residual)


def silu_mul(
    gate: torch.Tensor,  # any shape, contiguous
    up: torch.Tensor,  # gate's shape and dtype
) -> torch.Tensor:
    """``F.silu(gate) * up`` (same rounding as torch's two ops) as a new tensor."""
    if _use_triton(gate):
        return importlib.import_module(".layer_triton", __name__).silu_mul(gate, up)
    return silu_mul_reference(gate, up)


def rope_qkv_scatter(
    q: torch.Tensor,  # [n, Hq, D], last dim contiguous
    k: torch.Tensor,  # [n, Hkv, D]
    v: torch.Tensor,  # [n, Hkv, D]
    cos: torch.Tensor,  # [n, D], HF layout
    sin: torch.Tensor,  # [n, D]
    positions: torch.Tensor,  # [n] int64 cache slots, distinct
    k_out: torch.Tensor,  # [Hkv, N, D], e.g. buf[layer, 0]
    v_out: torch.Tensor,  # [Hkv, N, D]
) -> torch.Tensor:
    """Rotary on q and k; writes rotated k and v into ``k_out``/``v_out`` at ``positions`` and
    returns rotated q as [Hq, n, D] (see the reference)."""
    if _use_triton(q):
        fn = importlib.import_module(".layer_triton", __name__).rope_qkv_scatter
    else:
        fn = rope_qkv_scatter_reference
    return fn(q, k, v, cos, sin, positions, k_out, v_out)
