"""Triton kernel: attention of a few selected query tokens over the full KV, exact causal mask.

Selective recompute re-runs a layer only for the selected tokens, which sit at scattered absolute
positions; each must see exactly the keys at positions <= its own, as in a full prefill:

    positions   0 ........................................................ N-1
    keys        |prefix|  chunk 1  |  chunk 2  |  chunk 3  | question |
    queries         ^   ^     ^        ^ ^          ^         ^^^^^^^^   (q_pos, sorted)

A program takes BLOCK_M consecutive selected queries of one head and streams key blocks with an
online softmax (fp32 accumulators). Key blocks wholly before the smallest q_pos of the block need no
mask; blocks after the largest q_pos are never loaded. With a sliding window, blocks wholly before
``min(q_pos) - window`` are skipped too. GQA: query head h reads kv head h // (Hq // Hkv).

It knows nothing about which tokens were selected or why. The plain-torch twin is
``reference.selected_attention_reference`` (SDPA with a bool mask); the CPU path calls that one.

    out, lse = selected_attention(q, q_pos, k, v, scale=128**-0.5, return_lse=True)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_attention_args
from .reference import selected_attention_reference as selected_attention_reference

__all__ = ["selected_attention", "selected_attention_reference"]

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(
    acc,
    m_i,
    l_i,
    q,
    qp,
    K_ptr,
    V_ptr,
    start_n,
    N,
    sk_n,
    sk_d,
    sv_n,
    sv_d,
    d,
    d_mask,
    qk_scale,
    window,
    MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Fold keys [start_n, start_n + BLOCK_N) into the running (acc, m_i, l_i); scores in log2 units."""
    j = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # key positions
    if MASKED:
        kv_mask = (j < N)[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    kt = tl.load(K_ptr + j[:, None] * sk_n + d[None, :] * sk_d, mask=kv_mask, other=0.0)  # [BLOCK_N, D]
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = j[None, :] <= qp[:, None]
        if HAS_WINDOW:
            visible = visible & (j[None, :] > qp[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    vt = tl.load(V_ptr + j[:, None] * sv_n + d[None, :] * sv_d, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _selected_attention_kernel(
    Q_ptr,  # [Hq, n, D]
    QPOS_ptr,  # [n] int64, sorted ascending
    K_ptr,  # [Hkv, N, D]
    V_ptr,  # [Hkv, N, D]
    O_ptr,  # [Hq, n, D]
    LSE_ptr,  # [Hq, n] fp32 (written only if WRITE_LSE)
    n,
    N,
    qk_scale,  # softmax scale * log2(e)
    window,
    sq_h,
    sq_m,
    sq_d,
    sk_h,
    sk_n,
    sk_d,
    sv_h,
    sv_n,
    sv_d,
    so_h,
    so_m,
    so_d,
    GROUP: tl.constexpr,  # Hq // Hkv
    D: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_M selected queries of one query head.

    For query i at position p_i and key j (visible iff j <= p_i, and j > p_i - window if windowed):
        s_ij = scale * q_i . k_j
        out_i = sum_j softmax_j(s_ij) v_j,   lse_i = log sum_j exp(s_ij)
    computed block by block over j with the online softmax (running max m_i, sum l_i, fp32 acc).
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    kv_h = h // GROUP

    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    m_mask = m < n
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_mask = d < D

    qp = tl.load(QPOS_ptr + m, mask=m_mask, other=-1)  # padding rows see nothing
    q = tl.load(
        Q_ptr + h * sq_h + m[:, None] * sq_m + d[None, :] * sq_d,
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    K = K_ptr + kv_h * sk_h
    V = V_ptr + kv_h * sv_h

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    p_min = tl.min(tl.where(m_mask, qp, N), axis=0)
    p_max = tl.max(qp, axis=0)
    hi = tl.minimum(p_max + 1, N)  # keys past the last query are never visible
    if HAS_WINDOW:
        lo = tl.maximum(p_min - window + 1, 0) // BLOCK_N * BLOCK_N
        for start_n in tl.range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, qp, K, V, start_n, N, sk_n, sk_d, sv_n, sv_d, d, d_mask,
                qk_scale, window, True, True, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip
    else:
        # Blocks that end at or before min(q_pos) are visible to every query: no mask.
        full_end = (p_min + 1) // BLOCK_N * BLOCK_N
        for start_n in tl.range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, qp, K, V, start_n, N, sk_n, sk_d, sv_n, sv_d, d, d_mask,
                qk_scale, window, False, False, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip
        for start_n in tl.range(full_end, hi, BLOCK_N):
            acc, m_i, l_i = _attend_block(
                acc, m_i, l_i, q, qp, K, V, start_n, N, sk_n, sk_d, sv_n, sv_d, d, d_mask,
                qk_scale, window, True, False, BLOCK_N, DOT_PRECISION,
            )  # fmt: skip

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        O_ptr + h * so_h + m[:, None] * so_m + d[None, :] * so_d,
        out.to(O_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )
    if WRITE_LSE:
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # back to natural log
        tl.store(LSE_ptr + h * n + m, lse, mask=m_mask)


def _launch_config(n: int, block_d: int, dtype: torch.dtype, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Measured on an H100, bf16, Hq 32 / Hkv 8, D 128,
    n = 15% of N: (64, 64, 4, 3) is best at N = 8K (n = 1.2K), (128, 128, 8, 3) at N = 32K
    (n = 4.9K); (128, 64, 4, 3) spills registers (4x slower). fp32 takes small ieee-precision tiles;
    the interpreter takes few, cheap programs."""
    small_m = 64 if n > 32 else 32 if n > 16 else 16
    if not on_gpu:
        return small_m, 64, 4, 1
    if dtype == torch.float32 or block_d > 128:
        return small_m, 32, 4, 2
    if n >= 2048 and block_d == 128:
        return 128, 128, 8, 3
    return small_m, 64, 4, 3


def selected_attention(
    q: torch.Tensor,  # [Hq, n, D], already RoPE'd
    q_pos: torch.Tensor,  # [n] int64 absolute positions, sorted ascending, each < N
    k: torch.Tensor,  # [Hkv, N, D], key j at position j
    v: torch.Tensor,  # [Hkv, N, D]
    scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
    *,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Output [Hq, n, D] in q's dtype (and lse [Hq, n] fp32 with ``return_lse``); see the module doc.

    ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the launch heuristic (benchmarks).
    """
    check_attention_args(q, q_pos, k, v, window)
    hq, n, d = q.shape
    hkv, big_n, _ = k.shape
    scale = d**-0.5 if scale is None else float(scale)
    q_pos = q_pos.to(device=q.device, dtype=torch.int64).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((hq, n), device=q.device, dtype=torch.float32)
    if n == 0:
        return (out, lse) if return_lse else out

    block_d = max(16, triton.next_power_of_2(d))
    block_m, block_n, num_warps, num_stages = config or _launch_config(n, block_d, q.dtype, q.is_cuda)
    grid = (triton.cdiv(n, block_m), hq)
    _selected_attention_kernel[grid](
        q,
        q_pos,
        k,
        v,
        out,
        lse,
        n,
        big_n,
        scale * _LOG2E,
        0 if window is None else int(window),
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        GROUP=hq // hkv,
        D=d,
        HAS_WINDOW=window is not None,
        WRITE_LSE=return_lse,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # no tf32: fp32 stays exact
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return (out, lse) if return_lse else out
