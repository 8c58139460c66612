"""Codec round trips, error bounds per codec, the fixed byte formats, odd shapes."""

from __future__ import annotations

import pytest
import torch

from chunkcache.codec import (
    CODECS,
    INT2_KEEP_FIRST,
    INT4_GROUP,
    get_codec,
    hadamard_matrix,
    hadamard_signs,
    int2_groups,
    int2_kept,
    int2_sections,
    int2m_hi,
    int2m_sections,
    rotation_weights,
)

SHAPES = [(2, 1, 1, 64), (2, 3, 129, 64), (1, 3, 300, 128), (3, 2, 128, 64), (1, 1, 5, 2)]  # L, H, T, D


def make_kv(L, H, T, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(L, 2, H, T, D, generator=g)  # [L, 2, H, T, D]
    kv[:, 0] *= 1 + 5 * torch.rand(L, H, 1, D, generator=g)  # per-channel key outliers
    return kv.to(dtype)


def assert_close_bounded(got, want, bound, what):
    err = (got.float() - want.float()).abs()
    bad = err > bound
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} values off, first at {idx}: err {err[tuple(idx)]:.4g} > {bound[tuple(idx)]:.4g}"
        )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_raw_is_exact(shape, dtype):
    kv = make_kv(*shape, dtype=dtype)
    parts = CODECS["raw"].encode(kv)
    assert list(parts) == ["kv"] and parts["kv"].dtype == dtype
    out = CODECS["raw"].decode(parts, dtype)
    assert out.dtype == dtype and torch.equal(out, kv)


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_is_half_a_step(shape):
    kv = make_kv(*shape)
    L, H, T, D = shape
    parts = CODECS["int8"].encode(kv)
    assert parts["k_q"].dtype == torch.int8 and tuple(parts["k_q"].shape) == (L, H, T, D)
    assert parts["v_q"].dtype == torch.int8 and tuple(parts["v_q"].shape) == (L, H, T, D)
    assert parts["k_scale"].dtype == torch.float16 and tuple(parts["k_scale"].shape) == (L, H, D)
    assert parts["v_scale"].dtype == torch.float16 and tuple(parts["v_scale"].shape) == (L, H, T)
    out = CODECS["int8"].decode(parts, torch.float32)
    k, v = kv[:, 0].float(), kv[:, 1].float()
    k_step = (k.abs().amax(dim=2, keepdim=True) / 127).expand_as(k)  # per channel
    v_step = (v.abs().amax(dim=3, keepdim=True) / 127).expand_as(v)  # per token
    # half a quantisation step, plus fp16 rounding of the scale (2^-11 relative) times up to 127 steps
    assert_close_bounded(out[:, 0], k, 0.5 * k_step * 1.001 + k.abs() * 2**-10 + 1e-6, "int8 keys")
    assert_close_bounded(out[:, 1], v, 0.5 * v_step * 1.001 + v.abs() * 2**-10 + 1e-6, "int8 values")
    # decode follows the spec formula exactly
    want = parts["k_q"].float() * parts["k_scale"].float()[:, :, None, :]
    assert torch.equal(out[:, 0], want)


