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


def test_split_text_chunks_are_at_most_size_tokens_as_cached(smol_tokenizer):
    """``--chunk-tokens N`` gives chunks whose cached ids (the engine's layout, separator included)
    are at most N tokens, covering the document from its first word to its last."""
    from chunkcache.corpus import split_text
    from chunkcache.template import PromptTemplate

    template = PromptTemplate.from_tokenizer(smol_tokenizer)
    count = lambda t: len(template.chunk_ids(t))  # noqa: E731
    words = [f"word{i} and {i * 7}, then-{i}!" for i in range(300)]
    text = " ".join(words)
    for size, overlap in [(64, 8), (50, 0), (97, 31)]:
        pieces = split_text(smol_tokenizer, text, size, overlap, count=count)
        lengths = [count(p) for p in pieces]
        assert len(pieces) > 3 and max(lengths) <= size and max(lengths) >= size - 4, lengths
        assert pieces[0].startswith("word0 ") and pieces[-1].endswith("2093, then-299!")
    assert split_text(smol_tokenizer, "short text", 64, 8, count=count) == ["short text"]
    plain = split_text(smol_tokenizer, text, 64, 8)  # default count: the tokenizer's ids
    assert max(len(smol_tokenizer.encode(p, add_special_tokens=False)) for p in plain) <= 64


def test_jsonl_text_field_must_be_a_string(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": None}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2: field 'text' is NoneType, not a string"):
        list(iter_documents(jl))


def test_neighbours_are_the_nearest_passages_nearest_last_never_the_text_or_its_group():
    from chunkcache.corpus import Neighbours

    corpus = [
        "The river Avon flows through the old town of Bath.",
        "A river flows through the town: the Avon at Bath, an old spa town.",
        "Bath is an old town on the river Avon.",
        "Marie Curie studied radioactivity in Paris.",
        "The Avon river and the town of Bath.",
    ]
    near = Neighbours(corpus, k=2)
    got = near(corpus[0])
    assert len(got) == 2 and corpus[0] not in got and corpus[3] not in got
    assert near(corpus[0]) == got and Neighbours(list(corpus), k=2).name == near.name  # deterministic
    # nearest last: the last one is at least as close as the first (a 3-neighbour list ends alike)
    assert Neighbours(corpus, k=3)(corpus[0])[-2:] == got
    # a passage listed twice is picked once; groups exclude every passage sharing a label
    twice = Neighbours([*corpus, corpus[4]], k=4)(corpus[0])
    assert len(twice) == len(set(twice)) == 4
    grouped = Neighbours(corpus, k=2, groups=["a", "a", "b", "b", "c"])
    assert set(grouped(corpus[0])) == {corpus[2], corpus[4]} and grouped.name != near.name
    assert len(Neighbours(corpus, k=9)(corpus[0])) == 4
    with pytest.raises(ValueError, match="non-empty list"):
        Neighbours("one text")
    with pytest.raises(ValueError, match="positive int"):
        Neighbours(corpus, k=0)
    with pytest.raises(ValueError, match="labels"):
        Neighbours(corpus, groups=["a"])
