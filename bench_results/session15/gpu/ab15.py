"""Lead, session 15 (issue 13 req. 5, the store path): one request through ``engine.fuse`` on
texts from the int8 LMDB store, 8B shape, qfast 15%, forms interleaved call by call on one engine:
  main   prompt geometry in one host-to-device copy; entry identities checked once per exact
         header and tokens (``_check_entry(raw=)``)
  s14    session 14: five small uploads, full identity checks
  nomemo main without the identity memo
(Call 2 ran an earlier main whose inline loader queued its steps a step ahead of the compute,
against "eager" = every step at start, as now: that form is gone, see BENCHMARKS.)
Medians of REPS after WARMUP calls of each form; full prefill of the same prompt ids beside.
    python3 bench_results/session15/gpu/ab15.py OUTDIR [CONTEXTS]
env FORMS (main,s14), SHAPE (llama3-8b; tiny for a CPU smoke test), DEV (cuda)."""

import json
import os
import statistics
import sys
import tempfile
import time

import torch

import chunkcache.engine as E
import chunkcache.fuse as FU
from chunkcache.bench.texts import passages, questions
from chunkcache.bench.ttft import _full_once, _tokenizer, build_model, speed_engine

out = sys.argv[1]
contexts = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "8192,16384,32768").split(",")]
WARMUP, REPS = 3, 9
SHAPE, DEV = os.environ.get("SHAPE", "llama3-8b"), os.environ.get("DEV", "cuda")
lm = build_model(SHAPE, torch.bfloat16 if DEV == "cuda" else torch.float32, DEV)
tok = _tokenizer()
texts = passages(tok, max(contexts) // 512, tokens=512)
question = questions()[0]
eng = speed_engine(lm.model, tok, tempfile.mkdtemp(prefix="ab15-"), "int8", fast_path=True)
eng.precompute(texts, batch_size=4)


def old_build(ids, n_prefix, chunk_lengths, slots, dev, exact_chunks=None):  # session 14's _Prompt.build
    n = ids.shape[1]
    n_ctx = sum(chunk_lengths)
    n_q = n - n_prefix - n_ctx
    offsets = [n_prefix + sum(chunk_lengths[:i]) for i in range(len(chunk_lengths))]
    chunk_of = torch.full((n,), -1, dtype=torch.long)
    chunk_of[n_prefix : n_prefix + n_ctx] = torch.repeat_interleave(
        torch.arange(len(chunk_lengths)), torch.tensor(chunk_lengths, dtype=torch.long)
    )
    return FU._Prompt(
        ids=ids[0].to(dev), n_prefix=n_prefix, n_ctx=n_ctx, n_q=n_q,
        ctx_pos=torch.arange(n_prefix, n_prefix + n_ctx, device=dev), q_pos=torch.arange(n - n_q, n, device=dev),
        chunk_of=chunk_of.to(dev), chunk_offsets=torch.tensor(offsets, dtype=torch.long).to(dev),
        chunk_lengths=list(chunk_lengths), exact_chunks=None if exact_chunks is None else list(exact_chunks),
        exact=None if exact_chunks is None or not any(exact_chunks)
        else torch.repeat_interleave(torch.tensor(exact_chunks), torch.tensor(chunk_lengths)).to(dev),
    )  # fmt: skip


new_build, real_check = FU._Prompt.build, E.ChunkCache._check_entry


def check_nomemo(self, key, header, token_ids, ids, info=None, raw=None):
    return real_check(self, key, header, token_ids, ids, info)


forms = {"main": (new_build, real_check), "s14": (old_build, check_nomemo), "nomemo": (new_build, check_nomemo)}
forms = {f: forms[f] for f in os.environ.get("FORMS", "main,s14").split(",")}


def use(form):
    FU._Prompt.build, E.ChunkCache._check_entry = staticmethod(form[0]), form[1]


def timed(fn):
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    r = fn()
    sync()
    return time.perf_counter() - t, r


rows = []
for n_ctx in contexts:
    ctx = texts[: n_ctx // 512]
    full = [timed(lambda: _full_once(eng, ctx, question))[0] for _ in range(WARMUP + REPS)][WARMUP:]
    t_full = statistics.median(full)
    print(f"\n== {n_ctx}: full prefill {t_full * 1e3:.1f} ms", flush=True)
    times = {f: [] for f in forms}
    logits = {}
    for it in range(WARMUP + REPS):
        for f, form in forms.items():
            use(form)
            t, res = timed(lambda: eng.fuse(ctx, question, recompute_ratio=0.15).logits.cpu())
            if it >= WARMUP:
                times[f].append(t)
            logits[f] = res
    stages = {}
    for f in forms:  # stage breakdown of one more call of each form
        use(forms[f])
        r = eng.fuse(ctx, question, recompute_ratio=0.15)
        stages[f] = {k: round(v * 1e3, 2) for k, v in r.stats["seconds"].items()}
    use(forms["main"])
    for f in forms:
        m = statistics.median(times[f])
        row = {"context": n_ctx, "form": f, "ttft_ms": m * 1e3, "full_ms": t_full * 1e3, "speedup": t_full / m,
               "min_ms": min(times[f]) * 1e3, "stages_ms": stages[f],
               "equal_to_main": bool(torch.equal(logits[f], logits["main"]))}  # fmt: skip
        rows.append(row)
        print(f"  {f:7s} {m * 1e3:7.1f} ms {t_full / m:5.2f}x (min {min(times[f]) * 1e3:.1f}) "
              f"equal {row['equal_to_main']} | " + " ".join(f"{k} {v}" for k, v in stages[f].items()), flush=True)
    with open(f"{out}/ab15.json", "w") as fh:
        json.dump(rows, fh, indent=1)
