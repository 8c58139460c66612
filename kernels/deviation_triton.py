"""Triton kernel: per-token KV deviation summed over heads, the score CacheBlend-style selection ranks.

    dev[t] = sum_h || fresh[h, t, :] - cached[h, t, :] ||_2        (fp32)

One pass over both tensors, no [H, T, D] difference in memory. Top-k over ``dev`` stays
``torch.topk``. It knows nothing about which layer or policy asked. The plain-torch twin is
``reference.deviation_reference``; the CPU path calls that one.

    dev = deviation(v_fresh, v_cached)        # [T] fp32
    picked = dev.topk(k).indices
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import deviation_reference as deviation_reference

__all__ = ["deviation", "deviation_reference"]


@triton.jit
def _deviation_kernel(
    A_ptr,  # [H, T, D] fresh
    B_ptr,  # [H, T, D] cached
    OUT_ptr,  # [T] fp32
    H,
    T,
    sa_h,
    sa_t,
    sa_d,
    sb_h,
    sb_t,
    sb_d,
    D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program = BLOCK_T tokens; loops over heads: out[t] = sum_h sqrt(sum_d (a - b)^2) in fp32."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (t < T)[:, None] & (d < D)[None, :]
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    a_ptrs = A_ptr + t[:, None] * sa_t + d[None, :] * sa_d
    b_ptrs = B_ptr + t[:, None] * sb_t + d[None, :] * sb_d
    for _ in range(H):
        a = tl.load(a_ptrs, mask=mask, other=0.0)
        b = tl.load(b_ptrs, mask=mask, other=0.0)
        a_ptrs += sa_h  # pointer arithmetic is 64-bit
        b_ptrs += sb_h
        diff = a.to(tl.float32) - b.to(tl.float32)
        total += tl.sqrt(tl.sum(diff * diff, axis=1))
    tl.store(OUT_ptr + t, total, mask=t < T)


def deviation(
    fresh: torch.Tensor,  # [H, T, D]
    cached: torch.Tensor,  # [H, T, D]
) -> torch.Tensor:
    """Per-token deviation sum_h ||fresh[h, t] - cached[h, t]||_2, fp32 [T]."""
    if fresh.shape != cached.shape or fresh.dim() != 3:
        raise ValueError(
            f"fresh and cached must both be [H, T, D], got {tuple(fresh.shape)}, {tuple(cached.shape)}"
        )
    h, t, d = fresh.shape
    out = torch.empty(t, device=fresh.device, dtype=torch.float32)
    if t == 0:
        return out
    block_d = triton.next_power_of_2(d)
    block_t = max(1, min(64, 8192 // block_d, triton.next_power_of_2(t)))
    _deviation_kernel[(triton.cdiv(t, block_t),)](
        fresh, cached, out, h, t, *fresh.stride(), *cached.stride(), D=d, BLOCK_T=block_t, BLOCK_D=block_d
    )
    return out
