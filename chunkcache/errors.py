"""The exceptions chunkcache raises on purpose, so callers can catch them by kind.

Every error a user can act on (a damaged entry, a full disk, a read-only path, a cache made by
another model) is one of these, with a message that says what happened and what to do; none of
them leaks a traceback from deep inside lmdb or torch.

    try: chunk = unpack_chunk(raw)
    except CorruptEntryError as e: print("damaged:", e)
    # store errors: except StoreFullError / StoreReadOnlyError
"""

from __future__ import annotations

__all__ = [
    "ChunkCacheError",
    "CorruptEntryError",
    "ForeignEntryError",
    "FusionGateError",
    "ModelMismatchError",
    "ModelNotFoundError",
    "StaleEntryError",
    "StoreError",
    "StoreFullError",
    "StoreReadOnlyError",
    "UnsupportedModelError",
]


class ChunkCacheError(Exception):
    """Base class of every error chunkcache raises deliberately."""


class CorruptEntryError(ChunkCacheError):
    """A stored chunk entry is damaged: bad magic, truncated, malformed header or checksum mismatch."""


class StaleEntryError(CorruptEntryError):
    """An entry of another format version: not damaged, just unreadable by this build. Readers
    treat it as a miss without a warning; ``verify`` and ``evict`` report and remove it as stale.
    (A subclass of CorruptEntryError so that a caller catching damage never uses one either.)"""

    def __init__(self, message: str, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


class ForeignEntryError(CorruptEntryError):
    """A well-formed entry that does not belong under its key: its key inputs are missing, disagree
    with its header, differ from the engine's, or do not hash (with its token ids) to the key.
    Never used; the engine replaces it under its own key."""


class ModelMismatchError(ChunkCacheError):
    """A chunk cache was made by a model (or shape) other than the one asking for it."""


class ModelNotFoundError(ChunkCacheError):
    """A model name is no alias, no existing folder or ``.gguf`` file and no loadable hub id."""


class FusionGateError(ChunkCacheError):
    """The correctness gate found fusion at ratio 1 disagreeing with a full prefill of this model
    beyond the dtype's tolerance (``chunkcache.gate``): fused caches would be wrong for it."""


class StoreError(ChunkCacheError):
    """A chunk store cannot be opened or used (bad path, carried across fork, opened twice, ...)."""


class StoreFullError(StoreError):
    """The store cannot take the write: the disk is full or one value exceeds the size cap."""


class StoreReadOnlyError(StoreError):
    """The store was opened read-only, or its path cannot be written."""


class UnsupportedModelError(ChunkCacheError):
    """The model's architecture or RoPE variant cannot be fused exactly (raised at load)."""
