"""Policy exploration: KL at the answer start for many candidate selection rules at one ratio.

How ``qaware``'s rule was chosen. The variants live here, in a local ``VARIANTS`` dict handed
to ``FuseConfig`` as policy objects (``chunkcache.select.Policy``); the library's ``POLICIES``
are used by name and never modified. Logs of the runs quoted in BENCHMARKS.md are in bench_results/explore_policies_*.log.
(In those runs "qaware" was the earlier rule attention x deviation; the shipped rule is
``attn_x_sqrtdev``.)

    python demos/explore_policies.py --start 0 --stop 100 --policies cacheblend,attn,attn_x_sqrtdev \
        --ratio 0.15 --sink bos --device cuda
"""

import argparse
import json

import torch

from chunkcache import select as S
from chunkcache.fuse import FuseConfig, fuse_kv
from chunkcache.model import load_model
from chunkcache.precompute import encode_chunks, encode_prefix
from chunkcache.template import PromptTemplate

VARIANTS: dict[str, S.Policy] = {}


class Variant:
    """A candidate rule ``fn(ctx, k) -> positions``, filtering after layer 1 like ``qaware``."""

    before_layers = False

    def __init__(self, fn, probe: bool = True) -> None:
        self.fn, self.probe = fn, probe

    def schedule(self, num_layers: int, ratio: float) -> dict[int, float]:
        return {1: ratio}

    def select(self, ctx: S.SelectContext, k: int):
        return self.fn(ctx, k)


def mk(name, fn, probe=True):
    VARIANTS[name] = Variant(fn, probe)


def norm(x):
    return x / x.mean()


mk("attn", lambda c, k: S._top(c, c.probe_attn.sum(0), k))
mk("attn_deep", lambda c, k: S._top(c, c.probe_attn[c.probe_attn.shape[0] // 2 :].sum(0), k))
mk("attn_x_dev", lambda c, k: S._top(c, norm(c.probe_attn.sum(0)) * norm(c.deviation(1)), k))
mk("attn_x_sqrtdev", lambda c, k: S._top(c, norm(c.probe_attn.sum(0)) * norm(c.deviation(1)).sqrt(), k))
mk("attnmax_x_dev", lambda c, k: S._top(c, norm(c.probe_attn.max(0).values) * norm(c.deviation(1)), k))
mk("qattn1_x_dev", lambda c, k: S._top(c, norm(c.question_attention()) * norm(c.deviation(1)), k))


def start_plus(c, k, per=4):
    w = c.within_chunk()
    sc = norm(c.probe_attn.sum(0)) * norm(c.deviation(1))
    sc = sc + (w < per).float() * 1e9
    return S._top(c, sc, k)


mk("start4_attn_x_dev", start_plus)
mk("devK", lambda c, k: S._top(c, c.deviation(0), k), probe=False)

mk(
    "attn_x_vnorm",
    lambda c, k: S._top(c, norm(c.probe_attn.sum(0)) * norm(c.reused[1].float().norm(dim=-1).sum(0)), k),
)
mk(
    "attn_x_dev_x_vnorm",
    lambda c, k: S._top(
        c, norm(c.probe_attn.sum(0)) * norm(c.deviation(1)) * norm(c.reused[1].float().norm(dim=-1).sum(0)), k
    ),
)
mk(
    "attn_rank_dev",
    lambda c, k: S._top(c, norm(c.probe_attn.sum(0)).log() + 0.5 * norm(c.deviation(1)).log(), k),
)
ap = argparse.ArgumentParser()
ap.add_argument("--start", type=int, default=0)
ap.add_argument("--stop", type=int, default=10)
ap.add_argument("--policies", default="cacheblend,qaware", help=f"library policies or {sorted(VARIANTS)}")
ap.add_argument("--ratio", type=float, default=0.15)
ap.add_argument("--sink", default="bos")
ap.add_argument("--device", default="cpu")
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--data", default="demos/data/musique_dev.json")
args = ap.parse_args()
lm = load_model(args.model, device=args.device, dtype=torch.float32)
t = PromptTemplate.from_tokenizer(lm.tokenizer)
data = json.load(open(args.data))
pols = args.policies.split(",")
unknown = [p for p in pols if p not in S.POLICIES and p not in VARIANTS]
if unknown:
    ap.error(f"unknown policies {unknown}; choose from {sorted(S.POLICIES) + sorted(VARIANTS)}")
ratio = args.ratio
res = {p: [] for p in pols + ["naive"]}
for ex in data[args.start : args.stop]:
    texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][:5]]
    cids = [t.chunk_ids(x) for x in texts]
    pre = t.prefix_ids()
    suf = t.suffix_ids(ex["question"])
    kvs = encode_chunks(lm, cids, t.sink_ids(args.sink))
    pkv = encode_prefix(lm, pre)
    ids = t.build(cids, ex["question"])
    with torch.no_grad():
        ref = lm.model(ids.to(lm.device)).logits[0, -1].float()
    ref_lp = ref.log_softmax(-1)

    def kl(logits, ref_lp=ref_lp):
        return float((ref_lp.exp() * (ref_lp - logits.log_softmax(-1))).sum())

    res["naive"].append(kl(fuse_kv(lm, pkv, kvs, pre, suf, FuseConfig(0.0, "cacheblend")).logits))
    for p in pols:
        cfg = FuseConfig(ratio, VARIANTS.get(p, p))
        res[p].append(kl(fuse_kv(lm, pkv, kvs, pre, suf, cfg).logits))
nv = sum(res["naive"]) / len(res["naive"])
print("ratio", ratio, "questions", len(res["naive"]))
for p, v in res.items():
    m = sum(v) / len(v)
    print(f"{p:22s} {m:.4f}  gap closed {1 - m / nv:.2%}")
