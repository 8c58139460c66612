"""Exploration proxy on CPU (SmolLM2-135M fp32, MuSiQue dev questions): fusion KL of qfast at 15%
when the chunk caches pass through a *fake* quantiser (quantise, dequantise in torch; no byte
format), so that where 2-bit damage comes from can be measured in seconds per variant. KL against
full prefill at the answer start and per answer token (teacher-forced along full prefill's greedy
answer, 32 tokens); "% gap" = (KL - KL lossless) / KL naive reuse, as in ``bench codec``.

    python bench_results/session7/codec/explore_fusion_proxy.py --questions 0,1 --groups base,kv
"""

import argparse
import json
import math
import time

import torch

from chunkcache import codec as C
from chunkcache.bench.quality import DEFAULT_DATA, full_reference, kl, teacher_forced
from chunkcache.engine import ChunkCache
from chunkcache.format import pack_chunk
from chunkcache.layout import ChunkKV
from chunkcache.store import MemoryStore

CLIPS = (1.0, 0.9, 0.8, 0.7, 0.6)


def fq(x, bits, dim):
    """Fake asymmetric quantisation of x with one (scale, min) per slice reducing over ``dim``
    (tuple), clipping search among CLIPS, scales rounded to fp16 as the codecs store them."""
    if bits >= 16:
        return x
    levels = 2**bits
    lo0, hi0 = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    mid, half = (lo0 + hi0) / 2, (hi0 - lo0) / 2
    best, best_err = None, None
    for c in CLIPS:
        lo, hi = mid - c * half, mid + c * half
        scale = ((hi - lo) / (levels - 1)).half().float().clamp_min(2**-24)
        lo = lo.half().float()
        y = torch.round((x - lo) / scale).clamp(0, levels - 1) * scale + lo
        err = ((y - x) ** 2).sum(dim=dim, keepdim=True)
        if best is None:
            best, best_err = y, err
        else:
            m = err < best_err
            best, best_err = torch.where(m, y, best), torch.where(m, err, best_err)
    return best


def int8_rows(x):
    s = (x.abs().amax(-1, keepdim=True) / 127).half().float().clamp_min(2**-24)
    return torch.round(x / s).clamp(-127, 127) * s


def hadamard(D, seed=0):
    H = torch.ones(1, 1)
    while H.shape[0] < D:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (D,), generator=g).float() * 2 - 1
    return (signs[:, None] * H) / math.sqrt(D)  # orthogonal: x @ M, back with @ M.T


