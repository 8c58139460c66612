"""LangChain integration: a caching retriever wrapper, a fused-generation Runnable, and indexing helpers.

A usual RAG chain ``{"context": retriever | format_docs, "question": ...} | prompt | llm`` becomes
``{"context": ChunkCacheRetriever(retriever=r, engine=e), "question": ...} | ChunkCacheGenerator(engine=e)``:
the retriever returns the same Documents with their chunk key in ``metadata["chunkcache_key"]``
(precomputing any missing cache), and the generator fuses the Documents' cached KV with the
question and generates (invoke, ainvoke, batch, abatch, token streaming with stream/astream).

What it knows: LangChain's Runnable/retriever/vector-store interfaces and how they map onto the
engine's public calls (``precompute``, ``key``, ``fuse``, ``generate_from``/``stream_from``/
``agenerate_from``/``astream_from``: decoded together with other answers where the engine has
``decode_batching``). What it does not
know: fusion, keys, stores or prompt geometry -- the engine's template formats the prompt, not a
LangChain ``PromptTemplate``. The core never imports this module.

    engine = ChunkCache(model="smollm2-135m", store="cache.lmdb")
    add_documents(vector_store, docs, engine)   # index + precompute (or: CLI --emit, load_emitted)
    chain = {"context": ChunkCacheRetriever(retriever=vector_store.as_retriever(), engine=engine),
             "question": RunnablePassthrough()} | ChunkCacheGenerator(engine=engine)
    chain.invoke("Who wrote ...?")

Bad input, on purpose and documented (docs/langchain.md):
- empty retrieval: the generator answers from the question alone (plain prefill of the same
  template with no passages), or raises ``NoContextError`` with ``on_empty="raise"``;
- Documents with empty or whitespace-only ``page_content``: never cached
  (``chunkcache_key`` is None), left out of the prompt with a logged warning;
- a store whose entries were all made for another model (or dtype, codec, sink): the retriever and
  ``add_documents`` raise ``ModelMismatchError`` on first use instead of silently precomputing a
  second copy of the corpus beside them (``check_store=False`` on the retriever, ``check=False``
  on ``add_documents`` allow it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableConfig, RunnableSerializable
    from langchain_core.runnables.config import run_in_executor
    from langchain_core.vectorstores import VectorStore
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "chunkcache.integrations.langchain needs langchain-core: pip install 'chunkcache[langchain]'"
    ) from e

import torch

from chunkcache.engine import ChunkCache
from chunkcache.errors import ModelMismatchError
from chunkcache.fuse import FuseResult
from chunkcache.generation import astream_text, generate_text, stream_text

__all__ = [
    "HIT_FIELD",
    "KEY_FIELD",
    "ChunkCacheGenerator",
    "ChunkCacheRetriever",
    "NoContextError",
    "aadd_documents",
    "add_documents",
    "check_store",
    "load_emitted",
    "precompute_documents",
]

log = logging.getLogger("chunkcache.langchain")

KEY_FIELD = "chunkcache_key"
"""Document metadata field holding the chunk key (None for a Document without text)."""
HIT_FIELD = "chunkcache_hit"
"""Document metadata field: True if the cache was already stored before this retrieval."""


class NoContextError(ValueError):
    """The generator got no Document with text and was told ``on_empty="raise"``."""


# ---- shared helpers --------------------------------------------------------------------------


def _has_text(doc: Document | str) -> bool:
    text = doc if isinstance(doc, str) else doc.page_content
    return isinstance(text, str) and bool(text.strip())


def check_store(engine: ChunkCache, sample: int = 16) -> None:
    """Raise ModelMismatchError if the engine's store holds entries but none of ``sample`` sampled
    ones (headers only, ``chunkcache.store.foreign_store``) was made with this engine's key inputs
    (model fingerprint, dtype, codec, sink settings); the message names the fields that differ.

    Chunk keys hash those inputs, so such a store can never give this engine a hit: every chunk
    would be precomputed again beside the foreign ones. A store shared by several models passes as
    long as one sampled entry is this engine's; an empty store always passes.
    """
    from chunkcache.store import foreign_store

    diff = foreign_store(engine.store, engine.key_info(), sample)
    if diff is not None:
        raise ModelMismatchError(
            f"the chunk store holds caches made with other {diff} than this engine's: open the store "
            "made for this engine's settings, or pass check_store=False (ChunkCacheRetriever) / "
            "check=False (add_documents) to add this engine's caches beside them"
        )


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x))


def precompute_documents(
    engine: ChunkCache, documents: Sequence[Document], batch_size: int = 8
) -> list[Document]:
    """Copies of ``documents`` with ``metadata[KEY_FIELD]`` (and ``HIT_FIELD``) set, after making sure
    each one with text has a stored cache. Documents without text get ``KEY_FIELD: None``."""
    keys: list[str | None] = [engine.key(d.page_content) if _has_text(d) else None for d in documents]
    hits = [k is not None and engine.store.contains(k) for k in keys]
    todo = [d.page_content for d, k, hit in zip(documents, keys, hits, strict=True) if k and not hit]
    if todo:
        engine.precompute(todo, batch_size=batch_size)
    out = []
    for d, k, hit in zip(documents, keys, hits, strict=True):
        if k is None:
            log.warning("document %s has no text: not cached", d.id or d.metadata.get("source", "?"))
        out.append(Document(page_content=d.page_content, metadata={**d.metadata, KEY_FIELD: k, HIT_FIELD: hit},
                            id=d.id))  # fmt: skip
    return out


def add_documents(
    vector_store: VectorStore,
    documents: Sequence[Document],
    engine: ChunkCache,
    *,
    batch_size: int = 8,
    check: bool = True,
    **kwargs: Any,
) -> list[str]:
    """Index time: precompute the documents' chunk caches, then ``vector_store.add_documents`` them with
    the chunk key in their metadata. Returns the vector store's ids. ``kwargs`` go to the vector store.
    With ``check`` (default) a store made for another model raises ModelMismatchError (``check_store``)."""
    if check:
        check_store(engine)
    return vector_store.add_documents(
        _for_index(precompute_documents(engine, documents, batch_size)), **kwargs
    )


async def aadd_documents(
    vector_store: VectorStore,
    documents: Sequence[Document],
    engine: ChunkCache,
    *,
    batch_size: int = 8,
    check: bool = True,
    **kwargs: Any,
) -> list[str]:
    """Async ``add_documents``: precompute runs in a worker thread, then ``aadd_documents``."""
    if check:
        await run_in_executor(None, check_store, engine)
    docs = await run_in_executor(None, precompute_documents, engine, documents, batch_size)
    return await vector_store.aadd_documents(_for_index(docs), **kwargs)


def _for_index(docs: list[Document]) -> list[Document]:
    """Drop HIT_FIELD before indexing: it describes one retrieval, not the document."""
    for d in docs:
        d.metadata.pop(HIT_FIELD, None)
    return docs


def load_emitted(path: str | os.PathLike) -> list[Document]:
    """Documents from the JSONL that ``chunkcache precompute ... --emit PATH`` writes (one
    ``{"key", "source", "text"}`` per chunk), ready for ``vector_store.add_documents``: the texts are
    exactly the chunks the CLI cached, long documents already split, keys in ``metadata[KEY_FIELD]``."""
    docs = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                rec = json.loads(line)
                if not {"key", "text"} <= rec.keys():
                    raise ValueError(
                        f"{path}:{n}: not a `chunkcache precompute --emit` record (needs key, text)"
                    )
                docs.append(
                    Document(
                        page_content=rec["text"],
                        metadata={"source": rec.get("source"), KEY_FIELD: rec["key"]},
                    )
                )
    return docs


# ---- retriever ---------------------------------------------------------------------------------


class ChunkCacheRetriever(BaseRetriever):
    """Wraps any retriever: same Documents, each with a stored cache and its key in metadata.

    Missing caches are precomputed on the spot (``precompute_misses=True``, the default) so the
    generator never pays for a cold chunk at answer time; with ``precompute_misses=False`` the keys
    are recorded and misses are left to the generator. Extra invoke kwargs (``k=3``) are passed to
    the wrapped retriever.
    """

    retriever: BaseRetriever
    """The retriever whose Documents are returned."""
    engine: ChunkCache
    """The chunkcache engine (model + store) the caches are made for."""
    precompute_misses: bool = True
    """Precompute Documents whose cache is not stored yet (else only record their keys)."""
    check_store: bool = True
    """On first use, raise ModelMismatchError if the store holds only another model's caches."""
    batch_size: int = 8
    """Chunks encoded per forward pass when precomputing misses."""

    _checked: bool = False

    def _prepare(self, docs: list[Document]) -> list[Document]:
        if self.check_store and not self._checked:
            check_store(self.engine)
            self._checked = True
        if self.precompute_misses:
            return precompute_documents(self.engine, docs, batch_size=self.batch_size)
        keys = [self.engine.key(d.page_content) if _has_text(d) else None for d in docs]
        return [Document(page_content=d.page_content, id=d.id,
                         metadata={**d.metadata, KEY_FIELD: k, HIT_FIELD: k is not None and self.engine.store.contains(k)})
                for d, k in zip(docs, keys, strict=True)]  # fmt: skip

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        docs = self.retriever.invoke(query, {"callbacks": run_manager.get_child()}, **kwargs)
        return self._prepare(docs)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        docs = await self.retriever.ainvoke(query, {"callbacks": run_manager.get_child()}, **kwargs)
        return await run_in_executor(None, self._prepare, docs)


