"""Triton kernel: the position-weighted sums of byte ranges of one buffer (``reference.sum64``).

The pipeline checks every staged layer of every chunk against the sums stored in its entry after
the bytes reached the GPU, at device bandwidth, instead of a crc32 on the host (~2 GB/s a core).

    sums = checksums(slot, table)     # table [P, 2] int64: byte offset (even), byte count (even)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import checksums_reference as checksums_reference

__all__ = ["checksums", "checksums_partial", "checksums_reference", "partial_blocks"]


@triton.jit
def _checksum_kernel(W_ptr, TABLE_ptr, OUT_ptr, n_blocks, BLOCK: tl.constexpr):
    """Program (block b, range p): partial sums over words [b * BLOCK, (b + 1) * BLOCK) of range p."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64)
    start = tl.load(TABLE_ptr + p * 2) // 2  # in 16-bit words
    count = tl.load(TABLE_ptr + p * 2 + 1) // 2
    i = b * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = i < count
    w = tl.load(W_ptr + start + i, mask=mask, other=0).to(tl.int64) & 0xFFFF
    a = tl.sum(w, axis=0)
    wb = tl.sum(w * (i + 1), axis=0)
    out = OUT_ptr + (p * n_blocks + b) * 2
    tl.store(out, a)
    tl.store(out + 1, wb)


def partial_blocks(longest: int, block: int = 4096) -> int:
    """Blocks per range that ``checksums_partial`` writes for ranges of at most ``longest`` bytes."""
    return max(1, triton.cdiv(longest // 2, block))


def checksums_partial(buf: torch.Tensor, table: torch.Tensor, out: torch.Tensor, block: int = 4096) -> None:
    """One launch, no allocation: per-block partial sums into ``out`` [P, blocks, 2] int64 (see
    ``partial_blocks``); ``out.sum(dim=-2)`` gives ``checksums``. For a loop that checks many
    layers and reduces once."""
    words = buf[: buf.numel() - buf.numel() % 2].view(torch.int16)
    p, n_blocks = out.shape[0], out.shape[1]
    _checksum_kernel[(n_blocks, p)](words, table, out, n_blocks, BLOCK=block, num_warps=8)


def checksums(
    buf: torch.Tensor, table: torch.Tensor, longest: int | None = None, block: int = 4096
) -> torch.Tensor:
    """[P, 2] int64 sums (see ``reference.sum64``) of the byte ranges ``table`` [P, 2] (int64 on
    the device) of ``buf`` (1-D uint8 on the device); asynchronous, on the current stream. Pass
    ``longest`` (the largest byte count) to keep the launch free of a host-device sync."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError("buf must be a 1-D uint8 tensor")
    p = table.shape[0]
    if longest is None:
        longest = int(table[:, 1].max()) if p else 0
    n_blocks = max(1, triton.cdiv(longest // 2, block))
    words = buf[: buf.numel() - buf.numel() % 2].view(torch.int16)
    part = torch.empty(p, n_blocks, 2, dtype=torch.int64, device=buf.device)
    _checksum_kernel[(n_blocks, p)](words, table, part, n_blocks, BLOCK=block, num_warps=8)
    return part.sum(dim=1)
