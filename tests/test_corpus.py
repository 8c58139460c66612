"""Corpus reading and token-window chunking (no model)."""

from __future__ import annotations

import json

import pytest

from chunkcache.corpus import chunk_tokens, iter_documents


def test_chunk_tokens_windows():
    ids = list(range(10))
    assert chunk_tokens(ids, 4, 1) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert chunk_tokens(ids, 4, 0) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk_tokens(ids, 10, 2) == [ids] and chunk_tokens(ids[:3], 512, 32) == [[0, 1, 2]]
    assert chunk_tokens(list(range(11)), 10, 2) == [list(range(10)), [8, 9, 10]]
    assert chunk_tokens([], 4, 1) == []
    for size, overlap in [(0, 0), (4, 4), (4, -1)]:
        with pytest.raises(ValueError):
            chunk_tokens(ids, size, overlap)


def test_iter_documents(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.md").write_text("bee")
    (tmp_path / "d" / "sub" / "a.txt").write_text("ay")
    (tmp_path / "d" / "skip.bin").write_text("no")
    (tmp_path / "d" / "blank.txt").write_text("  \n")
    assert [d.text for d in iter_documents(tmp_path / "d")] == ["bee", "ay"]
    one = tmp_path / "one.txt"
    one.write_text("hello")
    assert [d.text for d in iter_documents(one)] == ["hello"]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"body": "x"}, {"body": "y"}]) + "\n\n")
    docs = list(iter_documents(jl, text_field="body"))
    assert [d.text for d in docs] == ["x", "y"] and docs[1].source.endswith("c.jsonl:2")
    with pytest.raises(ValueError, match="text-field"):
        list(iter_documents(jl))
    with pytest.raises(FileNotFoundError):
        list(iter_documents(tmp_path / "nope"))
