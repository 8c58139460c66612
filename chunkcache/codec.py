"""KV codecs: turn one chunk's ``kv`` into named CPU tensors and back.

A codec works on the one layout (see ``layout``) ``kv: [layers, 2, kv_heads, tokens, head_dim]``
and knows nothing about files, stores or models. Every part it writes has ``layers`` as its
first dimension, so a loader can decode layer by layer (``decode_layer``). The byte formats are
fixed: the Triton decode kernels implement exactly these.

    codec = CODECS["int4"]
    parts = codec.encode(kv)                       # {"k_q": uint8 [L, H, T, D/2], ...}
    kv2 = codec.decode(parts, torch.bfloat16)      # [L, 2, H, T, D]

Formats (L layers, H kv heads, T tokens, D head_dim, G = ceil(T / 128); int2's own groups in
``int2_groups``):

    raw   kv    model dtype [L, 2, H, T, D]   lossless
    int8  k_q   int8    [L, H, T, D]   k = k_q * k_scale[:, :, None, :]   keys per channel
          k_scale fp16  [L, H, D]      = absmax over tokens / 127
          v_q   int8    [L, H, T, D]   v = v_q * v_scale[..., None]       values per token
          v_scale fp16  [L, H, T]      = absmax over channels / 127
    int4  k_q   uint8   [L, H, T, D/2] keys per channel in groups of 128 tokens (KIVI style)
          k_scale, k_min fp16 [L, H, G, D]
          v_q   uint8   [L, H, T, D/2] values per token over the whole head_dim
          v_scale, v_min fp16 [L, H, T]
          q = clamp(round((x - min) / scale), 0, 15);  x' = q * scale + min
          two codes per byte along head_dim: byte = q[..., 2i] | (q[..., 2i+1] << 4)
    int2  rows    uint8 [L, H, T, D/2 + 4]  per (head, token): key codes (D/4 bytes), value codes
                  (D/4 bytes), value scale and min (fp16 each); 2-bit, x' = q * scale + min
          side    uint8 [L, E]  per layer the sections of ``int2_side_layout``: kept token ids,
                  key scale and min per channel per group of S = 128-255 tokens, and the kept
                  tokens' int8 rows (x = q * scale, one fp16 scale per row), which overwrite theirs
          four codes per byte, planar: bits 2i..2i+1 of byte b hold q[..., b + i * D/4]

Scales are computed in float32 and stored as float16; quantisation uses the *stored* (rounded)
scale so encode and decode agree. A zero range stores scale 1, so an all-zero group decodes to
zeros exactly.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

__all__ = [
    "CODECS", "Codec", "Int2Codec", "Int2RCodec", "Int4Codec", "Int8Codec", "RawCodec", "get_codec", "INT4_GROUP",
]  # fmt: skip

INT4_GROUP = 128
"""Tokens per int4 key group along T (the last group may be shorter)."""

INT2_GROUP = 128
"""int2 keys: at least this many tokens per group (see ``int2_groups``)."""
INT2_KEEP_FIRST = 4
"""int2: the chunk's first tokens, always kept at 8 bits."""
INT2_KEEP_FRAC = 0.02
"""int2: fraction of a chunk's tokens kept at 8 bits besides the first ones."""
INT2_CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6)
"""int2: range shrink factors tried per group (the least squared error wins)."""

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal); smaller scales would round to 0


def _check_kv(kv: torch.Tensor) -> None:
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"kv must be [layers, 2, kv_heads, tokens, head_dim], got {tuple(kv.shape)}")
    if not kv.is_floating_point():
        raise ValueError(f"kv must be a floating tensor, got {kv.dtype}")


def _to_fp16_scale(scale: torch.Tensor, what: str) -> torch.Tensor:
    """float32 scale -> fp16, with zero -> 1 and tiny -> smallest fp16; refuse overflow."""
    if bool((scale.abs() > _FP16_MAX).any()):
        raise ValueError(f"{what} exceeds the float16 range of the codec's scales (|x| too large)")
    scale = torch.where(scale == 0, torch.ones_like(scale), scale.clamp_min(_FP16_TINY))
    return scale.half()


