"""The correctness gate: an exact model passes once per store, a model whose rotary is broken is
refused before any fusion, and the result is a record beside the entries (never an entry)."""

from __future__ import annotations

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache import gate
from chunkcache.bench.gate import break_attention_theta, break_rotary_forward
from chunkcache.cli import main
from chunkcache.engine import ChunkCache
from chunkcache.errors import FusionGateError
from chunkcache.store import LMDBStore, MemoryStore, verify_store


def _count_measures(monkeypatch) -> list:
    calls = []
    real = gate.measure

    def counting(engine):
        calls.append(engine)
        return real(engine)

    monkeypatch.setattr(gate, "measure", counting)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_model_passes_once_per_store(smol_tokenizer, monkeypatch, dtype):
    calls = _count_measures(monkeypatch)
    store = MemoryStore()
    model = tiny_model("llama").to(dtype)
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store)
    eng.fuse(PASSAGES, QUESTION)
    eng.fuse(PASSAGES, QUESTION)
    again = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store)  # same model, same store
    again.fuse(PASSAGES, QUESTION)
    assert len(calls) == 1
    record = store.get_record(gate.record_name(eng))
    assert record["logits_diff"] <= record["logits_tolerance"] and record["keys_diff"] <= record["tolerance"]
    ChunkCache(model=model, tokenizer=smol_tokenizer, store=MemoryStore()).fuse(PASSAGES, QUESTION)
    assert len(calls) == 2  # another store has not seen the model


@pytest.mark.parametrize(
    "breaker, what",
    [(break_attention_theta, "logits at ratio 1"), (break_rotary_forward, "re-rotated layer-0 keys")],
)
def test_model_with_broken_rotary_is_refused(smol_tokenizer, breaker, what):
    model = tiny_model("llama")
    breaker(model, 2.0)  # rope theta 10000 in one place, 20000 in another
    store = MemoryStore()
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store)
    with pytest.raises(FusionGateError, match=f"not exact for model 'llama'.*{what} differ.* by [0-9.e-]+"):
        eng.fuse(PASSAGES, QUESTION)
    with pytest.raises(FusionGateError):  # every call, from the record
        eng.generate(PASSAGES, QUESTION, max_new_tokens=2)
    assert store.stats().entries == 0  # refused before any chunk was precomputed
    assert store.get_record(gate.record_name(eng))["keys_diff"] >= 0
    with pytest.raises(FusionGateError):
        ChunkCache(model=model, tokenizer=smol_tokenizer, store=store).fuse(PASSAGES, QUESTION)


def test_record_persists_in_lmdb_beside_the_entries(tmp_path, smol_tokenizer, monkeypatch):
    calls = _count_measures(monkeypatch)
    model = tiny_model("qwen3")
    path = str(tmp_path / "s")
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=path)
    eng.fuse(PASSAGES[:2], QUESTION)
    name = gate.record_name(eng)
    eng.store.close()
    with LMDBStore(path) as store:
        assert store.get_record(name)["fingerprint"] == eng.lm.fingerprint
        assert len(list(store.keys())) == 2 and verify_store(store) == []  # the record is no entry
        eng2 = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store)
        eng2.fuse(PASSAGES[:2], QUESTION)
    assert len(calls) == 1


def test_check_command(model_dir, tmp_path, capsys):
    store = tmp_path / "s"
    assert main(["check", "--model", str(model_dir), "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok ") and "recorded in" in out
    with LMDBStore(str(store)) as s:
        assert len(list(s.keys())) == 0
