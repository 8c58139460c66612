"""Fusion: assemble independently precomputed chunk caches into one prompt cache, then recompute
a selected few tokens layer by layer so they regain the cross-chunk attention they never had.

    position: 0 ...... P-1 | P ......... | ........... | S ........ N-1
              [ prefix    ][ chunk a    ][ chunk b    ][ question    ]
    KV:        exact (once)  rotated by     rotated by    always computed
                             P - base_a     P+|a|-base_b  (every layer)

Per layer ``l`` the *active* tokens (all chunk tokens until the policy's first filtering layer,
then the selected ones; the question always) are run through the decoder layer at their true
positions. Their fresh K/V overwrite the assembled buffer; their queries attend over the whole
buffer under the exact position-causal mask (key position <= query position; the public
CacheBlend/LMCache code gives selected queries a bottom-right mask instead, which lets them see
later keys). Inactive tokens keep their reused K/V. At ratio 1 every token is active in every
layer: a full prefill. At ratio 0 only the question is computed: plain reuse of re-rotated caches.

What it does not know: where caches come from (store, precompute), tokenisation, policies' logic
(see ``select``).

    res = fuse_kv(lm, prefix_kv, [kv_a, kv_b], suffix_ids, FuseConfig(recompute_ratio=0.15))
    res.logits.argmax(), res.stats["recomputed_tokens"]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from chunkcache import model as M
from chunkcache.layout import ChunkKV
from chunkcache.model import LoadedModel
from chunkcache.select import POLICIES, SelectContext


@dataclass(frozen=True)
class FuseConfig:
    """How to fuse."""

    recompute_ratio: float = 0.15
    """Fraction of chunk tokens recomputed after the policy's selection (0 = plain reuse, 1 = full prefill)."""
    policy: str = "qaware"
    """Selection policy, a name in ``chunkcache.select.POLICIES``."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {sorted(POLICIES)}")


@dataclass
class FuseResult:
    """A fused prompt, ready for ``model.generate``.

    ``cache`` holds the KV of every prompt token but the last (``input_ids[:, :-1]``), the
    convention ``generate`` expects: pass ``input_ids`` and ``past_key_values=cache`` and it runs
    only the last token. ``generate`` mutates the cache in place: use ``fresh_cache()`` per call.
    """

    input_ids: torch.Tensor
    """[1, N] the whole prompt."""
    logits: torch.Tensor
    """[vocab] fp32 next-token logits at the end of the prompt."""
    cache: object
    """transformers DynamicCache over input_ids[:, :-1]."""
    kv: torch.Tensor = field(repr=False)
    """[layers, 2, kv_heads, N, head_dim] the assembled KV of all N tokens."""
    selected: torch.Tensor = field(repr=False)
    """[k] positions of the chunk tokens recomputed in the last layer."""
    stats: dict = field(default_factory=dict)
    """Tokens reused / recomputed, compute fraction, seconds per stage."""

    def fresh_cache(self):
        return kv_to_cache(self.kv[:, :, :, : self.input_ids.shape[1] - 1])


def kv_to_cache(kv: torch.Tensor):
    """[layers, 2, H, T, D] -> a transformers DynamicCache (copies the tensors)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(kv.shape[0]):
        cache.update(kv[i, 0][None].clone(), kv[i, 1][None].clone(), i)
    return cache


