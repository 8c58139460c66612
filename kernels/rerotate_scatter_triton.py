"""Triton kernel: decode one chunk-layer from its codec, re-rotate its keys, scatter it into the cache.

Fusion moves a chunk encoded at positions ``base_pos..`` to ``offset..`` of the assembled cache by
rotating every key by the same position delta (RoPE is a rotation: R(a + b) = R(a) R(b)). This kernel
does decode + rotation + copy in one pass, so a compressed chunk never exists decoded in memory:

    source (one layer)            assembled cache  k_out / v_out  [kv_heads, N, head_dim]
    codec parts, T tokens   --->  | ... | chunk at offset .. offset+T-1 | ... |

It knows the per-layer codec formats (see ``reference.decode_layer``) and the neox half-split RoPE;
it knows nothing about where the delta came from. The plain-torch twin is
``reference.rerotate_scatter_reference``; the CPU path calls that one.

    cos, sin = rope(delta)                                        # [head_dim] fp32 each
    rerotate_scatter("int8", parts, cos, sin, k_out, v_out, offset=300)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import triton
import triton.language as tl

from chunkcache.codec import int2_family

from .reference import INT2_FAMILY, INT4_GROUP, META_COLS, check_parts, int2_groups
from .reference import rerotate_scatter_reference as rerotate_scatter_reference

__all__ = ["rerotate_scatter", "rerotate_scatter_packed", "rerotate_scatter_reference"]

_CODEC_ID = {"raw": 0, "int8": 1, "int4": 2, "int2": 3, "int2r": 4, "int2m": 5}


@triton.jit
def _fmix_sign(j):
    """int2r's sign of head_dim element j (int64 tensor): ``codec.hadamard_signs``, bit for bit."""
    h = (j * 0x9E3779B1) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return 1.0 - 2.0 * (h & 1).to(tl.float32)


@triton.jit
def _hadamard_half(q, i, j, USE_DOT: tl.constexpr):
    """q [BT, D] (small integers, fp32) @ H[:, j] for the column indices j [BH] of the Sylvester
    Hadamard matrix (H[i, j] = (-1) ** popcount(i & j), i = arange(D)): exact integer sums, so
    the tensor-core dot (fp16 in, fp32 accumulate) and the broadcast sum give the same."""
    x = i[:, None] & j[None, :]  # [D, BH], < 256
    x ^= x >> 4
    x ^= x >> 2
    x ^= x >> 1
    h = 1.0 - 2.0 * (x & 1).to(tl.float32)
    if USE_DOT:
        c = tl.dot(q.to(tl.float16), h.to(tl.float16), out_dtype=tl.float32)
    else:
        c = tl.sum(q[:, :, None] * h[None, :, :], axis=1)
    return c


