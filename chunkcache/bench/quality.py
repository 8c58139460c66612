"""Fusion-quality benchmark: how close fused caches come to a full prefill, on real RAG prompts.

For each question of ``musique_dev.json`` (k passages each) or of the made-up factual set
(``chunkcache.bench.factual``) and each (policy, ratio), against an fp32-or-engine-dtype full
prefill of the same prompt:
  - ``kl_first``: KL(full || fused) of the next-token distribution at the answer start;
  - ``kl_answer``: mean per-token KL over the full prefill's greedy answer (teacher-forced,
    ``answer_tokens`` = 32 tokens, EOS suppressed so every question has that many);
  - ``diverge``: tokens of the fused greedy answer equal to the full prefill's before the first
    difference (``gen_tokens`` = 32 when the whole answer agrees, EOS included);
  - ``agree``: the fused greedy answer (up to EOS, at most 32 tokens) equals the full prefill's;
  - ``correct``: the fused greedy answer contains a gold answer (case-insensitive; the factual
    set's accuracy criterion), ``full_correct`` the same for the full prefill;
  - ``f1``: answer F1 against the gold answers (SQuAD normalisation), for fused and full.
Naive reuse is ratio 0 (identical for every policy, reported once). The gap closed at a ratio is
``1 - KL(policy, r) / KL(naive)``. ``--noise-floor N`` adds, on the first N questions, a config
``full-<dtype>@1``: a full prefill in another dtype (bf16 by default) scored by the same metrics
against the reference, the floor under which a fused figure means nothing.

What it does not know: how fusion works; it only calls the engine.

    python -m chunkcache.bench.quality --questions 100 --passages 5 --out BENCH_quality.json
    python -m chunkcache.bench.quality --data chunkcache/bench/data/factual.json --split heldout \
        --passages 6 --policies qfast --ratios 0.05,0.15 --noise-floor 200 --out factual.json
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from transformers import DynamicCache

from chunkcache.bench import standalone
from chunkcache.fuse import FuseConfig, kv_to_cache
from chunkcache.model import cache_kwarg

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "demos" / "data" / "musique_dev.json"  # in a checkout
DEFAULT_POLICIES = ("qfast", "qaware", "cacheblend", "gradual", "epic", "random")


def load_cases(data_path: str | Path, split: str | None = None) -> list[dict]:
    """The questions of a MuSiQue-style JSON list, or of a factual-set file (``{"cases": [...]}``,
    ``split`` picks ``dev`` or ``heldout``)."""
    data = json.loads(Path(data_path).read_text())
    cases = data["cases"] if isinstance(data, dict) else data
    if split is not None:
        cases = [c for c in cases if c.get("split") == split]
        if not cases:
            raise ValueError(f"no cases of split {split!r} in {data_path}")
    return cases


def passage_text(ctx: dict) -> str:
    """A passage as the benchmark gives it to the engine: its title, a newline, its text."""
    return f"{ctx['title']}\n{ctx['text']}"


def sink_context(data_path: str | Path, spec: str):
    """The context of ``--sink-context``: ``SPLIT:CASE:I,J,..``, passages I, J, .. of case CASE
    of that split of the data (``all``: the cases in file order), e.g. passages no prompt of the
    run holds, as a corpus-chosen context sink; or ``nn:K`` / ``nn:Kx``, each chunk's own K
    nearest passages of the data file (every passage of every case: ``corpus.Neighbours``), with
    ``x`` none of a case the chunk is a passage of (so none of its own prompt)."""
    if spec.startswith("nn:"):
        from chunkcache.corpus import Neighbours

        k, exclude = spec[3:].removesuffix("x"), spec.endswith("x")
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"--sink-context nn:K[x] takes a positive K, got {spec!r}")
        cases = load_cases(data_path, None)
        corpus = [passage_text(c) for ex in cases for c in ex["ctxs"]]
        groups = [i for i, ex in enumerate(cases) for _ in ex["ctxs"]] if exclude else None
        return Neighbours(corpus, int(k), groups)
    try:
        split, case, which = spec.split(":")
        ex = load_cases(data_path, None if split == "all" else split)[int(case)]
        return [passage_text(ex["ctxs"][int(i)]) for i in which.split(",")]
    except (ValueError, IndexError) as err:
        raise ValueError(
            f"--sink-context takes SPLIT:CASE:I,J (passages of one case), got {spec!r}: {err}"
        ) from None


def correct(text: str, answers: list[str]) -> bool:
    """Answer accuracy: some gold answer is contained in the text (case-insensitive)."""
    low = text.lower()
    return any(a.lower() in low for a in answers)


def divergence(path_logits: torch.Tensor, reference: torch.Tensor) -> int:
    """Leading tokens that greedy decoding reproduces: the index of the first step whose argmax
    differs from ``reference`` along a teacher-forced path ``[len(reference), vocab]``, or
    ``len(reference)`` if none does."""
    miss = (path_logits.argmax(-1).cpu() != reference.cpu()).nonzero()
    return int(miss[0, 0]) if miss.numel() else int(reference.numel())


def normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, answers: list[str]) -> float:
    best = 0.0
    pred = normalize(prediction).split()
    for a in answers:
        gold = normalize(a).split()
        common = Counter(pred) & Counter(gold)
        same = sum(common.values())
        if same == 0:
            continue
        p, r = same / len(pred), same / len(gold)
        best = max(best, 2 * p * r / (p + r))
    return best


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) over the last dim, per row."""
    ref_lp = ref_logits.float().log_softmax(-1)
    lp = logits.float().log_softmax(-1)
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1)


