"""Adaptive loading on the H200, Llama-3-8B shape (random bf16 weights), 8K context (16 passages
of 512 tokens), qfast 15% (issue 16, session 9). Most important first; the JSON and log are
rewritten after every row, so a cut keeps what finished.

MEASURED (TTFT = texts -> first-token logits on the host, timed from a synchronised device to the
call's return; medians of --reps after --warmup):
  1. fallback   the full-prefill fallback against the plain prefill, interleaved round by round,
                with two pieces of it alone (``encode_exact(host_logits=True)`` on prepared ids,
                and the model's forward with an explicit ``DynamicCache()``) and the engine's own
                stage times, to find where a fallback spends more than a prefill;
  2. front(k)   ``encode_exact`` of the prefix and the first k chunks, alone;
  3. per codec (int2m, then int8) over an EMULATED link (``store.ThrottledStore`` over the LMDB
     store: an in-process throttle, not a network) at 10, 25 and 1 Gb/s:
       plain    whole entries fetched, then the pipelined fusion;
       split k  ``AdaptiveConfig(recompute_chunks=k)``: the front (its own stream) while the back
                streams into the staging's pinned landing arena; stages link / front (device, and
                the host's time to queue it) / tail, and whether the copies were direct;
       planner  a fresh ``AdaptiveConfig()`` engine per link: its first calls (prefill rate, link
                probe, ...) listed with their choices, then --reps timed calls;
  4. PROJECTION T(k) = max(bytes of chunks k.. / R, front(k)) + tail, from the rates above.

    python3 bench_results/session9/gpu/adaptive_h200.py --out $OUT/adaptive
    python3 bench_results/session9/gpu/adaptive_h200.py --shape tiny --device cpu --passages 4 --splits 0,2 \
        --splits8 2 --reps 1 --warmup 1 --rounds 2 --fronts 1,2 --planner-calls 5   # smoke (CPU)
"""

from __future__ import annotations

import argparse
import gc
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
from chunkcache.pipeline import Staging
from chunkcache.precompute import encode_exact
from chunkcache.store.throttled import ThrottledStore
from chunkcache.stream import LayerStream


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def ttft(fn, dev):
    """Seconds from a synchronised device to ``fn``'s return (its logits are on the host then),
    and the seconds until the device is idle again; ``fn``'s result."""
    sync(dev)
    t = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    sync(dev)
    return t1 - t, time.perf_counter() - t, out


