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
        """The named parts of ``kv``, on the host (contiguous)."""
        return _cpu(self.encode_here(kv))

    def encode_here(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        """``encode``'s parts where ``kv`` lives (a GPU's kv: parts in device memory, nothing copied
        to the host; the same values ``encode`` gives)."""
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

    def encode_here(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_kv(kv)
        return {"kv": kv.detach().contiguous()}  # [L, 2, H, T, D]

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return parts["kv"].to(dtype)

    def _shapes(self, kv):
        return {"kv": kv}


class Int8Codec(Codec):
    """Symmetric int8: keys per channel (scale over tokens), values per token (scale over channels)."""

    name = "int8"
    parts = ("k_q", "k_scale", "v_q", "v_scale")
    lossless = False

    def encode_here(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_kv(kv)
        kv = kv.detach()  # quantise where kv lives (GPU after precompute), ship only the parts
        k, v = kv[:, 0].float(), kv[:, 1].float()  # [L, H, T, D] each
        k_scale = _to_fp16_scale(k.abs().amax(dim=2) / 127.0, "key")  # [L, H, D]
        v_scale = _to_fp16_scale(v.abs().amax(dim=3) / 127.0, "value")  # [L, H, T]
        k_q = torch.round(k / k_scale.float()[:, :, None, :]).clamp_(-127, 127).to(torch.int8)
        v_q = torch.round(v / v_scale.float()[..., None]).clamp_(-127, 127).to(torch.int8)
        return {"k_q": k_q, "k_scale": k_scale, "v_q": v_q, "v_scale": v_scale}

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

    def encode_here(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
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
        return {
            "k_q": _pack4(k_q),
            "k_scale": k_scale,
            "k_min": k_min,
            "v_q": _pack4(v_q.to(torch.uint8)),
            "v_scale": v_scale,
            "v_min": v_min,
        }

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
    return _place_sections(
        (
            ("o_idx", torch.int32, (n,)),
            ("k_scale", torch.float16, (H, G, D)),
            ("k_min", torch.float16, (H, G, D)),
            ("o_ks", torch.float16, (H, n)),
            ("o_vs", torch.float16, (H, n)),
            ("o_k", torch.int8, (H, n, D)),
            ("o_v", torch.int8, (H, n, D)),
        )
    )


def _place_sections(sections, end_align: int = 1) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
    """Sections ``(name, dtype, shape)`` back to back in order -> name -> (byte offset, dtype,
    shape), plus ``"end"`` (the total, rounded up to ``end_align``): the one layout rule of the
    2-bit codecs' ``side`` bytes."""
    out, off = {}, 0
    for name, dtype, shape in sections:
        out[name] = (off, dtype, shape)
        off += math.prod(shape) * dtype.itemsize
    off += -off % end_align
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

    def encode_here(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
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
        return {"rows": rows, "side": side}

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


INT2M_KEEP_FRAC = 0.005
"""int2m: fraction of a chunk's tokens kept at 8 bits besides the first ``INT2_KEEP_FIRST``."""


def int2m_hi(head_dim: int) -> int:
    """int2m: key channels per (layer, head) coded at 4 bits (the rest at 2): a quarter of D."""
    return head_dim // 4


def int2m_kept(tokens: int) -> int:
    """Tokens per layer an int2m entry keeps at 8 bits (``INT2_KEEP_FIRST`` + ``INT2M_KEEP_FRAC``)."""
    return min(tokens, INT2_KEEP_FIRST + math.ceil(INT2M_KEEP_FRAC * tokens))


def int2m_row_bytes(head_dim: int) -> int:
    """Bytes per (head, token) of int2m ``rows``: 4-bit key codes of the hi channels, 2-bit codes
    of the other key channels, 2-bit value codes."""
    m = int2m_hi(head_dim)
    return m // 2 + (head_dim - m) // 4 + head_dim // 4


def int2m_side_layout(
    heads: int, tokens: int, head_dim: int
) -> dict[str, tuple[int, torch.dtype, tuple[int, ...]]]:
    """Where each section of one layer's int2m ``side`` bytes sits (as ``int2_side_layout``)."""
    H, T, D = heads, tokens, head_dim
    G, _ = int2_groups(T)
    n = int2m_kept(T)
    return _place_sections(
        (
            ("o_idx", torch.int32, (n,)),
            ("k_scale", torch.float16, (H, G, D)),
            ("k_min", torch.float16, (H, G, D)),
            ("v_scale", torch.float16, (H, T)),
            ("o_ks", torch.float16, (H, n)),
            ("o_vs", torch.float16, (H, n)),
            ("o_k", torch.int8, (H, n, D)),
            ("o_v", torch.int8, (H, n, D)),
            ("k_pos", torch.uint8, (H, D)),
        ),
        end_align=4,
    )


def int2m_sections(rows: torch.Tensor, side: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of one layer's int2m parts (``rows`` uint8 [H, T, 9D/16], ``side`` uint8 [E]) by name:
    k_hi uint8 [H, T, m/2], k_lo [H, T, (D-m)/4], v_q [H, T, D/4], and the ``int2m_side_layout``
    sections."""
    H, T, R = rows.shape
    D = 16 * R // 9
    if int2m_row_bytes(D) != R:
        raise ValueError(f"int2m rows have {R} bytes per token, which no head_dim gives")
    m = int2m_hi(D)
    a, b = m // 2, m // 2 + (D - m) // 4
    out = {"k_hi": rows[..., :a], "k_lo": rows[..., a:b], "v_q": rows[..., b:]}
    layout = int2m_side_layout(H, T, D)
    if side.shape != (layout["end"][0],):
        raise ValueError(
            f"int2m side bytes are {tuple(side.shape)}, rows {tuple(rows.shape)} need {layout['end'][0]}"
        )
    for name, (off, dtype, shape) in layout.items():
        if name != "end":
            out[name] = side[off : off + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
    return out


def _fit_symmetric(x: torch.Tensor) -> torch.Tensor:
    """Per row (last dim) the fp16 scale s among ``INT2_CLIPS`` shrinkings of ``absmax / 1.5``
    with the least squared error of the 4 levels ``(q - 1.5) * s``, q in 0..3; an all-zero row
    gets s = 0, so it decodes to zeros exactly."""
    amax = x.abs().amax(dim=-1)
    best_err = best = None
    for c in INT2_CLIPS:
        s = _to_fp16_scale(c * amax / 1.5, "value").float()
        err = (((torch.round(x / s[..., None] + 1.5).clamp_(0, 3) - 1.5) * s[..., None] - x) ** 2).sum(-1)
        if best is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return torch.where(amax == 0, 0.0, best).half()


class Int2MCodec(Int2RCodec):
    """int2r's rotated 2-bit values, with mixed-precision keys: per (layer, head) the quarter of
    the key channels with the widest range over the chunk (post-RoPE, mostly the fast-rotating
    pairs) is coded at 4 bits, the rest at 2, all per channel in int2's token groups; the first
    ``INT2_KEEP_FIRST`` tokens and ``INT2M_KEEP_FRAC`` of the worst are kept as int8 rows.
    Values are coded symmetrically (one fp16 scale s per row, levels ``(q - 1.5) * s``: a rotated
    row is near zero-mean), so they decode as int2r's with ``v_min = -1.5 * s`` in fp32.

    ``rows`` [L, H, T, 9D/16] uint8 per (head, token): the hi channels' 4-bit codes in slot order
    (two per byte, even slot in the low nibble), the other channels' 2-bit codes in slot order
    (planar, as int2), the value codes (planar). ``side`` [L, E]: ``int2m_side_layout`` (kept ids,
    key scale/min per channel and group in channel order, value scale per token, kept rows,
    and ``k_pos`` [H, D]: the slot of each channel: hi channels ascending take slots 0..m-1, the
    others m..D-1). head_dim: a power of two >= 16.
    """

    name = "int2m"

    @staticmethod
    def _check_head_dim(D: int) -> None:
        if not _is_pow2(D) or D < 16:
            raise ValueError(
                f"int2m needs a power of two head_dim >= 16 (Hadamard values, 4-bit key quarter), got {D}"
            )

    def encode_here(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_kv(kv)
        L, _, H, T, D = kv.shape
        self._check_head_dim(D)
        kv = kv.detach()
        k, v = kv[:, 0].float(), kv[:, 1].float()
        vr = self._rotate(v)
        G, S = int2_groups(T)
        n, m = int2m_kept(T), int2m_hi(D)
        # Which tokens to keep: the largest error of the mixed code itself (4-bit widest quarter).
        hi0 = torch.zeros(L, H, D, dtype=torch.bool, device=k.device)
        hi0.scatter_(2, (k.amax(2) - k.amin(2)).topk(m, dim=2).indices, True)
        kp = _pad_groups(k, G, S)
        plain = {}
        for levels in (4, 16):
            lo, hi = (_expand(x, T, S) for x in _fit_range(kp, None, 3, levels))
            plain[levels] = _dequant(_quant(k, lo, hi, levels), lo, hi, levels)
        err_k = _relerr(k, torch.where(hi0[:, :, None, :], plain[16], plain[4]))
        del plain
        v_scale = _fit_symmetric(vr)  # [L, H, T] fp16
        v_div = torch.where(v_scale == 0, 1.0, v_scale.float())[..., None]
        v_q = torch.round(vr / v_div + 1.5).clamp_(0, 3)
        err_v = _relerr(vr, (v_q - 1.5) * v_scale.float()[..., None])
        v_q = v_q.to(torch.uint8)
        score = err_k + err_v
        score[:, : min(INT2_KEEP_FIRST, T)] = float("inf")
        idx = score.topk(n, dim=1).indices.sort(dim=1).values  # [L, n]
        kept = torch.zeros(L, T, dtype=torch.bool, device=k.device)
        kept.scatter_(1, idx, True)
        rest = (~kept)[:, None, :, None]  # [L, 1, T, 1]
        inf = torch.tensor(float("inf"), device=k.device)
        span = torch.where(rest, k, -inf).amax(2) - torch.where(rest, k, inf).amin(2)  # [L, H, D]
        span = torch.where(torch.isfinite(span), span, 0.0)
        hi_ch = torch.zeros(L, H, D, dtype=torch.bool, device=k.device)
        hi_ch.scatter_(2, span.topk(m, dim=2).indices, True)
        # slots: hi channels ascending, then the others ascending (a stable sort on "not hi")
        perm = torch.sort((~hi_ch).to(torch.uint8), dim=2, stable=True).indices  # [L, H, D]: slot -> channel
        pos = torch.empty_like(perm)
        pos.scatter_(2, perm, torch.arange(D, device=k.device).expand(L, H, D).contiguous())
        valid = _pad_groups(rest.expand(L, H, T, D), G, S, fill=False)
        lo4, hi4 = _fit_range(kp, valid, 3, 16)
        lo2, hi2 = _fit_range(kp, valid, 3, 4)
        h4 = hi_ch[:, :, None, :]  # [L, H, 1, D]
        s4, m4 = _range_fp16(lo4, hi4, 15, "key")
        s2, m2 = _range_fp16(lo2, hi2, 3, "key")
        k_scale, k_min = torch.where(h4, s4, s2), torch.where(h4, m4, m2)  # [L, H, G, D]
        ks, km = _expand(k_scale.float(), T, S), _expand(k_min.float(), T, S)
        top = torch.where(hi_ch, 15.0, 3.0)[:, :, None, :]
        k_q = torch.minimum(torch.round((k - km) / ks).clamp_(min=0), top).to(torch.uint8)  # [L, H, T, D]
        slots = k_q.gather(3, perm[:, :, None, :].expand(L, H, T, D))
        gather = idx[:, None, :, None].expand(L, H, n, D)
        o_k, o_ks = _int8_rows(k.gather(2, gather))
        o_v, o_vs = _int8_rows(v.gather(2, gather))
        rows = torch.cat([_pack4(slots[..., :m]), _pack2(slots[..., m:]), _pack2(v_q)], dim=-1)
        sec = {"o_idx": idx.to(torch.int32), "k_scale": k_scale, "k_min": k_min, "v_scale": v_scale,
               "o_ks": o_ks, "o_vs": o_vs, "o_k": o_k, "o_v": o_v, "k_pos": pos.to(torch.uint8)}  # fmt: skip
        layout = int2m_side_layout(H, T, D)
        side = torch.cat(
            [sec[name].reshape(L, -1).view(torch.uint8) for name in layout if name != "end"], dim=1
        )
        pad = layout["end"][0] - side.shape[1]
        if pad:
            side = torch.cat([side, torch.zeros(L, pad, dtype=torch.uint8, device=side.device)], dim=1)
        return {"rows": rows, "side": side}

    def _decode_one(self, rows: torch.Tensor, side: torch.Tensor) -> torch.Tensor:  # -> [2, H, T, D] fp32
        p = int2m_sections(rows, side)
        H, T, _ = rows.shape
        D = p["k_pos"].shape[1]
        _, S = int2_groups(T)
        group = torch.arange(T, device=rows.device) // S
        slots = torch.cat([_unpack4(p["k_hi"]), _unpack2(p["k_lo"])], dim=-1)  # [H, T, D] by slot
        q = slots.gather(2, p["k_pos"].long()[:, None, :].expand(H, T, D)).float()  # by channel
        k = q * p["k_scale"].float()[:, group] + p["k_min"].float()[:, group]
        v = self._decode_values({**p, "v_min": p["v_scale"].float() * -1.5})
        idx = p["o_idx"].long()
        k[:, idx] = p["o_k"].float() * p["o_ks"].float()[..., None]
        v[:, idx] = p["o_v"].float() * p["o_vs"].float()[..., None]
        return torch.stack([k, v])

    def _shapes(self, kv):
        L, _, H, T, D = kv.shape
        self._check_head_dim(D)
        e = lambda *s, dt: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
        return {
            "rows": e(L, H, T, int2m_row_bytes(D), dt=torch.uint8),
            "side": e(L, int2m_side_layout(H, T, D)["end"][0], dt=torch.uint8),
        }


def int2_family(codec: str) -> dict:
    """The layout functions of a codec with int2's two parts (``int2``, ``int2r``, ``int2m``), for
    loaders and kernels: ``row_bytes(D)``, ``kept(T)``, ``side_layout(H, T, D)``, ``sections(rows,
    side)`` and ``value_offset(D)`` (the first byte of the value codes in a row)."""
    if codec == "int2m":
        m = lambda d: int2m_hi(d) // 2 + (d - int2m_hi(d)) // 4  # noqa: E731
        return {"row_bytes": int2m_row_bytes, "kept": int2m_kept, "side_layout": int2m_side_layout,
                "sections": int2m_sections, "value_offset": m}  # fmt: skip
    if codec in ("int2", "int2r"):
        return {"row_bytes": lambda d: d // 2 + 4, "kept": int2_kept, "side_layout": int2_side_layout,
                "sections": int2_sections, "value_offset": lambda d: d // 4}  # fmt: skip
    raise ValueError(f"codec {codec!r} has no int2 layout")


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
    c.name: c for c in (RawCodec(), Int8Codec(), Int4Codec(), Int2Codec(), Int2RCodec(), Int2MCodec())
}
"""Every codec by name. Add one by subclassing ``Codec`` and registering it here."""


def get_codec(name: str) -> Codec:
    """The codec called ``name``, or a ValueError listing the known ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
