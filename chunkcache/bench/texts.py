"""Real text for the speed benchmarks: passages of about N tokens and questions, from MuSiQue.

The MuSiQue contexts (``demos/data/musique_dev.json``) are joined in order, tokenised once and cut
into windows of ``tokens - 4`` tokens, each decoded back to text (its chunk ids, with the
template's separator, come to about ``tokens``). Deterministic: the same passages every run.

    texts = passages(tokenizer, count=64, tokens=512)
    qs = questions()
"""

from __future__ import annotations

import json
from pathlib import Path

from chunkcache.bench.quality import DEFAULT_DATA
from chunkcache.corpus import chunk_tokens

__all__ = ["passages", "questions"]


def _records(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def passages(tokenizer, count: int, tokens: int = 512, path: str | Path = DEFAULT_DATA) -> list[str]:
    """``count`` distinct passages of about ``tokens`` tokens (cycling the corpus if it is short,
    each repeat marked so it stays a distinct text)."""
    ids, seen = [], set()
    for rec in _records(path):  # tokenise only as much of the corpus as the passages need
        for c in rec["ctxs"]:
            if c["text"] not in seen and len(ids) < count * tokens:
                seen.add(c["text"])
                ids += tokenizer.encode(c["text"] + "\n", add_special_tokens=False)
    windows = [tokenizer.decode(w).strip() for w in chunk_tokens(ids, size=tokens - 4, overlap=0)]
    windows = [w for w in windows if w]
    out = []
    for i in range(count):
        w = windows[i % len(windows)]
        out.append(w if i < len(windows) else f"({i // len(windows)}) {w}")
    return out


def questions(path: str | Path = DEFAULT_DATA) -> list[str]:
    return [rec["question"] for rec in _records(path)]
