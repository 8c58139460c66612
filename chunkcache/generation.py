"""Answer generation from a prompt and its cache: whole, streamed to an iterator, or streamed to
asyncio, with the engine's greedy defaults.

``model.generate`` blocks, so streaming runs it on a worker thread that pushes text pieces (the
tokenizer's incremental decode, ``transformers.TextStreamer``) to the consumer: a queue for the
iterator form, ``loop.call_soon_threadsafe`` for the async form, which never blocks the event
loop. A consumer that stops early (closes the iterator, or is cancelled) stops the generation at
its next step.

What it knows: ``model.generate`` and its streamer and stopping hooks. What it does not know:
fusion, caches' contents, prompts.

    text = generate_text(lm, ids, cache_kw, max_new_tokens=32)
    for piece in stream_text(lm, ids, cache_kw): ...
    async for piece in astream_text(lm, ids, cache_kw): ...
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import torch

from chunkcache.model import LoadedModel

__all__ = ["astream_text", "generate_defaults", "generate_text", "stream_text"]


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
    return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


_END = object()


def _start(lm: LoadedModel, ids, cache_kw, max_new_tokens, kwargs, emit: Callable[[object], None]):
    """Run generate on a worker thread; ``emit(piece)`` per text piece, then ``emit(_END)`` or
    ``emit(exception)``. Returns (thread, stop event)."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

    stop = threading.Event()

    class _Pieces(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emit(text)

    class _Stop(StoppingCriteria):  # an abandoned stream ends the generation at its next step
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    streamer = _Pieces(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
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
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
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
    started = False
    try:
        while (item := await q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            if not started:
                item = item.lstrip()
                started = bool(item)
            if item:
                yield item
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
