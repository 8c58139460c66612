"""Fusion-quality benchmark: how close fused caches come to a full prefill, on real RAG prompts.

For each question of ``musique_dev.json`` (k passages each) and each (policy, ratio):
  - ``kl_first``: KL(full || fused) of the next-token distribution at the answer start;
  - ``kl_answer``: mean per-token KL over the full prefill's greedy answer (teacher-forced,
    ``answer_tokens`` tokens, EOS suppressed so every question has that many);
  - ``agree``: the fused greedy answer equals the full prefill's greedy answer;
  - ``f1``: answer F1 against the gold answers (SQuAD normalisation), for fused and full.
Naive reuse is ratio 0 (identical for every policy, reported once). The gap closed at a ratio is
``1 - KL(policy, r) / KL(naive)``.

What it does not know: how fusion works; it only calls the engine.

    python -m chunkcache.bench.quality --questions 100 --passages 5 --out BENCH_quality.json
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
from chunkcache.model import cache_kwarg

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "demos" / "data" / "musique_dev.json"  # in a checkout


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
    ids = torch.cat([fused.input_ids[0, -1:], answer[:-1]]).to(engine.lm.device)[None]
    out = engine.model(input_ids=ids, use_cache=True, **{cache_kwarg(engine.model): fused.fresh_cache()})
    return out.logits[0].float()


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


@torch.no_grad()
def run(
    engine,
    data_path: str | Path = DEFAULT_DATA,
    questions: int = 100,
    passages: int = 5,
    policies: tuple[str, ...] = ("cacheblend", "gradual", "qaware", "epic", "random"),
    ratios: tuple[float, ...] = (0.05, 0.15, 0.30),
    answer_tokens: int = 16,
    gen_tokens: int = 32,
    start: int = 0,
    log=print,
    partial: str | Path | None = None,
) -> dict:
    """Run the benchmark; returns ``{"rows": [...per question/config...], "summary": {...}}``.

    Greedy agreement is decided without generating: the fused cache is teacher-forced along the
    full prefill's greedy answer (up to its EOS); if every argmax matches, greedy decoding from the
    fused cache reproduces that answer token for token. Only disagreeing configs generate (for F1).
    ``partial``: rewrite the rows so far to this JSON file after every question."""
    data = json.loads(Path(data_path).read_text())[start : start + questions]
    rows = []
    t_start = time.perf_counter()
    eos = engine.tokenizer.eos_token_id
    for qi, ex in enumerate(data):
        texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][:passages]]
        question = ex["question"]
        engine.precompute(texts)
        ids = engine.prompt_ids(texts, question).to(engine.lm.device)
        full_first, full_forced, forced_ans, full_gen = full_reference(engine, ids, answer_tokens, gen_tokens)
        full_text = engine.tokenizer.decode(full_gen, skip_special_tokens=True).strip()
        full_f1 = f1_score(full_text, ex["answers"])
        configs = [("naive", 0.0)] + [(p, r) for p in policies for r in ratios]
        for policy, ratio in configs:
            fused = engine.fuse(
                texts, question, recompute_ratio=ratio, policy="cacheblend" if policy == "naive" else policy
            )
            fused_forced = teacher_forced(engine, fused, forced_ans)
            path = teacher_forced(engine, fused, full_gen) if full_gen.numel() else fused.logits[None]
            agree = bool((path.argmax(-1).cpu() == full_gen).all()) and (
                full_gen.numel() == gen_tokens or (full_gen.numel() > 0 and int(full_gen[-1]) == eos)
            )
            if agree:
                text = full_text
            else:
                gen = greedy(engine, fused.input_ids, fused.fresh_cache(), gen_tokens)
                text = engine.tokenizer.decode(gen, skip_special_tokens=True).strip()
                agree = text == full_text
            rows.append(
                {
                    "q": start + qi,
                    "policy": policy,
                    "ratio": ratio,
                    "kl_first": float(kl(full_first, fused.logits)),
                    "kl_answer": float(kl(full_forced, fused_forced).mean()),
                    "agree": agree,
                    "f1": f1_score(text, ex["answers"]),
                    "full_f1": full_f1,
                    "compute_fraction": fused.stats["compute_fraction"],
                    "fuse_seconds": fused.stats["seconds"]["total"],
                }
            )
        if partial:
            Path(partial).write_text(json.dumps({"rows": rows}))
        if log:
            naive = [r for r in rows if r["q"] == start + qi and r["policy"] == "naive"][0]
            log(
                f"[{qi + 1}/{len(data)}] {time.perf_counter() - t_start:.0f}s  naive KL {naive['kl_first']:.4f}  "
                f"full: {full_text[:60]!r}",
                flush=True,
            )
    return {"rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["policy"], r["ratio"])].append(r)
    naive_by_q = {r["q"]: r for r in groups.get(("naive", 0.0), [])}
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
            "f1": m("f1"),
            "full_f1": m("full_f1"),
            "compute_fraction": m("compute_fraction"),
            "fuse_seconds": m("fuse_seconds"),
        }
    return out


def table(summary: dict) -> str:
    head = f"{'config':<18}{'n':>4}{'KL@start':>10}{'gap%':>7}{'KL/token':>10}{'gap%':>7}{'agree':>7}{'F1':>7}{'fullF1':>8}{'compute':>9}"
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        lines.append(
            f"{name:<18}{s['n']:>4}{s['kl_first']:>10.4f}{100 * s['gap_closed_first']:>7.1f}{s['kl_answer']:>10.4f}"
            f"{100 * s['gap_closed_answer']:>7.1f}{s['agree']:>7.2f}{s['f1']:>7.3f}{s['full_f1']:>8.3f}"
            f"{s['compute_fraction']:>9.3f}"
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
    p.add_argument("--policies", default="cacheblend,gradual,qaware,epic,random", help="comma-separated")
    p.add_argument("--ratios", default="0.05,0.15,0.30", help="comma-separated recompute ratios")
    p.add_argument("--sink", default="prefix", choices=["bos", "prefix"], help="precompute sink")
    p.add_argument("--codec", default="raw", help="codec of the chunk caches")
    p.add_argument("--store", default=None, help="store path (default: in memory)")
    p.add_argument("--out", default=None, help="write JSON results here")
    p.add_argument("--plot", default=None, help="save a KL-vs-ratio plot here (PNG)")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="instead of running: merge the rows of earlier --out files (e.g. two halves)",
    )


def run_cli(args: argparse.Namespace) -> int:
    from chunkcache.engine import ChunkCache

    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for part in parts for r in part["rows"]]
        res = {
            "rows": rows,
            "summary": summarize(rows),
            "commands": [p.get("command") for p in parts],
            "settings": parts[0].get("settings"),
        }
        print(table(res["summary"]))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        if args.plot:
            plot(res["summary"], args.plot)
        return 0

    engine = ChunkCache(
        model=args.model,
        store=args.store,
        dtype=args.dtype,
        device=args.device,
        sink=args.sink,
        codec=args.codec,
    )
    res = run(
        engine,
        data_path=args.data,
        questions=args.questions,
        start=args.start,
        partial=args.out,
        passages=args.passages,
        policies=tuple(x for x in args.policies.split(",") if x),
        ratios=tuple(float(x) for x in args.ratios.split(",") if x),
    )
    print(table(res["summary"]))
    res["command"] = " ".join(["chunkcache", "bench", "quality"] + sys.argv[1:])
    res["settings"] = {k: v for k, v in vars(args).items() if not callable(v)}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.plot:
        plot(res["summary"], args.plot)
    return 0


main = standalone("chunkcache bench quality", __doc__, add_arguments, run_cli)


if __name__ == "__main__":
    sys.exit(main())
