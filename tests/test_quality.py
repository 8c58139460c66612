"""The fidelity benchmark's answer-level metrics and the made-up factual set it is scored on."""

from __future__ import annotations

import json
import re

import pytest
import torch

from chunkcache.bench import factual, quality


def test_divergence_counts_the_leading_greedy_matches():
    ref = torch.tensor([5, 1, 7, 2])
    logits = torch.zeros(4, 10)
    logits[torch.arange(4), torch.tensor([5, 1, 3, 2])] = 1.0  # step 2 picks 3, not 7
    assert quality.divergence(logits, ref) == 2
    logits[2, 7] = 2.0
    assert quality.divergence(logits, ref) == 4
    logits[0, 0] = 3.0
    assert quality.divergence(logits, ref) == 0


def test_correct_is_containment_case_insensitive():
    assert quality.correct("It was built by MARGA Olsen in 1901.", ["Marga Olsen"])
    assert not quality.correct("It was built by Marga.", ["Marga Olsen"])


def _one_question(tmp_path, passages):
    path = tmp_path / "q.json"
    path.write_text(
        json.dumps(
            [
                {
                    "question": "Which tower was completed in 1889?",
                    "answers": ["Eiffel"],
                    "ctxs": [{"title": f"P{i}", "text": t} for i, t in enumerate(passages)],
                }
            ]
        )
    )
    return path


def test_full_recompute_scores_as_the_reference_itself(tiny_engine, tmp_path):
    """Ratio 1 is a full prefill: zero KL over the whole answer and agreement on every token;
    naive reuse is not. The noise-floor config with an engine equal to the reference is zero too.
    Any offset between the teacher-forced paths and the reference answer breaks the zeros."""
    from tests.conftest import PASSAGES

    data = _one_question(tmp_path, PASSAGES[:3])
    res = quality.run(
        tiny_engine,
        data,
        questions=1,
        passages=3,
        policies=("qfast",),
        ratios=(1.0,),
        answer_tokens=8,
        gen_tokens=8,
        log=None,
        noise_engine=tiny_engine,
        noise_questions=1,
    )
    rows = {r["policy"]: r for r in res["rows"]}
    assert set(rows) == {"naive", "qfast", "full-float32"}
    for name in ("qfast", "full-float32"):
        r = rows[name]
        assert r["kl_first"] < 1e-6 and r["kl_answer"] < 1e-6, (name, r)
        assert r["agree"] and r["diverge"] == 8, (name, r)
        assert r["correct"] == r["full_correct"]
    assert rows["naive"]["kl_answer"] > 1e-4
    s = res["summary"]
    assert s["qfast@1"]["gap_closed_answer"] == pytest.approx(1.0, abs=1e-4)
    assert s["qfast@1"]["diverge"] == 8


class _Scripted:
    """An answerer whose greedy path follows ``tokens`` (teacher-forced or not)."""

    def __init__(self, tokens: list[int], vocab: int) -> None:
        self.tokens, self.vocab = tokens, vocab
        self.logits = self._onehot([tokens[0]])[0]
        self.compute_fraction, self.seconds = 0.5, 0.0

    def _onehot(self, toks):
        out = torch.full((len(toks), self.vocab), -10.0)
        out[torch.arange(len(toks)), torch.tensor(toks)] = 10.0
        return out

    def forced(self, answer):
        return self._onehot(self.tokens[: answer.numel()])

    def generate(self, n):
        return torch.tensor(self.tokens[:n])