def median_s(fn, warmup, reps, dev, synced=False):
    """Median seconds to ``fn``'s return (``synced``: until the device is idle, for work whose
    result stays on the device) and ``fn``'s results."""
    for _ in range(warmup):
        fn()
    runs = [ttft(fn, dev) for _ in range(reps)]
    return statistics.median(r[1 if synced else 0] for r in runs), [r[2] for r in runs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--passages", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--codecs", default="int2m,int8")
    ap.add_argument(
        "--gbits", default="10,1,25", help="emulated link rates, Gb/s (first: the target; int8: first only)"
    )
    ap.add_argument(
        "--splits", default="0,4,5,6,7", help="int2m splits at 10 Gb/s (25: the first four, 1: 13,14)"
    )
    ap.add_argument("--splits8", default="8,10,12", help="int8 splits")
    ap.add_argument("--shallow", default="5,6", help="qshallow splits, int2m at 10 Gb/s only")
    ap.add_argument("--fronts", default="4,5,6,7,10,12")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the fallback comparison")
    ap.add_argument("--pairs", type=int, default=16, help="alternating prefill / fallback pairs")
    ap.add_argument(
        "--planner-calls", type=int, default=9, help="a fresh planner's calls before the timed ones"
    )
    ap.add_argument("--warmup", type=int, default=2)  # (a shape is recorded as a graph on its 2nd call)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    codecs = args.codecs.split(",")
    gbits = [float(x) for x in args.gbits.split(",")]
    n = args.passages
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    res: dict = {"shape": args.shape, "passages": n, "chunk": args.chunk, "ratio": 0.15, "policy": "qfast",
                 "codecs": {}, "fronts_s": {}}  # fmt: skip

    def save() -> None:
        (out_dir / "adaptive_h200.json").write_text(json.dumps(res, indent=1, default=str))
        (out_dir / "adaptive_h200.log").write_text("\n".join(lines) + "\n")
        if res["codecs"] and "fallback_s" in res:
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
    root = tempfile.mkdtemp(prefix="adaptive9-")
    engines = {}
    try:
        for c in codecs:
            t = time.perf_counter()
            eng = speed_engine(lm.model, tok, os.path.join(root, c), c)
            eng.precompute(texts, batch_size=4)
            engines[c] = eng
            log(f"  {c}: precomputed {n} passages in {time.perf_counter() - t:.1f}s")
        any_eng = engines[codecs[0]]
        prompt = any_eng.prompt_ids(texts, question)
        n_prompt = int(prompt.shape[1])
        chunk_tokens = [len(x) // 8 for x in any_eng.resolve(texts)[1]]
        res.update(prompt_tokens=n_prompt, chunk_tokens=chunk_tokens)

        # 1. the fallback against the plain prefill, and pieces of it, interleaved
        rate0 = n_prompt / ttft(lambda: _full_once(any_eng, texts, question), dev)[0]
        fb = speed_engine(lm.model, tok, any_eng.store, codecs[0],
                          adaptive=AdaptiveConfig(link_bytes_per_s=1.0, recompute_tokens_per_s=rate0))  # fmt: skip
        from transformers import DynamicCache

        from chunkcache.model import cache_kwarg

        cache_arg = cache_kwarg(lm.model)

        def fwd_dc():
            with torch.no_grad():
                x = prompt.to(lm.device)
                return lm.model(input_ids=x, use_cache=True, logits_to_keep=1, **{cache_arg: DynamicCache()}).logits[0, -1].float().cpu()  # fmt: skip

        variants = {
            "full": lambda: _full_once(any_eng, texts, question),
            "fallback": lambda: fb.fuse(texts, question),
            "encode_exact": lambda: encode_exact(lm, prompt[0], host_logits=True),
            "forward_dynamiccache": fwd_dc,
        }
        for _ in range(args.warmup + 1):
            for fn in variants.values():
                fn()
        runs: dict = {k: [] for k in variants}
        fb_stats = []
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated order
                t_host, t_idle, o = ttft(variants[name], dev)
                runs[name].append((t_host, t_idle))
                if name == "fallback":
                    fb_stats.append({**o.stats["adaptive"]["seconds"], "total": o.stats["seconds"]["total"]})
                del o
        med = {
            k: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v))
            for k, v in runs.items()
        }
        full, fallback = med["full"][0], med["fallback"][0]
        fbs = {k: statistics.median(s[k] for s in fb_stats) for k in fb_stats[0]}
        res.update(full_s=full, fallback_s=fallback, fallback_idle_s=med["fallback"][1], variants_s=med,
                   variant_runs_s=runs, fallback_stages_s=fbs, recompute_tokens_per_s=n_prompt / full)  # fmt: skip
        log(f"full prefill {n_prompt} tokens: {full * 1e3:.1f} ms ({n_prompt / full:.0f} tokens/s); fallback "
            f"{fallback * 1e3:.1f} ms = {fallback / full:.4f}x (device idle after {med['fallback'][1] * 1e3:.1f} ms; "
            f"interleaved, {args.rounds} rounds)")  # fmt: skip
        for k in ("encode_exact", "forward_dynamiccache"):
            log(
                f"  {k:22s} {med[k][0] * 1e3:7.1f} ms = {med[k][0] / full:.4f}x full (idle after {med[k][1] * 1e3:.1f} ms)"
            )
        log(
            "  fallback's own stages (medians): " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in fbs.items())
        )
        # paired: the H200's run-to-run spread (255-273 ms for every variant in window 1) hides a
        # 1% difference in medians; each fallback against the mean of the prefills just before and
        # after it (the order alternates), --pairs of them
        seq = []
        for r in range(args.pairs):
            for name in ("full", "fallback") if r % 2 == 0 else ("fallback", "full"):
                seq.append((name, ttft(variants[name], dev)[0]))
        ratios = []
        for i, (name, t) in enumerate(seq):
            near = [seq[j][1] for j in (i - 1, i + 1) if 0 <= j < len(seq) and seq[j][0] == "full"]
            if name == "fallback" and near:
                ratios.append(t / statistics.fmean(near))
        ratios.sort()
        q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]  # noqa: E731
        res["paired"] = {"sequence_s": seq, "ratios": ratios}
        res["fallback_paired_ratio"] = statistics.median(ratios)
        log(f"  paired ({len(ratios)} fallbacks, each against its neighbouring prefills): median "
            f"{statistics.median(ratios):.4f}x, quartiles {q(0.25):.4f} / {q(0.75):.4f}, "
            f"{sum(r <= 1.0 for r in ratios)} of {len(ratios)} at or below 1.0")  # fmt: skip

        # back to back (session 8: a fallback right after a fallback took 271-275 ms, after a
        # prefill 254-261, the prefills 250-257): the second of two of a kind, and what the CUDA
        # allocator did meanwhile (device mallocs, retries after freeing its cache)
        def mem():
            if dev.type != "cuda":
                return (0, 0)
            m = torch.cuda.memory_stats()
            return (m.get("segment.all.allocated", 0), m.get("num_alloc_retries", 0))

        pairs: dict = {"full": [], "fallback": []}
        for _ in range(2):
            for name in ("full", "fallback"):
                for j in range(2):
                    m0 = mem()
                    t_host, _, o = ttft(variants[name], dev)
                    m1 = mem()
                    pairs[name].append(
                        {
                            "second": j == 1,
                            "ttft_s": t_host,
                            "mallocs": m1[0] - m0[0],
                            "retries": m1[1] - m0[1],
                        }
                    )
                    del o
        res["back_to_back"] = pairs
        for name, v in pairs.items():
            a = [x["ttft_s"] for x in v if not x["second"]]
            b = [x["ttft_s"] for x in v if x["second"]]
            log(f"  {name:8s} back to back: first {statistics.median(a) * 1e3:.1f} ms, second {statistics.median(b) * 1e3:.1f} ms "
                f"(each: {' '.join(f'{x * 1e3:.0f}' for x in b)}); device mallocs {sum(x['mallocs'] for x in v)}, "
                f"alloc retries {sum(x['retries'] for x in v)}")  # fmt: skip
        fb = None  # (its staging goes)
        save()

        # 2. the front alone
        pids = list(any_eng._prefix_ids)
        ids = [list(memoryview(x).cast("q")) for x in any_eng.resolve(texts)[1]]
        for k in [int(x) for x in args.fronts.split(",") if 0 < int(x) < n]:
            front = pids + [t for x in ids[:k] for t in x]
            t, _ = median_s(lambda front=front: encode_exact(lm, front)[0], 1, args.reps, dev, synced=True)
            res["fronts_s"][k] = t
            log(f"  front {k:2d} chunks ({len(front)} tokens with the prefix): {t * 1e3:6.1f} ms")
        save()

        # 3. per codec and emulated link
        for c, eng in engines.items():
            row: dict = {"entry_bytes": [len(eng.store.get(k)) for k in eng.resolve(texts)[0]], "links": {}}
            res["codecs"][c] = row
            t_loc, outs = median_s(lambda eng=eng: eng.fuse(texts, question), args.warmup, args.reps, dev)
            row["local_s"] = t_loc
            row["local_stages_s"] = loc = outs[-1].stats["seconds"]
            ref = outs[-1].logits.float().cpu()  # (a streamed k = 0 split must give these logits)
            log(f"\n[{c}] entries {sum(row['entry_bytes']) / 1e6:.1f} MB; local fused {t_loc * 1e3:.1f} ms = "
                f"{t_loc / full:.3f}x full; direct {outs[-1].stats.get('direct_copies')}, stages "
                + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in loc.items()))  # fmt: skip
            outs = None
            slow = ThrottledStore(eng.store, bytes_per_s=1e9)
            # the reader alone (no fusion beside it): into a staging's pinned arena, best of 3
            keys = eng.resolve(texts)[0]
            st = Staging(dev)
            row["reader_s"] = {}
            for gbit in [g for g in gbits if g >= 10] + [1e4] if c == codecs[0] else gbits[:1]:
                slow.bytes_per_s = gbit * 1e9 / 8
                ts = []
                for _ in range(4):
                    s_ = LayerStream(slow, keys, landing=st.landing).start()
                    s_.wait(lm.spec.num_layers - 1)
                    s_.close()
                    ts.append(s_.t_last - s_.t_start)
                row["reader_s"][str(gbit)] = t_r = min(ts[1:])
                link = sum(row["entry_bytes"]) / slow.bytes_per_s
                log(f"  reader alone at {gbit:g} Gb/s: {t_r * 1e3:.1f} ms for {sum(row['entry_bytes']) / 1e6:.1f} MB "
                    f"({sum(row['entry_bytes']) / t_r / 1e9:.2f} GB/s; the link alone {link * 1e3:.1f} ms)")  # fmt: skip
            st = None
            plain = speed_engine(lm.model, tok, slow, c, fast_path=True)
            ad = speed_engine(
                lm.model, tok, slow, c, adaptive=AdaptiveConfig(recompute_chunks=0), fast_path=True
            )
            for gbit in gbits if c == codecs[0] else gbits[:1]:
                slow.bytes_per_s = gbit * 1e9 / 8
                lk: dict = {"splits": []}
                row["links"][str(gbit)] = lk
                if gbit >= 10:
                    t_pl, _ = median_s(
                        lambda p=plain: p.fuse(texts, question).logits.cpu(), 1, args.reps, dev
                    )
                    lk["plain_s"] = t_pl
                    log(f"  {gbit:g} Gb/s (emulated): plain fetch {t_pl * 1e3:7.1f} ms ({t_pl / full:.3f}x)")
                else:
                    log(f"  {gbit:g} Gb/s (emulated):")
                if c != codecs[0]:
                    ks = [int(x) for x in args.splits8.split(",")]
                elif gbit >= 25:
                    ks = [int(x) for x in args.splits.split(",")][:4]
                elif gbit >= 10:
                    ks = [int(x) for x in args.splits.split(",")]
                else:
                    ks = [n - 3, n - 2]
                sweep = [(k, "qfast") for k in ks if 0 <= k < n]
                if c == codecs[0] and gbit == gbits[0]:
                    sweep += [(int(x), "qshallow") for x in args.shallow.split(",") if x and 0 <= int(x) < n]
                for k, policy in sweep:
                    ad.adaptive = AdaptiveConfig(recompute_chunks=k)
                    t, outs = median_s(
                        lambda ad=ad, policy=policy: ad.fuse(texts, question, policy=policy),
                        args.warmup,
                        args.reps,
                        dev,
                    )
                    st = [o.stats["adaptive"]["seconds"] for o in outs]
                    sec = {s: statistics.median(x.get(s, 0.0) for x in st)
                           for s in ("plan", "fetch", "recompute", "recompute_host", "tail")}  # fmt: skip
                    o = outs[-1]
                    fs = {s: v for s, v in o.stats["seconds"].items()}
                    lk.setdefault("splits" if policy == "qfast" else "shallow_splits", []).append({"k": k, "ttft_s": t, "stages_s": sec, "fast_path": bool(o.stats.get("fast_path")),
                                         "direct_copies": o.stats.get("direct_copies"), "repaired": o.stats["adaptive"]["repaired"],
                                         "fusion_stages_s": fs})  # fmt: skip
                    if k == 0 and policy == "qfast":
                        diff = float((o.logits.float().cpu() - ref).abs().max())
                        lk["k0_max_abs_logit_diff_vs_local"] = diff
                        log(f"    (k = 0 streamed against local: max |logit difference| {diff:.3g})")
                    alone = res["fronts_s"].get(k)
                    log(f"    {policy:8s} split {k:2d}/{n - k:2d}: {t * 1e3:7.1f} ms ({t / full:.3f}x) | link {sec['fetch'] * 1e3:.1f} "
                        f"front {sec['recompute'] * 1e3:.1f}" + (f" (alone {alone * 1e3:.1f})" if alone else "")
                        + f" queued in {sec['recompute_host'] * 1e3:.1f} tail {sec['tail'] * 1e3:.1f} | direct "
                        f"{o.stats.get('direct_copies')} h2d {fs.get('h2d', 0) * 1e3:.1f} stage_host {fs.get('stage_host', 0) * 1e3:.1f}"
                        + ("" if o.stats.get("fast_path") else " | NOT STREAMED"))  # fmt: skip
                    del outs, o
                    save()
                # a fresh planner on this link: its first calls, then timed ones
                planner = speed_engine(lm.model, tok, slow, c, adaptive=AdaptiveConfig(), fast_path=True)
                first = []
                for _ in range(args.planner_calls):
                    t_host, _, o = ttft(lambda p=planner: p.fuse(texts, question), dev)
                    a = o.stats["adaptive"]
                    first.append(
                        {
                            "ttft_s": t_host,
                            "choice": a["choice"],
                            "recomputed": a["recomputed"],
                            "reason": a["reason"],
                        }
                    )
                    del o
                t, outs = median_s(lambda p=planner: p.fuse(texts, question), 0, args.reps, dev)
                a = outs[-1].stats["adaptive"]
                lk["planner"] = {"ttft_s": t, "runs": [], "choice": a["choice"], "recomputed": a["recomputed"],
                                 "reason": a["reason"], "stages_s": a["seconds"], "first_calls": first,
                                 "rates": a["rates"]}  # fmt: skip
                log("    planner first calls: " + "; ".join(
                    f"{f['ttft_s'] * 1e3:.0f} ms {'prefill' if f['choice'] != 'fused' else 'k=' + str(f['recomputed'])}"
                    for f in first))  # fmt: skip
                log(
                    f"    planner: {t * 1e3:7.1f} ms ({t / full:.3f}x), {a['choice']}, recomputed {a['recomputed']}: {a['reason']}"
                )
                outs = planner = None
                gc.collect()
                save()
            plain = ad = None  # their stagings and graphs' buffers go
            gc.collect()
        table = projection(res)
        log("\n" + table)
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
        "T(k) = max(bytes of chunks k.. / link, front(k) measured alone) + tail; tail = the k = 0 streamed tail at 10 Gb/s "
        "(and, in brackets, the median over every streamed split); adaptive = min(min_k T(k), fallback). EMULATED = measured "
        "end to end through the in-process throttled link.",
        "",
        "| link | codec | tail ms | best k | projected ms | x full | emulated best split ms | x full | planner (emulated) ms | x full | plain fetch (emulated) ms | x full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for gbit in (1.0, 10.0, 25.0):
        bw = gbit * 1e9 / 8
        for c, row in res["codecs"].items():
            splits = [s for lk in row["links"].values() for s in lk["splits"]]
            if not splits:
                continue
            zero = [
                s["stages_s"]["tail"] for s in row["links"].get("10.0", {}).get("splits", []) if s["k"] == 0
            ]
            med = statistics.median(s["stages_s"]["tail"] for s in splits)
            tail = zero[0] if zero else med
            by = row["entry_bytes"]
            opts = [(max(sum(by[k:]) / bw, fronts[k]) + tail, k) for k in sorted(fronts) if k < n]
            best, k = min(opts)
            proj = min(best, fb)
            pick = "fallback" if fb <= best else str(k)
            lk = row["links"].get(str(gbit))
            emu = pl = plain = " | "
            if lk is not None and lk["splits"]:
                e = min(lk["splits"], key=lambda s: s["ttft_s"])
                emu = f"{e['ttft_s'] * 1e3:.0f} (k={e['k']}) | {e['ttft_s'] / full:.2f}"
            if lk is not None and lk.get("planner"):
                p = lk["planner"]
                pl = (
                    f"{p['ttft_s'] * 1e3:.0f} ({p['choice']}, k={p['recomputed']}) | {p['ttft_s'] / full:.2f}"
                )
            if lk is not None and "plain_s" in lk:
                plain = f"{lk['plain_s'] * 1e3:.0f} | {lk['plain_s'] / full:.2f}"
            out.append(
                f"| {gbit:g} Gb/s | {c} | {tail * 1e3:.1f} ({med * 1e3:.1f}) | {pick} | {proj * 1e3:.0f} | {proj / full:.2f} "
                f"| {emu} | {pl} | {plain} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--project":
        print(projection(json.loads(Path(sys.argv[2]).read_text())))
    else:
        main()