@pytest.mark.parametrize("shape", SHAPES)
def test_int4_error_is_half_a_step_of_the_group_range(shape):
    kv = make_kv(*shape)
    L, H, T, D = shape
    G = -(-T // INT4_GROUP)
    parts = CODECS["int4"].encode(kv)
    expect = {
        "k_q": ((L, H, T, D // 2), torch.uint8),
        "v_q": ((L, H, T, D // 2), torch.uint8),
        "k_scale": ((L, H, G, D), torch.float16),
        "k_min": ((L, H, G, D), torch.float16),
        "v_scale": ((L, H, T), torch.float16),
        "v_min": ((L, H, T), torch.float16),
    }
    assert {n: (tuple(p.shape), p.dtype) for n, p in parts.items()} == expect
    out = CODECS["int4"].decode(parts, torch.float32)
    k, v = kv[:, 0].float(), kv[:, 1].float()
    k_step = torch.empty_like(k)
    for g in range(G):
        sl = slice(g * INT4_GROUP, (g + 1) * INT4_GROUP)
        rng = k[:, :, sl].amax(dim=2, keepdim=True) - k[:, :, sl].amin(dim=2, keepdim=True)
        k_step[:, :, sl] = rng / 15
    v_step = ((v.amax(dim=3, keepdim=True) - v.amin(dim=3, keepdim=True)) / 15).expand_as(v)
    # half a step, plus fp16 rounding of min (|min| 2^-11) and of scale (15 steps x 2^-11 relative)
    kb = 0.5 * k_step + (k.abs() + 15 * k_step) * 2**-10 + 1e-6
    vb = 0.5 * v_step + (v.abs() + 15 * v_step) * 2**-10 + 1e-6
    assert_close_bounded(out[:, 0], k, kb, "int4 keys")
    assert_close_bounded(out[:, 1], v, vb, "int4 values")


def test_int4_packing_is_low_nibble_first():
    # One token whose values are 0..15 along head_dim: min 0, scale 1, so the codes are the values.
    kv = torch.zeros(1, 2, 1, 1, 16)
    kv[0, 1, 0, 0] = torch.arange(16.0)
    parts = CODECS["int4"].encode(kv)
    assert parts["v_scale"].item() == 1.0 and parts["v_min"].item() == 0.0
    assert parts["v_q"][0, 0, 0].tolist() == [
        q0 | (q1 << 4) for q0, q1 in zip(range(0, 16, 2), range(1, 16, 2), strict=True)
    ]
    assert torch.equal(CODECS["int4"].decode(parts, torch.float32), kv)


def test_int2_keeps_chunk_start_and_outliers_at_8_bits():
    """The first tokens and an outlier token are kept (int8 rows, exact to half an int8 step) and
    left out of the key ranges, so the other tokens keep a fine 2-bit step."""
    L, H, T, D = 2, 2, 300, 64
    kv = make_kv(L, H, T, D, dtype=torch.float32)
    kv[:, :, :, 77] *= 40.0  # token 77: an outlier in keys and values, in every layer
    parts = CODECS["int2"].encode(kv)
    n = int2_kept(T)
    idx = torch.stack([int2_sections(parts["rows"][i], parts["side"][i])["o_idx"].long() for i in range(L)])
    assert tuple(idx.shape) == (L, n) and n == INT2_KEEP_FIRST + 6
    for layer in range(L):
        assert set(range(INT2_KEEP_FIRST)) | {77} <= set(idx[layer].tolist())
    out = CODECS["int2"].decode(parts, torch.float32)
    for layer in range(L):
        x = kv[layer][:, :, idx[layer]]  # [2, H, n, D] kept rows
        step = x.abs().amax(dim=3, keepdim=True) / 127
        assert ((out[layer][:, :, idx[layer]] - x).abs() <= 0.5 * step * 1.01 + 1e-6).all()
    # the rest: within half a step of a range computed without the kept tokens (clipping may only
    # shrink a range, so the error bound is the step of the unshrunk range plus the clipped part)
    G, S = int2_groups(T)
    rest = torch.ones(T, dtype=torch.bool)
    rest[idx[0]] = False
    k = kv[0, 0][:, rest]
    assert (out[0, 0][:, rest] - k).abs().max() < (k.amax() - k.amin()) / 3  # 77's range would be 40x
    assert (out[0, 0][:, 77] - kv[0, 0][:, 77]).abs().max() < kv[0, 0][:, 77].abs().max() / 200


def test_int2_packing_is_planar():
    """Byte b of a row holds elements b, b + D/4, b + D/2, b + 3D/4 in bits 0-1, 2-3, 4-5, 6-7."""
    D = 8
    kv = torch.zeros(1, 2, 1, 300, D)
    kv[0, 1, 0, :, :] = torch.tensor([0.0, 1, 2, 3, 3, 2, 1, 0])  # every value row the same codes
    parts = CODECS["int2"].encode(kv)
    sec = int2_sections(parts["rows"][0], parts["side"][0])
    assert parts["rows"][0, 0, 100, 2:4].tolist() == [
        0 | 2 << 2 | 3 << 4 | 1 << 6,
        1 | 3 << 2 | 2 << 4 | 0 << 6,
    ]
    assert torch.equal(sec["v_q"][0, 100], parts["rows"][0, 0, 100, 2:4])
    assert sec["v_scale"][0, 100] == 1 and sec["v_min"][0, 100] == 0  # fp16 (scale, min) after the codes
    rest = torch.ones(300, dtype=torch.bool)
    rest[sec["o_idx"].long()] = False  # kept rows are int8 (not exact for 1 and 2 of 3)
    assert torch.equal(CODECS["int2"].decode(parts, torch.float32)[:, :, :, rest], kv[:, :, :, rest])


def test_int2_needs_head_dim_multiple_of_4():
    with pytest.raises(ValueError, match="multiple of 4"):
        CODECS["int2"].encode(torch.zeros(1, 2, 1, 4, 62))


@pytest.mark.parametrize("name", ["int8", "int4", "int2", "int2r", "int2m"])
def test_zeros_stay_zeros(name):
    kv = torch.zeros(2, 2, 3, 129, 64, dtype=torch.bfloat16)
    kv[0, 0, 0, :, 5] = 3.0  # one non-zero channel next to all-zero ones
    out = CODECS[name].decode(CODECS[name].encode(kv), torch.float32)
    assert torch.isfinite(out).all()
    zero = kv.float() == 0
    assert (out[zero] == 0).all()


def test_decode_layer_matches_decode():
    kv = make_kv(3, 2, 200, 64)
    for codec in CODECS.values():
        parts = codec.encode(kv)
        full = codec.decode(parts, torch.bfloat16)
        for layer in range(3):
            assert torch.equal(
                codec.decode_layer({**parts, "token_ids": torch.zeros(1)}, layer, torch.bfloat16), full[layer]
            )


def test_int4_needs_even_head_dim():
    with pytest.raises(ValueError, match="even"):
        CODECS["int4"].encode(torch.zeros(1, 2, 1, 4, 63))


def test_bad_inputs_and_names():
    with pytest.raises(ValueError, match="layers, 2"):
        CODECS["int8"].encode(torch.zeros(1, 3, 1, 4, 64))
    with pytest.raises(ValueError, match="float16 range"):
        CODECS["int8"].encode(torch.full((1, 2, 1, 2, 4), 1e8))
    with pytest.raises(ValueError, match="known: int2, int2m, int2r, int4, int8, raw"):
        get_codec("zstd")


def test_sizes_against_bf16():
    L, H, T, D = 30, 3, 512, 64  # SmolLM2-135M chunk
    bf16 = L * 2 * H * T * D * 2
    kv = make_kv(L, H, T, D)
    for name, codec in CODECS.items():
        parts = codec.encode(kv)
        nbytes = sum(p.numel() * p.element_size() for p in parts.values())
        assert nbytes == codec.nbytes(L, H, T, D, torch.bfloat16), name
    assert bf16 / CODECS["int4"].nbytes(L, H, T, D, torch.bfloat16) >= 3.5
    assert bf16 / CODECS["int2"].nbytes(L, H, T, D, torch.bfloat16) >= 6.0
    assert CODECS["int2r"].nbytes(L, H, T, D, torch.bfloat16) == CODECS["int2"].nbytes(
        L, H, T, D, torch.bfloat16
    )
    assert bf16 / CODECS["int8"].nbytes(L, H, T, D, torch.bfloat16) >= 1.9


def test_hadamard_rotation_is_orthogonal_and_fixed():
    for d in (4, 16, 64, 128):
        h, s = hadamard_matrix(d), hadamard_signs(d)
        assert torch.equal(h, h.T) and torch.equal(h @ h, d * torch.eye(d))
        assert set(s.tolist()) == {-1.0, 1.0}
    # the signs are a formula (no entry stores them): pinned, so a change is a format change
    assert hadamard_signs(16).tolist() == [1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, 1, -1, 1]
    assert torch.equal(rotation_weights(64), hadamard_signs(64) / 8)


@pytest.mark.parametrize("shape", [(2, 3, 129, 64), (1, 2, 300, 128), (1, 1, 5, 16), (2, 1, 1, 4)])
def test_int2r_decodes_its_formula_and_keeps_int2_keys(shape):
    """Same keys, layout and kept tokens as int2 would code for these values; values decode as
    (q @ H * scale + D * min at column 0) * sign / sqrt(D), and invert the encode's rotation."""
    L, H, T, D = shape
    kv = make_kv(L, H, T, D, dtype=torch.float32)
    parts = CODECS["int2r"].encode(kv)
    assert {n: (tuple(p.shape), p.dtype) for n, p in parts.items()} == {
        n: (tuple(m.shape), m.dtype) for n, m in CODECS["int2r"].part_shapes(kv.shape, torch.float32).items()
    }
    out = CODECS["int2r"].decode(parts, torch.float32)
    hm, w = hadamard_matrix(D), rotation_weights(D)
    for layer in range(L):
        sec = int2_sections(parts["rows"][layer], parts["side"][layer])
        q = torch.cat([sec["v_q"] >> (2 * i) & 3 for i in range(4)], dim=-1).float()  # planar
        vr = q * sec["v_scale"].float()[..., None] + sec["v_min"].float()[..., None]  # rotated domain
        want = (vr @ hm) * w
        rest = torch.ones(T, dtype=torch.bool)
        rest[sec["o_idx"].long()] = False
        torch.testing.assert_close(out[layer, 1][:, rest], want[:, rest], atol=1e-5, rtol=1e-5)
        # kept rows: the unrotated values at int8 (half a step)
        idx = sec["o_idx"].long()
        x = kv[layer, 1][:, idx]
        assert (
            (out[layer, 1][:, idx] - x).abs() <= 0.5 * x.abs().amax(-1, keepdim=True) / 127 * 1.01 + 1e-6
        ).all()
    # the encode rotated by exactly this matrix: a 2-bit code of the rotated row is within half a step there
    vr_true = ((kv[:, 1] * hadamard_signs(D)) @ hm) / D**0.5
    vr_dec = ((out[:, 1] * hadamard_signs(D)) @ hm) / D**0.5
    span = vr_true.amax(-1, keepdim=True) - vr_true.amin(-1, keepdim=True)
    assert (
        (vr_dec - vr_true).abs() <= span / 3 / 2 * 1.01 + span * 0.41 + 1e-5
    ).all()  # clipping <= 0.4 of the span
    # keys: int2's exactly (the rotation touches values only)
    k2 = CODECS["int2"].decode(CODECS["int2"].encode(kv), torch.float32)[:, 0]
    assert torch.equal(out[:, 0][:, :, :4], k2[:, :, :4])  # the first tokens, kept by both


def test_int2r_spreads_a_value_outlier_channel():
    """A value channel 8x larger than the rest makes int2's per-token range coarse for every other
    channel; int2r's rotation spreads it over the row, so its value error is less than half int2's
    (on Gaussian rows without an outlier the two are within 2%)."""
    err = {}
    for outlier in (1.0, 8.0):
        kv = make_kv(2, 2, 256, 64, dtype=torch.float32)
        kv[:, 1, :, :, 7] *= outlier
        for name in ("int2", "int2r"):
            out = CODECS[name].decode(CODECS[name].encode(kv), torch.float32)
            err[name, outlier] = float(((out[:, 1] - kv[:, 1]) ** 2).sum() / (kv[:, 1] ** 2).sum())
    assert err["int2r", 8.0] < err["int2", 8.0] / 2, err
    assert abs(err["int2r", 1.0] - err["int2", 1.0]) < 0.02 * err["int2", 1.0], err


@pytest.mark.parametrize("d", [80, 96, 2, 12])
def test_int2r_needs_power_of_two_head_dim(d):
    with pytest.raises(ValueError, match="power of two"):
        CODECS["int2r"].encode(torch.zeros(1, 2, 1, 4, d))
    with pytest.raises(ValueError, match="power of two"):
        CODECS["int2r"].part_shapes([1, 2, 1, 4, d], torch.float32)


@pytest.mark.parametrize("shape", [(2, 3, 129, 64), (1, 2, 300, 128), (1, 1, 5, 16), (2, 2, 260, 32)])
def test_int2m_codes_the_widest_key_quarter_at_4_bits(shape):
    """Per (layer, head) the D/4 key channels of widest range take the first slots, in ascending
    order, at 4 bits; the decode equals the formula; keys of the hi channels are within half a
    4-bit step of the group range, values within int2r's rotated bound; kept rows are int8."""
    L, H, T, D = shape
    kv = make_kv(L, H, T, D, dtype=torch.float32)
    parts = CODECS["int2m"].encode(kv)
    assert {n: (tuple(p.shape), p.dtype) for n, p in parts.items()} == {
        n: (tuple(m.shape), m.dtype) for n, m in CODECS["int2m"].part_shapes(kv.shape, torch.float32).items()
    }
    out = CODECS["int2m"].decode(parts, torch.float32)
    m = int2m_hi(D)
    G, S = int2_groups(T)
    for layer in range(L):
        sec = int2m_sections(parts["rows"][layer], parts["side"][layer])
        idx = sec["o_idx"].long()
        rest = torch.ones(T, dtype=torch.bool)
        rest[idx] = False
        k = kv[layer, 0]
        for head in range(H):
            pos = sec["k_pos"][head].long()
            assert sorted(pos.tolist()) == list(range(D))
            hi = (pos < m).nonzero().flatten()
            assert torch.equal(pos[hi], torch.arange(m))  # ascending channels, ascending slots
            if rest.any():  # (a chunk of 5 tokens keeps them all: no range to rank)
                span = k[head][rest].amax(0) - k[head][rest].amin(0)  # [D]
                assert set(hi.tolist()) == set(span.topk(m).indices.tolist())
        # 4-bit channels: half a step of their group's range, plus clipping (<= 0.4 of the range)
        hi_ch = sec["k_pos"].long() < m  # [H, D]
        for g in range(G):
            sl = torch.zeros(T, dtype=torch.bool)
            sl[g * S : (g + 1) * S] = True
            sel = sl & rest
            if not sel.any():
                continue
            x = k[:, sel]
            rng = x.amax(1) - x.amin(1)  # [H, D]
            err = (out[layer, 0][:, sel] - x).abs().amax(1)
            bound = torch.where(hi_ch, rng / 15 / 2 + 0.41 * rng, rng / 3 / 2 + 0.41 * rng) * 1.01 + 1e-4
            assert (err <= bound).all()
        # kept rows exact to half an int8 step
        for kind in (0, 1):
            x = kv[layer, kind][:, idx]
            assert (
                (out[layer, kind][:, idx] - x).abs() <= x.abs().amax(-1, keepdim=True) / 254 * 1.01 + 1e-6
            ).all()
        # values: the symmetric formula through the inverse rotation
        q = torch.cat([sec["v_q"] >> (2 * i) & 3 for i in range(4)], dim=-1).float()
        want = (((q - 1.5) * sec["v_scale"].float()[..., None]) @ hadamard_matrix(D)) * rotation_weights(D)
        torch.testing.assert_close(out[layer, 1][:, rest], want[:, rest], atol=1e-5, rtol=1e-5)


def test_int2m_is_at_least_6x_smaller_than_bf16_for_chunks_of_300_tokens():
    for L, H, D in ((30, 3, 64), (32, 8, 128)):
        for T in (300, 512, 600, 2048):
            assert L * 2 * H * T * D * 2 / CODECS["int2m"].nbytes(L, H, T, D, torch.bfloat16) >= 6.0, (
                L,
                H,
                T,
                D,
            )


@pytest.mark.parametrize("d", [80, 8, 4])
def test_int2m_needs_power_of_two_head_dim_of_16(d):
    with pytest.raises(ValueError, match="power of two"):
        CODECS["int2m"].encode(torch.zeros(1, 2, 1, 4, d))
