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

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from chunkcache import fuse as F
from chunkcache import kernels
from chunkcache import model as M
from chunkcache.fuse import FuseConfig, FuseJob, FuseResult
from chunkcache.model import LoadedModel
from chunkcache.select import probe_layers

__all__ = [
    "BatchConfig",
    "BatchRetry",
    "Batcher",
    "FuseJob",
    "Pack",
    "Segment",
    "fuse_many",
    "packed_attend_finish",
    "packed_layer",
    "packed_project",
]


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


# --------------------------------------------------------------------------------------------
# Batched fusion: several requests' fusions through the layers together
# --------------------------------------------------------------------------------------------


@dataclass
class _State:
    f: object  # fuse._Fusion
    config: FuseConfig
    budget: int
    schedule: dict
    active: torch.Tensor
    n_act: int
    probe_attn: torch.Tensor | None = None
    computed: int = 0
    probed: int = 0


@torch.no_grad()
def fuse_many(lm: LoadedModel, jobs: Sequence[FuseJob], recompute: str = "packed") -> list[FuseResult]:
    """``fuse.fuse_assembled`` for several requests at once -> their results, in order.

    Every request keeps its own cache, prompt geometry, policy and budget; per layer the rows of
    all of them go through ``packed_layer`` together. The probes (policies with ``probe``) run
    first, packed (each question over its own stale cache, ``kernels.probe_attention``), through
    every layer: the same reads as the one-request path, which interleaves its probe with the
    check layers only to overlap loading; then each request selects (before layer 0 for ``qfast``,
    at its check layers otherwise) and the recompute runs packed. A job with ``graphs`` has its
    final set padded as the one-request path pads it for its graphs (``FusionGraphs.padded_rows``),
    so both select the same tokens; no graphs are replayed here (the buffers differ per batch).
    Results equal each request fused alone up to the GEMMs' row count (module docstring):
    selections are equal unless two candidates' scores tie to the last bits. A job's
    ``prompt`` built ahead (``FuseJob.place``) is used as is.

    ``recompute="each"``: when every request selected before layer 0 (``qfast``) or needs no
    selection, only the probes are packed; each request's recompute then runs by itself through
    the one-request path's layer loop (``fuse._rest_layers``: replayed as CUDA graphs with a
    job's ``graphs``), which on the GPU trades packing rows, which a compute-bound recompute
    barely gains from, for graph replays instead of eager launches.
    """
    if recompute not in ("packed", "each"):
        raise ValueError(f"recompute must be 'packed' or 'each', got {recompute!r}")
    if not jobs:
        return []
    states = []
    for j in jobs:
        f, budget, schedule, active, n_act = F._begin(
            lm,
            j.buf,
            j.ids,
            j.n_prefix,
            j.chunk_lengths,
            j.token_scores,
            j.config,
            j.source,
            j.timer,
            j.graphs,
            j.prompt,
            j.exact_chunks,
        )  # (f.graphs: its padding, and a copy of its persistent buffer in the result)
        states.append(_State(f, j.config, budget, dict(schedule), active, n_act))
    layers = lm.spec.num_layers
    probing = [s for s in states if s.f.policy.probe and s.schedule]
    if probing:
        _probe(lm, probing)
    for s in probing:
        s.f.timer.mark("probe")
    for s in states:  # selected before layer 0: from the probe, or without one (``select.Epic0``)
        p = s.f.prompt
        if s.f.policy.before_layers and s.schedule:
            keep_n = F._kept(s.budget, s.schedule[0], p.n_ctx, p.n_q, p.n_ctx, _pad(s))
            if keep_n < p.n_ctx:
                keep = F._select(s.f, 0, p.ctx_pos, keep_n, s.probe_attn)
                s.active, s.n_act = torch.cat([keep, p.q_pos]), keep_n
            s.schedule = {}
            s.f.timer.mark("check")
    embed = lm.model.model.embed_tokens
    if recompute == "each" and not any(s.schedule for s in states):
        return [_recompute_alone(lm, s, j) for s, j in zip(states, jobs, strict=True)]
    hs = [embed(s.f.prompt.ids[s.active])[None] for s in states]
    h = hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)
    pack = Pack([Segment(s.f.buf, s.active) for s in states])
    rope = pack.rope(lm, h)  # every row's rotary, the same for every layer until the rows change
    for li in range(layers):
        for s in states:
            s.f.source.ready(li)
        checks = [i for i, s in enumerate(states) if li in s.schedule]
        old = {i: states[i].f.buf[li, :, :, states[i].active[: states[i].n_act]].clone() for i in checks}
        qs = packed_project(lm, li, h, pack, rope)
        filtered = False
        hs = [h[:, r] for r in pack.rows]
        for i in checks:
            # as fuse._check_layers: every candidate's fresh K/V is written, the kept rows go on
            s, p = states[i], states[i].f.prompt
            pad = _pad(s) if li == max(s.schedule) else None  # the final set padded like the graphs'
            keep_n = F._kept(s.budget, s.schedule[li], p.n_ctx, p.n_q, s.n_act, pad)
            if keep_n < s.n_act:
                cand = s.active[: s.n_act]
                keep = F._select(
                    s.f, li, cand, keep_n, s.probe_attn,
                    fresh=s.f.buf[li, :, :, cand], reused=old[i], question_q=qs[i][:, s.n_act :],
                    keys=s.f.buf[li, 0],
                )  # fmt: skip
                new_active = torch.cat([keep, p.q_pos])
                rows = F._index_in(s.active, new_active)
                hs[i], qs[i] = hs[i][:, rows], qs[i][:, rows]
                s.active, s.n_act = new_active, keep_n
                filtered = True
        if filtered:
            h = torch.cat(hs, dim=1)
            pack = Pack([Segment(s.f.buf, s.active) for s in states])
            rope = pack.rope(lm, h)
        h = packed_attend_finish(lm, li, h, qs, pack)
        for s in states:
            s.computed += s.n_act + s.f.prompt.n_q
            if s.schedule and li == min(s.schedule):
                s.f.timer.mark("check")
            s.f.source.issued(li)
    logits = M.final_logits(lm.model, torch.stack([h[0, r.stop - 1] for r in pack.rows]))  # [J, vocab]
    out = []
    for i, (s, j) in enumerate(zip(states, jobs, strict=True)):
        s.f.timer.mark("recompute")
        res = F._result(s.f, j.ids, s.config, logits[i], s.active, s.n_act, s.computed + s.probed, s.probed)
        out.append(res)
    return out


