"""Codec quality report from merged ``bench quality --codec`` runs (one JSON per codec): on the
questions every run finished, qfast@15% KL at the answer start and per answer token, the increase
over the lossless run (``raw``) as % of the naive-reuse gap (naive reuse's KL with lossless
caches), accuracy, and each codec's size against bf16 for SmolLM2 (D 64) and the Llama-3-8B
shape (D 128) at 512 tokens and at 600 tokens (about a MuSiQue passage).

    python bench_results/session7/gpu/codec_report.py quality_raw.json quality_int2r.json ...
"""

import json
import sys

import torch

from chunkcache.codec import get_codec

runs = {}
for path in sys.argv[1:]:
    res = json.load(open(path))
    codec = (res.get("settings") or {}).get("codec") or path.rsplit("_", 1)[-1].removesuffix(".json")
    runs[codec] = res["rows"]
if "raw" not in runs:
    raise SystemExit("need the raw run as the lossless yardstick")
common = set.intersection(*({r["q"] for r in rows if r["policy"] == "qfast"} for rows in runs.values()))
print(f"questions every run finished: {len(common)}")


def mean(rows, policy, key):
    rs = [r for r in rows if r["policy"] == policy and r["q"] in common]
    return sum(float(r[key]) for r in rs) / len(rs)


naive_first, naive_ans = mean(runs["raw"], "naive", "kl_first"), mean(runs["raw"], "naive", "kl_answer")
raw_first, raw_ans = mean(runs["raw"], "qfast", "kl_first"), mean(runs["raw"], "qfast", "kl_answer")
print(f"naive reuse (lossless): KL@start {naive_first:.4f}  KL/token {naive_ans:.4f}")
shapes = {
    "smol 512": (30, 3, 512, 64),
    "smol 600": (30, 3, 600, 64),
    "8B 512": (32, 8, 512, 128),
    "8B 600": (32, 8, 600, 128),
}
print(
    f"{'codec':6s} {'KL@start':>9s} {'%gap':>6s} {'KL/token':>9s} {'%gap':>6s} {'agree':>6s} {'acc':>5s} | x smaller than bf16: "
    + "  ".join(shapes)
)
for codec, rows in runs.items():
    kf, ka = mean(rows, "qfast", "kl_first"), mean(rows, "qfast", "kl_answer")
    gf, ga = 100 * (kf - raw_first) / naive_first, 100 * (ka - raw_ans) / naive_ans
    sizes = []
    for L, H, T, D in shapes.values():
        bf16 = L * 2 * H * T * D * 2
        sizes.append(f"{bf16 / get_codec(codec).nbytes(L, H, T, D, torch.bfloat16):8.2f}")
    print(
        f"{codec:6s} {kf:9.4f} {gf:6.1f} {ka:9.4f} {ga:6.1f} {mean(rows, 'qfast', 'agree'):6.2f} "
        f"{mean(rows, 'qfast', 'correct'):5.2f} | " + "  ".join(sizes)
    )