def qkeys(k, bits, S=None, had=False):  # k [H, T, D] per channel in token groups
    if bits >= 16:
        return k
    H, T, D = k.shape
    if had:  # per-token quantisation after rotation of head_dim
        M = hadamard(D)
        return qvals(k @ M, bits, D) @ M.T
    G, S2 = C.int2_groups(T) if S is None else (max(1, T // S), -(-T // max(1, T // S)))
    out = torch.empty_like(k)
    for g in range(G):
        sl = slice(g * S2, min(T, (g + 1) * S2))
        out[:, sl] = fq(k[:, sl], bits, (1,))
    return out


def qkeys_mix(k, frac, hi_bits=4, lo_bits=2, score="range"):
    """Per head, the ``frac`` of channels with the largest range over the chunk at ``hi_bits``."""
    H, T, D = k.shape
    m = int(round(frac * D))
    if score == "range":
        sc = k.amax(1) - k.amin(1)  # [H, D]
    else:  # rms
        sc = k.pow(2).mean(1)
    top = sc.topk(m, dim=1).indices  # [H, m]
    hi = torch.zeros(H, D, dtype=torch.bool)
    hi.scatter_(1, top, True)
    a, b = qkeys(k, hi_bits), qkeys(k, lo_bits)
    return torch.where(hi[:, None, :], a, b)


def qvals(v, bits, group=None, had=False):  # v [H, T, D] per token in channel groups
    if bits >= 16:
        return v
    H, T, D = v.shape
    M = hadamard(D) if had else None
    x = v @ M if had else v
    g = group or D
    y = fq(x.reshape(H, T, D // g, g), bits, (3,)).reshape(H, T, D)
    return y @ M.T if had else y


ROPE = {}  # "model": the HF model, "base_pos": the chunk's first position (set per chunk)


def _rot(k, sign):  # rotate token t of k [H, T, D] by sign * (base_pos + t) positions (neox halves)
    from chunkcache.model import rotations

    T = k.shape[1]
    cos, sin = rotations(ROPE["model"], [sign * (ROPE["base_pos"] + t) for t in range(T)], "cpu")  # [T, D]
    k1, k2 = k.chunk(2, dim=-1)
    return k * cos + torch.cat([-k2, k1], dim=-1) * sin


def variant(
    kbits, vbits, *, kgroup=None, vgroup=None, vhad=False, khad=False, keep_first=4, keep=None, prerope=False, kmix=None
):
    """kbits/vbits: int or per-layer list. keep: list of token ids per layer kept at int8 (or None).
    prerope: quantise keys with their rotary position undone (as before RoPE), then redo it."""

    def f(kv):
        L = kv.shape[0]
        out = kv.clone()
        if prerope:
            kv = kv.clone()
            for l in range(L):
                kv[l, 0] = _rot(kv[l, 0], -1)
        for l in range(L):
            kb = kbits[l] if isinstance(kbits, (list, tuple)) else kbits
            vb = vbits[l] if isinstance(vbits, (list, tuple)) else vbits
            k, v = kv[l, 0], kv[l, 1]
            nk = qkeys(k, kb, kgroup, khad) if kmix is None else qkeys_mix(k, *kmix)
            nv = qvals(v, vb, vgroup, vhad)
            if keep_first and (kb < 16 or vb < 16):
                n = min(keep_first, k.shape[1])
                nk[:, :n], nv[:, :n] = int8_rows(k[:, :n]), int8_rows(v[:, :n])
            out[l, 0], out[l, 1] = (_rot(nk, 1) if prerope else nk), nv
        return out

    return f


def bits_per_elem(kbits, vbits, L, D, T=600, vgroup=None, kgroup=128, keep_first=4):
    """Approximate storage bits/element (codes + fp16 scale/min), for the table only."""
    tot = 0.0
    for l in range(L):
        kb = kbits[l] if isinstance(kbits, (list, tuple)) else kbits
        vb = vbits[l] if isinstance(vbits, (list, tuple)) else vbits
        g = vgroup or D
        kc = kb + (32 / kgroup if kb < 16 else 0)
        vc = vb + (32 / g if vb < 16 else 0)
        tot += (kc + vc) / 2
    return tot / L


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", default="0,1")
    ap.add_argument("--groups", default="base")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    eng = ChunkCache(device="cpu", dtype="float32", codec="raw")
    data = json.load(open(DEFAULT_DATA))
    L = eng.spec.layers if hasattr(eng, "spec") else 30
    results = []
    for qi in [int(x) for x in args.questions.split(",")]:
        ex = data[qi]
        texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][:5]]
        q = ex["question"]
        eng.precompute(texts)
        lossless = eng.store
        chunks = eng.chunks(texts)
        L = chunks[0].kv.shape[0]
        ids = eng.prompt_ids(texts, q)
        first, forced, ans, _ = full_reference(eng, ids, args.answer_tokens, 0)

        def fkl(r, pol):
            f = eng.fuse(texts, q, recompute_ratio=r, policy=pol)
            return float(kl(first, f.logits)), float(kl(forced, teacher_forced(eng, f, ans)).mean())

        t = time.perf_counter()
        naive = fkl(0.0, "cacheblend")
        raw = fkl(0.15, "qfast")
        print(
            f"q{qi}: naive {naive[0]:.4f} {naive[1]:.4f}  raw {raw[0]:.4f} {raw[1]:.4f}  ({time.perf_counter() - t:.1f}s for 2 fuses)",
            flush=True,
        )
        variants = build(args.groups.split(","), L)
        for name, fn in variants:
            t = time.perf_counter()
            store = MemoryStore()
            for ch in chunks:
                ROPE["model"], ROPE["base_pos"] = eng.model, ch.base_pos
                kv2 = fn(ch.kv.float()).to(ch.kv.dtype)
                c2 = ChunkKV(
                    token_ids=ch.token_ids, kv=kv2.contiguous(), base_pos=ch.base_pos, meta=dict(ch.meta)
                )
                store.put(eng.key_for_ids(ch.token_ids.tolist()), pack_chunk(c2, "raw", eng.key_info()))
            eng.store = store
            try:
                kf, ka = fkl(0.15, "qfast")
            finally:
                eng.store = lossless
            gf, ga = 100 * (kf - raw[0]) / naive[0], 100 * (ka - raw[1]) / naive[1]
            results.append(
                {
                    "q": qi,
                    "variant": name,
                    "kl_first": kf,
                    "kl_answer": ka,
                    "gap_first": gf,
                    "gap_answer": ga,
                    "naive": naive,
                    "raw": raw,
                }
            )
            print(
                f"  {name:40s} KL@start {kf:.4f} ({gf:6.1f}%)  KL/token {ka:.4f} ({ga:6.1f}%)  {time.perf_counter() - t:.1f}s",
                flush=True,
            )
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    # mean over questions per variant
    names = list(dict.fromkeys(r["variant"] for r in results))
    print("\nover the questions (% of naive gap of the means, as bench codec):")
    for n in names:
        rs = [r for r in results if r["variant"] == n]
        m = lambda f: sum(f(r) for r in rs) / len(rs)  # noqa: E731
        gf = 100 * (m(lambda r: r["kl_first"]) - m(lambda r: r["raw"][0])) / m(lambda r: r["naive"][0])
        ga = 100 * (m(lambda r: r["kl_answer"]) - m(lambda r: r["raw"][1])) / m(lambda r: r["naive"][1])
        print(f"  {n:40s} n {len(rs)}  start {gf:6.1f}%  per token {ga:6.1f}%", flush=True)


def real(name, **consts):
    """The stored codec itself (encode, decode), with module constants overridden."""

    def f(kv):
        old = {k: getattr(C, k) for k in consts}
        for k, v in consts.items():
            setattr(C, k, v)
        try:
            return C.CODECS[name].decode(C.CODECS[name].encode(kv), torch.float32)
        finally:
            for k, v in old.items():
                setattr(C, k, v)

    return f


def build(groups, L):
    out = []
    for g in groups:
        if g == "base":
            out += [("int4 (fake)", variant(4, 4)), ("int2 (fake, first 4 kept)", variant(2, 2))]
        elif g == "kv":
            out += [
                ("K2 V16", variant(2, 16)),
                ("K16 V2", variant(16, 2)),
                ("K3 V2", variant(3, 2)),
                ("K2 V3", variant(2, 3)),
            ]
        elif g == "pre":
            out += [
                ("K2pre V16", variant(2, 16, prerope=True)),
                ("K2pre V2had", variant(2, 2, prerope=True, vhad=True)),
                ("K2 V2had", variant(2, 2, vhad=True)),
                ("K3pre V2had", variant(3, 2, prerope=True, vhad=True)),
                ("K2pre/64 V2had", variant(2, 2, prerope=True, vhad=True, kgroup=64)),
            ]
        elif g == "keys":
            out += [
                ("K2pre V2had", variant(2, 2, prerope=True, vhad=True)),
                ("K3 V2had", variant(3, 2, vhad=True)),
                ("K4 V2had", variant(4, 2, vhad=True)),
                ("K2/64 V2had", variant(2, 2, vhad=True, kgroup=64)),
                ("K2/32 V2had", variant(2, 2, vhad=True, kgroup=32)),
                ("K3pre V2had", variant(3, 2, prerope=True, vhad=True)),
            ]
        elif g == "real":
            out += [("int2r (real)", real("int2r")), ("int2r keep 10%", real("int2r", INT2_KEEP_FRAC=0.10)),
                    ("int2 (real)", real("int2"))]
        elif g == "keep2m":
            out += [("int2m (mixed-code keep score)", real("int2m")),
                    ("int2m keep 2%", real("int2m", INT2M_KEEP_FRAC=0.02)),
                    ("int2m keep 5%", real("int2m", INT2M_KEEP_FRAC=0.05))]
        elif g == "real2m":
            out += [("int2m (real)", real("int2m")), ("int4 (real)", real("int4"))]
        elif g == "kmix":
            out += [("Kmix25 V2had", variant(2, 2, vhad=True, kmix=(0.25,))),
                    ("Kmix50 V2had", variant(2, 2, vhad=True, kmix=(0.5,))),
                    ("Kmix25rms V2had", variant(2, 2, vhad=True, kmix=(0.25, 4, 2, "rms"))),
                    ("Kmix12 V2had", variant(2, 2, vhad=True, kmix=(0.125,)))]
        elif g == "vgroup":
            out += [
                ("K2 V2 vgroup32", variant(2, 2, vgroup=32)),
                ("K2 V2 vgroup16", variant(2, 2, vgroup=16)),
                ("K16 V2 vgroup32", variant(16, 2, vgroup=32)),
            ]
        elif g == "had":
            out += [
                ("K2 V2 Vhad", variant(2, 2, vhad=True)),
                ("K16 V2 Vhad", variant(16, 2, vhad=True)),
                ("K2had V16", variant(2, 16, khad=True)),
                ("K2had V2had", variant(2, 2, khad=True, vhad=True)),
            ]
        elif g.startswith("layerK"):  # one layer's keys at 2 bits, rest lossless
            for l in range(L):
                out.append((f"L{l} K2", variant([2 if i == l else 16 for i in range(L)], 16)))
        elif g.startswith("layerV"):
            for l in range(L):
                out.append((f"L{l} V2", variant(16, [2 if i == l else 16 for i in range(L)])))
        elif g.startswith("layer"):
            for l in range(L):
                b = [2 if i == l else 16 for i in range(L)]
                out.append((f"L{l} K2V2", variant(b, b)))
        elif g.startswith("hi"):  # e.g. hi0,1: those layers 4-bit, rest 2
            ls = [int(x) for x in g[2:].split(".")]
            b = [4 if i in ls else 2 for i in range(L)]
            out.append((f"K2V2, layers {ls} at 4", variant(b, b)))
    return out


if __name__ == "__main__":
    main()
