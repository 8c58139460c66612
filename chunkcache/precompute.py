"""Precompute: encode each chunk on its own behind an attention sink and keep its KV.

    sink (dropped) | chunk tokens
    [BOS]          | t0 t1 t2 ...          positions 0 | 1 2 3 ...     (sink="bos", base_pos=1)
    [prefix ...  ] | t0 t1 t2 ...          positions 0..P-1 | P ...     (sink="prefix", base_pos=P)
    [prefix  c1 c2 ] | t0 t1 t2 ...        positions 0..P+G-1 | P+G ... (sink="context", base_pos=P+G:
                                           the prefix and G tokens of two generic passages)

Chunks are batched (sorted by length, right-padded) through the model's own forward pass, so
the stored KV is exactly what transformers computes. With ``token_scores=True`` the same forward
also gives each token a context-impact score (``impact_scores``: the attention it receives from
its chunk, stored as ``ChunkKV.token_scores``; the ``qimpact`` selection policy reads it).
What it does not know: stores, codecs, keys, fusion.

    lm = load_model(); t = PromptTemplate.from_tokenizer(lm.tokenizer)
    [kv] = encode_chunks(lm, [t.chunk_ids("Paris is the capital ...")], t.sink_ids("bos"))
    kv.kv.shape   # [30, 2, 3, T, 64]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from chunkcache import kernels
from chunkcache.kernels.reference import rotate_half
from chunkcache.layout import ChunkKV
from chunkcache.model import LoadedModel, cache_kwarg

SCORES_VERSION = "impact-v1"
"""What ``token_scores=True`` computes (``impact_scores``), as the cache keys name it: a change of
the score's definition must change this, so old entries are not read as new ones."""


@torch.no_grad()
def encode_chunks(
    lm: LoadedModel,
    chunks: Sequence[Sequence[int]],
    sink: Sequence[int],
    batch_size: int = 8,
    progress: bool = False,
    token_scores: bool = False,
) -> list[ChunkKV]:
    """KV of each chunk (token id lists) encoded behind ``sink``; same order as ``chunks``.
    ``token_scores``: also each token's context-impact score (``impact_scores``), from the same
    forward pass (a hook per attention layer; no second forward)."""
    from transformers import DynamicCache

    if any(len(c) == 0 for c in chunks):
        raise ValueError("cannot precompute an empty chunk")
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
    out: list[ChunkKV | None] = [None] * len(chunks)
    device = lm.device
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    s = len(sink)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks), desc="precompute", unit="chunk")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        lengths = [len(chunks[i]) for i in idx]
        width = s + max(lengths)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = list(sink) + list(chunks[i])
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        cache = DynamicCache()  # no config: keep every position even under a sliding window
        scores = _ImpactHooks(lm, cache, s, lengths) if token_scores else None
        try:
            lm.model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                use_cache=True,
                logits_to_keep=1,  # only the KV is kept: no LM head over every chunk token
                **{cache_kwarg(lm.model): cache},
            )
        finally:
            if scores is not None:
                scores.remove()
        keys = torch.stack([layer.keys for layer in cache.layers])  # [L, B, H, width, D]
        values = torch.stack([layer.values for layer in cache.layers])
        for row, i in enumerate(idx):
            n = lengths[row]
            kv = torch.stack([keys[:, row, :, s : s + n], values[:, row, :, s : s + n]], dim=1)
            out[i] = ChunkKV(
                token_ids=torch.tensor(list(chunks[i]), dtype=torch.long),
                kv=kv.contiguous(),  # [L, 2, H, n, D]
                base_pos=s,
                token_scores=None if scores is None else scores.result(row),
                meta={"sink_tokens": s},
            )
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


