"""Chunk identity: a deterministic hash of exactly what changes a chunk's stored KV bytes.

A key is the blake2b-256 hex digest of: the token ids (little-endian int64), the model
fingerprint, the stored dtype, the codec, the precompute settings (canonical sorted JSON) and the
entry format version. Nothing else goes in (no paths, no time, never Python's ``hash()``), so the
same chunk computed anywhere by the same model and settings lands on the same key.

    key = chunk_key([1, 2, 3], "smollm2-135m@abc", "bfloat16", "int4", {"sink": "bos"}, 1)
    inputs = KeyInputs("smollm2-135m@abc", "bfloat16", "int4", {"sink": "bos"}, 1)
    inputs.key([1, 2, 3]) == key   # True; inputs.to_dict() goes into the entry header
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

__all__ = ["KeyInputs", "chunk_key", "canonical_json", "diff_key_info", "token_bytes"]

_DOMAIN = b"chunkcache/chunk-key/v1\x00"


def canonical_json(obj: object) -> str:
    """Sorted, compact, ASCII JSON; refuses NaN and non-JSON types (so equal settings hash equal)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


_LITTLE = sys.byteorder == "little"


def token_bytes(token_ids: torch.Tensor | np.ndarray | Sequence[int]) -> bytes:
    """Token ids -> little-endian int64 bytes. Accepts a 1-D tensor, array or list of ints."""
    if (  # the common case (an entry's token section, a prompt's ids): no conversions to check
        type(token_ids) is torch.Tensor
        and token_ids.dtype == torch.int64
        and token_ids.dim() == 1
        and token_ids.device.type == "cpu"
        and _LITTLE
    ):
        return token_ids.detach().numpy().tobytes()
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().to("cpu").numpy()
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token_ids must be integers, got {arr.dtype}")
    return arr.astype("<i8", copy=False).tobytes()


def chunk_key(
    token_ids: torch.Tensor | np.ndarray | Sequence[int],  # [tokens]
    model_fingerprint: str,
    dtype: str,
    codec: str,
    settings: dict,
    format_version: int,
) -> str:
    """The store key of one chunk: 64 hex chars of blake2b-256 over exactly these inputs."""
    h = _inputs_hash(model_fingerprint, dtype, codec, settings, format_version)
    h.update(token_bytes(token_ids))
    return h.hexdigest()


def _inputs_hash(model_fingerprint: str, dtype: str, codec: str, settings: dict, format_version: int):
    """The blake2b state after everything a key hashes but the token ids (``chunk_key``)."""
    inputs = canonical_json(
        {
            "model": str(model_fingerprint),
            "dtype": str(dtype),
            "codec": str(codec),
            "settings": settings,
            "format_version": int(format_version),
        }
    ).encode()
    h = hashlib.blake2b(digest_size=32)
    h.update(_DOMAIN)
    h.update(struct.pack("<Q", len(inputs)))  # length prefix: the JSON/token boundary is unambiguous
    h.update(inputs)
    return h


@dataclass(frozen=True)
class KeyInputs:
    """Everything a key hashes except the token ids (which an entry stores anyway)."""

    model_fingerprint: str
    """Identifies the model weights and architecture (the engine computes it)."""
    dtype: str
    """The dtype the KV was computed and stored in, e.g. ``"bfloat16"``."""
    codec: str
    """Codec name from ``codec.CODECS``."""
    settings: dict
    """Precompute settings that change the KV bytes (sink kind, template, ...); JSON-safe."""
    format_version: int
    """Entry format version: ``format.FORMAT_VERSION`` (its one definition) for every entry made now."""

    def __post_init__(self) -> None:
        canonical_json(self.settings)  # fail early on settings that cannot be hashed canonically

    def key(self, token_ids: torch.Tensor | np.ndarray | Sequence[int]) -> str:
        """``chunk_key`` of these inputs and ``token_ids`` (the inputs' part hashed once per object:
        a copy of that state per key, so many threads may call it at once)."""
        h = self._hashed.copy()
        h.update(token_bytes(token_ids))
        return h.hexdigest()

    @cached_property
    def _hashed(self):
        return _inputs_hash(
            self.model_fingerprint, self.dtype, self.codec, self.settings, self.format_version
        )

    def to_dict(self) -> dict:
        """JSON-safe form, as stored in an entry header under ``"key"``."""
        return {
            "model_fingerprint": self.model_fingerprint,
            "dtype": self.dtype,
            "codec": self.codec,
            "settings": json.loads(canonical_json(self.settings)),
            "format_version": self.format_version,
        }

    @classmethod
    def from_dict(cls, d: dict) -> KeyInputs:
        """Inverse of ``to_dict``, strict (it reads entry headers): KeyError if a field is missing,
        TypeError if one has the wrong type, ValueError for unknown fields."""
        if not isinstance(d, dict):
            raise TypeError(f"key inputs must be an object, got {type(d).__name__}")
        extra = set(d) - set(_FIELDS)
        if extra:
            raise ValueError(f"unknown key input fields {sorted(extra)}")
        for name, kind in _FIELDS.items():
            if not isinstance(d[name], kind) or isinstance(d[name], bool):
                raise TypeError(f"key input {name!r} must be {kind.__name__}, got {type(d[name]).__name__}")
        return cls(d["model_fingerprint"], d["dtype"], d["codec"], dict(d["settings"]), d["format_version"])


_FIELDS = {"model_fingerprint": str, "dtype": str, "codec": str, "settings": dict, "format_version": int}


def diff_key_info(stored: dict, mine: dict) -> list[str]:
    """The key input fields (sorted) in which two ``KeyInputs.to_dict()`` records differ; a field
    missing on one side differs. The one comparison of key inputs (engine, verify, LangChain)."""
    if not isinstance(stored, dict):
        return sorted(mine)
    return sorted(k for k in set(stored) | set(mine) if stored.get(k, _MISSING) != mine.get(k, _MISSING))


_MISSING = object()
