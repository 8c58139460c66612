"""Selection policies: which chunk tokens to recompute, chosen by name from ``POLICIES``.

A policy says after which layers it filters (``schedule``: layer -> fraction of chunk tokens kept
after that layer) and how it ranks tokens (``select``: given a ``SelectContext`` and a count,
return the positions to keep). Fusion runs every chunk token through the layers up to the first
filtering layer, so policies can compare fresh and reused K/V there. A policy with
``before_layers = True`` (schedule ``{0: r}``) ranks from the probe alone: it selects before any
layer runs, and its context has no layer tensors (``fresh``, ``reused``, ``question_q``, ``keys``
are None).

    cacheblend  the faithful baseline: V deviation at layer 1, top-k, fixed for later layers
    gradual     the paper's gradual filtering: V deviation at layers 1, 2, 3 keeping 3r, 2r, r
    qaware      ours: question-aware (probe attention x layer-1 deviation). See ``QAware``.
    qfast       ours (default): the probe's attention alone, selected before layer 0. See ``QFast``.
    qshallow    qfast from the probe over the first half of the layers (over a link). ``QShallow``.
    qdeep       qfast from the probe over the first 7/8 of the layers (over a link). ``QDeep``.
    qstale      ours: qfast's ranking over the stale tokens only (exact ones never). See ``QStale``.
    qvalue      ours: qstale with each layer's attention weighted by the token's V norm. See ``QValue``.
    qimpact     per-chunk budgets from the context-impact scores stored at precompute time
                (Cache-Craft-style), each chunk's share ranked by the probe, before layer 0. ``QImpact``.
    epic        the first tokens of every chunk (EPIC), for comparison
    epic0       EPIC's tokens selected before layer 0, no probe: qfast's compute less the probe's
    random      uniform at random (a sanity floor)

What it does not know: models, caches, prompts. It sees tensors in a SelectContext only. A
policy is any object with the four members of ``Policy``; ``FuseConfig`` takes a name from
``POLICIES`` or such an object (for experiments that should not register globally).

    policy = POLICIES["cacheblend"]
    policy.schedule(num_layers=30, ratio=0.15)   # {1: 0.15}
    keep = policy.select(ctx, k=120)             # [120] positions
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol, runtime_checkable

import torch

from chunkcache import kernels


@dataclass
class SelectContext:
    """What a policy may look at when it filters after ``layer``. ``c`` = candidate chunk tokens."""

    layer: int
    positions: torch.Tensor
    """[c] prompt positions of the candidates, ascending."""
    chunk_of: torch.Tensor
    """[c] which chunk each candidate belongs to."""
    chunk_offsets: torch.Tensor
    """[chunks] first prompt position of each chunk."""
    fresh: torch.Tensor | None
    """[2, kv_heads, c, head_dim] K/V just recomputed at this layer (keys post-RoPE)."""
    reused: torch.Tensor | None
    """[2, kv_heads, c, head_dim] the re-rotated precomputed K/V they replaced."""
    question_q: torch.Tensor | None
    """[q_heads, nq, head_dim] this layer's (RoPE'd) queries of the question tokens."""
    keys: torch.Tensor | None
    """[kv_heads, N, head_dim] this layer's assembled keys (fresh where computed)."""
    question_pos: torch.Tensor
    """[nq] positions of the question tokens."""
    scale: float
    """Attention scale of the layer."""
    window: int | None = None
    """Sliding window of the layer (None: full attention); ``question_attention`` masks with it."""
    probe_attn: torch.Tensor | None = None
    """[layers, c] attention the question paid to each candidate over the reused cache, per layer
    (only for policies with ``probe = True``)."""
    token_scores: torch.Tensor | None = None
    """[c] scores stored with the chunks at precompute time, if every chunk has them."""
    exact: torch.Tensor | None = None
    """[c] bool: the candidate's reused K/V were computed behind exactly the tokens that precede it
    in this prompt (its chunk sits where it was encoded, behind the prefix: the first chunk with
    the prefix sink), so they equal a full prefill's up to the codec's rounding and recomputing
    it restores no context. None: no candidate is known to be exact."""
    value_norms: torch.Tensor | None = None
    """[layers, c] L2 norm of each candidate's V in the cache at selection time (the reused V
    before layer 0), mean over KV heads; only for policies with ``value_norms = True``."""

    def deviation(self, which: int = 1) -> torch.Tensor:
        """[c] L2 distance between fresh and reused K (0) or V (1), summed over heads."""
        return (self.fresh[which].float() - self.reused[which].float()).norm(dim=-1).sum(0)

    def question_attention(self) -> torch.Tensor:
        """[c] attention mass of the question on each candidate at this layer (mean over heads,
        tokens), over the assembled keys: the probe's attention (``kernels.probe_attention``, the
        keys standing in for the values, whose output is not used)."""
        keys = self.keys
        _, mass = kernels.probe_attention(
            self.question_q, self.question_pos, keys, keys, self.scale, self.window
        )
        return mass[self.positions]

    def within_chunk(self) -> torch.Tensor:
        """[c] index of each candidate inside its chunk (0 = chunk start)."""
        return self.positions - self.chunk_offsets[self.chunk_of]


