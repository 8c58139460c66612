"""KV codecs: turn one chunk's ``kv`` into named CPU tensors and back.

A codec works on the one layout (see ``layout``) ``kv: [layers, 2, kv_heads, tokens, head_dim]``
and knows nothing about files, stores or models. Every part it writes has ``layers`` as its
first dimension, so a loader can decode layer by layer (``decode_layer``). The byte formats are
fixed: the Triton decode kernels implement exactly these.

    codec = CODECS["int4"]
    parts = codec.encode(kv)                       # {"k_q": uint8 [L, H, T, D/2], ...}
    kv2 = codec.decode(parts, torch.bfloat16)      # [L, 2, H, T, D]

Formats (L layers, H kv heads, T tokens, D head_dim, G = ceil(T / 128)):

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

Scales are computed in float32 and stored as float16; quantisation uses the *stored* (rounded)
scale so encode and decode agree. A zero range stores scale 1, so an all-zero group decodes to
zeros exactly.
"""

from __future__ import annotations

from typing import ClassVar

import torch

__all__ = ["CODECS", "Codec", "Int4Codec", "Int8Codec", "RawCodec", "get_codec", "INT4_GROUP"]

INT4_GROUP = 128
"""Tokens per int4 key group along T (the last group may be shorter)."""

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


CODECS: dict[str, Codec] = {c.name: c for c in (RawCodec(), Int8Codec(), Int4Codec())}
"""Every codec by name. Add one by subclassing ``Codec`` and registering it here."""


def get_codec(name: str) -> Codec:
    """The codec called ``name``, or a ValueError listing the known ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(CODECS))}") from None