# ---- generator ---------------------------------------------------------------------------------


class ChunkCacheGenerator(RunnableSerializable[dict, str]):
    """``{"question": str, "context": [Document, ...]} -> answer str``, generated from fused caches.

    Replaces ``format_docs | prompt | llm | StrOutputParser()`` of a usual chain: the engine's
    template lays out the passages (one chunk per Document, in the given order) and the question.
    invoke/batch/stream and their async forms are supported; ``stream`` yields text pieces as the
    model produces them. Any number of calls may run at once (``batch`` runs them in threads,
    ``abatch`` as asyncio tasks whose blocking work runs in worker threads); each answer equals
    its own ``invoke``.
    """

    engine: ChunkCache
    """The chunkcache engine (model + store)."""
    max_new_tokens: int = 64
    """Longest answer in tokens."""
    recompute_ratio: float | None = None
    """Fraction of chunk tokens recomputed; None: the engine's default."""
    policy: str | None = None
    """Selection policy name; None: the engine's default."""
    generate_kwargs: dict[str, Any] = {}
    """Extra ``model.generate`` arguments (greedy by default: ``do_sample=False``)."""
    question_key: str = "question"
    """Input field holding the question."""
    context_key: str = "context"
    """Input field holding the retrieved Documents (or plain strings)."""
    on_empty: Literal["generate", "raise"] = "generate"
    """No Document with text: answer from the question alone (plain prefill), or raise NoContextError."""

    model_config = {"arbitrary_types_allowed": True}

    def model_post_init(self, context: Any) -> None:
        """Check the settings at construction, not at the first question."""
        from chunkcache import checks
        from chunkcache.select import POLICIES

        if self.recompute_ratio is not None:
            checks.ratio(self.recompute_ratio)
        if self.policy is not None and self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {sorted(POLICIES)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens}")

    # -- input ------------------------------------------------------------------------------------
    def _parse(self, input: Any) -> tuple[str, list[str]]:
        if not isinstance(input, dict):
            raise TypeError(
                f"ChunkCacheGenerator takes a dict with {self.question_key!r} and {self.context_key!r}, "
                f"got {type(input).__name__}"
            )
        question = input.get(self.question_key)
        if not isinstance(question, str):
            raise TypeError(
                f"input[{self.question_key!r}] must be the question string, got {type(question).__name__}"
            )
        context = input.get(self.context_key, [])
        if isinstance(context, str) or not isinstance(context, Sequence):
            raise TypeError(
                f"input[{self.context_key!r}] must be a list of Documents (do not format them into one "
                f"string: each Document is one cached chunk), got {type(context).__name__}"
            )
        texts = []
        for d in context:
            if not isinstance(d, Document | str):
                raise TypeError(f"context items must be Documents or strings, got {type(d).__name__}")
            if _has_text(d):
                texts.append(d if isinstance(d, str) else d.page_content)
            else:
                log.warning("skipping a context document without text")
        if not texts and self.on_empty == "raise":
            raise NoContextError("no retrieved document has text to answer from (on_empty='raise')")
        return question, texts

    # -- the one place that touches the model -------------------------------------------------------
    def _prompt(self, question: str, texts: list[str]) -> FuseResult | torch.Tensor:
        """The fused prompt, or without passages the prompt ids ``[1, N]`` alone (plain prefill)."""
        eng = self.engine
        if not texts:
            log.info("no passages: answering from the question alone (plain prefill)")
            return eng.prompt_ids([], question)
        return eng.fuse(texts, question, recompute_ratio=self.recompute_ratio, policy=self.policy)

    def _answer(self, input: dict) -> str:
        p = self._prompt(*self._parse(input))
        if isinstance(p, torch.Tensor):
            return generate_text(self.engine.lm, p, {}, self.max_new_tokens, **self.generate_kwargs)
        return self.engine.generate_from(p, self.max_new_tokens, **self.generate_kwargs)

    async def _aanswer(self, input: dict) -> str:
        p = await asyncio.to_thread(lambda: self._prompt(*self._parse(input)))
        if isinstance(p, torch.Tensor):
            return await asyncio.to_thread(
                generate_text, self.engine.lm, p, {}, self.max_new_tokens, **self.generate_kwargs
            )
        return await self.engine.agenerate_from(p, self.max_new_tokens, **self.generate_kwargs)

    def _tokens(self, input: dict) -> Iterator[str]:
        """Yield answer text as it is generated (``engine.stream_from``). The pieces join to
        ``_answer``'s text, apart from its final strip of trailing whitespace."""
        p = self._prompt(*self._parse(input))
        if isinstance(p, torch.Tensor):
            yield from stream_text(self.engine.lm, p, {}, self.max_new_tokens, **self.generate_kwargs)
        else:
            yield from self.engine.stream_from(p, self.max_new_tokens, **self.generate_kwargs)

    # -- Runnable interface -------------------------------------------------------------------------
    def invoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> str:
        return self._call_with_config(self._answer, input, config)

    async def ainvoke(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> str:
        return await self._acall_with_config(self._aanswer, input, config)

    def transform(
        self, input: Iterator[dict], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[str]:
        yield from self._transform_stream_with_config(input, self._transform, config)

    def stream(self, input: dict, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[str]:
        yield from self.transform(iter([input]), config)

    def _transform(self, chunks: Iterator[dict]) -> Iterator[str]:
        yield from self._tokens(_merge(chunks))

    async def atransform(
        self, input: AsyncIterator[dict], config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[str]:
        async for piece in self._atransform_stream_with_config(input, self._atransform, config):
            yield piece

    async def astream(
        self, input: dict, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[str]:
        async def one() -> AsyncIterator[dict]:
            yield input

        async for piece in self.atransform(one(), config):
            yield piece

    async def _atransform(self, chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
        parts = [c async for c in chunks]
        question, texts = self._parse(_merge(iter(parts)))
        p = await asyncio.to_thread(self._prompt, question, texts)
        if isinstance(p, torch.Tensor):
            pieces = astream_text(self.engine.lm, p, {}, self.max_new_tokens, **self.generate_kwargs)
        else:
            pieces = self.engine.astream_from(p, self.max_new_tokens, **self.generate_kwargs)
        async for piece in pieces:
            yield piece


def _merge(chunks: Iterator[dict]) -> dict:
    """Combine streamed input pieces (RunnableParallel emits one dict per branch) into one input."""
    merged: dict = {}
    for c in chunks:
        if not isinstance(c, dict):
            raise TypeError(f"ChunkCacheGenerator takes a dict input, got {type(c).__name__}")
        merged.update(c)
    return merged
