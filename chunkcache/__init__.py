"""chunkcache: precompute chunk KV caches once, fuse them in any order with selective recompute.

Importing the package loads nothing heavy: no model, no CUDA initialisation.

    import chunkcache as cc
    engine = cc.ChunkCache(model="smollm2-135m", store=None)
    print(engine.generate(["Paris is the capital of France."], "What is the capital of France?"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "BatchConfig",
    "ChunkCache",
    "ChunkKV",
    "FuseConfig",
    "FuseResult",
    "ChunkCacheError",
    "POLICIES",
    "__version__",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from chunkcache.batch import BatchConfig
    from chunkcache.engine import ChunkCache
    from chunkcache.errors import ChunkCacheError
    from chunkcache.fuse import FuseConfig, FuseResult
    from chunkcache.layout import ChunkKV
    from chunkcache.select import POLICIES

_LAZY = {
    "BatchConfig": "chunkcache.batch",
    "ChunkCache": "chunkcache.engine",
    "ChunkKV": "chunkcache.layout",
    "FuseConfig": "chunkcache.fuse",
    "FuseResult": "chunkcache.fuse",
    "ChunkCacheError": "chunkcache.errors",
    "POLICIES": "chunkcache.select",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'chunkcache' has no attribute {name!r}")
