"""Argument checks made before any expensive work (loading a model, opening a store, fusing).

Each check either returns the normalised value or raises a ``ValueError``/``TypeError`` (or a
``ChunkCacheError`` where one exists for the case) whose message names the argument, the value
and what is accepted. What it does not know: models, stores or fusion themselves; it only asks
the registries that own the names (``codec.CODECS``, ``select.POLICIES``).

    dtype = checks.dtype("bf16")                 # torch.bfloat16; "float64x" -> ValueError
    checks.codec("int3")                         # ValueError: unknown codec 'int3'; known: int2, int4, int8, raw
    checks.store_writable("cache.lmdb")          # StoreReadOnlyError if it cannot be created or written
    checks.passages(["a", "b"], "question?")     # TypeError for fuse("one string", q) or query=None
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

import torch

from chunkcache.errors import StoreReadOnlyError

__all__ = ["DTYPES", "codec", "device", "dtype", "passages", "ratio", "store_writable"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
"""Model dtypes by name (``torch.float32`` etc. are accepted as they are)."""


def dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A model dtype: None (the engine picks), one of ``DTYPES``' values, or its name."""
    if value is None:
        return None
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype {value!r} is not supported; use one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    raise ValueError(f"dtype {value!r} is not supported; use torch.float32, torch.bfloat16 or torch.float16")


def device(value: str | torch.device | None) -> torch.device:
    """A torch device that exists here (None: CUDA if available, else CPU)."""
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"device {value!r} is not a torch device (examples: cpu, cuda, cuda:1): {e}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {value!r} asked for, but CUDA is not available here; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {value!r}: chunkcache runs on cpu or cuda")
    return dev


def codec(name: str) -> str:
    """A codec name known to ``codec.CODECS`` (so a codec registered there is accepted here)."""
    from chunkcache.codec import get_codec

    if not isinstance(name, str):
        raise TypeError(f"codec must be a codec name (str), got {type(name).__name__}")
    get_codec(name)  # ValueError listing the known codecs
    return name


def ratio(value: float, what: str = "recompute_ratio") -> float:
    """A number in [0, 1] (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{what} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {value!r}")
    return float(value)


def nonnegative_int(value, what: str) -> int:
    """``value`` if it is an int >= 0 (not a bool), else ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


def store_writable(spec) -> None:
    """Raise StoreReadOnlyError if ``spec`` is a filesystem path the store could not be created in
    or written to. Stores given as objects, None, ``:memory:`` and URLs are left to the store."""
    if spec is None or spec == ":memory:" or not isinstance(spec, str | os.PathLike):
        return
    text = os.fspath(spec)
    if isinstance(text, str) and text.startswith(("redis://", "rediss://")):
        return
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise StoreReadOnlyError(f"chunk store path {text} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise StoreReadOnlyError(f"chunk store {text} cannot be written (permission denied)")
        return
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise StoreReadOnlyError(f"chunk store {text} cannot be created: {parent} is not a writable folder")


def passages(chunks: Sequence[str], query: str) -> None:
    """The arguments of ``fuse``/``generate``: a non-empty list of non-blank strings, and a
    non-blank question string."""
    if isinstance(chunks, str):
        raise TypeError(
            "chunks must be a list of passage strings, got one str (pass [text] for a single passage)"
        )
    if not isinstance(chunks, Sequence):
        raise TypeError(f"chunks must be a list of passage strings, got {type(chunks).__name__}")
    if len(chunks) == 0:
        raise ValueError("no chunks to fuse: pass at least one passage (or call the model directly)")
    for i, text in enumerate(chunks):
        if not isinstance(text, str):
            raise TypeError(f"chunks[{i}] must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"chunks[{i}] is blank: a chunk must be non-empty text")
    if not isinstance(query, str):
        raise TypeError(f"query must be the question string, got {type(query).__name__}")
    if not query.strip():
        raise ValueError("query is blank: pass the question text")
