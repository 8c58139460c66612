"""Triton kernels: the small elementwise ops of a Llama-style decoder layer, one launch each.

In plain torch these are many tiny kernels per layer (RMSNorm ~6, rotary ~10, the cache write an
index_put per tensor, SiLU then a multiply), each a full pass over memory. Here each is one pass:

    rms_norm          y = weight * rmsnorm(x); with a residual, h = x + residual first -> (y, h)
    silu_mul          silu(gate) * up
    rope_qkv_scatter  rotary on q and k; q out head-major, k and v written into cache slots

The rounding points are those of the torch expressions in ``reference.py`` (fp32 math, rounded to
the activation dtype where torch rounds), so the outputs equal the references up to fp32 rounding
of the math itself (reduction order, exp). Every launcher is capturable in a CUDA graph: outputs are
allocated from shapes only and nothing is read back to the host. They know nothing about models or
caches beyond the tensors passed.

    y, h = rms_norm(x, weight, 1e-5, residual=h)                        # [rows, hidden] each
    act = silu_mul(gate, up)                                            # [rows, intermediate]
    q = rope_qkv_scatter(q, k, v, cos, sin, pos, buf[li, 0], buf[li, 1])   # [Hq, n, D]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import (
    check_rms_norm_args,
    check_rope_qkv_scatter_args,
    check_silu_mul_args,
)
from .reference import rms_norm_reference as rms_norm_reference
from .reference import rope_qkv_scatter_reference as rope_qkv_scatter_reference
from .reference import silu_mul_reference as silu_mul_reference

__all__ = [
    "rms_norm",
    "rms_norm_reference",
    "rope_qkv_scatter",
    "rope_qkv_scatter_reference",
    "silu_mul",
    "silu_mul_reference",
]

_MAX_HIDDEN = 65536  # one row is one block of registers


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even like torch's ``.to(dtype)``. bf16 is rounded by hand,
    bit for bit what the GPU's cvt.rn does, because the Triton interpreter's bf16 cast truncates
    (and the CPU tests compare bits); NaN stays NaN."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = tl.where(x == x, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(tl.bfloat16))
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def _rms_norm_kernel(
    X_ptr,  # [rows, hidden], row stride sx
    R_ptr,  # [rows, hidden] residual, row stride sr (read only with HAS_RESIDUAL)
    W_ptr,  # [hidden]
    Y_ptr,  # [rows, hidden] contiguous
    H_ptr,  # [rows, hidden] contiguous, x + residual (written only with HAS_RESIDUAL)
    sx,
    sr,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program = one row, fp32 math rounded to the dtype where torch rounds:

        h = round(x + r)                                  (with a residual; else h = x)
        y = round(w * round(h * rsqrt(sum(h^2) / hidden + eps)))

    One read of x (and r), one write of y (and h); weight comes from L2.
    """
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK)
    mask = col < hidden
    dtype = Y_ptr.dtype.element_ty
    x = tl.load(X_ptr + row * sx + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R_ptr + row * sr + col, mask=mask, other=0.0).to(tl.float32)
        h = _round(x + r, dtype)
        tl.store(H_ptr + row * hidden + col, h, mask=mask)
        x = h.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    normed = _round(x * inv, dtype).to(tl.float32)
    w = tl.load(W_ptr + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y_ptr + row * hidden + col, _round(w * normed, dtype), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [..., hidden], last dim contiguous
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [..., hidden] like x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``y`` (x's shape, contiguous), or ``(y, h)`` with a residual; see ``rms_norm_reference``."""
    check_rms_norm_args(x, weight, residual)
    hidden = x.shape[-1]
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} is over the kernel's {_MAX_HIDDEN}")
    x2 = x.reshape(-1, hidden)  # a view unless the leading dims cannot be merged
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else y
    r2 = residual.reshape(-1, hidden) if residual is not None else x2
    rows = x2.shape[0]
    if rows and hidden:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            x2,
            r2,
            weight.contiguous(),
            y,
            h,
            x2.stride(0),
            r2.stride(0),
            hidden,
            float(eps),
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=max(1, min(16, block // 512)),  # 8 warps at hidden 4096
        )
    return (y, h) if residual is not None else y


@triton.jit
def _silu_mul_kernel(G_ptr, U_ptr, O_ptr, numel, BLOCK: tl.constexpr):
    """One program = BLOCK elements: out = round(round(g / (1 + exp(-g))) * u), fp32 math."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    dtype = O_ptr.dtype.element_ty
    g = tl.load(G_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + i, mask=mask, other=0.0).to(tl.float32)
    silu = _round(g / (1.0 + tl.exp(-g)), dtype).to(tl.float32)
    tl.store(O_ptr + i, _round(silu * u, dtype), mask=mask)


def silu_mul(
    gate: torch.Tensor,  # any shape, contiguous
    up: torch.Tensor,  # gate's shape and dtype, contiguous
) -> torch.Tensor:
    """``silu(gate) * up`` as a new tensor; see ``silu_mul_reference``."""
    check_silu_mul_args(gate, up)
    out = torch.empty_like(gate)
    numel = gate.numel()
    if numel:
        block = 1024
        _silu_mul_kernel[(triton.cdiv(numel, block),)](gate, up, out, numel, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rotate_half_store(
    X_ptr, sx_t, O_ptr, so_t, t, o_row, j, mask, c1, c2, s1, s2, HALF: tl.constexpr,
):  # fmt: skip
    """Rotate rows ``t`` of one head and store them at rows ``o_row``. With x1 = x[:D/2],
    x2 = x[D/2:] (x * cos + rotate_half(x) * sin), in fp32 and rounded once:

        out1 = x1 * cos1 - x2 * sin1,   out2 = x2 * cos2 + x1 * sin2
    """
    src = X_ptr + t[:, None] * sx_t + j[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = O_ptr.dtype.element_ty
    dst = O_ptr + o_row[:, None] * so_t + j[None, :]
    tl.store(dst, _round(x1 * c1 - x2 * s1, dtype), mask=mask)
    tl.store(dst + HALF, _round(x2 * c2 + x1 * s2, dtype), mask=mask)


@triton.jit
def _rope_qkv_scatter_kernel(
    Q_ptr,  # [n, Hq, D]
    K_ptr,  # [n, Hkv, D]
    V_ptr,  # [n, Hkv, D]
    COS_ptr,  # [n, D]
    SIN_ptr,  # [n, D]
    POS_ptr,  # [n] int64 cache slots
    QO_ptr,  # [Hq, n, D]
    KO_ptr,  # [Hkv, N, D]
    VO_ptr,  # [Hkv, N, D]
    n,
    N,
    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_t, ss_t,
    sqo_h, sqo_t, sko_h, sko_t, svo_h, svo_t,
    HQ: tl.constexpr,
    HALF: tl.constexpr,  # D / 2
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # next power of two >= D / 2
):  # fmt: skip
    """Program (token block, head): heads [0, Hq) rotate q into q_out[h, t]; heads [Hq, Hq + Hkv)
    rotate k into k_out[h - Hq, positions[t]] and copy v to v_out at the same slots. Every element
    of every tensor is read once and written once (cos and sin once per head, from L2). Slots outside
    [0, N) are skipped (the reference raises; checking on the host would need a sync)."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    h = tl.program_id(1)
    j = tl.arange(0, BLOCK_HALF).to(tl.int64)
    t_mask = t < n
    mask = t_mask[:, None] & (j < HALF)[None, :]
    trig = t[:, None] * sc_t + j[None, :]
    c1 = tl.load(COS_ptr + trig, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS_ptr + trig + HALF, mask=mask, other=0.0).to(tl.float32)
    trig = t[:, None] * ss_t + j[None, :]
    s1 = tl.load(SIN_ptr + trig, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN_ptr + trig + HALF, mask=mask, other=0.0).to(tl.float32)
    if h < HQ:
        hq = h.to(tl.int64)
        _rotate_half_store(
            Q_ptr + hq * sq_h, sq_t, QO_ptr + hq * sqo_h, sqo_t, t, t, j, mask, c1, c2, s1, s2, HALF
        )
    else:
        hk = (h - HQ).to(tl.int64)
        p = tl.load(POS_ptr + t, mask=t_mask, other=-1)
        p_mask = mask & ((p >= 0) & (p < N))[:, None]
        _rotate_half_store(
            K_ptr + hk * sk_h, sk_t, KO_ptr + hk * sko_h, sko_t, t, p, j, p_mask, c1, c2, s1, s2, HALF
        )
        src = V_ptr + hk * sv_h + t[:, None] * sv_t + j[None, :]
        dst = VO_ptr + hk * svo_h + p[:, None] * svo_t + j[None, :]
        tl.store(dst, tl.load(src, mask=p_mask), mask=p_mask)
        tl.store(dst + HALF, tl.load(src + HALF, mask=p_mask), mask=p_mask)


def rope_qkv_scatter(
    q: torch.Tensor,  # [n, Hq, D], last dim contiguous (e.g. proj_out.view(n, Hq, D))
    k: torch.Tensor,  # [n, Hkv, D]
    v: torch.Tensor,  # [n, Hkv, D]
    cos: torch.Tensor,  # [n, D] (or [1, n, D]), HF layout, any float dtype
    sin: torch.Tensor,  # [n, D]
    positions: torch.Tensor,  # [n] int64, distinct cache slots, each < N
    k_out: torch.Tensor,  # [Hkv, N, D] q's dtype, last dim contiguous (e.g. buf[layer, 0])
    v_out: torch.Tensor,  # [Hkv, N, D]
) -> torch.Tensor:
    """Rotated q as a new [Hq, n, D] contiguous tensor; rotated k and plain v written into
    ``k_out``/``v_out`` at ``positions`` (in place). One launch; see ``rope_qkv_scatter_reference``."""
    check_rope_qkv_scatter_args(q, k, v, cos, sin, positions, k_out, v_out)
    n, hq, d = q.shape
    hkv, big_n, _ = k_out.shape
    cos = cos.reshape(n, d)  # leading dims are 1: a view
    sin = sin.reshape(n, d)
    q_out = torch.empty((hq, n, d), dtype=q.dtype, device=q.device)
    if n == 0 or d == 0:
        return q_out
    block_half = triton.next_power_of_2(d // 2)
    block_t = max(1, min(32, 4096 // block_half, triton.next_power_of_2(n)))
    grid = (triton.cdiv(n, block_t), hq + hkv)
    _rope_qkv_scatter_kernel[grid](
        q,
        k,
        v,
        cos,
        sin,
        positions,
        q_out,
        k_out,
        v_out,
        n,
        big_n,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        sin.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        v_out.stride(0),
        v_out.stride(1),
        HQ=hq,
        HALF=d // 2,
        BLOCK_T=block_t,
        BLOCK_HALF=block_half,
        num_warps=4,
    )
    return q_out
