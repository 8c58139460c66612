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


def write_report(out: str, md: str, plot: Callable[[list, str], None], results: list) -> None:
    """Write a benchmark's Markdown table to ``out.md`` (and print it) and its plot to ``out.png``
    (skipped with a line when matplotlib is missing)."""
    from pathlib import Path

    Path(out + ".md").write_text(md + "\n")
    print("\n" + md)
    try:
        plot(results, out + ".png")
    except ImportError:
        print("matplotlib missing: no plot")


def sync() -> None:
    """Wait for the GPU (if any), so host timers measure finished work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
