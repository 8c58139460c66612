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
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from chunkcache.errors import ModelMismatchError
from chunkcache.fuse import FuseConfig, FuseResult, fuse_kv
from chunkcache.keys import KeyInputs
from chunkcache.layout import ChunkKV
from chunkcache.model import DEFAULT_MODEL, LoadedModel, cache_kwarg, load_model, wrap_model
from chunkcache.precompute import encode_chunks, encode_prefix
from chunkcache.template import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, PromptTemplate

log = logging.getLogger("chunkcache")

FORMAT_VERSION = 1
"""Bump when the bytes a chunk cache is made of change meaning (layout, sink handling, ...)."""


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
    ) -> None:
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        if isinstance(model, str):
            self.lm: LoadedModel = load_model(model, dtype=dtype, device=device)
        else:
            if tokenizer is None:
                raise ValueError("pass tokenizer= with a model object")
            self.lm = wrap_model(model, tokenizer)
        self.template = PromptTemplate.from_tokenizer(
            self.lm.tokenizer, instruction=instruction, system=system
        )
        self.settings = PrecomputeConfig(sink=sink)
        self.default_fuse = FuseConfig(recompute_ratio=recompute_ratio, policy=policy)
        self.codec = codec
        self.store = _open_store(store)
        self._prefix_ids = self.template.prefix_ids()
        self._prefix_kv: torch.Tensor | None = None
        self._key_inputs: KeyInputs | None = None
        self.fast_path = self.lm.device.type == "cuda" if fast_path is None else fast_path
        """Fuse stored entries through ``pipeline.fuse_entries`` (layer-wise streaming, one kernel per
        layer, GPU-side checksums, CUDA graphs): the default on CUDA. Calls are serialised per
        engine (one ``Staging``)."""
        self._staging = None

    # ---- accessors ------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.lm.model

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    # ---- keys and storage -------------------------------------------------------------------
    def key_inputs(self) -> KeyInputs:
        """Everything besides the token ids that determines a chunk cache's bytes. Fixed for the
        engine's life, so it is built once."""
        if self._key_inputs is None:
            self._key_inputs = KeyInputs(
                model_fingerprint=self.lm.fingerprint,
                dtype=str(self.lm.dtype).removeprefix("torch."),
                codec=self.codec,
                settings={"sink": self.settings.sink, "sink_ids": self.template.sink_ids(self.settings.sink)},
                format_version=FORMAT_VERSION,
            )
        return self._key_inputs

    def key_info(self) -> dict:
        """``key_inputs()`` in its JSON-safe form, as entry headers store it (a fresh copy each call)."""
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
        """The stored chunk under ``key`` or None. A damaged entry is dropped (a miss); an entry
        whose recorded key inputs or token ids differ from what this engine asked for raises
        ModelMismatchError: it must never be used, and it is not ours to delete."""
        from chunkcache.format import load_chunk

        chunk = load_chunk(self.store, key, self.lm.dtype)
        if chunk is None:
            return None
        self._check_entry(key, chunk.meta, chunk.token_ids, ids)
        chunk.check(self.lm.spec.num_layers, self.lm.spec.kv_heads, self.lm.spec.head_dim)
        return chunk

    def _check_entry(self, key: str, meta: dict, token_ids: torch.Tensor, ids: Sequence[int] | None) -> None:
        """Raise ModelMismatchError if the entry's recorded key inputs (``meta["key_info"]``) or
        token ids differ from what this engine asked for."""
        stored, mine = meta.get("key_info"), self.key_info()
        if stored is not None and stored != mine:
            diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
            raise ModelMismatchError(
                f"store entry {key} was made with other {', '.join(diff)} than this engine's"
            )
        if ids is not None and token_ids.tolist() != list(ids):
            raise ModelMismatchError(f"store entry {key} holds other tokens than the chunk asked for")

    def _save(self, key: str, chunk: ChunkKV) -> None:
        from chunkcache.format import pack_chunk

        self.store.put(key, pack_chunk(chunk, self.codec, self.key_info()))

    # ---- precompute -------------------------------------------------------------------------
    def precompute(
        self, texts: Sequence[str], batch_size: int = 8, progress: bool | None = None
    ) -> list[str]:
        """Make sure every text has a stored chunk cache; returns their keys. Idempotent."""
        return self.precompute_ids([self._chunk_ids(t) for t in texts], batch_size, progress)

    def precompute_ids(
        self, id_lists: Sequence[Sequence[int]], batch_size: int = 8, progress: bool | None = None
    ) -> list[str]:
        """Like ``precompute`` for already tokenised chunks; skips chunks already stored."""
        keys = [self.key_for_ids(ids) for ids in id_lists]
        missing: dict[str, Sequence[int]] = {}
        for k, ids in zip(keys, id_lists, strict=True):
            if k not in missing and not self.store.contains(k):
                missing[k] = ids
        if not missing:
            return keys
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
                chunk.meta["key_info"] = self.key_info()
                self._save(k, chunk)
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()
        return keys

    def chunk(self, text: str) -> ChunkKV:
        """The cache of one chunk (precomputed if missing)."""
        return self.chunks([text])[0]

    def chunks(self, texts: Sequence[str]) -> list[ChunkKV]:
        ids = [self._chunk_ids(t) for t in texts]
        keys = [self.key_for_ids(i) for i in ids]
        out = [self._load(k, i) for k, i in zip(keys, ids, strict=True)]
        miss = [i for i, c in enumerate(out) if c is None]
        if miss:
            self.precompute_ids([ids[i] for i in miss])
            for i in miss:
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
        if not chunks:
            raise ValueError("no chunks to fuse: pass at least one passage (or call the model directly)")
        cfg = FuseConfig(
            recompute_ratio=self.default_fuse.recompute_ratio if recompute_ratio is None else recompute_ratio,
            policy=policy or self.default_fuse.policy,
        )
        suffix = self.template.suffix_ids(query)
        if self.fast_path:
            res = self._fuse_stored(chunks, suffix, cfg)
            if res is not None:
                return res
        t0 = time.perf_counter()
        kvs = self.chunks(chunks)
        t_load = time.perf_counter() - t0
        res = fuse_kv(self.lm, self.prefix_kv(), kvs, self._prefix_ids, suffix, cfg)
        res.stats["seconds"]["load"] = t_load  # store read + decode (+ precompute of misses)
        res.stats["seconds"]["total"] += t_load
        return res

    def _fuse_stored(self, chunks: Sequence[str], suffix: list[int], cfg: FuseConfig) -> FuseResult | None:
        """The fast path: stream the stored entries layer by layer (``pipeline.fuse_entries``).
        Misses are precomputed first; every entry's recorded key inputs and token ids are checked
        as in ``_load`` (ModelMismatchError). A damaged entry (CorruptEntryError, raised before any
        result is returned) is dropped with a warning and None is returned, so the caller takes the
        eager path, which recomputes it."""
        from chunkcache.errors import CorruptEntryError
        from chunkcache.format import load_chunk
        from chunkcache.pipeline import Staging, entry_views, fuse_entries

        ids = [self._chunk_ids(t) for t in chunks]
        t0 = time.perf_counter()
        keys = self.precompute_ids(ids)  # skips stored ones
        if self._staging is None:
            self._staging = Staging(self.lm.device)

        def inspect(i: int, header: dict, parts: dict) -> None:  # token sections already checked
            self._check_entry(keys[i], header.get("meta", {}), parts["token_ids"], ids[i])

        try:
            with entry_views(self.store, keys, self._staging) as entries:
                t_load = time.perf_counter() - t0
                res = fuse_entries(
                    self.lm, self.prefix_kv(), entries, self._prefix_ids, suffix, cfg, self._staging,
                    inspect=inspect,
                )  # fmt: skip
        except CorruptEntryError:
            for key in keys:  # find and drop the damaged ones (warns), then let the eager path recompute
                load_chunk(self.store, key)
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


def _open_store(store):
    from chunkcache.store import open_store

    return open_store(store)
