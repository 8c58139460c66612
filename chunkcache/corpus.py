"""Reading a corpus for precompute: documents from files, token-window chunking, and each
chunk's nearest passages (``Neighbours``, the context a chunk can be encoded behind).

It knows files, texts and token id lists, nothing about models or stores: the caller tokenises
each document and hands the chunks to the engine.

    for doc in iter_documents("docs/"):                    # .txt/.md files, one file, or JSONL
        ids = tokenizer.encode(doc.text, add_special_tokens=False)
        chunks = chunk_tokens(ids, size=512, overlap=32)   # list of token id lists
    near = Neighbours(chunk_texts, k=2)                    # ChunkCache(sink_context=near, ...)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "Neighbours", "TEXT_SUFFIXES", "chunk_tokens", "iter_documents", "nearest", "split_text"]

TEXT_SUFFIXES = (".txt", ".md")
"""File suffixes read from a folder (recursively, in sorted path order)."""


@dataclass(frozen=True)
class Document:
    """One input document."""

    source: str
    """Where it came from: a file path, or ``path:line`` for a JSONL record."""
    text: str
    """Its text."""


def iter_documents(path: str | os.PathLike, text_field: str | None = None) -> Iterator[Document]:
    """Documents under ``path``: a folder (every .txt/.md file inside, recursively), a ``.jsonl`` file
    (one JSON object per line, text in ``text_field``, default ``"text"``) or any other text file (one
    document). Blank documents are skipped."""
    p = Path(path)
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in TEXT_SUFFIXES):
            text = f.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield Document(str(f), text)
    elif p.suffix.lower() == ".jsonl" or text_field is not None:
        field = text_field or "text"
        with p.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{p}:{n}: not a JSON line: {e}") from None
                if not isinstance(rec, dict) or field not in rec:
                    raise ValueError(f"{p}:{n}: record has no field {field!r} (use --text-field)")
                text = rec[field]
                if not isinstance(text, str):
                    raise ValueError(f"{p}:{n}: field {field!r} is {type(text).__name__}, not a string")
                if text.strip():
                    yield Document(f"{p}:{n}", text)
    elif p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield Document(str(p), text)
    else:
        raise FileNotFoundError(f"no such file or folder: {p}")


def chunk_tokens(ids: Sequence[int], size: int, overlap: int = 0) -> list[list[int]]:
    """Windows of ``size`` tokens, consecutive windows sharing ``overlap`` tokens.

    Every token lands in at least one window; no window lies entirely inside the previous one::

        ids:  |0 ........... size|
                      |size-overlap ........ 2*size-overlap|
    """
    if size <= 0:
        raise ValueError(f"chunk size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, size), got {overlap} for size {size}")
    ids = list(ids)
    if not ids:
        return []
    stride = size - overlap
    return [ids[s : s + size] for s in range(0, max(len(ids) - overlap, 1), stride)]


def split_text(
    tokenizer, text: str, size: int, overlap: int = 0, count: Callable[[str], int] | None = None
) -> list[str]:
    """Chunk *texts* of at most ``size`` tokens as ``count`` counts them (default: the tokenizer's
    own ids; the CLI counts the ids the engine caches, separator included). A document that fits
    is returned unchanged (so its cache key equals ``ChunkCache.key(text)`` for the very text a
    retriever returns); longer ones are cut into token windows of about ``size`` tokens,
    consecutive ones sharing ``overlap``, and decoded back to text, the form a vector store
    indexes and a retriever hands to ``fuse``. A window whose decoded text re-tokenises to more
    than ``size`` is shortened until it fits."""
    chunk_tokens([], size, overlap)  # validates size and overlap
    text = text.strip()
    if not text:
        return []
    if count is None:
        count = lambda t: len(tokenizer.encode(t, add_special_tokens=False))  # noqa: E731
    if count(text) <= size:
        return [text]
    ids = tokenizer.encode(text, add_special_tokens=False)
    extra = max(count(text) - len(ids), 0)  # tokens the caller's layout adds (a separator)
    if size - extra <= overlap:
        raise ValueError(
            f"chunk size {size} leaves no room past the overlap {overlap} and {extra} layout tokens"
        )
    out, start = [], 0
    while True:
        end = min(start + size - extra, len(ids))
        piece = tokenizer.decode(ids[start:end]).strip()
        while end - start > 1 and count(piece) > size:  # decode + re-encode may merge differently
            end -= max(count(piece) - size, 1)
            piece = tokenizer.decode(ids[start:end]).strip()
        if piece:
            out.append(piece)
        if end >= len(ids):
            return out
        start = max(end - overlap, start + 1)


class Neighbours:
    """Each text's ``k`` nearest passages of a fixed corpus by TF-IDF cosine (lower-case word
    tokens, sublinear tf, smooth idf), the nearest last: a context a chunk can be encoded behind
    (``ChunkCache(sink="context", sink_context=Neighbours(corpus))``). Retrieval puts similar
    passages side by side, so a chunk's neighbours stand in for the passages before it in a prompt
    while staying known at precompute time (bench_results/session9/fidelity/NOTES.md).

    Deterministic: the same corpus, ``k`` and ``groups`` give the same neighbours (ties broken by
    corpus order), and ``name`` digests them. The text itself (any corpus passage equal to it)
    is never its own neighbour, nor is a passage picked twice; with ``groups`` (one label per
    corpus passage, e.g. its document), neither is any passage that shares a group with the text
    (a text or passage listed under several labels has them all). A brute-force scan over the
    corpus per call."""

    def __init__(self, corpus: Sequence[str], k: int = 2, groups: Sequence[object] | None = None) -> None:
        if isinstance(corpus, str) or not corpus or not all(isinstance(t, str) and t.strip() for t in corpus):
            raise ValueError("corpus must be a non-empty list of non-empty passage strings")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if groups is not None and len(groups) != len(corpus):
            raise ValueError(f"groups has {len(groups)} labels for {len(corpus)} passages")
        self.corpus, self.k = list(corpus), k
        self.groups = None if groups is None else list(groups)
        docs = [Counter(_words(t)) for t in self.corpus]
        df = Counter(w for d in docs for w in d)
        n = len(docs)
        self._idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}
        self._vecs = [self._vector(d) for d in docs]
        self._groups: dict[str, set] = {}
        if self.groups is not None:
            for t, g in zip(self.corpus, self.groups, strict=True):
                self._groups.setdefault(t, set()).add(g)
        h = hashlib.blake2b(digest_size=16)
        for i, t in enumerate(self.corpus):
            h.update(f"{len(t)}:{t}|{None if self.groups is None else repr(self.groups[i])}".encode())
        self.name = f"tfidf-k{k}-{h.hexdigest()}"
        """Identifies the corpus, ``k`` and the groups."""

    def _vector(self, counts: Counter) -> dict[str, float]:
        v = {w: (1 + math.log(c)) * self._idf.get(w, 0.0) for w, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    def __call__(self, text: str) -> list[str]:
        """The ``k`` nearest corpus passages to ``text``, farthest first (the nearest last)."""
        q = self._vector(Counter(_words(text)))
        mine = self._groups.get(text, set())
        scored = []
        for i, v in enumerate(self._vecs):
            t = self.corpus[i]
            if t == text or (mine and mine & self._groups[t]):
                continue
            scored.append((-sum(x * v.get(w, 0.0) for w, x in q.items()), i))
        scored.sort()
        out: list[str] = []
        for _, i in scored:
            if len(out) == self.k:
                break
            if self.corpus[i] not in out:
                out.append(self.corpus[i])
        return out[::-1]


def nearest(texts: Sequence[str], query: str, skip: Sequence[int] = ()) -> int:
    """Index of the text nearest ``query`` by ``Neighbours``' TF-IDF cosine over ``texts`` alone
    (ties: the earlier text), none of ``skip``: e.g. the passage of a prompt a question is about
    (``select.ChunkFirst``; skip the exact first chunk)."""
    left = [i for i in range(len(texts)) if i not in set(skip)]
    if not left:
        raise ValueError("no text left to choose from")
    nb = Neighbours(texts, k=1)
    q = nb._vector(Counter(_words(query)))
    sims = [sum(x * v.get(w, 0.0) for w, x in q.items()) for v in nb._vecs]
    return max(left, key=lambda i: (sims[i], -i))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())
