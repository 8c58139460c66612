"""Several requests through one decoder layer at once: the rows of every request packed in one
hidden-state tensor, each request against its own KV cache under its own exact mask.

    h      [1, a_0 + a_1 + ..., hidden]   rows of request 0, then request 1, ... (packed)
    seg i  buf_i [L, 2, Hkv, N_i, D]      request i's cache (any N_i, its own tensor)
           positions_i [a_i]              its rows' positions = their slots in buf_i

Per layer ``li`` (``packed_layer``): the input norm and the q/k/v projections run once over all
rows (one GEMM of ``sum a_i`` rows: weights are read once for every request); each segment's
rows are rotated at their own positions and their fresh K/V written into ``buf_i[li]`` at
``positions_i`` (``model.layer_qkv_segments``); each segment's queries attend over ``buf_i[li]``
alone under the exact position-causal mask (key slot <= the query's position, and the layer's
sliding window: ``model.attend_at``, on CUDA ``kernels.selected_attention``); then o_proj,
residual and MLP run once over all rows again (``model.layer_finish``). Fused Triton kernels
where ``model.fused_ops``, as in the one-request path. A segment never reads another's cache.

Results: row for row what each segment computes alone (``packed_layer`` over a ``Pack`` of one
segment is exactly fusion's per-layer step), up to the GEMMs' row count: a BLAS may pick another
blocking (summation order) for ``sum a_i`` rows than for ``a_i``, so rows can differ in the last
fp32 bits (tests/test_batch.py: within 1e-5 of values O(1) in fp32, bit-identical where the BLAS
does not change its order). Attention and every elementwise op are per segment/row and identical.

Decode (one new token per request): one row per segment, ``positions_i = [n_i]`` (the slot after
request i's last cached token, which its ``buf_i`` must have room for), ``h`` the embeddings of
each request's last token; run ``packed_layer`` for every layer, then the final norm and head on
each row. The new tokens' K/V land in each ``buf_i``, so the next step sees them.

What it does not know: which rows a request runs (selection, ``fuse``), where caches come from,
sampling. Positions are not checked against the buffers on the device (that would synchronise):
each must be < N_i and, within a segment, distinct and ascending.

    pack = Pack([Segment(buf_a, pos_a), Segment(buf_b, pos_b)])
    rope = pack.rope(lm, h)                                  # once for all layers
    for li in range(lm.spec.num_layers): h = packed_layer(lm, li, h, pack, rope)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chunkcache import model as M
from chunkcache.model import LoadedModel

__all__ = ["Pack", "Segment", "packed_attend_finish", "packed_layer", "packed_project"]


@dataclass(frozen=True)
class Segment:
    """One request's rows in a packed layer step."""

    buf: torch.Tensor
    """[L, 2, Hkv, N, D] the request's cache: its rows' K/V are written here, its queries read it."""
    positions: torch.Tensor
    """[a] int64 on ``buf``'s device: the rows' positions (= slots in ``buf``), ascending, distinct, < N."""


class Pack:
    """Segments whose rows are packed back to back in ``h``: segment i owns rows ``rows[i]``.
    Checked on the host (shapes, dtypes, devices: no device synchronisation)."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        if not segments:
            raise ValueError("a pack needs at least one segment")
        first = segments[0].buf
        self.segments = list(segments)
        self.rows: list[slice] = []
        start = 0
        for i, s in enumerate(self.segments):
            if s.buf.dim() != 5 or s.buf.shape[1] != 2:
                raise ValueError(f"segment {i}: buf must be [L, 2, Hkv, N, D], got {tuple(s.buf.shape)}")
            if (
                s.buf.shape[0] != first.shape[0]
                or s.buf.shape[2] != first.shape[2]
                or s.buf.shape[4] != first.shape[4]
                or s.buf.dtype != first.dtype
                or s.buf.device != first.device
            ):
                raise ValueError(
                    f"segment {i}: buf {tuple(s.buf.shape)} {s.buf.dtype} on {s.buf.device} does not match "
                    f"segment 0's {tuple(first.shape)} {first.dtype} on {first.device} (layers, heads, head_dim)"
                )
            if (
                s.positions.dim() != 1
                or s.positions.dtype != torch.long
                or s.positions.device != s.buf.device
            ):
                raise ValueError(
                    f"segment {i}: positions must be 1-D int64 on {s.buf.device}, got "
                    f"{tuple(s.positions.shape)} {s.positions.dtype} on {s.positions.device}"
                )
            n = s.positions.numel()
            if n == 0:
                raise ValueError(f"segment {i} has no rows")
            self.rows.append(slice(start, start + n))
            start += n
        self.n_rows = start
        self.positions = (
            self.segments[0].positions
            if len(self.segments) == 1
            else torch.cat([s.positions for s in self.segments])
        )
        """[sum a_i] every row's position, in row order."""

    def rope(self, lm: LoadedModel, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[sum a_i, D]`` of every row's position (``model.rotary``; the same for every
        layer, so compute it once per pack)."""
        return M.rotary(lm.model, self.positions, like)

    def check_rows(self, h: torch.Tensor) -> None:
        if h.dim() != 3 or h.shape[0] != 1 or h.shape[1] != self.n_rows:
            raise ValueError(
                f"h must be [1, {self.n_rows}, hidden] (the segments' rows), got {tuple(h.shape)}"
            )


def packed_project(
    lm: LoadedModel,
    li: int,
    h: torch.Tensor,
    pack: Pack,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """First half of layer ``li``: norm and q/k/v projections over all rows, each segment's rows'
    rotated K/V written into its ``buf[li]`` -> each segment's RoPE'd queries ``[Hq, a_i, D]``."""
    cos, sin = rope if rope is not None else pack.rope(lm, h)
    segs = [
        (r, s.positions, s.buf[li, 0], s.buf[li, 1]) for r, s in zip(pack.rows, pack.segments, strict=True)
    ]
    return M.layer_qkv_segments(lm.model.model.layers[li], h, cos, sin, lm.spec, segs)


def packed_attend_finish(
    lm: LoadedModel, li: int, h: torch.Tensor, qs: Sequence[torch.Tensor], pack: Pack
) -> torch.Tensor:
    """Second half of layer ``li``: each segment's queries ``qs[i]`` attend over its own
    ``buf[li]`` (exact position-causal mask, the layer's window); o_proj, residual and MLP over
    all rows -> the next hidden ``[1, sum a_i, hidden]``."""
    layer = lm.model.model.layers[li]
    scale, window = layer.self_attn.scaling, lm.spec.windows[li]
    outs = [
        M.attend_at(q, s.positions, s.buf[li, 0], s.buf[li, 1], scale, window)
        for q, s in zip(qs, pack.segments, strict=True)
    ]
    return M.layer_finish(layer, h, outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))


def packed_layer(
    lm: LoadedModel,
    li: int,
    h: torch.Tensor,  # [1, sum a_i, hidden]
    pack: Pack | Sequence[Segment],
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # pack.rope(lm, h), if the caller has it
) -> torch.Tensor:
    """Decoder layer ``li`` for every segment's rows at once (module docstring) -> next ``h``."""
    pack = pack if isinstance(pack, Pack) else Pack(pack)
    pack.check_rows(h)
    return packed_attend_finish(lm, li, h, packed_project(lm, li, h, pack, rope), pack)
