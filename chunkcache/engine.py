"""ChunkCache: the user-facing engine tying model, template, precompute, store and fusion together.

What it knows: the order of operations (tokenise -> look up -> precompute misses -> fuse ->
generate); on CUDA, fusing streams the stored entries through ``pipeline.fuse_entries`` (the
fast path), elsewhere it decodes them and calls ``fuse.fuse_kv``. What it does not know: the
maths of fusion (``fuse``), token selection (``select``), bytes on disk (``format``, ``store``).

    engine = ChunkCache(model="smollm2-135m", store=None)     # store="path/to/dir" for LMDB
    engine.precompute(["passage one ...", "passage two ..."])
    print(engine.generate(["passage two ...", "passage one ..."], "question?", max_new_tokens=32))

Concurrency: any number of threads (and asyncio tasks, through ``afuse``/``agenerate``/
``astream_generate``) may call one engine at once, and each result equals the same call made
alone. Lazy state is built once under a lock; tokeniser calls are serialised (Hugging Face fast
tokenizers are not safe to call from several threads); each fast-path fusion holds a ``Staging``
of its own from a pool (``concurrent_fusions`` of them, graphs included); store writes wait for
fusions holding zero-copy views of the store's map (a write may grow and move the map).
Chunk texts seen before are resolved by the text index (``textindex``), not the tokeniser.
With ``decode_batching=DecodeConfig(...)`` the answers of concurrent calls decode together, one
batched step for all active requests (``chunkcache.decode``); without it (the default) each
answer decodes alone through ``model.generate``. With ``batching=BatchConfig(...)`` concurrent
fusions are fused together: each caller checks, looks up, loads and assembles its request on its
own thread, then one worker fuses the waiting requests in one pass per layer (``batch``); results
equal the same call alone to the last bits of fp32 GEMMs (``batch.fuse_many``).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch

from chunkcache import checks
from chunkcache.batch import BatchConfig, Batcher, BatchRetry
from chunkcache.decode import DecodeConfig, Decoder, Sampling, check_max_new_tokens, sampling_from
from chunkcache.errors import CorruptEntryError, ForeignEntryError, ModelMismatchError, StoreError
from chunkcache.format import FORMAT_VERSION
from chunkcache.fuse import (
    FuseConfig,
    FuseResult,
    assembled_job,
    fuse_kv,
    graph_shapes,
    run_job,
    warmup_points,
)
from chunkcache.generation import (
    answer_text,
    astream_text,
    atoken_text,
    generate_text,
    stream_text,
    token_text,
)
from chunkcache.keys import KeyInputs, token_bytes
from chunkcache.layout import ChunkKV
from chunkcache.model import DEFAULT_MODEL, LoadedModel, cache_kwarg, load_model, wrap_model
from chunkcache.precompute import SCORES_VERSION, encode_chunks, encode_prefix
from chunkcache.template import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, PromptTemplate

log = logging.getLogger("chunkcache")


SINKS = ("bos", "prefix", "context")
"""The sink kinds ``PrecomputeConfig.sink`` takes."""


@dataclass(frozen=True)
class PrecomputeConfig:
    """What changes the bytes of a precomputed chunk cache (part of every key)."""

    sink: str = "prefix"
    """What the chunk is encoded behind (``PromptTemplate.sink_ids``): the template ``prefix``
    (default; measured to fuse better than ``bos``, see BENCHMARKS.md), ``bos`` (one token;
    caches then survive a change of the instruction or system prompt), or ``context`` (the
    prefix and a few passages, ``context``: every chunk is encoded as a later passage, as fusion
    places all but the first; none is then exact in the prompt unless ``exact_first``)."""
    context: tuple[str, ...] | Callable[[str], Sequence[str]] | None = None
    """With ``sink="context"``: the passages it is made of (None: ``CONTEXT_SINK_PASSAGES``), e.g.
    a few typical passages of the corpus; or a function of the chunk's text giving the passages
    that chunk is encoded behind (each chunk its own context, e.g. its nearest corpus passages:
    ``corpus.Neighbours``; it must be deterministic: the context is part of the chunk's key, and
    it is called once per chunk text an engine meets). Only for that sink."""
    exact_first: bool = False
    """With ``sink="context"``: each chunk is also stored behind the prefix alone (the entry a
    ``prefix``-sink engine stores, under its key), and a prompt's first chunk is fused from that
    one, so its K/V are a full prefill's (``fuse.exact_chunks``) while every later chunk keeps the
    context. Twice the precompute and the stored bytes. Not in the keys: it changes which entries
    are made, not their bytes."""
    token_scores: bool = False
    """Store each chunk with a per-token context-impact score (``precompute.impact_scores``: the
    attention each token receives from its chunk, from the encoding's own forward pass), which
    the ``qimpact`` policy turns into per-chunk budgets. Part of the keys (``SCORES_VERSION``):
    entries with and without scores are different entries. Off by default: keys stay as they were."""

    def __post_init__(self) -> None:
        if self.sink not in SINKS:
            raise ValueError(f"sink must be one of {', '.join(map(repr, SINKS))}, got {self.sink!r}")
        if self.context is not None:
            if self.sink != "context":
                raise ValueError(f"sink_context is only for sink='context', got sink={self.sink!r}")
            if not callable(self.context) and (
                isinstance(self.context, str)
                or not self.context
                or not all(isinstance(t, str) and t.strip() for t in self.context)
            ):
                raise ValueError(
                    "sink_context must be a non-empty list of non-empty passage strings, or a function "
                    "of a chunk's text giving such a list"
                )
        if not isinstance(self.exact_first, bool):
            raise TypeError(f"exact_first must be a bool, got {type(self.exact_first).__name__}")
        if not isinstance(self.token_scores, bool):
            raise TypeError(f"token_scores must be a bool, got {type(self.token_scores).__name__}")
        if self.exact_first and self.sink != "context":
            raise ValueError(f"exact_first is only for sink='context' (the first chunk behind the "
                             f"{self.sink!r} sink is exact already)")  # fmt: skip

    @property
    def default_policy(self) -> str:
        """The selection policy of an engine with these settings where none is given: ``qvalue``
        with ``exact_first`` (the first chunk is exact: qvalue spends nothing on it, and over
        nearest-passage contexts it beat qfast at equal compute on every set measured,
        bench_results/session10/fidelity/NOTES.md section 5), else ``qfast``."""
        return "qvalue" if self.exact_first else "qfast"

    def variants(self) -> tuple[PrecomputeConfig, ...]:
        """The encodings each chunk is stored in: these settings, then (``exact_first``) the
        ``prefix`` sink's, which a prompt's first chunk is fused from."""
        return (self, PrecomputeConfig(token_scores=self.token_scores)) if self.exact_first else (self,)

    @property
    def per_chunk(self) -> bool:
        """Whether each chunk has a context of its own (``context`` is a function)."""
        return callable(self.context)

    def context_of(self, text: str) -> tuple[str, ...]:
        """With a per-chunk context: the passages the chunk ``text`` is encoded behind (none: the
        prefix alone)."""
        passages = self.context(text)  # type: ignore[operator]
        if isinstance(passages, str) or not all(isinstance(t, str) and t.strip() for t in passages):
            raise ValueError(f"sink_context({text[:40]!r}...) must give a list of non-empty passage strings")
        return tuple(passages)

    def sink_ids(self, template: PromptTemplate, passages: tuple[str, ...] | None = None) -> list[int]:
        """The tokens a chunk is encoded behind (``PromptTemplate.sink_ids``); with a per-chunk
        context, behind ``passages`` (``context_of`` the chunk)."""
        if self.context is None:
            return template.sink_ids(self.sink)
        if self.per_chunk and passages is None:
            raise ValueError("a per-chunk sink_context needs the chunk's passages (context_of)")
        return template.sink_ids(self.sink, tuple(self.context) if passages is None else passages)


@dataclass(frozen=True)
class _Variant:
    """One encoding a chunk is stored in (``PrecomputeConfig.variants``): what it is encoded behind
    and the key inputs its entries hold."""

    settings: PrecomputeConfig
    sink_ids: tuple[int, ...] | None  # None: each chunk its own (a per-chunk context)
    inputs: KeyInputs  # (per-chunk: each chunk's are these with its own sink_ids)
    info: dict  # inputs.to_dict(), as entry headers store it (shared: never modify it)


class ChunkCache:
    """Precompute, persist and fuse chunk KV caches for one model."""

    def __init__(
        self,
        model: str | torch.nn.Module = DEFAULT_MODEL,
        store=None,
        *,
        tokenizer=None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        codec: str = "raw",
        sink: str = "prefix",
        sink_context: Sequence[str] | Callable[[str], Sequence[str]] | None = None,
        exact_first: bool = False,
        token_scores: bool = False,
        policy: str | None = None,
        recompute_ratio: float = 0.15,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = DEFAULT_SYSTEM,
        fast_path: bool | None = None,
        concurrent_fusions: int = 1,
        adaptive=None,
        readonly: bool = False,
        decode_batching: DecodeConfig | None = None,
        device_cache_bytes: int = 0,
        batching: BatchConfig | None = None,
    ) -> None:
        # Every argument is checked before the model loads (seconds) or the store opens.
        dtype = checks.dtype(dtype)
        device = checks.device(device)
        if sink_context is not None and not callable(sink_context) and not isinstance(sink_context, str):
            sink_context = tuple(sink_context)
        settings = PrecomputeConfig(
            sink=sink, context=sink_context, exact_first=exact_first, token_scores=token_scores
        )
        default_fuse = FuseConfig(  # no policy given: the settings' (``PrecomputeConfig.default_policy``)
            recompute_ratio=checks.ratio(recompute_ratio), policy=policy or settings.default_policy
        )
        if adaptive is not None and (settings.exact_first or settings.per_chunk):
            # (its planner fetches one variant of every chunk, keyed by the engine's key inputs)
            raise ValueError(
                "exact_first and a per-chunk sink_context do not combine with adaptive loading yet"
            )
        checks.codec(codec)
        checks.nonnegative_int(device_cache_bytes, "device_cache_bytes")
        if decode_batching is not None and not isinstance(decode_batching, DecodeConfig):
            raise TypeError(
                f"decode_batching must be a DecodeConfig or None, got {type(decode_batching).__name__}"
            )
        if batching is not None and not isinstance(batching, BatchConfig):
            raise TypeError(f"batching must be a BatchConfig or None, got {type(batching).__name__}")
        if not readonly:  # a store this user may not write is opened read-only (LMDBStore)
            checks.store_writable(store)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if isinstance(model, str):
            self.lm: LoadedModel = load_model(model, dtype=dtype, device=device)
        else:
            if tokenizer is None:
                raise ValueError("pass tokenizer= with a model object")
            self.lm = wrap_model(model, tokenizer)
        self.template = PromptTemplate.from_tokenizer(
            self.lm.tokenizer, instruction=instruction, system=system
        )
        self.settings = settings
        self.default_fuse = default_fuse
        self.codec = codec
        self.store = _open_store(store, readonly)
        self._prefix_ids = self.template.prefix_ids()
        self._prefix_kv: torch.Tensor | None = None
        self._variants: tuple[_Variant, ...] | None = None
        self._contexts: dict[bytes, tuple[tuple[int, ...], KeyInputs, dict]] = {}
        """Per-chunk contexts: token bytes -> (sink ids, key inputs, their dict), filled by ``resolve``."""
        self.adaptive = adaptive
        """An ``adaptive.AdaptiveConfig``: per query, fetch the back chunks (at which stored
        precision) while the front ones are recomputed in place, or do a full prefill, from the
        measured link, recompute and fusion rates (``res.stats["adaptive"]`` says what and why).
        None: always fetch (and stream through the fast path)."""
        self.precisions: tuple[str, ...] = (codec,)
        """The codecs each chunk is stored in: the engine's, then ``adaptive.precisions`` (when
        adaptive loading is on)."""
        if adaptive is not None:
            from chunkcache.adaptive import AdaptiveConfig, Rates

            if not isinstance(adaptive, AdaptiveConfig):
                raise TypeError(f"adaptive must be an AdaptiveConfig or None, got {type(adaptive).__name__}")
            self._rates = Rates(adaptive.smoothing)
            self._sizes: dict[tuple[str, int], int] = {}
            if adaptive.enabled:
                self.precisions = tuple(dict.fromkeys((codec, *adaptive.precisions)))
        self.fast_path = self.lm.device.type == "cuda" if fast_path is None else fast_path
        """Fuse stored entries through ``pipeline.fuse_entries`` (layer-wise streaming, one kernel per
        layer, GPU-side checksums, CUDA graphs): the default on CUDA."""
        if concurrent_fusions < 1:
            raise ValueError(f"concurrent_fusions must be at least 1, got {concurrent_fusions}")
        self.concurrent_fusions = concurrent_fusions
        """Fast-path fusions that may run at once (each holds a ``Staging``: slots, streams, graphs
        and their padded KV buffer); further callers wait. One keeps the GPU busy already at 8K."""
        self.device_cache = None
        """A ``devicecache.DeviceCache`` of ``device_cache_bytes`` (0: none): the fast path keeps
        the entries it fused, once verified, on the device in their stored format, and takes them
        from there next time (no store read, header parse or host-to-device copy; the same result
        bit for bit). ``res.stats["device_cache"]`` counts hits and admissions per fusion."""
        if device_cache_bytes:
            from chunkcache.devicecache import DeviceCache

            self.device_cache = DeviceCache(self.lm.device, device_cache_bytes)
        self._lock = threading.Lock()  # lazy state: key info, prefix KV, staging pool, text index
        self._verified: dict[str, int] = {}  # key -> digest of the header and tokens that passed
        self._verified_lock = threading.Lock()  # (``_check_entry``; most recent ``_VERIFIED_MAX``)
        self._tok_lock = threading.Lock()  # tokenizer calls
        self._pool = None
        self._index = None
        self._inflight: dict[str, threading.Event] = {}  # keys being encoded -> set when stored
        self._behind = None  # the writer thread of misses written behind (``_write_behind``)
        self._behind_q: queue.Queue | None = None
        self._gate_passed = False
        self._gate_lock = threading.Lock()
        self._warned: set[str] = set()  # one warning per kind (failed writes, a foreign store)
        self.decode_batching = decode_batching
        """A ``decode.DecodeConfig``: answers decode together through one ``decode.Decoder`` (a
        worker thread steps all active requests at once). None: each through ``model.generate``."""
        self._decoder: Decoder | None = None
        self.batching = batching
        """A ``batch.BatchConfig``: concurrent fusions wait in one queue and a worker thread fuses
        them together (``batch.Batcher``). None: each caller fuses on its own thread."""
        self._batcher: Batcher | None = None

    # ---- accessors ------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    # ---- keys and storage -------------------------------------------------------------------
    def variants(self) -> tuple[_Variant, ...]:
        """The encodings each chunk is stored in (``PrecomputeConfig.variants``): the engine's
        (index 0), then with ``exact_first`` the prefix sink's (index 1, for a prompt's first
        chunk). Fixed for the engine's life, built once (two threads racing here build equal values)."""
        if self._variants is None:
            out = []
            for settings in self.settings.variants():
                sink_ids = None
                if not settings.per_chunk:
                    with self._tok_lock:
                        sink_ids = tuple(settings.sink_ids(self.template))
                inputs = self._inputs_for(settings, sink_ids)
                out.append(_Variant(settings, sink_ids, inputs, inputs.to_dict()))
            self._variants = tuple(out)
        return self._variants

    def _inputs_for(self, settings: PrecomputeConfig, sink_ids: Sequence[int] | None) -> KeyInputs:
        keyed = {"sink": settings.sink, "sink_ids": None if sink_ids is None else list(sink_ids)}
        if settings.token_scores:  # (only when on: the keys of engines without scores are unchanged)
            keyed["token_scores"] = SCORES_VERSION
        return KeyInputs(
            model_fingerprint=self.lm.fingerprint,
            dtype=str(self.lm.dtype).removeprefix("torch."),
            codec=self.codec,
            settings=keyed,
            format_version=FORMAT_VERSION,
        )

    def _of(
        self, variant: int, ids: Sequence[int] | np.ndarray | bytes
    ) -> tuple[tuple[int, ...], KeyInputs, dict]:
        """A chunk's (sink ids, key inputs, their dict) in ``variant``: the variant's own, or with a
        per-chunk context the chunk's, recorded when ``resolve`` met its text."""
        var = self.variants()[variant]
        if var.sink_ids is not None:
            return var.sink_ids, var.inputs, var.info
        got = self._contexts.get(ids if isinstance(ids, bytes) else token_bytes(ids))
        if got is None:
            raise ValueError(
                "this chunk's context is not known: with a per-chunk sink_context, pass chunk texts "
                "(precompute, fuse), not token ids"
            )
        return got

    def key_inputs(self) -> KeyInputs:
        """Everything besides the token ids that determines a chunk cache's bytes (the engine's
        own variant: every chunk's but a prompt's first one under ``exact_first``; with a
        per-chunk context, its ``sink_ids`` are None: each chunk's key holds its own)."""
        return self.variants()[0].inputs

    def key_info(self) -> dict:
        """``key_inputs()`` in its JSON-safe form, as entry headers store it (a fresh copy each call)."""
        return self.key_inputs().to_dict()

    def key_inputs_at(self, codec: str) -> KeyInputs:
        """``key_inputs()`` for another of ``precisions`` (the same chunk stored in that codec is
        a separate entry under its own key)."""
        return self.key_inputs() if codec == self.codec else replace(self.key_inputs(), codec=codec)

    def _info(self) -> dict:
        """``key_info`` itself (not a copy: never modify it)."""
        return self.variants()[0].info

    def _prompt_keys(self, keys: list[str], ids: list[bytes]) -> tuple[list[str], list[dict]]:
        """The entries a prompt of these chunks fuses from, and the key inputs each must hold:
        the engine's variant of every chunk, but under ``exact_first`` the prefix sink's of the
        first (its key from its ids: one hash)."""
        v = self.variants()
        infos = [self._of(0, i)[2] for i in ids]
        if len(v) > 1 and keys:
            keys = [v[1].inputs.key(np.frombuffer(ids[0], "<i8")), *keys[1:]]
            infos = [v[1].info, *infos[1:]]
        return keys, infos

    def key_for_ids(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._of(0, ids)[1].key(ids)

    def key(self, text: str) -> str:
        return self.resolve([text])[0][0]

    def contains(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text's caches (every variant) are in the store (no decoding, no hit counted)."""
        keys, ids = self.resolve(texts)
        there = self.store.contains_many(keys)
        for var in self.variants()[1:]:
            more = self.store.contains_many([var.inputs.key(np.frombuffer(b, "<i8")) for b in ids])
            there = [x and y for x, y in zip(there, more, strict=True)]
        return there

    def resolve(self, texts: Sequence[str]) -> tuple[list[str], list[bytes]]:
        """Each chunk text's key and token ids (little-endian int64 bytes): from the text index,
        tokenising only texts it has not seen (then recorded). An index record is checked against
        the entry's stored token ids wherever the entry is used (``_check_entry``)."""
        for t in texts:
            _check_text(t)
        index = self.text_index()
        recs = index.get_many(texts)
        new = []
        per_chunk = self.variants()[0].sink_ids is None
        for i, (t, rec) in enumerate(zip(texts, recs, strict=True)):
            if per_chunk and (rec is None or rec[1] not in self._contexts):
                # the chunk's own context, once per text in the engine's life; its key follows
                ids = self._chunk_ids(t) if rec is None else np.frombuffer(rec[1], "<i8").tolist()
                passages = self.settings.context_of(t)  # (the user's function: outside the lock)
                with self._tok_lock:
                    sink = tuple(self.settings.sink_ids(self.template, passages))
                inputs = self._inputs_for(self.settings, sink)
                self._contexts[token_bytes(ids)] = (sink, inputs, inputs.to_dict())
                if rec is not None and rec[0] != inputs.key(ids):
                    rec = None  # recorded under another context (another function): record it anew
                if rec is None:
                    recs[i] = rec = (inputs.key(ids), token_bytes(ids))
                    new.append((t, *rec))
            if rec is None:
                ids = self._chunk_ids(t)
                recs[i] = rec = (self.key_for_ids(ids), token_bytes(ids))
                new.append((t, *rec))
        index.put_many(new)
        return [r[0] for r in recs], [r[1] for r in recs]  # type: ignore[index]

    def text_index(self):
        """The ``textindex.TextIndex`` of this engine's namespace (tokenizer, template, key inputs),
        persisted beside an LMDB store, in memory otherwise."""
        if self._index is None:
            with self._lock:
                if self._index is None:
                    self._index = self._open_index()
        return self._index

    def _open_index(self):
        from chunkcache.keys import canonical_json
        from chunkcache.store import LMDBStore
        from chunkcache.textindex import TextIndex, tokenizer_fingerprint

        with self._tok_lock:
            tok = tokenizer_fingerprint(self.tokenizer)
        namespace = canonical_json(
            {"tokenizer": tok, "chunk_format": self.template.chunk_format, "key": self._info()}
        ).encode()
        path, readonly = None, False
        if isinstance(self.store, LMDBStore):
            path, readonly = self.store.path, self.store.readonly
        return TextIndex(namespace, path, readonly=readonly)

    def _chunk_ids(self, text: str) -> list[int]:
        _check_text(text)
        with self._tok_lock:
            return self.template.chunk_ids(text)

    def _suffix_ids(self, query: str) -> list[int]:
        with self._tok_lock:
            return self.template.suffix_ids(query)

    def _load(
        self, key: str, ids: Sequence[int] | bytes | None = None, info: dict | None = None
    ) -> ChunkKV | None:
        """The stored chunk under ``key`` or None. A damaged entry, or one that is not this
        engine's (``_check_entry``, against ``info``: default the engine's variant), is dropped
        with a warning and reads as a miss: the caller recomputes it and stores it under this
        engine's key, so it never blocks the chunk."""
        from chunkcache.format import load_chunk

        return load_chunk(
            self.store,
            key,
            self.lm.dtype,
            check=lambda h, c: self._check_entry(key, h, c.token_ids, ids, info),
            drop=self._drop,
        )

    def _drop(self, key: str, reason: str) -> None:
        """``format.drop_damaged``. Other fusions may hold views of the entry meanwhile: a store
        that yields views keeps what they point to in place until they are let go (LMDB: their
        read transaction's snapshot; a map that must grow waits for them, ``LMDBStore._MapLock``)."""
        from chunkcache.format import drop_damaged

        drop_damaged(self.store, key, reason)

    _VERIFIED_MAX = 1 << 16
    """Entries whose identity ``_check_entry`` keeps as verified (a key and an int each)."""

    def _check_entry(
        self,
        key: str,
        header: dict,
        token_ids: torch.Tensor,
        ids: Sequence[int] | bytes | None,
        info: dict | None = None,  # the key inputs it must hold (default: the engine's variant and codec)
        raw=None,  # the entry's bytes (at least through its header): a repeat costs a digest
    ) -> None:
        """Raise ``ForeignEntryError`` unless the entry (``header`` checked by ``format.read_header``)
        is this engine's chunk: its one copy of the key inputs equals this engine's and hashes with
        its tokens to ``key`` (``format.check_identity``), and its geometry is this model's
        (layers, kv heads, head_dim, tokens, base position). ``ModelMismatchError`` if such a whole
        entry holds other tokens than ``ids`` (a list, or ``token_bytes``): then the caller's ids
        are what is wrong (a bad text index record). Both paths call it before any of the KV is used.
        With ``raw``, an entry whose exact header bytes and tokens passed before under this key
        (a 64-bit digest of both, Python's keyed hash, kept per key: microseconds, where the
        checks take ~70 us) skips the identity and geometry checks, which those bytes decide:
        the key hashes this engine's key inputs, so the same key asks the same of them. The
        tokens are still compared with ``ids`` (the caller's may differ)."""
        from chunkcache.format import check_identity, header_bytes

        tokens = token_bytes(token_ids)
        digest = None if raw is None else hash((bytes(header_bytes(raw)), tokens))
        known = digest is not None and self._verified.get(key) == digest
        if not known:
            if info is None:
                _, _, info = self._of(0, tokens)
            check_identity(key, header, token_ids, info)
        if ids is not None and tokens != (ids if isinstance(ids, bytes) else token_bytes(ids)):
            # the entry is whole and belongs under its key: the caller's ids (a text index record)
            # do not match that key. Not the entry's fault: refuse, never use it, keep it.
            raise ModelMismatchError(f"store entry {key} holds other tokens than the chunk asked for")
        if known:
            return
        spec = self.lm.spec
        want = [spec.num_layers, 2, spec.kv_heads, len(token_ids), spec.head_dim]
        if header["kv_shape"] != want:
            raise ForeignEntryError(f"entry's kv_shape {header['kv_shape']} is not this model's {want}")
        base = len(info["settings"]["sink_ids"])
        if header["base_pos"] != base:
            raise ForeignEntryError(f"entry's base_pos {header['base_pos']} is not the sink's length {base}")
        if digest is not None:
            with self._verified_lock:
                if len(self._verified) >= self._VERIFIED_MAX:
                    del self._verified[next(iter(self._verified))]  # the oldest
                self._verified[key] = digest

    def _pack(
        self, chunk: ChunkKV, variant: int = 0, parts: dict | None = None
    ) -> tuple[bytes, dict[str, bytes]]:
        """The chunk's entry, and the entries of adaptive loading's further precisions (key ->
        bytes; written with it). ``parts``: its codec parts already encoded (``pack_chunk``'s)."""
        from chunkcache.format import pack_chunk

        value = pack_chunk(chunk, self.codec, self._of(variant, chunk.token_ids.tolist())[2], parts)
        extra = {}  # (never with exact_first: only variant 0 is here)
        for codec in self.precisions[1:]:
            inputs = self.key_inputs_at(codec)
            extra[inputs.key(chunk.token_ids)] = pack_chunk(chunk, codec, inputs.to_dict())
        return value, extra

    def _save(self, key: str, chunk: ChunkKV, variant: int = 0) -> bytes | None:
        """Store the chunk; None when stored, else its packed bytes: a store that cannot take the
        write (full disk, Redis down or out of memory, read-only) must not stop serving, so the
        caller uses these and the failure is warned about once and counted
        (``store.stats().failed_writes``)."""
        value, extra = self._pack(chunk, variant)
        return None if self._put(key, value, extra) else value

    def _put(self, key: str, value: bytes, extra: dict[str, bytes]) -> bool:
        """Write an entry (and its further precisions); False, warned once, if the store refused."""
        try:  # (never waits for fusions holding views: only a map that must grow does, in the store)
            self.store.put(key, value)
            if extra:
                self.store.put_many(extra)
        except StoreError as e:
            self._warn_once("write", f"chunkcache: cannot write to the chunk store ({e}); serving the "
                            "computed KV without storing it (further failures are counted in "
                            "store.stats().failed_writes, not warned)")  # fmt: skip
            return False
        return True

    def _write_behind(self, key: str, chunk: ChunkKV, variant: int) -> bool:
        """A serving fusion's miss off its critical path: its codec parts, encoded where the chunk
        was computed (``format.resident_entry``: on a GPU nothing goes to the host), go into the
        device cache now (the fusion that encoded it, and any other, reads it from there); a
        background thread serialises the entry (host copy, checksums: ``_pack`` with those
        parts, the very bytes ``_save`` writes) and writes it to the store. The key stays claimed
        (``_inflight``) until that write ends, so a caller that finds it in neither waits for it,
        never encodes it again. False (nothing done) when the device cache cannot take it: then
        the caller writes it itself. ``flush`` waits for every write handed over."""
        from chunkcache.codec import get_codec
        from chunkcache.format import resident_entry

        if not self._pack_on_device:  # (the A/B of the host-side form, session 10's)
            return self._write_behind_packed(key, chunk, variant)
        header, parts = resident_entry(chunk, self.codec, self._of(variant, chunk.token_ids.tolist())[2])
        codec_parts = get_codec(header["codec"]).parts
        if not self.device_cache.admit(key, header, parts, codec_parts):
            if not self.device_cache.holds([key])[0]:
                return False
        done = None
        if chunk.kv.is_cuda:  # the writer's host copies wait for the parts' encoding, on this stream
            done = torch.cuda.Event()
            done.record()
        if not self.precisions[1:]:  # only the shape is needed: let the device KV go now
            chunk = ChunkKV(
                token_ids=chunk.token_ids,
                kv=torch.empty(chunk.kv.shape, dtype=chunk.kv.dtype, device="meta"),
                base_pos=chunk.base_pos,
                meta=chunk.meta,
                token_scores=chunk.token_scores,
            )
        self._behind_queue().put((key, (chunk, variant, {n: parts[n] for n in codec_parts}, done)))
        return True

    def _write_behind_packed(self, key: str, chunk: ChunkKV, variant: int) -> bool:
        """``_write_behind`` with the entry packed on the caller's thread first (session 10's form,
        kept for the benchmark's A/B: ``ChunkCache._pack_on_device = False``)."""
        from chunkcache.codec import get_codec
        from chunkcache.format import unpack_parts

        value, extra = self._pack(chunk, variant)
        header, parts = unpack_parts(value, verify=False)  # our own bytes, packed just now
        if not self.device_cache.admit(key, header, parts, get_codec(header["codec"]).parts):
            if not self.device_cache.holds([key])[0]:
                return False
        self._behind_queue().put((key, (value, extra)))
        return True

    def _behind_queue(self) -> queue.Queue:
        with self._lock:
            if self._behind is None:
                self._behind_q = queue.Queue()
                self._behind = threading.Thread(
                    target=_write_behind_loop, args=(weakref.ref(self), self._behind_q),
                    name="chunkcache-write-behind", daemon=True,
                )  # fmt: skip
                self._behind.start()
                atexit.register(_flush_at_exit, weakref.ref(self))
        return self._behind_q


    def flush(self) -> None:
        """Wait until every miss handed to the background writer is in the store (or refused,
        warned and counted). Misses of serving fusions with a device cache are written behind;
        ``precompute`` always writes before it returns."""
        if self._behind_q is not None:
            self._behind_q.join()

    def _warn_once(self, kind: str, message: str) -> None:
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        import warnings

        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _check_store_models(self) -> None:
        """Before the first precompute into a non-empty store: warn (once) if none of a few sampled
        entries was made with this engine's key inputs, naming the fields that differ (another codec,
        dtype, model, sink): this engine can never hit them and builds its own copy of the corpus
        beside them. Headers only, a handful of keys (``store.foreign_store``)."""
        with self._lock:
            if "models" in self._warned:
                return
            self._warned.add("models")
        if self.variants()[0].sink_ids is None:  # each entry has its own sink_ids: nothing to compare
            return
        from chunkcache.store import foreign_store

        try:
            diff = foreign_store(self.store, self._info(), 8)
        except StoreError:
            return
        if diff is not None:
            self._warn_once("foreign", f"chunkcache: the store's entries were made with other {diff} "
                            "than this engine's: this engine cannot use them and stores a second copy of "
                            "every chunk beside them. Open the store made for these settings, or filter "
                            "this warning if a store shared by several settings is meant")  # fmt: skip

    # ---- precompute -------------------------------------------------------------------------
    def precompute(
        self, texts: Sequence[str], batch_size: int = 8, progress: bool | None = None
    ) -> list[str]:
        """Make sure every text has a stored chunk cache; returns their keys. Idempotent."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of passage strings, got one str (pass [text])")
        return self.precompute_ids(_id_lists(self.resolve(texts)[1]), batch_size, progress)

    def precompute_ids(
        self, id_lists: Sequence[Sequence[int]], batch_size: int = 8, progress: bool | None = None
    ) -> list[str]:
        """Like ``precompute`` for already tokenised chunks; skips chunks already stored. A chunk
        another thread of this engine is encoding meanwhile is waited for, not encoded twice (so
        every caller uses the same bytes)."""
        return self._precompute(id_lists, batch_size, progress)[0]

    def _precompute(
        self,
        id_lists: Sequence[Sequence[int]],
        batch_size: int = 8,
        progress: bool | None = None,
        timing: dict | None = None,
        behind: bool = False,
    ) -> tuple[list[str], dict[str, bytes]]:
        """``precompute_ids``, plus the packed entries the store could not take (key -> bytes),
        for the caller to serve from. Every variant of each chunk is made (``variants``); the
        keys returned are the engine's variant's. ``timing``: a dict to add this call's miss
        figures to (``chunks`` encoded here, seconds: ``encode_s`` in the model, ``save_s``
        packing and writing, ``wait_s`` for chunks another thread was encoding). ``behind``
        (a serving fusion's misses, with a device cache): each new entry is admitted to the
        device cache and written to the store by a background thread (``_write_behind``)."""
        keys = [self.key_for_ids(ids) for ids in id_lists]
        missing: dict[str, tuple[Sequence[int], int]] = {}  # key -> (ids, variant)
        for v in range(len(self.variants())):
            vkeys = keys if v == 0 else [self._of(v, ids)[1].key(ids) for ids in id_lists]
            for k, ids, there in zip(vkeys, id_lists, self.store.contains_many(vkeys), strict=True):
                if k not in missing and not there:
                    missing[k] = (ids, v)
        unsaved: dict[str, bytes] = {}
        if not missing:
            return keys, unsaved
        self._check_store_models()
        mine, theirs = self._claim(list(missing))
        queued: set[str] = set()  # claims the background writer lets go of once written
        try:
            todo = [
                (k, *missing[k])
                for k, there in zip(mine, self.store.contains_many(mine), strict=True)
                if not there
            ]
            if todo:
                unsaved = self._encode_and_save(
                    todo, batch_size, progress, timing, queued if behind else None
                )
        finally:
            self._unclaim([k for k in mine if k not in queued])
        t = time.perf_counter()
        for ev in theirs:
            ev.wait()
        if timing is not None and theirs:
            timing["wait_s"] = timing.get("wait_s", 0.0) + time.perf_counter() - t
        return keys, unsaved

    def _claim(self, keys: list[str]) -> tuple[list[str], list[threading.Event]]:
        """Split ``keys`` into those this thread encodes (claimed) and the events of those being
        encoded by another thread."""
        mine, theirs = [], []
        with self._lock:
            for k in keys:
                ev = self._inflight.get(k)
                if ev is None:
                    self._inflight[k] = threading.Event()
                    mine.append(k)
                else:
                    theirs.append(ev)
        return mine, theirs

    def _unclaim(self, keys: list[str]) -> None:
        with self._lock:
            for k in keys:
                self._inflight.pop(k).set()

    def _encode_and_save(
        self,
        todo: list[tuple[str, Sequence[int], int]],
        batch_size: int,
        progress: bool | None,
        timing: dict | None = None,
        queued: set[str] | None = None,
    ) -> dict[str, bytes]:
        """Encode and store ``todo`` (key, ids, variant); the packed entries the store refused
        (see ``_save``). ``timing``: as ``_precompute``'s. ``queued`` (given: write behind):
        gets the keys handed to the background writer (admitted to the device cache first)."""
        unsaved: dict[str, bytes] = {}
        if progress is None:
            progress = len(todo) > 32
        # one sink per encoding slice (a per-chunk context: chunks of one context together)
        groups: dict[tuple[int, ...], list[tuple[str, Sequence[int], int]]] = {}
        for t in todo:
            groups.setdefault(self._of(t[2], t[1])[0], []).append(t)
        # Encode and store in slices so an interrupted run keeps what it finished.
        step = max(batch_size, 1) * 4
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="precompute", unit="chunk")
        with self._miss_stream():
            self._encode_groups(groups, step, bar, unsaved, batch_size, timing, queued)
        if bar is not None:
            bar.close()
        return unsaved

    _miss_stream_priority = 0
    """CUDA stream priority of the miss stream (lower is higher; -1 is torch's high priority):
    session 13's A/B (bench_results/session13/gpu/ab_priority.py)."""

    def _miss_stream(self):
        """Where misses are encoded and packed: on CUDA, a stream of their own (fusions run on the
        caller's default stream, and a miss's host-to-device copy there would first wait for
        every fusion queued before it)."""
        if self.lm.device.type != "cuda":
            return nullcontext()
        return torch.cuda.stream(torch.cuda.Stream(self.lm.device, priority=self._miss_stream_priority))

    def _encode_groups(
        self, groups: dict, step: int, bar, unsaved: dict, batch_size: int, timing, queued
    ) -> None:
        """``_encode_and_save``'s loop: encode each sink's chunks in slices of ``step``, then
        store (or write behind) each."""
        for sink, mine in groups.items():
            for s in range(0, len(mine), step):
                part = mine[s : s + step]
                t0 = time.perf_counter()
                encoded = encode_chunks(
                    self.lm, [ids for _, ids, _ in part], sink, batch_size=batch_size,
                    token_scores=self.settings.token_scores,
                )  # fmt: skip
                t1 = time.perf_counter()
                for (k, _, v), chunk in zip(part, encoded, strict=True):
                    chunk.meta["sink"] = self.variants()[v].settings.sink
                    if queued is not None and self._write_behind(k, chunk, v):
                        queued.add(k)
                        continue
                    raw = self._save(k, chunk, v)
                    if raw is not None:
                        unsaved[k] = raw
                if timing is not None:  # (the encode's device work ends in the save's copy to the host)
                    timing["chunks"] = timing.get("chunks", 0) + len(part)
                    timing["encode_s"] = timing.get("encode_s", 0.0) + t1 - t0
                    timing["save_s"] = timing.get("save_s", 0.0) + time.perf_counter() - t1
                if bar is not None:
                    bar.update(len(part))

    def chunk(self, text: str) -> ChunkKV:
        """The cache of one chunk (precomputed if missing)."""
        return self.chunks([text])[0]

    def chunks(self, texts: Sequence[str]) -> list[ChunkKV]:
        return self._chunks(*self.resolve(texts))

    def _chunks(
        self, keys: list[str], ids: list[bytes], infos: list[dict] | None = None, timing: dict | None = None
    ) -> list[ChunkKV]:
        """The chunks under ``keys`` (``infos``: the key inputs each must hold, ``_prompt_keys``;
        default the engine's variant), misses precomputed (``timing``: as ``_precompute``'s)."""
        from chunkcache.format import unpack_chunk

        infos = infos or [self._of(0, i)[2] for i in ids]
        out = [self._load(k, i, f) for k, i, f in zip(keys, ids, infos, strict=True)]
        miss = [i for i, c in enumerate(out) if c is None]
        if miss:
            _, unsaved = self._precompute(_id_lists([ids[i] for i in miss]), timing=timing)
            for i in miss:
                raw = unsaved.get(keys[i])
                if raw is None:
                    out[i] = self._load(keys[i], ids[i], infos[i])
                if out[i] is None and raw is None:  # another thread's write of it failed: encode it here
                    v = self._variant_of(infos[i])
                    raw = self._encode_and_save([(keys[i], _id_lists([ids[i]])[0], v)], 1, False).get(keys[i])
                    out[i] = None if raw is not None else self._load(keys[i], ids[i], infos[i])
                if raw is not None:  # the store refused the write: serve the entry it would hold
                    out[i] = unpack_chunk(raw, self.lm.dtype)
                if out[i] is None:
                    raise RuntimeError(
                        f"chunk {keys[i]} was precomputed but cannot be read back from the store"
                    )
        return out  # type: ignore[return-value]

    def _variant_of(self, info: dict) -> int:
        """Which variant a chunk's key inputs (from ``_prompt_keys``) are of."""
        v = self.variants()
        return 1 if len(v) > 1 and info is v[1].info else 0

    _pack_on_device = True
    """A miss written behind goes into the device cache from the device (its codec parts encoded
    there) and is serialised by the background writer (False: packed on the caller's thread and
    copied back, session 10's form; the benchmark's A/B)."""

    _front_by_layer = True
    """An adaptive fusion whose front is estimated to end after the link reads each layer of the
    front as soon as the front wrote it (False: always waits for the whole front, as before
    session 10; for measurements)."""

    def _fuse_adaptive(
        self,
        keys: list[str],
        ids: list[bytes],
        suffix: list[int],
        cfg: FuseConfig,
        t0: float,
        *,
        store=None,  # (warm-up: its synthetic entries' store; default the engine's)
        force: tuple[int, str] | None = None,  # (warm-up: recompute this many in place, fetch at this codec)
        rates=None,  # (warm-up: where its readings go; default the engine's)
        read_link: bool = True,  # (warm-up: a store in memory says nothing about the link)
        staging=None,  # (warm-up: a staging it holds; default one taken from the pool)
    ) -> FuseResult:
        """``fuse`` under ``self.adaptive`` (``adaptive.plan``). A full prefill (``fuse.prefill``)
        when the plan says no mix is faster: planned first as if every precision were stored,
        which touches no store (misses are then not precomputed either). Otherwise misses are
        precomputed (the plain miss path), and the first ``plan.front`` chunks are recomputed in
        place (``precompute.encode_exact`` of the prefix and them) while the others are fetched
        at their planned precision: on the fast path (one precision) streamed layer by layer
        (``stream.LayerStream``) into ``pipeline.fuse_entries`` behind that exact front, which
        stages each layer as it arrives; else whole and decoded, then ``fuse_kv``. The selection
        budget stays the ratio of all chunk tokens, spent on the fetched ones (measured: a budget
        of the fetched tokens only fused worse, ``bench_results/session7/adaptive/split_quality.log``).
        A fetched entry that is missing, damaged or not this engine's is never used: the stream's
        error, or the fusion's layer checksums, send every fetched chunk through ``_load_at``
        (a damaged one dropped with a warning), and the ones that fail are recomputed and stored
        as misses are (``stats["adaptive"]["repaired"]``). Rates measured: the link (the
        stream's first read to its last layer), the front's recompute (its device time), the
        tail (from the later of the two to the logits on the host)."""
        from chunkcache import adaptive
        from chunkcache.fuse import prefill, with_front
        from chunkcache.precompute import encode_exact
        from chunkcache.stream import LayerStream

        conf, spec = self.adaptive, self.lm.spec
        rates = self._rates if rates is None else rates
        store = self.store if store is None else store
        if force is not None:
            conf = replace(conf, recompute_chunks=force[0], precisions=())
        tokens = [len(b) // 8 for b in ids]
        t_plan = time.perf_counter()
        fixed = (conf.link_bytes_per_s, conf.recompute_tokens_per_s, conf.fuse_tokens_per_s)
        measured, measured_all = None in fixed, fixed == (None, None, None)
        tail_guess = None
        if conf.fuse_tokens_per_s is None and rates.fuse is None and rates.prefill is not None:
            # the fusion's tail not measured yet: counted as (2 x ratio + 0.1) of a full prefill
            # (the selected tokens' recompute at the prefill rate twice over, plus a tenth for the
            # probe and the rest; measured on the H200 at 15%: 0.15-0.2), so the first mixes are
            # chosen only where they beat the prefill by a margin, and they measure it
            tail_guess = (conf.recompute_tokens_per_s or rates.prefill) / (2 * cfg.recompute_ratio + 0.1)
        rated = dict(
            link_bytes_per_s=conf.link_bytes_per_s or dict(rates.link),
            recompute_tokens_per_s=conf.recompute_tokens_per_s or rates.recompute,
            prefill_tokens_per_s=conf.recompute_tokens_per_s or rates.prefill,
            fuse_tokens_per_s=conf.fuse_tokens_per_s or rates.fuse or tail_guess,
            overrun=rates.overrun if measured_all else None,  # (fixed rates are taken as they are)
            front_floor_s=rates.front_host if conf.recompute_tokens_per_s is None else None,
            slack=conf.slack,
            fallback=conf.fallback,
            front=conf.recompute_chunks,
        )
        every = conf.explore_every if measured and conf.recompute_chunks is None else 0
        explore = every > 0 and rates.fallbacks + 1 >= every
        chosen, probe_link = None, False
        if conf.recompute_chunks is None:
            # First as if every precision were stored, touching no store: a full prefill chosen
            # here is chosen with what is stored too (fewer precisions only make mixes slower)
            everything = [{p: self._entry_bytes(p, t) for p in self.precisions} for t in tokens]
            first = adaptive.plan(tokens, everything, **rated)
            chosen = first if first.full_prefill else None
            unlinked = conf.link_bytes_per_s is None and not rates.link and conf.fallback
            if chosen is None and unlinked and first.full_s is not None and rates.link_probe != "failed":
                # the link not measured yet: a full prefill (about what any plan costs at worst),
                # while a thread reads the last chunks' entries (``_probe_link``); the next call
                # is planned with the link's rate (session 9 fetched the last chunk beside a
                # front of all the others: up to 1.2x a prefill on the H200)
                why = "link not measured yet: a full prefill while the link is probed beside it"
                chosen = replace(first, full_prefill=True, front=len(tokens), reason=why,
                                 chunks=[adaptive.ChunkPlan("prefill", None, None, c.recompute_s) for c in first.chunks])  # fmt: skip
                probe_link = rates.link_probe is None
                if probe_link:
                    rates.link_probe = "running"
            if chosen is not None and explore:
                # an exploring mix fetches only the last chunk, at the engine's codec: when that
                # alone is estimated longer than a prefill, no mix is run (and no store touched);
                # the count starts again, so the store is not asked on every later call either
                last = adaptive.plan(tokens, everything, **{**rated, "front": len(tokens) - 1}).chunks[-1]
                if last.fetch_s is not None and first.full_s is not None and last.fetch_s <= first.full_s:
                    chosen = None
                else:
                    rates.fallbacks = 0
        if chosen is None:
            lists = _id_lists(ids)
            missing = [i for i, there in enumerate(store.contains_many(keys)) if not there]
            if missing:  # the plain miss path: precompute and store them (no choice to make)
                self.precompute_ids([lists[i] for i in missing])
            precisions = self.precisions
            pkeys = {p: [self.key_inputs_at(p).key(x) for x in lists] for p in precisions}
            stored = {
                p: [True] * len(keys) if p == self.codec else store.contains_many(pkeys[p])
                for p in precisions
            }
            sizes = [
                {p: self._entry_bytes(p, t) for p in precisions if stored[p][i]} for i, t in enumerate(tokens)
            ]
            if force is not None:  # (the warm-up's: that codec only)
                sizes = [{force[1]: self._entry_bytes(force[1], t)} for t in tokens]
            chosen = adaptive.plan(tokens, sizes, **rated)
            if tail_guess is not None and conf.recompute_chunks is None:
                chosen = replace(chosen, reason="fusion tail not measured yet (counted as "
                                 f"{2 * cfg.recompute_ratio + 0.1:.2g} of a full prefill): " + chosen.reason)  # fmt: skip
            if chosen.full_prefill and explore:
                # the fastest mix looked slower than a prefill for explore_every calls: measure a
                # mix again (every chunk but the last recomputed in place, so it costs about one
                # prefill plus the fusion's tail), unless its one fetch alone is estimated longer
                probe = adaptive.plan(tokens, sizes, **{**rated, "front": len(tokens) - 1})
                last = probe.chunks[-1].fetch_s
                if last is not None and last <= chosen.full_s:
                    why = f"explore (after {rates.fallbacks} full prefills): {probe.reason}; " + chosen.reason
                    chosen = replace(probe, reason=why)
                else:
                    rates.fallbacks = 0
            elif not chosen.full_prefill and chosen.front == 0 and every and len(tokens) > 1:
                if rates.unrecomputed + 1 >= every and conf.recompute_tokens_per_s is None:
                    # nothing recomputed for explore_every calls: the front's recompute rate is
                    # not refreshed; recompute the first chunk once
                    probe = adaptive.plan(tokens, sizes, **{**rated, "front": 1})
                    why = (
                        f"explore (recompute rate last read {rates.unrecomputed} calls ago): {probe.reason}; "
                    )
                    chosen = replace(probe, reason=why + chosen.reason)
        t_plan = time.perf_counter() - t_plan
        if chosen.full_prefill:
            rates.fallbacks += 1
            t = time.perf_counter()
            res = prefill(self.lm, self.prompt_ids_from(ids, suffix), len(self._prefix_ids), tokens)
            if probe_link:  # (once the prefill is queued: its reads do not delay the launches)
                self._probe_link(store, keys, ids, rates)
            res.logits.cpu()
            t = time.perf_counter() - t
            rates.saw("prefill", sum(tokens), t)  # (chunk tokens: what the planner's full_s counts)
            timing = {"plan": t_plan, "prefill": t}
            return self._adaptive_result(res, chosen, timing, [], t0)
        rates.fallbacks = 0
        prefix_kv = self.prefix_kv()  # (after the fallback: a plain prefill does not make it)

        k, n, n_ctx = chosen.front, len(keys), sum(tokens)
        back = list(range(k, n))
        precision = {i: chosen.chunks[i].precision for i in back}
        infos = {p: self.key_inputs_at(p).to_dict() for p in precisions}
        front_ids = [t for x in lists[:k] for t in x]
        ext_ids = list(self._prefix_ids) + front_ids
        user_ratio, n_back = cfg.recompute_ratio, sum(tokens[i] for i in back)
        if k and n_back:  # the budget stays the ratio of every chunk token, spent on the fetched ones
            cfg = FuseConfig(recompute_ratio=min(1.0, user_ratio * n_ctx / n_back), policy=cfg.policy)

        def front(side=None):
            # the front: prefix and chunks 0..k-1 through the model from scratch (exact; the prefix's
            # few tokens are recomputed, which keeps the model's causal fast path). ``side``: a CUDA
            # stream to run it on, so the compute stream stays free for the fusion's set-up and its
            # loader copies and assembles the layers that arrive meanwhile (``fuse_entries``'s
            # ``prefix_ready``); returns (KV, device seconds, its events: one per layer, recorded
            # as each layer's K/V is written, so the fusion reads layer l as soon as the front
            # wrote it, or None)
            if not k:
                return prefix_kv, (lambda: 0.0), None
            if side is None:
                return (*_timed(self.lm.device, lambda: encode_exact(self.lm, ext_ids)[0]), None)
            side.wait_stream(torch.cuda.current_stream(self.lm.device))
            events, recorded = [torch.cuda.Event() for _ in range(spec.num_layers)], set()

            def on_layer(i: int) -> None:
                events[i].record(side)
                recorded.add(i)

            with torch.cuda.stream(side):
                kv, seconds = _timed(
                    self.lm.device, lambda: encode_exact(self.lm, ext_ids, on_layer=on_layer)[0]
                )
                front_done.record(side)
            # (a transformers whose cache made its own layers records none: the whole front)
            return (
                kv,
                seconds,
                events if len(recorded) == len(events) and by_layer else front_done,
            )

        repaired, res, fetched, captured, ready = [], None, None, False, None
        front_done = torch.cuda.Event() if self.lm.device.type == "cuda" else None  # (the whole front)
        # the fusion reads the front layer by layer where the front is estimated to end after the
        # link (or nothing is known): then the probe follows it; where the link ends later the
        # probe waits for the link anyway, and running it beside the front only slows the front
        # (H200, 10 Gb/s, k = 5: front 81.9 ms by layer, 78.1 ms whole)
        est_front = sum(c.recompute_s or 0.0 for c in chosen.chunks[:k])
        est_link = [c.fetch_s for c in chosen.chunks[k:]]
        by_layer = self._front_by_layer and (None in est_link or est_front >= sum(est_link))
        codecs = {precision[i] for i in back}
        if self.fast_path and len(codecs) == 1:
            # streamed: the back chunks arrive layer by layer (into the staging's landing arena)
            # while the front is recomputed, and the fusion stages each layer as it arrives (its
            # probe runs behind the link)
            (p,) = codecs
            bkeys = [pkeys[p][i] for i in back]
            with nullcontext(staging) if staging is not None else self.stagings().take() as staging:
                g = staging.graphs
                unsteady = (g.captures, g.eager) if g is not None else None  # (graph warm-up: below)
                stream = LayerStream(store, bkeys, landing=staging.landing).start()
                t_begin, t_front_host = time.perf_counter(), None
                try:
                    ext, front_s, ready = front(staging.prep_stream)
                    t_front_host = time.perf_counter() - t_begin
                    entries = stream.entries_when_ready()
                    res = self._fuse_fetched(ext, entries, ext_ids, suffix, cfg, bkeys, [ids[i] for i in back],
                                             infos[p], arrival=stream, staging=staging, prefix_ready=ready)  # fmt: skip
                except (KeyError, StoreError, CorruptEntryError):
                    res = None  # missing, damaged or unreachable: read whole below (drops the damaged)
                finally:
                    stream.close()
                if res is not None:
                    res.logits.cpu()
                # a shape run eagerly (not recorded yet) or being recorded: a one-off cost
                captured = g is not None and (g.captures, g.eager) != unsteady
            if ready is not None:  # (the repair below uses the front on this stream)
                torch.cuda.current_stream(self.lm.device).wait_event(front_done)
                ext.record_stream(torch.cuda.current_stream(self.lm.device))
            t_link = max(stream.t_last - stream.t_start, 0.0)
            if res is not None:
                t_done = time.perf_counter()
                if captured:  # (its host work competed with the reader too)
                    rates.discard(["link:" + p])
                elif read_link:
                    rates.saw_fetch(p, sum(sizes[i][p] for i in back), t_link)
                t_tail = t_done - max(t_begin + front_s(), stream.t_last)
            else:
                fetched = [self._load_at(i, precision[i], pkeys, ids, infos) for i in back]
        else:  # several codecs (fused one at a time) or the eager path: whole chunks, decoded

            def fetch(i: int):
                p, t = precision[i], time.perf_counter()
                got = self._load_at(i, p, pkeys, ids, infos)
                if got is not None and read_link:
                    rates.saw_fetch(p, sizes[i][p], time.perf_counter() - t)
                return got

            fetched, (ext, front_s, _), t_link, _ = adaptive.overlap(fetch, back, front)
            t_front_host = None
        if res is None:
            t = time.perf_counter()
            repaired = [i for i, got in zip(back, fetched, strict=True) if got is None]
            if repaired:  # precompute (or reload) them as misses, at the engine's codec
                fixed = dict(
                    zip(
                        repaired,
                        self._chunks([keys[i] for i in repaired], [ids[i] for i in repaired]),
                        strict=True,
                    )
                )
                fetched = [fixed.get(i, c) for i, c in zip(back, fetched, strict=True)]
            chunks = [c.to(self.lm.device) for c in fetched]
            res = fuse_kv(self.lm, ext, chunks, ext_ids, suffix, cfg)
            res.logits.cpu()
            t_tail = time.perf_counter() - t  # after the fetch and the front
        t_front = front_s()
        if k:
            rates.saw_front(len(ext_ids), t_front, t_front_host)
        rates.unrecomputed = 0 if k else rates.unrecomputed + 1
        if back and not repaired and not captured:  # (a repair's reads and recompute, or a CUDA
            rates.saw("fuse", n_ctx, t_tail)  # graph's warm-up, are no fusion tail)
        elif captured:
            rates.discard(["fuse", "overrun"])
        res = with_front(res, len(self._prefix_ids), tokens[:k], spec.num_layers, prefix_recomputed=k > 0)
        res.stats["recompute_ratio"] = user_ratio
        res.stats["fetched_recompute_ratio"] = cfg.recompute_ratio  # the share of the fetched tokens selected
        timing = {"plan": t_plan, "fetch": t_link, "recompute": t_front, "tail": t_tail}
        if t_front_host is not None:
            timing["recompute_host"] = t_front_host  # queueing the front (the host's share of it)
        out = self._adaptive_result(res, chosen, timing, repaired, t0)
        out.stats["adaptive"]["front_by_layer"] = isinstance(ready, list)  # (read layer by layer)
        known = chosen.estimate_s and chosen.rates["fuse_tokens_per_s"]  # (a free tail: no estimate)
        if known and measured_all and tail_guess is None and not (repaired or captured):
            # measured against the plan's estimate before its overrun factor (``Rates.overrun``)
            rates.saw_estimate(chosen.estimate_s / chosen.rates["overrun"], out.stats["seconds"]["total"])
        return out

    def _probe_link(self, store, keys: list[str], ids: list[bytes], rates) -> None:
        """On a thread: read the last two chunks' entries (the last one twice for a one-chunk
        prompt) at every stored precision, one at a time through a ``LayerStream`` (the fused
        path's reader), and hand each read's bytes/s to ``rates.saw_fetch`` (the first of each
        precision is its warm-up). ``rates.link_probe`` becomes "done", or "failed" when nothing
        could be read (entries missing: the next call then takes the mix that precomputes them)."""
        from chunkcache.stream import LayerStream

        picks = [len(ids) - 2, len(ids) - 1] if len(ids) > 1 else [0, 0]
        lists = _id_lists([ids[i] for i in picks])
        tokens = [len(ids[i]) // 8 for i in picks]

        def run() -> None:
            read = 0
            try:
                for p in self.precisions:
                    for x, t in zip(lists, tokens, strict=True):
                        stream = LayerStream(store, [self.key_inputs_at(p).key(x)]).start()
                        try:
                            stream.entries_when_ready()
                            stream.wait(stream.num_layers - 1)
                        except (KeyError, StoreError, CorruptEntryError):
                            break  # (missing or damaged: this precision says nothing)
                        finally:
                            stream.close()
                        rates.saw_fetch(p, self._entry_bytes(p, t), max(stream.t_last - stream.t_start, 1e-9))
                        read += 1
            finally:  # (done: a rate is known; the first read of a precision is only its warm-up)
                rates.link_probe = "done" if read and rates.link else "failed"

        threading.Thread(target=run, name="chunkcache-link-probe", daemon=True).start()

    def _adaptive_result(
        self, res: FuseResult, chosen, timing: dict, repaired: list[int], t0: float
    ) -> FuseResult:
        stats = chosen.stats()
        stats["seconds"] = timing
        stats["repaired"] = repaired
        res.stats["adaptive"] = stats
        res.stats["seconds"]["total"] = time.perf_counter() - t0  # wall: plan, load, recompute, fusion
        return res

    def _entry_bytes(self, codec: str, tokens: int) -> int:
        """Bytes of one chunk's codec parts at ``codec`` (the planner's sizes; cached per length)."""
        got = self._sizes.get((codec, tokens))
        if got is None:
            from chunkcache.codec import get_codec

            spec = self.lm.spec
            got = get_codec(codec).nbytes(
                spec.num_layers, spec.kv_heads, tokens, spec.head_dim, self.lm.dtype
            )
            self._sizes[(codec, tokens)] = got
        return got

    def _load_at(self, i: int, p: str, pkeys: dict, ids: list[bytes], infos: dict) -> ChunkKV | None:
        """Chunk ``i`` at precision ``p`` decoded from the store, or None (missing; damaged or
        foreign: dropped with a warning)."""
        from chunkcache.format import load_chunk

        key = pkeys[p][i]
        return load_chunk(self.store, key, self.lm.dtype, drop=self._drop,
                          check=lambda h, c: self._check_entry(key, h, c.token_ids, ids[i], infos[p]))  # fmt: skip

    def _fuse_fetched(
        self, ext_kv, entries, ext_ids, suffix, cfg, keys, ids, info, arrival, staging, prefix_ready=None
    ) -> FuseResult | None:
        """``pipeline.fuse_entries`` over fetched entries (bytes) behind the exact front ``ext_kv``
        (computed on another stream until ``prefix_ready``); None if one is damaged or foreign
        (``CorruptEntryError``: the caller drops and repairs)."""
        from chunkcache.errors import CorruptEntryError
        from chunkcache.pipeline import fuse_entries

        def inspect(j: int, header: dict, parts: dict) -> None:
            self._check_entry(keys[j], header, parts["token_ids"], ids[j], info, entries[j])

        try:
            res = fuse_entries(self.lm, ext_kv, entries, ext_ids, suffix, cfg, staging, inspect=inspect,
                               arrival=arrival, prefix_ready=prefix_ready)  # fmt: skip
        except CorruptEntryError:
            return None
        res.stats["fast_path"] = True
        return res

    def prompt_ids_from(self, ids: list[bytes], suffix: list[int]) -> torch.Tensor:
        """``[1, N]`` the prompt of chunks given as ``token_bytes`` and question suffix ids."""
        pieces = [self._prefix_ids, *(np.frombuffer(b, "<i8") for b in ids), suffix]
        return torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces]))[None]

    def prefix_kv(self) -> torch.Tensor:
        if self._prefix_kv is None:
            with self._lock:
                if self._prefix_kv is None:
                    self._prefix_kv = encode_prefix(self.lm, self._prefix_ids)
        return self._prefix_kv

    def stagings(self):
        """The ``pipeline.StagingPool`` of the fast path (``concurrent_fusions`` stagings at most)."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    from chunkcache.pipeline import StagingPool

                    size = self.concurrent_fusions  # batching: every waiting request holds one
                    if self.batching is not None:
                        size = max(size, self.batching.max_batch)
                    self._pool = StagingPool(self.lm.device, size=size)
        return self._pool

    def warmup(
        self,
        context_tokens: tuple[int, int],
        question_tokens: tuple[int, int] = (1, 32),
        chunk_tokens: int = 512,
        recompute_ratio: float | None = None,
        policy: str | None = None,
    ) -> dict:
        """Compile the kernels and record the CUDA graphs that fast-path fusions of these sizes
        need, on every staging of the pool, so that no request of a served workload pays for them.

        ``context_tokens``: the range ``(lo, hi)`` of chunk tokens a prompt holds (for instance 16
        retrieved chunks of 450-550 tokens: ``(7200, 8800)``); ``question_tokens``: the range of the
        question's own tokens (the template's are added). A shape first met while serving costs its
        request an eager run and a recording, and kernels for a new shape compile then (about a
        second on the H200: every request queued behind it waits too). The fusions run over
        synthetic entries (random token ids and K/V, ``chunk_tokens`` a chunk, built here, never
        stored); with a device cache, they run from it as well (their entries dropped afterwards),
        so its kernels compile too. Call it at start-up: it holds every staging while it runs.
        Only the fast path records graphs (CUDA); elsewhere this returns at once. Fusions with
        ``batching`` are not covered. Returns ``{"points", "fusions", "graphs_recorded", "seconds"}``.
        """
        lo, hi = _token_range(context_tokens, "context_tokens", 1)
        q_lo, q_hi = _token_range(question_tokens, "question_tokens", 0)
        chunk_tokens = checks.nonnegative_int(chunk_tokens, "chunk_tokens")
        if chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        cfg = self._config(recompute_ratio, policy)
        over = len(self._suffix_ids(""))  # the template's tokens around the question
        # (a question may merge with the template's tokens at its ends: 2 more either way)
        suffixes = range(max(1, over + q_lo - 2), over + q_hi + 3)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        longest = len(self._prefix_ids) + hi + suffixes[-1]
        if limit is not None and longest > limit:
            raise ValueError(f"prompts of up to {longest} tokens, but {self.lm.name} takes at most {limit}")
        out = {"points": 0, "fusions": 0, "graphs_recorded": 0, "seconds": 0.0}
        if not self.fast_path:
            return out
        from contextlib import ExitStack

        from chunkcache.format import pack_chunk
        from chunkcache.graphs import FusionGraphs
        from chunkcache.pipeline import fuse_entries

        t0 = time.perf_counter()
        spec, pool, cache = self.lm.spec, self.stagings(), self.device_cache
        prefix_kv = self.prefix_kv()
        base = len(self.variants()[0].sink_ids or self._prefix_ids)  # (any base: the same shapes)
        gen = torch.Generator().manual_seed(0)
        vocab = int(self.model.config.vocab_size)
        packed: dict[int, bytes] = {}

        def entry(t: int) -> bytes:  # a synthetic chunk of t tokens in this engine's format
            if t not in packed:
                ids = torch.randint(0, vocab, (t,), generator=gen)
                chunk = ChunkKV(token_ids=ids, kv=_synthetic_kv(self.lm, t), base_pos=base)
                packed[t] = pack_chunk(chunk, self.codec, self.key_info())
            return packed[t]

        with ExitStack() as held:
            stagings = [held.enter_context(pool.take()) for _ in range(pool.size)]
            shaped = stagings[0].graphs or FusionGraphs()  # (without graphs: the default buckets)
            points = warmup_points(
                shaped, cfg, spec.num_layers, len(self._prefix_ids), range(lo, hi + 1), suffixes
            )  # (every staging's graphs pad alike)
            for st in stagings:
                graphs = st.graphs or shaped
                before = graphs.captures
                for n_ctx, n_q in points:
                    lengths = [chunk_tokens] * (n_ctx // chunk_tokens) + [n_ctx % chunk_tokens] * (
                        n_ctx % chunk_tokens > 0
                    )
                    entries = [entry(t) for t in lengths]
                    suffix = torch.randint(0, vocab, (n_q,), generator=gen).tolist()
                    keys = [f"warmup:{i}:{t}" for i, t in enumerate(lengths)]
                    resident = None
                    if cache is not None and cache.max_bytes - cache.nbytes >= 2 * sum(map(len, entries)):
                        self._admit(keys, entries, [None] * len(keys))  # the zero-copy path as well
                        resident = cache.acquire(keys)
                    try:  # from the store's path first, then (where it fits) from the device cache
                        for use in range(max(graphs.min_uses, 2)):
                            zero_copy = use > 0 and resident is not None and None not in resident
                            fuse_entries(
                                self.lm, prefix_kv, [None] * len(keys) if zero_copy else entries,
                                self._prefix_ids, suffix, cfg, st, resident=resident if zero_copy else None,
                                arena=cache.arena if zero_copy else None,
                            )  # fmt: skip
                            out["fusions"] += 1
                    finally:
                        if resident is not None:
                            cache.release(keys, resident)
                            for k in keys:
                                cache.drop(k)
                out["points"] += len(points)
                out["graphs_recorded"] += graphs.captures - before
        if self.adaptive is not None and self.adaptive.enabled:
            out.update(self._warmup_adaptive(points, chunk_tokens, cfg, gen, vocab, base))
        if self.lm.device.type == "cuda":
            torch.cuda.synchronize(self.lm.device)
        out["seconds"] = time.perf_counter() - t0
        return out

    def _warmup_adaptive(
        self, points, chunk_tokens: int, cfg: FuseConfig, gen, vocab: int, base: int
    ) -> dict:
        """``warmup``'s part for adaptive loading: at each point, the streamed adaptive path
        (``_fuse_adaptive``: the stream into the staging's landing arena, the front on its own
        stream, the fusion behind both) over synthetic entries in a ``MemoryStore`` of its own,
        at every stored precision, for the splits whose fusions have graph shapes of their own
        (``fuse.graph_shapes``: k = 0, whose probe steps over a link end in halving steps, and
        the splits whose fetched chunks are all recomputed, e.g. the bootstrap's), plus k = 1
        (the front's path), each ``min_uses`` times on every staging: so the first adaptive calls
        compile and record nothing (session 9, H200: 4-5 s for a process's first such call).
        Then, unless fixed, the rates a plan needs besides the link's are measured on the
        last point (two full prefills; two fusions recomputing a third of the chunks in
        place, after their graphs exist): the prefill, the front (and the host's time to queue
        one) and the fusion's tail. The link is measured beside the first call's full prefill."""
        from contextlib import ExitStack

        from chunkcache.adaptive import Rates
        from chunkcache.format import pack_chunk
        from chunkcache.fuse import prefill
        from chunkcache.store import MemoryStore

        spec, pool, conf = self.lm.spec, self.stagings(), self.adaptive
        scratch = Rates(conf.smoothing)  # the compiling and recording calls' readings: dropped
        mem = MemoryStore()
        out = {"adaptive_fusions": 0}
        p0 = len(self._prefix_ids)
        last = None
        with ExitStack() as held:
            stagings = [held.enter_context(pool.take()) for _ in range(pool.size)]
            for j, (n_ctx, n_q) in enumerate(points):
                lengths = [chunk_tokens] * (n_ctx // chunk_tokens) + [n_ctx % chunk_tokens] * (
                    n_ctx % chunk_tokens > 0
                )
                lists = [torch.randint(0, vocab, (t,), generator=gen).tolist() for t in lengths]
                ids = [np.asarray(x, dtype="<i8").tobytes() for x in lists]
                for x in lists:
                    chunk = ChunkKV(
                        token_ids=torch.tensor(x), kv=_synthetic_kv(self.lm, len(x)), base_pos=base
                    )
                    for p in self.precisions:
                        ki = self.key_inputs_at(p)
                        mem.put(ki.key(x), pack_chunk(chunk, p, ki.to_dict()))
                keys = [self.key_inputs_at(self.codec).key(x) for x in lists]
                suffix = torch.randint(0, vocab, (n_q,), generator=gen).tolist()
                graphs = stagings[0].graphs
                splits, seen = [], set()
                for k in range(len(lengths)):
                    n_back = sum(lengths[k:])
                    ratio = min(1.0, cfg.recompute_ratio * n_ctx / n_back) if k else cfg.recompute_ratio
                    shapes = (
                        frozenset(
                            graph_shapes(
                                graphs,
                                FuseConfig(ratio, cfg.policy),
                                spec.num_layers,
                                p0 + n_ctx - n_back,
                                n_back,
                                n_q,
                            )  # fmt: skip
                        )
                        if graphs is not None
                        else frozenset([n_back if ratio >= 1 else 0])
                    )
                    if shapes not in seen or k == 1:
                        seen.add(shapes)
                        splits.append(k)
                for st in stagings:
                    uses = max(st.graphs.min_uses if st.graphs is not None else 1, 2)
                    for k in splits:
                        for p in self.precisions:
                            for _ in range(uses):
                                self._fuse_adaptive(keys, ids, suffix, cfg, time.perf_counter(), store=mem,
                                                    force=(k, p), rates=scratch, read_link=False, staging=st)  # fmt: skip
                                out["adaptive_fusions"] += 1
                if j < len(points) - 1:  # (the last point's entries stay: the rates are read there)
                    for key in list(mem.keys()):
                        mem.delete(key)
                last = (n_ctx, lengths, lists, ids, keys, suffix)
            if last is None:
                return out
            n_ctx, lengths, lists, ids, keys, suffix = last
            measured = []
            if conf.recompute_tokens_per_s is None:
                for _ in range(2):  # (the first reading is the warm-up)
                    t = time.perf_counter()
                    res = prefill(self.lm, self.prompt_ids_from(ids, suffix), p0, lengths)
                    res.logits.cpu()
                    self._rates.saw("prefill", n_ctx, time.perf_counter() - t)
                measured.append("prefill")
            if conf.fuse_tokens_per_s is None or conf.recompute_tokens_per_s is None:
                k = len(lengths) // 3
                for _ in range(2):
                    self._fuse_adaptive(keys, ids, suffix, cfg, time.perf_counter(), store=mem,
                                        force=(k, self.codec), read_link=False, staging=stagings[0])  # fmt: skip
                    out["adaptive_fusions"] += 1
                measured += ["recompute", "fuse"]
        out["rates_measured"] = measured
        return out

    # ---- query time ---------------------------------------------------------------------------
    def fuse(
        self,
        chunks: Sequence[str],
        query: str,
        recompute_ratio: float | None = None,
        policy: str | None = None,
    ) -> FuseResult:
        """Fuse the chunks' caches (any order; misses are precomputed) with the question."""
        cfg, keys, ids, suffix = self._check_query(chunks, query, recompute_ratio, policy)
        self._ensure_gate()
        t0 = time.perf_counter()
        if self.adaptive is not None and self.adaptive.enabled:
            return self._fuse_adaptive(keys, ids, suffix, cfg, t0)
        if self.batching is None:
            res = self._fuse_checked(keys, ids, suffix, cfg, t0, None)
        else:
            try:
                res = self._fuse_checked(keys, ids, suffix, cfg, t0, self.batcher().run)
            except BatchRetry:  # the batch it was in failed: alone, from scratch (its own error, if any)
                res = self._fuse_checked(keys, ids, suffix, cfg, t0, None)
        if self.adaptive is not None:  # turned off: the plain path, and the stats say so
            from chunkcache.adaptive import plan

            tokens = [len(b) // 8 for b in ids]
            res.stats["adaptive"] = plan(
                tokens, [{self.codec: 0}] * len(ids), None, None, enabled=False
            ).stats()
        return res

    def batcher(self) -> Batcher:
        """The fusion scheduler (``batching``), made on first use."""
        if self.batching is None:
            raise RuntimeError("this engine fuses each call on its own thread: pass batching=BatchConfig()")
        if self._batcher is None:
            with self._lock:
                if self._batcher is None:
                    self._batcher = Batcher(self.lm, self.batching)
        return self._batcher

    def _fuse_checked(self, keys, ids, suffix, cfg, t0: float, run) -> FuseResult:
        """``fuse`` after its checks: the fast path, else decode and fuse; ``run(job)`` fuses the
        prepared job (None: here, alone; ``Batcher.run``: in the next batch). Everything before it
        (lookups, loads, misses precomputed, assembly) runs on the caller's thread."""
        keys, infos = self._prompt_keys(keys, ids)
        if self.fast_path:
            res = self._fuse_stored(keys, ids, suffix, cfg, t0, run, infos)
            if res is not None:
                return res
        misses: dict = {}
        kvs = self._chunks(keys, ids, infos, misses)
        t_load = time.perf_counter() - t0
        job = assembled_job(self.lm, self.prefix_kv(), kvs, self._prefix_ids, suffix, cfg)
        res = run_job(self.lm, job) if run is None else run(job)
        res.stats["seconds"]["load"] = t_load  # text index, store read + decode (+ precompute of misses)
        res.stats["seconds"]["total"] += t_load
        if misses:  # encoded here, or waited for (another thread's encoding)
            res.stats["misses"] = misses
        return res

    def _ensure_gate(self) -> None:
        """Refuse fusion (FusionGateError) unless the correctness gate passed for this model:
        recorded in the store, else run once (``chunkcache.gate``, a fraction of a second)."""
        if self._gate_passed:
            return
        with self._gate_lock:
            if not self._gate_passed:
                from chunkcache.gate import ensure

                ensure(self)
                self._gate_passed = True

    def _config(self, recompute_ratio: float | None, policy: str | None) -> FuseConfig:
        """The ``FuseConfig`` of a call: the engine's ratio and policy where the call gives none."""
        return FuseConfig(
            recompute_ratio=self.default_fuse.recompute_ratio
            if recompute_ratio is None
            else checks.ratio(recompute_ratio),
            policy=policy or self.default_fuse.policy,
        )

    def _check_query(
        self, chunks: Sequence[str], query: str, recompute_ratio: float | None, policy: str | None
    ) -> tuple[FuseConfig, list[str], list[bytes], list[int]]:
        """The arguments of ``fuse``/``generate``, checked before any fusion work: ``(config, chunk
        keys, chunk ids as token_bytes, question suffix ids)`` (chunks seen before: from the text
        index, no tokeniser call). TypeError/ValueError for a str or non-list ``chunks``, a
        blank chunk, a missing or blank ``query``, a bad ratio or policy, or a prompt longer than
        the model's context."""
        checks.passages(chunks, query)
        cfg = self._config(recompute_ratio, policy)
        keys, ids = self.resolve(chunks)
        suffix = self._suffix_ids(query)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        n_ctx = sum(len(b) for b in ids) // 8
        n = len(self._prefix_ids) + n_ctx + len(suffix)
        if limit is not None and n > limit:
            raise ValueError(
                f"the prompt is {n} tokens ({len(ids)} chunks of {n_ctx}, question and "
                f"template {n - n_ctx}) but {self.lm.name} takes at most {limit}: pass fewer "
                "or shorter chunks"
            )
        return cfg, keys, ids, suffix

    def _fuse_stored(
        self,
        keys: list[str],
        ids: list[bytes],
        suffix: list[int],
        cfg: FuseConfig,
        t0: float,
        run=None,
        infos: list[dict] | None = None,
    ) -> FuseResult | None:
        """The fast path: stream the stored entries layer by layer (``pipeline.fuse_entries``)
        with a ``Staging`` of the pool. Misses (absent from the device cache and the store) are
        precomputed first, before the fusion queues for a staging (and again should an entry go
        missing between the check and the read); every entry's header, key inputs, tokens and geometry are checked as
        in ``_load`` before any of its KV is staged. A damaged or foreign entry (CorruptEntryError:
        from those checks, or from a layer checksum, which on CUDA is compared after the fusion ran
        but before its result is returned) is dropped with a warning and None is returned, so the
        caller takes the eager path, which recomputes it. None too when the store refused a write
        or lost an entry meanwhile (the eager path serves those). ``keys``/``infos``: the
        prompt's entries and the key inputs each must hold (``_prompt_keys``)."""
        from contextlib import ExitStack

        from chunkcache.pipeline import entry_views, fuse_entries

        def inspect(i: int, header: dict, parts: dict) -> None:  # token sections already checked
            if resident[i] is not None:  # its key inputs and tokens were checked when admitted
                if token_bytes(parts["token_ids"]) != ids[i]:
                    raise ModelMismatchError(
                        f"store entry {keys[i]} holds other tokens than the chunk asked for"
                    )
                return
            self._check_entry(keys[i], header, parts["token_ids"], ids[i], infos[i], entries[i])

        infos = infos or [self._of(0, i)[2] for i in ids]
        prefix_kv = self.prefix_kv()
        cache = self.device_cache
        held_here = cache.holds(keys) if cache is not None else [False] * len(keys)
        stored = self.store.contains_many([k for k, h in zip(keys, held_here, strict=True) if not h])
        misses: dict = {}
        if not all(stored):  # misses are precomputed before this fusion queues for a staging (else
            # it would queue twice: to find, then to fuse); with a device cache, written behind
            if self._precompute(_id_lists(ids), timing=misses, behind=cache is not None)[1]:
                return None  # a refused write: the eager path serves those from memory
        for attempt in range(2):
            damaged = False
            resident = cache.acquire(keys) if cache is not None else [None] * len(keys)
            need = [k for k, r in zip(keys, resident, strict=True) if r is None]
            with self.stagings().take() as staging, ExitStack() as held:
                if cache is not None:  # unpinned once the fusion queued its reads (or failed)
                    held.callback(cache.release, keys, list(resident))
                    if need and len(need) < len(keys) and staging.cuda and not staging.register(self.store):
                        # a mix needs direct copies (resident parts are device memory): without a
                        # registered map the store's entries go through pinned staging, so read all
                        resident, need = [None] * len(keys), list(keys)
                entries = [None] * len(keys)
                if need:
                    try:
                        views = iter(held.enter_context(entry_views(self.store, need, staging)))
                        entries = [next(views) if r is None else None for r in resident]
                    except KeyError:
                        if attempt:  # gone again (another process evicted it): the eager path serves it
                            return None
                        entries = None
                if entries is not None:
                    t_load = time.perf_counter() - t0
                    b = self.batching if run is not None else None
                    prep = nullcontext()  # (only with graphs: a result's KV is then the worker's copy)
                    if b is not None and b.prep_stream and staging.cuda and staging.graphs is not None:
                        prep = torch.cuda.stream(staging.prep_stream)
                    try:
                        with prep:
                            res = fuse_entries(
                                self.lm,
                                prefix_kv,
                                entries,
                                self._prefix_ids,
                                suffix,
                                cfg,
                                staging,
                                inspect=inspect,
                                resident=resident,
                                arena=cache.arena if cache is not None else None,
                                run=run,
                                preload=b is None or b.preload,
                            )
                    except CorruptEntryError:
                        damaged = True
                    else:
                        if cache is not None:
                            res.stats["device_cache"] = self._admit(keys, entries, resident)
                        res.stats["seconds"]["load"] = t_load  # text index, lookups (+ precompute of misses)
                        res.stats["seconds"]["total"] += t_load
                        res.stats["fast_path"] = True
                        if misses:  # encoded here, or waited for (another thread's encoding)
                            res.stats["misses"] = misses
                        return res
            if damaged:
                for key, i, f in zip(keys, ids, infos, strict=True):  # find and drop the damaged or foreign
                    self._load(key, i, f)  # ones (warns), then let the eager path recompute them
                return None
            if self._precompute(_id_lists(ids))[1]:  # skips the stored ones; a refused write:
                return None  # the eager path serves those from memory
        return None  # unreachable

    def _admit(self, keys: list[str], entries: list, resident: list) -> dict:
        """After a fast-path fusion verified them (headers, key inputs, token ids, every layer's
        checksum), keep the entries it read from the store in the device cache (inside the views,
        which the copies read). Returns the fusion's ``device_cache`` stats."""
        from chunkcache.codec import get_codec
        from chunkcache.format import unpack_parts

        admitted = 0
        for key, entry, r in zip(keys, entries, resident, strict=True):
            if r is None:
                header, parts = unpack_parts(entry, verify=False)
                admitted += self.device_cache.admit(key, header, parts, get_codec(header["codec"]).parts)
        return {"hits": sum(r is not None for r in resident), "admitted": admitted}

    def prompt_ids(self, chunks: Sequence[str], query: str) -> torch.Tensor:
        """``[1, N]`` the exact prompt ids fusion builds (for a full-prefill baseline)."""
        return self.prompt_ids_from(self.resolve(chunks)[1] if chunks else [], self._suffix_ids(query))

    def generate(
        self,
        chunks: Sequence[str],
        query: str,
        max_new_tokens: int = 64,
        recompute_ratio: float | None = None,
        policy: str | None = None,
        **generate_kwargs,
    ) -> str:
        """Fuse, then greedy-generate (or with ``generate_kwargs``) the answer text."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        self._sampling(generate_kwargs)  # bad sampling arguments fail before the fusion
        fused = self.fuse(chunks, query, recompute_ratio=recompute_ratio, policy=policy)
        return self.generate_from(fused, max_new_tokens=max_new_tokens, **generate_kwargs)

    def generate_from(self, fused: FuseResult, max_new_tokens: int = 64, **generate_kwargs) -> str:
        """The answer to a fused prompt (``generate`` after its fusion)."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        sampling = self._sampling(generate_kwargs)
        if sampling is None:
            return generate_text(
                self.lm, fused.input_ids, self._cache_kw(fused), max_new_tokens, **generate_kwargs
            )
        return answer_text(self.tokenizer, list(self.decoder.tokens(fused, max_new_tokens, sampling)))

    async def agenerate_from(self, fused: FuseResult, max_new_tokens: int = 64, **generate_kwargs) -> str:
        """``generate_from`` for asyncio: the event loop never blocks (over the batched decoder no
        thread waits for the answer either)."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        sampling = self._sampling(generate_kwargs)
        if sampling is None:
            return await asyncio.to_thread(self.generate_from, fused, max_new_tokens, **generate_kwargs)
        return answer_text(
            self.tokenizer, [t async for t in self.decoder.atokens(fused, max_new_tokens, sampling)]
        )

    def stream_from(self, fused: FuseResult, max_new_tokens: int = 64, **generate_kwargs) -> Iterator[str]:
        """The answer's text pieces as they are generated (``generation.stream_text``, or
        ``generation.token_text`` over the batched decoder)."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        sampling = self._sampling(generate_kwargs)
        if sampling is None:
            return stream_text(
                self.lm, fused.input_ids, self._cache_kw(fused), max_new_tokens, **generate_kwargs
            )
        return token_text(self.tokenizer, self.decoder.tokens(fused, max_new_tokens, sampling))

    def astream_from(
        self, fused: FuseResult, max_new_tokens: int = 64, **generate_kwargs
    ) -> AsyncIterator[str]:
        """``stream_from`` for asyncio (``generation.astream_text``, or ``generation.atoken_text``
        over the batched decoder): the event loop never blocks."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        sampling = self._sampling(generate_kwargs)
        if sampling is None:
            return astream_text(
                self.lm, fused.input_ids, self._cache_kw(fused), max_new_tokens, **generate_kwargs
            )
        return atoken_text(self.tokenizer, self.decoder.atokens(fused, max_new_tokens, sampling))

    def stream_generate(
        self,
        chunks: Sequence[str],
        query: str,
        max_new_tokens: int = 64,
        recompute_ratio: float | None = None,
        policy: str | None = None,
        **generate_kwargs,
    ) -> Iterator[str]:
        """``generate`` as text pieces while they are produced; closing it early stops the model.
        Bad arguments raise here; the fusion runs at the first ``next``."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        self._sampling(generate_kwargs)

        def pieces() -> Iterator[str]:
            fused = self.fuse(chunks, query, recompute_ratio=recompute_ratio, policy=policy)
            yield from self.stream_from(fused, max_new_tokens=max_new_tokens, **generate_kwargs)

        return pieces()

    # ---- asyncio: the blocking work runs in worker threads, never on the event loop ---------------
    async def afuse(
        self,
        chunks: Sequence[str],
        query: str,
        recompute_ratio: float | None = None,
        policy: str | None = None,
    ) -> FuseResult:
        return await asyncio.to_thread(self.fuse, chunks, query, recompute_ratio, policy)

    async def agenerate(
        self,
        chunks: Sequence[str],
        query: str,
        max_new_tokens: int = 64,
        recompute_ratio: float | None = None,
        policy: str | None = None,
        **generate_kwargs,
    ) -> str:
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        sampling = self._sampling(generate_kwargs)
        if sampling is None:
            return await asyncio.to_thread(
                self.generate, chunks, query, max_new_tokens, recompute_ratio, policy, **generate_kwargs
            )
        fused = await self.afuse(chunks, query, recompute_ratio, policy)
        return await self.agenerate_from(fused, max_new_tokens, **generate_kwargs)

    def astream_generate(
        self,
        chunks: Sequence[str],
        query: str,
        max_new_tokens: int = 64,
        recompute_ratio: float | None = None,
        policy: str | None = None,
        **generate_kwargs,
    ) -> AsyncIterator[str]:
        """``stream_generate`` for asyncio (``astream_from``). Bad arguments raise here."""
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        self._sampling(generate_kwargs)

        async def pieces() -> AsyncIterator[str]:
            fused = await self.afuse(chunks, query, recompute_ratio, policy)
            async for piece in self.astream_from(fused, max_new_tokens, **generate_kwargs):
                yield piece

        return pieces()

    # ---- decoding -------------------------------------------------------------------------------
    @property
    def decoder(self) -> Decoder:
        """The batched decoder (``decode_batching``), started on first use."""
        if self.decode_batching is None:
            raise RuntimeError(
                "this engine decodes through model.generate: pass decode_batching=DecodeConfig()"
            )
        if self._decoder is None:
            with self._lock:
                if self._decoder is None:
                    self._decoder = Decoder(self.lm, self.decode_batching)
        return self._decoder

    def _sampling(self, generate_kwargs: dict) -> Sampling | None:
        """The batched decoder's ``Sampling`` for these ``generate`` keyword arguments, or None:
        ``model.generate`` decodes (no ``decode_batching``, or arguments it does not do; those are
        warned about once). Bad sampling values raise; so does ``seed`` where ``model.generate``
        decodes (it draws from torch's global generator)."""
        if self.decode_batching is None:
            reasons = ["decode_batching is off"]
        else:
            sampling, reasons = sampling_from(generate_kwargs, self.model.generation_config)
            if sampling is not None:
                return sampling
            self._warn_once(
                "decode:" + ",".join(reasons),
                f"chunkcache: the batched decoder does not do {', '.join(reasons)}; these answers decode "
                "one at a time through model.generate",
            )
        if "seed" in generate_kwargs:
            raise ValueError(f"seed= needs the batched decoder ({', '.join(reasons)})")
        return None

    def _cache_kw(self, fused: FuseResult) -> dict:
        return {cache_kwarg(self.model): fused.fresh_cache()}


def _write_behind_loop(ref, q: queue.Queue) -> None:
    """The background writer of ``ChunkCache._write_behind``: store each handed entry, then let
    go of its claim. Holds the engine only while writing (ends when the engine is gone)."""
    while True:
        try:
            key, job = q.get(timeout=10.0)
        except queue.Empty:
            if ref() is None:  # the engine is gone and nothing is left to write
                return
            continue
        eng = ref()
        try:
            if eng is not None:
                if len(job) == 2:  # packed on the caller's thread
                    value, extra = job
                else:  # the parts encoded on the device: to the host and serialised here
                    chunk, variant, parts, done = job
                    if done is not None:
                        done.synchronize()
                    value, extra = eng._pack(chunk, variant, parts)
                    del chunk, parts, job
                eng._put(key, value, extra)  # a refusal is warned and counted there
        except BaseException as e:  # never kill the writer: warn, the claim is still let go
            if eng is not None:
                eng._warn_once("write", f"chunkcache: a background store write failed ({e!r})")
        finally:
            if eng is not None:
                eng._unclaim([key])
            del eng
            q.task_done()


def _flush_at_exit(ref) -> None:
    eng = ref()
    if eng is not None:
        eng.flush()


def _synthetic_kv(lm, tokens: int) -> torch.Tensor:
    """Random K/V ``[L, 2, H, tokens, D]`` in the model's dtype on its device (the warm-up's
    synthetic chunks: made and encoded on the device, as precompute encodes; on the CPU an 8B
    chunk's int2m encoding takes seconds, session 10's first H200 warm-up spent 80 s there)."""
    spec = lm.spec
    shape = (spec.num_layers, 2, spec.kv_heads, tokens, spec.head_dim)
    g = torch.Generator(device=lm.device).manual_seed(tokens)
    return torch.randn(shape, generator=g, device=lm.device, dtype=torch.float32).to(lm.dtype)


def _timed(device: torch.device, fn):
    """``(fn(), seconds)``: ``seconds()`` is how long ``fn``'s work ran, on a GPU its device span
    (CUDA events: the host returns once the work is queued), to be called once it is done."""
    if device.type != "cuda":
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        return out, lambda: dt
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()

    def seconds() -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return out, seconds


def _token_range(value, what: str, least: int) -> tuple[int, int]:
    """``(lo, hi)`` token counts, ``least <= lo <= hi``; a clear error otherwise."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"{what} must be a pair of ints (lo, hi), got {value!r}")
    lo, hi = value
    if not least <= lo <= hi:
        raise ValueError(f"{what} must satisfy {least} <= lo <= hi, got {value!r}")
    return lo, hi


def _check_text(text) -> None:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a chunk must be non-empty text (got a blank or non-string chunk)")


def _id_lists(ids: Sequence[bytes]) -> list[list[int]]:
    return [np.frombuffer(b, "<i8").tolist() for b in ids]


def _open_store(store, readonly: bool = False):
    from chunkcache.store import open_store

    return open_store(store, readonly=True) if readonly else open_store(store)