def test_score_reads_divergence_and_accuracy_off_the_answer(tiny_engine):
    tok = tiny_engine.tokenizer
    ref = tok.encode(" built by Marga Olsen in the year")[:6]
    vocab = len(tok)
    full = {
        "first": _Scripted(ref, vocab).logits,
        "forced_logits": _Scripted(ref, vocab).forced(torch.tensor(ref)),
        "forced": torch.tensor(ref),
        "plain": torch.tensor(ref),
        "text": tok.decode(ref).strip(),
    }
    gold = [tok.decode(ref[2:4]).strip()]
    same = quality.score(tiny_engine, _Scripted(ref, vocab), full, gold, gen_tokens=6)
    assert same["agree"] and same["diverge"] == 6 and same["kl_answer"] < 1e-6 and same["correct"]
    other = ref[:3] + [tok.encode(" nobody")[0]] * 3
    off = quality.score(tiny_engine, _Scripted(other, vocab), full, gold, gen_tokens=6)
    assert not off["agree"] and off["diverge"] == 3
    assert off["kl_first"] < 1e-6 < off["kl_answer"]
    assert off["correct"] == quality.correct(tok.decode(other), gold)


def test_summary_aggregates_answer_metrics_against_naive_on_the_same_questions():
    def row(q, policy, ratio, kla, diverge, ok):
        return {
            "q": q, "policy": policy, "ratio": ratio, "kl_first": 2 * kla, "kl_answer": kla,
            "diverge": diverge, "agree": diverge == 32, "correct": ok, "full_correct": True,
            "f1": 0.0, "full_f1": 0.0, "compute_fraction": 0.1, "fuse_seconds": 0.0,
        }  # fmt: skip

    rows = [
        row(0, "naive", 0.0, 1.0, 0, False),
        row(1, "naive", 0.0, 3.0, 0, False),
        row(0, "qfast", 0.15, 0.5, 32, True),
        row(1, "qfast", 0.15, 0.5, 4, False),
    ]
    s = quality.summarize(rows)["qfast@0.15"]
    assert s["gap_closed_answer"] == pytest.approx(0.75)
    assert s["diverge"] == 18 and s["agree"] == 0.5
    assert s["accuracy"] == 0.5 and s["full_accuracy"] == 1.0
    assert "qfast@0.15" in quality.table(quality.summarize(rows))
    # a tagged run (other engine settings) is measured against plain naive reuse when merged
    # beside it, and against its own tagged naive reuse alone
    tagged = [row(0, "ctx:naive", 0.0, 0.5, 0, False), row(0, "ctx:qfast", 0.15, 0.25, 32, True)]
    assert quality.summarize(rows + tagged)["ctx:qfast@0.15"]["gap_closed_answer"] == pytest.approx(0.75)
    assert quality.summarize(tagged)["ctx:qfast@0.15"]["gap_closed_answer"] == pytest.approx(0.5)
    # merged runs cut at different questions compare on the questions they all have
    floor = row(1, "full-bfloat16", 1.0, 0.0, 32, True)
    kept = quality.common_rows(rows + tagged + [floor])
    assert {(r["q"], r["policy"]) for r in kept} == {
        (0, "naive"),
        (0, "qfast"),
        (0, "ctx:naive"),
        (0, "ctx:qfast"),
    }


def test_plain_engine_runs_beside_a_tagged_one_on_the_same_full_prefill(
    smol_tokenizer, tiny_engine, tmp_path
):
    """``plain_engine``'s rows (untagged) are what a plain run of that engine gives on the same
    questions, beside the tagged engine's; it needs a tag (the rows would share names)."""
    from chunkcache.engine import ChunkCache
    from tests.conftest import PASSAGES

    ctx = ChunkCache(
        model=tiny_engine.model, tokenizer=smol_tokenizer, store=None, sink="context", exact_first=True
    )
    kw = dict(
        data_path=_one_question(tmp_path, PASSAGES[:3]),
        questions=1,
        passages=3,
        answer_tokens=4,
        gen_tokens=4,
        log=None,
    )
    both = quality.run(ctx, tag="c", configs=(("qfast", 0.3),), plain_engine=tiny_engine,
                       plain_configs=(("qfast", 0.3),), **kw)  # fmt: skip
    alone = quality.run(tiny_engine, configs=(("qfast", 0.3),), **kw)
    got = {(r["policy"], r["ratio"]): r["kl_answer"] for r in both["rows"]}
    assert set(got) == {("c:naive", 0.0), ("c:qfast", 0.3), ("naive", 0.0), ("qfast", 0.3)}
    for r in alone["rows"]:
        assert got[(r["policy"], r["ratio"])] == pytest.approx(r["kl_answer"], rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="tag"):
        quality.run(ctx, plain_engine=tiny_engine, **kw)


