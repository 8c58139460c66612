"""Continuous batching of decoding: every active generation advances by one token in one packed
step through the model, each against its own cache; requests join between steps and leave as
soon as they finish.

A request holds its fused prompt's KV in a buffer of its own with room for its new tokens,
``[layers, 2, kv_heads, N + max_new_tokens - 1, head_dim]``, its next input token and that token's
position (its slot in the buffer), and its sampling state (a ``torch.Generator`` of its own, so
a seeded request draws the same tokens whoever it is batched with). The first new token comes
from the fusion's logits at once (on the caller's thread); the rest come from a worker thread
that runs steps over all active requests:

    rows:     [ r0 | r1 | r2 ]            one row per request: its last token at its position p_i
    layer l:  norm, q/k/v, o_proj, MLP once over the packed rows (``batch.packed_layer``); row i
              writes its K/V into slot p_i of its own buffer and attends over slots <= p_i
    then:     logits [rows, vocab] -> per request: greedy argmax, or temperature / top-k / top-p
              sampling with its own generator -> its queue; a finished request is retired

Tokens go to a per-request callback (a ``queue.SimpleQueue`` for threads, an ``asyncio.Queue``
fed with ``call_soon_threadsafe`` for asyncio: the event loop never blocks). A request ends at an
end-of-sequence token (emitted, as ``model.generate`` emits it), after ``max_new_tokens``, or when
its consumer goes away (closes the iterator, is cancelled): it is retired before the next step
and its buffer is freed.

What it knows: the model's layers through ``chunkcache.batch`` (``packed_layer``), Hugging
Face's sampling rules (``Sampling``). What it does not know: fusion, prompts, text (it hands out
token ids; ``generation`` turns them into text).

    decoder = Decoder(lm, DecodeConfig(max_batch=16))
    ids = list(decoder.tokens(fused, max_new_tokens=32))          # from any thread
    async for t in decoder.atokens(fused, 32, Sampling(do_sample=True, seed=7)): ...
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch

from chunkcache.batch import Pack, Segment, packed_layer
from chunkcache.model import LoadedModel

__all__ = ["DecodeConfig", "Decoder", "Sampling", "sampling_from"]


@dataclass(frozen=True)
class DecodeConfig:
    """How the engine decodes when ``ChunkCache(decode_batching=DecodeConfig(...))``."""

    max_batch: int = 16
    """Requests decoded together at most (one row each in every step); further requests wait,
    first come first served, and join between steps as others finish."""
    graphs: bool = False
    """CUDA only: record the step as a CUDA graph (``graphs.FusionGraphs``) once the same set of
    requests ran it twice, and replay it while that set stays (a request joining or leaving drops
    the graph). Saves the host's kernel launches; a capture costs about one step's launches."""

    def __post_init__(self) -> None:
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, Integral) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {self.max_batch!r}")
        if not isinstance(self.graphs, bool):
            raise TypeError(f"graphs must be a bool, got {self.graphs!r}")


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens: Hugging Face ``generate``'s meaning of the same names
    (temperature, then top-k, then top-p, then a draw from the softmax; greedy: argmax)."""

    do_sample: bool = False
    """Draw from the distribution; False: greedy (the other sampling fields are ignored)."""
    temperature: float = 1.0
    """Logits are divided by it (> 0)."""
    top_k: int = 50
    """Keep the k most likely tokens (0: all). 50 is ``generate``'s default."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p (1: all)."""
    seed: int | None = None
    """Seed of the request's own generator: the same seed draws the same tokens, whatever else is
    decoded meanwhile. None: a fresh random seed."""
    eos: tuple[int, ...] = ()
    """Token ids that end the answer (emitted, then the request ends)."""

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, Real)
            or not self.temperature > 0
        ):
            raise ValueError(f"temperature must be a number > 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, Real) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, Integral)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in self.eos):
            raise TypeError(f"eos must be token ids, got {self.eos!r}")

    def generator(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g

    def choose(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        """The next token from fp32 ``logits`` ``[vocab]`` (``transformers``' warpers, in its order)."""
        if not self.do_sample:
            return int(logits.argmax())
        scores = logits[None].float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]))[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[..., -1:] = False  # keep at least one
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


SUPPORTED_KWARGS = frozenset(
    {"do_sample", "temperature", "top_k", "top_p", "seed", "eos_token_id", "pad_token_id"}
)
"""``generate`` keyword arguments the batched decoder honours (``pad_token_id`` has nothing to pad
here and is ignored); any other sends a request to ``model.generate``."""

_NEUTRAL: dict[str, tuple] = {
    "num_beams": (None, 1),
    "num_return_sequences": (None, 1),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "min_p": (None,),
    "top_h": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
}
"""Generation-config fields whose value here adds no logits processor or stopping rule to
``model.generate``; a model whose ``generation_config`` sets any other value decodes through
``model.generate`` (the batched decoder would give other tokens)."""


def sampling_from(kwargs: Mapping, generation_config) -> tuple[Sampling | None, list[str]]:
    """``generate`` keyword arguments (and the model's generation config for what they leave
    unset) -> ``(Sampling, [])``, or ``(None, reasons)`` when something in them asks for what the
    batched decoder does not do. Bad values raise (``Sampling``'s checks)."""
    reasons = sorted(set(kwargs) - SUPPORTED_KWARGS)
    for name, neutral in _NEUTRAL.items():
        value = getattr(generation_config, name, None)
        if value not in neutral:
            reasons.append(f"generation_config.{name}={value!r}")
    if reasons:
        return None, reasons

    def pick(name: str, default):
        if name in kwargs:
            return kwargs[name]
        value = getattr(generation_config, name, None)
        return default if value is None else value

    eos = pick("eos_token_id", None)
    eos = () if eos is None else (eos,) if isinstance(eos, Integral) else tuple(int(t) for t in eos)
    return (
        Sampling(
            do_sample=kwargs.get("do_sample", getattr(generation_config, "do_sample", None) or False),
            temperature=pick("temperature", 1.0),
            top_k=pick("top_k", 50),
            top_p=pick("top_p", 1.0),
            seed=kwargs.get("seed"),
            eos=eos,
        ),
        [],
    )


def check_max_new_tokens(value) -> int:
    """A positive int (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {value!r}")
    return int(value)


_END = object()
"""Emitted after a request's last token."""


@dataclass(eq=False)
class _Request:
    """One generation's state. Only the worker touches it once admitted (``cancelled`` aside)."""

    buf: torch.Tensor | None = field(repr=False)
    """[L, 2, H, N + max_new_tokens - 1, D] the prompt's KV, then the new tokens'; None once retired."""
    pos: int
    """Slot of ``token`` in ``buf`` (its position)."""
    token: int
    """Next input token (the last one produced)."""
    left: int
    """Tokens still to produce."""
    sampling: Sampling
    generator: torch.Generator = field(repr=False)
    emit: Callable[[object], None] = field(repr=False)
    """Receives each token id, then ``_END`` or an exception."""
    cancelled: bool = False
    """Set by the consumer's side when it stops listening; the worker retires the request."""

    def cancel(self) -> None:
        self.cancelled = True

    def send(self, item) -> bool:
        """Hand ``item`` to the consumer; False (and cancelled) if it is gone (a closed loop)."""
        try:
            self.emit(item)
        except RuntimeError:  # asyncio: the consumer's event loop is closed
            self.cancelled = True
        return not self.cancelled


class Decoder:
    """Decode many fused prompts at once: ``tokens``/``atokens`` per request, one worker thread
    stepping all active requests together (started on first use, a daemon; ``close`` stops it).
    Thread-safe."""

    def __init__(self, lm: LoadedModel, config: DecodeConfig = DecodeConfig()) -> None:
        if not isinstance(config, DecodeConfig):
            raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
        self.lm, self.config = lm, config
        self._cond = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []  # the worker's
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0
        """Decode steps run so far."""
        self.rows = 0
        """Request-steps run so far (``rows / steps``: the mean batch)."""
        self.graphs = None
        """The step's ``FusionGraphs`` (``DecodeConfig.graphs`` on CUDA), else None."""
        if config.graphs and lm.device.type == "cuda":
            from chunkcache.graphs import FusionGraphs

            self.graphs = FusionGraphs()
        self._graphed: tuple[int, ...] = ()  # ids of the buffers the current graph was recorded over

    # ---- consumers ----------------------------------------------------------------------------
    def tokens(self, fused, max_new_tokens: int = 64, sampling: Sampling = Sampling()) -> Iterator[int]:
        """The answer's token ids as they are produced, for ``fused`` (a ``FuseResult``: its
        ``kv`` covers all N prompt tokens, its ``logits`` the next token). The request starts at
        the first ``next``; closing the iterator early retires it."""
        max_new_tokens = self._check(fused, max_new_tokens, sampling)

        def run() -> Iterator[int]:
            q: queue.SimpleQueue = queue.SimpleQueue()
            req = self.submit(fused, max_new_tokens, sampling, q.put)
            try:
                while (item := q.get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                req.cancel()

        return run()

    def atokens(self, fused, max_new_tokens: int = 64, sampling: Sampling = Sampling()) -> AsyncIterator[int]:
        """``tokens`` for asyncio: the event loop only awaits a queue (the request's set-up, a copy
        of its cache, runs in a worker thread); cancelling the consumer retires the request."""
        max_new_tokens = self._check(fused, max_new_tokens, sampling)

        async def run() -> AsyncIterator[int]:
            loop = asyncio.get_running_loop()
            q: asyncio.Queue = asyncio.Queue()
            started = loop.run_in_executor(
                None,
                self.submit,
                fused,
                max_new_tokens,
                sampling,
                lambda x: loop.call_soon_threadsafe(q.put_nowait, x),
            )
            try:
                req = await asyncio.shield(started)
            except asyncio.CancelledError:  # cancelled while the request was set up: retire it once it is
                started.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().cancel())
                raise
            try:
                while (item := await q.get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                req.cancel()

        return run()

    def _check(self, fused, max_new_tokens, sampling) -> int:
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
        kv, ids = fused.kv, fused.input_ids
        spec = self.lm.spec
        want = (spec.num_layers, 2, spec.kv_heads, ids.shape[1], spec.head_dim)
        if tuple(kv.shape) != want:
            raise ValueError(f"fused.kv must be {list(want)} (all prompt tokens), got {list(kv.shape)}")
        limit = getattr(self.lm.model.config, "max_position_embeddings", None)
        if limit is not None and ids.shape[1] + max_new_tokens - 1 > limit:
            raise ValueError(
                f"{ids.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the model's {limit} positions"
            )
        return max_new_tokens

    # ---- requests -----------------------------------------------------------------------------
    @torch.no_grad()
    def submit(
        self, fused, max_new_tokens: int, sampling: Sampling, emit: Callable[[object], None]
    ) -> _Request:
        """Start a request: its first token now (from ``fused.logits``), the rest from the worker.
        ``emit`` receives the token ids, then ``_END`` or an exception (from the worker's thread)."""
        max_new_tokens = self._check(fused, max_new_tokens, sampling)
        generator = sampling.generator(self.lm.device)
        first = sampling.choose(fused.logits.to(self.lm.device), generator)
        n = fused.input_ids.shape[1]
        req = _Request(None, n, first, max_new_tokens - 1, sampling, generator, emit)
        if not req.send(first) or req.left == 0 or first in sampling.eos:
            req.send(_END)
            return req
        kv = fused.kv  # [L, 2, H, N, D]
        req.buf = kv.new_zeros(*kv.shape[:3], n + req.left, kv.shape[4])
        req.buf[:, :, :, :n] = kv
        with self._cond:
            if self._closed:
                raise RuntimeError("the decoder is closed")
            self._waiting.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="chunkcache-decode", daemon=True)
                self._thread.start()
            self._cond.notify()
        return req

    def pending(self) -> int:
        """Requests admitted or waiting, not yet retired."""
        with self._cond:
            return len(self._active) + len(self._waiting)

    def close(self) -> None:
        """Stop the worker; requests not finished get a RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # ---- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                # retire what the consumers left, admit what waits (first come first served)
                self._active = [r for r in self._active if not self._retire_if_cancelled(r)]
                while not self._closed and not self._active and not self._waiting:
                    self._cond.wait()
                if self._closed:
                    for r in self._active + list(self._waiting):
                        r.buf = None
                        r.send(RuntimeError("the decoder was closed"))
                    self._active, self._waiting = [], deque()
                    return
                while self._waiting and len(self._active) < self.config.max_batch:
                    r = self._waiting.popleft()
                    if not self._retire_if_cancelled(r):
                        self._active.append(r)
                active = list(self._active)
            if not active:
                continue
            try:
                with torch.no_grad():
                    logits = self.step(active)  # [B, vocab] fp32
                    chosen = self._choose(active, logits)
            except BaseException as e:  # handed to every request of the step, the worker goes on
                with self._cond:
                    for r in active:
                        r.buf = None
                        r.send(e)
                    self._active = [r for r in self._active if r not in active]
                continue
            done = []
            for r, t in zip(active, chosen, strict=True):
                r.pos, r.token, r.left = r.pos + 1, t, r.left - 1
                if not r.send(t) or r.left == 0 or t in r.sampling.eos:
                    done.append(r)
            with self._cond:
                self.steps += 1
                self.rows += len(active)
                for r in done:
                    r.buf = None
                    r.send(_END)
                self._active = [r for r in self._active if r not in done]

    @staticmethod
    def _retire_if_cancelled(r: _Request) -> bool:
        if r.cancelled:
            r.buf = None
        return r.cancelled

    def _choose(self, active: list[_Request], logits: torch.Tensor) -> list[int]:
        """One token per row: greedy rows by one argmax, sampling rows each with its generator."""
        greedy = logits.argmax(-1).tolist()
        return [
            r.sampling.choose(logits[i], r.generator) if r.sampling.do_sample else greedy[i]
            for i, r in enumerate(active)
        ]

    def step(self, active: list[_Request]) -> torch.Tensor:
        """One decode step: each request's ``token`` at its ``pos`` through every layer, packed
        (one row each) -> fp32 logits ``[B, vocab]`` (with graphs: the graph's own tensor, read it
        before the next step). Writes each row's K/V into its buffer."""
        dev = self.lm.device
        ids = torch.tensor([r.token for r in active], device=dev)
        pos = torch.tensor([r.pos for r in active], device=dev)
        bufs = [r.buf for r in active]
        if self.graphs is None:
            return self._layers(bufs, ids, pos)
        graphed = tuple(id(b) for b in bufs)
        if graphed != self._graphed:  # another set of requests: drop the graph (it holds their buffers)
            self.graphs.clear()
            self._graphed = graphed
        try:
            return self.graphs.run(
                ("decode", len(bufs)),
                lambda ids, pos: self._layers(bufs, ids, pos),
                {"ids": ids, "pos": pos},
                reads=(self.lm.model, *bufs),
            )
        except RuntimeError as e:  # a failed capture recorded (ran) nothing: decode eagerly from now on
            import warnings

            warnings.warn(
                f"chunkcache: decode graphs off after a failed capture ({e})", RuntimeWarning, stacklevel=2
            )
            self.graphs = None
            return self._layers(bufs, ids, pos)

    def _layers(self, bufs: list[torch.Tensor], ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The step's device work (no host synchronisation: it may be recorded as a graph)."""
        lm = self.lm
        mdl = lm.model
        h = mdl.model.embed_tokens(ids)[None]  # [1, B, hidden]
        pack = Pack([Segment(b, pos[i : i + 1]) for i, b in enumerate(bufs)])
        rope = pack.rope(lm, h)  # the rows' positions: the same for every layer
        for li in range(lm.spec.num_layers):
            h = packed_layer(lm, li, h, pack, rope)
        return mdl.lm_head(mdl.model.norm(h))[0].float()
