"""Benchmarks behind ``chunkcache bench``: quality, store, precompute, redis, ttft, codec.

Each module has ``add_arguments(parser)`` and ``run_cli(args)`` (the CLI calls those) and a
``main`` from ``standalone`` for ``python -m chunkcache.bench.<name>``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch


def standalone(
    prog: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None], run_cli: Callable
) -> Callable[[list[str] | None], int]:
    """The ``main(argv)`` of a benchmark module run on its own."""

    def main(argv: list[str] | None = None) -> int:
        p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
        add_arguments(p)
        return run_cli(p.parse_args(argv))

    return main


def sync() -> None:
    """Wait for the GPU (if any), so host timers measure finished work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
