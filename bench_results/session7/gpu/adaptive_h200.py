"""Adaptive loading on the H200, Llama-3-8B shape (random bf16 weights), 8K context (16 passages
of 512 tokens), qfast 15%: the rates the projection needs, measured, then the PROJECTION per link.

Measured (medians of --reps after --warmup, TTFT = texts -> first-token logits on the host):
  full       HF forward over the prompt (logits_to_keep=1): the baseline and the recompute rate
  fallback   ``engine.fuse`` under an adaptive plan that falls back to the full prefill (a link of
             1 byte/s): planning overhead + ``fuse.prefill``
  local      ``engine.fuse`` with every chunk fetched from the warm local LMDB store (fast path:
             direct copies from the registered map), per codec
  split k    ``engine.fuse`` with ``AdaptiveConfig(recompute_chunks=k)``: the first k chunks
             recomputed in place (``precompute.encode_exact``) while a thread reads the other 16 - k
             from the local store as bytes (``store.get``, as a network tier delivers them), then
             ``pipeline.fuse_entries`` over those bytes behind the exact front; stages: recompute
             (front), fetch (thread), fuse (after both)

PROJECTION (not measured end to end): the link is the only thing not measured here. For link
rate R and split k:
    T(k) = ttft(k) - max(fetch_local(k), recompute(k)) + max(bytes(chunks k..n-1) / R, recompute(k))
the TTFT measured at split k with its local fetch's overlap swapped for the link's (bytes = the
stored entries' real sizes); adaptive = min(min_k T(k), the fallback's measured TTFT);
plain fetch = local TTFT + all bytes / R (fetch first, then fuse). The planner's own choice
(``adaptive.plan`` with the measured rates) is printed beside the table's best k.

    python3 bench_results/session7/gpu/adaptive_h200.py --out $OUT
    python3 bench_results/session7/gpu/adaptive_h200.py --shape tiny --device cpu --splits 0,8,16   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from chunkcache.adaptive import AdaptiveConfig, plan
from chunkcache.bench.texts import passages, questions
from chunkcache.bench.ttft import _full_once, _tokenizer, build_model, speed_engine
from chunkcache.codec import CODECS
from chunkcache.fuse import FuseConfig


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_s(fn, warmup, reps, dev):
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(reps):
        out = None
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


@torch.no_grad()
def loop_front(lm, prefix_kv, ids):
    """The alternative to ``precompute.encode_exact`` (the model's forward): the front's tokens as active
    rows through the fusion's own layer loop (``fuse._layers_body``: Triton selected attention on
    CUDA), timed beside it once."""
    from chunkcache.fuse import _layers_body, _project

    layers, p = lm.spec.num_layers, prefix_kv.shape[3]
    buf = prefix_kv.new_empty(*prefix_kv.shape[:3], p + len(ids), prefix_kv.shape[4])
    buf[:, :, :, :p] = prefix_kv
    active = torch.arange(p, p + len(ids), device=buf.device)
    h = lm.model.model.embed_tokens(torch.tensor(ids, device=buf.device))[None]
    h = _layers_body(lm, buf, 0, layers - 1, None)(h=h, active=active)
    _project(lm, buf, layers - 1, h, active)
    return buf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--passages", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--codecs", default=None, help="default: int8, int2 and int2m where it exists")
    ap.add_argument("--splits", default="0,2,4,6,8,10,12,14,16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    codecs = args.codecs.split(",") if args.codecs else [c for c in ("int8", "int2", "int2m") if c in CODECS]
    splits = [int(x) for x in args.splits.split(",") if int(x) <= args.passages]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        log_lines.append(s)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still writes what finished
    t0 = time.perf_counter()
    lm = build_model(args.shape, torch.bfloat16 if dev.type == "cuda" else torch.float32, args.device)
    tok = _tokenizer()
    texts = passages(tok, args.passages, tokens=args.chunk)
    question = questions()[0]
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    log(
        f"{args.shape} on {name}, torch {torch.__version__}: built in {time.perf_counter() - t0:.1f}s; codecs {codecs}"
    )
    root = tempfile.mkdtemp(prefix="adaptive-")
    cfg = FuseConfig(recompute_ratio=0.15, policy="qfast")
    res: dict = {"shape": args.shape, "device": name, "passages": args.passages, "chunk": args.chunk,
                 "ratio": 0.15, "policy": "qfast", "codecs": {}}  # fmt: skip
    try:
        engines = {}
        for c in codecs:
            t = time.perf_counter()
            eng = speed_engine(lm.model, tok, os.path.join(root, c), c)
            eng.precompute(texts, batch_size=4)
            engines[c] = eng
            log(f"  {c}: precomputed {len(texts)} passages in {time.perf_counter() - t:.1f}s")
        any_eng = engines[codecs[0]]
        n_prompt = int(any_eng.prompt_ids(texts, question).shape[1])
        t_full, _ = median_s(lambda: _full_once(any_eng, texts, question), args.warmup, args.reps, dev)
        chunk_tokens = [len(x) // 8 for x in any_eng.resolve(texts)[1]]
        rate = n_prompt / t_full
        res.update(
            full_s=t_full, prompt_tokens=n_prompt, chunk_tokens=chunk_tokens, recompute_tokens_per_s=rate
        )
        log(f"full prefill {n_prompt} tokens: {t_full * 1e3:.1f} ms ({rate:.0f} tokens/s)")
        fb = speed_engine(lm.model, tok, any_eng.store, codecs[0],
                          adaptive=AdaptiveConfig(link_bytes_per_s=1.0, recompute_tokens_per_s=rate))  # fmt: skip
        t_fb, r = median_s(lambda: fb.fuse(texts, question).logits.cpu(), args.warmup, args.reps, dev)
        r = fb.fuse(texts, question)
        res["fallback_s"] = t_fb
        log(f"fallback (adaptive, full prefill chosen): {t_fb * 1e3:.1f} ms = {t_fb / t_full:.3f}x full; "
            f"plan {r.stats['adaptive']['seconds']['plan'] * 1e3:.2f} ms; {r.stats['adaptive']['choice']}")  # fmt: skip
        del r
        from chunkcache.precompute import encode_exact

        half = [t for x in any_eng.resolve(texts[: args.passages // 2])[1] for t in memoryview(x).cast("q")]
        pkv, pids = any_eng.prefix_kv(), list(any_eng._prefix_ids)
        t_hf, a = median_s(lambda: encode_exact(lm, pids + half)[0], 1, args.reps, dev)
        t_loop, b = median_s(lambda: loop_front(lm, pkv, half), 1, args.reps, dev)
        diff = float((a[:, :, :, len(pids) :].float() - b[:, :, :, len(pids) :].float()).abs().max())
        res["front_half"] = {
            "tokens": len(half),
            "model_forward_s": t_hf,
            "fusion_loop_s": t_loop,
            "max_abs_kv_diff": diff,
        }
        log(f"front of {len(half)} tokens recomputed in place: model forward (encode_exact, with the prefix) {t_hf * 1e3:.1f} ms, "
            f"fusion layer loop {t_loop * 1e3:.1f} ms (max |KV diff| {diff:.3g})")  # fmt: skip
        del a, b
        for c, eng in engines.items():
            keys = eng.resolve(texts)[0]
            entry_bytes = [len(eng.store.get(k)) for k in keys]
            t_loc, r = median_s(
                lambda eng=eng: eng.fuse(texts, question).logits.cpu(), args.warmup, args.reps, dev
            )
            row = {"entry_bytes": entry_bytes, "local_s": t_loc, "splits": []}
            log(f"\n[{c}] entries {sum(entry_bytes) / 1e6:.1f} MB ({entry_bytes[0] / 1e6:.2f} MB/chunk); "
                f"local fused {t_loc * 1e3:.1f} ms = {t_loc / t_full:.3f}x full")  # fmt: skip
            ad = speed_engine(lm.model, tok, eng.store, c, adaptive=AdaptiveConfig(recompute_chunks=0))
            for k in splits:
                ad.adaptive = AdaptiveConfig(recompute_chunks=k)  # one engine: its staging and graphs reused
                stats: list[dict] = []

                def once(ad=ad, stats=stats):
                    r = ad.fuse(texts, question)
                    r.logits.cpu()
                    stats.append(r.stats)
                    return r

                t, r = median_s(once, args.warmup, args.reps, dev)
                sec = {s: statistics.median(st["adaptive"]["seconds"].get(s, 0.0) for st in stats[args.warmup:])
                       for s in ("plan", "fetch", "recompute", "fuse")}  # fmt: skip
                row["splits"].append({"k": k, "ttft_s": t, "stages_s": sec,
                                      "compute_fraction": r.stats["compute_fraction"],
                                      "fast_path": bool(r.stats.get("fast_path"))})  # fmt: skip
                log(f"  split recompute {k:2d} / fetch {args.passages - k:2d}: {t * 1e3:7.1f} ms ({t / t_full:.3f}x) | "
                    + " ".join(f"{s} {v * 1e3:.1f}" for s, v in sec.items())
                    + f" | compute {r.stats['compute_fraction']:.3f}")  # fmt: skip
                del r
            del ad
            res["codecs"][c] = row
            (out_dir / "adaptive_h200.json").write_text(json.dumps(res, indent=1))  # after every codec
            (out_dir / "adaptive_h200_projection.md").write_text(projection(res, list(res["codecs"])) + "\n")
        (out_dir / "adaptive_h200.json").write_text(json.dumps(res, indent=1))
        table = projection(res, codecs)
        log("\n" + table)
        (out_dir / "adaptive_h200_projection.md").write_text(table + "\n")
    finally:
        (out_dir / "adaptive_h200.log").write_text("\n".join(log_lines) + "\n")
        for e in list(locals().get("engines", {}).values()):
            e.store.close()
        shutil.rmtree(root, ignore_errors=True)


def projection(res: dict, codecs: list[str]) -> str:
    """The PROJECTION table from a run's JSON (also: python3 ... adaptive_h200.py --project file.json)."""
    full, n = res["full_s"], res["passages"]
    lines = [
        f"PROJECTION (not measured end to end), {res['shape']} on {res['device']}, {res['prompt_tokens']} prompt "
        f"tokens ({n} chunks), qfast 15%: full prefill {full * 1e3:.1f} ms measured "
        f"({res['recompute_tokens_per_s']:.0f} tokens/s); fallback {res['fallback_s'] * 1e3:.1f} ms measured.",
        "T(k) = ttft(k) - max(fetch_local(k), recompute(k)) + max(bytes of chunks k..n-1 / link, recompute(k)), "
        "all measured at split k; adaptive = min(min_k T(k), the fallback's measured TTFT); plain fetch = local fused TTFT + all bytes / link.",
        "",
        "| link | codec | plain fetch ms | x full | adaptive ms | x full | best split (recompute/fetch) | planner's pick |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for gbit in (1, 10, 25):
        bw = gbit * 1e9 / 8
        best_of = {}
        for c in codecs:
            row = res["codecs"][c]
            by = row["entry_bytes"]
            plain_s = row["local_s"] + sum(by) / bw
            opts = []
            for s in row["splits"]:
                k, st = s["k"], s["stages_s"]
                # the measured TTFT with the local fetch's overlap swapped for the link's
                over = max(st["fetch"], st["recompute"])
                opts.append((s["ttft_s"] - over + max(sum(by[k:]) / bw, st["recompute"]), k))
            best, k = min(opts)
            fallback = res["fallback_s"]  # measured: planning overhead + the full prefill
            pick = "full prefill" if best >= fallback else f"{k}/{n - k}"
            ad = min(best, fallback)
            # the planner with rates from the measured splits (recompute: the largest split < n; fuse: split 0)
            sp = {s["k"]: s for s in row["splits"]}
            kr = max((k for k in sp if 0 < k < n), default=None)
            rec_rate = (
                sum(res["chunk_tokens"][:kr]) / sp[kr]["stages_s"]["recompute"]
                if kr
                else res["recompute_tokens_per_s"]
            )
            fuse_rate = sum(res["chunk_tokens"]) / sp[0]["stages_s"]["fuse"] if 0 in sp else None
            p = plan(res["chunk_tokens"], [{c: b} for b in by], bw, rec_rate, fuse_rate)
            planner = (
                "full prefill"
                if p.full_prefill
                else f"{p.front}/{n - p.front} (est {p.estimate_s * 1e3:.0f} ms)"
            )
            lines.append(f"| {gbit} Gb/s | {c} | {plain_s * 1e3:.0f} | {plain_s / full:.2f} | {ad * 1e3:.0f} | "
                         f"{ad / full:.2f} | {pick} | {planner} |")  # fmt: skip
            best_of[c] = (ad, pick)
        fastest = min(v[0] for v in best_of.values())
        c = next(c for c in codecs if best_of[c][0] <= fastest * 1.1)  # best quality within 10% (the slack)
        ad, pick = best_of[c]
        lines.append(f"| {gbit} Gb/s | all of {'+'.join(codecs)} stored | | | {ad * 1e3:.0f} | {ad / full:.2f} | "
                     f"{pick} at {c} | |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--project":
        r = json.loads(Path(sys.argv[2]).read_text())
        print(projection(r, list(r["codecs"])))
    else:
        main()
