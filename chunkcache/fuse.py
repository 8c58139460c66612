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
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch

from chunkcache import kernels
from chunkcache import model as M
from chunkcache.layout import ChunkKV
from chunkcache.model import LoadedModel
from chunkcache.select import POLICIES, Excluding, Policy, SelectContext, probe_layers
from chunkcache.stream import layer_steps


@dataclass(frozen=True)
class FuseConfig:
    """How to fuse."""

    recompute_ratio: float = 0.15
    """Fraction of chunk tokens recomputed after the policy's selection (0 = plain reuse, 1 = full prefill)."""
    policy: str | Policy = "qfast"
    """Selection policy: a name in ``chunkcache.select.POLICIES``, or an object with the members
    of ``select.Policy`` (for experiments that should not register a name globally)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if isinstance(self.policy, str):
            if self.policy not in POLICIES:
                raise ValueError(f"unknown policy {self.policy!r}; choose one of {sorted(POLICIES)}")
        elif not isinstance(self.policy, Policy):
            raise ValueError(
                f"policy must be a name in {sorted(POLICIES)} or have probe, before_layers, schedule and "
                f"select (chunkcache.select.Policy), got {self.policy!r}"
            )

    @property
    def selector(self) -> Policy:
        """The policy object."""
        return POLICIES[self.policy] if isinstance(self.policy, str) else self.policy

    @property
    def policy_name(self) -> str:
        """The policy's name (an object's class name)."""
        return self.policy if isinstance(self.policy, str) else type(self.policy).__name__


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
    kv: torch.Tensor = field(repr=False)
    """[layers, 2, kv_heads, N, head_dim] the assembled KV of all N tokens."""
    selected: torch.Tensor = field(repr=False)
    """[k] positions of the chunk tokens recomputed in the last layer."""
    stats: dict = field(default_factory=dict)
    """Tokens reused / recomputed, compute fraction, seconds per stage."""

    _cache: object = field(default=None, repr=False)

    @property
    def cache(self):
        """transformers DynamicCache over ``input_ids[:, :-1]``, built on first use (a copy of
        ``kv``: building it is left out of the time to the first token)."""
        if self._cache is None:
            self._cache = self.fresh_cache()
        return self._cache

    def fresh_cache(self):
        return kv_to_cache(self.kv[:, :, :, : self.input_ids.shape[1] - 1])


def kv_to_cache(kv: torch.Tensor):
    """[layers, 2, H, T, D] (or ``[layers, 2, B, H, T, D]``: a batch of B caches of one length)
    -> a transformers DynamicCache whose layers are views of ``kv``: no
    copy (two copies of the whole KV before: a clone, then the layer's concatenation onto its
    empty start). A DynamicCache never writes into its tensors (each update concatenates into new
    ones), so decoding from it leaves ``kv`` as it was."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(kv.shape[0]):
        k, v = (kv[i, 0], kv[i, 1]) if kv.dim() == 6 else (kv[i, 0][None], kv[i, 1][None])
        cache.update(k[:, :, :0], v[:, :, :0], i)  # creates and initialises layer i, empty
        cache.layers[i].keys, cache.layers[i].values = k, v
    return cache