@runtime_checkable
class Policy(Protocol):
    """What fusion asks of a selection policy."""

    probe: bool
    """Run the question-only probe first and hand its attention to ``select`` (``probe_attn``)."""
    before_layers: bool
    """Select from the probe alone before layer 0 (schedule ``{0: r}``): no layer tensors."""

    def schedule(self, num_layers: int, ratio: float) -> dict[int, float]: ...

    def select(self, ctx: SelectContext, k: int) -> torch.Tensor: ...


def probe_layers(policy: Policy, num_layers: int) -> int:
    """Layers the question probe runs before a probe policy selects: every layer, or the policy's
    ``probe_layers`` share of them (``QShallow``), at least one."""
    share = getattr(policy, "probe_layers", None)
    return num_layers if share is None else max(1, min(num_layers, round(share * num_layers)))


def _top(ctx: SelectContext, score: torch.Tensor, k: int) -> torch.Tensor:
    return ctx.positions[torch.topk(score, k).indices]


class CacheBlend:
    """Faithful CacheBlend: V deviation at decoder layer 1, top-k, fixed for later layers."""

    probe = False
    before_layers = False

    def schedule(self, num_layers: int, ratio: float) -> dict[int, float]:
        return {1: ratio}

    def select(self, ctx: SelectContext, k: int) -> torch.Tensor:
        return _top(ctx, ctx.deviation(1), k)


class Gradual(CacheBlend):
    """The paper's gradual filtering: keep min(1, 3r), then 2r, then r by V deviation at layers 1-3."""

    def schedule(self, num_layers: int, ratio: float) -> dict[int, float]:
        return {1: min(1.0, 3 * ratio), 2: min(1.0, 2 * ratio), 3: ratio}