def assemble(lm: LoadedModel, prefix_kv: torch.Tensor, chunks: list[ChunkKV], n_suffix: int):
    """Place prefix and re-rotated chunk KV in one buffer ``[L, 2, H, N, D]`` (suffix slots zero).

    Returns (buffer, chunk_of ``[N]`` with -1 outside chunks, offset of each chunk)."""
    spec = lm.spec
    p = prefix_kv.shape[3]
    n = p + sum(c.num_tokens for c in chunks) + n_suffix
    buf = torch.zeros(spec.num_layers, 2, spec.kv_heads, n, spec.head_dim, dtype=lm.dtype, device=lm.device)
    chunk_of = torch.full((n,), -1, dtype=torch.long, device=lm.device)
    buf[:, :, :, :p] = prefix_kv
    offsets = []
    o = p
    for i, c in enumerate(chunks):
        c.check(spec.num_layers, spec.kv_heads, spec.head_dim)
        kv = c.kv.to(device=lm.device)
        cos, sin = M.rotation(lm.model, o - c.base_pos, lm.device)
        buf[:, 0, :, o : o + c.num_tokens] = M.apply_rotation(kv[:, 0].to(lm.dtype), cos, sin)
        buf[:, 1, :, o : o + c.num_tokens] = kv[:, 1].to(lm.dtype)
        chunk_of[o : o + c.num_tokens] = i
        offsets.append(o)
        o += c.num_tokens
    return buf, chunk_of, offsets


@torch.no_grad()
def fuse_kv(
    lm: LoadedModel,
    prefix_kv: torch.Tensor,  # [L, 2, H, P, D] exact prefix KV
    chunks: list[ChunkKV],
    prefix_ids: list[int],
    suffix_ids: list[int],
    config: FuseConfig = FuseConfig(),
) -> FuseResult:
    if not suffix_ids:
        raise ValueError("the question suffix is empty: nothing to generate from")
    t0 = time.perf_counter()
    spec, mdl = lm.spec, lm.model
    layers = mdl.model.layers
    buf, chunk_of, offsets = assemble(lm, prefix_kv, chunks, len(suffix_ids))
    n = buf.shape[3]
    ids = torch.tensor(
        [list(prefix_ids) + [t for c in chunks for t in c.token_ids.tolist()] + list(suffix_ids)]
    )
    if ids.shape[1] != n:
        raise ValueError(f"prefix KV covers {prefix_kv.shape[3]} tokens but prefix_ids has {len(prefix_ids)}")
    ids_dev = ids[0].to(lm.device)
    ctx_pos = torch.nonzero(chunk_of >= 0).flatten()  # [C] chunk-token positions
    q_pos = torch.arange(n - len(suffix_ids), n, device=lm.device)  # question suffix positions
    n_ctx = ctx_pos.numel()
    budget = round(config.recompute_ratio * n_ctx)
    policy = POLICIES[config.policy]
    t_assemble = time.perf_counter() - t0

    probe_attn = None
    t1 = time.perf_counter()
    if policy.probe and 0 < budget < n_ctx:
        probe_attn = _probe(lm, buf.clone(), ids_dev, q_pos, ctx_pos)  # [L, C]
    t_probe = time.perf_counter() - t1

    # Active set: positions run through the current layer, sorted ascending.
    if budget == 0:
        schedule: dict[int, float] = {}
        active = q_pos
    elif budget >= n_ctx:
        schedule = {}
        active = torch.cat([ctx_pos, q_pos])
    else:
        schedule = policy.schedule(spec.num_layers, config.recompute_ratio)
        active = torch.cat([ctx_pos, q_pos])
    h = mdl.model.embed_tokens(ids_dev[active])[None]  # [1, a, hidden]
    token_scores = _token_scores(chunks, lm.device)
    computed = 0
    for li, layer in enumerate(layers):
        cos, sin = M.rotary(mdl, active, h)
        q, k, v = M.layer_qkv(layer, h, cos, sin, spec)  # [Hq, a, D], [Hkv, a, D]
        old = buf[li, :, :, active].clone() if li in schedule else None  # [2, H, a, D] reused K/V
        buf[li, 0, :, active] = k
        buf[li, 1, :, active] = v
        mask = M.position_causal_mask(active, n, spec.window)
        out = M.attend(q, buf[li, 0], buf[li, 1], mask, layer.self_attn.scaling)
        h = M.layer_finish(layer, h, out)
        computed += active.numel()
        if li in schedule:
            is_ctx = chunk_of[active] >= 0
            keep_n = max(budget, round(schedule[li] * n_ctx))
            cand = active[is_ctx]
            if keep_n < cand.numel():
                sctx = SelectContext(
                    layer=li,
                    positions=cand,
                    chunk_of=chunk_of[cand],
                    chunk_offsets=torch.tensor(offsets, device=lm.device),
                    fresh=buf[li, :, :, cand],
                    reused=old[:, :, is_ctx],
                    question_q=q[:, ~is_ctx],
                    keys=buf[li, 0],
                    question_pos=q_pos,
                    scale=layer.self_attn.scaling,
                    probe_attn=None if probe_attn is None else probe_attn[:, _index_in(ctx_pos, cand)],
                    token_scores=None if token_scores is None else token_scores[_index_in(ctx_pos, cand)],
                )
                keep = policy.select(sctx, keep_n)  # positions, subset of cand
                keep = torch.sort(keep).values
                new_active = torch.cat([keep, q_pos])
                rows = _index_in(active, new_active)
                h = h[:, rows]
                active = new_active
    logits = M.final_logits(mdl, h[0, -1])
    selected = active[chunk_of[active] >= 0]
    elapsed = time.perf_counter() - t0
    full = spec.num_layers * (n - prefix_kv.shape[3])
    stats = {
        "prompt_tokens": n,
        "prefix_tokens": prefix_kv.shape[3],
        "chunk_tokens": n_ctx,
        "question_tokens": len(suffix_ids),
        "recomputed_tokens": int(selected.numel()),
        "reused_tokens": int(n_ctx - selected.numel()),
        "compute_fraction": computed / full if full else 0.0,
        "policy": config.policy,
        "recompute_ratio": config.recompute_ratio,
        "seconds": {
            "assemble": t_assemble,
            "probe": t_probe,
            "recompute": elapsed - t_assemble - t_probe,
            "total": elapsed,
        },
    }
    cache = kv_to_cache(buf[:, :, :, : n - 1])
    return FuseResult(input_ids=ids, logits=logits, cache=cache, kv=buf, selected=selected, stats=stats)