def assemble(lm: LoadedModel, prefix_kv: torch.Tensor, chunks: list[ChunkKV], n_suffix: int):
    """Place prefix and re-rotated chunk KV in one buffer ``[L, 2, H, N, D]`` (suffix slots zero).
    Each chunk-layer goes through ``kernels.rerotate_scatter`` (codec ``raw``), the assembly the
    pipelined loader runs too: keys rotated in fp32 and rounded once to the model's dtype.

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
        for li in range(spec.num_layers):
            kernels.rerotate_scatter("raw", {"kv": kv[li]}, cos, sin, buf[li, 0], buf[li, 1], o)
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
    return run_job(lm, assembled_job(lm, prefix_kv, chunks, prefix_ids, suffix_ids, config))


def run_job(lm: LoadedModel, job: FuseJob) -> FuseResult:
    """``fuse_assembled`` over a ``FuseJob`` (one request alone)."""
    j = job
    return fuse_assembled(
        lm, j.buf, j.ids, j.n_prefix, j.chunk_lengths, j.token_scores, j.config, j.source, j.timer, j.graphs,
        prompt=j.prompt, exact_chunks=j.exact_chunks,
    )  # fmt: skip


@dataclass
class FuseJob:
    """One fusion's inputs: the arguments of ``fuse_assembled`` (a request of
    ``batch.fuse_many``)."""

    buf: torch.Tensor
    """[L, 2, H, N', D] its assembled cache (or filled lazily by ``source``), its own tensor."""
    ids: torch.Tensor
    """[1, N] its prompt ids (CPU)."""
    n_prefix: int
    chunk_lengths: list[int]
    token_scores: torch.Tensor | None
    config: FuseConfig
    source: LayerSource | None = None
    """A ``LayerSource`` (``pipeline.LayerLoader``), or None: ``buf`` is assembled."""
    timer: StageTimer | None = None
    graphs: object = None
    """``graphs.FusionGraphs`` whose persistent buffer ``buf`` is (CUDA fast path), or None: alone,
    the layer loops replay as graphs; in a batch only its row padding applies, and the result
    gets a copy of the KV either way."""
    exact_chunks: list[bool] | None = None
    """Per chunk: its reused K/V are exact in this prompt (``exact_chunks``), or None (not known)."""
    prompt: _Prompt | None = None
    """Its prompt geometry on the device, built ahead (``place``), or None: built when it runs."""
    ready: object = None
    """A CUDA event after the work that prepared it, for a thread that runs it on another stream
    (``batch.Batcher`` waits for it), or None."""

    def place(self) -> FuseJob:
        """Build the prompt geometry on the device now (a few small host-to-device copies), so
        that running the job later copies nothing from the host: a loader may then stream ahead
        (``pipeline.fuse_entries(preload=True)``) without the fusion's copies queueing behind it."""
        self.prompt = _Prompt.build(
            self.ids, self.n_prefix, self.chunk_lengths, self.buf.shape[3], self.buf.device, self.exact_chunks
        )
        return self


def assembled_job(
    lm: LoadedModel,
    prefix_kv: torch.Tensor,
    chunks: list[ChunkKV],
    prefix_ids: list[int],
    suffix_ids: list[int],
    config: FuseConfig,
) -> FuseJob:
    """``fuse_kv``'s fusion, assembled (``assemble``) and not yet run."""
    if not suffix_ids:
        raise ValueError("the question suffix is empty: nothing to generate from")
    timer = StageTimer(lm.device)
    buf, _, _ = assemble(lm, prefix_kv, chunks, len(suffix_ids))
    ids = torch.tensor(
        [list(prefix_ids) + [t for c in chunks for t in c.token_ids.tolist()] + list(suffix_ids)]
    )
    if ids.shape[1] != buf.shape[3]:
        raise ValueError(f"prefix KV covers {prefix_kv.shape[3]} tokens but prefix_ids has {len(prefix_ids)}")
    timer.mark("assemble")
    lengths = [c.num_tokens for c in chunks]
    exact = exact_chunks(prefix_kv.shape[3], lengths, [c.base_pos for c in chunks])
    return FuseJob(buf, ids, prefix_kv.shape[3], lengths, _token_scores(chunks, lm.device), config,
                   timer=timer, exact_chunks=exact)  # fmt: skip


@torch.no_grad()
def refine(
    lm: LoadedModel,
    fused: FuseResult,
    new_ids,
    ratio: float,
    policy: str | Policy = "qfast",
) -> FuseResult:
    """Recompute ``ratio`` more of the chunk tokens of a fused prompt, chosen by a second probe.

    ``new_ids``: the tokens generated since the fusion (``[g]``; none for a second selection
    stage at prefill time). The probe runs the question and those tokens over the current cache,
    whose selected tokens are fresh already, so it sees what the answer so far reads; the
    ``policy`` ranks the chunk tokens not yet recomputed by it, and the top ``ratio`` of them go
    through every layer with the question and the new tokens (whose K/V are then recomputed
    over the repaired cache too). Tokens recomputed before keep their K/V. Returns the prompt
    grown by ``new_ids``, ready to continue decoding (``FuseResult`` convention); its stats count
    both passes' token-layers against a full prefill of the original prompt."""
    new = torch.as_tensor(new_ids, dtype=torch.long).reshape(1, -1).cpu()
    ids = torch.cat([fused.input_ids.cpu(), new], 1)
    n_prefix, lengths = fused.stats["prefix_tokens"], fused.stats["chunk_lengths"]
    n_ctx = sum(lengths)
    extra = min(round(ratio * n_ctx), n_ctx - int(fused.selected.numel()))
    kv = fused.kv
    buf = torch.cat([kv, kv.new_zeros(*kv.shape[:3], new.shape[1], kv.shape[4])], 3)  # a copy
    base = FuseConfig(policy=policy).selector
    cfg = FuseConfig(recompute_ratio=extra / n_ctx if n_ctx else 0.0, policy=Excluding(base, fused.selected))
    exact = fused.stats.get("exact_chunks")
    res = fuse_assembled(lm, buf, ids, n_prefix, lengths, None, cfg, exact_chunks=exact)
    token_layers = fused.stats["token_layers"] + res.stats["token_layers"]
    full = lm.spec.num_layers * (fused.input_ids.shape[1] - n_prefix)
    stats = {
        **res.stats,
        "recomputed_tokens": int(fused.selected.numel()) + extra,
        "reused_tokens": n_ctx - int(fused.selected.numel()) - extra,
        "token_layers": token_layers,
        "compute_fraction": token_layers / full if full else 0.0,
        "policy": f"{fused.stats['policy']}+refine({FuseConfig(policy=policy).policy_name})",
        "refined_after": int(new.shape[1]),
    }
    selected = torch.sort(torch.cat([fused.selected, res.selected])).values
    return FuseResult(input_ids=ids, logits=res.logits, kv=res.kv, selected=selected, stats=stats)


def with_front(
    res: FuseResult, n_prefix: int, front_lengths: list[int], num_layers: int, prefix_recomputed: bool = False
) -> FuseResult:
    """A fusion made behind an exact front (``precompute.encode_exact`` of the prefix and the first
    chunks, then those chunks counted as prefix) restated for the whole prompt: the front's tokens are chunk tokens
    recomputed through every layer (their token-layers count, and the prefix's where
    ``prefix_recomputed``), and ``selected`` includes them."""
    f, s = sum(front_lengths), res.stats
    front = torch.arange(n_prefix, n_prefix + f, device=res.selected.device)
    token_layers = s["token_layers"] + (f + (n_prefix if prefix_recomputed else 0)) * num_layers
    full = num_layers * (s["prompt_tokens"] - n_prefix)
    stats = {
        **s,
        "prefix_tokens": n_prefix,
        "chunk_tokens": s["chunk_tokens"] + f,
        "recomputed_tokens": s["recomputed_tokens"] + f,
        "front_recomputed_tokens": f,
        "token_layers": token_layers,
        "compute_fraction": token_layers / full if full else 0.0,
        "chunk_lengths": list(front_lengths) + list(s["chunk_lengths"]),
        # the front was computed exactly behind the prefix
        "exact_chunks": None
        if s.get("exact_chunks") is None
        else [True] * len(front_lengths) + s["exact_chunks"],
    }
    return replace(res, selected=torch.cat([front, res.selected]), stats=stats, _cache=None)


def prefill(lm: LoadedModel, ids: torch.Tensor, n_prefix: int, chunk_lengths: list[int]) -> FuseResult:
    """A plain full prefill of the prompt ``ids`` (``[1, N]``; the model's own forward,
    ``logits_to_keep=1``: ``precompute.encode_exact``) as a ``FuseResult``, every chunk token
    recomputed. What adaptive loading falls back to when no mix of fetching and recomputing is
    faster: the same call as a plain prefill, so it is never slower than one (its K/V written
    straight into ``kv`` as the forward runs). ``logits`` are on the host."""
    from chunkcache.precompute import encode_exact

    t = time.perf_counter()
    kv, logits = encode_exact(lm, ids[0], host_logits=True)
    t = time.perf_counter() - t
    n, n_ctx, layers = ids.shape[1], sum(chunk_lengths), lm.spec.num_layers
    stats = {
        "prompt_tokens": n,
        "prefix_tokens": n_prefix,
        "chunk_tokens": n_ctx,
        "question_tokens": n - n_prefix - n_ctx,
        "recomputed_tokens": n_ctx,
        "reused_tokens": 0,
        "probe_token_layers": 0,
        "token_layers": layers * n,  # the prefix too: a plain prefill recomputes it
        "compute_fraction": n / (n - n_prefix),
        "chunk_lengths": list(chunk_lengths),
        "policy": "full prefill",
        "recompute_ratio": 1.0,
        "seconds": {"prefill": t, "total": t},
    }
    selected = torch.arange(n_prefix, n_prefix + n_ctx, device=lm.device)
    return FuseResult(input_ids=ids, logits=logits, kv=kv, selected=selected, stats=stats)


class LayerSource(Protocol):
    """Where the reused chunk K/V of each layer comes from, for callers that fill ``buf`` lazily
    (``chunkcache.pipeline``). ``ready(l)`` is called before any read of ``buf[l]`` (layers in
    ascending order, possibly more than once); ``issued(l)`` after a layer's compute was queued,
    the moment to start loading ahead."""

    def ready(self, layer: int) -> None: ...

    def issued(self, layer: int) -> None: ...


class _Eager:
    """Every layer already assembled (``assemble``)."""

    def ready(self, layer: int) -> None:
        pass

    def issued(self, layer: int) -> None:
        pass


class StageTimer:
    """Time between ``mark`` calls, attributed to the named stage (summed when a stage recurs).

    On a GPU it records CUDA events on the current stream and synchronises once, in ``seconds``;
    stage times are then GPU-timeline spans, which include any wait for the host. On CPU it reads
    ``time.perf_counter``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[tuple[str | None, object]] = [(None, self._now())]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def mark(self, stage: str) -> None:
        self.marks.append((stage, self._now()))

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
        out: dict[str, float] = {}
        for (_, a), (stage, b) in zip(self.marks, self.marks[1:], strict=False):
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[stage] = out.get(stage, 0.0) + dt
        out["total"] = sum(out.values())
        return out


@dataclass
class _Prompt:
    """Token geometry of one prompt on the fusion's device (the picture at the top):
    prefix ``0 .. P-1``, chunks back to back ``P .. S-1``, the question ``S .. N-1``."""

    ids: torch.Tensor
    """[N] token ids."""
    n_prefix: int
    n_ctx: int
    """Chunk tokens (C)."""
    n_q: int
    """Question tokens (nq)."""
    ctx_pos: torch.Tensor
    """[C] chunk-token positions."""
    q_pos: torch.Tensor
    """[nq] question positions."""
    chunk_of: torch.Tensor
    """[N] chunk of each position (-1 outside chunks)."""
    chunk_offsets: torch.Tensor
    """[chunks] first position of each chunk."""
    chunk_lengths: list[int]
    exact_chunks: list[bool] | None = None
    """Per chunk: its reused K/V are exact (``exact_chunks``), or None (not known)."""
    exact: torch.Tensor | None = None
    """[C] bool: the tokens of exact chunks, or None where no chunk is (or it is not known)."""

    @staticmethod
    def build(
        ids: torch.Tensor, n_prefix: int, chunk_lengths: list[int], slots: int, dev, exact_chunks=None
    ) -> _Prompt:
        n = ids.shape[1]
        if n > slots:
            raise ValueError(f"buffer holds {slots} positions, the prompt has {n}")
        n_ctx = sum(chunk_lengths)
        n_q = n - n_prefix - n_ctx
        if n_q <= 0:
            raise ValueError("the question suffix is empty: nothing to generate from")
        lengths = np.asarray(chunk_lengths, dtype=np.int64)
        offsets = n_prefix + np.cumsum(lengths) - lengths
        # Built on the host (a repeat_interleave on the device would sync to size its output) and
        # sent in one copy: ids, chunk of each position, chunk offsets, positions, exact tokens.
        chunk_of = np.full(n, -1, dtype=np.int64)
        chunk_of[n_prefix : n_prefix + n_ctx] = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        exact = exact_chunks is not None and any(exact_chunks)
        host = np.concatenate(
            [
                ids[0].cpu().numpy().astype(np.int64, copy=False),
                chunk_of,
                offsets,
                np.arange(n_prefix, n, dtype=np.int64),  # chunk positions, then the question's
                np.repeat(np.asarray(exact_chunks, dtype=np.int64), lengths) if exact else chunk_of[:0],
            ]
        )
        d = torch.from_numpy(host).to(dev)
        c = len(lengths)
        pos = d[2 * n + c : 3 * n + c - n_prefix]
        return _Prompt(
            ids=d[:n],
            n_prefix=n_prefix,
            n_ctx=n_ctx,
            n_q=n_q,
            ctx_pos=pos[:n_ctx],
            q_pos=pos[n_ctx:],
            chunk_of=d[n : 2 * n],
            chunk_offsets=d[2 * n : 2 * n + c],
            chunk_lengths=list(chunk_lengths),
            exact_chunks=None if exact_chunks is None else list(exact_chunks),
            exact=d[3 * n + c - n_prefix :].bool() if exact else None,
        )


@dataclass
class _Fusion:
    """What the steps of one fusion share."""

    lm: LoadedModel
    buf: torch.Tensor
    """[L, 2, H, N', D] the assembled cache (N' >= N)."""
    prompt: _Prompt
    policy: Policy
    token_scores: torch.Tensor | None
    """[C] scores stored with the chunks, or None."""
    source: LayerSource
    timer: StageTimer
    graphs: object
    """chunkcache.graphs.FusionGraphs, or None (eager)."""


def _select(
    f: _Fusion,
    layer: int,
    cand: torch.Tensor,  # [c] candidate chunk positions, ascending
    keep_n: int,
    probe_attn: torch.Tensor | None,  # [L, C]
    fresh: torch.Tensor | None = None,  # [2, H, c, D]
    reused: torch.Tensor | None = None,  # [2, H, c, D]
    question_q: torch.Tensor | None = None,  # [Hq, nq, D]
    keys: torch.Tensor | None = None,  # [H, N, D]
) -> torch.Tensor:
    """The ``keep_n`` candidates the policy keeps after ``layer``, ascending: the one place a
    ``SelectContext`` is built (before layer 0 the layer tensors are None)."""
    prompt, lm = f.prompt, f.lm
    idx = cand - prompt.n_prefix  # candidates' indices among the chunk tokens
    values = None
    if getattr(f.policy, "value_norms", False):
        # [L, c]: one reduction over every layer's V, accumulated in fp32 without an fp32 copy
        # (equal to the norm of ``.float()`` copies, layer by layer, which it replaced)
        v = f.buf[:, 1]  # [L, H, N', D]
        values = torch.linalg.vector_norm(v, dim=-1, dtype=torch.float32).mean(1)[:, cand]
    ctx = SelectContext(
        layer=layer,
        positions=cand,
        chunk_of=prompt.chunk_of[cand],
        chunk_offsets=prompt.chunk_offsets,
        fresh=fresh,
        reused=reused,
        question_q=question_q,
        keys=keys,
        question_pos=prompt.q_pos,
        scale=lm.model.model.layers[layer].self_attn.scaling,
        window=lm.spec.windows[layer],
        probe_attn=None if probe_attn is None else probe_attn[:, idx],
        token_scores=None if f.token_scores is None else f.token_scores[idx],
        exact=None if prompt.exact is None else prompt.exact[idx],
        value_norms=values,
    )
    return torch.sort(f.policy.select(ctx, keep_n)).values


@torch.no_grad()
def fuse_assembled(
    lm: LoadedModel,
    buf: torch.Tensor,  # [L, 2, H, N, D] prefix and re-rotated chunks (or filled lazily by source)
    ids: torch.Tensor,  # [1, N] prompt ids on CPU
    n_prefix: int,
    chunk_lengths: list[int],
    token_scores: torch.Tensor | None,  # [C] on buf's device, or None
    config: FuseConfig,
    source: LayerSource | None = None,
    timer: StageTimer | None = None,
    graphs=None,  # chunkcache.graphs.FusionGraphs (CUDA): replay the layer loops as CUDA graphs
    prompt: _Prompt | None = None,  # the geometry built ahead (FuseJob.place), or None
    exact_chunks: list[bool] | None = None,  # per chunk: its reused K/V are exact (``exact_chunks``)
) -> FuseResult:
    """The fusion proper over an assembled buffer: probe, check layers, selective recompute.

    ``buf`` may be longer than the prompt (``ids``): slots past it must hold finite values (they
    are masked). With ``graphs``, the probe after the first check layer and every layer after the
    last check layer run through ``graphs.run`` (captured once per padded shape, then replayed),
    and the recomputed set is padded up to ``graphs.row_bucket`` rows with the next-best tokens.

    Chunks sit back to back after the prefix and the question fills the last slots, so chunk
    positions are ``n_prefix .. S-1`` and the active set is always ``[sorted chunk subset | question]``:
    its chunk part is a prefix of known length, tracked on the host. The loop therefore needs no
    host-device synchronisation (no ``nonzero``, boolean masks or ``.item()``) until the end.
    """
    if graphs is not None and buf.device.type != "cuda":
        graphs = None
    f, budget, schedule, active, n_act = _begin(
        lm,
        buf,
        ids,
        n_prefix,
        chunk_lengths,
        token_scores,
        config,
        source,
        timer,
        graphs,
        prompt,
        exact_chunks,
    )
    prompt, policy, timer, source = f.prompt, f.policy, f.timer, f.source
    n_ctx, n_q, q_pos = prompt.n_ctx, prompt.n_q, prompt.q_pos

    # The probe reads each layer's reused K/V before the recompute overwrites it, so it runs
    # through the layers up to the first selection first; the rest of it (cheap on the GPU,
    # bound by loading when the cache streams in) runs after the check layers were queued, so
    # loading overlaps their full-width compute. It writes only question slots, which every
    # recomputed layer overwrites before reading: no copy of the buffer is needed.
    probe = None
    if policy.probe and schedule:
        stop = probe_layers(policy, lm.spec.num_layers)
        probe = _Probe(lm, buf, prompt.ids, q_pos, prompt.ctx_pos, source, graphs, stop)
        if graphs is not None:
            # The whole probe first, as graphs of a few layers each started as their layers
            # arrive: between groups the compute thread waits (without the GIL) instead of
            # competing with the stager with eager layers.
            probe.run_rest()
        else:
            probe.run_until(min(schedule) + 1)
        timer.mark("probe")
    if policy.before_layers and schedule:
        # The probe alone (or a policy that needs none) ranks the tokens: select before layer 0,
        # so every layer (from the first) runs over the kept rows only, as one fixed set (graphs
        # from layer 0).
        if probe is not None:
            probe.run_rest()
            timer.mark("probe")
        keep_n = _kept(
            budget, schedule[0], n_ctx, n_q, n_ctx, graphs.padded_rows if graphs is not None else None
        )
        if keep_n < n_ctx:
            keep = _select(f, 0, prompt.ctx_pos, keep_n, None if probe is None else probe.attention())
            active, n_act = torch.cat([keep, q_pos]), keep_n
        schedule = {}
        timer.mark("check")

    h = lm.model.model.embed_tokens(prompt.ids[active])[None]  # [1, a, hidden]
    h, active, n_act, computed = _check_layers(f, schedule, budget, probe, h, active, n_act)
    first = min(max(schedule), lm.spec.num_layers - 1) + 1 if schedule else 0
    h = _rest_layers(f, first, h, active)
    computed += (n_act + n_q) * (lm.spec.num_layers - first)
    probed = n_q * probe.done if probe is not None else 0  # the probe's token-layers count too
    logits = M.final_logits(lm.model, h[0, -1])
    timer.mark("recompute")
    return _result(f, ids, config, logits, active, n_act, computed + probed, probed)


def _result(
    f: _Fusion,
    ids: torch.Tensor,
    config: FuseConfig,
    logits: torch.Tensor,
    active: torch.Tensor,  # the last layer's active positions: n_act chunk tokens, then the question
    n_act: int,
    token_layers: int,  # everything computed, the probe's included
    probed: int,  # the probe's token-layers
) -> FuseResult:
    """One fusion's ``FuseResult`` and its stats (the single and the batched paths)."""
    prompt, buf = f.prompt, f.buf
    n, n_prefix, n_ctx = ids.shape[1], prompt.n_prefix, prompt.n_ctx
    full = f.lm.spec.num_layers * (n - n_prefix)
    stats = {
        "prompt_tokens": n,
        "prefix_tokens": n_prefix,
        "chunk_tokens": n_ctx,
        "question_tokens": prompt.n_q,
        "recomputed_tokens": n_act,
        "reused_tokens": n_ctx - n_act,
        "probe_token_layers": probed,
        "token_layers": token_layers,
        "compute_fraction": token_layers / full if full else 0.0,
        "chunk_lengths": list(prompt.chunk_lengths),
        "exact_chunks": prompt.exact_chunks,
        "policy": config.policy_name,
        "recompute_ratio": config.recompute_ratio,
        "seconds": {"assemble": 0.0, "probe": 0.0, "check": 0.0, **f.timer.seconds()},
    }
    kv = buf if buf.shape[3] == n else buf[:, :, :, :n]
    if f.graphs is not None:  # the graphs' buffer is reused by the next fusion: hand out a copy
        kv = kv.clone()
    return FuseResult(input_ids=ids, logits=logits, kv=kv, selected=active[:n_act], stats=stats)


def _begin(
    lm, buf, ids, n_prefix, chunk_lengths, token_scores, config, source, timer, graphs, prompt=None,
    exact_chunks=None,
):  # fmt: skip
    """A fusion's shared state and its plan -> (``_Fusion``, budget: chunk tokens recomputed after
    the last check, schedule: check layer -> fraction kept after it, the first active positions,
    how many of them are chunk tokens)."""
    source = source or _Eager()
    timer = timer or StageTimer(buf.device)
    prompt = prompt or _Prompt.build(ids, n_prefix, chunk_lengths, buf.shape[3], buf.device, exact_chunks)
    n_ctx, q_pos = prompt.n_ctx, prompt.q_pos
    policy = config.selector
    f = _Fusion(lm, buf, prompt, policy, token_scores, source, timer, graphs)
    budget = round(config.recompute_ratio * n_ctx)
    # Ratio 0 and 1 need no selection: the question alone, or every token through every layer.
    schedule = policy.schedule(lm.spec.num_layers, config.recompute_ratio) if 0 < budget < n_ctx else {}
    # Active set: positions run through the current layer, sorted ascending; its first n_act
    # entries are chunk tokens, the rest the question.
    active, n_act = (q_pos, 0) if budget == 0 else (torch.cat([prompt.ctx_pos, q_pos]), n_ctx)
    return f, budget, schedule, active, n_act


def _kept(budget: int, fraction: float, n_ctx: int, n_q: int, limit: int, pad_rows=None) -> int:
    """Chunk tokens kept after a check: the schedule's ``fraction`` of the ``n_ctx``, at least
    ``budget``; with ``pad_rows`` (``FusionGraphs.padded_rows``) rounded up with the next-best
    tokens so that kept + question rows fill a graph bucket, at most ``limit`` + question."""
    keep_n = max(budget, round(fraction * n_ctx))
    return keep_n if pad_rows is None else pad_rows(keep_n + n_q, limit + n_q) - n_q


def graph_shapes(graphs, config: FuseConfig, num_layers: int, n_prefix: int, n_ctx: int, n_q: int) -> set:
    """The padded shapes ``fuse_assembled`` records CUDA graphs for when it fuses a prompt of
    ``n_prefix`` + ``n_ctx`` chunk tokens + ``n_q`` question tokens with ``graphs``: a set of
    ``("probe", buffer length, probe rows)`` and ``("layers", buffer length, recomputed rows)``
    (each graph of a shape is one layer group). The same decisions as the fusion: its budget,
    schedule, ``_kept`` and the graphs' padding."""
    policy = config.selector
    budget = round(config.recompute_ratio * n_ctx)
    schedule = policy.schedule(num_layers, config.recompute_ratio) if 0 < budget < n_ctx else {}
    n = n_prefix + n_ctx + n_q
    n_b = graphs.padded_length(n)
    n_act = 0 if budget == 0 else n_ctx
    for li in sorted(schedule):
        pad = graphs.padded_rows if li == max(schedule) else None
        n_act = min(n_act, _kept(budget, schedule[li], n_ctx, n_q, n_act, pad))
    shapes = {("layers", n_b, n_act + n_q)}
    if policy.probe and schedule:
        shapes.add(("probe", n_b, graphs.padded_probe(n_q, n_b - n)))
    return shapes


def warmup_points(
    graphs, config: FuseConfig, num_layers: int, n_prefix: int, contexts: range, questions: range
) -> list[tuple[int, int]]:
    """Few ``(chunk tokens, question tokens)`` whose fusions, between them, record every graph
    shape (``graph_shapes``) of the prompts with chunk tokens in ``contexts`` and question tokens
    in ``questions``: the first prompt found for each shape (a scan of every pair: about a
    second for a 30K-token range)."""
    seen: set = set()
    points = []
    for n_ctx in contexts:
        for n_q in questions:
            new = graph_shapes(graphs, config, num_layers, n_prefix, n_ctx, n_q) - seen
            if new:
                seen |= new
                points.append((n_ctx, n_q))
    return points


def _check_layers(
    f: _Fusion,
    schedule: dict[int, float],  # check layer -> fraction of chunk tokens kept after it
    budget: int,  # chunk tokens recomputed after the last check
    probe: _Probe | None,
    h: torch.Tensor,  # [1, a, hidden] the active rows' hidden states
    active: torch.Tensor,  # [a] their positions: n_act chunk tokens, then the question
    n_act: int,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Layers up to the schedule's last check layer, eager, filtering as they go -> (h, active,
    n_act, token-layers computed). Nothing to do without a schedule."""
    lm, buf, source, timer, graphs = f.lm, f.buf, f.source, f.timer, f.graphs
    computed = 0
    n_ctx, n_q, q_pos = f.prompt.n_ctx, f.prompt.n_q, f.prompt.q_pos
    last_check = min(max(schedule), lm.spec.num_layers - 1) if schedule else -1
    for li in range(last_check + 1):
        source.ready(li)
        check = li in schedule
        old = buf[li, :, :, active[:n_act]].clone() if check else None  # [2, H, c, D] reused K/V
        q = _project(lm, buf, li, h, active)  # [Hq, a, D]
        if check:
            # Filter between the projections and the attention: every candidate's fresh K/V is
            # written (as if the whole layer ran at full width), but only the kept rows go on
            # through attention and MLP. Row-wise identical to filtering after the layer, at a
            # fraction of the check layer's cost.
            pad = graphs.padded_rows if graphs is not None and li == max(schedule) else None
            keep_n = _kept(budget, schedule[li], n_ctx, n_q, n_act, pad)  # (the final set padded)
            cand = active[:n_act]
            if keep_n < n_act:
                probe_attn = None
                if probe is not None:
                    timer.mark("check")
                    probe.run_rest()
                    timer.mark("probe")
                    probe_attn = probe.attention()  # [L, C]
                keep = _select(
                    f, li, cand, keep_n, probe_attn,
                    fresh=buf[li, :, :, cand], reused=old, question_q=q[:, n_act:], keys=buf[li, 0],
                )  # fmt: skip
                new_active = torch.cat([keep, q_pos])
                rows = _index_in(active, new_active)
                h, q = h[:, rows], q[:, rows]
                active, n_act = new_active, keep_n
        h = _attend_finish(lm, buf, li, h, q, active)
        computed += n_act + n_q
        source.issued(li)
        if check and li == min(schedule):
            timer.mark("check")
    return h, active, n_act, computed


def _rest_layers(f: _Fusion, first: int, h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Layers ``first ..`` for a fixed set of rows (one CUDA graph per layer group with
    ``graphs``: a group starts as soon as its layers are loaded; over a link the last group in
    halving steps)."""
    lm, buf, source, graphs = f.lm, f.buf, f.source, f.graphs
    layers = lm.spec.num_layers
    if first >= layers:
        return h
    if graphs is None:
        return _layers_body(lm, buf, first, layers, source)(h=h, active=active)
    h = h.contiguous()
    # over a link the last group in halving steps (``stream.layer_steps``): a recompute that started
    # before the last layers arrived (a probe that stops early) then follows the last byte with
    # one layer only
    for start, stop in layer_steps(first, layers, graphs.layer_group, getattr(source, "arriving", False)):
        source.ready(stop - 1)
        key = ("layers", start, stop, int(active.numel()))
        h = graphs.run(
            key, _layers_body(lm, buf, start, stop, None), {"h": h, "active": active}, (lm.model, buf)
        )
    return h


def _project(
    lm: LoadedModel, buf: torch.Tensor, li: int, h: torch.Tensor, active: torch.Tensor, rope=None
) -> torch.Tensor:
    """Layer ``li``'s RoPE'd queries ``[Hq, a, D]`` for the rows at positions ``active``
    (hidden ``h`` ``[1, a, hidden]``); their fresh K/V are written into ``buf[li]``. ``rope``:
    ``M.rotary(model, active, h)`` if the caller has it (the same for every layer)."""
    mdl = lm.model
    cos, sin = rope if rope is not None else M.rotary(mdl, active, h)
    return M.layer_qkv_into(mdl.model.layers[li], h, cos, sin, lm.spec, active, buf[li, 0], buf[li, 1])


def _attend_finish(
    lm: LoadedModel, buf: torch.Tensor, li: int, h: torch.Tensor, q: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    """The rest of layer ``li`` for those rows: attention over ``buf[li]`` under the exact
    position-causal mask, o_proj, residual, MLP -> the next hidden ``[1, a, hidden]``."""
    layer = lm.model.model.layers[li]
    out = M.attend_at(q, active, buf[li, 0], buf[li, 1], layer.self_attn.scaling, lm.spec.windows[li])
    return M.layer_finish(layer, h, out)


def _layers_body(lm: LoadedModel, buf: torch.Tensor, first: int, stop: int, source):
    """Layers ``first .. stop-1`` for a fixed set of rows (``active`` positions, hidden ``h``).
    Touches only its inputs, ``buf`` and the model, so it can be recorded as a CUDA graph
    (``source`` None: the caller made every layer ready first)."""

    def body(h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        rope = M.rotary(lm.model, active, h)  # the rows' positions are fixed: once for all layers
        for li in range(first, stop):
            if source is not None:
                source.ready(li)
            h = _attend_finish(lm, buf, li, h, _project(lm, buf, li, h, active, rope), active)
            if source is not None:
                source.issued(li)
        return h

    return body


def _index_in(haystack: torch.Tensor, needles: torch.Tensor) -> torch.Tensor:
    """Indices i with haystack[i] == needle for each needle (haystack sorted ascending)."""
    return torch.searchsorted(haystack, needles)


def exact_chunks(n_prefix: int, lengths: list[int], base_pos: list[int]) -> list[bool]:
    """Per chunk: whether its reused K/V are exact in this prompt: it sits right behind the prefix
    and was encoded right behind it (offset = its ``base_pos`` = P). Chunks are encoded behind the
    prompt's prefix (``sink="prefix"``, base_pos = P), one BOS token (base_pos = 1) or the prefix
    and generic passages (``sink="context"``, base_pos > P), so only the first chunk with the
    prefix sink was encoded behind the very tokens it follows (a later chunk at its encoding
    offset behind a context sink was not). The codec's rounding is not context: a lossy chunk
    counts as exact too."""
    offsets = [n_prefix + sum(lengths[:i]) for i in range(len(lengths))]
    return [o == b == n_prefix for o, b in zip(offsets, base_pos, strict=True)]


def _token_scores(chunks: list[ChunkKV], device) -> torch.Tensor | None:
    if not chunks or any(c.token_scores is None for c in chunks):
        return None
    return torch.cat([c.token_scores.to(device) for c in chunks])


class _Probe:
    """Run only the question through the layers over the reused (stale) cache and record how much
    attention it pays to each chunk token per layer (mean over heads and question tokens). Costs
    |question| x L token-layers, about what one chunk token's recompute costs. Runs in pieces
    (``run_until``) so the fusion can interleave it with the check layers; ``run_rest`` finishes
    it (as one CUDA graph with ``graphs``)."""

    def __init__(
        self, lm: LoadedModel, buf: torch.Tensor, ids: torch.Tensor, q_pos, ctx_pos, source, graphs=None,
        layers: int | None = None,  # how many layers it runs (``select.probe_layers``); None: all
    ) -> None:  # fmt: skip
        self.lm, self.buf, self.q_pos, self.ctx_pos, self.source = lm, buf, q_pos, ctx_pos, source
        self.graphs = graphs
        self.layers = lm.spec.num_layers if layers is None else layers
        self.h = lm.model.model.embed_tokens(ids[q_pos])[None]  # [1, nq, hidden]
        self.n = ids.shape[0]  # prompt tokens: the question fills the last slots
        self.rows: list[torch.Tensor] = []  # per layer [N]: attention over every buffer position
        self.done = 0
        self.scale = 1.0  # rows' mean over padded rows -> over the question's

    def _layer(self, li: int, h: torch.Tensor, q_pos: torch.Tensor, rope=None, mask_pos=None):
        """One probe layer: ``kernels.probe_attention`` gives the output and the mass per key
        (CUDA: one fused kernel pair, no score tensors; CPU: its torch reference). ``mask_pos``:
        the rows' positions under the causal mask when they differ from the slots ``q_pos`` their
        K/V are written to (phantom rows: -1, no key visible, no mass)."""
        buf, lm = self.buf, self.lm
        layer = lm.model.model.layers[li]
        q = _project(lm, buf, li, h, q_pos, rope)
        out, row = kernels.probe_attention(
            q, q_pos if mask_pos is None else mask_pos, buf[li, 0], buf[li, 1], layer.self_attn.scaling,
            lm.spec.windows[li],
        )  # fmt: skip
        return M.layer_finish(layer, h, out), row  # row: [N]

    @torch.no_grad()
    def run_until(self, stop: int) -> None:
        for li in range(self.done, stop):
            self.source.ready(li)
            self.h, row = self._layer(li, self.h, self.q_pos)
            self.rows.append(row[None])
            self.source.issued(li)
        self.done = max(self.done, stop)

    @torch.no_grad()
    def run_rest(self) -> None:
        """The remaining layers (of ``self.layers``): eager, or as CUDA graphs of
        ``graphs.layer_group`` layers, each replayed as soon as its layers are loaded."""
        layers = self.layers
        if self.graphs is None or self.done >= layers:
            return self.run_until(layers)
        group = self.graphs.layer_group

        def body_for(start: int, stop: int):
            def body(h: torch.Tensor, q_pos: torch.Tensor, mask_pos: torch.Tensor):
                rows = []
                rope = M.rotary(self.lm.model, q_pos, h)
                for li in range(start, stop):
                    h, row = self._layer(li, h, q_pos, rope, mask_pos)
                    rows.append(row)
                return torch.stack(rows), h

            return body

        # Pad the rows to the graphs' probe bucket with phantom rows: zero hidden states whose K/V
        # go to spare slots past the prompt (invisible to every real row) and which see no key
        # (mask position -1), so they add no mass; the mass is the mean over rows, rescaled below.
        n_q, n = int(self.q_pos.numel()), self.n
        n_pad = self.graphs.padded_probe(n_q, self.buf.shape[3] - n)
        h, q_pos, mask_pos = self.h.contiguous(), self.q_pos, self.q_pos
        if n_pad > n_q:
            extra = torch.arange(n, n + n_pad - n_q, device=q_pos.device)
            h = torch.cat([h, h.new_zeros(1, n_pad - n_q, h.shape[2])], 1)
            q_pos = torch.cat([q_pos, extra])
            mask_pos = torch.cat([self.q_pos, torch.full_like(extra, -1)])
        self.scale = n_pad / n_q if n_q else 1.0
        # a group runs as soon as its layers are in; over a link the last group in halving steps,
        # so only the last layer's probe waits for the link's last byte
        for start, stop in layer_steps(self.done, layers, group, getattr(self.source, "arriving", False)):
            self.source.ready(stop - 1)
            key = ("probe", start, stop, n_pad)
            rows, h = self.graphs.run(
                key, body_for(start, stop), {"h": h, "q_pos": q_pos, "mask_pos": mask_pos},
                (self.lm.model, self.buf),
            )  # fmt: skip
            self.rows.append(rows.clone())
        self.h = h[:, :n_q]
        self.done = layers

    def attention(self) -> torch.Tensor:
        rows = torch.cat(self.rows)[:, self.ctx_pos]  # [L, C]
        return rows if self.scale == 1.0 else rows * self.scale  # (the mean over real rows only)