@triton.jit
def _decode_rotate_store(
    K_ptr, V_ptr, KS_ptr, KM_ptr, VS_ptr, VM_ptr, COS_ptr, SIN_ptr, KO_ptr, VO_ptr,
    T, G, S, offset, sko_h, sko_t, sko_d, svo_h, svo_t, svo_d, pid_t, h,
    D: tl.constexpr, CODEC: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, ROW: tl.constexpr, USE_DOT: tl.constexpr,
):  # fmt: skip
    """One program = BLOCK_T tokens of one kv head, keys and values, both halves of head_dim.

    With x1 = x[:D/2], x2 = x[D/2:] (neox pairing i <-> i + D/2), in fp32:
        k_out1 = k1 * cos[:D/2] - k2 * sin[:D/2]
        k_out2 = k2 * cos[D/2:] + k1 * sin[D/2:]
        v_out  = v
    rounded once to the output dtype. Decode: int8 x = q * scale; int4 x = q * scale + min, where
    the two halves of an int4 row sit in bytes [0, D/4) and [D/4, D/2), each byte holding an even
    (low nibble) and odd (high nibble) element, so each half is loaded as bytes and interleaved;
    int2 x = q * scale + min with key group t // S, four planar codes per byte in rows of D/2 + 4
    bytes (see ``codec.Int2Codec``; its kept rows are written afterwards by ``_kept_rows``); int2r
    the same with values through the inverse Hadamard rotation; int2m (``codec.Int2MCodec``) rows
    of ROW = 9D/16 bytes: each key channel's code at its slot (``k_pos``, at VM_ptr, uint8), 4-bit
    for the first D/4 slots, 2-bit planar after; values as int2r with v_min = -1.5 * v_scale.
    """
    HALF: tl.constexpr = D // 2

    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BLOCK_T]
    t_mask = t < T
    j = tl.arange(0, BLOCK_HALF).to(tl.int64)  # index inside one half of head_dim
    j_mask = j < HALF
    mask = t_mask[:, None] & j_mask[None, :]
    row = h * T + t  # source row of (head, token)

    if CODEC >= 3:  # the int2 family: 3 int2, 4 int2r, 5 int2m
        # int2: a (head, token) row of R = D/2 + 4 bytes holds the key codes (bytes [0, D/4), K_ptr),
        # the value codes ([D/4, D/2), V_ptr) and the value scale, min (fp16 at VS_ptr, VM_ptr, in
        # fp16 units R/2 per row). Element e sits in byte e % (D/4), bits 2 * (e // (D/4)).
        Q2: tl.constexpr = D // 4
        R: tl.constexpr = ROW
        e2 = j + HALF
        if CODEC == 5:
            # int2m: channel c's code sits at slot p = k_pos[h, c]: slots < M are 4-bit (byte p // 2,
            # low nibble for even p), the others 2-bit planar over the D - M slots after M / 2 bytes.
            M: tl.constexpr = D // 4
            QL: tl.constexpr = (D - M) // 4
            p1 = tl.load(VM_ptr + h * D + j, mask=j_mask, other=0).to(tl.int64)
            p2 = tl.load(VM_ptr + h * D + e2, mask=j_mask, other=0).to(tl.int64)
            hi1 = p1 < M
            hi2 = p2 < M
            l1 = tl.where(hi1, 0, p1 - M)
            l2 = tl.where(hi2, 0, p2 - M)
            b1 = tl.where(hi1, p1 // 2, M // 2 + l1 % QL)
            b2 = tl.where(hi2, p2 // 2, M // 2 + l2 % QL)
            sk1 = tl.where(hi1, 4 * (p1 % 2), 2 * (l1 // QL)).to(tl.uint8)[None, :]
            sk2 = tl.where(hi2, 4 * (p2 % 2), 2 * (l2 // QL)).to(tl.uint8)[None, :]
            mk1 = tl.where(hi1, 15, 3).to(tl.uint8)[None, :]
            mk2 = tl.where(hi2, 15, 3).to(tl.uint8)[None, :]
            k1 = ((tl.load(K_ptr + row[:, None] * R + b1[None, :], mask=mask, other=0) >> sk1) & mk1).to(
                tl.float32
            )
            k2 = ((tl.load(K_ptr + row[:, None] * R + b2[None, :], mask=mask, other=0) >> sk2) & mk2).to(
                tl.float32
            )
        else:
            src1 = row[:, None] * R + (j % Q2)[None, :]
            src2 = row[:, None] * R + (e2 % Q2)[None, :]
            sh1 = (2 * (j // Q2)).to(tl.uint8)[None, :]
            sh2 = (2 * (e2 // Q2)).to(tl.uint8)[None, :]
            k1 = ((tl.load(K_ptr + src1, mask=mask, other=0) >> sh1) & 3).to(tl.float32)
            k2 = ((tl.load(K_ptr + src2, mask=mask, other=0) >> sh2) & 3).to(tl.float32)
        ks_row = (h * G + t // S)[:, None] * D + j[None, :]
        k1 = k1 * tl.load(KS_ptr + ks_row, mask=mask, other=0.0).to(tl.float32) + tl.load(
            KM_ptr + ks_row, mask=mask, other=0.0
        ).to(tl.float32)
        k2 = k2 * tl.load(KS_ptr + ks_row + HALF, mask=mask, other=0.0).to(tl.float32) + tl.load(
            KM_ptr + ks_row + HALF, mask=mask, other=0.0
        ).to(tl.float32)
        if CODEC == 5:
            vs = tl.load(VS_ptr + row, mask=t_mask, other=0.0).to(tl.float32)[:, None]
            vm = vs * -1.5
        else:
            vs = tl.load(VS_ptr + row * (R // 2), mask=t_mask, other=0.0).to(tl.float32)[:, None]
            vm = tl.load(VM_ptr + row * (R // 2), mask=t_mask, other=0.0).to(tl.float32)[:, None]
        if CODEC == 3:
            v1 = ((tl.load(V_ptr + src1, mask=mask, other=0) >> sh1) & 3).to(tl.float32) * vs + vm
            v2 = ((tl.load(V_ptr + src2, mask=mask, other=0) >> sh2) & 3).to(tl.float32) * vs + vm
        else:
            # int2r (codec.Int2RCodec): c = q @ H over the whole row, a = c * scale + (D * min at
            # column 0), v = a * sign / sqrt(D); D is a power of two, so 2 * BLOCK_HALF == D.
            i = tl.arange(0, 2 * BLOCK_HALF).to(tl.int64)
            srcq = row[:, None] * R + (i % Q2)[None, :]
            shq = (2 * (i // Q2)).to(tl.uint8)[None, :]
            q = ((tl.load(V_ptr + srcq, mask=t_mask[:, None], other=0) >> shq) & 3).to(tl.float32)
            w = tl.div_rn(1.0, tl.sqrt_rn(tl.full([BLOCK_HALF], D, tl.float32)))  # as codec.rotation_weights
            v1 = _hadamard_half(q, i, j, USE_DOT) * vs + tl.where((j == 0)[None, :], vm * D, 0.0)
            v1 = v1 * (_fmix_sign(j) * w)[None, :]
            v2 = (_hadamard_half(q, i, j + HALF, USE_DOT) * vs) * (_fmix_sign(j + HALF) * w)[None, :]
    elif CODEC == 2:
        QUARTER: tl.constexpr = D // 4
        b = tl.arange(0, BLOCK_HALF // 2).to(tl.int64)  # byte inside one half
        b_mask = t_mask[:, None] & (b < QUARTER)[None, :]
        src = row[:, None] * HALF + b[None, :]  # a row holds D/2 bytes
        kb1 = tl.load(K_ptr + src, mask=b_mask, other=0)
        kb2 = tl.load(K_ptr + src + QUARTER, mask=b_mask, other=0)
        vb1 = tl.load(V_ptr + src, mask=b_mask, other=0)
        vb2 = tl.load(V_ptr + src + QUARTER, mask=b_mask, other=0)
        k1 = tl.interleave(kb1 & 15, kb1 >> 4).to(tl.float32)
        k2 = tl.interleave(kb2 & 15, kb2 >> 4).to(tl.float32)
        v1 = tl.interleave(vb1 & 15, vb1 >> 4).to(tl.float32)
        v2 = tl.interleave(vb2 & 15, vb2 >> 4).to(tl.float32)
        ks_row = (h * G + t // GROUP)[:, None] * D + j[None, :]  # [BLOCK_T, BLOCK_HALF]
        k1 = k1 * tl.load(KS_ptr + ks_row, mask=mask, other=0.0).to(tl.float32) + tl.load(
            KM_ptr + ks_row, mask=mask, other=0.0
        ).to(tl.float32)
        k2 = k2 * tl.load(KS_ptr + ks_row + HALF, mask=mask, other=0.0).to(tl.float32) + tl.load(
            KM_ptr + ks_row + HALF, mask=mask, other=0.0
        ).to(tl.float32)
        vs = tl.load(VS_ptr + row, mask=t_mask, other=0.0).to(tl.float32)[:, None]
        vm = tl.load(VM_ptr + row, mask=t_mask, other=0.0).to(tl.float32)[:, None]
        v1 = v1 * vs + vm
        v2 = v2 * vs + vm
    else:
        src = row[:, None] * D + j[None, :]
        k1 = tl.load(K_ptr + src, mask=mask, other=0).to(tl.float32)
        k2 = tl.load(K_ptr + src + HALF, mask=mask, other=0).to(tl.float32)
        v1 = tl.load(V_ptr + src, mask=mask, other=0).to(tl.float32)
        v2 = tl.load(V_ptr + src + HALF, mask=mask, other=0).to(tl.float32)
        if CODEC == 1:
            ks = h * D + j
            k1 = k1 * tl.load(KS_ptr + ks, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            k2 = k2 * tl.load(KS_ptr + ks + HALF, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            vs = tl.load(VS_ptr + row, mask=t_mask, other=0.0).to(tl.float32)[:, None]
            v1 = v1 * vs
            v2 = v2 * vs

    _rotate_store(k1, k2, v1, v2, offset + t, mask, j, j_mask, h, COS_ptr, SIN_ptr, KO_ptr, VO_ptr,
                  sko_h, sko_t, sko_d, svo_h, svo_t, svo_d, HALF)  # fmt: skip


@triton.jit
def _rotate_store(
    k1, k2, v1, v2, dst_t, mask, j, j_mask, h, COS_ptr, SIN_ptr, KO_ptr, VO_ptr,
    sko_h, sko_t, sko_d, svo_h, svo_t, svo_d, HALF: tl.constexpr,
):  # fmt: skip
    """Rotate decoded fp32 key halves by (cos, sin), write keys and values at cache rows ``dst_t``."""
    c1 = tl.load(COS_ptr + j, mask=j_mask, other=0.0)[None, :]
    c2 = tl.load(COS_ptr + HALF + j, mask=j_mask, other=0.0)[None, :]
    s1 = tl.load(SIN_ptr + j, mask=j_mask, other=0.0)[None, :]
    s2 = tl.load(SIN_ptr + HALF + j, mask=j_mask, other=0.0)[None, :]
    ko1 = k1 * c1 - k2 * s1
    ko2 = k2 * c2 + k1 * s2

    ko = KO_ptr + h * sko_h + dst_t[:, None] * sko_t + j[None, :] * sko_d
    tl.store(ko, ko1.to(KO_ptr.dtype.element_ty), mask=mask)
    tl.store(ko + HALF * sko_d, ko2.to(KO_ptr.dtype.element_ty), mask=mask)
    vo = VO_ptr + h * svo_h + dst_t[:, None] * svo_t + j[None, :] * svo_d
    tl.store(vo, v1.to(VO_ptr.dtype.element_ty), mask=mask)
    tl.store(vo + HALF * svo_d, v2.to(VO_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kept_rows(
    IDX_ptr, OK_ptr, OV_ptr, OKS_ptr, OVS_ptr, COS_ptr, SIN_ptr, KO_ptr, VO_ptr,
    n, offset, sko_h, sko_t, sko_d, svo_h, svo_t, svo_d, pid_t, h,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """int2's kept tokens: BLOCK_T of the n int8 rows of one kv head, decoded (x = q * scale, one
    scale per row), rotated and written over their 2-bit rows at cache rows offset + idx[t]."""
    HALF: tl.constexpr = D // 2
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = t < n
    j = tl.arange(0, BLOCK_HALF).to(tl.int64)
    j_mask = j < HALF
    mask = t_mask[:, None] & j_mask[None, :]
    row = h * n + t
    src = row[:, None] * D + j[None, :]
    ks = tl.load(OKS_ptr + row, mask=t_mask, other=0.0).to(tl.float32)[:, None]
    vs = tl.load(OVS_ptr + row, mask=t_mask, other=0.0).to(tl.float32)[:, None]
    k1 = tl.load(OK_ptr + src, mask=mask, other=0).to(tl.float32) * ks
    k2 = tl.load(OK_ptr + src + HALF, mask=mask, other=0).to(tl.float32) * ks
    v1 = tl.load(OV_ptr + src, mask=mask, other=0).to(tl.float32) * vs
    v2 = tl.load(OV_ptr + src + HALF, mask=mask, other=0).to(tl.float32) * vs
    dst_t = offset + tl.load(IDX_ptr + t, mask=t_mask, other=0).to(tl.int64)
    _rotate_store(k1, k2, v1, v2, dst_t, mask, j, j_mask, h, COS_ptr, SIN_ptr, KO_ptr, VO_ptr,
                  sko_h, sko_t, sko_d, svo_h, svo_t, svo_d, HALF)  # fmt: skip


@triton.jit
def _rerotate_scatter_kernel(
    K_ptr,  # raw: [H, T, D] model dtype; int8: [H, T, D] int8; int4: [H, T, D/2] uint8 (contiguous)
    V_ptr,  # same as K_ptr
    KS_ptr,  # key scales: int8 [H, D]; int4 [H, G, D] fp16 (unused for raw)
    KM_ptr,  # key mins: int4 [H, G, D] fp16 (unused otherwise)
    VS_ptr,  # value scales [H, T] fp16 (unused for raw)
    VM_ptr,  # value mins [H, T] fp16 (int4 only)
    COS_ptr,  # [D] fp32
    SIN_ptr,  # [D] fp32
    KO_ptr,  # [H, N, D] output keys, strided
    VO_ptr,  # [H, N, D] output values, strided
    T,
    G,  # key scale groups per head (int4: ceil(T / 128); int2: codec.int2_groups; int8: 1)
    S,  # int2: tokens per key group
    offset,
    sko_h,
    sko_t,
    sko_d,
    svo_h,
    svo_t,
    svo_d,
    D: tl.constexpr,
    CODEC: tl.constexpr,  # 0 raw, 1 int8, 2 int4
    GROUP: tl.constexpr,  # int4 key group size in tokens
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # next power of two >= D / 2
    ROW: tl.constexpr,  # int2 family: bytes per (head, token) row (0 otherwise)
    USE_DOT: tl.constexpr,  # int2r/int2m: the Hadamard as a tensor-core dot (BLOCK_T, D / 2 >= 16)
):
    """One program = BLOCK_T tokens of one kv head of the chunk (see ``_decode_rotate_store``)."""
    _decode_rotate_store(
        K_ptr, V_ptr, KS_ptr, KM_ptr, VS_ptr, VM_ptr, COS_ptr, SIN_ptr, KO_ptr, VO_ptr,
        T, G, S, offset, sko_h, sko_t, sko_d, svo_h, svo_t, svo_d,
        tl.program_id(0), tl.program_id(1).to(tl.int64), D, CODEC, GROUP, BLOCK_T, BLOCK_HALF, ROW, USE_DOT,
    )  # fmt: skip


@triton.jit
def _packed_program(META_ptr, KO_ptr, VO_ptr, N_CHUNKS, sko_l, svo_l, META_COLS: tl.constexpr):
    """The packed kernels' program dim 2 (layer * C + chunk) -> (chunk, its launch-table row, the
    layer's K and V outputs)."""
    g = tl.program_id(2).to(tl.int64)
    layer = g // N_CHUNKS
    return g % N_CHUNKS, META_ptr + g * META_COLS, KO_ptr + layer * sko_l, VO_ptr + layer * svo_l


@triton.jit
def _rerotate_scatter_packed_kernel(
    DATA_ptr,  # the packed buffer viewed as the codec's data dtype (raw: model dtype; int8; uint8)
    SC_ptr,  # the same buffer viewed as fp16 (scales and mins)
    META_ptr,  # [C, META_COLS] int64, see reference.PackedLayout.meta
    COS_ptr,  # [C, D] fp32
    SIN_ptr,  # [C, D] fp32
    KO_ptr,
    VO_ptr,
    sko_h,
    sko_t,
    sko_d,
    svo_h,
    svo_t,
    svo_d,
    N_CHUNKS,
    sko_l,
    svo_l,
    D: tl.constexpr,
    CODEC: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    META_COLS: tl.constexpr,
    ROW: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    """Every chunk of one layer (or of several: META [layers, C, META_COLS] contiguous, outputs
    ``sko_l``/``svo_l`` apart per layer) in one launch: program (t-block, kv head, layer * C +
    chunk). Blocks past a shorter chunk's end are fully masked. int2m: column 8 is k_pos's byte
    offset (a uint8 view)."""
    c, m, KO_ptr, VO_ptr = _packed_program(META_ptr, KO_ptr, VO_ptr, N_CHUNKS, sko_l, svo_l, META_COLS)
    T = tl.load(m)
    if CODEC == 5:
        vm_ptr = DATA_ptr + tl.load(m + 8)
    else:
        vm_ptr = SC_ptr + tl.load(m + 8)
    _decode_rotate_store(
        DATA_ptr + tl.load(m + 3), DATA_ptr + tl.load(m + 4),
        SC_ptr + tl.load(m + 5), SC_ptr + tl.load(m + 6), SC_ptr + tl.load(m + 7), vm_ptr,
        COS_ptr + c * D, SIN_ptr + c * D, KO_ptr, VO_ptr,
        T, tl.load(m + 2), tl.load(m + 9), tl.load(m + 1), sko_h, sko_t, sko_d, svo_h, svo_t, svo_d,
        tl.program_id(0), tl.program_id(1).to(tl.int64), D, CODEC, GROUP, BLOCK_T, BLOCK_HALF, ROW, USE_DOT,
    )  # fmt: skip


@triton.jit
def _kept_rows_packed_kernel(
    I8_ptr,  # the packed buffer viewed as int8 (o_k, o_v)
    SC_ptr,  # ... as fp16 (o_ks, o_vs)
    I32_ptr,  # ... as int32 (o_idx)
    META_ptr,  # [C, META_COLS] int64 (or [layers, C, META_COLS], see the packed kernel)
    COS_ptr, SIN_ptr, KO_ptr, VO_ptr, sko_h, sko_t, sko_d, svo_h, svo_t, svo_d, N_CHUNKS, sko_l, svo_l,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, META_COLS: tl.constexpr,
):  # fmt: skip
    """int2's kept rows of every chunk of one layer (or several): program (t-block, kv head,
    layer * C + chunk)."""
    c, m, KO_ptr, VO_ptr = _packed_program(META_ptr, KO_ptr, VO_ptr, N_CHUNKS, sko_l, svo_l, META_COLS)
    _kept_rows(
        I32_ptr + tl.load(m + 11), I8_ptr + tl.load(m + 12), I8_ptr + tl.load(m + 13),
        SC_ptr + tl.load(m + 14), SC_ptr + tl.load(m + 15), COS_ptr + c * D, SIN_ptr + c * D, KO_ptr, VO_ptr,
        tl.load(m + 10), tl.load(m + 1), sko_h, sko_t, sko_d, svo_h, svo_t, svo_d,
        tl.program_id(0), tl.program_id(1).to(tl.int64), D, BLOCK_T, BLOCK_HALF,
    )  # fmt: skip


@triton.jit
def _kept_rows_kernel(
    IDX_ptr, OK_ptr, OV_ptr, OKS_ptr, OVS_ptr, COS_ptr, SIN_ptr, KO_ptr, VO_ptr,
    n, offset, sko_h, sko_t, sko_d, svo_h, svo_t, svo_d,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """int2's kept rows of one chunk-layer: program (t-block, kv head)."""
    _kept_rows(
        IDX_ptr, OK_ptr, OV_ptr, OKS_ptr, OVS_ptr, COS_ptr, SIN_ptr, KO_ptr, VO_ptr,
        n, offset, sko_h, sko_t, sko_d, svo_h, svo_t, svo_d,
        tl.program_id(0), tl.program_id(1).to(tl.int64), D, BLOCK_T, BLOCK_HALF,
    )  # fmt: skip


def rerotate_scatter(
    codec: str,
    parts: Mapping[str, torch.Tensor],  # one layer of the codec's tensors, see reference.decode_layer
    cos: torch.Tensor,  # [D] fp32, halves duplicated (HF layout), for the position delta
    sin: torch.Tensor,  # [D] fp32
    k_out: torch.Tensor,  # [kv_heads, N, D] model dtype, may be a strided view
    v_out: torch.Tensor,  # [kv_heads, N, D]
    offset: int,
    *,
    block_t: int | None = None,
) -> None:
    """Write the decoded, re-rotated chunk into ``k_out[:, offset:offset+T]`` / ``v_out`` in place.

    ``block_t`` (tokens per program, a power of two) overrides the launch heuristic (benchmarks).
    """
    check_parts(codec, parts)
    if codec == "raw":
        kv = parts["kv"]
        k_src, v_src = kv[0].contiguous(), kv[1].contiguous()
    elif codec in INT2_FAMILY:
        fam = int2_family(codec)
        rows = parts["rows"].contiguous()  # [H, T, row_bytes(D)]
        d = k_out.shape[-1]
        if codec != "int2" and d & (d - 1):
            raise ValueError(f"codec {codec!r} needs a power-of-two head_dim, got {d}")
        if rows.shape[-1] != fam["row_bytes"](d):
            raise ValueError(
                f"codec {codec!r} rows have last dim {rows.shape[-1]}, head_dim {d} needs {fam['row_bytes'](d)}"
            )
        sec = fam["sections"](rows, parts["side"].contiguous())
        k_src, v_src = rows, rows[..., fam["value_offset"](d) :]  # V_ptr: the value codes' start
    else:
        k_src, v_src = parts["k_q"].contiguous(), parts["v_q"].contiguous()
    h, t = k_src.shape[0], k_src.shape[1]
    d = k_out.shape[-1]
    if k_out.shape != v_out.shape or k_out.dim() != 3 or k_out.shape[0] != h:
        raise ValueError(
            f"k_out/v_out must be [{h}, N, D], got {tuple(k_out.shape)} and {tuple(v_out.shape)}"
        )
    per_byte = {"int4": 2, "int2": 4, "int2r": 4, "int2m": 8}.get(codec, 1)
    if d % (2 * per_byte):
        raise ValueError(f"head_dim {d} must be divisible by {2 * per_byte} for codec {codec!r}")
    if codec not in INT2_FAMILY and k_src.shape[-1] != d // per_byte:
        raise ValueError(f"codec {codec!r} data has last dim {k_src.shape[-1]}, head_dim is {d}")
    if offset < 0 or offset + t > k_out.shape[1]:
        raise ValueError(f"chunk of {t} tokens at offset {offset} does not fit in {k_out.shape[1]} slots")
    if k_src.device != k_out.device:  # host-to-device copies (pinned, overlapped) are the caller's job
        raise ValueError(f"codec parts are on {k_src.device} but the cache is on {k_out.device}")
    if t == 0:
        return
    cos = cos.to(device=k_out.device, dtype=torch.float32).contiguous()
    sin = sin.to(device=k_out.device, dtype=torch.float32).contiguous()
    if cos.shape != (d,) or sin.shape != (d,):
        raise ValueError(f"cos/sin must be [{d}], got {tuple(cos.shape)} and {tuple(sin.shape)}")

    groups, group_tokens = 1, 1
    ks = km = vs = vm = k_src  # placeholders the kernel never reads for this codec
    row_bytes = 0
    if codec == "int2m":  # views into side (int2m_sections checked its size); k_pos in VM's slot
        ks, km, vs, vm = sec["k_scale"], sec["k_min"], sec["v_scale"], sec["k_pos"]
        groups, group_tokens = int2_groups(t)
        row_bytes = rows.shape[-1]
    elif codec in INT2_FAMILY:  # views into rows / side (int2_sections checked the side's size)
        ks, km = sec["k_scale"], sec["k_min"]
        sm = rows.view(torch.float16)  # [H, T, R/2]: the kernel steps R/2 fp16 units per row
        vs, vm = sm[..., d // 4], sm[..., d // 4 + 1]
        groups, group_tokens = int2_groups(t)
        row_bytes = rows.shape[-1]
    elif codec == "int8":
        ks, vs = parts["k_scale"].contiguous(), parts["v_scale"].contiguous()
    elif codec == "int4":
        ks, km = parts["k_scale"].contiguous(), parts["k_min"].contiguous()
        vs, vm = parts["v_scale"].contiguous(), parts["v_min"].contiguous()
        groups = ks.shape[1]
        if groups != triton.cdiv(t, INT4_GROUP):
            raise ValueError(
                f"int4 k_scale has {groups} groups, {t} tokens need {triton.cdiv(t, INT4_GROUP)}"
            )

    block_half = triton.next_power_of_2(d // 2)
    if block_t is None:
        # H100, 8 kv heads, D 128: 16-64 tokens per program all reach ~1.4-2.3 TB/s at 8K tokens;
        # short chunks are latency-bound (~15-40 us per launch) whatever the block.
        block_t = max(1, min(32, 4096 // block_half, triton.next_power_of_2(t)))
        if codec in ("int2r", "int2m"):  # its value decode is a tensor-core dot: >= 16 rows
            block_t = max(block_t, 16)
    grid = (triton.cdiv(t, block_t), h)
    _rerotate_scatter_kernel[grid](
        k_src,
        v_src,
        ks,
        km,
        vs,
        vm,
        cos,
        sin,
        k_out,
        v_out,
        t,
        groups,
        group_tokens,
        offset,
        *k_out.stride(),
        *v_out.stride(),
        D=d,
        CODEC=_CODEC_ID[codec],
        GROUP=INT4_GROUP,
        BLOCK_T=block_t,
        BLOCK_HALF=block_half,
        ROW=row_bytes,
        USE_DOT=block_t >= 16 and block_half >= 16,
        num_warps=4,
    )
    if codec in INT2_FAMILY:  # after the 2-bit rows (stream order): the kept rows overwrite theirs
        idx = sec["o_idx"]
        n = idx.shape[0]
        if n:
            _kept_rows_kernel[(triton.cdiv(n, block_t), h)](
                idx, sec["o_k"], sec["o_v"], sec["o_ks"], sec["o_vs"], cos, sin, k_out, v_out,
                n, offset, *k_out.stride(), *v_out.stride(),
                D=d, BLOCK_T=block_t, BLOCK_HALF=block_half, num_warps=4,
            )  # fmt: skip


def rerotate_scatter_packed(
    layout,  # reference.PackedLayout
    buf: torch.Tensor,  # 1-D uint8 on the device: every chunk's parts of one layer
    cos: torch.Tensor,  # [C, D] fp32 on the device
    sin: torch.Tensor,  # [C, D] fp32
    k_out: torch.Tensor,  # [kv_heads, N, D] model dtype, may be a strided view
    v_out: torch.Tensor,
    *,
    block_t: int | None = None,
) -> None:
    """Every chunk of one layer in one launch (see ``reference.rerotate_scatter_packed_reference``).

    The checks that do not depend on the buffer (shapes, alignment, fit) ran in ``layout.add``
    and ``layout.meta``; here only the buffer and outputs are checked, so a layer costs one launch
    and a few attribute reads."""
    _launch_packed(layout, layout.meta(buf.device), 1, buf, cos, sin, k_out, v_out, 0, 0, block_t)


def rerotate_scatter_layers(
    layouts: list,  # reference.PackedLayout per layer, their tables one [L, C, META_COLS] tensor
    buf: torch.Tensor,  # 1-D uint8 on the device: every layer's parts at the layouts' offsets
    cos: torch.Tensor,  # [C, D] fp32 on the device
    sin: torch.Tensor,
    k_out: torch.Tensor,  # [L, kv_heads, N, D] (e.g. kv[:, 0]), may be strided
    v_out: torch.Tensor,
    *,
    block_t: int | None = None,
) -> bool:
    """``rerotate_scatter_packed`` of every layer in one launch, when the layers' launch tables
    are consecutive rows of one tensor (``PackedLayout.series``) and their chunks agree in length
    and destination; returns False (nothing done) otherwise, for the caller's per-layer loop."""
    first, n_layers = layouts[0], len(layouts)
    if k_out.dim() != 4 or k_out.shape[0] != n_layers or v_out.shape != k_out.shape:
        raise ValueError(f"k_out/v_out must be [{n_layers}, H, N, D], got {tuple(k_out.shape)}")
    metas = [lay.meta(buf.device) for lay in layouts]
    row = metas[0].numel() * metas[0].element_size()
    base = metas[0]
    for j, (lay, m) in enumerate(zip(layouts, metas, strict=True)):
        if (
            m.data_ptr() != base.data_ptr() + j * row
            or not m.is_contiguous()
            or lay.tokens != first.tokens
            or lay.dests != first.dests
            or lay.codec != first.codec
        ):
            return False
    table = torch.as_strided(base, (n_layers, *base.shape), (base.shape[0] * base.shape[1], *base.stride()))
    end = max(lay.nbytes for lay in layouts)
    _launch_packed(
        first, table, n_layers, buf, cos, sin, k_out[0], v_out[0], k_out.stride(0), v_out.stride(0), block_t,
        kept=max(max(lay.kept, default=0) for lay in layouts), nbytes=end,
    )  # fmt: skip
    return True


def _launch_packed(
    layout, meta, n_layers, buf, cos, sin, k_out, v_out, sko_l, svo_l, block_t, kept=None, nbytes=None
) -> None:
    h, d, n_chunks = layout.heads, layout.head_dim, len(layout.tokens)
    if n_chunks == 0:
        return
    nbytes = layout.nbytes if nbytes is None else nbytes
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < nbytes:
        raise ValueError(f"buffer must be 1-D uint8 of at least {nbytes} bytes")
    if k_out.shape != v_out.shape or k_out.dim() != 3 or k_out.shape[0] != h or k_out.shape[2] != d:
        raise ValueError(f"k_out/v_out must be [{h}, N, {d}], got {tuple(k_out.shape)}, {tuple(v_out.shape)}")
    if max(t + o for t, o in zip(layout.tokens, layout.dests, strict=True)) > k_out.shape[1]:
        raise ValueError(f"chunks do not fit in {k_out.shape[1]} cache slots")
    if cos.shape != (n_chunks, d) or sin.shape != (n_chunks, d):
        raise ValueError(f"cos/sin must be [{n_chunks}, {d}] fp32")
    data_dtype = layout.data_dtype()
    usable = buf.numel() - buf.numel() % 8
    data = buf[:usable].view(data_dtype)
    scales = buf[:usable].view(torch.float16)
    block_half = triton.next_power_of_2(d // 2)
    t_max = max(layout.tokens)
    if block_t is None:
        block_t = max(1, min(32, 4096 // block_half, triton.next_power_of_2(t_max)))
        if layout.codec in ("int2r", "int2m"):  # its value decode is a tensor-core dot: >= 16 rows
            block_t = max(block_t, 16)
    grid = (triton.cdiv(t_max, block_t), h, n_chunks * n_layers)
    _rerotate_scatter_packed_kernel[grid](
        data,
        scales,
        meta,
        cos,
        sin,
        k_out,
        v_out,
        *k_out.stride(),
        *v_out.stride(),
        n_chunks,
        sko_l,
        svo_l,
        D=d,
        CODEC=_CODEC_ID[layout.codec],
        GROUP=INT4_GROUP,
        BLOCK_T=block_t,
        BLOCK_HALF=block_half,
        META_COLS=META_COLS,
        ROW=layout.row_bytes(),
        USE_DOT=block_t >= 16 and block_half >= 16,
        num_warps=4,
    )
    if layout.codec in INT2_FAMILY:  # after the 2-bit rows (stream order): the kept rows overwrite theirs
        n_max = max(layout.kept) if kept is None else kept
        if n_max:
            _kept_rows_packed_kernel[(triton.cdiv(n_max, block_t), h, n_chunks * n_layers)](
                buf[:usable].view(torch.int8), scales, buf[:usable].view(torch.int32), meta,
                cos, sin, k_out, v_out, *k_out.stride(), *v_out.stride(), n_chunks, sko_l, svo_l,
                D=d, BLOCK_T=block_t, BLOCK_HALF=block_half, META_COLS=META_COLS, num_warps=4,
            )  # fmt: skip
