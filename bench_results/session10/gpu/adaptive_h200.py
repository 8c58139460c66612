"""Adaptive loading on the H200, session 10 (issue 16): Llama-3-8B shape (random bf16 weights), 8K
context (16 passages of 512 tokens), qfast 15%. Most important first; the JSON and log are
rewritten after every row, so a cut keeps what finished.

What session 10 changed and this measures (TTFT = texts -> first-token logits on the host, from
a synchronised device; medians of --reps after --warmup; EMULATED links = ``ThrottledStore``, an
in-process throttle over the LMDB store, not a network):
  1. full     the plain prefill (the baseline of every ratio) and the engine's fallback;
  2. front(k) ``encode_exact`` of the prefix and the first k chunks, alone;
  3. per codec and emulated link:
       warmed   a fresh ``AdaptiveConfig()`` engine, ``warmup()`` first (timed: it now covers the
                streamed adaptive path and measures the prefill, front and tail rates), then its
                first --planner-calls calls listed (ms, choice) and --reps timed ones; at int2m
                10 Gb/s it is the process's first adaptive engine, so a one-off it misses shows;
       split k  ``AdaptiveConfig(recompute_chunks=k)`` with the front read layer by layer (the
                probe runs behind it) and, for the A/B, with the whole-front wait of session 9
                (``_front_by_layer = False``), interleaved; stages link / front / tail;
       cold     a fresh engine without warmup (the new bootstrap: prefills, the link probed
                beside a prefill, the tail counted as 0.4 of a prefill until measured);
  4. PROJECTION T(k) = max(bytes of chunks k.. / R, front(k)) + tail(k = 0), from the rates above.

    python3 bench_results/session10/gpu/adaptive_h200.py --out $OUT/adaptive
    python3 bench_results/session10/gpu/adaptive_h200.py --shape tiny --device cpu --passages 4 --splits 0,1,2 \
        --ab 1,2 --splits8 2 --reps 1 --warmup 1 --fronts 1,2 --planner-calls 4 --gbits 10,1    # smoke (CPU)
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
from chunkcache.precompute import encode_exact
from chunkcache.store.throttled import ThrottledStore


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def ttft(fn, dev):
    """Seconds from a synchronised device to ``fn``'s return, and ``fn``'s result."""
    sync(dev)
    t = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    sync(dev)
    return t1 - t, out


def median_s(fn, warmup, reps, dev):
    for _ in range(warmup):
        fn()
    runs = [ttft(fn, dev) for _ in range(reps)]
    return statistics.median(r[0] for r in runs), [r[1] for r in runs]


def wait_probe(eng, timeout=10.0):
    t = time.perf_counter()
    while eng._rates.link_probe == "running" and time.perf_counter() - t < timeout:
        time.sleep(0.005)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--passages", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--codecs", default="int2m,int8")
    ap.add_argument("--gbits", default="10,25,1", help="emulated link rates, Gb/s (int8: the first only)")
    ap.add_argument(
        "--splits", default="0,4,5,6,7", help="int2m splits at the first link (25: 0,3,4,5; 1: n-2)"
    )
    ap.add_argument("--ab", default="5,6,7", help="splits also run with the whole-front wait (A/B)")
    ap.add_argument("--splits8", default="10,11", help="int8 splits (A/B too)")
    ap.add_argument("--deep", default="5,6", help="qdeep splits (int2m, first link; 25 Gb/s: k = 0)")
    ap.add_argument("--fronts", default="3,4,5,6,7,10,11")
    ap.add_argument(
        "--planner-calls", type=int, default=6, help="a fresh planner's calls before the timed ones"
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
        if res["codecs"] and "full_s" in res:
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
    root = tempfile.mkdtemp(prefix="adaptive10-")
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
        n_ctx = sum(chunk_tokens)
        n_q = len(any_eng._suffix_ids(question)) - len(any_eng._suffix_ids(""))
        res.update(prompt_tokens=n_prompt, chunk_tokens=chunk_tokens, question_tokens=n_q)

        # 1. the plain prefill (and the fallback beside it, interleaved)
        rate0 = n_prompt / ttft(lambda: _full_once(any_eng, texts, question), dev)[0]
        fb = speed_engine(lm.model, tok, any_eng.store, codecs[0],
                          adaptive=AdaptiveConfig(link_bytes_per_s=1.0, recompute_tokens_per_s=rate0))  # fmt: skip
        variants = {
            "full": lambda: _full_once(any_eng, texts, question),
            "fallback": lambda: fb.fuse(texts, question),
        }
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
        runs: dict = {k: [] for k in variants}
        for r in range(max(3, args.reps + 2)):
            for name in list(variants)[r % 2 :] + list(variants)[: r % 2]:
                runs[name].append(ttft(variants[name], dev)[0])
        # the baseline of every ratio: the faster of the plain prefill (the model's own forward) and
        # the engine's fallback (its prefill through encode_exact): session 10's first call A
        # measured 271.5 against 255.0 ms
        plain_full = statistics.median(runs["full"])
        full = min(plain_full, statistics.median(runs["fallback"]))
        res.update(
            full_s=full,
            plain_full_s=plain_full,
            fallback_s=statistics.median(runs["fallback"]),
            full_runs_s=runs,
        )
        log(f"baseline (the faster prefill) {full * 1e3:.1f} ms; plain prefill {n_prompt} tokens: {plain_full * 1e3:.1f} ms ({n_prompt / full:.0f} tokens/s); fallback "
            f"{res['fallback_s'] * 1e3:.1f} ms = {res['fallback_s'] / full:.4f}x (interleaved)")  # fmt: skip
        fb = None
        save()

        # 2. the front alone
        pids = list(any_eng._prefix_ids)
        ids = [list(memoryview(x).cast("q")) for x in any_eng.resolve(texts)[1]]
        for k in [int(x) for x in args.fronts.split(",") if 0 < int(x) < n]:
            front = pids + [t for x in ids[:k] for t in x]

            def one(front=front):
                encode_exact(lm, front)
                sync(dev)

            t, _ = median_s(one, 1, args.reps, dev)
            res["fronts_s"][k] = t
            log(f"  front {k:2d} chunks ({len(front)} tokens with the prefix): {t * 1e3:6.1f} ms")
        save()

        def planner_row(eng, c, lk, name, warm):
            """A fresh planner engine: warmup (if ``warm``), its first calls, then timed ones."""
            row: dict = {}
            eng.resolve(texts)  # (the passages' tokens known, as for any passage served before)
            if warm:
                t = time.perf_counter()
                w = eng.warmup((n_ctx, n_ctx), (n_q, n_q), chunk_tokens=args.chunk)
                row["warmup_s"] = time.perf_counter() - t
                row["warmup"] = w
                r = eng._rates
                log(f"    [{name}] warmup {row['warmup_s']:.1f} s: {w.get('fusions')} fusions, "
                    f"{w.get('adaptive_fusions')} adaptive, {w.get('graphs_recorded')} graphs; rates prefill "
                    f"{r.prefill or 0:.4g} front {r.recompute or 0:.4g} tokens/s, queued {(r.front_host or 0) * 1e3:.1f} ms, "
                    f"tail {(n_ctx / r.fuse * 1e3) if r.fuse else 0:.1f} ms")  # fmt: skip
            first = []
            for i in range(args.planner_calls):
                t_host, o = ttft(lambda e=eng: e.fuse(texts, question), dev)
                a = o.stats["adaptive"]
                sts = eng.stagings().stagings()
                g = sts[0].graphs if sts else None
                first.append({"ttft_s": t_host, "choice": a["choice"], "recomputed": a["recomputed"],
                              "reason": a["reason"], "captures": g.captures if g else None,
                              "eager": g.eager if g else None})  # fmt: skip
                del o
                if i == 0:
                    wait_probe(eng)
            t, outs = median_s(lambda e=eng: e.fuse(texts, question), 0, args.reps, dev)
            a = outs[-1].stats["adaptive"]
            row.update(ttft_s=t, choice=a["choice"], recomputed=a["recomputed"], reason=a["reason"],
                       stages_s=a["seconds"], first_calls=first, rates=a["rates"])  # fmt: skip
            lk[name] = row
            worst = max(f["ttft_s"] for f in first)
            log(f"    [{name}] first calls: " + "; ".join(
                f"{f['ttft_s'] * 1e3:.0f} {'P' if f['choice'] != 'fused' else 'k=' + str(f['recomputed'])}"
                + (f" (graphs {f['captures']}/{f['eager']})" if f["captures"] is not None else "")
                for f in first) + f"; worst {worst / full:.3f}x full")  # fmt: skip
            log(
                f"    [{name}] timed: {t * 1e3:7.1f} ms ({t / full:.3f}x), {a['choice']}, recomputed {a['recomputed']}: {a['reason']}"
            )
            save()

        # 3. per codec and emulated link
        for c, eng in engines.items():
            row: dict = {"entry_bytes": [len(eng.store.get(k)) for k in eng.resolve(texts)[0]], "links": {}}
            res["codecs"][c] = row
            slow = ThrottledStore(eng.store, bytes_per_s=1e9)
            ad = speed_engine(
                lm.model, tok, slow, c, adaptive=AdaptiveConfig(recompute_chunks=0), fast_path=True
            )
            for gi, gbit in enumerate(gbits if c == codecs[0] else gbits[:1]):
                slow.bytes_per_s = gbit * 1e9 / 8
                lk: dict = {"splits": [], "whole_splits": [], "deep_splits": []}
                row["links"][str(gbit)] = lk
                log(f"\n[{c}] {gbit:g} Gb/s (emulated), entries {sum(row['entry_bytes']) / 1e6:.1f} MB")
                # the warmed planner first (at the first link: the process's first adaptive engine)
                planner_row(speed_engine(lm.model, tok, slow, c, adaptive=AdaptiveConfig(), fast_path=True),
                            c, lk, "warmed", True)  # fmt: skip
                gc.collect()
                if c != codecs[0]:
                    ks, ab = (
                        [int(x) for x in args.splits8.split(",")],
                        [int(x) for x in args.splits8.split(",")],
                    )
                elif gi == 0:
                    ks, ab = [int(x) for x in args.splits.split(",")], [int(x) for x in args.ab.split(",")]
                elif gbit >= 10:
                    ks, ab = [0, 3, 4, 5], [4]
                else:
                    ks, ab = [n - 2], []
                sweep = [(k, True, "qfast") for k in ks if 0 <= k < n]
                for k in ab:
                    if 0 < k < n:
                        at = (
                            sweep.index((k, True, "qfast")) + 1 if (k, True, "qfast") in sweep else len(sweep)
                        )
                        sweep.insert(at, (k, False, "qfast"))
                if c == codecs[0] and gbit >= 10:
                    deep = [int(x) for x in args.deep.split(",") if x] if gi == 0 else [0]
                    sweep += [(k, True, "qdeep") for k in deep if 0 <= k < n]
                for k, by_layer, policy in sweep:
                    ad.adaptive = AdaptiveConfig(recompute_chunks=k)
                    ad._front_by_layer = by_layer
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
                    entry = {"k": k, "ttft_s": t, "stages_s": sec, "fast_path": bool(o.stats.get("fast_path")),
                             "direct_copies": o.stats.get("direct_copies"), "repaired": o.stats["adaptive"]["repaired"]}  # fmt: skip
                    kind = "deep_splits" if policy == "qdeep" else "splits" if by_layer else "whole_splits"
                    lk[kind].append(entry)
                    alone = res["fronts_s"].get(k)
                    log(f"    {policy:6s} split {k:2d}/{n - k:2d} {('by layer' if o.stats['adaptive'].get('front_by_layer') else 'planned') if by_layer else 'whole   '}: {t * 1e3:7.1f} ms ({t / full:.3f}x) | "
                        f"link {sec['fetch'] * 1e3:.1f} front {sec['recompute'] * 1e3:.1f}"
                        + (f" (alone {alone * 1e3:.1f})" if alone else "")
                        + f" queued in {sec['recompute_host'] * 1e3:.1f} tail {sec['tail'] * 1e3:.1f} | direct {o.stats.get('direct_copies')}"
                        + ("" if o.stats.get("fast_path") else " | NOT STREAMED"))  # fmt: skip
                    del outs, o
                    save()
                if c == codecs[0] and gi == 0:  # the new bootstrap without warmup (kernels compiled by now)
                    planner_row(speed_engine(lm.model, tok, slow, c, adaptive=AdaptiveConfig(), fast_path=True),
                                c, lk, "cold", False)  # fmt: skip
                gc.collect()
            ad = None
            gc.collect()
        log("\n" + projection(res))
    finally:
        save()
        for e in engines.values():
            e.store.close()
        shutil.rmtree(root, ignore_errors=True)


def projection(res: dict) -> str:
    """The PROJECTION table from a run's JSON (also: python3 ... adaptive_h200.py --project file.json)."""
    full, fb, n = res["full_s"], res.get("fallback_s", res["full_s"]), res["passages"]
    fronts = {int(k): v for k, v in res["fronts_s"].items()}
    fronts[0] = 0.0
    out = [
        f"PROJECTION from rates measured on {res['device']} ({res['shape']}, {res['prompt_tokens']} prompt tokens, "
        f"{n} chunks, qfast 15%): full prefill (the faster of the plain one and the fallback) {full * 1e3:.1f} ms, fallback {fb * 1e3:.1f} ms ({fb / full:.4f}x), both measured.",
        "T(k) = max(bytes of chunks k.. / link, front(k) measured alone) + tail; tail = the k = 0 streamed tail at the "
        "link (the probe behind the link; with the front read layer by layer the same tail follows a front-bound split); "
        "adaptive = min(min_k T(k), fallback). EMULATED = measured end to end through the in-process throttled link.",
        "",
        "| link | codec | tail ms | best k | projected ms | x full | emulated best split (by layer) | x full | same k, whole-front wait | best qdeep split | warmed planner ms | x full | its worst first call x full | cold planner worst first call x full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for c, row in res["codecs"].items():
        for g, lk in row["links"].items():
            gbit = float(g)
            bw = gbit * 1e9 / 8
            zero = [s["stages_s"]["tail"] for s in lk["splits"] if s["k"] == 0]
            any_tail = [s["stages_s"]["tail"] for s in lk["splits"]]
            if not any_tail:
                continue
            tail = zero[0] if zero else statistics.median(any_tail)
            by = row["entry_bytes"]
            opts = [(max(sum(by[k:]) / bw, fronts[k]) + tail, k) for k in sorted(fronts) if k < n]
            best, k = min(opts)
            proj = min(best, fb)
            pick = "fallback" if fb <= best else str(k)
            e = min(lk["splits"], key=lambda s: s["ttft_s"])
            w = [x for x in lk["whole_splits"] if x["k"] == e["k"]]
            wtxt = f"{w[0]['ttft_s'] * 1e3:.0f} ({w[0]['ttft_s'] / full:.3f}x)" if w else "-"
            pl = lk.get("warmed")
            ptxt = (
                f"{pl['ttft_s'] * 1e3:.0f} ({pl['choice']}, k={pl['recomputed']}) | {pl['ttft_s'] / full:.3f}"
                if pl
                else " | "
            )
            pw = f"{max(f['ttft_s'] for f in pl['first_calls']) / full:.3f}" if pl else ""
            dp = lk.get("deep_splits") or []
            dtxt = "-"
            if dp:
                d = min(dp, key=lambda s: s["ttft_s"])
                dtxt = f"{d['ttft_s'] * 1e3:.0f} (k={d['k']}, {d['ttft_s'] / full:.3f}x, tail {d['stages_s']['tail'] * 1e3:.1f})"
            cl = lk.get("cold")
            cw = f"{max(f['ttft_s'] for f in cl['first_calls']) / full:.3f}" if cl else ""
            out.append(
                f"| {gbit:g} Gb/s | {c} | {tail * 1e3:.1f} | {pick} | {proj * 1e3:.0f} | {proj / full:.3f} "
                f"| {e['ttft_s'] * 1e3:.0f} (k={e['k']}) | {e['ttft_s'] / full:.3f} | {wtxt} | {dtxt} | {ptxt} | {pw} | {cw} |"
            )
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--project":
        print(projection(json.loads(Path(sys.argv[2]).read_text())))
    else:
        main()
