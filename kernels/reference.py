"""Plain-torch references for every kernel in ``chunkcache.kernels``: the CPU path and the test oracle.

Nothing here imports triton, so this module works on any machine. Each function states the exact
semantics its Triton twin must reproduce (same decode, same rounding points, same mask).

It knows the per-layer codec formats of ``chunkcache/codec.py`` (leading layer dim removed) and the
neox half-split RoPE convention; it knows nothing about models, stores or fusion policy.

    kv = {"kv": torch.randn(2, 8, 5, 64)}                               # codec "raw", one layer
    k_out = v_out = torch.zeros(8, 100, 64)                             # [kv_heads, N, head_dim]
    rerotate_scatter_reference("raw", kv, cos, sin, k_out, v_out, offset=40)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from chunkcache.codec import CODECS, INT4_GROUP, int2_family, int2_groups

KERNEL_CODECS = ("raw", "int8", "int4", "int2", "int2r", "int2m")
"""The codecs the decode kernels (and ``decode_layer``) implement."""

INT2_FAMILY = ("int2", "int2r", "int2m")
"""Codecs with int2's two parts (``rows``, ``side``; ``codec.int2_family`` gives each one's layout):
int2r rotates its values, int2m also codes a quarter of the key channels at 4 bits."""

CODEC_PARTS: dict[str, tuple[str, ...]] = {name: CODECS[name].parts for name in KERNEL_CODECS}
"""The tensors each codec stores for one layer (shapes in ``decode_layer``), in ``codec.py``'s
order: the layout is defined there (with ``INT4_GROUP``, int4 keys' tokens per (scale, min))."""


def check_parts(codec: str, parts: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError if ``parts`` does not hold exactly what ``codec`` needs."""
    if codec not in CODEC_PARTS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODEC_PARTS)}")
    missing = [name for name in CODEC_PARTS[codec] if name not in parts]
    if missing:
        raise ValueError(f"codec {codec!r} needs parts {missing}, got {sorted(parts)}")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., D/2] uint8 -> [..., D] uint8; byte i holds q[2i] in the low nibble, q[2i+1] in the high."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def decode_layer(codec: str, parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one layer of a chunk to float32 keys and values, each ``[kv_heads, tokens, head_dim]``.

    raw:  kv [2, H, T, D] model dtype.
    int8: k_q, v_q int8 [H, T, D]; k_scale fp16 [H, D] (per channel); v_scale fp16 [H, T] (per token);
          x = q * scale.
    int4: k_q, v_q uint8 [H, T, D/2] (two per byte along D, low nibble = even index);
          k_scale, k_min fp16 [H, ceil(T/128), D] (per channel, token t uses group t // 128);
          v_scale, v_min fp16 [H, T] (per token); x = q * scale + min.
    int2: rows uint8 [H, T, D/2 + 4], side uint8 [E] (``codec.Int2Codec``): 2-bit codes, key
          groups t // S, then the kept tokens' int8 rows written over theirs.
    int2r: int2's parts; values decoded through the inverse Hadamard rotation (``codec.Int2RCodec``).
    int2m: rows [H, T, 9D/16], side [E] (``codec.Int2MCodec``): mixed 4/2-bit keys, int2r's values.
    """
    check_parts(codec, parts)
    if codec in INT2_FAMILY:  # the layout and its decode are codec.py's (rows, side; see Int2Codec)
        kv = CODECS[codec].decode_layer(
            {"rows": parts["rows"][None], "side": parts["side"][None]}, 0, torch.float32
        )
        return kv[0], kv[1]
    if codec == "raw":
        kv = parts["kv"].float()
        return kv[0], kv[1]
    if codec == "int8":
        k = parts["k_q"].float() * parts["k_scale"].float()[:, None, :]
        v = parts["v_q"].float() * parts["v_scale"].float()[:, :, None]
        return k, v
    kq = unpack_int4(parts["k_q"]).float()  # [H, T, D]
    vq = unpack_int4(parts["v_q"]).float()
    t = kq.shape[1]
    group = torch.arange(t, device=kq.device) // INT4_GROUP  # [T]
    k = kq * parts["k_scale"].float()[:, group, :] + parts["k_min"].float()[:, group, :]
    v = vq * parts["v_scale"].float()[:, :, None] + parts["v_min"].float()[:, :, None]
    return k, v


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Neox half-split rotation partner: cat(-x[D/2:], x[:D/2]) along the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate_scatter_reference(
    codec: str,
    parts: Mapping[str, torch.Tensor],
    cos: torch.Tensor,  # [D] fp32, halves duplicated (HF layout), for the position delta
    sin: torch.Tensor,  # [D] fp32
    k_out: torch.Tensor,  # [kv_heads, N, D] model dtype, may be a strided view
    v_out: torch.Tensor,  # [kv_heads, N, D]
    offset: int,
) -> None:
    """Decode one chunk-layer, rotate its keys by the position delta and write it at ``offset``.

    k_out[:, offset + t] = round(k[t] * cos + rotate_half(k[t]) * sin)   (decode and math in fp32)
    v_out[:, offset + t] = round(v[t])
    """
    k, v = decode_layer(codec, parts)
    t = k.shape[1]
    if offset < 0 or offset + t > k_out.shape[1]:
        raise ValueError(f"chunk of {t} tokens at offset {offset} does not fit in {k_out.shape[1]} slots")
    cos = cos.float().to(k.device)
    sin = sin.float().to(k.device)
    k = k * cos + rotate_half(k) * sin
    k_out[:, offset : offset + t] = k.to(k_out.dtype)
    v_out[:, offset : offset + t] = v.to(v_out.dtype)


def position_mask(q_pos: torch.Tensor, n_keys: int, window: int | None = None) -> torch.Tensor:
    """Bool [n, n_keys]: key j (at position j) is visible to the query at q_pos[i] iff
    j <= q_pos[i] (and j > q_pos[i] - window with a window)."""
    key_pos = torch.arange(n_keys, device=q_pos.device)
    mask = key_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= key_pos[None, :] > q_pos[:, None] - window
    return mask


def check_attention_args(q, q_pos, k, v, window) -> None:
    """The shape, dtype and window checks shared by the attention kernels' launchers
    (q [Hq, n, D], q_pos [n], k and v [Hkv, N, D])."""
    hq, n, d = q.shape
    hkv, _, dk = k.shape
    if v.shape != k.shape or dk != d:
        raise ValueError(f"k, v must be [Hkv, N, {d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads is not a multiple of {hkv} kv heads")
    if q_pos.shape != (n,):
        raise ValueError(f"q_pos must be [{n}], got {tuple(q_pos.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def selected_attention_reference(
    q: torch.Tensor,  # [Hq, n, D], already RoPE'd
    q_pos: torch.Tensor,  # [n] int64, absolute positions, sorted ascending
    k: torch.Tensor,  # [Hkv, N, D], key j sits at position j
    v: torch.Tensor,  # [Hkv, N, D]
    scale: float | None = None,
    window: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of selected queries over the full KV under the exact position-causal mask.

    Key j is visible to a query at position p iff j <= p (and p - window < j with a window).
    GQA: query head h reads kv head h // (Hq // Hkv). Returns out [Hq, n, D] in q's dtype and,
    with ``return_lse``, the natural log-sum-exp of the scaled, masked scores [Hq, n] fp32.
    """
    hq, n, d = q.shape
    hkv, big_n, _ = k.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads is not a multiple of {hkv} kv heads")
    scale = d**-0.5 if scale is None else scale
    mask = position_mask(q_pos.to(q.device), big_n, window)  # [n, N], True = attend
    group = hq // hkv
    # GQA without copying K/V: the group query heads of each kv head become rows of one query
    # block, [Hkv, group * n, D] (row g * n + i: head kv * group + g, query i), each masked by its
    # query's row. (Repeating K and V per query head instead cost 20x more on CPU for a decode
    # row over 2K keys: SmolLM2 shape, one thread.)
    qg = q.reshape(hkv, group * n, d)
    mask_g = mask.repeat(group, 1)  # [group * n, N]
    out = torch.nn.functional.scaled_dot_product_attention(qg, k, v, attn_mask=mask_g, scale=scale)
    out = out.reshape(hq, n, d)
    if not return_lse:
        return out
    scores = torch.einsum("hrd,hmd->hrm", qg.float(), k.float()) * scale
    lse = scores.masked_fill(~mask_g, float("-inf")).logsumexp(dim=-1).reshape(hq, n)
    return out, lse


def probe_attention_reference(
    q: torch.Tensor,  # [Hq, n, D], already RoPE'd (the question's queries)
    q_pos: torch.Tensor,  # [n] int64 absolute positions
    k: torch.Tensor,  # [Hkv, N, D], key j sits at position j
    v: torch.Tensor,  # [Hkv, N, D]
    scale: float | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's attention: (out [Hq, n, D] in q's dtype, mass [N] fp32), where mass[j] is the
    softmax probability of key j averaged over query heads and queries (the attention the question
    pays to each key). Same mask as ``selected_attention_reference``; fp32 math."""
    hq, n, d = q.shape
    hkv, big_n, _ = k.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads is not a multiple of {hkv} kv heads")
    scale = d**-0.5 if scale is None else scale
    mask = position_mask(q_pos.to(q.device), big_n, window)  # [n, N]
    group = hq // hkv
    scores = torch.einsum("hnd,hmd->hnm", q.float(), k.float().repeat_interleave(group, 0)) * scale
    probs = scores.masked_fill(~mask[None], float("-inf")).softmax(-1)  # [Hq, n, N]
    out = torch.einsum("hnm,hmd->hnd", probs, v.float().repeat_interleave(group, 0))
    return out.to(q.dtype), probs.mean(dim=(0, 1))


_SCALE_PARTS = ("k_scale", "k_min", "v_scale", "v_min")

META_COLS = 16
"""Columns of ``PackedLayout.meta``'s launch table."""


class PackedLayout:
    """Where every chunk's codec parts of one layer sit inside one packed byte buffer (a staging
    slot), and where each chunk goes in the assembled cache. The same layout serves every layer
    and every slot (all layers of a chunk have the same part shapes), so the launch table is built
    once per query (``meta``) and each layer is one launch.

        layout = PackedLayout("int8", heads=8, head_dim=128)
        layout.add({"k_q": ((0, torch.int8, (8, 512, 128)), ...}, dest=32)   # one chunk
        rerotate_scatter_packed(layout, slot, cos, sin, k_out, v_out)          # [C, D] cos/sin
    """

    def __init__(self, codec: str, heads: int, head_dim: int) -> None:
        if codec not in CODEC_PARTS:
            raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODEC_PARTS)}")
        self.codec, self.heads, self.head_dim = codec, heads, head_dim
        self.chunks: list[dict[str, tuple[int, torch.dtype, tuple[int, ...]]]] = []
        self.tokens: list[int] = []
        self.dests: list[int] = []
        self.kept: list[int] = []  # int2: tokens kept at 8 bits per chunk (0 for other codecs)
        self.nbytes = 0  # end of the last part
        self._meta: dict[torch.device, torch.Tensor] = {}

    def add(self, parts: Mapping[str, tuple[int, torch.dtype, tuple[int, ...]]], dest: int) -> None:
        """One chunk: each codec part's (byte offset in the buffer, dtype, one-layer shape)."""
        check_parts(self.codec, parts)
        if self.codec == "raw":
            _, h, t, d = parts["kv"][2]
        elif self.codec in INT2_FAMILY:
            h, t, r = parts["rows"][2]
            d = self.head_dim
            fam = int2_family(self.codec)
            if self.codec != "int2":
                CODECS[self.codec]._check_head_dim(d)
            if r != fam["row_bytes"](d):
                raise ValueError(f"{self.codec} rows of {r} bytes do not fit head_dim {d}")
            side = fam["side_layout"](h, t, d)["end"][0]
            if (
                parts["rows"][1] != torch.uint8
                or parts["side"][1] != torch.uint8
                or parts["side"][2] != (side,)
            ):
                raise ValueError(f"int2 parts must be uint8 rows [H, T, D/2 + 4] and side [{side}]")
            if parts["side"][0] % 4:
                raise ValueError(f"part at byte {parts['side'][0]} is not aligned to its int32 section")
        else:
            h, t, d = parts["k_q"][2]
            d = d * 2 if self.codec == "int4" else d
        if (h, d) != (self.heads, self.head_dim):
            raise ValueError(
                f"chunk parts have {h} heads of dim {d}, layout is {self.heads} x {self.head_dim}"
            )
        for off, dtype, shape in parts.values():
            size = math.prod(shape) * dtype.itemsize
            if off % dtype.itemsize:
                raise ValueError(f"part at byte {off} is not aligned to its {dtype}")
            self.nbytes = max(self.nbytes, off + size)
        self.chunks.append({k: (int(o), dt, tuple(int(x) for x in sh)) for k, (o, dt, sh) in parts.items()})
        self.tokens.append(int(t))
        self.dests.append(int(dest))
        self.kept.append(int2_family(self.codec)["kept"](int(t)) if self.codec in INT2_FAMILY else 0)
        self._meta.clear()

    def shifted(self, deltas: Sequence[Mapping[str, int]]) -> PackedLayout:
        """A copy with chunk ``c``'s part ``name`` moved ``deltas[c][name]`` bytes further (a
        multiple of the part's dtype size; parts not named stay). For buffers that hold the same
        parts at other offsets (several layers of a part side by side): no re-validation of
        shapes, which ``add`` already did."""
        if len(deltas) != len(self.chunks):
            raise ValueError(f"{len(deltas)} deltas for {len(self.chunks)} chunks")
        out = PackedLayout(self.codec, self.heads, self.head_dim)
        out.tokens, out.dests, out.kept = list(self.tokens), list(self.dests), list(self.kept)
        for parts, delta in zip(self.chunks, deltas, strict=True):
            moved = {}
            for name, (off, dt, shape) in parts.items():
                d = int(delta.get(name, 0))
                if d % dt.itemsize or off + d < 0:
                    raise ValueError(f"cannot move part {name!r} by {d} bytes")
                moved[name] = (off + d, dt, shape)
                out.nbytes = max(out.nbytes, off + d + math.prod(shape) * dt.itemsize)
            out.chunks.append(moved)
        return out

    def views(self, buf: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Typed views of each chunk's parts inside ``buf`` (1-D uint8)."""
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < self.nbytes:
            raise ValueError(f"buffer must be 1-D uint8 of at least {self.nbytes} bytes")
        out = []
        for parts in self.chunks:
            out.append(
                {
                    name: buf[off : off + math.prod(shape) * dt.itemsize].view(dt).view(shape)
                    for name, (off, dt, shape) in parts.items()
                }
            )
        return out

    def data_dtype(self) -> torch.dtype:
        return self.chunks[0][
            "kv" if self.codec == "raw" else "rows" if self.codec in INT2_FAMILY else "k_q"
        ][1]

    def row_bytes(self) -> int:
        """int2 family: bytes per (head, token) row (the kernel's ROW); 0 for other codecs."""
        return self.chunks[0]["rows"][2][2] if self.codec in INT2_FAMILY and self.chunks else 0

    def _int2_row(self, parts, t: int, dest: int) -> list[int]:
        """int2's launch-table row: rows at byte r (codes; value codes at r + D/4; value scale,
        min at fp16 units (r + D/2) / 2 and one further), side sections at s + their offsets.
        int2m: value codes at r + value_offset(D), v_scale in side (fp16 units) and, in v_min's
        column, the byte offset of k_pos."""
        d = self.head_dim
        fam = int2_family(self.codec)
        r, s = parts["rows"][0], parts["side"][0]
        sec = {name: s + off for name, (off, _, _) in fam["side_layout"](self.heads, t, d).items()}
        groups, per_group = int2_groups(t)
        if self.codec == "int2m":
            vs, vm = sec["v_scale"] // 2, sec["k_pos"]
        else:
            vs = (r + d // 2) // 2
            vm = vs + 1
        return [t, dest, groups, r, r + fam["value_offset"](d), sec["k_scale"] // 2, sec["k_min"] // 2, vs,
                vm, per_group, fam["kept"](t), sec["o_idx"] // 4, sec["o_k"], sec["o_v"],
                sec["o_ks"] // 2, sec["o_vs"] // 2]  # fmt: skip

    def meta(self, device: torch.device) -> torch.Tensor:
        """[C, META_COLS] int64 launch table on ``device``: tokens, dest, key groups, then element
        offsets of k, v (in the data dtype) and k_scale, k_min, v_scale, v_min (in fp16; 0 where
        unused); then for int2 (0 otherwise): tokens per key group, kept tokens n, and the element
        offsets of o_idx (int32), o_k, o_v (int8), o_ks, o_vs (fp16); see ``_int2_row``."""
        device = _device(device)
        if device not in self._meta:
            self._meta[device] = self._rows().to(device)
        return self._meta[device]

    def series(
        self, steps: Sequence[Mapping[str, int]], layers: int, device: torch.device
    ) -> list[PackedLayout]:
        """The layouts of ``layers`` consecutive layers of the same parts, this one being layer 0:
        chunk ``c``'s part ``name`` lies ``steps[c][name]`` bytes further per layer (a part's layers
        side by side). Equal to ``[self.shifted(j * steps) for j]``, but with one launch table for
        all of them, made by one host-to-device copy (the table is linear in the layer); each
        layer's offsets are made only when asked for (``views``, the CPU reference)."""
        device = _device(device)
        one = self.shifted(steps)
        m0, m1 = self._rows(), one._rows()
        delta = m1 - m0
        if layers > 2 and not torch.equal(
            self.shifted([{k: 2 * b for k, b in d.items()} for d in steps])._rows() - m1, delta
        ):
            return [self] + [
                self.shifted([{k: j * b for k, b in d.items()} for d in steps]) for j in range(1, layers)
            ]
        tables = (m0[None] + torch.arange(layers)[:, None, None] * delta[None]).to(device)  # [L, C, cols]
        ends = [  # per part: its end in layer 0, and how far it moves per layer
            (off + math.prod(shape) * dtype.itemsize, steps[c].get(name, 0))
            for c, parts in enumerate(self.chunks)
            for name, (off, dtype, shape) in parts.items()
        ]
        out = []
        for j in range(layers):
            lay = _SeriesLayer(
                self, steps, j, max((e + j * b for e, b in ends), default=self.nbytes) if j else self.nbytes
            )
            lay._meta[device] = tables[j]
            out.append(lay)
        return out

    def _rows(self) -> torch.Tensor:
        """The launch table (``meta``) on the host."""
        rows = []
        data_size = self.data_dtype().itemsize
        for parts, t, dest in zip(self.chunks, self.tokens, self.dests, strict=True):
            if self.codec in INT2_FAMILY:
                rows.append(self._int2_row(parts, t, dest))
                continue
            if self.codec == "raw":
                k = parts["kv"][0] // data_size
                v = k + self.heads * t * self.head_dim
            else:
                k, v = parts["k_q"][0] // data_size, parts["v_q"][0] // data_size
                if parts["v_q"][1] != parts["k_q"][1]:
                    raise ValueError("k_q and v_q must share a dtype")
            groups = parts["k_scale"][2][1] if self.codec == "int4" else 1
            sc = [parts[n][0] // 2 if n in parts else 0 for n in _SCALE_PARTS]
            for n in _SCALE_PARTS:
                if n in parts and parts[n][1] != torch.float16:
                    raise ValueError(f"{n} must be float16, got {parts[n][1]}")
            kept = [0] * 7
            rows.append([t, dest, groups, k, v, *sc, *kept])
        return torch.tensor(rows, dtype=torch.int64)


def _device(device) -> torch.device:
    """``device`` with its index (``cuda`` -> ``cuda:N``, the current one), so one device is one key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class _SeriesLayer(PackedLayout):
    """Layer ``j`` of ``PackedLayout.series``: tokens, destinations and launch table shared with the
    series; the part offsets (``chunks``) made on first use. ``nbytes``: where its last part ends."""

    def __init__(self, base: PackedLayout, steps, j: int, nbytes: int) -> None:
        self.codec, self.heads, self.head_dim = base.codec, base.heads, base.head_dim
        self.tokens, self.dests, self.kept = base.tokens, base.dests, base.kept
        self.nbytes = nbytes
        self._meta = {}
        self._base, self._steps, self._j = base, steps, j
        self._chunks = None

    @property
    def chunks(self):
        if self._chunks is None:
            j = self._j
            self._chunks = self._base.shifted([{k: j * b for k, b in d.items()} for d in self._steps]).chunks
        return self._chunks

    def data_dtype(self) -> torch.dtype:
        return self._base.data_dtype()


def rerotate_scatter_packed_reference(
    layout: PackedLayout,
    buf: torch.Tensor,  # 1-D uint8 holding every chunk's parts of one layer at layout's offsets
    cos: torch.Tensor,  # [C, D] fp32, one rotation per chunk
    sin: torch.Tensor,  # [C, D]
    k_out: torch.Tensor,  # [kv_heads, N, D]
    v_out: torch.Tensor,
) -> None:
    """``rerotate_scatter_reference`` for every chunk of ``layout`` (chunk c with cos[c], sin[c])."""
    for c, parts in enumerate(layout.views(buf)):
        rerotate_scatter_reference(layout.codec, parts, cos[c], sin[c], k_out, v_out, layout.dests[c])


_SUM_ROW = 4096  # words per row of sum64's CPU path


def _wrap64(x: int) -> int:
    """``x`` wrapped to a signed 64-bit integer (two's complement)."""
    return ((x + (1 << 63)) % (1 << 64)) - (1 << 63)


def sum64(data: torch.Tensor) -> tuple[int, int]:
    """Checksum of a byte range (1-D uint8, even length) as little-endian 16-bit words w_i:
    (sum w_i, sum (i + 1) * w_i), each wrapped to a signed 64-bit integer. Any one damaged word
    changes the first; swapped or shifted words change the second. Cheap on a GPU (the pipeline
    checks every staged layer there); for damage, not tampering."""
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() % 2:
        raise ValueError("sum64 needs a 1-D uint8 tensor of even length")
    if data.device.type == "cpu":  # numpy, without a temporary 8x the data's size (~5x faster)
        import numpy as np

        # Words as rows of _SUM_ROW: sum (i + 1) w_i = R * sum_r r * rowsum_r + sum_j (j + 1) colsum_j,
        # exact in Python ints, then wrapped to signed 64 bits as the int64 paths wrap.
        w = data.numpy().view("<u2")
        m = w.size - w.size % _SUM_ROW
        rows = w[:m].reshape(-1, _SUM_ROW)
        rs, cs = rows.sum(axis=1, dtype=np.int64), rows.sum(axis=0, dtype=np.int64)
        tail = w[m:].astype(np.int64)
        total = int(rs.sum()) + int(tail.sum())
        weighted = (
            _SUM_ROW * int((np.arange(rs.size, dtype=np.int64) * rs).sum())
            + int((np.arange(1, _SUM_ROW + 1, dtype=np.int64) * cs).sum())
            + int((np.arange(m + 1, w.size + 1, dtype=np.int64) * tail).sum())
        )
        return _wrap64(total), _wrap64(weighted)
    w = data.view(torch.int16).to(torch.int64) & 0xFFFF
    idx = torch.arange(1, w.numel() + 1, dtype=torch.int64, device=w.device)
    return int(w.sum()), int((w * idx).sum())


def checksums_reference(buf: torch.Tensor, table: torch.Tensor, longest: int | None = None) -> torch.Tensor:
    """[P, 2] int64: ``sum64`` of each byte range (offset, count) in ``table`` [P, 2] of ``buf``
    (``longest``, the largest count, is only a launch hint for the kernel)."""
    rows = [sum64(buf[int(o) : int(o) + int(n)]) for o, n in table.tolist()]
    return torch.tensor(rows, dtype=torch.int64, device=buf.device).view(-1, 2)


def checksum_partials_reference(buf: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    """``checksums_reference`` written into ``out`` [P, blocks, 2]: the sums in block 0, zeros in
    the others, so ``out.sum(dim=1)`` is the sums, as with the kernel's per-block partials."""
    out.zero_()
    out[:, 0] = checksums_reference(buf, table).to(out.device)


# ------------------------------------------------------------------ decoder-layer elementwise ops
# The small ops of a Llama-style decoder layer that ``layer_triton.py`` fuses. Each reference is
# the torch expression whose rounding points the kernel reproduces; the ``check_*`` functions are
# the argument contract both paths enforce (ValueError), so CPU and GPU fail alike.

LAYER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Activation dtypes of the layer ops."""


def _last_dim_contiguous(t: torch.Tensor) -> bool:
    return t.dim() > 0 and (t.shape[-1] <= 1 or t.stride(-1) == 1)


def check_rms_norm_args(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    """x [..., hidden] (last dim contiguous) in ``LAYER_DTYPES``; weight [hidden] of x's dtype;
    residual, if any, like x."""
    if x.dtype not in LAYER_DTYPES or not _last_dim_contiguous(x):
        raise ValueError(
            f"x must be [..., hidden] float32/16 or bfloat16 with a contiguous last dim, "
            f"got {tuple(x.shape)} {x.dtype} strides {x.stride()}"
        )
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(
            f"weight must be [{hidden}] {x.dtype} on {x.device}, got "
            f"{tuple(weight.shape)} {weight.dtype} on {weight.device}"
        )
    if residual is not None and (
        residual.shape != x.shape
        or residual.dtype != x.dtype
        or residual.device != x.device
        or not _last_dim_contiguous(residual)
    ):
        raise ValueError(
            f"residual must match x ({tuple(x.shape)} {x.dtype}, contiguous last dim), got "
            f"{tuple(residual.shape)} {residual.dtype} strides {residual.stride()}"
        )


def rms_norm_reference(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden], x's dtype
    eps: float,
    residual: torch.Tensor | None = None,  # [..., hidden], like x
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face ``LlamaRMSNorm`` of x, or with a residual ``(rms_norm(h), h)`` for h = x + residual
    (one rounding to the dtype, as torch's add):

        y = weight * round(xf * rsqrt(mean(xf^2) + eps)),  xf = x in fp32; the product rounded once
    """
    check_rms_norm_args(x, weight, residual)
    if residual is not None:
        h = x + residual
        return rms_norm_reference(h, weight, eps), h
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def check_silu_mul_args(gate: torch.Tensor, up: torch.Tensor) -> None:
    """gate and up: the same shape, dtype (``LAYER_DTYPES``) and device, both contiguous."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"gate and up must match, got {tuple(gate.shape)} {gate.dtype} on {gate.device} "
            f"and {tuple(up.shape)} {up.dtype} on {up.device}"
        )
    if gate.dtype not in LAYER_DTYPES:
        raise ValueError(f"gate/up must be float32, float16 or bfloat16, got {gate.dtype}")
    if not (gate.is_contiguous() and up.is_contiguous()):
        raise ValueError("gate and up must be contiguous")


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` (the Llama MLP's activation) spelled with its rounding points:
    silu in fp32 rounded to the dtype, then the product in fp32 rounded once."""
    check_silu_mul_args(gate, up)
    silu = torch.nn.functional.silu(gate.float()).to(gate.dtype)
    return (silu.float() * up.float()).to(gate.dtype)


def check_rope_qkv_scatter_args(q, k, v, cos, sin, positions, k_out, v_out) -> None:
    """q [n, Hq, D], k and v [n, Hkv, D] (last dim contiguous, D even, one dtype of ``LAYER_DTYPES``);
    cos, sin [n, D] (or [1, n, D]) floating, last dim contiguous; positions [n] int64; k_out and
    v_out [Hkv, N, D] of q's dtype, last dim contiguous; everything on q's device."""
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"q must be [n, Hq, D] and k, v [n, Hkv, D], got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    n, _, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != n or k.shape[2] != d:
        raise ValueError(f"k, v must be [{n}, Hkv, {d}] like q, got {tuple(k.shape)}")
    if d % 2:
        raise ValueError(f"head_dim {d} must be even (rotate_half splits it in two)")
    if q.dtype not in LAYER_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share a float32/16 or bfloat16 dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[-2:] != (n, d) or t.numel() != n * d or not t.is_floating_point():
            raise ValueError(f"{name} must be [{n}, {d}] floating, got {tuple(t.shape)} {t.dtype}")
    if positions.shape != (n,) or positions.dtype != torch.int64:
        raise ValueError(f"positions must be [{n}] int64, got {tuple(positions.shape)} {positions.dtype}")
    if k_out.dim() != 3 or k_out.shape != v_out.shape or k_out.shape[0] != hkv or k_out.shape[2] != d:
        raise ValueError(
            f"k_out, v_out must be [{hkv}, N, {d}], got {tuple(k_out.shape)}, {tuple(v_out.shape)}"
        )
    if k_out.dtype != q.dtype or v_out.dtype != q.dtype:
        raise ValueError(f"k_out, v_out must be {q.dtype} like q, got {k_out.dtype}, {v_out.dtype}")
    named = {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "k_out": k_out, "v_out": v_out}
    strided = [name for name, t in named.items() if not _last_dim_contiguous(t)]
    if strided:
        raise ValueError(f"{strided} must have a contiguous last dim (stride 1)")
    elsewhere = [name for name, t in {**named, "positions": positions}.items() if t.device != q.device]
    if elsewhere:
        raise ValueError(f"{elsewhere} are not on q's device {q.device}")


def rope_qkv_scatter_reference(
    q: torch.Tensor,  # [n, Hq, D], e.g. a view of the q projection's [n, Hq * D] output
    k: torch.Tensor,  # [n, Hkv, D]
    v: torch.Tensor,  # [n, Hkv, D]
    cos: torch.Tensor,  # [n, D], HF layout (halves duplicated), any float dtype
    sin: torch.Tensor,  # [n, D]
    positions: torch.Tensor,  # [n] int64, distinct, each < N: the cache slot of token i
    k_out: torch.Tensor,  # [Hkv, N, D] q's dtype, may be a strided view (buf[layer, 0])
    v_out: torch.Tensor,  # [Hkv, N, D]
) -> torch.Tensor:
    """Rotary on q and k (HF's rotate_half convention) and the cache write of k and v, in place:

        rot(x)                      = round(xf * cos + rotate_half(xf) * sin)    (all in fp32)
        k_out[:, positions[i], :]   = rot(k[i]),   v_out[:, positions[i], :] = v[i]

    Returns rot(q) as a new contiguous head-major [Hq, n, D] tensor. (HF's own bf16 rotary rounds
    after each of its three ops; this rounds once.)
    """
    check_rope_qkv_scatter_args(q, k, v, cos, sin, positions, k_out, v_out)
    n, _, d = q.shape
    cos = cos.reshape(n, 1, d).float()
    sin = sin.reshape(n, 1, d).float()

    def rot(x: torch.Tensor) -> torch.Tensor:  # [n, H, D] -> [H, n, D]
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype).transpose(0, 1)

    k_out[:, positions] = rot(k)
    v_out[:, positions] = v.transpose(0, 1)
    return rot(q).contiguous()