def _recompute_alone(lm: LoadedModel, s: _State, job: FuseJob) -> FuseResult:
    """One request's recompute after the packed probe, as ``fuse_assembled`` runs it (every
    layer over its fixed rows: ``fuse._rest_layers``, graphs included)."""
    h = lm.model.model.embed_tokens(s.f.prompt.ids[s.active])[None]
    h = F._rest_layers(s.f, 0, h, s.active)
    s.computed = (s.n_act + s.f.prompt.n_q) * lm.spec.num_layers
    logits = M.final_logits(lm.model, h[0, -1])
    s.f.timer.mark("recompute")
    return F._result(s.f, job.ids, s.config, logits, s.active, s.n_act, s.computed + s.probed, s.probed)


def _pad(s: _State):
    return s.f.graphs.padded_rows if s.f.graphs is not None else None


def _probe(lm: LoadedModel, states: Sequence[_State]) -> None:
    """Every request's question through every layer (``select.probe_layers``) over its own stale cache, packed (as
    ``fuse._Probe``: ``kernels.probe_attention`` per request gives the output and the attention
    mass per key) -> each state's ``probe_attn`` ``[L, C]`` and ``probed`` token-layers."""
    stops = [probe_layers(s.f.policy, lm.spec.num_layers) for s in states]
    layers = max(stops)  # (a request whose policy probes fewer layers keeps only those)
    pack = Pack([Segment(s.f.buf, s.f.prompt.q_pos) for s in states])
    embed = lm.model.model.embed_tokens
    hs = [embed(s.f.prompt.ids[s.f.prompt.q_pos])[None] for s in states]
    h = hs[0] if len(hs) == 1 else torch.cat(hs, dim=1)
    rope = pack.rope(lm, h)
    masses: list[list[torch.Tensor]] = [[] for _ in states]
    for li in range(layers):
        for s in states:
            s.f.source.ready(li)
        layer = lm.model.model.layers[li]
        scale, window = layer.self_attn.scaling, lm.spec.windows[li]
        outs = []
        for i, (q, seg) in enumerate(zip(packed_project(lm, li, h, pack, rope), pack.segments, strict=True)):
            o, mass = kernels.probe_attention(q, seg.positions, seg.buf[li, 0], seg.buf[li, 1], scale, window)
            outs.append(o)
            masses[i].append(mass)
        h = M.layer_finish(layer, h, outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))
        for s in states:
            s.f.source.issued(li)
    for s, m, stop in zip(states, masses, stops, strict=True):
        s.probe_attn = torch.stack(m[:stop])[:, s.f.prompt.ctx_pos]
        s.probed = s.f.prompt.n_q * stop


