"""Markdown tables from an ``adaptive_h200.py`` run's JSON (for the notes): the fallback (paired
where measured), the splits per link and codec, the planner's first and timed calls, and the
PROJECTION with the fronts as measured inside the fusion (device spans).

    python3 bench_results/session9/adaptive/summarize.py bench_results/session9/h200_callB1/adaptive/adaptive_h200.json
"""

import json
import statistics
import sys

r = json.load(open(sys.argv[1]))
full, fb = r["full_s"], r["fallback_s"]
print(f"full prefill {full * 1e3:.1f} ms; fallback {fb * 1e3:.1f} ms = {fb / full:.4f}x (medians)")
if "fallback_paired_ratio" in r:
    rs = r["paired"]["ratios"]
    print(f"paired: median {statistics.median(rs):.4f}x over {len(rs)}, {sum(x <= 1 for x in rs)} at or below 1.0; "
          f"range {min(rs):.4f}-{max(rs):.4f}")  # fmt: skip
for k, (a, _) in r.get("variants_s", {}).items():
    print(f"  {k}: {a * 1e3:.1f} ms ({a / full:.4f}x)")
print()
print("| link | codec | plain fetch | best qfast split | link / front / tail ms | qshallow best |")
print("|---|---|---|---|---|---|")
fronts = {0: 0.0}
for c, row in r["codecs"].items():
    for g, lk in row["links"].items():
        for s in lk["splits"] + lk.get("shallow_splits", []):
            if s["k"]:
                fronts[s["k"]] = min(fronts.get(s["k"], 9e9), s["stages_s"]["recompute"])
        if not lk["splits"]:
            continue
        b = min(lk["splits"], key=lambda s: s["ttft_s"])
        st = b["stages_s"]
        sh = lk.get("shallow_splits") or []
        shs = ""
        if sh:
            q = min(sh, key=lambda s: s["ttft_s"])
            shs = f"{q['ttft_s'] * 1e3:.1f} ms ({q['ttft_s'] / full:.3f}x), k = {q['k']}, tail {q['stages_s']['tail'] * 1e3:.1f}"
        pl = f"{lk['plain_s'] * 1e3:.1f} ms ({lk['plain_s'] / full:.2f}x)" if "plain_s" in lk else ""
        print(f"| {float(g):g} Gb/s | {c} | {pl} | {b['ttft_s'] * 1e3:.1f} ms ({b['ttft_s'] / full:.3f}x), k = {b['k']} | "
              f"{st['fetch'] * 1e3:.1f} / {st['recompute'] * 1e3:.1f} / {st['tail'] * 1e3:.1f} | {shs} |")  # fmt: skip
print()
print("| link | codec | first calls (ms, P = prefill) | timed | x full |")
print("|---|---|---|---|---|")
for c, row in r["codecs"].items():
    for g, lk in row["links"].items():
        p = lk.get("planner")
        if not p:
            continue
        first = ", ".join(f"{f['ttft_s'] * 1e3:.0f} {'P' if f['choice'] != 'fused' else 'k=' + str(f['recomputed'])}"
                          for f in p["first_calls"])  # fmt: skip
        what = "full prefill" if p["choice"] != "fused" else f"fused k={p['recomputed']}"
        print(f"| {float(g):g} Gb/s | {c} | {first} | {what}, {p['ttft_s'] * 1e3:.1f} ms | {p['ttft_s'] / full:.3f} |")
print()
print("fronts inside the fusion (device, ms):", {k: round(v * 1e3, 1) for k, v in sorted(fronts.items())})
alone = {int(k): v for k, v in r.get("fronts_s", {}).items()}
print("fronts alone (ms):", {k: round(v * 1e3, 1) for k, v in sorted(alone.items())})
print()
print("| link | codec | tail ms | best k | projected | x full |")
print("|---|---|---|---|---|---|")
for g in (1.0, 10.0, 25.0):
    bw = g * 1e9 / 8
    for c, row in r["codecs"].items():
        zero = [s["stages_s"]["tail"] for s in row["links"].get("10.0", {}).get("splits", []) if s["k"] == 0]
        tails = [s["stages_s"]["tail"] for lk in row["links"].values() for s in lk["splits"]]
        if not tails:
            continue
        tail = zero[0] if zero else statistics.median(tails)
        by = row["entry_bytes"]
        best, k = min((max(sum(by[k:]) / bw, fronts[k]) + tail, k) for k in fronts if k < r["passages"])
        proj = min(best, fb)
        print(f"| {g:g} Gb/s | {c} | {tail * 1e3:.1f} | {'fallback' if fb <= best else k} | {proj * 1e3:.0f} ms | {proj / full:.3f} |")
