"""ChunkCache: the user-facing engine tying model, template, precompute, store and fusion together.

What it knows: the order of operations (tokenise -> look up -> precompute misses -> fuse ->
generate); on CUDA, fusing streams the stored entries through ``pipeline.fuse_entries`` (the
fast path), elsewhere it decodes them and calls ``fuse.fuse_kv``. What it does not know: the
maths of fusion (``fuse``), token selection (``select``), bytes on disk (``format``, ``store``).

    engine = ChunkCache(model="smollm2-135m", store=None)     # store="path/to/dir" for LMDB
    engine.precompute(["passage one ...", "passage two ..."])
    print(engine.generate(["passage two ...", "passage one ..."], "question?", max_new_tokens=32))
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chunkcache import checks
from chunkcache.errors import CorruptEntryError, ForeignEntryError, StoreError
from chunkcache.format import FORMAT_VERSION
from chunkcache.fuse import FuseConfig, FuseResult, fuse_kv
from chunkcache.keys import KeyInputs
from chunkcache.layout import ChunkKV
from chunkcache.model import DEFAULT_MODEL, LoadedModel, cache_kwarg, load_model, wrap_model
from chunkcache.precompute import encode_chunks, encode_prefix
from chunkcache.template import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, PromptTemplate

log = logging.getLogger("chunkcache")


@dataclass(frozen=True)
class PrecomputeConfig:
    """What changes the bytes of a precomputed chunk cache (part of every key)."""

    sink: str = "prefix"
    """Attention sink the chunk is encoded behind: the template ``prefix`` (default; measured to
    fuse better, see BENCHMARKS.md) or ``bos`` (one token; caches then survive a change of the
    instruction or system prompt)."""

    def __post_init__(self) -> None:
        if self.sink not in ("bos", "prefix"):
            raise ValueError(f"sink must be 'bos' or 'prefix', got {self.sink!r}")


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
        policy: str = "qfast",
        recompute_ratio: float = 0.15,
        instruction: str = DEFAULT_INSTRUCTION,
        system: str | None = DEFAULT_SYSTEM,
        fast_path: bool | None = None,
        readonly: bool = False,
    ) -> None:
        # Every argument is checked before the model loads (seconds) or the store opens.
        dtype = checks.dtype(dtype)
        device = checks.device(device)
        settings = PrecomputeConfig(sink=sink)
        default_fuse = FuseConfig(recompute_ratio=checks.ratio(recompute_ratio), policy=policy)
        checks.codec(codec)
        if not readonly:
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
        self._key_inputs: KeyInputs | None = None
        self._warned: set[str] = set()  # one warning per kind (failed writes, a foreign store)
        self.fast_path = self.lm.device.type == "cuda" if fast_path is None else fast_path
        """Fuse stored entries through ``pipeline.fuse_entries`` (layer-wise streaming, one kernel per
        layer, GPU-side checksums, CUDA graphs): the default on CUDA. Calls are serialised per
        engine (one ``Staging``)."""
        self._staging = None
        self._gate_passed = False
        self._gate_lock = threading.Lock()

    # ---- accessors ------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    # ---- keys and storage -------------------------------------------------------------------
    def key_inputs(self) -> KeyInputs:
        """Everything besides the token ids that determines a chunk cache's bytes (``keys.KeyInputs``:
        model fingerprint, dtype, codec, sink settings, format version). Fixed for the engine's
        life, so it is built once. Its dict form is stored once per entry (the header's ``key``)."""
        if self._key_inputs is None:
            settings = {"sink": self.settings.sink, "sink_ids": self.template.sink_ids(self.settings.sink)}
            self._key_inputs = KeyInputs(
                self.lm.fingerprint, str(self.lm.dtype).removeprefix("torch."), self.codec,
                _jsonable(settings), FORMAT_VERSION,
            )  # fmt: skip
        return self._key_inputs

    def key_info(self) -> dict:
        """``key_inputs()`` as a JSON-safe dict (a fresh copy each call), as stored in entry headers."""
        return self.key_inputs().to_dict()

    def key_for_ids(self, ids: Sequence[int]) -> str:
        return self.key_inputs().key(list(ids))

    def key(self, text: str) -> str:
        return self.key_for_ids(self._chunk_ids(text))

    def contains(self, texts: Sequence[str]) -> list[bool]:
        """Whether each text's cache is in the store (no decoding, no hit counted)."""
        return self.store.contains_many([self.key(t) for t in texts])

    def _chunk_ids(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a chunk must be non-empty text (got a blank or non-string chunk)")
        return self.template.chunk_ids(text)

    def _load(self, key: str, ids: Sequence[int] | None = None) -> ChunkKV | None:
        """The stored chunk under ``key`` or None. A damaged entry, or one that is not this
        engine's (``_check_entry``), is dropped with a warning and reads as a miss: the caller
        recomputes it and stores it under this engine's key, so it never blocks the chunk."""
        from chunkcache.format import load_chunk

        return load_chunk(
            self.store, key, self.lm.dtype, check=lambda h, c: self._check_entry(key, h, c.token_ids, ids)
        )

    def _check_entry(
        self, key: str, header: dict, token_ids: torch.Tensor, ids: Sequence[int] | None
    ) -> None:
        """Raise ``ForeignEntryError`` unless the entry (``header`` checked by ``format.read_header``)
        is this engine's chunk: its one copy of the key inputs equals this engine's and hashes with
        its tokens to ``key`` (``format.check_identity``), its tokens are the chunk's, and its
        geometry is this model's (layers, kv heads, head_dim, tokens, base position). Both paths
        call it before any byte of the entry's KV is used."""
        from chunkcache.format import check_identity

        check_identity(key, header, token_ids, self.key_info())
        if ids is not None and token_ids.tolist() != list(ids):
            raise ForeignEntryError("entry holds other tokens than the chunk asked for")
        spec = self.lm.spec
        want = [spec.num_layers, 2, spec.kv_heads, len(token_ids), spec.head_dim]
        if header["kv_shape"] != want:
            raise ForeignEntryError(f"entry's kv_shape {header['kv_shape']} is not this model's {want}")
        base = len(self.key_inputs().settings["sink_ids"])
        if header["base_pos"] != base:
            raise ForeignEntryError(f"entry's base_pos {header['base_pos']} is not the sink's length {base}")

    def _save(self, key: str, chunk: ChunkKV) -> bytes | None:
        """Store the chunk; None when stored, else its packed bytes: a store that cannot take the
        write (full disk, Redis down or out of memory, read-only) must not stop serving, so the
        caller uses these and the failure is warned about once and counted
        (``store.stats().failed_writes``)."""
        from chunkcache.format import pack_chunk

        raw = pack_chunk(chunk, self.codec, self.key_info())
        try:
            self.store.put(key, raw)
        except StoreError as e:
            self._warn_once("write", f"chunkcache: cannot write to the chunk store ({e}); serving the "
                            "computed KV without storing it (further failures are counted in "
                            "store.stats().failed_writes, not warned)")  # fmt: skip
            return raw
        return None

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            import warnings

            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _check_store_models(self) -> None:
        """Before the first precompute into a non-empty store: warn (once) if none of a few sampled
        entries was made with this engine's key inputs, naming the fields that differ (another codec,
        dtype, model, sink): this engine can never hit them and builds its own copy of the corpus
        beside them. Headers only, a handful of keys."""
        if "models" in self._warned:
            return
        self._warned.add("models")
        from chunkcache.store import foreign_store

        try:
            diff = foreign_store(self.store, self.key_info(), 8)
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
        return self.precompute_ids([self._chunk_ids(t) for t in texts], batch_size, progress)

    def precompute_ids(
        self, id_lists: Sequence[Sequence[int]], batch_size: int = 8, progress: bool | None = None
    ) -> list[str]:
        """Like ``precompute`` for already tokenised chunks; skips chunks already stored."""
        return self._precompute(id_lists, batch_size, progress)[0]

    def _precompute(
        self, id_lists: Sequence[Sequence[int]], batch_size: int = 8, progress: bool | None = None
    ) -> tuple[list[str], dict[str, bytes]]:
        """``precompute_ids``, plus the packed entries the store could not take (key -> bytes), for
        the caller to serve from."""
        keys = [self.key_for_ids(ids) for ids in id_lists]
        missing: dict[str, Sequence[int]] = {}
        for k, ids, there in zip(keys, id_lists, self.store.contains_many(keys), strict=True):
            if k not in missing and not there:
                missing[k] = ids
        unsaved: dict[str, bytes] = {}
        if not missing:
            return keys, unsaved
        self._check_store_models()
        if progress is None:
            progress = len(missing) > 32
        sink = self.template.sink_ids(self.settings.sink)
        todo = list(missing.items())
        # Encode and store in slices so an interrupted run keeps what it finished.
        step = max(batch_size, 1) * 4
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="precompute", unit="chunk")
        for s in range(0, len(todo), step):
            part = todo[s : s + step]
            encoded = encode_chunks(self.lm, [ids for _, ids in part], sink, batch_size=batch_size)
            for (k, _), chunk in zip(part, encoded, strict=True):
                chunk.meta["sink"] = self.settings.sink
                raw = self._save(k, chunk)
                if raw is not None:
                    unsaved[k] = raw
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        return keys, unsaved

    def chunk(self, text: str) -> ChunkKV:
        """The cache of one chunk (precomputed if missing)."""
        return self.chunks([text])[0]

    def chunks(self, texts: Sequence[str]) -> list[ChunkKV]:
        return self._chunks_for_ids([self._chunk_ids(t) for t in texts])

    def _chunks_for_ids(self, ids: list[list[int]]) -> list[ChunkKV]:
        from chunkcache.format import unpack_chunk

        keys = [self.key_for_ids(i) for i in ids]
        out = [self._load(k, i) for k, i in zip(keys, ids, strict=True)]
        miss = [i for i, c in enumerate(out) if c is None]
        if miss:
            _, unsaved = self._precompute([ids[i] for i in miss])
            for i in miss:
                if keys[i] in unsaved:  # the store refused the write: serve the entry it would hold
                    out[i] = unpack_chunk(unsaved[keys[i]], self.lm.dtype)
                    continue
                out[i] = self._load(keys[i], ids[i])
                if out[i] is None:
                    raise RuntimeError(
                        f"chunk {keys[i]} was precomputed but cannot be read back from the store"
                    )
        return out  # type: ignore[return-value]

    def prefix_kv(self) -> torch.Tensor:
        if self._prefix_kv is None:
            self._prefix_kv = encode_prefix(self.lm, self._prefix_ids)
        return self._prefix_kv

    # ---- query time ---------------------------------------------------------------------------
    def fuse(
        self,
        chunks: Sequence[str],
        query: str,
        recompute_ratio: float | None = None,
        policy: str | None = None,
    ) -> FuseResult:
        """Fuse the chunks' caches (any order; misses are precomputed) with the question."""
        cfg, ids, suffix = self._check_query(chunks, query, recompute_ratio, policy)
        self._ensure_gate()
        if self.fast_path:
            res = self._fuse_stored(ids, suffix, cfg)
            if res is not None:
                return res
        t0 = time.perf_counter()
        kvs = self._chunks_for_ids(ids)
        t_load = time.perf_counter() - t0
        res = fuse_kv(self.lm, self.prefix_kv(), kvs, self._prefix_ids, suffix, cfg)
        res.stats["seconds"]["load"] = t_load  # store read + decode (+ precompute of misses)
        res.stats["seconds"]["total"] += t_load
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

    def _check_query(
        self, chunks: Sequence[str], query: str, recompute_ratio: float | None, policy: str | None
    ) -> tuple[FuseConfig, list[list[int]], list[int]]:
        """The arguments of ``fuse``/``generate``, checked before any fusion work: ``(config, chunk
        ids, question suffix ids)``. TypeError/ValueError for a str or non-list ``chunks``, a
        blank chunk, a missing or blank ``query``, a bad ratio or policy, or a prompt longer than
        the model's context."""
        checks.passages(chunks, query)
        cfg = FuseConfig(
            recompute_ratio=self.default_fuse.recompute_ratio
            if recompute_ratio is None
            else checks.ratio(recompute_ratio),
            policy=policy or self.default_fuse.policy,
        )
        ids = [self.template.chunk_ids(t) for t in chunks]
        suffix = self.template.suffix_ids(query)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        n = len(self._prefix_ids) + sum(map(len, ids)) + len(suffix)
        if limit is not None and n > limit:
            raise ValueError(
                f"the prompt is {n} tokens ({len(ids)} chunks of {sum(map(len, ids))}, question and "
                f"template {n - sum(map(len, ids))}) but {self.lm.name} takes at most {limit}: pass fewer "
                "or shorter chunks"
            )
        return cfg, ids, suffix

    def _fuse_stored(self, ids: list[list[int]], suffix: list[int], cfg: FuseConfig) -> FuseResult | None:
        """The fast path: stream the stored entries layer by layer (``pipeline.fuse_entries``).
        Misses are precomputed first; every entry's header, key inputs, tokens and geometry are
        checked as in ``_load`` before any of its KV is staged. A damaged or foreign entry
        (CorruptEntryError: from those checks, or from a layer checksum, which on CUDA is compared
        after the fusion ran but before its result is returned) is dropped with a warning and None
        is returned, so the caller takes the eager path, which recomputes it. None too when the
        store refused a write (the eager path serves those chunks from memory)."""
        from chunkcache.pipeline import Staging, entry_views, fuse_entries

        t0 = time.perf_counter()
        keys, unsaved = self._precompute(ids)  # skips stored ones
        if unsaved:  # the store refused a write: the eager path serves those from memory
            return None
        if self._staging is None:
            self._staging = Staging(self.lm.device)

        def inspect(i: int, header: dict, parts: dict) -> None:  # token sections already checked
            self._check_entry(keys[i], header, parts["token_ids"], ids[i])

        try:
            with entry_views(self.store, keys, self._staging) as entries:
                t_load = time.perf_counter() - t0
                res = fuse_entries(
                    self.lm, self.prefix_kv(), entries, self._prefix_ids, suffix, cfg, self._staging,
                    inspect=inspect,
                )  # fmt: skip
        except (CorruptEntryError, KeyError):  # KeyError: deleted meanwhile (another thread or process)
            for key, i in zip(keys, ids, strict=True):  # find and drop the damaged or foreign ones
                self._load(key, i)  # (warns), then let the eager path recompute them
            return None
        res.stats["seconds"]["load"] = t_load  # lookup, checks (+ precompute of misses)
        res.stats["seconds"]["total"] += t_load
        res.stats["fast_path"] = True
        return res

    def prompt_ids(self, chunks: Sequence[str], query: str) -> torch.Tensor:
        """``[1, N]`` the exact prompt ids fusion builds (for a full-prefill baseline)."""
        return self.template.build([self.template.chunk_ids(t) for t in chunks], query)

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
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        fused = self.fuse(chunks, query, recompute_ratio=recompute_ratio, policy=policy)
        return self.generate_from(fused, max_new_tokens=max_new_tokens, **generate_kwargs)

    @torch.no_grad()
    def generate_from(self, fused: FuseResult, max_new_tokens: int = 64, **generate_kwargs) -> str:
        kwargs = {
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        }
        kwargs.update(generate_kwargs)
        ids = fused.input_ids.to(self.lm.device)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **{cache_kwarg(self.model): fused.fresh_cache()},
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def _jsonable(x):
    import json

    return json.loads(json.dumps(x))


def _open_store(store, readonly: bool = False):
    from chunkcache.store import open_store

    return open_store(store, readonly=True) if readonly else open_store(store)
