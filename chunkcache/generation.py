"""Answer generation from a prompt and its cache: whole, streamed to an iterator, or streamed to
asyncio, with the engine's greedy defaults.

``model.generate`` blocks, so streaming runs it on a worker thread that pushes text pieces (the
tokenizer's incremental decode, ``transformers.TextStreamer``) to the consumer: a queue for the
iterator form, ``loop.call_soon_threadsafe`` for the async form, which never blocks the event
loop. A consumer that stops early (closes the iterator, or is cancelled) stops the generation at
its next step. ``token_text``/``atoken_text`` cut a stream of token ids (the batched decoder's,
``chunkcache.decode``) into the same pieces, and ``answer_text`` decodes a whole answer as
``generate_text`` does.

What it knows: ``model.generate`` and its streamer and stopping hooks. What it does not know:
fusion, caches' contents, prompts.

    text = generate_text(lm, ids, cache_kw, max_new_tokens=32)
    for piece in stream_text(lm, ids, cache_kw): ...
    async for piece in astream_text(lm, ids, cache_kw): ...
    for piece in token_text(tokenizer, decoder.tokens(fused, 32)): ...
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

import torch

from chunkcache.model import LoadedModel

__all__ = [
    "answer_text",
    "astream_text",
    "atoken_text",
    "generate_defaults",
    "generate_text",
    "stream_text",
    "token_text",
]


def generate_defaults(tokenizer) -> dict:
    """Greedy decoding; pad with the tokenizer's pad id (0 is a valid id), else its eos."""
    pad = tokenizer.pad_token_id
    return {"do_sample": False, "pad_token_id": pad if pad is not None else tokenizer.eos_token_id}


@torch.no_grad()
def generate_text(
    lm: LoadedModel, ids: torch.Tensor, cache_kw: dict, max_new_tokens: int = 64, **kwargs
) -> str:
    """The answer to ``ids`` ``[1, N]`` (``cache_kw``: the cache argument covering ``ids[:, :-1]``,
    or {} for a plain prefill)."""
    gen = {**generate_defaults(lm.tokenizer), **kwargs}
    ids = ids.to(lm.device)
    out = lm.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kw, max_new_tokens=max_new_tokens, **gen
    )
    return answer_text(lm.tokenizer, out[0, ids.shape[1] :])


def answer_text(tokenizer, tokens: Iterable[int] | torch.Tensor) -> str:
    """The answer's text from its token ids: special tokens dropped, whitespace stripped."""
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _streamer(tokenizer, emit: Callable[[str], None], skip_prompt: bool):
    """A ``TextStreamer`` handing each finalised text piece to ``emit`` (special tokens dropped)."""
    from transformers import TextStreamer

    class _Pieces(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emit(text)

    return _Pieces(tokenizer, skip_prompt=skip_prompt, skip_special_tokens=True)


class _Leading:
    """Drops the answer's leading whitespace (``generate_text`` strips it), keeps everything else."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        return piece


_END = object()


def _start(lm: LoadedModel, ids, cache_kw, max_new_tokens, kwargs, emit: Callable[[object], None]):
    """Run generate on a worker thread; ``emit(piece)`` per text piece, then ``emit(_END)`` or
    ``emit(exception)``. Returns (thread, stop event)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stop = threading.Event()

    class _Stop(StoppingCriteria):  # an abandoned stream ends the generation at its next step
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    streamer = _streamer(lm.tokenizer, emit, skip_prompt=True)
    gen = {**generate_defaults(lm.tokenizer), **kwargs}
    ids = ids.to(lm.device)

    def work() -> None:
        try:
            with torch.no_grad():
                lm.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), **cache_kw,
                    max_new_tokens=max_new_tokens, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Stop()]), **gen,
                )  # fmt: skip
        except BaseException as e:  # handed to the consumer
            emit(e)
            return
        emit(_END)

    thread = threading.Thread(target=work, name="chunkcache-generate", daemon=True)
    thread.start()
    return thread, stop


def _strip_start(pieces: Iterator[str]) -> Iterator[str]:
    """Drop the answer's leading whitespace (``generate_text`` strips it), keep everything else."""
    lead = _Leading()
    for piece in pieces:
        if piece := lead(piece):
            yield piece


def stream_text(
    lm: LoadedModel, ids: torch.Tensor, cache_kw: dict, max_new_tokens: int = 64, **kwargs
) -> Iterator[str]:
    """Text pieces as they are generated; joined, they equal ``generate_text``'s answer up to its
    trailing whitespace. Closing the iterator early stops the generation."""
    q: queue.SimpleQueue = queue.SimpleQueue()
    thread, stop = _start(lm, ids, cache_kw, max_new_tokens, kwargs, q.put)

    def pieces() -> Iterator[str]:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    try:
        yield from _strip_start(pieces())
    finally:
        stop.set()
        thread.join()


async def astream_text(
    lm: LoadedModel, ids: torch.Tensor, cache_kw: dict, max_new_tokens: int = 64, **kwargs
) -> AsyncIterator[str]:
    """``stream_text`` for asyncio: the event loop only ever awaits a queue."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    thread, stop = _start(
        lm, ids, cache_kw, max_new_tokens, kwargs, lambda x: loop.call_soon_threadsafe(q.put_nowait, x)
    )
    lead = _Leading()
    try:
        while (item := await q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            if item := lead(item):
                yield item
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)


class _TokenPieces:
    """The text cutting of ``token_text``/``atoken_text``: feed token ids, get the pieces ready."""

    def __init__(self, tokenizer) -> None:
        self.out: list[str] = []
        self.streamer = _streamer(tokenizer, self.out.append, skip_prompt=False)
        self.lead = _Leading()

    def _ready(self) -> list[str]:
        pieces = [p for p in map(self.lead, self.out) if p]
        self.out.clear()
        return pieces

    def push(self, token: int) -> list[str]:
        self.streamer.put(torch.tensor([token]))
        return self._ready()

    def end(self) -> list[str]:
        self.streamer.end()
        return self._ready()


def token_text(tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """Text pieces of a stream of token ids, cut as ``stream_text`` cuts them; joined, they equal
    ``answer_text`` of the ids up to its trailing whitespace. Closing it closes ``tokens``."""
    cut = _TokenPieces(tokenizer)
    try:
        for t in tokens:
            yield from cut.push(t)
        yield from cut.end()
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()


async def atoken_text(tokenizer, tokens: AsyncIterator[int]) -> AsyncIterator[str]:
    """``token_text`` for an async stream of token ids (the incremental decode of one token costs
    microseconds, so it runs on the event loop)."""
    cut = _TokenPieces(tokenizer)
    try:
        async for t in tokens:
            for piece in cut.push(t):
                yield piece
        for piece in cut.end():
            yield piece
    finally:
        close = getattr(tokens, "aclose", None)
        if close is not None:
            await close()