# --------------------------------------------------------------------------------------------
# The scheduler: one worker thread fuses what waits, FIFO, in batches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchConfig:
    """How an engine batches concurrent fusions (``ChunkCache(batching=BatchConfig())``)."""

    max_batch: int = 8
    """Most requests fused in one pass. Each waiting fast-path request holds a ``Staging`` (its
    slots and padded KV buffer), so the engine's staging pool grows to this size."""
    max_wait_ms: float = 0.0
    """How long the worker holds a batch that is not full for more requests to arrive, from the
    oldest one's arrival. 0: it fuses whatever waits as soon as it is free (requests that arrive
    while a batch runs are batched together anyway)."""
    preload: bool = True
    """Fast path: a waiting request's layers stream to the device while it waits for its batch
    (``pipeline.fuse_entries(preload=True)``), so its batch need not wait for loads; False: they
    stream in as its batch reaches each layer, as for a call alone."""
    recompute: str = "packed"
    """``batch.fuse_many``'s ``recompute``: ``packed`` (every request's rows through each layer
    together) or ``each`` (probes packed, then each request's recompute alone, replayed as CUDA
    graphs on the fast path)."""
    prep_stream: bool = False
    """CUDA fast path: each caller prepares its request (buffer, load plan, geometry) on its
    staging's own stream instead of the compute stream, so that its small host-to-device copies
    need not wait for the batch running there (and its loads start meanwhile)."""
    idle_s: float = 5.0
    """The worker thread exits after this long with nothing to do (a new request starts it again)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {self.max_batch!r}")
        for name in ("max_wait_ms", "idle_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("preload", "prep_stream"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.recompute not in ("packed", "each"):
            raise ValueError(f"recompute must be 'packed' or 'each', got {self.recompute!r}")
        if self.idle_s == 0:
            raise ValueError("idle_s must be > 0")


class BatchRetry(Exception):
    """A batch failed as a whole: the caller redoes its request alone (from scratch: the failed
    pass may have written into its cache), which raises its own error if the request was the
    cause. Never escapes the engine."""


@dataclass
class _Waiting:
    job: FuseJob
    future: Future
    since: float


class Batcher:
    """Fuses the jobs handed to ``run`` on one worker thread, FIFO, up to ``max_batch`` at a time
    (``fuse_many``; a batch of one through ``fuse.run_job``, CUDA graphs included). Callers
    prepare their job themselves (argument checks, lookups, tokenising, loads and assembly stay in
    their threads, overlapping the batch that runs) and wait on a future, without the GIL.
    An error of a batch of one goes to its caller; a batch of several that fails hands every
    caller ``BatchRetry``. ``stats()``: batches run and their sizes."""

    def __init__(self, lm: LoadedModel, config: BatchConfig) -> None:
        self.lm, self.config = lm, config
        self._queue: deque[_Waiting] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._sizes: Counter = Counter()

    def run(self, job: FuseJob) -> FuseResult:
        fut: Future = Future()
        with self._cond:
            self._queue.append(_Waiting(job, fut, time.perf_counter()))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="chunkcache-batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return fut.result()

    def stats(self) -> dict:
        """``{"batches": n, "requests": n, "sizes": {size: batches}}`` so far."""
        with self._cond:
            sizes = dict(sorted(self._sizes.items()))
        return {
            "batches": sum(sizes.values()),
            "requests": sum(k * v for k, v in sizes.items()),
            "sizes": sizes,
        }

    def _take(self) -> list[_Waiting] | None:
        cfg = self.config
        with self._cond:
            while not self._queue:
                if not self._cond.wait(cfg.idle_s) and not self._queue:
                    self._thread = None  # (under the lock: a new run() starts another)
                    return None
            if cfg.max_wait_ms > 0:
                deadline = self._queue[0].since + cfg.max_wait_ms / 1e3
                while len(self._queue) < cfg.max_batch and (left := deadline - time.perf_counter()) > 0:
                    self._cond.wait(left)
            n = min(cfg.max_batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(n)]
            self._sizes[n] += 1
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            jobs = [w.job for w in batch]
            for j in jobs:
                if j.ready is not None:  # prepared on another stream (prep_stream)
                    torch.cuda.current_stream(j.buf.device).wait_event(j.ready)
                if j.timer is not None:  # the time it waited for its batch, apart from its stages
                    j.timer.mark("queue")
            try:
                if len(jobs) == 1:
                    results = [F.run_job(self.lm, jobs[0])]
                else:
                    results = fuse_many(self.lm, jobs, self.config.recompute)
            except BaseException as e:  # handed to the callers; the worker goes on
                if len(batch) == 1:
                    batch[0].future.set_exception(e)
                else:
                    for w in batch:
                        w.future.set_exception(BatchRetry(f"a batch of {len(batch)} failed: {e!r}"))
                continue
            for w, res in zip(batch, results, strict=True):
                res.stats["batch_size"] = len(batch)
                w.future.set_result(res)