def test_factual_cases_answer_in_exactly_one_passage():
    cases = factual.generate("dev", 40)
    assert len({c["id"] for c in cases}) == 40
    for c in cases:
        assert 4 <= len(c["ctxs"]) <= 6
        holders = [
            i
            for i, x in enumerate(c["ctxs"])
            if c["answers"][0].lower() in (x["title"] + " " + x["text"]).lower()
        ]
        assert holders == [c["gold"]]
        assert c["answers"][0].lower() not in c["question"].lower()
        # distractors are of the same kind: every passage holds every literal piece of the kind's sentences
        pieces = [p.strip() for t in factual.KINDS[c["kind"]]["text"] for p in re.split(r"\{\w+\}", t)]
        for x in c["ctxs"]:
            assert all(p.lower() in x["text"].lower() for p in pieces if p), (x, pieces)


def test_factual_generation_is_deterministic_prefix_stable_and_split_by_seed():
    assert factual.generate("dev", 12) == factual.generate("dev", 30)[:12]
    assert factual.generate("heldout", 5) != factual.generate("dev", 5)


def test_committed_factual_set_is_the_generators_output():
    """The data file is what the committed generator makes (the filter only drops cases)."""
    data = json.loads(factual.DEFAULT_OUT.read_text())
    assert sum(data["kept"].values()) == len(data["cases"]) >= 100
    for split in factual.SPLIT_SEEDS:
        kept = [c for c in data["cases"] if c["split"] == split]
        assert kept, split
        gen = {c["id"]: c for c in factual.generate(split, 1 + max(int(c["id"].split("-")[1]) for c in kept))}
        for c in kept:
            assert {k: v for k, v in c.items() if k != "full_answer"} == gen[c["id"]]
            assert quality.correct(c["full_answer"], c["answers"])


def test_sink_context_nn_gives_each_passage_its_nearest_of_other_cases(tmp_path):
    path = tmp_path / "q.json"
    cases = [
        {"question": "q?", "answers": ["a"], "ctxs": [{"title": f"T{c}{i}", "text": f"river topic{c} topic{c} item{i}"}
                                                      for i in range(3)]}
        for c in range(3)
    ]  # fmt: skip
    path.write_text(json.dumps(cases))
    near = quality.sink_context(path, "nn:2x")
    own = [quality.passage_text(c) for c in cases[1]["ctxs"]]
    got = near(own[0])
    assert len(got) == 2 and not set(got) & set(own)
    assert set(quality.sink_context(path, "nn:2")(own[0])) & set(own)  # without x: its own case's too
    with pytest.raises(ValueError, match="positive K"):
        quality.sink_context(path, "nn:0")