def impact_scores(
    q: torch.Tensor,  # [Hq, n, D] RoPE'd queries of the chunk's tokens (positions s .. s+n-1)
    k: torch.Tensor,  # [Hkv, s+n, D] the layer's keys of sink and chunk
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """[n] fp32: one layer's context-impact score of each chunk token, the attention it receives
    from the chunk's tokens (itself and every later one: causal), summed over those queries and
    averaged over heads. A token that much of its chunk reads from carries the chunk's meaning:
    its stale K/V (encoded without the chunks before it) propagate to every token that reads it
    (Cache-Craft's chunk-impact idea, measured inside the chunk, from the one forward
    precompute runs anyway). The chunk's sum is the share of its queries' attention that stays
    in the chunk rather than on the sink. ``kernels.probe_attention`` over the chunk's queries
    (its mass is the mean over queries: times n is the sum); the values are not needed, the
    keys stand in for them."""
    n = q.shape[1]
    s = k.shape[1] - n
    pos = torch.arange(s, s + n, device=q.device)
    _, mass = kernels.probe_attention(q, pos, k, k, scale, window)  # [s+n]
    return mass[s:] * n


class _ImpactHooks:
    """Forward hooks on every attention layer of one batch's forward: each layer's queries of the
    chunk tokens (its q projection over the normed hidden states it was given, RoPE'd with the
    rotation it was given) against the keys it just wrote into ``cache``, scored by
    ``impact_scores``; the scores are summed over layers and divided by the layer count. Costs one
    extra q projection and one chunk-by-chunk attention per layer, no second forward."""

    def __init__(self, lm: LoadedModel, cache, sink: int, lengths: list[int]) -> None:
        self.lm, self.cache, self.sink, self.lengths = lm, cache, sink, lengths
        self.total = [torch.zeros(n, dtype=torch.float32, device=lm.device) for n in lengths]
        self.layers = 0
        self.handles = [
            layer.self_attn.register_forward_hook(self._hook(li), with_kwargs=True)
            for li, layer in enumerate(lm.model.model.layers)
        ]

    def _hook(self, li: int):
        def hook(attn, args, kwargs, output) -> None:
            spec, s = self.lm.spec, self.sink
            h = kwargs.get("hidden_states", args[0] if args else None)  # [B, W, hidden], normed
            cos, sin = kwargs["position_embeddings"]  # [B, W, D]
            b, w, _ = h.shape
            q = attn.q_proj(h).view(b, w, spec.q_heads, spec.head_dim)
            if getattr(attn, "q_norm", None) is not None:  # Qwen3
                q = attn.q_norm(q)
            q = q.transpose(1, 2)  # [B, Hq, W, D]
            q = q * cos[:, None] + rotate_half(q) * sin[:, None]
            keys = self.cache.layers[li].keys  # [B, Hkv, W, D], written by this layer just now
            for row, n in enumerate(self.lengths):
                self.total[row] += impact_scores(
                    q[row, :, s : s + n], keys[row, :, : s + n], attn.scaling, spec.windows[li]
                ).float()
            self.layers += 1

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def result(self, row: int) -> torch.Tensor:
        """[n] fp32 on the host: the row's score, the mean over layers."""
        if self.layers != len(self.handles):
            raise RuntimeError(f"impact hooks ran on {self.layers} of {len(self.handles)} layers")
        return (self.total[row] / self.layers).cpu()


@torch.no_grad()
def encode_exact(
    lm: LoadedModel,
    ids: Sequence[int] | torch.Tensor,
    host_logits: bool = False,
    on_layer: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact KV of ``ids`` at positions 0..n-1, ``[L, 2, H, n, D]``, and the fp32 next-token
    logits after them ``[vocab]``: one forward of the model from scratch (``logits_to_keep=1``),
    the plain full prefill's own call, so attention takes the model's causal fast path (a cache
    of earlier positions would make it build an explicit mask). Each layer's K/V is written
    straight into the returned tensor (``_into_kv``: the one copy a plain prefill's cache makes
    too, so no gather after the forward and no 1 GB tensor allocated at its end, at 8K on an 8B
    model). ``host_logits``: return the logits on the host. ``on_layer(i)``: called as soon as layer
    ``i``'s K/V are written (queued, on a GPU: the caller may record a CUDA event there, so that
    work on another stream can start on that layer before the forward ends); not called for a
    transformers whose cache makes its own layers (the K/V exist only after the forward)."""
    from transformers import DynamicCache

    spec = lm.spec
    x = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(lm.device)
    n = x.shape[1]
    kv = torch.empty(spec.num_layers, 2, spec.kv_heads, n, spec.head_dim, dtype=lm.dtype, device=lm.device)
    cache = DynamicCache()  # no config: keep every position even under a sliding window
    into = _into_kv()
    if isinstance(getattr(cache, "layers", None), list):  # (else the gather below)
        cache.layers[:] = [into(kv[i], i, on_layer) for i in range(spec.num_layers)]
    out = lm.model(input_ids=x, use_cache=True, logits_to_keep=1, **{cache_kwarg(lm.model): cache})
    logits = out.logits[0, -1].float()
    if not all(isinstance(layer, into) and layer.written for layer in cache.layers):
        # (a transformers whose cache made its own layers: gather them, one copy)
        kv = torch.stack([t for layer in cache.layers for t in (layer.keys[0], layer.values[0])])
        kv = kv.view(len(cache.layers), 2, *kv.shape[1:])
    return kv, logits.cpu() if host_logits else logits


@functools.cache
def _into_kv() -> type:
    """``_IntoKV``, made on first use (transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class _IntoKV(DynamicLayer):
        """A transformers cache layer whose one update (a prefill from scratch) writes the layer's
        K/V into ``dest`` (``[2, H, n, D]``, a slice of the caller's KV tensor) and returns views
        of it: the values a ``DynamicLayer`` returns (the attention reads them alike), without a
        tensor of its own."""

        def __init__(self, dest: torch.Tensor, index: int = 0, on_write=None) -> None:  # dest: [2, H, n, D]
            super().__init__()
            self.dest, self.written = dest, False
            self.index, self.on_write = index, on_write

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if self.written:
                raise RuntimeError("an _IntoKV layer takes one prefill")
            if (
                key_states.shape[0] != 1
                or key_states.shape[1:] != self.dest.shape[1:]
                or (key_states.dtype != self.dest.dtype or value_states.shape != key_states.shape)
            ):  # not what was expected: a plain layer's update (the caller then gathers)
                return super().update(key_states, value_states, *args, **kwargs)
            self.dest[0].copy_(key_states[0])
            self.dest[1].copy_(value_states[0])
            self.keys, self.values = self.dest[0][None], self.dest[1][None]
            self.device, self.is_initialized, self.written = key_states.device, True, True
            if self.on_write is not None:
                self.on_write(self.index)
            return self.keys, self.values

    return _IntoKV


def encode_prefix(lm: LoadedModel, prefix: Sequence[int]) -> torch.Tensor:
    """Exact KV of the prompt prefix at positions 0..P-1: ``[L, 2, H, P, D]``."""
    return encode_exact(lm, list(prefix))[0]
