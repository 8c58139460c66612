"""Adaptive loading with layer-major streaming on the H200, Llama-3-8B shape (random bf16 weights),
8K context (16 passages of 512 tokens), qfast 15% (issue 16, session 8).

MEASURED here (medians of --reps after --warmup; TTFT = texts -> first-token logits on the host):
  full        HF forward over the prompt (logits_to_keep=1): the baseline and the recompute rate;
  fallback    ``engine.fuse`` under a plan that falls back to the full prefill, interleaved with
              ``full`` round by round (its overhead is the ratio of the two);
  front(k)    ``precompute.encode_exact`` of the prefix and the first k chunks (synchronised): the
              in-place recompute of a split;
  local       ``engine.fuse`` with every chunk from the warm local LMDB store (direct copies);
  EMULATED LINK (an in-process throttle, ``store.ThrottledStore`` over the LMDB store: every byte
  read is delivered no faster than R; not a network, no NIC or Redis client on the host) at R =
  10 and 25 Gb/s, per codec:
    plain     ``engine.fuse`` fetching whole entries over the link, then the pipelined fusion;
    split k   ``AdaptiveConfig(recompute_chunks=k)``, qfast (and qshallow, the probe over the first
              half of the layers, for the first codec): the first k chunks recomputed in place while
              the other 16 - k stream in layer by layer (``stream.LayerStream``) into
              ``pipeline.fuse_entries``, which stages each layer as it arrives; stages from its
              stats: link (first read to last layer), recompute (front, device time), tail (from
              the later of the two to the logits on the host);
    planner   ``AdaptiveConfig()`` with its own measured rates (two warm-up calls, then timed): what
              the engine picks and its TTFT.
PROJECTION (from those measured rates, for 1, 10 and 25 Gb/s):
    T(k) = max(bytes of chunks k..15 at the codec / R, front(k)) + tail(codec)
with tail(codec) the median tail of the emulated streamed splits; adaptive = min(min_k T(k),
fallback). Printed beside the emulated end-to-end numbers at 10 and 25 Gb/s.

    python3 bench_results/session8/gpu/adaptive_h200.py --out $OUT/adaptive
    python3 bench_results/session8/gpu/adaptive_h200.py --shape tiny --device cpu --passages 4 --splits 0,2 --reps 1 --warmup 1  # smoke
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

from chunkcache.adaptive import AdaptiveConfig
from chunkcache.bench.texts import passages, questions
from chunkcache.bench.ttft import _full_once, _tokenizer, build_model, speed_engine
from chunkcache.precompute import encode_exact
from chunkcache.store.throttled import ThrottledStore


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return time.perf_counter() - t, out


def median_s(fn, warmup, reps, dev):
    for _ in range(warmup):
        fn()
    runs = [timed(fn, dev) for _ in range(reps)]
    return statistics.median(t for t, _ in runs), [o for _, o in runs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--passages", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--codecs", default="int2m,int8")
    ap.add_argument("--gbits", default="10,25", help="emulated link rates, Gb/s")
    ap.add_argument("--splits", default="0,4,5,6,7,8,10,12")
    ap.add_argument("--fronts", default="4,5,6,7,8,10,12")
    ap.add_argument("--shallow-splits", default="4,5,6,7", help="qshallow splits, first codec only")
    ap.add_argument("--warmup", type=int, default=2)  # (a shape is recorded as a graph on its 2nd call)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    codecs = args.codecs.split(",")
    gbits = [float(x) for x in args.gbits.split(",")]
    n = args.passages
    splits = [int(x) for x in args.splits.split(",") if int(x) < n]
    fronts = [int(x) for x in args.fronts.split(",") if 0 < int(x) <= n]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    res: dict = {"shape": args.shape, "passages": n, "chunk": args.chunk, "ratio": 0.15, "policy": "qfast",
                 "codecs": {}, "fronts_s": {}}  # fmt: skip

    def save() -> None:
        (out_dir / "adaptive_h200.json").write_text(json.dumps(res, indent=1))
        (out_dir / "adaptive_h200.log").write_text("\n".join(lines) + "\n")
        if res["codecs"] and "fallback_s" in res:  # what finished so far (a timeout keeps it)
            (out_dir / "adaptive_h200_projection.md").write_text(projection(res) + "\n")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still writes what finished
    t0 = time.perf_counter()
    lm = build_model(args.shape, torch.bfloat16 if dev.type == "cuda" else torch.float32, args.device)
    tok = _tokenizer()
    texts = passages(tok, n, tokens=args.chunk)
    question = questions()[0]
    res["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    log(
        f"{args.shape} on {res['device']}, torch {torch.__version__}: built in {time.perf_counter() - t0:.1f}s"
    )
    root = tempfile.mkdtemp(prefix="adaptive8-")
    engines = {}
    try:
        for c in codecs:
            t = time.perf_counter()
            eng = speed_engine(lm.model, tok, os.path.join(root, c), c)
            eng.precompute(texts, batch_size=4)
            engines[c] = eng
            log(f"  {c}: precomputed {n} passages in {time.perf_counter() - t:.1f}s")
        any_eng = engines[codecs[0]]
        n_prompt = int(any_eng.prompt_ids(texts, question).shape[1])
        chunk_tokens = [len(x) // 8 for x in any_eng.resolve(texts)[1]]
        # full prefill and the fallback, interleaved round by round
        rate0 = n_prompt / timed(lambda: _full_once(any_eng, texts, question), dev)[0]
        fb = speed_engine(lm.model, tok, any_eng.store, codecs[0],
                          adaptive=AdaptiveConfig(link_bytes_per_s=1.0, recompute_tokens_per_s=rate0))  # fmt: skip
        for _ in range(args.warmup + 1):
            _full_once(any_eng, texts, question)
            fb.fuse(texts, question).logits.cpu()
        t_full, t_fb = [], []
        for r in range(max(args.reps, 5)):
            pair = [("full", lambda: _full_once(any_eng, texts, question)),
                    ("fb", lambda fb=fb: fb.fuse(texts, question).logits.cpu())]  # fmt: skip
            for name, fn in pair if r % 2 == 0 else pair[::-1]:
                (t_full if name == "full" else t_fb).append(timed(fn, dev)[0])
        full, fallback = statistics.median(t_full), statistics.median(t_fb)
        r = fb.fuse(texts, question)
        res.update(full_s=full, fallback_s=fallback, prompt_tokens=n_prompt, chunk_tokens=chunk_tokens,
                   recompute_tokens_per_s=n_prompt / full, fallback_plan_s=r.stats["adaptive"]["seconds"]["plan"],
                   full_runs_s=t_full, fallback_runs_s=t_fb)  # fmt: skip
        log(f"full prefill {n_prompt} tokens: {full * 1e3:.1f} ms ({n_prompt / full:.0f} tokens/s); fallback "
            f"{fallback * 1e3:.1f} ms = {fallback / full:.4f}x full (interleaved, {len(t_full)} rounds; plan "
            f"{res['fallback_plan_s'] * 1e6:.0f} us; {r.stats['adaptive']['choice']})")  # fmt: skip
        del r
        save()
        pids = list(any_eng._prefix_ids)
        ids = [list(memoryview(x).cast("q")) for x in any_eng.resolve(texts)[1]]
        for k in fronts:
            front = pids + [t for x in ids[:k] for t in x]
            t, _ = median_s(lambda front=front: encode_exact(lm, front)[0], 1, args.reps, dev)
            res["fronts_s"][k] = t
            log(f"  front {k:2d} chunks ({len(front)} tokens with the prefix): {t * 1e3:6.1f} ms")
        save()
        for c, eng in engines.items():
            row: dict = {"entry_bytes": [len(eng.store.get(k)) for k in eng.resolve(texts)[0]], "links": {}}
            res["codecs"][c] = row
            t_loc, outs = median_s(lambda eng=eng: eng.fuse(texts, question), args.warmup, args.reps, dev)
            row["local_s"] = t_loc
            ref = outs[-1].logits.float().cpu()
            log(f"\n[{c}] entries {sum(row['entry_bytes']) / 1e6:.1f} MB; local fused {t_loc * 1e3:.1f} ms = "
                f"{t_loc / full:.3f}x full")  # fmt: skip
            slow = ThrottledStore(eng.store, bytes_per_s=1e9)
            fast = dict(fast_path=True)  # (the default on CUDA; on a CPU smoke run too)
            plain = speed_engine(lm.model, tok, slow, c, **fast)
            ad = speed_engine(lm.model, tok, slow, c, adaptive=AdaptiveConfig(recompute_chunks=0), **fast)
            planner = speed_engine(lm.model, tok, slow, c, adaptive=AdaptiveConfig(), **fast)
            for gbit in gbits:
                slow.bytes_per_s = gbit * 1e9 / 8
                lk: dict = {"splits": [], "shallow_splits": []}
                row["links"][str(gbit)] = lk
                t_pl, _ = median_s(
                    lambda p=plain: p.fuse(texts, question).logits.cpu(), args.warmup, args.reps, dev
                )
                lk["plain_s"] = t_pl
                log(f"  {gbit:g} Gb/s (emulated): plain fetch {t_pl * 1e3:7.1f} ms ({t_pl / full:.3f}x)")
                sweep = [(k, "qfast") for k in splits]
                if c == codecs[0]:
                    sweep += [
                        (int(x), "qshallow") for x in args.shallow_splits.split(",") if x and int(x) < n
                    ]
                for k, policy in sweep:
                    ad.adaptive = AdaptiveConfig(recompute_chunks=k)
                    t, outs = median_s(
                        lambda ad=ad, policy=policy: ad.fuse(texts, question, policy=policy),
                        args.warmup,
                        args.reps,
                        dev,
                    )
                    st = [o.stats["adaptive"]["seconds"] for o in outs]
                    sec = {
                        s: statistics.median(x[s] for x in st) for s in ("plan", "fetch", "recompute", "tail")
                    }
                    o = outs[-1]
                    diff = float((o.logits.float().cpu() - ref).abs().max()) if k == 0 else None
                    lk["splits" if policy == "qfast" else "shallow_splits"].append({"k": k, "ttft_s": t, "stages_s": sec, "fast_path": bool(o.stats.get("fast_path")),
                                         "repaired": o.stats["adaptive"]["repaired"],
                                         "compute_fraction": o.stats["compute_fraction"],
                                         "fusion_stages_s": {s: v for s, v in o.stats["seconds"].items()},
                                         "max_abs_logit_diff_vs_local": diff})  # fmt: skip
                    log(f"    {policy:8s} split {k:2d}/{n - k:2d}: {t * 1e3:7.1f} ms ({t / full:.3f}x) | link {sec['fetch'] * 1e3:.1f} "
                        f"front {sec['recompute'] * 1e3:.1f} tail {sec['tail'] * 1e3:.1f} plan {sec['plan'] * 1e6:.0f}us"
                        + (f" | max |logit - local| {diff:.3g}" if diff is not None else "")
                        + ("" if o.stats.get("fast_path") else " | NOT STREAMED"))  # fmt: skip
                    del outs, o
                planner._rates.forget_link()
                for _ in range(3):  # warm-up (dropped), then readings
                    planner.fuse(texts, question)
                t, outs = median_s(lambda p=planner: p.fuse(texts, question), 0, args.reps, dev)
                a = outs[-1].stats["adaptive"]
                lk["planner"] = {"ttft_s": t, "choice": a["choice"], "recomputed": a["recomputed"],
                                 "fetched": a["fetched"], "reason": a["reason"], "stages_s": a["seconds"]}  # fmt: skip
                log(
                    f"    planner: {t * 1e3:7.1f} ms ({t / full:.3f}x), {a['choice']}, recomputed {a['recomputed']}: {a['reason']}"
                )
                del outs
                save()
            plain = ad = planner = None  # their stagings and graphs' buffers go
        table = projection(res)
        log("\n" + table)
        (out_dir / "adaptive_h200_projection.md").write_text(table + "\n")
    finally:
        save()
        for e in engines.values():
            e.store.close()
        shutil.rmtree(root, ignore_errors=True)


def projection(res: dict) -> str:
    """The PROJECTION table from a run's JSON (also: python3 ... adaptive_h200.py --project file.json)."""
    full, fb, n = res["full_s"], res["fallback_s"], res["passages"]
    fronts = {int(k): v for k, v in res["fronts_s"].items()}
    fronts[0] = 0.0
    out = [
        f"PROJECTION from rates measured on {res['device']} ({res['shape']}, {res['prompt_tokens']} prompt tokens, "
        f"{n} chunks, qfast 15%): full prefill {full * 1e3:.1f} ms, fallback {fb * 1e3:.1f} ms ({fb / full:.4f}x), both measured.",
        "T(k) = max(bytes of chunks k.. / link, front(k) measured) + tail (median of the measured streamed tails); "
        "adaptive = min(min_k T(k), fallback). EMULATED = measured end to end through the in-process throttled link.",
        "",
        "| link | codec | tail ms | best k | projected ms | x full | emulated best split ms | x full | planner (emulated) ms | x full | plain fetch (emulated) ms | x full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    shallow: list[str] = []
    for gbit in (1.0, 10.0, 25.0):
        bw = gbit * 1e9 / 8
        for c, row in res["codecs"].items():
            tails = [s["stages_s"]["tail"] for lk in row["links"].values() for s in lk["splits"]]
            if not tails:
                continue
            tail = statistics.median(tails)
            by = row["entry_bytes"]
            opts = [(max(sum(by[k:]) / bw, fronts[k]) + tail, k) for k in sorted(fronts) if k < n]
            best, k = min(opts)
            proj = min(best, fb)
            pick = "fallback" if fb <= best else str(k)
            lk = row["links"].get(str(gbit))
            emu = pl = plain = ""
            if lk is not None and lk["splits"]:
                e = min(lk["splits"], key=lambda s: s["ttft_s"])
                emu = f"{e['ttft_s'] * 1e3:.0f} (k={e['k']}) | {e['ttft_s'] / full:.2f}"
                p = lk.get("planner")
                pl = (
                    f"{p['ttft_s'] * 1e3:.0f} ({p['choice']}, k={p['recomputed']}) | {p['ttft_s'] / full:.2f}"
                    if p
                    else " | "
                )
                plain = f"{lk['plain_s'] * 1e3:.0f} | {lk['plain_s'] / full:.2f}"
            else:
                emu = pl = plain = " | "
            out.append(
                f"| {gbit:g} Gb/s | {c} | {tail * 1e3:.1f} | {pick} | {proj * 1e3:.0f} | {proj / full:.2f} | {emu} | {pl} | {plain} |"
            )
            if lk is not None and lk.get("shallow_splits"):
                e = min(lk["shallow_splits"], key=lambda s: s["ttft_s"])
                shallow.append(f"| {gbit:g} Gb/s | {c} | {e['ttft_s'] * 1e3:.0f} (k={e['k']}) | {e['ttft_s'] / full:.2f} | "
                               f"{e['stages_s']['tail'] * 1e3:.1f} |")  # fmt: skip
    if shallow:
        out += ["", "qshallow (probe over the first half of the layers: the recompute runs behind the link), EMULATED:", "",
                "| link | codec | best split ms | x full | its tail ms |", "|---|---|---|---|---|", *shallow]  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--project":
        print(projection(json.loads(Path(sys.argv[2]).read_text())))
    else:
        main()
