"""Lead, session 16 (issue 13 req. 5, the store path): one request through ``engine.fuse`` on
texts from the int8 LMDB store, 8B shape, qfast 15%, forms interleaved call by call on one engine:
  main      the inline loader queues its first copies (``LayerLoader.AHEAD_BYTES``, 128 MiB) while
            its plan's launch and checksum tables are built
  noahead   AHEAD_BYTES = 0 (session 15's order: tables, prompt, then every copy)
  ahead256  AHEAD_BYTES = 256 MiB
  fine      main, and the last copy group and the probe's last graph group in halving steps
            (``stream.layer_steps(fine_tail=True)``, as for entries arriving over a link)
  pageable  (GPU call 2 only, when main sent the small uploads through page-locked memory with
            ``kernels.to_device``, since reverted): main with ``.to`` uploads, today's main
Needs the pipeline of commits b1dd324..eb58c18 (``LayerLoader.AHEAD_BYTES``), reverted after GPU
call 3 (see BENCHMARKS.md, section 3, session 16).
Medians of REPS after WARMUP calls of each form; full prefill of the same prompt ids beside.
    python3 bench_results/session16/gpu/ab16.py OUTDIR [CONTEXTS]
env FORMS (main,noahead), SHAPE (llama3-8b; tiny for a CPU smoke test), DEV (cuda)."""

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
WARMUP, REPS = 3, 9
SHAPE, DEV = os.environ.get("SHAPE", "llama3-8b"), os.environ.get("DEV", "cuda")
lm = build_model(SHAPE, torch.bfloat16 if DEV == "cuda" else torch.float32, DEV)
tok = _tokenizer()
texts = passages(tok, max(contexts) // 512, tokens=512)
question = questions()[0]
eng = speed_engine(lm.model, tok, tempfile.mkdtemp(prefix="ab16-"), "int8", fast_path=True)
eng.precompute(texts, batch_size=4)

AHEAD = P.LayerLoader.AHEAD_BYTES
ARRIVING = P.LayerLoader.arriving
forms = {"main": (AHEAD, False), "noahead": (0, False), "ahead256": (256 << 20, False), "fine": (AHEAD, True)}
forms = {f: forms[f] for f in os.environ.get("FORMS", "main,noahead").split(",")}


def use(form):
    P.LayerLoader.AHEAD_BYTES = form[0]
    P.LayerLoader.arriving = property(lambda self: True) if form[1] else ARRIVING


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
        stages[f]["ahead_layers"] = r.stats.get("copies_ahead")
    use(forms["main"])
    for f in forms:
        m = statistics.median(times[f])
        row = {"context": n_ctx, "form": f, "ttft_ms": m * 1e3, "full_ms": t_full * 1e3, "speedup": t_full / m,
               "min_ms": min(times[f]) * 1e3, "stages_ms": stages[f],
               "equal_to_main": bool(torch.equal(logits[f], logits["main"]))}  # fmt: skip
        rows.append(row)
        print(f"  {f:7s} {m * 1e3:7.1f} ms {t_full / m:5.2f}x (min {min(times[f]) * 1e3:.1f}) "
              f"equal {row['equal_to_main']} | " + " ".join(f"{k} {v}" for k, v in stages[f].items()), flush=True)
    with open(f"{out}/ab16.json", "w") as fh:
        json.dump(rows, fh, indent=1)
