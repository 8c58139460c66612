"""Decode throughput: K concurrent generations decoded together by the batched decoder
(``chunkcache.decode``) against ``model.generate`` one at a time, in the same run.

K prompts of about ``--context`` tokens (passages of about 512 tokens of real text, ``bench.texts``,
a different run of them per prompt, and a MuSiQue question) are fused once through
``engine.fuse``; then each side decodes all K answers of ``--new-tokens`` tokens, greedy and
end-of-sequence off (every answer has exactly that many tokens, so every side does the same work):

  hf-sequential  ``model.generate`` over each fused cache, one request after another (the engine's
                 default path for one caller at a time)
  batched        ``Decoder.tokens`` from K threads at once: one packed step for all of them
                 (``decode_batching=DecodeConfig(max_batch=K)``)
  batched-graphs the same with ``DecodeConfig(graphs=True)`` (CUDA only): the step recorded as a
                 CUDA graph once a set of requests ran it twice, then replayed
  hf-threads     ``model.generate`` from K threads at once (the default path under K concurrent
                 callers; run last)

Reported per K and side: seconds for all K answers, generated tokens/s, the ratio to
hf-sequential from the same run, the decoder's mean rows per step, and whether every side
produced the same tokens (greedy in fp32: they must; in bf16 the batched rows' GEMMs and
attention kernels round differently from ``generate``'s, so an answer may part from it after a
near tie: how many are equal is printed). Absolute times depend on the machine (on a shared
CPU, on its load): compare the ratios.

    chunkcache bench decode --model smollm2-135m --context 2048 --k 1,4,8 --new-tokens 32 --out bench_results/decode_cpu
    chunkcache bench decode --model llama3-8b --context 8192 --k 1,8,16 --new-tokens 64 --out $OUT/decode
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from chunkcache.bench import standalone, write_report
from chunkcache.bench import sync as _sync

__all__ = ["run"]


def _engine(model: str, device: str):
    """An engine over a random-weight model of a real shape (``llama3-8b``, ``smollm2``,
    ``tiny``; bf16 on CUDA) with SmolLM2's tokenizer, or a model by name."""
    from chunkcache.engine import ChunkCache

    if model in ("llama3-8b", "smollm2", "tiny"):
        from chunkcache.bench.ttft import _tokenizer, build_model, speed_engine

        dev = torch.device(device)
        lm = build_model(model, torch.bfloat16 if dev.type == "cuda" else torch.float32, device)
        eng = speed_engine(lm.model, _tokenizer(), None, "raw")
        eng.lm.name = f"random-{model}"
        return eng
    return ChunkCache(model=model, store=None, device=device)


def _hf(eng, fused, n: int) -> list[int]:
    """``model.generate``'s n new tokens over the fused cache, end-of-sequence off."""
    from chunkcache.model import cache_kwarg

    ids = fused.input_ids.to(eng.lm.device)
    with torch.no_grad():
        out = eng.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
            eos_token_id=None, pad_token_id=0, **{cache_kwarg(eng.model): fused.fresh_cache()},
        )  # fmt: skip
    return out[0, ids.shape[1] :].tolist()


