"""Triton kernels: the probe's attention. A few question queries over the whole (reused) cache,
giving both their attention output and the attention mass each key receives (mean over query
heads and question tokens), without materialising the [heads, queries, keys] probabilities.

The probe runs the question (tens of tokens) through every layer over the reused cache before
selection (``fuse._Probe``). In plain torch each layer wrote, read and re-wrote fp32 score
tensors of heads x queries x keys (33 MB per layer at 8K keys): small kernels that took more
time than the probe's weight-bound projections. Here K is read twice and V once, in two passes
split over the keys so that a handful of queries still fills the GPU:

    pass 1  program (split s, row block, kv head): online max / sum of exp over its keys
            -> M, L  [Hkv, rows, splits]         (log2 units)
    torch   lse = combine(M, L)  [Hkv, rows]     (tiny)
    pass 2  same grid: p = exp2(s - lse), exact probabilities
            -> mass partials [Hkv, row blocks, N] = sum over rows of p
            -> output partials [Hkv, splits, rows, D] = p @ V        (summed over splits in torch)

Rows are (query head in the kv head's group, question token) pairs: ``GROUP * n`` rows per kv
head share its K and V tiles (GQA). Key j is visible to a query at position p iff j <= p (and
j > p - window with a window); keys past the last query position (a padded buffer) are skipped.

The plain-torch twin is ``reference.probe_attention_reference``; the CPU path calls that one.

    out, mass = probe_attention(q, q_pos, k, v, scale=128**-0.5)   # [Hq, n, D], [N] fp32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_attention_args
from .reference import probe_attention_reference as probe_attention_reference

__all__ = ["probe_attention", "probe_attention_reference"]

_LOG2E = 1.4426950408889634


@triton.jit
def _rows(
    Q_ptr, QPOS_ptr, kv_h, rb, n, sq_h, sq_m, sq_d, GROUP, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, D
):
    """The row block's queries [BLOCK_R, BLOCK_D], positions (-1 for padding rows) and row mask."""
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    r_mask = r < GROUP * n
    h = kv_h * GROUP + r // n  # query head
    i = r % n  # question token
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    q = tl.load(
        Q_ptr + h[:, None] * sq_h + i[:, None] * sq_m + d[None, :] * sq_d,
        mask=r_mask[:, None] & (d < D)[None, :],
        other=0.0,
    )
    qp = tl.load(QPOS_ptr + i, mask=r_mask, other=-1)
    return q, qp, r, r_mask, d