@torch.no_grad()
def teacher_forced(engine, fused, answer: torch.Tensor) -> torch.Tensor:
    """Logits ``[len(answer), vocab]`` at the answer start and after each answer token but the last,
    continuing from the fused cache (which holds every prompt token but the last)."""
    return teacher_forced_batch(engine, [fused], answer)[0]


def _stacked_cache(fused: list):
    """One DynamicCache of batch ``len(fused)`` over the prompt but its last token: fusions of
    the same prompt (the same input ids), e.g. several configs of one question."""
    n = fused[0].input_ids.shape[1]
    if any(not torch.equal(f.input_ids, fused[0].input_ids) for f in fused[1:]):
        raise ValueError("a batch of fusions must share one prompt")
    return kv_to_cache(torch.stack([f.kv[:, :, :, : n - 1] for f in fused], 2))


@torch.no_grad()
def teacher_forced_batch(engine, fused: list, answer: torch.Tensor) -> torch.Tensor:
    """``teacher_forced`` for several fusions of one prompt in one forward: ``[len(fused),
    len(answer), vocab]`` (row i is fusion i's; the bench's step count per question stays one
    forward whatever the number of configs)."""
    ids = torch.cat([fused[0].input_ids[0, -1:].cpu(), answer[:-1].cpu()]).to(engine.lm.device)
    ids = ids[None].expand(len(fused), -1)
    out = engine.model(input_ids=ids, use_cache=True, **{cache_kwarg(engine.model): _stacked_cache(fused)})
    return out.logits.float()