def _timed(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def run(
    model: str = "smollm2-135m",
    context: int = 2048,
    ks: tuple[int, ...] = (1, 4, 8),
    new_tokens: int = 32,
    device: str | None = None,
    log=print,
) -> list[dict]:
    from chunkcache.bench.texts import passages, questions
    from chunkcache.decode import DecodeConfig, Decoder, Sampling

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    eng = _engine(model, device)
    per_prompt = max(1, round(context / 512))
    k_max = max(ks)
    pool = passages(eng.tokenizer, count=per_prompt + k_max - 1)
    qs = questions()
    eng.precompute(pool)
    prompts = [(pool[i : i + per_prompt], qs[i % len(qs)]) for i in range(k_max)]
    fused = [eng.fuse(c, q) for c, q in prompts]
    _sync()
    log(
        f"set-up {time.perf_counter() - t0:.1f}s: {k_max} prompts of {fused[0].input_ids.shape[1]} tokens fused"
    )
    greedy = Sampling()  # end-of-sequence off: exactly new_tokens each

    def hf_sequential(fs):
        return [_hf(eng, f, new_tokens) for f in fs]

    def hf_threads(fs):
        with ThreadPoolExecutor(len(fs)) as ex:
            return list(ex.map(lambda f: _hf(eng, f, new_tokens), fs))

    decoder = Decoder(eng.lm, DecodeConfig(max_batch=k_max))

    def batched(fs):
        with ThreadPoolExecutor(len(fs)) as ex:
            return list(ex.map(lambda f: list(decoder.tokens(f, new_tokens, greedy)), fs))

    sides = {"hf-sequential": hf_sequential, "batched": batched}
    if torch.device(device).type == "cuda":
        graphed = Decoder(eng.lm, DecodeConfig(max_batch=k_max, graphs=True))

        def batched_graphs(fs):
            with ThreadPoolExecutor(len(fs)) as ex:
                return list(ex.map(lambda f: list(graphed.tokens(f, new_tokens, greedy)), fs))

        sides["batched-graphs"] = batched_graphs
    sides["hf-threads"] = hf_threads  # last: a crash there loses nothing else
    for fn in sides.values():  # warm-up: allocator, kernels, threads
        fn(fused[:2])
    results = []
    for k in ks:
        fs = fused[:k]
        got, secs = {}, {}
        for name, fn in sides.items():
            steps, rows = decoder.steps, decoder.rows
            secs[name], got[name] = _timed(lambda fn=fn, fs=fs: fn(fs))
            tokens = sum(len(t) for t in got[name])
            row = {
                "model": eng.lm.name,
                "device": _device_name(device),
                "prompt_tokens": int(fs[0].input_ids.shape[1]),
                "k": k,
                "new_tokens": new_tokens,
                "side": name,
                "seconds": secs[name],
                "tokens": tokens,
                "tokens_per_s": tokens / secs[name],
                "vs_hf_sequential": secs["hf-sequential"] / secs[name],
            }
            if name == "batched":
                row["rows_per_step"] = (decoder.rows - rows) / max(1, decoder.steps - steps)
            results.append(row)
            log(f"K={k:>2} {name:<14} {secs[name]:7.2f}s {tokens / secs[name]:8.1f} tok/s "
                f"x{row['vs_hf_sequential']:.2f} vs hf-sequential")  # fmt: skip
        same = got["hf-sequential"] == got["hf-threads"] == got["batched"]
        equal = sum(a == b for a, b in zip(got["hf-sequential"], got["batched"], strict=True))
        if "batched-graphs" in got:
            log(f"K={k:>2} batched-graphs tokens equal batched's: {got['batched-graphs'] == got['batched']}")
        for r in results[-len(sides) :]:
            r["same_tokens"] = same
            r["batched_answers_equal_hf"] = equal
        log(
            f"K={k:>2} same tokens on every side: {same} (batched answers equal to hf-sequential's: {equal}/{k})"
        )
    decoder.close()
    if "batched-graphs" in sides:
        graphed.close()
    return results


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.processor() or 'cpu'} x{os.cpu_count()} (load {load:.1f})"


def table(results: list[dict]) -> str:
    lines = [
        "| model | device | prompt | K | new | side | seconds | tok/s | vs hf-sequential | rows/step | same tokens (batched = hf) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = f"{r['rows_per_step']:.1f}" if "rows_per_step" in r else ""
        lines.append(
            f"| {r['model']} | {r['device']} | {r['prompt_tokens']} | {r['k']} | {r['new_tokens']} | {r['side']} | "
            f"{r['seconds']:.2f} | {r['tokens_per_s']:.1f} | {r['vs_hf_sequential']:.2f}x | {rows} | "
            f"{r['same_tokens']} ({r['batched_answers_equal_hf']}/{r['k']}) |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for side in dict.fromkeys(r["side"] for r in results):
        rs = [r for r in results if r["side"] == side]
        ax.plot([r["k"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=side)
    ax.set_xlabel("concurrent generations K")
    ax.set_ylabel("generated tokens/s")
    ax.set_title(
        f"{results[0]['model']}, {results[0]['prompt_tokens']}-token prompts, {results[0]['device']}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m", help="a model name, or a random shape: llama3-8b, smollm2, tiny"
    )
    p.add_argument(
        "--context", type=int, default=2048, help="prompt tokens of passages (about; 512 per passage)"
    )
    p.add_argument("--k", default="1,4,8", help="comma list of concurrent generations")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--out", default=None, help="write OUT.json, OUT.md (and OUT.png with matplotlib)")


def run_cli(args: argparse.Namespace) -> int:
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        raise SystemExit(
            f"chunkcache bench decode: error: --k must be a comma list of ints, got {args.k!r}"
        ) from None
    if not ks or min(ks) < 1 or args.new_tokens < 2 or args.context < 1:
        raise SystemExit("chunkcache bench decode: error: --k values >= 1, --new-tokens >= 2, --context >= 1")
    results = run(args.model, args.context, ks, args.new_tokens, args.device)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=2)
        write_report(args.out, table(results), plot, results)
    else:
        print("\n" + table(results))
    return 0


main = standalone("python -m chunkcache.bench.decode", __doc__, add_arguments, run_cli)

if __name__ == "__main__":
    raise SystemExit(main())
