"""Lead, session 14 (issue 13 req. 5, the store path): one request through ``engine.fuse`` on
texts from the int8 LMDB store, 8B shape, qfast 15%, forms interleaved call by call on one engine
(the same machine state for each):
  main    the loader starts once the headers are parsed (job placed first) and queues every
          copy, assembly and checksum on the calling thread (``LayerLoader.inline``), then the
          entries' checks run while the layers stream in; the last copy group in halving steps
  thread  the same start, staged by the stager thread (the first form of this session: call 1)
  late    session 13: the stager thread starts at the fusion's first layer, whole last group
Medians of REPS after WARMUP calls of each form; full prefill of the same prompt ids beside.
    python3 bench_results/session14/gpu/ab_early.py OUTDIR [CONTEXTS] [POLICIES]
"""

import json
import os
import statistics
import sys
import tempfile
import time

import torch

import chunkcache.pipeline as P
from chunkcache.bench.texts import passages, questions
from chunkcache.bench.ttft import _full_once, _tokenizer, build_model, speed_engine

out = sys.argv[1]
contexts = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "8192,16384,32768").split(",")]
policies = (sys.argv[3] if len(sys.argv) > 3 else "qfast").split(",")
WARMUP, REPS = 3, 7
SHAPE, DEV = os.environ.get("SHAPE", "llama3-8b"), os.environ.get("DEV", "cuda")  # (tiny, cpu: a smoke test)
lm = build_model(SHAPE, torch.bfloat16 if DEV == "cuda" else torch.float32, DEV)
tok = _tokenizer()
texts = passages(tok, max(contexts) // 512, tokens=512)
question = questions()[0]
eng = speed_engine(lm.model, tok, tempfile.mkdtemp(prefix="ab-early-"), "int8", fast_path=True)
eng.precompute(texts, batch_size=4)

orig_fuse, orig_arriving, orig_inline = P.fuse_entries, P.LayerLoader.arriving, P.LayerLoader.inline
late_fuse = lambda *a, **k: orig_fuse(*a, **{**k, "preload": False})  # noqa: E731
old_arriving = property(lambda self: self.arrival is not None)
no_inline = property(lambda self: False)
forms = {"main": (orig_fuse, orig_arriving, orig_inline), "thread": (orig_fuse, orig_arriving, no_inline),
         "late": (late_fuse, old_arriving, no_inline)}  # fmt: skip
if os.environ.get("FORMS"):  # (call 3: main and late only; the halving tail is main's no more)
    forms = {f: forms[f] for f in os.environ["FORMS"].split(",")}


def use(form):
    P.fuse_entries, P.LayerLoader.arriving, P.LayerLoader.inline = form


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
    for policy in policies:
        times = {f: [] for f in forms}
        stages = {f: [] for f in forms}
        logits = {}
        for it in range(WARMUP + REPS):
            for f, form in forms.items():
                use(form)
                t, res = timed(lambda: eng.fuse(ctx, question, recompute_ratio=0.15, policy=policy).logits.cpu())
                if it >= WARMUP:
                    times[f].append(t)
                logits[f] = res
        use(forms["main"])
        for f in forms:  # stage breakdown of one more call of each form
            use(forms[f])
            r = eng.fuse(ctx, question, recompute_ratio=0.15, policy=policy)
            stages[f] = {k: round(v * 1e3, 2) for k, v in r.stats["seconds"].items()}
        use(forms["main"])
        for f in forms:
            m = statistics.median(times[f])
            row = {"context": n_ctx, "policy": policy, "form": f, "ttft_ms": m * 1e3, "full_ms": t_full * 1e3,
                   "speedup": t_full / m, "min_ms": min(times[f]) * 1e3, "stages_ms": stages[f],
                   "equal_to_main": bool(torch.equal(logits[f], logits["main"]))}  # fmt: skip
            rows.append(row)
            print(f"  {policy:7s} {f:10s} {m * 1e3:7.1f} ms {t_full / m:5.2f}x (min {min(times[f]) * 1e3:.1f}) "
                  f"equal {row['equal_to_main']} | " + " ".join(f"{k} {v}" for k, v in stages[f].items()), flush=True)
        with open(f"{out}/ab_early.json", "w") as fh:
            json.dump(rows, fh, indent=1)
