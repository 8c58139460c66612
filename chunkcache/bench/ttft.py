"""TTFT benchmark on a GPU: full prefill beside naive reuse and fused prefill, KV loaded from LMDB.

A random-weight bf16 model of a real shape (``llama3-8b`` or ``smollm2``; speed does not depend on
weight values) is built directly on the GPU. Chunk caches (512 tokens, random K/V of the right
shape) are packed with each codec by the real ``format.pack_chunk`` into a temporary LMDB store.
Per context length (chunks back to back behind a 32-token prefix, a 32-token question):

  full      HF forward with SDPA over the whole prompt (use_cache, logits of the last token)
  naive     ratio 0: load + assemble + the question through every layer
  fused     ratio 0.15 with ``qaware``, ``qfast`` and ``cacheblend``, per codec, via ``pipeline.fuse_entries``

Stages (median over ``--reps`` after ``--warmup`` runs): ``read`` (header parse and the token
sections' checksums, host), probe / check / recompute (GPU timeline, CUDA events: they include
waiting for loads that were not hidden), and the overlapped load work: ``stage_host`` (stager
thread: queueing direct copies from the registered LMDB map, or packing each layer into pinned
memory with ``--staged``), ``h2d`` (side stream: copies and checksum kernels) and ``assemble``
(rerotate/scatter kernels). ``total`` is host wall time
from the store lookup to the first token's logits on the host side of a synchronise: the TTFT.
The store keeps ``--distinct`` different entries; longer contexts reuse them (the same work as
distinct entries with a warm page cache). ``--cold`` drops the store file from the page cache
(posix_fadvise) before one more run at 8K, through pinned staging (a registered map is
page-locked, so it cannot be cold). Throughput: ``--batch`` queries, each 8 of 16 shared
chunks, run one after another (no batching across queries), against full prefill one by one and
batched.

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

from chunkcache.bench import standalone
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
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
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


def _stage_medians(stats_list: list[dict]) -> dict:
    keys = stats_list[0]["seconds"].keys()
    return {k: statistics.median(s["seconds"][k] for s in stats_list) for k in keys}


def run(
    model: str = "llama3-8b",
    contexts=(2048, 8192, 16384, 32768),
    chunk: int = 512,
    ratio: float = 0.15,
    codecs=("raw", "int8", "int4"),
    policies=("qaware", "qfast", "cacheblend"),
    warmup: int = 1,
    reps: int = 3,
    distinct: int = 16,
    cold: bool = True,
    staged: bool = False,
    batch: int = 8,
    folder: str | None = None,
    partial: str | None = None,
    device: str = "cuda",
    log=print,
) -> dict:
    """Run the benchmark for one model shape; returns a JSON-able dict (``partial``: rewrite this
    JSON file after every context length, so a run cut short keeps what it measured)."""
    from chunkcache.format import pack_chunk
    from chunkcache.fuse import FuseConfig, fuse_kv
    from chunkcache.layout import ChunkKV
    from chunkcache.pipeline import Staging, entry_views, fuse_entries
    from chunkcache.precompute import encode_prefix
    from chunkcache.store import LMDBStore

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench ttft needs a CUDA device")
    dev = torch.device(device)
    t_build = time.perf_counter()
    lm = build_model(model, torch.bfloat16 if dev.type == "cuda" else torch.float32, device)
    spec = lm.spec
    vocab = lm.model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prefix_ids = torch.randint(0, vocab, (32,), generator=g).tolist()
    question = torch.randint(0, vocab, (32,), generator=g).tolist()
    prefix_kv = encode_prefix(lm, prefix_ids)
    p = len(prefix_ids)
    dev_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    log(f"{model}: built in {time.perf_counter() - t_build:.1f}s on {dev_name}")

    # Entries: random K/V with realistic magnitudes, packed by the real format, one store per codec.
    root = tempfile.mkdtemp(prefix="ttft-", dir=folder)
    stores, keys, chunk_ids = {}, [f"chunk-{i:03d}" for i in range(distinct)], []
    kvs = []
    for i in range(distinct):
        gen = torch.Generator(device=dev).manual_seed(100 + i)
        kv = torch.randn(spec.num_layers, 2, spec.kv_heads, chunk, spec.head_dim, device=dev, generator=gen)
        kvs.append((kv * 2).to(lm.dtype))
        chunk_ids.append(torch.randint(0, vocab, (chunk,), generator=g))
    entry_bytes = {}
    for codec in codecs:
        store = LMDBStore(os.path.join(root, codec), map_size=1 << 34)
        items = [
            (k, pack_chunk(ChunkKV(token_ids=ids, kv=kv, base_pos=p), codec))
            for k, ids, kv in zip(keys, chunk_ids, kvs, strict=True)
        ]
        entry_bytes[codec] = len(items[0][1])
        store.put_many(items)
        stores[codec] = store
        del items
    del kvs
    log(f"stores written: {', '.join(f'{c} {b / 2**20:.1f} MiB/chunk' for c, b in entry_bytes.items())}")

    staging = Staging(dev, register_limit=0 if staged else None)
    out = {
        "model": model,
        "device": dev_name,
        "torch": torch.__version__,
        "chunk_tokens": chunk,
        "ratio": ratio,
        "distinct_entries": distinct,
        "entry_bytes": entry_bytes,
        "staged": staged,
        "rows": [],
        "throughput": None,
        "cold": [],
    }

    def fused_once(codec, cfg, ks, st=staging):
        with entry_views(stores[codec], ks, st) as entries:
            res = fuse_entries(lm, prefix_kv, entries, prefix_ids, question, cfg, st)
        res.logits.cpu()  # the first token is known on the host
        return res

    def full_once(ids):
        with torch.no_grad():
            return lm.model(input_ids=ids, use_cache=True, logits_to_keep=1).logits[0, -1].float()

    for n_ctx in contexts:
        n_chunks = n_ctx // chunk
        ks = [keys[i % distinct] for i in range(n_chunks)]
        ids = torch.tensor(
            [prefix_ids + [t for i in range(n_chunks) for t in chunk_ids[i % distinct].tolist()] + question],
            device=dev,
        )
        t_full, full_logits = _median_runs(lambda ids=ids: full_once(ids), warmup, reps)
        row = {"context": n_ctx, "prompt_tokens": ids.shape[1], "full_s": t_full, "methods": []}
        log(f"\n== context {n_ctx} tokens ({n_chunks} chunks): full prefill {t_full * 1e3:.1f} ms")
        for codec in codecs:
            for policy, r in [("naive", 0.0)] + [(pol, ratio) for pol in policies]:
                cfg = FuseConfig(recompute_ratio=r, policy="qaware" if policy == "naive" else policy)
                stats = []

                def once(codec=codec, cfg=cfg, stats=stats, ks=ks):
                    res = fused_once(codec, cfg, ks)
                    stats.append(res.stats)
                    return res

                t, res = _median_runs(once, warmup, reps)
                secs = _stage_medians(stats[warmup:])
                m = {
                    "method": policy,
                    "codec": codec,
                    "ratio": r,
                    "ttft_s": t,
                    "speedup": t_full / t,
                    "stages_s": secs,
                    "recomputed_tokens": res.stats["recomputed_tokens"],
                    "compute_fraction": res.stats["compute_fraction"],
                    "pipeline_depth": res.stats["pipeline_depth"],
                    "direct_copies": res.stats["direct_copies"],
                    "top1_equals_full": bool(res.logits.argmax().item() == full_logits.argmax().item()),
                }
                row["methods"].append(m)
                log(
                    f"  {policy:10s} {codec:4s} TTFT {t * 1e3:8.1f} ms  {t_full / t:5.2f}x | "
                    + " ".join(f"{k} {v * 1e3:.1f}" for k, v in secs.items())
                )
        # Reference check: the pipelined path against fuse_kv over decoded chunks on the GPU.
        if n_ctx == contexts[0]:
            from chunkcache.format import unpack_chunk

            check = []
            for codec in codecs:
                cfg = FuseConfig(recompute_ratio=ratio, policy="qaware")
                with entry_views(stores[codec], ks) as entries:
                    chunks = [unpack_chunk(e, lm.dtype).to(dev) for e in entries]
                ref = fuse_kv(lm, prefix_kv, chunks, prefix_ids, question, cfg)
                got = fused_once(codec, cfg, ks)
                sel = len(set(ref.selected.tolist()) & set(got.selected.tolist())) / max(
                    1, ref.selected.numel()
                )
                check.append(
                    {
                        "codec": codec,
                        "max_abs_logit_diff": float((ref.logits - got.logits).abs().max()),
                        "selected_overlap": sel,
                        "top1_equal": bool(ref.logits.argmax() == got.logits.argmax()),
                    }
                )
            row["reference_check"] = check
            log(f"  pipelined vs fuse_kv(decoded chunks): {check}")
        out["rows"].append(row)
        if partial:
            Path(partial).write_text(json.dumps(out, indent=1))

    if cold and 8192 in contexts:
        ks = [keys[i % distinct] for i in range(8192 // chunk)]
        # Pinned staging (a registered map is page-locked: it cannot be cold), warmed first on the
        # warm store so that the cold run pays for the reads, not for pinning or graph capture.
        cold_staging = Staging(dev, register_limit=0)
        for codec in codecs:
            cfg = FuseConfig(recompute_ratio=ratio, policy="qaware")
            _median_runs(lambda codec=codec, cfg=cfg: fused_once(codec, cfg, ks, cold_staging), 1, 2)
            store = stores[codec]
            store.close()
            fd = os.open(os.path.join(root, codec, "data.mdb"), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
            stores[codec] = LMDBStore(os.path.join(root, codec), map_size=1 << 34)
            t, res = _sync_time(lambda codec=codec, cfg=cfg: fused_once(codec, cfg, ks, cold_staging))
            out["cold"].append(
                {"context": 8192, "codec": codec, "ttft_s": t, "stages_s": res.stats["seconds"]}
            )
            log(f"cold 8K qaware {codec}: TTFT {t * 1e3:.1f} ms (page cache dropped with posix_fadvise)")

    res = None
    if batch:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        # Throughput: batch queries each choosing 8 of 16 shared chunks.
        gq = torch.Generator().manual_seed(7)
        picks = [torch.randperm(16, generator=gq)[:8].sort().values.tolist() for _ in range(batch)]
        qks = [[keys[i % distinct] for i in pk] for pk in picks]
        prompts = [
            prefix_ids + [t for i in pk for t in chunk_ids[i % distinct].tolist()] + question for pk in picks
        ]
        all_ids = torch.tensor(prompts, device=dev)
        t_seq, _ = _median_runs(lambda: [full_once(all_ids[i : i + 1]) for i in range(batch)], 1, 3)
        try:
            t_bat, _ = _median_runs(
                lambda: lm.model(input_ids=all_ids, use_cache=True, logits_to_keep=1).logits[:, -1].float(),
                1,
                3,
            )
        except torch.OutOfMemoryError:
            t_bat = float("nan")
            torch.cuda.empty_cache()
        thr = {"queries": batch, "chunks_per_query": 8, "shared_chunks": 16,
               "full_sequential_qps": batch / t_seq, "full_batched_qps": batch / t_bat, "fused": []}  # fmt: skip
        for codec in codecs:
            cfg = FuseConfig(recompute_ratio=ratio, policy="qaware")
            t, _ = _median_runs(lambda codec=codec, cfg=cfg: [fused_once(codec, cfg, k) for k in qks], 1, 3)
            thr["fused"].append({"codec": codec, "policy": "qaware", "qps": batch / t})
        out["throughput"] = thr
        log(f"throughput: {json.dumps(thr)}")
    for s in stores.values():
        s.close()
    shutil.rmtree(root, ignore_errors=True)
    return out


def table(out: dict) -> str:
    """Markdown table of one run's results."""
    lines = [
        f"{out['model']} on {out['device']} (torch {out['torch']}), {out['chunk_tokens']}-token chunks, "
        f"ratio {out['ratio']}; TTFT ms (speedup vs full prefill); stages ms: read | probe | check | "
        "recompute || overlapped: stage_host | h2d | assemble",
        "",
        "| context | method | codec | TTFT ms | speedup | read | probe | check | recompute | stage_host | h2d | assemble |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in out["rows"]:
        lines.append(
            f"| {row['context']} | full prefill (HF SDPA) | - | {row['full_s'] * 1e3:.1f} | 1.00 |" + " |" * 7
        )
        for m in row["methods"]:
            s = m["stages_s"]
            vals = [
                s.get(k, 0.0) * 1e3
                for k in ("read", "probe", "check", "recompute", "stage_host", "h2d", "assemble")
            ]
            lines.append(
                f"| {row['context']} | {m['method']} | {m['codec']} | {m['ttft_s'] * 1e3:.1f} | {m['speedup']:.2f} | "
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
    p.add_argument("--policies", default="qaware,qfast,cacheblend", help="fused policies (naive always runs)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per point (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=8, help="queries in the throughput test (0: skip)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold page-cache run")
    p.add_argument(
        "--staged", action="store_true", help="never register the store's map: copy through pinned memory"
    )
    p.add_argument("--dir", default=None, help="folder for the temporary stores")
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
            staged=args.staged,
            batch=args.batch,
            folder=args.dir,
            partial=f"{args.out}_{shape}.partial.json",
            device=args.device,
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
    md = "\n\n".join(table(r) for r in results)
    Path(args.out + ".md").write_text(md + "\n")
    print("\n" + md)
    try:
        plot(results, args.out + ".png")
    except ImportError:
        print("matplotlib missing: no plot")
    return 0


main = standalone("chunkcache bench ttft", __doc__, add_arguments, run_cli)


if __name__ == "__main__":
    raise SystemExit(main())
