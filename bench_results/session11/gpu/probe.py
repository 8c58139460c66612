"""The selection probe's share of the GPU TTFT (issue 14 requirement 3), through ``engine.fuse`` on
texts, session 11.

A random-weight bf16 model of the Llama-3-8B shape (``bench.ttft.build_model``; speed does not
depend on the weights), SmolLM2's tokenizer, 512-token passages cut from MuSiQue contexts,
precomputed by the engine into one LMDB store (``--codec``, int8 by default: the issue-13
targets' store). Per context length, every method is timed in the same rounds (method after
method, ``--reps`` rounds after ``--warmup`` calls each, so graphs are recorded before timing),
CUDA synchronised, question -> first-token logits on the host; medians:

  full      ``engine.prompt_ids`` + one HF forward (SDPA, ``logits_to_keep=1``): the baseline
  naive     ``engine.fuse`` at ratio 0: no probe, no selection, the question alone recomputed
  epic0     EPIC's tokens chosen before layer 0 without a probe (``select.Epic0``): the same k and
            the same recompute as qfast, minus the probe and its wait for the last layer's KV
  qfast     the default: the probe over every layer, then the selection
  qdeep     the probe over the first 7/8 of the layers (``select.QDeep``)
  qshallow  the probe over the first half (``select.QShallow``)
  qvalue    qfast's probe, exact chunks skipped, each layer's mass weighted by the V norm

The probe's share of a policy's TTFT: (TTFT - TTFT of epic0) / TTFT (what the probe and its wait
add to the same recompute), and the ``probe`` stage's GPU time from the fusion's CUDA events
(``res.stats["seconds"]["probe"]``: the probe's kernels and any wait for layers not yet loaded).
With ``--device-cache`` GiB the same policies again behind a device cache holding every entry
(no store read, no host-to-device copy): the probe's compute alone. ``--context-sink``: an engine
with ``sink="context"``, ``exact_first=True`` and no policy given: its default policy (qvalue
after session 11) against qfast on the same engine, on the fast path.

    python bench_results/session11/gpu/probe.py --out $OUT/probe          # H200
    python bench_results/session11/gpu/probe.py --shape tiny --device cpu --contexts 1024,2048 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chunkcache.bench.ttft import _full_once, _kl, _sync_time, _tokenizer, build_model, speed_engine

CHUNK = 512


def _fused(eng, texts, question, ratio, policy):
    kw = {} if policy is None else {"policy": policy}
    res = eng.fuse(texts, question, recompute_ratio=ratio, **kw)
    res.logits.cpu()  # the first token is known on the host
    return res


def _methods(policies: list[str], ratio: float) -> list[tuple[str, float, str | None]]:
    """(label, ratio, policy) per fused method; naive first."""
    return [("naive", 0.0, "qfast")] + [(p, ratio, p) for p in policies]


def time_methods(eng, texts, question, methods, warmup, reps, with_full=True, log=print) -> dict:
    """Round-robin timing: every method once a round, so all meet the same machine state."""
    calls = {}
    if with_full:
        calls["full"] = lambda: _full_once(eng, texts, question)
    for label, r, pol in methods:
        calls[label] = lambda r=r, pol=pol: _fused(eng, texts, question, r, pol)
    for fn in calls.values():  # eager, recorded, then replayed
        for _ in range(warmup):
            _sync_time(fn)
    times = {k: [] for k in calls}
    last, stats = {}, {k: [] for k in calls if k != "full"}
    for _ in range(reps):
        for name, fn in calls.items():
            last[name] = None
            t, out = _sync_time(fn)
            times[name].append(t)
            last[name] = out if name == "full" else out.logits.cpu()
            if name != "full":
                stats[name].append(out.stats)
            del out
    res = {"times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()}, "methods": {}}
    full_logits = last.get("full")
    for label, r, pol in methods:
        st = stats[label]
        keys = st[0]["seconds"].keys()
        res["methods"][label] = {
            "policy": pol,
            "ratio": r,
            "ttft_s": res["median_s"][label],
            "stages_s": {k: statistics.median(s["seconds"].get(k, 0.0) for s in st) for k in keys},
            "recomputed_tokens": st[-1]["recomputed_tokens"],
            "probe_token_layers": st[-1].get("probe_token_layers"),
            "compute_fraction": st[-1]["compute_fraction"],
            "fast_path": bool(st[-1].get("fast_path")),
            "policy_used": st[-1].get("policy"),
            "kl_vs_full": None if full_logits is None else _kl(full_logits, last[label]),
        }
    return res


def shares(row: dict, base: str = "epic0") -> None:
    """Add each probe policy's share of its TTFT: against ``base`` and from its probe stage."""
    ms = row["methods"]
    t0 = ms[base]["ttft_s"] if base in ms else None
    for m in ms.values():
        t = m["ttft_s"]
        m["probe_stage_share"] = m["stages_s"].get("probe", 0.0) / t
        m["share_vs_" + base] = None if t0 is None else (t - t0) / t


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def _pct(x) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def table(rows: list[dict], title: str) -> str:
    lines = [
        title,
        "",
        "| context | method | TTFT ms | x full | share vs epic0 | probe stage ms (share) | check ms | recompute ms | load ms | recomputed | compute | KL vs full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        full = row["median_s"].get("full")
        if full is not None:
            lines.append(f"| {row['context']} | full prefill | {full * 1e3:.1f} | 1.00 |" + " |" * 8)
        for label, m in row["methods"].items():
            s, t = m["stages_s"], m["ttft_s"]
            sh = m.get("share_vs_epic0")
            lines.append(
                f"| {row['context']} | {label} | {t * 1e3:.1f} | "
                + (f"{full / t:.2f}" if full else "-")
                + f" | {_pct(sh)} | {s.get('probe', 0) * 1e3:.1f} "
                f"({m['probe_stage_share'] * 100:.1f}%) | {s.get('check', 0) * 1e3:.1f} | "
                f"{s.get('recompute', 0) * 1e3:.1f} | {s.get('load', 0) * 1e3:.1f} | {m['recomputed_tokens']} | "
                f"{m['compute_fraction']:.3f} | {_g(m['kl_vs_full'])} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--contexts", default="8192,32768")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--codec", default="int8")
    p.add_argument("--policies", default="epic0,qfast,qdeep,qshallow,qvalue")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="calls per method before timing (eager, recorded)")
    p.add_argument(
        "--device-cache", type=float, default=0.0, help="GiB: the policies again from a device cache"
    )
    p.add_argument("--dev-policies", default="epic0,qfast,qdeep,qvalue")
    p.add_argument(
        "--context-sink", action="store_true", help="the context-sink engine's default policy, first context"
    )
    p.add_argument("--wall", type=float, default=1e9, help="seconds: skip steps that would start after this")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/probe_out"))
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    from chunkcache.bench.texts import passages, questions

    dev = torch.device(a.device)
    lm = build_model(a.shape, torch.bfloat16 if dev.type == "cuda" else torch.float32, a.device)
    tok = _tokenizer()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    contexts = [int(x) for x in a.contexts.split(",")]
    texts = passages(tok, max(contexts) // CHUNK, tokens=CHUNK)
    question = questions()[0]
    root = tempfile.mkdtemp(prefix="probe-")
    eng = speed_engine(lm.model, tok, os.path.join(root, a.codec), a.codec)
    t0 = time.perf_counter()
    eng.precompute(texts, batch_size=4)
    print(f"{a.shape} on {name}: built and {len(texts)} passages precomputed ({a.codec}) in "
          f"{time.perf_counter() - t_start:.1f}s (precompute {time.perf_counter() - t0:.1f}s)", flush=True)  # fmt: skip
    out = {"shape": a.shape, "device": name, "torch": torch.__version__, "codec": a.codec, "ratio": a.ratio,
           "question": question, "chunk_tokens": CHUNK, "args": vars(a), "store": [], "device_cache": [],
           "context_sink": None}  # fmt: skip
    policies = a.policies.split(",")

    def dump():
        out["elapsed_s"] = time.perf_counter() - t_start
        Path(a.out, "probe.json").write_text(json.dumps(out, indent=1))
        md = table(out["store"], f"{a.shape} {str(lm.model.dtype).split('.')[-1]} on {name}, {a.codec} LMDB store, ratio {a.ratio}: "
                   "engine.fuse on texts, medians of the same rounds")  # fmt: skip
        if out["device_cache"]:
            md += "\n\n" + table(out["device_cache"], "the same, every entry in a device cache (no load)")
        if out["context_sink"]:
            md += "\n\n" + json.dumps(out["context_sink"], indent=1)
        Path(a.out, "probe.md").write_text(md + "\n")
        return md

    def left() -> float:
        return a.wall - (time.perf_counter() - t_start)

    for n_ctx in contexts:
        if left() < 0:
            print(f"skipped {n_ctx}: past the wall", flush=True)
            continue
        ctx = texts[: n_ctx // CHUNK]
        row = time_methods(eng, ctx, question, _methods(policies, a.ratio), a.warmup, a.reps)
        row.update(
            context=n_ctx, passages=len(ctx), prompt_tokens=int(eng.prompt_ids(ctx, question).shape[1])
        )
        shares(row)
        out["store"].append(row)
        print(table([row], f"== {n_ctx} store"), f"\n({time.perf_counter() - t_start:.0f}s)", flush=True)
        dump()
    if a.device_cache and dev.type == "cuda":
        dce = speed_engine(lm.model, tok, eng.store, a.codec, device_cache_bytes=int(a.device_cache * 2**30))
        for n_ctx in contexts:
            if left() < 0:
                print(f"skipped device cache {n_ctx}: past the wall", flush=True)
                continue
            ctx = texts[: n_ctx // CHUNK]
            row = time_methods(dce, ctx, question, _methods(a.dev_policies.split(","), a.ratio), a.warmup, a.reps, with_full=False)  # fmt: skip
            row.update(context=n_ctx, passages=len(ctx))
            row["median_s"]["full"] = next((r["median_s"]["full"] for r in out["store"] if r["context"] == n_ctx), None)  # fmt: skip
            row["device_cache_hits"] = dce.fuse(ctx, question).stats.get("device_cache")
            shares(row)
            out["device_cache"].append(row)
            print(
                table([row], f"== {n_ctx} device cache"),
                f"\n({time.perf_counter() - t_start:.0f}s)",
                flush=True,
            )
            dump()
        del dce
        torch.cuda.empty_cache()
    if a.context_sink and left() > 0:
        n_ctx = contexts[0]
        ctx = texts[: n_ctx // CHUNK]
        t0 = time.perf_counter()
        ce = speed_engine(lm.model, tok, os.path.join(root, "ctx"), a.codec, sink="context", exact_first=True)
        ce.precompute(ctx, batch_size=4)
        row = time_methods(ce, ctx, question, [("default", a.ratio, None), ("qfast", a.ratio, "qfast")], a.warmup, a.reps, with_full=False)  # fmt: skip
        out["context_sink"] = {
            "context": n_ctx, "precompute_s": time.perf_counter() - t0, "default_policy": ce.default_fuse.policy,
            **{k: {"ttft_ms": m["ttft_s"] * 1e3, "policy_used": m["policy_used"], "fast_path": m["fast_path"],
                   "recomputed_tokens": m["recomputed_tokens"], "stages_ms": {s: v * 1e3 for s, v in m["stages_s"].items()}}
               for k, m in row["methods"].items()},
        }  # fmt: skip
        print("== context sink, exact_first, no policy given:", json.dumps(out["context_sink"]), flush=True)
    md = dump()
    print("\n" + md)
    eng.store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
