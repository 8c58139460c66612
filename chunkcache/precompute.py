"""Precompute: encode each chunk on its own behind an attention sink and keep its KV.

    sink (dropped) | chunk tokens
    [BOS]          | t0 t1 t2 ...          positions 0 | 1 2 3 ...     (sink="bos", base_pos=1)
    [prefix ...  ] | t0 t1 t2 ...          positions 0..P-1 | P ...     (sink="prefix", base_pos=P)
    [prefix  c1 c2 ] | t0 t1 t2 ...        positions 0..P+G-1 | P+G ... (sink="context", base_pos=P+G:
                                           the prefix and G tokens of two generic passages)

Chunks are batched (sorted by length, right-padded) through the model's own forward pass, so
the stored KV is exactly what transformers computes. What it does not know: stores, codecs,
keys, fusion.

    lm = load_model(); t = PromptTemplate.from_tokenizer(lm.tokenizer)
    [kv] = encode_chunks(lm, [t.chunk_ids("Paris is the capital ...")], t.sink_ids("bos"))
    kv.kv.shape   # [30, 2, 3, T, 64]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chunkcache.layout import ChunkKV
from chunkcache.model import LoadedModel, cache_kwarg


@torch.no_grad()
def encode_chunks(
    lm: LoadedModel,
    chunks: Sequence[Sequence[int]],
    sink: Sequence[int],
    batch_size: int = 8,
    progress: bool = False,
) -> list[ChunkKV]:
    """KV of each chunk (token id lists) encoded behind ``sink``; same order as ``chunks``."""
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
        lm.model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            use_cache=True,
            logits_to_keep=1,  # only the KV is kept: no LM head over every chunk token
            **{cache_kwarg(lm.model): cache},
        )
        keys = torch.stack([layer.keys for layer in cache.layers])  # [L, B, H, width, D]
        values = torch.stack([layer.values for layer in cache.layers])
        for row, i in enumerate(idx):
            n = lengths[row]
            kv = torch.stack([keys[:, row, :, s : s + n], values[:, row, :, s : s + n]], dim=1)
            out[i] = ChunkKV(
                token_ids=torch.tensor(list(chunks[i]), dtype=torch.long),
                kv=kv.contiguous(),  # [L, 2, H, n, D]
                base_pos=s,
                meta={"sink_tokens": s},
            )
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


@torch.no_grad()
def encode_exact(
    lm: LoadedModel, ids: Sequence[int] | torch.Tensor, host_logits: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact KV of ``ids`` at positions 0..n-1, ``[L, 2, H, n, D]``, and the fp32 next-token
    logits after them ``[vocab]``: one forward of the model from scratch (``logits_to_keep=1``),
    the plain full prefill's own call, so attention takes the model's causal fast path (a cache
    of earlier positions would make it build an explicit mask). ``host_logits``: return the
    logits on the host, copied before the KV is gathered into one tensor (on a GPU that copy then
    runs after this returns, as a plain prefill's caller would not wait for it either)."""
    from transformers import DynamicCache

    cache = DynamicCache()  # no config: keep every position even under a sliding window
    x = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(lm.device)
    out = lm.model(input_ids=x, use_cache=True, logits_to_keep=1, **{cache_kwarg(lm.model): cache})
    logits = out.logits[0, -1].float()
    copied = None
    if host_logits and logits.is_cuda:
        host = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
        host.copy_(logits, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        logits = host
    elif host_logits:
        logits = logits.cpu()
    # one copy into [L, 2, H, n, D] (a stack of per-layer stacks would copy twice)
    kv = torch.stack([t for layer in cache.layers for t in (layer.keys[0], layer.values[0])])
    if copied is not None:
        copied.synchronize()  # the logits are on the host; the gather may still run
    return kv.view(len(cache.layers), 2, *kv.shape[1:]), logits


def encode_prefix(lm: LoadedModel, prefix: Sequence[int]) -> torch.Tensor:
    """Exact KV of the prompt prefix at positions 0..P-1: ``[L, 2, H, P, D]``."""
    return encode_exact(lm, list(prefix))[0]