def _eos_ids(engine) -> set[int]:
    """The ids ``model.generate`` stops at: the generation config's EOS (int or list), else the
    tokenizer's."""
    eos = getattr(getattr(engine.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = engine.tokenizer.eos_token_id
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


@torch.no_grad()
def greedy_batch(engine, fused: list, max_new_tokens: int) -> list[torch.Tensor]:
    """Greedy answers of several fusions of one prompt, decoded side by side (one forward a step
    for the whole batch): what ``greedy`` gives each (argmax, stopped after the first EOS, at most
    ``max_new_tokens``), row for row."""
    stop = _eos_ids(engine)
    cache = _stacked_cache(fused)
    tok = fused[0].input_ids[0, -1:].to(engine.lm.device)[None].expand(len(fused), 1)
    steps, done = [], torch.zeros(len(fused), dtype=torch.bool)
    for _ in range(max_new_tokens):
        out = engine.model(input_ids=tok, use_cache=True, **{cache_kwarg(engine.model): cache})
        tok = out.logits[:, -1].float().argmax(-1)[:, None]
        step = tok[:, 0].cpu()
        steps.append(step)
        done |= torch.tensor([int(t) in stop for t in step])
        if bool(done.all()):
            break
    seq = torch.stack(steps, 1) if steps else torch.zeros(len(fused), 0, dtype=torch.long)
    outs = []
    for row in seq:
        ends = [i for i, t in enumerate(row.tolist()) if t in stop]
        outs.append(row[: ends[0] + 1] if ends else row)
    return outs


@torch.no_grad()
def greedy(
    engine, input_ids: torch.Tensor, cache, max_new_tokens: int, min_new_tokens: int = 0
) -> torch.Tensor:
    ids = input_ids.to(engine.lm.device)
    out = engine.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        **({cache_kwarg(engine.model): cache} if cache is not None else {}),
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        pad_token_id=engine.tokenizer.eos_token_id,
    )
    return out[0, ids.shape[1] :].cpu()


@torch.no_grad()
def full_reference(engine, ids: torch.Tensor, answer_tokens: int, gen_tokens: int):
    """One full prefill and one greedy decode with EOS suppressed. Returns the first-token logits
    ``[vocab]``, the logits along the forced path ``[answer_tokens, vocab]``, the forced answer
    ``[answer_tokens]``, and the plain greedy answer (the forced path up to and including the
    first step whose argmax was EOS, at most ``gen_tokens``)."""
    eos = engine.tokenizer.eos_token_id
    cache = DynamicCache()
    out = engine.model(input_ids=ids, use_cache=True, **{cache_kwarg(engine.model): cache})
    logits = out.logits[0, -1].float()
    steps, tokens, plain_end = [], [], None
    for i in range(max(answer_tokens, gen_tokens)):
        steps.append(logits)
        if plain_end is None and int(logits.argmax()) == eos:
            plain_end = i
        masked = logits.clone()
        masked[eos] = float("-inf")
        tok = int(masked.argmax())
        tokens.append(tok)
        out = engine.model(
            input_ids=torch.tensor([[tok]], device=ids.device),
            use_cache=True,
            **{cache_kwarg(engine.model): cache},
        )
        logits = out.logits[0, -1].float()
    forced = torch.tensor(tokens[:answer_tokens])
    if plain_end is None or plain_end >= gen_tokens:
        plain = torch.tensor(tokens[:gen_tokens])
    else:
        plain = torch.tensor(tokens[:plain_end] + [eos])
    return steps[0], torch.stack(steps[:answer_tokens]), forced, plain


LEXICAL = "lex"
"""A config's policy name: ``select.ChunkFirst`` of the stale passage nearest the question by
TF-IDF over the prompt's passages (``corpus.nearest``, the first chunk skipped: it is exact with
the prefix sink and with ``exact_first``), its whole budget there first."""


def resolve_policy(policy, texts: list[str], question: str):
    """What ``fuse`` gets for a config's policy: naive reuse is cacheblend at ratio 0; ``lex``
    is a ``ChunkFirst`` of this prompt's passage nearest the question; anything else as is."""
    if policy == "naive":
        return "cacheblend"
    if policy == LEXICAL:
        from chunkcache.corpus import nearest
        from chunkcache.select import ChunkFirst

        return ChunkFirst(nearest(texts, question, skip=[0]) if len(texts) > 1 else 0)
    return policy


def policy_name(policy) -> str:
    """A policy's name in result rows: the string, or an object's ``name`` or class name."""
    return policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)


class FusedAnswer:
    """A fused prompt as the benchmark scores it: first-token logits, teacher-forced logits along
    a given answer, and a greedy answer of its own. ``score_many`` batches the configs of one
    question (``batch``: the fusion it stacks)."""

    def __init__(self, engine, fused) -> None:
        self.engine, self.fused = engine, fused
        self.batch = fused
        self.logits = fused.logits
        self.compute_fraction = fused.stats["compute_fraction"]
        self.seconds = fused.stats["seconds"]["total"]

    def forced(self, answer: torch.Tensor) -> torch.Tensor:
        return teacher_forced(self.engine, self.fused, answer)

    def generate(self, n: int) -> torch.Tensor:
        return greedy_batch(self.engine, [self.fused], n)[0]


class RefinedAnswer:
    """A fused prompt refined after its first ``after`` answer tokens (``fuse.refine``: a second
    probe with those tokens, ``extra`` more of the chunk tokens recomputed); ``after = 0`` is a
    second selection stage before the first token. Teacher-forced, the refinement sees the
    reference answer's first tokens, which are the fused greedy tokens wherever the answer has not
    diverged by then; ``generate`` refines on its own tokens."""

    def __init__(self, engine, fused, after: int, extra: float, policy) -> None:
        from chunkcache.fuse import refine

        self.engine, self.fused, self.after, self.extra, self.policy = engine, fused, after, extra, policy
        self._refine = refine
        self.seconds = fused.stats["seconds"]["total"]
        if after == 0:
            self.fused = refine(engine.lm, fused, [], extra, policy)
        self.logits = self.fused.logits
        self.compute_fraction = None  # set by the first forced() / generate(): it depends on the refinement

    def _refined(self, tokens: torch.Tensor):
        if self.after == 0:
            out = self.fused
        else:
            out = self._refine(self.engine.lm, self.fused, tokens[: self.after], self.extra, self.policy)
        full = self.engine.lm.spec.num_layers * (
            self.fused.stats["prompt_tokens"] - self.fused.stats["prefix_tokens"]
        )
        self.compute_fraction = out.stats["token_layers"] / full
        return out

    def forced(self, answer: torch.Tensor) -> torch.Tensor:
        if self.after == 0 or answer.numel() <= self.after:
            self._refined(answer)
            return teacher_forced(self.engine, self.fused, answer)
        head = teacher_forced(self.engine, self.fused, answer[: self.after])
        later = self._refined(answer)
        return torch.cat([head, teacher_forced(self.engine, later, answer[self.after :])])

    def generate(self, n: int) -> torch.Tensor:
        head = greedy(self.engine, self.fused.input_ids, self.fused.fresh_cache(), min(n, self.after or n))
        if self.after == 0 or head.numel() < self.after or n <= self.after:
            self._refined(head)
            return head
        later = self._refined(head)
        return torch.cat([head, greedy(self.engine, later.input_ids, later.fresh_cache(), n - self.after)])