class Random:
    """Uniform selection (deterministic seed): the floor any policy must beat."""

    probe = False
    before_layers = False

    def schedule(self, num_layers: int, ratio: float) -> dict[int, float]:
        return {1: ratio}

    def select(self, ctx: SelectContext, k: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(ctx.positions.numel(), generator=g)[:k].to(ctx.positions.device)
        return ctx.positions[idx]


class Epic(Random):
    """EPIC-style: the first k / chunks tokens of every chunk."""

    def select(self, ctx: SelectContext, k: int) -> torch.Tensor:
        # Rank by (index inside the chunk, position): every chunk's first tokens, one depth at a
        # time, ties at the last depth going to the earlier chunk. An exact integer key: a float
        # score (session 11's ``-within + 1e9 * (within < per)``) rounds to ties that topk breaks
        # one way on the CPU and another on CUDA.
        c = ctx.positions.numel()
        key = ctx.within_chunk().long() * c + torch.arange(c, device=ctx.positions.device)
        return ctx.positions[torch.topk(key, k, largest=False).indices]


class Epic0(Epic):
    """EPIC's selection (the first tokens of every chunk) made before layer 0, without a probe:
    every layer runs over the selected rows only, as qfast's do, so at equal k its time is qfast's
    less the probe's and the wait for the probe's last layer. The no-probe baseline of
    ``bench_results/session11/gpu/probe.py`` (the probe's share of the GPU TTFT)."""

    before_layers = True

    def schedule(self, num_layers: int, ratio: float) -> dict[int, float]:
        return {0: ratio}


class QAware:
    """Question-aware selection (ours; the default until ``QFast`` matched it on 100 questions).

    Before recomputing, a cheap probe runs only the question over the reused cache through every
    layer and records how much attention it pays to each chunk token (``probe_attn``, summed over
    layers): the tokens the question reads from are the ones whose stale K/V move the answer.
    That is multiplied by the square root of the fresh-vs-reused V deviation at layer 1 (how stale
    the token is), each normalised by its mean. Measured on MuSiQue (BENCHMARKS.md): attention
    mass is the lever, deviation a mild tie-breaker; deviation alone (CacheBlend) closes about
    half as much of the gap. The probe costs |question| x layers token-layers.
    """

    probe = True
    before_layers = False

    def schedule(self, num_layers: int, ratio: float) -> dict[int, float]:
        return {1: ratio}

    def select(self, ctx: SelectContext, k: int) -> torch.Tensor:
        attn = ctx.probe_attn.sum(0)  # probe = True: fusion always hands it over
        dev = ctx.deviation(1)
        score = (attn / attn.mean().clamp_min(1e-12)) * (dev / dev.mean().clamp_min(1e-12)).sqrt()
        return _top(ctx, score, k)


class QFast(QAware):
    """Question-aware without the full-width layer (the default): the probe's attention alone
    picks the tokens before layer 0, so no layer runs over every chunk token, not even layer 0's
    projections (a chunk token's layer-0 K/V depend on the token alone: the reused ones are exact
    up to the rotation's rounding and the codec's).

    QAware needs layer 1's fresh V of every chunk token for its deviation term, so layer 0 runs
    at full width: about 1/L of a full prefill, on the critical path. On all 100 MuSiQue
    questions (BENCHMARKS.md section 1) QFast closed 84.4% of the KL gap at the answer start
    against QAware's 84.7%, and 60.2% of the per-token gap against 60.1%, at 0.156 of a
    prefill's compute against 0.184; on the GPU it is faster at every context (section 3)."""

    before_layers = True

    def schedule(self, num_layers: int, ratio: float) -> dict[int, float]:
        return {0: ratio}

    def select(self, ctx: SelectContext, k: int) -> torch.Tensor:
        return _top(ctx, ctx.probe_attn.sum(0), k)


class QShallow(QFast):
    """QFast ranking from the probe over the first ``probe_layers`` share of the layers only, so
    the selection (and the recompute of the selected tokens, layer by layer) need not wait for
    the last layers: when chunks stream in layer by layer from a slow link
    (``stream.LayerStream``), the recompute then runs behind the link instead of after it. The
    probe costs that share of qfast's. Its fidelity cost against qfast is measured in
    ``bench_results/session8/adaptive/NOTES.md``; not the default."""

    probe_layers = 0.5


class QDeep(QShallow):
    """QFast ranking from the probe over the first 7/8 of the layers (28 of 32): the attention mass
    of the last eighth is left out, so over a link the selection waits for layer 27's data only,
    and the recompute of the selected tokens (layer by layer, ``stream.layer_steps``) runs while
    the last eighth of the layers arrives: it takes most of the recompute out of the tail after
    the link's last byte, where qfast's must all follow it (measured on the H200, 8B/8K at 10 Gb/s:
    the tail is 40 ms, 36 of them the recompute). Ranks as qfast does but for the mass of the
    last layers; its fidelity against qfast: ``bench_results/session10/adaptive/NOTES.md``."""

    probe_layers = 0.875


class QStale(QFast):
    """QFast that spends the whole budget on stale tokens: a candidate whose reused K/V are
    already exact (``SelectContext.exact``: the first chunk, encoded behind the very prefix it
    sits behind) is never picked, however much the question reads it, since recomputing it
    changes nothing. The budget stays ``ratio`` x all chunk tokens, so at equal compute the
    share qfast spends on the first chunk goes to the chunks that miss context (the first
    chunk is taken only when the stale tokens run out)."""

    def score(self, ctx: SelectContext) -> torch.Tensor:
        """[c] the ranking score (higher first)."""
        return ctx.probe_attn.sum(0)

    def select(self, ctx: SelectContext, k: int) -> torch.Tensor:
        score = self.score(ctx)
        if ctx.exact is not None:
            score = torch.where(ctx.exact, score - (score.max() + 1), score)  # exact ones rank last
        return _top(ctx, score, k)


class QValue(QStale):
    """Value-aware qstale: what a token adds to the question's attention output is its attention
    weight times its V, so each layer's probe mass is weighted by the token's V norm there (mean
    over KV heads; the probe kernel's mass is already a head mean) before summing over layers.
    Costs one norm over the cache's V at selection, no token-layers."""

    value_norms = True

    def score(self, ctx: SelectContext) -> torch.Tensor:
        return (ctx.probe_attn * ctx.value_norms).sum(0)


def impact_budgets(weights: list[float], caps: list[int], k: int) -> list[int]:
    """Split ``k`` tokens over chunks in proportion to ``weights``, at most ``caps[c]`` each
    (largest-remainder apportionment with caps): every chunk's quota is ``k' * w / W`` over the
    chunks not yet full; a chunk whose quota reaches its cap gets its cap and leaves, and the rest
    is shared again among the others, until no quota reaches a cap; then each gets the floor of its
    quota and the tokens left over go to the largest fractional parts (ties: the earlier chunk).
    Chunks of weight 0 get tokens only when the others are full; where every chunk left has weight
    0 the rest is shared by cap. Sums to ``min(k, sum(caps))``. Exact rational arithmetic (the
    weights as the floats they are), so ties are ties on every device."""
    if len(weights) != len(caps):
        raise ValueError(f"{len(weights)} weights for {len(caps)} chunks")
    if k < 0 or any(c < 0 for c in caps) or any(not w >= 0 for w in weights):
        raise ValueError("k, caps and weights must be >= 0 (and weights not NaN)")
    out = [0] * len(caps)
    left = min(k, sum(caps))
    free = [c for c in range(len(caps)) if caps[c] > 0]
    while left > 0 and free:
        w = [Fraction(float(weights[c])) for c in free]  # exact: float rounding would break ties
        if sum(w) <= 0:
            w = [Fraction(caps[c]) for c in free]
        total = sum(w)
        quota = [left * x / total for x in w]
        full = [c for c, q in zip(free, quota, strict=True) if q >= caps[c]]
        if full:
            for c in full:
                out[c] = caps[c]
                left -= caps[c]
            free = [c for c in free if c not in full]
            continue
        base = [math.floor(q) for q in quota]  # (quotas are below the caps here)
        for c, b in zip(free, base, strict=True):
            out[c] = b
        rest = left - sum(base)
        order = sorted(range(len(free)), key=lambda i: (-(quota[i] - base[i]), free[i]))
        for i in order[:rest]:
            out[free[i]] += 1
        left = 0
    return out


class QImpact(QFast):
    """Per-chunk budgets from context-impact scores stored with the chunks (Cache-Craft's idea:
    spend the recompute where the chunks' precomputed K/V matter most), each chunk's share ranked
    by the probe's attention as qfast ranks, selected before layer 0.

    Each chunk's weight is the sum of its stale candidates' ``token_scores`` (the engine's
    ``token_scores=True``: ``precompute.impact_scores``, the attention each token receives from its
    own chunk, a layer mean), so a chunk whose tokens read much from each other rather than from
    the sink gets more of the k tokens (``impact_budgets``). An exact candidate
    (``SelectContext.exact``) has no context to regain: it counts in no weight and is taken only
    when the stale ones run out (as qstale). Inside a chunk its budget goes to its top tokens by
    the probe's mass. The budgets come from stored scores only: no token-layers beyond qfast's
    (the probe and the k rows), so at equal k its compute is qfast's. Chunks without scores:
    ``ValueError`` (no silent fallback): build the engine with ``token_scores=True``. The budgets
    are computed on the host (one small copy of per-chunk sums: a device sync on CUDA)."""

    def budgets(self, ctx: SelectContext, k: int) -> list[int]:
        """Per chunk (index into ``chunk_offsets``): how many of its stale candidates to keep."""
        if ctx.token_scores is None:
            raise ValueError(
                "policy 'qimpact' needs context-impact scores stored with every chunk: build the "
                "engine with ChunkCache(..., token_scores=True) (or precompute with --token-scores)"
            )
        n_chunks = int(ctx.chunk_offsets.numel())
        stale = torch.ones_like(ctx.chunk_of, dtype=torch.bool) if ctx.exact is None else ~ctx.exact
        which = ctx.chunk_of[stale]
        caps = torch.bincount(which, minlength=n_chunks)
        scores = ctx.token_scores[stale].double().clamp_min(0)
        weights = torch.zeros(n_chunks, dtype=torch.float64, device=scores.device).index_add_(
            0, which, scores
        )
        return impact_budgets(weights.tolist(), caps.tolist(), k)

    def select(self, ctx: SelectContext, k: int) -> torch.Tensor:
        budgets = torch.tensor(self.budgets(ctx, k), device=ctx.positions.device)
        score = ctx.probe_attn.sum(0).float()
        stale = torch.ones_like(score, dtype=torch.bool) if ctx.exact is None else ~ctx.exact
        # Rank inside each chunk's stale candidates by the probe (rank 0 = its best); a candidate
        # is in if its rank is below its chunk's budget. Then the exact ones by the probe.
        c = score.numel()
        order = torch.argsort(score, descending=True, stable=True)  # best first, ties: earlier
        key = torch.where(stale[order], ctx.chunk_of[order], ctx.chunk_offsets.numel())  # exact: last
        perm = torch.argsort(key, stable=True)
        grouped, sorted_key = order[perm], key[perm]  # by chunk, best first inside each
        rank = torch.empty(c, dtype=torch.long, device=score.device)
        rank[grouped] = torch.arange(c, device=score.device) - torch.searchsorted(sorted_key, sorted_key)
        keep = stale & (rank < budgets[ctx.chunk_of])
        m = k - int(keep.sum())
        if m > 0:  # more than every stale candidate: the best exact ones
            rest = torch.where(keep | stale, torch.full_like(score, -float("inf")), score)
            keep[torch.topk(rest, m).indices] = True
        return ctx.positions[keep]


class ChunkFirst(QValue):
    """QValue that spends ``share`` of the budget first on one chunk's stale tokens (its best by
    qvalue's score), the rest by qvalue over all: e.g. the passage the question is about, as a
    retriever ranks it (``corpus.nearest``). The probe's per-chunk mass ranks passages by their
    distance to the question, not by relevance (on the factual dev set the answer's passage had
    the most mass of the stale chunks in 8 of 23 cases, always when it was the last:
    bench_results/session10/fidelity/NOTES.md), so it does not find that passage itself. Equal
    compute: the same k tokens. Not in ``POLICIES``: it needs the chunk, a prompt's own."""

    def __init__(self, chunk: int, share: float = 1.0) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(f"chunk must be a chunk index (int >= 0), got {chunk!r}")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {share!r}")
        self.chunk, self.share = chunk, share
        self.name = "chunkfirst"

    def select(self, ctx: SelectContext, k: int) -> torch.Tensor:
        score = self.score(ctx).float()
        stale = torch.ones_like(score, dtype=torch.bool) if ctx.exact is None else ~ctx.exact
        mine = (ctx.chunk_of == self.chunk) & stale
        m = min(int(round(self.share * k)), int(mine.sum()))
        span = score.max() - score.min() + 1
        score = torch.where(stale, score, score - span)  # exact ones last (qstale)
        first = torch.topk(torch.where(mine, score, score - 3 * span), m).indices
        score[first] += 3 * span
        return _top(ctx, score, k)


class Excluding:
    """``base``'s ranking with some positions left out (those an earlier pass already
    recomputed): what ``fuse.refine`` selects with. Needs a probe policy that selects before
    layer 0 (its context then holds every chunk token)."""

    probe = True
    before_layers = True

    def __init__(self, base: Policy, exclude: torch.Tensor) -> None:
        if not (base.probe and base.before_layers):
            raise ValueError(f"refining needs a probe policy that selects before layer 0, got {base!r}")
        self.base, self.exclude = base, exclude

    @property
    def value_norms(self) -> bool:
        """The base policy's wish for ``SelectContext.value_norms``."""
        return getattr(self.base, "value_norms", False)

    def schedule(self, num_layers: int, ratio: float) -> dict[int, float]:
        return {0: ratio}

    def select(self, ctx: SelectContext, k: int) -> torch.Tensor:
        left = ~torch.isin(ctx.positions, self.exclude.to(ctx.positions.device))  # the candidates left
        sub = {
            "positions": ctx.positions[left],
            "chunk_of": ctx.chunk_of[left],
            "probe_attn": ctx.probe_attn[:, left],
            "token_scores": None if ctx.token_scores is None else ctx.token_scores[left],
            "exact": None if ctx.exact is None else ctx.exact[left],
            "value_norms": None if ctx.value_norms is None else ctx.value_norms[:, left],
        }
        return self.base.select(SelectContext(**{**ctx.__dict__, **sub}), k)


POLICIES: dict[str, Policy] = {
    "cacheblend": CacheBlend(),
    "gradual": Gradual(),
    "qaware": QAware(),
    "qfast": QFast(),
    "qshallow": QShallow(),
    "qdeep": QDeep(),
    "qstale": QStale(),
    "qvalue": QValue(),
    "qimpact": QImpact(),
    "epic": Epic(),
    "epic0": Epic0(),
    "random": Random(),
}