class Codec:
    """A named KV codec. Subclasses set ``name``, ``parts``, ``lossless`` and implement the two maps."""

    name: ClassVar[str]
    parts: ClassVar[tuple[str, ...]]
    """Names of the tensors ``encode`` returns (every one has ``layers`` as its first dimension)."""
    lossless: ClassVar[bool]

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:  # kv: [L, 2, H, T, D]
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Named parts (on any one device) -> kv [L, 2, H, T, D] in ``dtype`` on that device."""
        raise NotImplementedError

    def decode_layer(self, parts: dict[str, torch.Tensor], layer: int, dtype: torch.dtype) -> torch.Tensor:
        """Decode one layer -> [2, H, T, D]. Extra entries in ``parts`` are ignored."""
        one = {name: parts[name][layer : layer + 1] for name in self.parts}
        return self.decode(one, dtype)[0]

    def nbytes(self, layers: int, kv_heads: int, tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        """Encoded size in bytes of one chunk of this shape (parts only, no header)."""
        kv = torch.zeros(layers, 2, kv_heads, tokens, head_dim, dtype=dtype, device="meta")
        return sum(p.numel() * p.element_size() for p in self._shapes(kv).values())

    def part_shapes(
        self, kv_shape: list[int] | tuple[int, ...], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Meta tensors with the exact shape and dtype of every part ``encode`` writes for a kv of
        ``kv_shape`` in ``dtype``. The entry format checks stored parts against these before
        decoding (so ``decode`` never broadcasts a crafted small part into a huge tensor); a new
        codec gets that check by implementing ``_shapes``. ValueError if the codec cannot hold
        such a kv."""
        kv = torch.empty(tuple(kv_shape), dtype=dtype, device="meta")
        _check_kv(kv)
        out = self._shapes(kv)
        if set(out) != set(self.parts):
            raise RuntimeError(f"codec {self.name!r}: _shapes gives {sorted(out)}, parts are {self.parts}")
        return out

    def _shapes(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        """Meta tensors shaped like ``encode(kv)``'s parts (``kv`` a meta tensor)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RawCodec(Codec):
    """The kv as it is, in the model's dtype. Lossless."""

    name = "raw"
    parts = ("kv",)
    lossless = True

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_kv(kv)
        return {"kv": kv.detach().to("cpu").contiguous()}  # [L, 2, H, T, D]

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return parts["kv"].to(dtype)

    def _shapes(self, kv):
        return {"kv": kv}


class Int8Codec(Codec):
    """Symmetric int8: keys per channel (scale over tokens), values per token (scale over channels)."""

    name = "int8"
    parts = ("k_q", "k_scale", "v_q", "v_scale")
    lossless = False

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_kv(kv)
        kv = kv.detach()  # quantise where kv lives (GPU after precompute), ship only the parts
        k, v = kv[:, 0].float(), kv[:, 1].float()  # [L, H, T, D] each
        k_scale = _to_fp16_scale(k.abs().amax(dim=2) / 127.0, "key")  # [L, H, D]
        v_scale = _to_fp16_scale(v.abs().amax(dim=3) / 127.0, "value")  # [L, H, T]
        k_q = torch.round(k / k_scale.float()[:, :, None, :]).clamp_(-127, 127).to(torch.int8)
        v_q = torch.round(v / v_scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
        return _cpu({"k_q": k_q, "k_scale": k_scale, "v_q": v_q, "v_scale": v_scale})

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        k = parts["k_q"].float() * parts["k_scale"].float()[:, :, None, :]  # [L, H, T, D]
        v = parts["v_q"].float() * parts["v_scale"].float()[..., None]  # [L, H, T, D]
        return torch.stack([k, v], dim=1).to(dtype)

    def _shapes(self, kv):
        L, _, H, T, D = kv.shape
        e = lambda *s, dt: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
        return {
            "k_q": e(L, H, T, D, dt=torch.int8),
            "k_scale": e(L, H, D, dt=torch.float16),
            "v_q": e(L, H, T, D, dt=torch.int8),
            "v_scale": e(L, H, T, dt=torch.float16),
        }


def _cpu(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.to("cpu").contiguous() for name, p in parts.items()}


def _pack4(q: torch.Tensor) -> torch.Tensor:  # q: uint8 [..., D] in 0..15 -> [..., D/2]
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _unpack4(b: torch.Tensor) -> torch.Tensor:  # b: uint8 [..., D/2] -> [..., D]
    lo, hi = b & 0x0F, b >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def _minmax_scale(lo: torch.Tensor, hi: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 min/max -> (scale, min) in fp16 for 16 levels."""
    if bool((lo.abs() > _FP16_MAX).any()):
        raise ValueError(f"{what} exceeds the float16 range of the codec's offsets (|x| too large)")
    return _to_fp16_scale((hi - lo) / 15.0, what), lo.half()


class Int4Codec(Codec):
    """Asymmetric 4-bit (KIVI style): keys per channel in groups of 128 tokens, values per token."""

    name = "int4"
    parts = ("k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min")
    lossless = False

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_kv(kv)
        L, _, H, T, D = kv.shape
        if D % 2:
            raise ValueError(f"int4 packs two codes per byte along head_dim, which must be even (got {D})")
        kv = kv.detach()  # quantise where kv lives (GPU after precompute), ship only the parts
        k, v = kv[:, 0].float(), kv[:, 1].float()  # [L, H, T, D] each
        G = -(-T // INT4_GROUP)
        pad = G * INT4_GROUP - T
        # Pad T up to whole groups with +inf for the min and -inf for the max, so padding never wins.
        k_lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf"))
        k_hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf"))
        k_lo = k_lo.view(L, H, G, INT4_GROUP, D).amin(dim=3)  # [L, H, G, D]
        k_hi = k_hi.view(L, H, G, INT4_GROUP, D).amax(dim=3)
        k_scale, k_min = _minmax_scale(k_lo, k_hi, "key")  # [L, H, G, D]
        v_scale, v_min = _minmax_scale(v.amin(dim=3), v.amax(dim=3), "value")  # [L, H, T]
        ks = _expand_groups(k_scale.float(), T)  # [L, H, T, D]
        km = _expand_groups(k_min.float(), T)
        k_q = torch.round((k - km) / ks).clamp_(0, 15).to(torch.uint8)
        v_q = torch.round((v - v_min.float()[..., None]) / v_scale.float()[..., None]).clamp_(0, 15)
        return _cpu(
            {
                "k_q": _pack4(k_q),
                "k_scale": k_scale,
                "k_min": k_min,
                "v_q": _pack4(v_q.to(torch.uint8)),
                "v_scale": v_scale,
                "v_min": v_min,
            }
        )

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        T = parts["v_scale"].shape[2]
        ks = _expand_groups(parts["k_scale"].float(), T)  # [L, H, T, D]
        km = _expand_groups(parts["k_min"].float(), T)
        k = _unpack4(parts["k_q"]).float() * ks + km
        v = (
            _unpack4(parts["v_q"]).float() * parts["v_scale"].float()[..., None]
            + parts["v_min"].float()[..., None]
        )
        return torch.stack([k, v], dim=1).to(dtype)

    def _shapes(self, kv):
        L, _, H, T, D = kv.shape
        if D % 2:
            raise ValueError(f"int4 packs two codes per byte along head_dim, which must be even (got {D})")
        G = -(-T // INT4_GROUP)
        e = lambda *s, dt: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
        return {
            "k_q": e(L, H, T, D // 2, dt=torch.uint8),
            "k_scale": e(L, H, G, D, dt=torch.float16),
            "k_min": e(L, H, G, D, dt=torch.float16),
            "v_q": e(L, H, T, D // 2, dt=torch.uint8),
            "v_scale": e(L, H, T, dt=torch.float16),
            "v_min": e(L, H, T, dt=torch.float16),
        }


def _expand_groups(g: torch.Tensor, T: int) -> torch.Tensor:  # g: [L, H, G, D] -> [L, H, T, D]
    return g.repeat_interleave(INT4_GROUP, dim=2)[:, :, :T]


def int2_groups(tokens: int) -> tuple[int, int]:
    """(groups, tokens per group) of int2 keys: ``max(1, T // 128)`` groups of ``ceil(T / groups)``
    tokens (128-255 each; the last may be shorter), so a short chunk pays for one group only."""
    groups = max(1, tokens // INT2_GROUP)
    return groups, -(-tokens // groups)


def int2_kept(tokens: int) -> int:
    """Tokens per layer an int2 entry keeps at 8 bits: the chunk's first ``INT2_KEEP_FIRST`` and
    ``ceil(INT2_KEEP_FRAC * T)`` more (never more than T)."""
    return min(tokens, INT2_KEEP_FIRST + math.ceil(INT2_KEEP_FRAC * tokens))


def _pack2(q: torch.Tensor) -> torch.Tensor:  # q: uint8 [..., D] in 0..3 -> [..., D/4]
    d4 = q.shape[-1] // 4
    return q[..., :d4] | (q[..., d4 : 2 * d4] << 2) | (q[..., 2 * d4 : 3 * d4] << 4) | (q[..., 3 * d4 :] << 6)


def _unpack2(b: torch.Tensor) -> torch.Tensor:  # b: uint8 [..., D/4] -> [..., D]
    return torch.cat([b & 3, (b >> 2) & 3, (b >> 4) & 3, b >> 6], dim=-1)


def _fit_range(
    x: torch.Tensor, valid: torch.Tensor | None, dim: int, levels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slice along ``dim``: the (lo, hi) among ``INT2_CLIPS`` shrinkings of [min, max] towards
    the middle that gives the least squared error over the valid entries with ``levels`` levels.
    Returns float32 (lo, hi) with ``dim`` reduced; a slice with no valid entry gets (0, 0)."""
    inf = torch.tensor(float("inf"), device=x.device)
    lo0 = (x if valid is None else torch.where(valid, x, inf)).amin(dim=dim, keepdim=True)
    hi0 = (x if valid is None else torch.where(valid, x, -inf)).amax(dim=dim, keepdim=True)
    empty = ~torch.isfinite(lo0)
    lo0, hi0 = torch.where(empty, 0.0, lo0), torch.where(empty, 0.0, hi0)
    mid, half = (lo0 + hi0) / 2, (hi0 - lo0) / 2
    best_err = best_lo = best_hi = None
    for c in INT2_CLIPS:
        lo, hi = mid - c * half, mid + c * half
        scale = ((hi - lo) / (levels - 1)).clamp_min(_FP16_TINY)
        err = (torch.round((x - lo) / scale).clamp_(0, levels - 1) * scale + lo - x) ** 2
        if valid is not None:
            err = torch.where(valid, err, 0.0)
        err = err.sum(dim=dim, keepdim=True)
        if best_err is None:
            best_err, best_lo, best_hi = err, lo, hi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_lo.squeeze(dim), best_hi.squeeze(dim)


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row (last dim): (q int8, scale fp16 [...])."""
    scale = _to_fp16_scale(x.abs().amax(dim=-1) / 127.0, "kept token")
    return torch.round(x / scale.float()[..., None]).clamp_(-127, 127).to(torch.int8), scale


def int2_side_layout(
    heads: int, tokens: int, head_dim: int
) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
    """Where each section of one layer's int2 ``side`` bytes sits: name -> (byte offset, dtype,
    shape). Every offset is aligned to its dtype, and the total (``int2_side_layout(...)["end"]``,
    a multiple of 4) keeps the next layer aligned too."""
    H, T, D = heads, tokens, head_dim
    G, _ = int2_groups(T)
    n = int2_kept(T)
    out, off = {}, 0
    for name, dtype, shape in (
        ("o_idx", torch.int32, (n,)),
        ("k_scale", torch.float16, (H, G, D)),
        ("k_min", torch.float16, (H, G, D)),
        ("o_ks", torch.float16, (H, n)),
        ("o_vs", torch.float16, (H, n)),
        ("o_k", torch.int8, (H, n, D)),
        ("o_v", torch.int8, (H, n, D)),
    ):
        out[name] = (off, dtype, shape)
        off += math.prod(shape) * dtype.itemsize
    out["end"] = (off, torch.uint8, (0,))
    return out


def int2_sections(rows: torch.Tensor, side: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of one layer's int2 parts (``rows`` uint8 [H, T, D/2 + 4], ``side`` uint8 [E]) by name:
    k_q, v_q uint8 [H, T, D/4]; v_scale, v_min fp16 [H, T]; and the ``int2_side_layout`` sections."""
    H, T, R = rows.shape
    D = 2 * (R - 4)
    out = {"k_q": rows[..., : D // 4], "v_q": rows[..., D // 4 : D // 2]}
    sm = rows[..., D // 2 :].contiguous().view(torch.float16)  # [H, T, 2]
    out["v_scale"], out["v_min"] = sm[..., 0], sm[..., 1]
    layout = int2_side_layout(H, T, D)
    if side.shape != (layout["end"][0],):
        raise ValueError(
            f"int2 side bytes are {tuple(side.shape)}, rows {tuple(rows.shape)} need {layout['end'][0]}"
        )
    for name, (off, dtype, shape) in layout.items():
        if name != "end":
            out[name] = side[off : off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
    return out


class Int2Codec(Codec):
    """2-bit KIVI-style groups plus the tokens that matter at 8 bits (mixed precision, MiKV style).

    Per layer, the chunk's first ``INT2_KEEP_FIRST`` tokens (the chunk start, where attention
    sinks form) and the ``ceil(INT2_KEEP_FRAC * T)`` tokens a 2-bit code would hurt most (largest
    relative reconstruction error of keys plus values, summed over heads) are *kept*: stored again
    as int8 rows, which the decoder writes over their 2-bit rows. Kept tokens are left out of the
    key groups' ranges, so one outlier token no longer stretches a whole group. Every range is
    the min-max shrunk by the factor among ``INT2_CLIPS`` with the least squared error.

    Two parts, so a loader makes two copies per layer (per-copy cost, not bytes, bounds small
    parts): ``rows`` [L, H, T, D/2 + 4] uint8 holds per (head, token) the key codes, the value
    codes and the value (scale, min) in fp16; ``side`` [L, E] uint8 holds the sections of
    ``int2_side_layout`` (kept token ids, key group scales and mins, kept rows and their scales).
    """

    name = "int2"
    parts = ("rows", "side")
    lossless = False

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_kv(kv)
        L, _, H, T, D = kv.shape
        self._check_head_dim(D)
        kv = kv.detach()
        k, v = kv[:, 0].float(), kv[:, 1].float()  # [L, H, T, D] each
        vr = self._rotate(v)  # the values as coded (int2r: rotated by the randomised Hadamard)
        G, S = int2_groups(T)
        n = int2_kept(T)
        # Which tokens to keep: the first ones, then the largest relative error of a plain 2-bit code.
        lo, hi = (_expand(x, T, S) for x in _fit_range(_pad_groups(k, G, S), None, 3, 4))  # [L, H, T, D]
        err_k = _relerr(k, _dequant(_quant(k, lo, hi, 4), lo, hi, 4))
        vlo, vhi = _fit_range(vr, None, 3, 4)  # [L, H, T]
        err_v = _relerr(  # an orthogonal rotation keeps squared errors: measured where coded
            vr, _dequant(_quant(vr, vlo[..., None], vhi[..., None], 4), vlo[..., None], vhi[..., None], 4)
        )
        score = err_k + err_v  # [L, T]
        score[:, : min(INT2_KEEP_FIRST, T)] = float("inf")
        idx = score.topk(n, dim=1).indices.sort(dim=1).values  # [L, n]
        kept = torch.zeros(L, T, dtype=torch.bool, device=k.device)
        kept.scatter_(1, idx, True)
        # Key ranges over the tokens not kept.
        valid = _pad_groups((~kept)[:, None, :, None].expand(L, H, T, D), G, S, fill=False)
        lo, hi = _fit_range(_pad_groups(k, G, S), valid, 3, 4)
        k_scale, k_min = _range_fp16(lo, hi, 3, "key")  # [L, H, G, D]
        v_scale, v_min = _range_fp16(vlo, vhi, 3, "value")  # [L, H, T]
        ks, km = _expand(k_scale.float(), T, S), _expand(k_min.float(), T, S)
        k_q = torch.round((k - km) / ks).clamp_(0, 3).to(torch.uint8)
        v_q = (
            torch.round((vr - v_min.float()[..., None]) / v_scale.float()[..., None])
            .clamp_(0, 3)
            .to(torch.uint8)
        )
        gather = idx[:, None, :, None].expand(L, H, n, D)
        o_k, o_ks = _int8_rows(k.gather(2, gather))  # [L, H, n, D], [L, H, n]
        o_v, o_vs = _int8_rows(v.gather(2, gather))
        sm = torch.stack([v_scale, v_min], dim=-1).view(torch.uint8)  # [L, H, T, 4]
        rows = torch.cat([_pack2(k_q), _pack2(v_q), sm], dim=-1)  # [L, H, T, D/2 + 4]
        sec = {"o_idx": idx.to(torch.int32), "k_scale": k_scale, "k_min": k_min, "o_ks": o_ks,
               "o_vs": o_vs, "o_k": o_k, "o_v": o_v}  # fmt: skip
        layout = int2_side_layout(H, T, D)
        side = torch.cat(
            [sec[name].reshape(L, -1).view(torch.uint8) for name in layout if name != "end"], dim=1
        )
        return _cpu({"rows": rows, "side": side})

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        layers = [self._decode_one(parts["rows"][i], parts["side"][i]) for i in range(parts["rows"].shape[0])]
        return torch.stack(layers).to(dtype)

    @staticmethod
    def _check_head_dim(D: int) -> None:
        if D % 4:
            raise ValueError(
                f"int2 packs four codes per byte along head_dim, which must be a multiple of 4 (got {D})"
            )

    @staticmethod
    def _rotate(v: torch.Tensor) -> torch.Tensor:
        return v

    @staticmethod
    def _decode_values(p: dict[str, torch.Tensor]) -> torch.Tensor:  # -> [H, T, D] fp32
        return _unpack2(p["v_q"]).float() * p["v_scale"].float()[..., None] + p["v_min"].float()[..., None]

    def _decode_one(self, rows: torch.Tensor, side: torch.Tensor) -> torch.Tensor:  # -> [2, H, T, D] fp32
        p = int2_sections(rows, side)
        T = rows.shape[1]
        _, S = int2_groups(T)
        group = torch.arange(T, device=rows.device) // S
        k = _unpack2(p["k_q"]).float() * p["k_scale"].float()[:, group] + p["k_min"].float()[:, group]
        v = self._decode_values(p)
        idx = p["o_idx"].long()
        k[:, idx] = p["o_k"].float() * p["o_ks"].float()[..., None]
        v[:, idx] = p["o_v"].float() * p["o_vs"].float()[..., None]
        return torch.stack([k, v])

    def _shapes(self, kv):
        L, _, H, T, D = kv.shape
        self._check_head_dim(D)
        e = lambda *s, dt: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
        return {
            "rows": e(L, H, T, D // 2 + 4, dt=torch.uint8),
            "side": e(L, int2_side_layout(H, T, D)["end"][0], dt=torch.uint8),
        }


_M32 = 0xFFFFFFFF


def hadamard_signs(head_dim: int) -> torch.Tensor:
    """int2r's fixed random signs, fp32 ``[head_dim]`` of +-1: element j is -1 where the low bit
    of ``fmix32(j * 0x9E3779B1)`` (MurmurHash3's finaliser, 32-bit arithmetic) is set. A formula,
    so the Triton decode computes the same signs and no entry stores them."""
    h = (torch.arange(head_dim, dtype=torch.int64) * 0x9E3779B1) & _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return 1.0 - 2.0 * (h & 1).float()


def hadamard_matrix(head_dim: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix fp32 ``[D, D]``: ``H[i, j] = (-1) ** popcount(i & j)``
    (symmetric, ``H @ H = D * I``); D a power of two."""
    i = torch.arange(head_dim)
    x = i[:, None] & i[None, :]
    parity = torch.zeros_like(x)
    while bool(x.any()):
        parity ^= x & 1
        x = x >> 1
    return 1.0 - 2.0 * parity.float()


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Int2RCodec(Int2Codec):
    """int2 with the values rotated before they are coded: ``Int2Codec``'s bytes and layout, but
    each value row ``v`` (one head, one token) is coded as ``v' = ((v * s) @ H) / sqrt(D)``, a
    randomised Hadamard rotation of head_dim (``s = hadamard_signs(D)``, ``H = hadamard_matrix(D)``).
    A rotation spreads a row's outlier channels over all D, so 4 levels over the row's range lose
    far less; keys stay per channel (their outliers are per channel, which KIVI's grouping already
    isolates). Decode, in fp32 with these rounding points:

        c = q @ H                       (exact: integers)
        a = c * v_scale + (D * v_min at j == 0, else 0)      (= v' @ H)
        v = a * (s / sqrt(D))

    Kept tokens' value rows are stored unrotated (int8, as in int2). head_dim must be a power of two.
    """

    name = "int2r"

    @staticmethod
    def _check_head_dim(D: int) -> None:
        if not _is_pow2(D) or D < 4:
            raise ValueError(
                f"int2r rotates head_dim by a Hadamard matrix: it must be a power of two >= 4 (got {D})"
            )

    @staticmethod
    def _rotate(v: torch.Tensor) -> torch.Tensor:
        D = v.shape[-1]
        H = hadamard_matrix(D).to(v.device)
        return ((v * hadamard_signs(D).to(v.device)) @ H) * (D**-0.5)

    @staticmethod
    def _decode_values(p: dict[str, torch.Tensor]) -> torch.Tensor:  # -> [H, T, D] fp32
        q = _unpack2(p["v_q"]).float()  # [H, T, D]
        D = q.shape[-1]
        a = (q @ hadamard_matrix(D).to(q.device)) * p["v_scale"].float()[..., None]
        a[..., 0] += p["v_min"].float() * D
        return a * rotation_weights(D).to(q.device)


def rotation_weights(head_dim: int) -> torch.Tensor:
    """int2r's last decode factor, fp32 ``[D]``: ``hadamard_signs(D) * (1 / sqrt(D))``, with the
    fp32 sqrt and division each correctly rounded (as the Triton decode computes it)."""
    return hadamard_signs(head_dim) * torch.tensor(float(head_dim)).sqrt().reciprocal()


def _pad_groups(x: torch.Tensor, G: int, S: int, fill=0.0) -> torch.Tensor:
    """[L, H, T, D] -> [L, H, G, S, D], padded along T with ``fill`` (masked out by ``valid``)."""
    L, H, T, D = x.shape
    pad = G * S - T
    if pad:
        x = torch.cat([x, torch.full((L, H, pad, D), fill, dtype=x.dtype, device=x.device)], dim=2)
    return x.view(L, H, G, S, D)


def _expand(g: torch.Tensor, T: int, S: int) -> torch.Tensor:  # [L, H, G, D] -> [L, H, T, D]
    return g.repeat_interleave(S, dim=2)[:, :, :T]


def _quant(x, lo, hi, levels):
    scale = ((hi - lo) / (levels - 1)).clamp_min(_FP16_TINY)
    return torch.round((x - lo) / scale).clamp_(0, levels - 1)


def _dequant(q, lo, hi, levels):
    return q * ((hi - lo) / (levels - 1)).clamp_min(_FP16_TINY) + lo


def _relerr(x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """[L, H, T, D] pair -> [L, T]: squared error per token over its mean squared norm, summed over heads."""
    err = ((x - x2) ** 2).sum(dim=3)  # [L, H, T]
    norm = (x**2).sum(dim=3).mean(dim=2, keepdim=True).clamp_min(1e-30)
    return (err / norm).sum(dim=1)


def _range_fp16(lo: torch.Tensor, hi: torch.Tensor, levels_minus_1: int, what: str):
    """float32 (lo, hi) -> (scale, min) fp16."""
    if bool((lo.abs() > _FP16_MAX).any()):
        raise ValueError(f"{what} exceeds the float16 range of the codec's offsets (|x| too large)")
    return _to_fp16_scale((hi - lo) / levels_minus_1, what), lo.half()


CODECS: dict[str, Codec] = {
    c.name: c for c in (RawCodec(), Int8Codec(), Int4Codec(), Int2Codec(), Int2RCodec())
}
"""Every codec by name. Add one by subclassing ``Codec`` and registering it here."""


def get_codec(name: str) -> Codec:
    """The codec called ``name``, or a ValueError listing the known ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