class FullAnswer:
    """A full prefill by another engine (another dtype): the noise floor of every metric."""

    def __init__(self, engine, ids: torch.Tensor) -> None:
        self.engine, self.ids = engine, ids.to(engine.lm.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            self.logits = engine.model(input_ids=self.ids, logits_to_keep=1).logits[0, -1].float()
        self.seconds = time.perf_counter() - t0
        self.compute_fraction = 1.0

    @torch.no_grad()
    def forced(self, answer: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([self.ids[0], answer[:-1].to(self.ids.device)])[None]
        return self.engine.model(input_ids=ids, logits_to_keep=answer.numel()).logits[0].float()

    def generate(self, n: int) -> torch.Tensor:
        return greedy(self.engine, self.ids, None, n)


def score(engine, answer, full: dict, answers: list[str], gen_tokens: int) -> dict:
    """The metrics of one config against the full prefill's reference (``full_reference``)."""
    return score_many(engine, [answer], full, answers, gen_tokens)[0]


def score_many(
    engine, answerers: list, full: dict, answers: list[str], gen_tokens: int, batch: int | None = None
) -> list[dict]:
    """``score`` for several configs of one question: the answerers that fuse the same prompt on
    ``engine``'s model (``FusedAnswer``: a ``batch`` fusion) are teacher-forced in one forward and
    decoded side by side (``teacher_forced_batch``, ``greedy_batch``), at most ``batch`` at a time
    (default ``_BATCH``; each row holds a copy of its prompt's KV), the others one by one."""
    batch = _BATCH if batch is None else batch
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    eos = _eos_ids(engine)
    plain = full["plain"]
    batched = [
        i for i, a in enumerate(answerers)
        if getattr(a, "batch", None) is not None and a.engine.model is engine.model
    ]  # fmt: skip
    forced: dict[int, torch.Tensor] = {}
    for lo in range(0, len(batched), batch):
        part = batched[lo : lo + batch]
        logits = teacher_forced_batch(engine, [answerers[i].batch for i in part], full["forced"])
        forced.update(zip(part, logits, strict=True))
    for i, a in enumerate(answerers):
        if i not in forced:
            forced[i] = a.forced(full["forced"])  # [answer_tokens, vocab]
    diverge, agree = {}, {}
    for i, a in enumerate(answerers):
        # the plain answer is the forced one up to its EOS, so its path is a prefix of the forced path
        path = forced[i][: plain.numel()] if plain.numel() <= forced[i].shape[0] else a.forced(plain)
        diverge[i] = divergence(path, plain) if plain.numel() else 0
        agree[i] = diverge[i] == plain.numel() and (plain.numel() == gen_tokens or int(plain[-1]) in eos)
    texts = {i: full["text"] for i in agree if agree[i]}
    todo = [i for i in batched if not agree[i]]
    gens: dict[int, torch.Tensor] = {}
    for lo in range(0, len(todo), batch):
        part = todo[lo : lo + batch]
        gens.update(zip(part, greedy_batch(engine, [answerers[i].batch for i in part], gen_tokens), strict=True))
    rows = []
    for i, a in enumerate(answerers):
        if i not in texts:
            out = gens[i] if i in gens else a.generate(gen_tokens)
            texts[i] = engine.tokenizer.decode(out, skip_special_tokens=True).strip()
            agree[i] = texts[i] == full["text"]
        text = texts[i]
        rows.append(
            {
                "kl_first": float(kl(full["first"], a.logits)),
                "kl_answer": float(kl(full["forced_logits"], forced[i]).mean()),
                "diverge": gen_tokens if agree[i] else diverge[i],
                "agree": agree[i],
                "correct": correct(text, answers),
                "full_correct": correct(full["text"], answers),
                "f1": f1_score(text, answers),
                "full_f1": f1_score(full["text"], answers),
                "compute_fraction": a.compute_fraction,
                "fuse_seconds": a.seconds,
                "answer": text,
            }
        )
    return rows


_BATCH = 16
"""At most this many configs of one question teacher-forced or decoded side by side."""


@torch.no_grad()
def run(
    engine,
    data_path: str | Path = DEFAULT_DATA,
    questions: int = 100,
    passages: int = 5,
    policies: tuple[str, ...] = DEFAULT_POLICIES,
    ratios: tuple[float, ...] = (0.05, 0.15, 0.30),
    answer_tokens: int = 32,
    gen_tokens: int = 32,
    start: int = 0,
    log=print,
    partial: str | Path | None = None,
    split: str | None = None,
    noise_engine=None,
    noise_questions: int = 0,
    header: dict | None = None,
    refines: tuple[tuple[int, float], ...] = (),
    tag: str = "",
    configs: tuple[tuple[str, float], ...] | None = None,
    plain_engine=None,
    plain_configs: tuple[tuple[str, float], ...] = (),
    score_batch: int | None = None,
) -> dict:
    """Run the benchmark; returns ``{"rows": [...per question/config...], "summary": {...}}``.

    Greedy agreement is decided without generating: the fused cache is teacher-forced along the
    full prefill's greedy answer (up to its EOS); if every argmax matches, greedy decoding from the
    fused cache reproduces that answer token for token. Only disagreeing configs generate (for
    accuracy and F1). ``noise_engine``: an engine of the same model in another dtype whose full
    prefill is scored as config ``full-<dtype>@1`` on the first ``noise_questions`` questions.
    ``refines``: ``(after, extra)`` pairs; each adds, for every policy named in ``POLICIES`` that
    selects before layer 0 and every ratio, the config ``<policy>+rp<after>:<extra>@<ratio>`` (``RefinedAnswer``).
    ``policies`` may hold policy objects (named by their ``name`` attribute or class).
    ``partial``: rewrite the rows so far (with ``header``) to this JSON file after every question.
    ``configs``: ``(policy, ratio)`` pairs run instead of every policy at every ratio.
    ``tag``: prefix of every row's policy name, naive reuse's too (``<tag>:naive``), so that a run
    with other engine settings (``--sink context``) merges beside a plain run and its gap is
    measured against the plain run's naive reuse. ``plain_engine``: an engine of the same model
    and template with other settings (the shipped prefix sink) whose naive reuse and
    ``plain_configs`` run, untagged, on the same questions against the same full prefill (one
    process compares both; ``tag`` must then name ``engine``'s rows)."""
    if plain_engine is not None and not tag:
        raise ValueError("a plain_engine's rows are untagged: give engine's rows a tag")
    data = load_cases(data_path, split)[start : start + questions]
    rows = []
    t_start = time.perf_counter()
    noise_name = None
    if noise_engine is not None:
        noise_name = "full-" + str(noise_engine.lm.dtype).removeprefix("torch.")
    for qi, ex in enumerate(data):
        texts = [passage_text(c) for c in ex["ctxs"][:passages]]
        question = ex["question"]
        engine.precompute(texts)
        ids = engine.prompt_ids(texts, question).to(engine.lm.device)
        if plain_engine is not None:
            plain_engine.precompute(texts)
            if not torch.equal(plain_engine.prompt_ids(texts, question).to(ids.device), ids):
                raise ValueError("plain_engine builds other prompts (another template or tokenizer)")
        first, forced_logits, forced, plain = full_reference(engine, ids, answer_tokens, gen_tokens)
        full = {
            "first": first,
            "forced_logits": forced_logits,
            "forced": forced,
            "plain": plain,
            "text": engine.tokenizer.decode(plain, skip_special_tokens=True).strip(),
        }
        pairs = configs if configs is not None else [(p, r) for p in policies for r in ratios]
        pre = tag + ":" if tag else ""
        runs = [(engine, pre, [("naive", 0.0), *pairs])]
        if plain_engine is not None:
            runs.append((plain_engine, "", [("naive", 0.0), *plain_configs]))
        todo_rows = []  # (name, ratio, answerer): scored together, the fusions side by side
        for eng, pre, todo in runs:
            for policy, ratio in todo:
                fused = eng.fuse(
                    texts,
                    question,
                    recompute_ratio=ratio,
                    policy=resolve_policy(policy, texts, question),
                )
                todo_rows.append((pre + policy_name(policy), ratio, FusedAnswer(eng, fused)))
                if eng is not engine:
                    continue
                sel = (
                    FuseConfig(policy=policy).selector
                    if isinstance(policy, str) and policy not in ("naive", LEXICAL)
                    else None
                )
                for after, extra in refines if sel is not None and sel.probe and sel.before_layers else ():
                    name = f"{pre}{policy_name(policy)}+rp{after}:{extra:g}"
                    todo_rows.append((name, ratio, RefinedAnswer(engine, fused, after, extra, policy)))
        scored = score_many(engine, [a for _, _, a in todo_rows], full, ex["answers"], gen_tokens, score_batch)
        for (name, ratio, _), row in zip(todo_rows, scored, strict=True):
            rows.append({"q": start + qi, "policy": name, "ratio": ratio, **row})
        del todo_rows, scored
        if engine.lm.device.type == "cuda":  # several bench processes share one GPU: hand the question's KV back
            torch.cuda.empty_cache()
        if noise_name is not None and qi < noise_questions:
            row = score(noise_engine, FullAnswer(noise_engine, ids), full, ex["answers"], gen_tokens)
            rows.append({"q": start + qi, "policy": noise_name, "ratio": 1.0, **row})
        if partial:
            Path(partial).write_text(json.dumps({**(header or {}), "rows": rows}))
        if log:
            naive = [r for r in rows if r["q"] == start + qi and r["policy"] == runs[0][1] + "naive"][0]
            log(
                f"[{qi + 1}/{len(data)}] {time.perf_counter() - t_start:.0f}s  naive KL {naive['kl_first']:.4f}  "
                f"full: {full['text'][:60]!r}",
                flush=True,
            )
    return {"rows": rows, "summary": summarize(rows)}


def common_rows(rows: list[dict], floor_prefix: str = "full-") -> list[dict]:
    """The rows of the questions every config has (parallel runs cut at different questions
    then compare on the same ones); noise-floor configs (``full-<dtype>``, run on a few
    questions only) are kept on those questions and do not narrow them."""
    by_config: dict[tuple[str, float], set] = defaultdict(set)
    for r in rows:
        if not r["policy"].startswith(floor_prefix):
            by_config[(r["policy"], r["ratio"])].add(r["q"])
    keep = set.intersection(*by_config.values()) if by_config else set()
    return [r for r in rows if r["q"] in keep]


def summarize(rows: list[dict]) -> dict:
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["policy"], r["ratio"])].append(r)
    # the baseline: plain naive reuse, else (a tagged run on its own) its tagged naive reuse
    naive_rows = groups.get(("naive", 0.0)) or next(
        (rs for (p, r), rs in sorted(groups.items()) if p.endswith(":naive") and r == 0.0), []
    )
    naive_by_q = {r["q"]: r for r in naive_rows}
    out = {}
    for (policy, ratio), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0] != "naive", kv[0][0], kv[0][1])
    ):

        def m(key: str, rs: list[dict] = rs) -> float:
            return sum(float(r[key]) for r in rs) / len(rs)

        # the gap is naive reuse's KL on the same questions this config ran on
        base = [naive_by_q[r["q"]] for r in rs if r["q"] in naive_by_q]
        naive_kl = m("kl_first", base) if base else 0.0
        naive_kla = m("kl_answer", base) if base else 0.0

        out[f"{policy}@{ratio:g}"] = {
            "policy": policy,
            "ratio": ratio,
            "n": len(rs),
            "kl_first": m("kl_first"),
            "kl_answer": m("kl_answer"),
            "gap_closed_first": 1 - m("kl_first") / naive_kl if naive_kl else 0.0,
            "gap_closed_answer": 1 - m("kl_answer") / naive_kla if naive_kla else 0.0,
            "agree": m("agree"),
            "diverge": m("diverge") if all("diverge" in r for r in rs) else None,
            "accuracy": m("correct") if all("correct" in r for r in rs) else None,
            "full_accuracy": m("full_correct") if all("full_correct" in r for r in rs) else None,
            "f1": m("f1"),
            "full_f1": m("full_f1"),
            "compute_fraction": m("compute_fraction"),
            "fuse_seconds": m("fuse_seconds"),
        }
    return out


