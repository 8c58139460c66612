"""The one internal KV layout of chunkcache, written down once.

A chunk's cache is the key/value tensors a model produced for the chunk's tokens when the chunk
was encoded on its own behind an attention sink (see ``precompute``). Everything that moves chunk
caches around (precompute, codecs, stores, fusion, kernels) speaks this layout:

    kv: [layers, 2, kv_heads, tokens, head_dim]     index 0 = keys, 1 = values

Keys are stored *post-RoPE at local positions*: the chunk's first token sat at position
``base_pos`` (1 behind a one-token BOS sink, len(prefix) behind a template-prefix sink), so
token ``t`` of the chunk carries rotary position ``base_pos + t``. Fusion moves a chunk to
offset ``o`` by rotating its keys by ``o - base_pos`` (RoPE is a rotation: R(a+b) = R(a)R(b)).
Values carry no position.

``token_scores`` is optional per-token metadata computed at precompute time and stored with the
chunk (for instance a context-impact score that selection policies may read): ``[tokens]`` fp32.

This module knows nothing about models, storage or codecs.

    kv = ChunkKV(token_ids=torch.tensor([5, 6, 7]), kv=torch.zeros(30, 2, 3, 3, 64), base_pos=1)
    kv.num_tokens  # 3
    kv.check(layers=30, kv_heads=3, head_dim=64)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChunkKV:
    """The cache of one chunk. Invariants are asserted by ``check``."""

    token_ids: torch.Tensor
    """[tokens] int64 token ids of the chunk (without the sink)."""
    kv: torch.Tensor
    """[layers, 2, kv_heads, tokens, head_dim] in the model's dtype (or float32 after a lossy decode)."""
    base_pos: int = 1
    """Rotary position of the chunk's first token when it was encoded."""
    token_scores: torch.Tensor | None = None
    """[tokens] float32, optional per-token scores stored with the chunk (policy hints)."""
    meta: dict = field(default_factory=dict)
    """Small JSON-serialisable facts (sink kind, model fingerprint, ...). Never tensors."""

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.kv.shape[0])

    def check(
        self, layers: int | None = None, kv_heads: int | None = None, head_dim: int | None = None
    ) -> None:
        """Raise ValueError if the tensors break the layout (or do not fit the given model shape)."""
        if self.token_ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {tuple(self.token_ids.shape)}")
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise ValueError(
                f"kv must be [layers, 2, kv_heads, tokens, head_dim], got {tuple(self.kv.shape)}"
            )
        if self.kv.shape[3] != self.num_tokens:
            raise ValueError(f"kv holds {self.kv.shape[3]} tokens but token_ids has {self.num_tokens}")
        if self.token_scores is not None and tuple(self.token_scores.shape) != (self.num_tokens,):
            raise ValueError(
                f"token_scores must be [{self.num_tokens}], got {tuple(self.token_scores.shape)}"
            )
        want = {"layers": (0, layers), "kv_heads": (2, kv_heads), "head_dim": (4, head_dim)}
        for name, (dim, expected) in want.items():
            if expected is not None and self.kv.shape[dim] != expected:
                raise ValueError(
                    f"chunk cache has {name}={self.kv.shape[dim]} but the model has {name}={expected}: "
                    "it was made by another model"
                )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ChunkKV:
        return ChunkKV(
            token_ids=self.token_ids.to(device) if device is not None else self.token_ids,
            kv=self.kv.to(device=device, dtype=dtype),
            base_pos=self.base_pos,
            token_scores=None if self.token_scores is None else self.token_scores.to(device),
            meta=dict(self.meta),
        )