@triton.jit
def _scores(q, qp, K, start, N, sk_n, sk_d, d, D, qk_scale, window, HAS_WINDOW: tl.constexpr,
            BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Scaled, masked scores (log2 units) of the rows against keys [start, start + BLOCK_N)."""
    j = start + tl.arange(0, BLOCK_N).to(tl.int64)
    kt = tl.load(
        K + j[:, None] * sk_n + d[None, :] * sk_d, mask=(j < N)[:, None] & (d < D)[None, :], other=0.0
    )
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION) * qk_scale
    visible = (j[None, :] <= qp[:, None]) & (j < N)[None, :]
    if HAS_WINDOW:
        visible = visible & (j[None, :] > qp[:, None] - window)
    return tl.where(visible, s, float("-inf")), j


@triton.jit
def _probe_lse_kernel(
    Q_ptr, QPOS_ptr, K_ptr, M_ptr, L_ptr,
    n, N, span, qk_scale, window, rows_pad, splits,
    sq_h, sq_m, sq_d, sk_h, sk_n, sk_d,
    GROUP: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Pass 1: running max and sum of exp2 of each row's scores over the split's keys."""
    s_id = tl.program_id(0)
    rb = tl.program_id(1)
    kv_h = tl.program_id(2).to(tl.int64)
    q, qp, r, r_mask, d = _rows(Q_ptr, QPOS_ptr, kv_h, rb, n, sq_h, sq_m, sq_d, GROUP, BLOCK_R, BLOCK_D, D)
    K = K_ptr + kv_h * sk_h
    hi = tl.minimum(tl.max(qp, axis=0) + 1, N)  # keys after the last query are never visible
    lo = s_id.to(tl.int64) * span
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in tl.range(lo, tl.minimum(lo + span, hi), BLOCK_N):
        s, _ = _scores(
            q, qp, K, start, N, sk_n, sk_d, d, D, qk_scale, window, HAS_WINDOW, BLOCK_N, DOT_PRECISION
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    out = (kv_h * rows_pad + r) * splits + s_id
    tl.store(M_ptr + out, m_i)
    tl.store(L_ptr + out, l_i)


@triton.jit
def _probe_mass_kernel(
    Q_ptr, QPOS_ptr, K_ptr, V_ptr, LSE_ptr, MASS_ptr, OUT_ptr,
    n, N, span, qk_scale, window, rows_pad, splits, row_blocks,
    sq_h, sq_m, sq_d, sk_h, sk_n, sk_d, sv_h, sv_n, sv_d,
    GROUP: tl.constexpr, D: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Pass 2: exact probabilities p = exp2(s - lse); per key the sum of p over the block's rows,
    and the split's share of p @ V."""
    s_id = tl.program_id(0)
    rb = tl.program_id(1)
    kv_h = tl.program_id(2).to(tl.int64)
    q, qp, r, r_mask, d = _rows(Q_ptr, QPOS_ptr, kv_h, rb, n, sq_h, sq_m, sq_d, GROUP, BLOCK_R, BLOCK_D, D)
    K = K_ptr + kv_h * sk_h
    V = V_ptr + kv_h * sv_h
    lse = tl.load(LSE_ptr + kv_h * rows_pad + r)  # padding rows: +inf, so p = 0
    hi = tl.minimum(tl.max(qp, axis=0) + 1, N)
    lo = s_id.to(tl.int64) * span
    mass = MASS_ptr + (kv_h * row_blocks + rb) * N
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start in tl.range(lo, tl.minimum(lo + span, N), BLOCK_N):
        if start < hi:
            s, j = _scores(
                q, qp, K, start, N, sk_n, sk_d, d, D, qk_scale, window, HAS_WINDOW, BLOCK_N, DOT_PRECISION
            )
            p = tl.exp2(s - lse[:, None])  # masked scores are -inf: p = 0
            tl.store(mass + j, tl.sum(p, axis=0), mask=j < N)
            vt = tl.load(
                V + j[:, None] * sv_n + d[None, :] * sv_d, mask=(j < N)[:, None] & (d < D)[None, :], other=0.0
            )
            acc += tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        else:  # nothing visible here (a padded buffer's tail)
            j = start + tl.arange(0, BLOCK_N).to(tl.int64)
            tl.store(mass + j, tl.zeros([BLOCK_N], dtype=tl.float32), mask=j < N)
    o = OUT_ptr + ((kv_h * splits + s_id) * rows_pad + r[:, None]) * BLOCK_D + d[None, :]
    tl.store(o, acc)


def _config(rows: int, n_keys: int, kv_heads: int, on_gpu: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_N, splits, num_warps, num_stages): enough programs to fill an H100 (about
    4 per SM) with a few key tiles each; the interpreter takes few, cheap programs."""
    block_r = 64 if rows > 32 else 32 if rows > 16 else 16
    if not on_gpu:
        return block_r, 32, 2, 4, 1
    block_n = 64
    row_blocks = -(-rows // block_r)
    tiles = -(-n_keys // block_n)
    splits = max(1, min(tiles, 512 // max(1, kv_heads * row_blocks)))
    return block_r, block_n, splits, 4, 2


def probe_attention(
    q: torch.Tensor,  # [Hq, n, D] RoPE'd question queries
    q_pos: torch.Tensor,  # [n] int64 absolute positions
    k: torch.Tensor,  # [Hkv, N, D], key j at position j
    v: torch.Tensor,  # [Hkv, N, D]
    scale: float | None = None,
    window: int | None = None,
    *,
    config: tuple[int, int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Hq, n, D] in q's dtype, mass [N] fp32): see the module doc. No host synchronisation
    (CUDA-graph safe). ``config`` overrides the launch heuristic (benchmarks, tests)."""
    check_attention_args(q, q_pos, k, v, window)
    hq, n, d = q.shape
    hkv, big_n, _ = k.shape
    scale = d**-0.5 if scale is None else float(scale)
    q_pos = q_pos.to(device=q.device, dtype=torch.int64).contiguous()
    group = hq // hkv
    rows = group * n
    block_d = max(16, triton.next_power_of_2(d))
    block_r, block_n, splits, num_warps, num_stages = config or _config(rows, big_n, hkv, q.is_cuda)
    row_blocks = triton.cdiv(rows, block_r)
    rows_pad = row_blocks * block_r
    span = triton.cdiv(triton.cdiv(big_n, block_n), splits) * block_n
    splits = triton.cdiv(big_n, span)
    dev = q.device
    m = torch.empty((hkv, rows_pad, splits), device=dev, dtype=torch.float32)
    ls = torch.empty_like(m)
    grid = (splits, row_blocks, hkv)
    common = dict(
        GROUP=group,
        D=d,
        HAS_WINDOW=window is not None,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    qk_scale, win = scale * _LOG2E, 0 if window is None else int(window)
    _probe_lse_kernel[grid](
        q, q_pos, k, m, ls, n, big_n, span, qk_scale, win, rows_pad, splits,
        *q.stride(), *k.stride(), **common,
    )  # fmt: skip
    # lse per row (log2 units); padding rows and rows with no visible key get +inf (p = 0)
    m_max = m.amax(dim=-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
    total = (ls * torch.exp2(m - m_safe)).sum(dim=-1)
    lse = torch.where(total > 0, m_safe.squeeze(-1) + torch.log2(total), torch.full_like(total, float("inf")))
    mass = torch.empty((hkv, row_blocks, big_n), device=dev, dtype=torch.float32)
    part = torch.empty((hkv, splits, rows_pad, block_d), device=dev, dtype=torch.float32)
    _probe_mass_kernel[grid](
        q, q_pos, k, v, lse.contiguous(), mass, part, n, big_n, span, qk_scale, win, rows_pad, splits,
        row_blocks, *q.stride(), *k.stride(), *v.stride(), **common,
    )  # fmt: skip
    out = part.sum(dim=1)[:, :rows, :d].reshape(hkv, group, n, d).reshape(hq, n, d).to(q.dtype)
    return out, mass.sum(dim=(0, 1)) / (hq * n)