def table(summary: dict) -> str:
    """One line per config. ``acc/full``: the config's answer accuracy over full prefill's on the
    same questions (rows from before the answer metrics show ``-``)."""
    head = (
        f"{'config':<18}{'n':>4}{'KL@start':>10}{'gap%':>7}{'KL/token':>10}{'gap%':>7}{'agree':>7}"
        f"{'diverge':>8}{'acc':>6}{'acc/full':>9}{'F1':>7}{'compute':>9}"
    )
    lines = [head, "-" * len(head)]

    def opt(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for name, s in summary.items():
        acc, full_acc = s.get("accuracy"), s.get("full_accuracy")
        ratio = acc / full_acc if acc is not None and full_acc else None
        lines.append(
            f"{name:<18}{s['n']:>4}{s['kl_first']:>10.4f}{100 * s['gap_closed_first']:>7.1f}{s['kl_answer']:>10.4f}"
            f"{100 * s['gap_closed_answer']:>7.1f}{s['agree']:>7.2f}{opt(s.get('diverge'), '.1f'):>8}"
            f"{opt(acc, '.2f'):>6}{opt(ratio, '.2f'):>9}{s['f1']:>7.3f}{s['compute_fraction']:>9.3f}"
        )
    return "\n".join(lines)


def plot(summary: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    naive = summary.get("naive@0")
    fig, ax = plt.subplots(figsize=(6, 4))
    by_policy: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in summary.values():
        # a policy run on fewer questions than naive reuse would not be comparable on one plot
        if s["policy"] != "naive" and (naive is None or s["n"] == naive["n"]):
            by_policy[s["policy"]].append((s["ratio"], s["kl_first"]))
    for policy, pts in sorted(by_policy.items()):
        pts = ([(0.0, naive["kl_first"])] if naive else []) + sorted(pts) + [(1.0, 0.0)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
    ax.set_xlabel("recompute ratio")
    ax.set_ylabel("mean KL(full || fused) at answer start")
    ax.set_title("Fusion fidelity vs recompute ratio")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DEFAULT_DATA), help="MuSiQue-style JSON (question, answers, ctxs)")
    p.add_argument("--model", default="smollm2-135m", help="model name, HF id or path")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--questions", type=int, default=100, help="number of questions")
    p.add_argument("--start", type=int, default=0, help="index of the first question")
    p.add_argument("--passages", type=int, default=5, help="passages per question")
    p.add_argument("--split", default=None, help="factual set only: dev or heldout (default: every case)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help="comma-separated")
    p.add_argument("--ratios", default="0.05,0.15,0.30", help="comma-separated recompute ratios")
    p.add_argument(
        "--configs",
        default="",
        help="comma-separated POLICY@RATIO pairs run instead of --policies x --ratios (naive reuse always runs)",
    )
    p.add_argument(
        "--answer-tokens", type=int, default=32, help="tokens of the answer scored (KL, agreement)"
    )
    p.add_argument(
        "--noise-floor",
        type=int,
        default=0,
        help="also score a full prefill in --noise-dtype on the first N questions (the noise floor)",
    )
    p.add_argument(
        "--refine",
        default="",
        help="comma-separated AFTER:EXTRA pairs: also refine each probe policy's fusion after AFTER answer "
        "tokens (0: a second selection stage before the first) with EXTRA more of the chunk tokens",
    )
    p.add_argument("--noise-dtype", default="bfloat16", help="dtype of the noise-floor full prefill")
    p.add_argument("--sink", default="prefix", choices=["bos", "prefix", "context"], help="precompute sink")
    p.add_argument(
        "--sink-context",
        default=None,
        help="with --sink context: SPLIT:CASE:I,J, the sink made of passages I, J of that case of --data; "
        "nn:K[x], each chunk behind its K nearest passages of --data (x: none of its own case) "
        "(default: the generic CONTEXT_SINK_PASSAGES)",
    )
    p.add_argument(
        "--exact-first",
        "--first-exact",
        action="store_true",
        help="with --sink context: the engine's exact_first (each chunk also stored behind the prefix "
        "alone; a prompt's first chunk fused from that variant)",
    )
    p.add_argument(
        "--token-scores",
        action="store_true",
        help="the engine's token_scores (each chunk stored with its context-impact scores): needed "
        "by policy qimpact; the other policies' results are unchanged by it",
    )
    p.add_argument(
        "--plain-configs",
        default="",
        help="with --tag: POLICY@RATIO pairs also run (untagged, with naive reuse) by a prefix-sink "
        "engine of the same model on the same questions and full prefill",
    )
    p.add_argument(
        "--tag", default="", help="prefix of every config's name, naive's too (merge beside a plain run)"
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="fuse on the engine's eager path on CUDA too (fast_path=False: no CUDA graph recording or "
        "kernel compilation per new prompt shape; fidelity runs meet a new shape every question)",
    )
    p.add_argument(
        "--score-batch",
        type=int,
        default=_BATCH,
        help="configs of a question teacher-forced and decoded side by side at most (each a copy of the "
        "prompt's KV: lower it for long prompts in many processes on one GPU)",
    )
    p.add_argument("--codec", default="raw", help="codec of the chunk caches")
    p.add_argument("--store", default=None, help="store path (default: in memory)")
    p.add_argument("--out", default=None, help="write JSON results here")
    p.add_argument("--plot", default=None, help="save a KL-vs-ratio plot here (PNG)")
    p.add_argument(
        "--common",
        action="store_true",
        help="with --merge: only the questions every config has (runs cut at different questions)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="instead of running: merge the rows of earlier --out files (e.g. two halves); "
        "--start/--questions then select rows by question index",
    )


def command_line() -> str:
    """The command that is running, as ``chunkcache bench quality ...`` (recorded in every result
    file, partial ones included)."""
    argv = sys.argv[1:]
    if argv[:2] == ["bench", "quality"]:  # through the chunkcache CLI
        argv = argv[2:]
    return " ".join(["chunkcache", "bench", "quality"] + argv)


def run_cli(args: argparse.Namespace) -> int:
    from chunkcache.engine import ChunkCache
    from chunkcache.select import POLICIES

    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        # --start/--questions pick rows by question index (e.g. one device's half of a merged run)
        lo, hi = args.start, args.start + args.questions
        rows = [r for part in parts for r in part["rows"] if lo <= r["q"] < hi]
        if args.common:
            rows = common_rows(rows)
        res = {
            "command": command_line(),
            "commands": [p.get("command") or p.get("commands") for p in parts],
            "settings": parts[0].get("settings"),
            "rows": rows,
            "summary": summarize(rows),
        }
        print(table(res["summary"]))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        if args.plot:
            plot(res["summary"], args.plot)
        return 0

    def config_pairs(text: str, flag: str) -> tuple[tuple[str, float], ...]:
        try:
            return tuple((p, float(r)) for p, r in (x.split("@") for x in text.split(",") if x))
        except ValueError:
            raise SystemExit(f"{flag} takes POLICY@RATIO,..., got {text!r}") from None

    pairs = None
    if args.configs:
        pairs = config_pairs(args.configs, "--configs")
        args.policies = ",".join(dict.fromkeys(p for p, _ in pairs))
    plain = config_pairs(args.plain_configs, "--plain-configs")
    if plain and not args.tag:
        raise SystemExit("--plain-configs needs --tag (its rows are the untagged ones)")
    policies = tuple(x for x in args.policies.split(",") if x)
    unknown = [p for p in policies + tuple(p for p, _ in plain) if p not in POLICIES and p != LEXICAL]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; choose from {sorted(POLICIES) + [LEXICAL]}")
    ratios = tuple(float(x) for x in args.ratios.split(",") if x)
    refines = tuple((int(a), float(b)) for a, b in (x.split(":") for x in args.refine.split(",") if x))
    load_cases(args.data, args.split)  # a missing file or split fails before the model loads
    if args.score_batch < 1:
        raise SystemExit(f"--score-batch must be at least 1, got {args.score_batch}")
    if args.sink_context and args.sink != "context":
        raise SystemExit("--sink-context needs --sink context")
    context = None
    if args.sink_context:
        try:
            context = sink_context(args.data, args.sink_context)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    if args.exact_first and args.sink != "context":
        raise SystemExit("--exact-first needs --sink context")
    header = {"command": command_line(), "settings": {k: v for k, v in vars(args).items() if not callable(v)}}
    engine = ChunkCache(
        model=args.model,
        store=args.store,
        dtype=args.dtype,
        device=args.device,
        sink=args.sink,
        sink_context=context,
        exact_first=args.exact_first,
        token_scores=args.token_scores,
        codec=args.codec,
        fast_path=False if args.eager else None,
    )
    plain_engine = None
    if plain:
        plain_engine = ChunkCache(  # one store: an exact_first engine's prefix variants are its entries
            model=engine.model,
            tokenizer=engine.tokenizer,
            store=engine.store,
            codec=args.codec,
            fast_path=engine.fast_path,
        )
    noise = None
    if args.noise_floor:
        noise = ChunkCache(
            model=args.model, store=None, dtype=args.noise_dtype, device=args.device, sink=args.sink
        )
    res = run(
        engine,
        data_path=args.data,
        questions=args.questions,
        start=args.start,
        partial=args.out,
        passages=args.passages,
        policies=policies,
        ratios=ratios,
        answer_tokens=args.answer_tokens,
        gen_tokens=args.answer_tokens,
        split=args.split,
        noise_engine=noise,
        noise_questions=args.noise_floor,
        header=header,
        refines=refines,
        tag=args.tag,
        configs=pairs,
        plain_engine=plain_engine,
        plain_configs=plain,
        score_batch=args.score_batch,
    )
    print(table(res["summary"]))
    res = {**header, **res}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res["summary"], args.plot)
    return 0


main = standalone("chunkcache bench quality", __doc__, add_arguments, run_cli)


if __name__ == "__main__":
    sys.exit(main())
