"""Triton kernels vs their plain-torch references, over odd and prime shapes and each dtype.

Without CUDA the kernels run through the Triton interpreter (``TRITON_INTERPRET=1``, set below
before any kernel module is imported; no other test uses triton). With CUDA the same tests run
compiled on the GPU, and the ``gpu``-marked tests add realistic shapes:

    pytest tests/test_kernels.py              # CPU: interpreter, small grids
    pytest tests/test_kernels.py -m gpu       # device machine: large shapes, compiled
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Read when a @triton.jit decorator runs: triton's own library functions at ``import triton``,
    # ours at kernel-module import. So it must be set before triton is first imported.
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from chunkcache import kernels  # noqa: E402
from chunkcache.kernels import probe_attention_triton as pa  # noqa: E402
from chunkcache.kernels import reference  # noqa: E402
from chunkcache.kernels import rerotate_scatter_triton as rr  # noqa: E402
from chunkcache.kernels import selected_attention_triton as sa  # noqa: E402

# If something imported triton earlier in this process without the flag, its library is compiled-
# only and cannot be interpreted: then the kernel tests run in a fresh process instead (see below).
RUNNABLE = CUDA or "Interpreted" in type(triton.language.standard.sum).__name__
kernel_test = pytest.mark.skipif(not RUNNABLE, reason="triton imported before TRITON_INTERPRET; run afresh")

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Interpreter tl.dot mishandles bf16 (numpy has no bfloat16); compiled bf16 is tested on the GPU.
DOT_DTYPES = DTYPES if CUDA else [torch.float32, torch.float16]
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """Like torch.testing.assert_close, but names the worst index and how many elements fail."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double().cpu(), expected.double().cpu()
    err = (a - e).abs()
    bad = err > atol + rtol * e.abs()
    bad |= a.isnan() != e.isnan()
    if bad.any():
        excess = torch.where(bad, err - rtol * e.abs(), torch.zeros_like(err)).nan_to_num(float("inf"))
        worst = tuple(int(i) for i in torch.unravel_index(excess.argmax(), err.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements off (atol={atol}, rtol={rtol}); worst at "
            f"index {worst}: got {a[worst].item():.6g}, expected {e[worst].item():.6g}; "
            f"first bad indices {[tuple(i.tolist()) for i in bad.nonzero()[:5]]}"
        )


# ---------------------------------------------------------------------------------------- helpers


def rope_cos_sin(delta: int, d: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """HF-layout cos/sin [d] (halves duplicated) for a rotation by ``delta`` positions."""
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.cat((inv_freq, inv_freq)) * delta
    return ang.cos().float(), ang.sin().float()


def make_parts(codec: str, h: int, t: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """Random parts of one layer in the codec's format (random codes and scales, not an encode)."""

    def half(*shape, lo=0.01, hi=0.1):
        return (torch.rand(*shape, generator=gen) * (hi - lo) + lo).half()

    if codec == "raw":
        return {"kv": torch.randn(2, h, t, d, generator=gen).to(dtype)}
    if codec == "int8":
        q = lambda: torch.randint(-127, 128, (h, t, d), generator=gen, dtype=torch.int8)  # noqa: E731
        return {"k_q": q(), "v_q": q(), "k_scale": half(h, d), "v_scale": half(h, t)}
    if codec in ("int2", "int2r", "int2m"):  # random sections, laid out as codec.py lays them out
        from chunkcache.codec import int2_family, int2_groups

        fam = int2_family(codec)
        g, n = int2_groups(t)[0], fam["kept"](t)
        q8 = lambda: torch.randint(-127, 128, (h, n, d), generator=gen, dtype=torch.int8)  # noqa: E731
        mins = lambda *s: torch.randn(*s, generator=gen).half()  # noqa: E731
        sec = {
            "o_idx": torch.randperm(t, generator=gen)[:n].sort().values.to(torch.int32),
            "k_scale": half(h, g, d), "k_min": mins(h, g, d), "o_ks": half(h, n), "o_vs": half(h, n),
            "o_k": q8(), "o_v": q8(), "v_scale": half(h, t),
            "k_pos": torch.stack([torch.randperm(d, generator=gen) for _ in range(h)]).to(torch.uint8),
        }  # fmt: skip
        layout = fam["side_layout"](h, t, d)
        side = torch.zeros(layout["end"][0], dtype=torch.uint8)
        for name, (off, _, _) in layout.items():
            if name != "end":
                raw = sec[name].reshape(-1).view(torch.uint8)
                side[off : off + raw.numel()] = raw
        if codec == "int2m":
            return {"rows": torch.randint(0, 256, (h, t, fam["row_bytes"](d)), generator=gen, dtype=torch.uint8),
                    "side": side}  # fmt: skip
        q = lambda: torch.randint(0, 256, (h, t, d // 4), generator=gen, dtype=torch.uint8)  # noqa: E731
        sm = torch.stack([half(h, t), mins(h, t)], dim=-1).view(torch.uint8)  # [H, T, 4]
        return {"rows": torch.cat([q(), q(), sm], dim=-1), "side": side}
    g = -(-t // reference.INT4_GROUP)
    q = lambda: torch.randint(0, 256, (h, t, d // 2), generator=gen, dtype=torch.uint8)  # noqa: E731
    mins = lambda *s: torch.randn(*s, generator=gen).half()  # noqa: E731
    return {
        "k_q": q(),
        "v_q": q(),
        "k_scale": half(h, g, d),
        "k_min": mins(h, g, d),
        "v_scale": half(h, t),
        "v_min": mins(h, t),
    }


def to_device(parts: dict, device: str) -> dict:
    return {name: x.to(device) for name, x in parts.items()}


# Output tolerances: one rounding to the dtype from fp32 math (interpreter bf16 casts may truncate).
RR_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def check_rerotate_scatter(codec, h, t, d, n, offset, dtype, delta, seed=0, layout="layers", block_t=None):
    gen = torch.Generator().manual_seed(seed)
    parts = make_parts(codec, h, t, d, dtype, gen)
    cos, sin = rope_cos_sin(delta, d)
    if layout == "layers":  # k_out/v_out = slices of a [layers, 2, H, N, D] buffer
        buf = torch.full((2, 2, h, n, d), 7.0, dtype=dtype)
        want = buf.clone()
        reference.rerotate_scatter_reference(codec, parts, cos, sin, want[1, 0], want[1, 1], offset)
        buf = buf.to(DEVICE)
        rr.rerotate_scatter(
            codec, to_device(parts, DEVICE), cos, sin, buf[1, 0], buf[1, 1], offset, block_t=block_t
        )
    else:  # token-major buffer [N, 2, H, D] seen as [H, N, D]: inner strides not contiguous in N
        buf = torch.full((n, 2, h, d), 7.0, dtype=dtype)
        want = buf.clone()
        reference.rerotate_scatter_reference(
            codec, parts, cos, sin, want[:, 0].transpose(0, 1), want[:, 1].transpose(0, 1), offset
        )
        buf = buf.to(DEVICE)
        k_out, v_out = buf[:, 0].transpose(0, 1), buf[:, 1].transpose(0, 1)
        rr.rerotate_scatter(codec, to_device(parts, DEVICE), cos, sin, k_out, v_out, offset)
    atol, rtol = RR_TOL[dtype]
    assert_close(
        buf, want, atol, rtol, f"rerotate_scatter[{codec}, {dtype}, H={h} T={t} D={d} N={n} @{offset}]"
    )


# ------------------------------------------------------------------------------- rerotate_scatter


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("codec", ["raw", "int8", "int4", "int2", "int2r", "int2m"])
@pytest.mark.parametrize(
    ("h", "t", "d", "n", "offset"),
    [(3, 131, 64, 300, 17), (1, 7, 128, 11, 4), (2, 1, 80, 5, 4), (2, 129, 32, 131, 0), (2, 20, 16, 30, 3)],
)
@kernel_test
def test_rerotate_scatter_matches_reference(codec, dtype, h, t, d, n, offset):
    """Every codec on odd shapes (D 16: int2r's value decode without the tensor-core dot; D 80:
    int2r refuses a head_dim its Hadamard rotation does not exist for)."""
    if codec in ("int2r", "int2m") and d & (d - 1):
        gen = torch.Generator().manual_seed(0)
        parts = make_parts("int2", h, t, d, dtype, gen)
        out = torch.zeros(h, n, d, dtype=dtype, device=DEVICE)
        with pytest.raises(ValueError, match="power-of-two"):
            rr.rerotate_scatter(
                "int2r", to_device(parts, DEVICE), *rope_cos_sin(1, d), out, out.clone(), offset
            )
        return
    check_rerotate_scatter(codec, h, t, d, n, offset, dtype, delta=offset + 1234)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rerotate_scatter_raw_fp32_chunk_into_lower_precision_cache(dtype):
    """``fuse.assemble`` hands fp32 chunks (a lossy codec's decode) to the raw form: rotated in
    fp32 and rounded once to the cache's dtype, as the reference does."""
    gen = torch.Generator().manual_seed(5)
    parts = make_parts("raw", 3, 37, 64, torch.float32, gen)
    cos, sin = rope_cos_sin(913, 64)
    want_k, want_v = torch.zeros(3, 50, 64, dtype=dtype), torch.zeros(3, 50, 64, dtype=dtype)
    reference.rerotate_scatter_reference("raw", parts, cos, sin, want_k, want_v, 9)
    k, v = torch.zeros_like(want_k).to(DEVICE), torch.zeros_like(want_v).to(DEVICE)
    rr.rerotate_scatter("raw", to_device(parts, DEVICE), cos, sin, k, v, 9)
    atol, rtol = RR_TOL[dtype]
    assert_close(k, want_k, atol, rtol, f"raw fp32 -> {dtype} keys")
    assert_close(v, want_v, atol, rtol, f"raw fp32 -> {dtype} values")  # (interpreter casts truncate)


@kernel_test
@pytest.mark.parametrize("codec", ["raw", "int4", "int2", "int2r", "int2m"])
def test_rerotate_scatter_token_major_output(codec):
    check_rerotate_scatter(codec, 2, 37, 64, 53, 9, torch.float16, delta=-5, layout="token_major")


@kernel_test
@pytest.mark.parametrize("block_t", [1, 4, 64])
@pytest.mark.parametrize("codec", ["int4", "int2r", "int2m"])
def test_rerotate_scatter_block_sizes(codec, block_t):
    """int2r: blocks under 16 rows take the broadcast-sum Hadamard, 64 the dot."""
    check_rerotate_scatter(codec, 2, 131, 64, 140, 5, torch.float16, delta=77, block_t=block_t)


@kernel_test
def test_rerotate_scatter_zero_delta_is_plain_decode():
    """Rotation by 0 is the identity: the kernel must then equal the codec decode exactly (fp32)."""
    gen = torch.Generator().manual_seed(1)
    parts = make_parts("int4", 2, 131, 64, torch.float32, gen)
    cos, sin = rope_cos_sin(0, 64)
    k_out = torch.zeros(2, 140, 64, device=DEVICE)
    v_out = torch.zeros_like(k_out)
    rr.rerotate_scatter("int4", to_device(parts, DEVICE), cos, sin, k_out, v_out, 9)
    k, v = reference.decode_layer("int4", parts)
    assert torch.equal(k_out[:, 9:].cpu(), k) and torch.equal(v_out[:, 9:].cpu(), v)


@kernel_test
def test_rerotate_scatter_rejects_overflow():
    parts = make_parts("raw", 1, 10, 64, torch.float32, torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(3, 64)
    out = torch.zeros(1, 12, 64)
    for fn in (rr.rerotate_scatter, reference.rerotate_scatter_reference):
        with pytest.raises(ValueError, match="does not fit"):
            fn("raw", parts, cos, sin, out, out.clone(), 5)


def pack_layer(codec: str, chunks: list[dict], dests: list[int], h: int, d: int, align: int = 256):
    """Pack chunks' parts of one layer back to back into one uint8 buffer, as the pipeline does."""
    layout = reference.PackedLayout(codec, h, d)
    pieces, off = [], 0
    for parts, dest in zip(chunks, dests, strict=True):
        spec = {}
        for name in reference.CODEC_PARTS[codec]:
            raw = parts[name].contiguous().view(-1).view(torch.uint8)
            spec[name] = (off, parts[name].dtype, tuple(parts[name].shape))
            pad = -(-raw.numel() // align) * align
            pieces.append(torch.cat([raw, torch.zeros(pad - raw.numel(), dtype=torch.uint8)]))
            off += pad
        layout.add(spec, dest)
    return layout, torch.cat(pieces)


@kernel_test
@pytest.mark.parametrize("codec", ["raw", "int8", "int4", "int2", "int2r", "int2m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rerotate_scatter_packed_matches_per_chunk(codec, dtype):
    """One launch for chunks of different lengths (one spanning two int4 key groups; int2: two
    key groups of 130 and 129 tokens), each with its own rotation, equals the per-chunk reference;
    slots outside the chunks are left untouched."""
    gen = torch.Generator().manual_seed(3)
    h, d, lengths = 2, 64, [37, 131 if codec not in ("int2", "int2r", "int2m") else 259, 5]
    if codec == "raw":
        chunks = [{"kv": torch.randn(2, h, t, d, generator=gen).to(dtype)} for t in lengths]
    else:
        chunks = [make_parts(codec, h, t, d, dtype, gen) for t in lengths]
    dests = [3, 3 + 37 + 4, 3 + 37 + 4 + lengths[1]]
    n = dests[-1] + 5 + 6
    layout, buf = pack_layer(codec, chunks, dests, h, d)
    cos = torch.stack([rope_cos_sin(dl, d)[0] for dl in (11, -7, 900)])
    sin = torch.stack([rope_cos_sin(dl, d)[1] for dl in (11, -7, 900)])
    want_k = torch.full((h, n, d), 7.0, dtype=dtype)
    want_v = want_k.clone()
    for c, parts in enumerate(chunks):
        reference.rerotate_scatter_reference(codec, parts, cos[c], sin[c], want_k, want_v, dests[c])
    # the packed reference (the CPU path) and the kernel
    ref_k, ref_v = torch.full_like(want_k, 7.0), torch.full_like(want_v, 7.0)
    reference.rerotate_scatter_packed_reference(layout, buf, cos, sin, ref_k, ref_v)
    assert torch.equal(ref_k, want_k) and torch.equal(ref_v, want_v)
    kv = torch.full((2, h, n, d), 7.0, dtype=dtype, device=DEVICE)  # strided outputs, like buf[l]
    rr.rerotate_scatter_packed(layout, buf.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), kv[0], kv[1])
    atol, rtol = RR_TOL[dtype]
    assert_close(kv[0], want_k, atol, rtol, f"packed {codec} keys")
    assert_close(kv[1], want_v, atol, rtol, f"packed {codec} values")


@kernel_test
def test_checksums_match_reference_and_catch_damage():
    gen = torch.Generator().manual_seed(5)
    buf = torch.randint(0, 256, (20000,), dtype=torch.uint8, generator=gen)
    table = torch.tensor([[0, 9000], [9216, 2], [9472, 10528], [512, 0]], dtype=torch.int64)
    want = reference.checksums_reference(buf, table)
    assert want[3].tolist() == [0, 0]
    got = kernels.checksums(buf.to(DEVICE), table.to(DEVICE), 10528)
    if not CUDA:  # the dispatcher takes the reference on CPU tensors: run the kernel itself too
        from chunkcache.kernels import checksum_triton as ck

        got = ck.checksums(buf, table, 10528, block=1024)
    assert torch.equal(got.cpu(), want)
    for pos, flip in [(4000, 0x01), (19999, 0x80)]:  # one bit, in the first and in the last range
        bad = buf.clone()
        bad[pos] ^= flip
        assert not torch.equal(reference.checksums_reference(bad, table), want)
    swapped = buf.clone()  # two words swapped: the first sum holds, the weighted one does not
    swapped[100:102], swapped[200:202] = buf[200:202], buf[100:102]
    a, b = reference.sum64(swapped[:9000]), reference.sum64(buf[:9000])
    assert a[0] == b[0] and a[1] != b[1]


def test_packed_layout_rejects_bad_input():
    layout = reference.PackedLayout("int8", 2, 64)
    with pytest.raises(ValueError, match="needs parts"):
        layout.add({"k_q": (0, torch.int8, (2, 5, 64))}, 0)
    ok = {"k_q": (0, torch.int8, (2, 5, 64)), "v_q": (640, torch.int8, (2, 5, 64)),
          "k_scale": (1280, torch.float16, (2, 64)), "v_scale": (1537, torch.float16, (2, 5))}  # fmt: skip
    with pytest.raises(ValueError, match="aligned"):
        layout.add(ok, 0)
    with pytest.raises(ValueError, match="heads"):
        reference.PackedLayout("raw", 4, 64).add({"kv": (0, torch.float32, (2, 2, 5, 64))}, 0)
    with pytest.raises(ValueError, match="unknown codec"):
        reference.PackedLayout("fp8", 2, 64)


def test_reference_decode_matches_codec_module():
    """The kernels' decode agrees with chunkcache.codec (the store's formats) layer by layer."""
    codec_mod = pytest.importorskip("chunkcache.codec")
    kv = torch.randn(2, 2, 3, 131, 64, generator=torch.Generator().manual_seed(2))
    for name in ("raw", "int8", "int4", "int2", "int2r", "int2m"):
        codec = codec_mod.get_codec(name)
        parts = codec.encode(kv)
        for layer in range(2):
            one = {p: x[layer] for p, x in parts.items()}
            k, v = reference.decode_layer(name, one)
            want = codec.decode_layer(parts, layer, torch.float32)
            assert_close(k, want[0], 0, 0, f"decode {name} keys, layer {layer}")
            assert_close(v, want[1], 0, 0, f"decode {name} values, layer {layer}")


# ----------------------------------------------------------------------------- selected_attention

SA_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def check_selected_attention(hq, hkv, d, n_keys, n, dtype, window=None, seed=0, q_major=False, config=None):
    gen = torch.Generator().manual_seed(seed)
    if q_major:  # q as a [n, Hq, D] buffer seen as [Hq, n, D]
        q = torch.randn(n, hq, d, generator=gen).to(dtype).transpose(0, 1)
    else:
        q = torch.randn(hq, n, d, generator=gen).to(dtype)
    k = torch.randn(hkv, n_keys, d, generator=gen).to(dtype)
    v = torch.randn(hkv, n_keys, d, generator=gen).to(dtype)
    pos = torch.randperm(n_keys - 2, generator=gen)[: n - 2] + 1
    pos = torch.cat((torch.tensor([0, n_keys - 1]), pos)).sort().values  # first and last position too
    scale = 0.9 * d**-0.5
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    want, want_lse = reference.selected_attention_reference(
        dev(q).float(), dev(pos), dev(k).float(), dev(v).float(), scale=scale, window=window, return_lse=True
    )
    out, lse = sa.selected_attention(
        dev(q), dev(pos), dev(k), dev(v), scale=scale, window=window, return_lse=True, config=config
    )
    assert out.dtype == dtype and out.shape == (hq, n, d)
    atol, rtol = SA_TOL[dtype]
    name = f"selected_attention[{dtype}, Hq={hq} Hkv={hkv} D={d} N={n_keys} n={n} window={window}]"
    assert_close(out, want, atol, rtol, name + " out")
    assert_close(lse, want_lse, 1e-4 if dtype == torch.float32 else 1e-2, 1e-4, name + " lse")


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "n_keys", "n", "window"),
    [
        (4, 2, 64, 293, 37, None),  # GQA 2, N prime, n not a multiple of the block
        (2, 1, 128, 131, 20, None),  # D = 128
        (3, 3, 80, 97, 13, None),  # D not a power of two, MHA
        (4, 2, 64, 293, 37, 50),  # sliding window
        (2, 2, 64, 257, 71, 1),  # window 1: each query sees only itself
    ],
)
@kernel_test
def test_selected_attention_matches_reference(dtype, hq, hkv, d, n_keys, n, window):
    check_selected_attention(hq, hkv, d, n_keys, n, dtype, window)


@kernel_test
def test_selected_attention_strided_q_and_no_lse():
    check_selected_attention(4, 1, 64, 127, 29, torch.float32, q_major=True)
    q = torch.randn(2, 3, 64, device=DEVICE)
    kv = torch.randn(1, 10, 64, device=DEVICE)
    out = sa.selected_attention(q, torch.tensor([2, 5, 9], device=DEVICE), kv, kv)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 64)


@kernel_test
def test_selected_attention_first_token_sees_only_itself():
    """q_pos = 0 attends to key 0 alone: the output is v[0] exactly, whatever q is."""
    q = torch.randn(2, 1, 64, device=DEVICE)
    k = torch.randn(1, 50, 64, device=DEVICE)
    v = torch.randn(1, 50, 64, device=DEVICE)
    out = sa.selected_attention(q, torch.tensor([0], device=DEVICE), k, v)
    assert_close(out, v[0, :1].expand(2, 1, 64), 1e-6, 0, "q_pos=0")


# -------------------------------------------------------------------------------- probe_attention


def check_probe_attention(hq, hkv, d, n_keys, n, dtype, window=None, seed=0, pad=0, config=None):
    """The question (the last n positions of an ``n_keys - pad`` prompt) over a buffer of n_keys
    keys, of which the last ``pad`` are past the prompt (a padded graph buffer)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, n, d, generator=gen).to(dtype)
    k = (torch.randn(hkv, n_keys, d, generator=gen) * 2).to(dtype)  # peaky: mass far from uniform
    v = torch.randn(hkv, n_keys, d, generator=gen).to(dtype)
    end = n_keys - pad
    pos = torch.arange(end - n, end)
    scale = 0.9 * d**-0.5
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    want, want_mass = reference.probe_attention_reference(
        dev(q).float(), dev(pos), dev(k).float(), dev(v).float(), scale=scale, window=window
    )
    out, mass = pa.probe_attention(
        dev(q), dev(pos), dev(k), dev(v), scale=scale, window=window, config=config
    )
    assert out.dtype == dtype and out.shape == (hq, n, d) and mass.shape == (n_keys,)
    atol, rtol = SA_TOL[dtype]
    name = f"probe_attention[{dtype}, Hq={hq} Hkv={hkv} D={d} N={n_keys} n={n} window={window} pad={pad}]"
    assert_close(out, want, atol, rtol, name + " out")
    tol = 1e-6 if dtype == torch.float32 else 2e-3 / max(1, n_keys // 64)
    assert_close(mass, want_mass, tol, 1e-3 if dtype == torch.float32 else 2e-2, name + " mass")
    assert abs(float(mass.sum()) - 1.0) < 1e-3, f"{name}: mass sums to {float(mass.sum())}"
    if pad:
        assert not mass[end:].any(), f"{name}: keys past the prompt got mass"


@pytest.mark.parametrize("dtype", DOT_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "n_keys", "n", "window", "pad"),
    [
        (4, 2, 64, 293, 9, None, 0),  # GQA 2, N prime: rows (group x queries) = 18
        (2, 1, 128, 131, 20, None, 37),  # D = 128, a padded buffer
        (3, 3, 80, 97, 13, None, 0),  # D not a power of two, MHA
        (4, 2, 64, 293, 9, 50, 0),  # sliding window
    ],
)
@kernel_test
def test_probe_attention_matches_reference(dtype, hq, hkv, d, n_keys, n, window, pad):
    check_probe_attention(hq, hkv, d, n_keys, n, dtype, window, pad=pad)


@kernel_test
def test_probe_attention_split_configs():
    """Many splits (some past the last query, some empty) and row blocks give the same result."""
    for config in [(16, 32, 1, 4, 1), (16, 32, 5, 4, 1), (32, 16, 40, 4, 1)]:
        check_probe_attention(4, 2, 64, 301, 7, torch.float32, pad=90, config=config)


# ----------------------------------------------------------------------------------- the package


def test_dispatch_uses_reference_on_cpu():
    parts = make_parts("int8", 2, 9, 64, torch.float32, torch.Generator().manual_seed(4))
    cos, sin = rope_cos_sin(11, 64)
    got_k, got_v = torch.zeros(2, 20, 64), torch.zeros(2, 20, 64)
    kernels.rerotate_scatter("int8", parts, cos, sin, got_k, got_v, 3)
    want_k, want_v = torch.zeros(2, 20, 64), torch.zeros(2, 20, 64)
    reference.rerotate_scatter_reference("int8", parts, cos, sin, want_k, want_v, 3)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    q, k = torch.randn(4, 3, 64), torch.randn(2, 10, 64)
    pos = torch.tensor([1, 4, 9])
    assert torch.equal(
        kernels.selected_attention(q, pos, k, k), reference.selected_attention_reference(q, pos, k, k)
    )
    got, want = kernels.probe_attention(q, pos, k, k), reference.probe_attention_reference(q, pos, k, k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("codec", ["raw", "int8", "int4", "int2", "int2r", "int2m"])
def test_packed_layout_shifted_equals_built(codec):
    """A shifted layout (the pipeline's per-layer launch tables) equals one built at those offsets."""
    gen = torch.Generator().manual_seed(5)
    chunks = [make_parts(codec, 2, t, 64, torch.float16, gen) for t in (9, 16)]
    base, moved, off = reference.PackedLayout(codec, 2, 64), reference.PackedLayout(codec, 2, 64), 0
    deltas = []
    for dest, parts in zip((3, 12), chunks, strict=True):
        where, where2, delta = {}, {}, {}
        for name, x in parts.items():
            nbytes = x.numel() * x.element_size()
            where[name] = (off, x.dtype, tuple(x.shape))
            delta[name] = 2 * nbytes
            where2[name] = (off + 2 * nbytes, x.dtype, tuple(x.shape))
            off += 4 * nbytes
        base.add(where, dest)
        moved.add(where2, dest)
        deltas.append(delta)
    got = base.shifted(deltas)
    assert torch.equal(got.meta("cpu"), moved.meta("cpu")) and got.chunks == moved.chunks
    assert got.nbytes == moved.nbytes and got.tokens == moved.tokens and got.dests == moved.dests
    with pytest.raises(ValueError, match="cannot move"):
        base.shifted([{reference.CODEC_PARTS[codec][0]: 1 if codec == "raw" else -(10**9)}, {}])


@pytest.mark.parametrize("codec", ["raw", "int8", "int4", "int2"])
def test_packed_layout_series_equals_shifted(codec):
    """``series`` (the zero-copy loader's per-layer layouts, one launch table for all layers)
    equals ``shifted`` by j steps for every layer: tables, offsets, bounds."""
    gen = torch.Generator().manual_seed(6)
    chunks = [make_parts(codec, 2, t, 64, torch.float16, gen) for t in (9, 16, 300)]
    base, off, steps = reference.PackedLayout(codec, 2, 64), 0, []
    for dest, parts in zip((3, 12, 28), chunks, strict=True):
        where, step = {}, {}
        for name, x in parts.items():
            nbytes = x.numel() * x.element_size()
            where[name] = (off, x.dtype, tuple(x.shape))
            step[name] = nbytes
            off += 5 * nbytes  # 5 layers of each part side by side
        base.add(where, dest)
        steps.append(step)
    series = base.series(steps, 5, torch.device("cpu"))
    assert len(series) == 5
    for j, lay in enumerate(series):
        want = base.shifted([{k: j * b for k, b in d.items()} for d in steps])
        assert torch.equal(lay.meta("cpu"), want.meta("cpu")), j
        assert lay.chunks == want.chunks and lay.tokens == want.tokens and lay.dests == want.dests
        assert lay.nbytes >= want.nbytes and lay.data_dtype() == want.data_dtype()


@kernel_test
@pytest.mark.parametrize("codec", ["int8", "int2m"])
def test_rerotate_scatter_layers_one_launch_equals_each_layer(codec):
    """The zero-copy loader's assembly: every layer of a ``series`` (parts' layers side by side in
    one buffer, as in the device cache's arena) in one launch equals the per-layer reference into
    ``kv[l]``; a list of layouts that is no series takes the per-layer loop."""
    gen = torch.Generator().manual_seed(8)
    h, d, n_layers, lengths, dests = 2, 64, 3, [37, 20], [3, 44]
    layers = [[make_parts(codec, h, t, d, torch.float16, gen) for t in lengths] for _ in range(n_layers)]
    base, steps, pieces, off = reference.PackedLayout(codec, h, d), [], [], 0
    for c, dest in enumerate(dests):
        where, step = {}, {}
        for name in reference.CODEC_PARTS[codec]:
            raws = [layers[j][c][name].contiguous().view(-1).view(torch.uint8) for j in range(n_layers)]
            nb = -(-raws[0].numel() // 256) * 256  # each part's layers side by side, 256-aligned
            where[name] = (off, layers[0][c][name].dtype, tuple(layers[0][c][name].shape))
            step[name] = nb
            for r in raws:
                pieces.append(torch.cat([r, torch.zeros(nb - r.numel(), dtype=torch.uint8)]))
            off += n_layers * nb
        base.add(where, dest)
        steps.append(step)
    buf = torch.cat([*pieces, torch.zeros(n_layers * off, dtype=torch.uint8)])  # an arena's room after it
    cos = torch.stack([rope_cos_sin(dl, d)[0] for dl in (5, -3)])
    sin = torch.stack([rope_cos_sin(dl, d)[1] for dl in (5, -3)])
    n = dests[-1] + lengths[-1] + 4
    want = torch.full((n_layers, 2, h, n, d), 7.0, dtype=torch.float16)
    for j in range(n_layers):
        for c in range(len(dests)):
            reference.rerotate_scatter_reference(
                codec, layers[j][c], cos[c], sin[c], want[j, 0], want[j, 1], dests[c]
            )
    series = base.series(steps, n_layers, torch.device(DEVICE))
    kv = torch.full_like(want, 7.0, device=DEVICE)
    args = (buf.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), kv[:, 0], kv[:, 1])
    assert rr.rerotate_scatter_layers(series, *args)  # one launch
    atol, rtol = RR_TOL[torch.float16]
    assert_close(kv, want, atol, rtol, f"{codec} layers in one launch")
    shifted = [base.shifted([{k: j * b for k, b in st.items()} for st in steps]) for j in range(n_layers)]
    kv.fill_(7.0)
    assert not rr.rerotate_scatter_layers(shifted, *args)  # separate tables: not one series
    kernels.rerotate_scatter_layers(shifted, *args)  # the dispatcher then loops
    if CUDA:
        assert_close(kv, want, atol, rtol, f"{codec} layers one by one")


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from chunkcache.kernels import rerotate_scatter_triton as rr

one = {"K_ptr": "*u8", "V_ptr": "*u8", "KS_ptr": "*fp16", "KM_ptr": "*fp16", "VS_ptr": "*fp16",
       "VM_ptr": "*u8", "COS_ptr": "*fp32", "SIN_ptr": "*fp32", "KO_ptr": "*bf16", "VO_ptr": "*bf16",
       "T": "i32", "G": "i32", "S": "i32", "offset": "i32", "sko_h": "i32", "sko_t": "i32",
       "sko_d": "i32", "svo_h": "i32", "svo_t": "i32", "svo_d": "i32"}
packed = {"DATA_ptr": "*u8", "SC_ptr": "*fp16", "META_ptr": "*i64", "COS_ptr": "*fp32",
          "SIN_ptr": "*fp32", "KO_ptr": "*bf16", "VO_ptr": "*bf16", "sko_h": "i32", "sko_t": "i32",
          "sko_d": "i32", "svo_h": "i32", "svo_t": "i32", "svo_d": "i32", "N_CHUNKS": "i32",
          "sko_l": "i64", "svo_l": "i64"}
for codec, row in ((3, 68), (4, 68), (5, 72)):
    for fn, sig, extra in ((rr._rerotate_scatter_kernel, dict(one), {}),
                           (rr._rerotate_scatter_packed_kernel, packed, {"META_COLS": 16})):
        if codec != 5 and "VM_ptr" in sig:
            sig["VM_ptr"] = "*fp16"
        cst = {"D": 128, "CODEC": codec, "GROUP": 128, "BLOCK_T": 32, "BLOCK_HALF": 64, **extra,
               "ROW": row, "USE_DOT": True}
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in cst}}, constexprs=cst)
        assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm
"""


def test_int2_family_kernels_compile_for_sm90(tmp_path):
    """The interpreter runs the kernels as Python; this compiles the int2 family's decode (int2,
    int2r's dot, int2m's slot lookup; single-chunk and packed kernels, D 128) down to an H100/H200
    cubin, so a construct the GPU compiler refuses fails here too, with no GPU."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _COMPILE_SM90], check=True, env=env, cwd=tmp_path)


def test_package_import_is_light(tmp_path):
    """Importing chunkcache.kernels must not import triton (CPU machines without a driver)."""
    code = "import sys, chunkcache.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)


# ------------------------------------------------------------------------------- GPU, real shapes


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("codec", ["raw", "int8", "int4", "int2", "int2r", "int2m"])
def test_gpu_rerotate_scatter_llama_layer(codec, dtype):
    for block_t in (None, 8, 32):
        check_rerotate_scatter(codec, 8, 509, 128, 4099, 1031, dtype, delta=1030, block_t=block_t)
    check_rerotate_scatter(codec, 8, 509, 128, 4099, 3, dtype, delta=-1, layout="token_major")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("d", "window"), [(128, None), (64, None), (128, 1024)])
def test_gpu_selected_attention_large(dtype, d, window):
    check_selected_attention(32, 8, d, 4099, 613, dtype, window)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_selected_attention_long_context_configs(dtype):
    """n >= 2048 takes the (128, 128, 8, 3) launch; every benchmarked config must be exact too."""
    check_selected_attention(32, 8, 128, 16411, 2459, dtype)
    for config in [(64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 32, 4, 2)]:
        check_selected_attention(8, 2, 64, 1031, 211, dtype, config=config)
        check_selected_attention(8, 2, 128, 1031, 211, dtype, window=100, config=config)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_probe_attention_llama_shapes(dtype):
    """Llama-3-8B's heads, a 32-token question over 8K keys, and a padded 16K buffer."""
    check_probe_attention(32, 8, 128, 8192, 32, dtype)
    check_probe_attention(32, 8, 128, 16411, 45, dtype, pad=3000)
    check_probe_attention(32, 8, 128, 4099, 32, dtype, window=1024)


@gpu
@pytest.mark.gpu
def test_gpu_dispatch_uses_kernels():
    q = torch.randn(8, 40, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 300, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(40, device="cuda") * 7
    got = kernels.selected_attention(q, pos, k, k)
    assert_close(got, sa.selected_attention(q, pos, k, k), 0, 0, "dispatch")


def test_kernels_in_fresh_process():
    """Runs this file in a new interpreter-mode process when this one cannot interpret (see RUNNABLE)."""
    if RUNNABLE:
        pytest.skip("the kernel tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "not fresh_process",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


# -------------------------------------------------------- decoder-layer ops (rms_norm, silu, rope)

from chunkcache.kernels import layer_triton as lt  # noqa: E402

# One rounding to the dtype from fp32 math: fp16/bf16 results at most one ulp off (rtol = 2^-bits of
# mantissa), and bit-exact but where fp32 math differs (sum order, exp) and rounds the other way.
LAYER_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2**-24, 2**-10), torch.bfloat16: (0, 2**-7)}


def check_ulps(got: torch.Tensor, want: torch.Tensor, what: str, max_inexact: float = 0.01, ulps: int = 1):
    """At most ``ulps`` ulps apart (fp32: 1e-5), and at most ``max_inexact`` of the elements differ."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    atol, rtol = LAYER_TOL[want.dtype]
    scale = 1 if want.dtype == torch.float32 else ulps
    assert_close(got, want, atol * scale, rtol * scale, what)
    if want.dtype != torch.float32:
        got, want = got.cpu(), want.cpu()
        inexact = ((got != want) & ~(got.isnan() & want.isnan())).float().mean().item()
        assert inexact <= max_inexact, f"{what}: {inexact:.3%} of elements not bit-exact"


# rms_norm's y rounds twice (normed, then times the weight): where the fp32 sum of squares, summed in
# another order, tips normed to the neighbouring value, y can end two ulps away.
RMS_ULPS = 2


def on_device(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(DEVICE) for t in ts]


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize(("lead", "hidden"), [((7,), 48), ((1, 13), 96), ((3,), 64), ((2, 5), 130)])
def test_rms_norm_matches_reference(dtype, residual, lead, hidden):
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(*lead, hidden, generator=gen) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(hidden, generator=gen)).to(dtype)
    r = torch.randn(*lead, hidden, generator=gen).to(dtype) if residual else None
    want = reference.rms_norm_reference(x, w, 1e-5, r)
    got = lt.rms_norm(*on_device(x, w), 1e-5, *on_device(r))
    name = f"rms_norm[{dtype}, {(*lead, hidden)}, residual={residual}]"
    if residual:
        assert torch.equal(got[1].cpu(), want[1]), f"{name}: h != x + residual"
        got, want = got[0], want[0]
    assert got.shape == x.shape and got.is_contiguous()
    check_ulps(got, want, name, ulps=RMS_ULPS)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_strided_inputs(dtype):
    """Rows with a stride (slices of a wider buffer) and leading dims that cannot merge (a copy)."""
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(13, 3 * 96, generator=gen).to(dtype).to(DEVICE)
    x, r = wide[:, 96:192], wide[:, 192:]  # row stride 288
    w = torch.randn(96, generator=gen).to(dtype).to(DEVICE)
    y, h = lt.rms_norm(x, w, 1e-6, r)
    want_y, want_h = reference.rms_norm_reference(x, w, 1e-6, r)
    assert torch.equal(h, want_h)
    check_ulps(y, want_y, f"rms_norm strided rows [{dtype}]", ulps=RMS_ULPS)
    t = torch.randn(4, 3, 48, generator=gen).to(dtype).to(DEVICE).transpose(0, 1)  # [3, 4, 48]
    want = reference.rms_norm_reference(t, w[:48], 1e-6)
    check_ulps(lt.rms_norm(t, w[:48], 1e-6), want, "unmergeable", ulps=RMS_ULPS)


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 96), (13, 48), (3, 5, 37), (2, 1031), (1,)], ids=str)
def test_silu_mul_matches_reference(dtype, shape):
    gen = torch.Generator().manual_seed(8)
    gate = (torch.randn(*shape, generator=gen) * 4).to(dtype)
    up = torch.randn(*shape, generator=gen).to(dtype)
    got = lt.silu_mul(*on_device(gate, up))
    assert got.shape == gate.shape
    check_ulps(got, reference.silu_mul_reference(gate, up), f"silu_mul[{dtype}, {shape}]")


@kernel_test
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp
def test_silu_mul_special_values():
    """Saturated gates (exp overflows to inf: silu -> -0), zeros and NaN behave as in torch."""
    gate = torch.tensor([0.0, -0.0, 1e-30, 20.0, -20.0, 100.0, -100.0, float("nan"), 3.0])
    up = torch.tensor([1.0, 2.0, 3.0, -1.0, 5.0, 0.5, 7.0, 1.0, float("nan")])
    for dtype in DTYPES:
        g, u = gate.to(dtype), up.to(dtype)
        got = lt.silu_mul(*on_device(g, u))
        check_ulps(got, reference.silu_mul_reference(g, u), f"silu_mul special [{dtype}]", max_inexact=0)


def rope_cos_sin_table(positions: torch.Tensor, d: int, dtype: torch.dtype, base: float = 500000.0):
    """[n, d] cos and sin for rotary positions ``positions``, as HF's LlamaRotaryEmbedding (fp32
    angles, then the model dtype)."""
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def split_qkv(qkv: torch.Tensor, hq: int, hkv: int, d: int):
    """q [n, Hq, D], k and v [n, Hkv, D] as views of one fused projection output [n, (Hq+2Hkv) * D]."""
    n = qkv.shape[0]
    q = qkv[:, : hq * d].view(n, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(n, hkv, d)
    v = qkv[:, (hq + hkv) * d :].view(n, hkv, d)
    return q, k, v


def check_rope_qkv_scatter(hq, hkv, d, n, big_n, dtype, trig_dtype, seed=0):
    """Kernel vs reference: q out, and a [2 layers, 2, Hkv, N, D] cache of which layer 1 is
    written at shuffled positions; every other slot must keep its 7.0."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    positions = torch.randperm(big_n, generator=gen)[:n]  # distinct, any order
    cos, sin = rope_cos_sin_table(positions + 3, d, trig_dtype)
    buf = torch.full((2, 2, hkv, big_n, d), 7.0, dtype=dtype)
    want_buf = buf.clone()
    want_q = reference.rope_qkv_scatter_reference(
        *split_qkv(qkv, hq, hkv, d), cos, sin, positions, want_buf[1, 0], want_buf[1, 1]
    )
    buf, qkv, cos, sin, positions = on_device(buf, qkv, cos, sin, positions)
    got_q = lt.rope_qkv_scatter(*split_qkv(qkv, hq, hkv, d), cos, sin, positions, buf[1, 0], buf[1, 1])
    name = f"rope_qkv_scatter[{dtype}, cos {trig_dtype}, Hq={hq} Hkv={hkv} D={d} n={n} N={big_n}]"
    assert got_q.shape == (hq, n, d) and got_q.is_contiguous(), name
    check_ulps(got_q, want_q, name + " q")
    check_ulps(buf[1, 0], want_buf[1, 0], name + " k")
    assert torch.equal(buf[1, 1].cpu(), want_buf[1, 1]), name + ": v is not a plain copy"
    untouched = torch.ones(big_n, dtype=torch.bool)
    untouched[positions.cpu()] = False
    buf = buf.cpu()
    assert (buf[0] == 7).all() and (buf[1][:, :, untouched] == 7).all(), name + ": wrote outside positions"


@kernel_test
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("trig", ["fp32", "model"])
@pytest.mark.parametrize(
    ("hq", "hkv", "d", "n", "big_n"),
    [
        (4, 2, 64, 7, 20),  # GQA 2
        (4, 2, 80, 13, 31),  # D / 2 = 40: masked half blocks
        (2, 2, 96, 5, 16),  # MHA, D / 2 = 48
        (4, 1, 128, 37, 40),  # several token blocks, the last one partial
    ],
)
def test_rope_qkv_scatter_matches_reference(dtype, trig, hq, hkv, d, n, big_n):
    trig_dtype = torch.float32 if trig == "fp32" else dtype
    check_rope_qkv_scatter(hq, hkv, d, n, big_n, dtype, trig_dtype)


@kernel_test
def test_rope_qkv_scatter_skips_slots_outside_cache():
    """The kernel cannot raise on device values without a sync: out-of-range slots are not written."""
    q, k, v = (torch.randn(4, h, 64).to(DEVICE) for h in (2, 1, 1))
    cos, sin = on_device(*rope_cos_sin_table(torch.arange(4), 64, torch.float32))
    k_out, v_out = torch.zeros(2, 1, 10, 64, device=DEVICE)
    got = lt.rope_qkv_scatter(q, k, v, cos, sin, torch.tensor([3, 10, -1, 0], device=DEVICE), k_out, v_out)
    written = (v_out != 0).any(-1)[0].cpu()
    assert written.tolist() == [True, False, False, True] + [False] * 6
    assert torch.equal(v_out[0, 3], v[0, 0]) and torch.equal(v_out[0, 0], v[3, 0])
    want_q = reference.rope_qkv_scatter_reference(
        q, k, v, cos, sin, torch.arange(4, device=DEVICE), torch.zeros(1, 4, 64, device=DEVICE),
        torch.zeros(1, 4, 64, device=DEVICE),
    )  # fmt: skip
    check_ulps(got, want_q, "q with out-of-range slots")


def test_layer_references_match_torch_and_hf():
    """The references are the torch/HF expressions they stand for: LlamaRMSNorm and F.silu(g) * u
    bit for bit, HF's apply_rotary_pos_emb bit for bit in fp32 (in bf16 HF rounds after each op)."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    gen = torch.Generator().manual_seed(9)
    for dtype in DTYPES:
        norm = llama.LlamaRMSNorm(96, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(96, generator=gen))
            norm = norm.to(dtype)
            x = (torch.randn(1, 13, 96, generator=gen) * 3).to(dtype)
            assert torch.equal(reference.rms_norm_reference(x, norm.weight, 1e-5), norm(x)), dtype
            r = torch.randn(1, 13, 96, generator=gen).to(dtype)
            y, h = reference.rms_norm_reference(x, norm.weight, 1e-5, residual=r)
            assert torch.equal(h, x + r) and torch.equal(y, norm(x + r)), dtype
        gate = (torch.randn(7, 96, generator=gen) * 4).to(dtype)
        up = torch.randn(7, 96, generator=gen).to(dtype)
        silu_mul = torch.nn.functional.silu(gate) * up
        assert torch.equal(reference.silu_mul_reference(gate, up), silu_mul), dtype

    n, hq, hkv, d = 13, 4, 2, 64
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = split_qkv(torch.randn(n, (hq + 2 * hkv) * d, generator=gen).to(dtype), hq, hkv, d)
        cos, sin = rope_cos_sin_table(torch.arange(n) + 100, d, dtype)
        k_out, v_out = torch.zeros(2, hkv, n, d, dtype=dtype)
        got_q = reference.rope_qkv_scatter_reference(q, k, v, cos, sin, torch.arange(n), k_out, v_out)
        hf_q, hf_k = llama.apply_rotary_pos_emb(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None]
        )
        tol = (0, 0) if dtype == torch.float32 else (2**-6, 2**-6)
        assert_close(got_q, hf_q[0], *tol, f"rope q vs HF [{dtype}]")
        assert_close(k_out, hf_k[0], *tol, f"rope k vs HF [{dtype}]")
        assert torch.equal(v_out, v.transpose(0, 1))


def test_layer_dispatch_uses_reference_on_cpu():
    gen = torch.Generator().manual_seed(10)
    x, r = torch.randn(2, 5, 48, generator=gen).bfloat16()
    w = torch.randn(48, generator=gen).bfloat16()
    assert torch.equal(kernels.rms_norm(x, w, 1e-6), reference.rms_norm_reference(x, w, 1e-6))
    got, want = kernels.rms_norm(x, w, 1e-6, r), reference.rms_norm_reference(x, w, 1e-6, r)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(kernels.silu_mul(x, r), reference.silu_mul_reference(x, r))
    q, k, v = split_qkv(torch.randn(5, 8 * 64, generator=gen), 4, 2, 64)
    cos, sin = rope_cos_sin_table(torch.arange(5), 64, torch.float32)
    pos = torch.tensor([4, 0, 7, 2, 9])
    got_kv, want_kv = torch.zeros(2, 2, 10, 64), torch.zeros(2, 2, 10, 64)
    got = kernels.rope_qkv_scatter(q, k, v, cos, sin, pos, got_kv[0], got_kv[1])
    want = reference.rope_qkv_scatter_reference(q, k, v, cos, sin, pos, want_kv[0], want_kv[1])
    assert torch.equal(got, want) and torch.equal(got_kv, want_kv)


@kernel_test
def test_layer_kernels_reject_bad_arguments():
    """Kernel launchers, dispatchers and references raise the same ValueErrors before any launch."""
    dev = lambda *shape, dtype=torch.float32: torch.randn(*shape).to(dtype).to(DEVICE)  # noqa: E731
    x, w = dev(4, 96), dev(96)
    norms = (lt.rms_norm, kernels.rms_norm, reference.rms_norm_reference)
    for args, match in [
        ((x, dev(48), 1e-5), "weight must be"),
        ((x, w.bfloat16(), 1e-5), "weight must be"),
        ((x.int(), w, 1e-5), "x must be"),
        ((dev(4, 192)[:, ::2], w, 1e-5), "x must be"),
        ((x, w, 1e-5, dev(5, 96)), "residual must match"),
        ((x, w, 1e-5, x.half()), "residual must match"),
    ]:
        for fn in norms:
            with pytest.raises(ValueError, match=match):
                fn(*args)
    with pytest.raises(ValueError, match="over the kernel's"):
        lt.rms_norm(dev(1, 70000), dev(70000), 1e-5)

    silus = (lt.silu_mul, kernels.silu_mul, reference.silu_mul_reference)
    for args, match in [
        ((dev(4, 96), dev(4, 95)), "must match"),
        ((dev(4, 96), dev(4, 96).half()), "must match"),
        ((dev(96, 4).t(), dev(96, 4).t()), "contiguous"),
        ((torch.ones(4, dtype=torch.int32, device=DEVICE),) * 2, "float32, float16 or bfloat16"),
    ]:
        for fn in silus:
            with pytest.raises(ValueError, match=match):
                fn(*args)

    n, hq, hkv, d, big_n = 5, 4, 2, 64, 16
    good = {
        "q": dev(n, hq, d), "k": dev(n, hkv, d), "v": dev(n, hkv, d), "cos": dev(n, d), "sin": dev(n, d),
        "positions": torch.arange(n, device=DEVICE), "k_out": dev(hkv, big_n, d), "v_out": dev(hkv, big_n, d),
    }  # fmt: skip
    ropes = (lt.rope_qkv_scatter, kernels.rope_qkv_scatter, reference.rope_qkv_scatter_reference)
    for change, match in [
        ({"q": dev(n, hq, d + 1), "k": dev(n, hkv, d + 1), "v": dev(n, hkv, d + 1)}, "even"),
        ({"k": dev(n, hkv, 32), "v": dev(n, hkv, 32)}, "k, v must be"),
        ({"v": dev(n, hkv + 1, d)}, "q must be"),
        ({"q": dev(n, hq, d).bfloat16()}, "share"),
        ({"positions": torch.arange(n, device=DEVICE, dtype=torch.int32)}, "positions must be"),
        ({"positions": torch.arange(n + 1, device=DEVICE)}, "positions must be"),
        ({"cos": dev(n, d // 2)}, "cos must be"),
        ({"sin": dev(2, n, d)}, "sin must be"),
        ({"k_out": dev(hkv + 1, big_n, d)}, "k_out, v_out must be"),
        ({"v_out": dev(hkv, big_n, d).half()}, "k_out, v_out must be"),
        ({"k_out": dev(hkv, big_n, 2 * d)[..., ::2]}, "contiguous last dim"),
        ({"q": dev(n, hq, 2 * d)[..., ::2]}, "contiguous last dim"),
    ]:
        for fn in ropes:
            with pytest.raises(ValueError, match=match):
                fn(**{**good, **change})
    if CUDA:
        with pytest.raises(ValueError, match="not on q's device"):
            lt.rope_qkv_scatter(**{**good, "positions": torch.arange(n)})


# --------------------------------------------------------- decoder-layer ops on the GPU, Llama-3-8B


def replay_in_graph(fn, refill):
    """Run ``fn`` once (compiles), capture it in a CUDA graph, call ``refill()`` (new inputs, in
    place) and replay: the launchers must neither sync nor allocate by data. Returns the outputs."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    refill()
    graph.replay()
    torch.cuda.synchronize()
    return out


@gpu
@pytest.mark.gpu
def test_gpu_rms_norm_llama_shapes():
    gen = torch.Generator(device="cuda").manual_seed(11)
    x, r = (torch.randn(2, 1, 1261, 4096, device="cuda", generator=gen) * 2).bfloat16()
    w = (1 + 0.3 * torch.randn(4096, device="cuda", generator=gen)).bfloat16()
    check_ulps(
        lt.rms_norm(x, w, 1e-5), reference.rms_norm_reference(x, w, 1e-5), "rms_norm 8B", ulps=RMS_ULPS
    )
    new_x, new_r = torch.randn_like(x), torch.randn_like(r)

    def refill():
        x.copy_(new_x)
        r.copy_(new_r)

    y, h = replay_in_graph(lambda: lt.rms_norm(x, w, 1e-5, residual=r), refill)
    want_y, want_h = reference.rms_norm_reference(new_x, w, 1e-5, residual=new_r)
    assert torch.equal(h, want_h)
    check_ulps(y, want_y, "rms_norm 8B, residual, graph replay", ulps=RMS_ULPS)


@gpu
@pytest.mark.gpu
def test_gpu_silu_mul_llama_shapes():
    gen = torch.Generator(device="cuda").manual_seed(12)
    gate, up = (torch.randn(2, 1261, 14336, device="cuda", generator=gen) * 3).bfloat16()
    check_ulps(lt.silu_mul(gate, up), torch.nn.functional.silu(gate) * up, "silu_mul 8B vs torch")
    new_gate = torch.randn_like(gate) * 3
    out = replay_in_graph(lambda: lt.silu_mul(gate, up), lambda: gate.copy_(new_gate))
    check_ulps(out, reference.silu_mul_reference(new_gate, up), "silu_mul 8B, graph replay")


@gpu
@pytest.mark.gpu
def test_gpu_rope_qkv_scatter_llama_shapes():
    """Llama-3-8B: 1261 tokens into an 8K cache of two layers; then the same in a CUDA graph with
    new activations and new positions."""
    hq, hkv, d, n, big_n = 32, 8, 128, 1261, 8192
    check_rope_qkv_scatter(hq, hkv, d, n, big_n, torch.bfloat16, torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(13)
    qkv = torch.randn(n, (hq + 2 * hkv) * d, device="cuda", generator=gen).bfloat16()
    positions = torch.randperm(big_n, device="cuda", generator=gen)[:n]
    cos, sin = rope_cos_sin_table(positions, d, torch.bfloat16)
    buf = torch.zeros(2, 2, hkv, big_n, d, dtype=torch.bfloat16, device="cuda")
    new_qkv, new_pos = torch.randn_like(qkv), torch.randperm(big_n, device="cuda", generator=gen)[:n]

    def refill():
        qkv.copy_(new_qkv)
        positions.copy_(new_pos)
        buf.fill_(7.0)

    def step():
        return lt.rope_qkv_scatter(*split_qkv(qkv, hq, hkv, d), cos, sin, positions, buf[1, 0], buf[1, 1])

    got_q = replay_in_graph(step, refill)
    want_buf = torch.full_like(buf, 7.0)
    want_q = reference.rope_qkv_scatter_reference(
        *split_qkv(new_qkv, hq, hkv, d), cos, sin, new_pos, want_buf[1, 0], want_buf[1, 1]
    )
    check_ulps(got_q, want_q, "rope 8B q, graph replay")
    check_ulps(buf, want_buf, "rope 8B cache, graph replay")


@pytest.mark.parametrize("nbytes", [2, 10, 8190, 8192, 8194, 1 << 20, (1 << 20) + 6])
def test_sum64_cpu_path_equals_its_definition(nbytes):
    """The CPU path (rows of words, no large temporaries) against the definition, in exact
    integers wrapped to signed 64 bits, on random bytes and on all-ones (which wraps)."""
    gen = torch.Generator().manual_seed(nbytes)
    for data in (torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen),
                 torch.full((nbytes,), 255, dtype=torch.uint8)):  # fmt: skip
        w = data.numpy().view("<u2").astype(object)
        total = int(w.sum())
        weighted = sum((i + 1) * int(x) for i, x in enumerate(w))
        wrap = lambda x: ((x + (1 << 63)) % (1 << 64)) - (1 << 63)  # noqa: E731
        assert reference.sum64(data) == (wrap(total), wrap(weighted))


def test_sum64_cpu_path_wraps_as_the_int64_paths_do():
    n = (1 << 24) + (1 << 20)  # words of 0xFFFF: the weighted sum exceeds 2**63
    data = torch.full((2 * n,), 255, dtype=torch.uint8)
    wrap = lambda x: ((x + (1 << 63)) % (1 << 64)) - (1 << 63)  # noqa: E731
    assert 65535 * n * (n + 1) // 2 >= 1 << 63
    assert reference.sum64(data) == (wrap(65535 * n), wrap(65535 * n * (n + 1) // 2))