def test_configs_of_a_question_scored_side_by_side_equal_one_by_one(tiny_engine, monkeypatch):
    """``score_many`` teacher-forces and decodes the fusions of one question as one batch: each
    row's logits, greedy answer and metrics are those of scoring that fusion alone, and the
    batched greedy answer is ``model.generate``'s."""
    from tests.conftest import PASSAGES, QUESTION

    texts = PASSAGES[:3]
    tiny_engine.precompute(texts)
    ids = tiny_engine.prompt_ids(texts, QUESTION)
    first, forced_logits, forced, plain = quality.full_reference(tiny_engine, ids, 6, 6)
    full = {"first": first, "forced_logits": forced_logits, "forced": forced, "plain": plain,
            "text": tiny_engine.tokenizer.decode(plain, skip_special_tokens=True).strip()}  # fmt: skip
    configs = [("cacheblend", 0.0), ("qfast", 0.3), ("cacheblend", 0.5), ("qfast", 1.0)]
    fused = [tiny_engine.fuse(texts, QUESTION, recompute_ratio=r, policy=p) for p, r in configs]
    answers = [quality.FusedAnswer(tiny_engine, f) for f in fused]
    batch = quality.teacher_forced_batch(tiny_engine, fused, forced)
    gens = quality.greedy_batch(tiny_engine, fused, 6)
    assert len({tuple(g.tolist()) for g in gens}) > 1  # the configs answer differently
    for i, f in enumerate(fused):
        alone = quality.teacher_forced(tiny_engine, f, forced)
        torch.testing.assert_close(batch[i], alone, rtol=1e-5, atol=1e-5)
        hf = quality.greedy(tiny_engine, f.input_ids, f.fresh_cache(), 6)
        assert gens[i].tolist() == hf.tolist()
    together = quality.score_many(tiny_engine, answers, full, ["Eiffel"], 6)
    in_twos = quality.score_many(tiny_engine, answers, full, ["Eiffel"], 6, batch=2)
    assert [r["answer"] for r in in_twos] == [r["answer"] for r in together]
    with pytest.raises(ValueError, match="batch"):
        quality.score_many(tiny_engine, answers, full, ["Eiffel"], 6, batch=0)
    monkeypatch.setattr(quality, "_BATCH", 1)
    one_by_one = [quality.score(tiny_engine, a, full, ["Eiffel"], 6) for a in answers]
    assert not all(r["agree"] for r in together) and any(r["agree"] for r in together)
    for a, b in zip(together, one_by_one, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("kl")} == {
            k: v for k, v in b.items() if not k.startswith("kl")
        }
        assert a["kl_answer"] == pytest.approx(b["kl_answer"], rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="one prompt"):
        quality.teacher_forced_batch(
            tiny_engine, [fused[0], tiny_engine.fuse(PASSAGES[1:4], QUESTION, recompute_ratio=0.3)], forced
        )


def test_lex_config_fuses_the_passage_nearest_the_question_first(tiny_engine, tmp_path):
    """Config ``lex``: ``ChunkFirst`` of the stale passage nearest the question (here the one
    naming the tower), at the same compute as qvalue; its rows are those of fusing with that
    policy object directly."""
    from chunkcache.select import ChunkFirst
    from tests.conftest import PASSAGES, QUESTION

    texts = [PASSAGES[1], PASSAGES[2], PASSAGES[0]]  # the Eiffel passage last, not first
    assert isinstance(quality.resolve_policy("lex", texts, QUESTION), ChunkFirst)
    assert quality.resolve_policy("lex", texts, QUESTION).chunk == 2
    assert quality.resolve_policy("naive", texts, QUESTION) == "cacheblend"
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"question": QUESTION, "answers": ["Eiffel"],
                                 "ctxs": [{"title": f"P{i}", "text": t} for i, t in enumerate(texts)]}]))  # fmt: skip
    res = quality.run(tiny_engine, path, questions=1, passages=3, configs=(("lex", 0.3), ("qvalue", 0.3)),
                      answer_tokens=4, gen_tokens=4, log=None)  # fmt: skip
    rows = {r["policy"]: r for r in res["rows"]}
    assert rows["lex"]["compute_fraction"] == rows["qvalue"]["compute_fraction"]
    ids = [quality.passage_text(c) for c in json.loads(path.read_text())[0]["ctxs"]]
    direct = tiny_engine.fuse(ids, QUESTION, recompute_ratio=0.3, policy=ChunkFirst(2))
    assert rows["lex"]["kl_first"] == pytest.approx(
        float(quality.kl(quality.full_reference(tiny_engine, tiny_engine.prompt_ids(ids, QUESTION), 4, 4)[0],
                         direct.logits)), rel=1e-5, abs=1e-9)  # fmt: skip
