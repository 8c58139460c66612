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


def _unshadow_hub_kernels() -> None:
    """Run from a checkout's root (``python -m``, ``python -c``, ``PYTHONPATH=.``), its ``kernels/``
    folder, which the installed package holds as ``chunkcache.kernels``, is importable as a
    top-level ``kernels`` too and shadows the Hugging Face ``kernels`` package that transformers
    (>= 5.25, which depends on it) imports while it loads a model: transformers would import our
    folder as it and fail (``cannot import name 'CUDAProperties' from 'kernels'``). In that case
    only, load the installed ``kernels`` under its name first. An installed chunkcache has no
    top-level ``kernels``: then this finds nothing to do."""
    import importlib.metadata
    import importlib.util
    import os
    import sys

    if "kernels" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if spec is None or not spec.origin or os.path.dirname(os.path.abspath(spec.origin)) != os.path.join(here, "kernels"):
        return
    try:
        init = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        return  # nothing shadowed
    if not os.path.isfile(init):
        return
    real = importlib.util.spec_from_file_location("kernels", init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(real)
    sys.modules["kernels"] = module
    try:
        real.loader.exec_module(module)
    except Exception:  # (a broken install: transformers reports it as it would without us)
        del sys.modules["kernels"]


_unshadow_hub_kernels()

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