def _index_in(haystack: torch.Tensor, needles: torch.Tensor) -> torch.Tensor:
    """Indices i with haystack[i] == needle for each needle (haystack sorted ascending)."""
    return torch.searchsorted(haystack, needles)


def _token_scores(chunks: list[ChunkKV], device) -> torch.Tensor | None:
    if any(c.token_scores is None for c in chunks):
        return None
    return torch.cat([c.token_scores.to(device) for c in chunks])


@torch.no_grad()
def _probe(
    lm: LoadedModel, buf: torch.Tensor, ids: torch.Tensor, q_pos: torch.Tensor, ctx_pos: torch.Tensor
) -> torch.Tensor:
    """Run only the question through every layer over the reused (stale) cache and return how much
    attention it pays to each chunk token per layer: ``[L, C]`` (mean over heads and question
    tokens). Costs |question| x L token-layers, about what one chunk token's recompute costs."""
    spec, mdl = lm.spec, lm.model
    n = buf.shape[3]
    h = mdl.model.embed_tokens(ids[q_pos])[None]
    out_attn = []
    mask = M.position_causal_mask(q_pos, n, spec.window)
    for li, layer in enumerate(mdl.model.layers):
        cos, sin = M.rotary(mdl, q_pos, h)
        q, k, v = M.layer_qkv(layer, h, cos, sin, spec)
        buf[li, 0, :, q_pos] = k
        buf[li, 1, :, q_pos] = v
        keys = buf[li, 0]
        group = q.shape[0] // keys.shape[0]
        scores = (
            torch.einsum("hqd,hkd->hqk", q.float(), keys.float().repeat_interleave(group, 0))
            * layer.self_attn.scaling
        )
        scores = scores.masked_fill(~mask[None], float("-inf"))
        probs = scores.softmax(-1)  # [Hq, nq, N]
        out_attn.append(probs.mean(dim=(0, 1))[ctx_pos])
        out = M.attend(q, buf[li, 0], buf[li, 1], mask, layer.self_attn.scaling)
        h = M.layer_finish(layer, h, out)
    return torch.stack(out_attn)  # [L, C]
