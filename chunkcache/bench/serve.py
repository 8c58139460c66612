"""Load test: K concurrent clients over a shared corpus, fused prefill against full prefill under
the same load, each through what a server would call.

Corpus: ``--passages`` passages of about 512 tokens of real text (``bench.texts``), precomputed
into an LMDB store. A query is ``--k`` passages drawn by Zipf popularity (the passage of rank r
with weight ``1 / r**s``, ``--zipf s``), each replaced with probability ``--miss`` by a passage
never seen before (the fused side precomputes it on the spot; full prefill just reads it), and a
MuSiQue question. ``--clients`` clients (threads, or asyncio tasks with ``--asyncio``) each send
their next query as soon as their last answer is complete (a closed loop), for ``--seconds`` per
side; the same query sequence per client on both sides.

  fused   ``engine.fuse(texts, question)`` (TTFT: first-token logits on the host), then greedy
          decoding of ``--new-tokens`` tokens from its cache (async: ``engine.afuse``)
  fused batched  the same calls on an engine with ``batching=BatchConfig(...)`` (``--batching
          on``, or ``off,on`` for both): waiting requests are fused together by one worker
  full    ``engine.prompt_ids`` + a forward with ``logits_to_keep=1`` (TTFT), then the same
          decoding from its cache; ``--full batched``: a batcher joins the waiting prompts into
          one left-padded forward and decodes them together (static batching); ``--full both``
          runs both and reports the better as full prefill's best

Reported per side: p50/p99 TTFT, queries/s, generated tokens/s (all decoded tokens over the
side's wall time), and fused over full ratios from the same run. Absolute times depend on the
machine (and on CPU, on what else runs): compare the ratios.

    chunkcache bench serve --model smollm2-135m --clients 4 --seconds 60 --out bench_results/serve_cpu
    chunkcache bench serve --model llama3-8b --clients 8 --seconds 60 --codec int8 --out bench_results/serve_h200
    chunkcache bench serve --clients 8 --batching off,on --max-wait-ms 0 ...   # fused alone, batched
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import random
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chunkcache.bench import standalone, write_report
from chunkcache.bench import sync as _sync

__all__ = ["Workload", "run"]


@dataclass(frozen=True)
class Workload:
    """What the clients send."""

    passages: int = 64
    """Distinct precomputed passages (the shared corpus)."""
    k: int = 8
    """Passages per query."""
    zipf: float = 1.1
    """Popularity exponent: the passage of rank r is drawn with weight 1 / r**zipf."""
    miss: float = 0.05
    """Probability that a drawn passage is replaced by one never seen before."""
    new_tokens: int = 16
    """Tokens generated per answer (greedy)."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.passages:
            raise ValueError(f"k must be in [1, passages], got k={self.k}, passages={self.passages}")
        if not 0.0 <= self.miss <= 1.0:
            raise ValueError(f"miss must be in [0, 1], got {self.miss}")
        if self.new_tokens < 1:
            raise ValueError("new_tokens must be at least 1")


def _queries(w: Workload, corpus: list[str], fresh: list[str], questions: list[str], seed: int):
    """An endless query stream for one client: (texts, question). ``fresh`` texts are handed out
    once each (the misses; numbered so each is new even when the pool repeats)."""
    rng = random.Random(seed)
    weights = [1 / (r + 1) ** w.zipf for r in range(len(corpus))]
    n = 0
    while True:
        picks: list[str] = []
        while len(picks) < w.k:
            t = corpus[rng.choices(range(len(corpus)), weights)[0]]
            if t not in picks:
                picks.append(t)
        for i in range(w.k):
            if rng.random() < w.miss:
                n += 1
                picks[i] = f"[client {seed} miss {n}] {fresh[(seed * 7919 + n) % len(fresh)]}"
        yield picks, questions[rng.randrange(len(questions))]


@torch.no_grad()
def _decode(model, cache, logits: torch.Tensor, steps: int) -> int:
    """Greedy decoding of ``steps`` more tokens after ``logits`` (``[B, vocab]``) from ``cache``
    (``mask``: none, every row is valid). Returns the tokens generated (rows x (steps + 1))."""
    from chunkcache.model import cache_kwarg

    tok, name = logits.argmax(-1, keepdim=True), cache_kwarg(model)
    for _ in range(steps):
        out = model(input_ids=tok, use_cache=True, **{name: cache})
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    tok.cpu()
    return int(tok.shape[0]) * (steps + 1)


def fused_request(eng, texts, question, w: Workload, misses: list | None = None) -> tuple[float, int]:
    """One fused query: TTFT and the tokens decoded. ``misses``: gets the call's miss figures
    (``stats["misses"]``: chunks encoded, seconds encoding, saving, waiting) when it had any."""
    from chunkcache.fuse import kv_to_cache

    t0 = time.perf_counter()
    res = eng.fuse(texts, question)
    res.logits.cpu()
    ttft = time.perf_counter() - t0
    if misses is not None and "misses" in res.stats:
        misses.append(res.stats["misses"])
    if getattr(eng, "decode_batching", None) is not None:  # one batched step for every active answer
        return ttft, sum(1 for _ in eng.decoder.tokens(res, max_new_tokens=w.new_tokens))
    with torch.no_grad():
        cache = kv_to_cache(res.kv)  # all N prompt tokens: decoding starts at the first new token
        return ttft, _decode(eng.model, cache, res.logits[None].to(eng.lm.device), w.new_tokens - 1)


def full_request(eng, texts, question, w: Workload) -> tuple[float, int]:
    t0 = time.perf_counter()
    ids = eng.prompt_ids(texts, question).to(eng.lm.device)
    with torch.no_grad():
        out = eng.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        logits.cpu()
        ttft = time.perf_counter() - t0
        return ttft, _decode(eng.model, out.past_key_values, logits, w.new_tokens - 1)


class FullBatcher:
    """Full prefill the way a batching server runs it: one thread takes every prompt waiting,
    prefills them as one left-padded batch (attention mask), and decodes them together."""

    def __init__(self, eng, w: Workload, max_batch: int) -> None:
        self.eng, self.w, self.max_batch = eng, w, max_batch
        self.q: queue.Queue = queue.Queue()
        self.batches: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="full-batcher", daemon=True)
        self._thread.start()

    def request(self, texts, question, w=None) -> tuple[float, int]:
        t0 = time.perf_counter()
        done = threading.Event()
        slot: dict = {}
        self.q.put((self.eng.prompt_ids(texts, question)[0], t0, done, slot))
        done.wait()
        if "error" in slot:
            raise slot["error"]
        return slot["ttft"], slot["tokens"]

    def close(self) -> None:
        self.q.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (first := self.q.get()) is not None:
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self.q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.q.put(None)
                    break
                batch.append(item)
            try:
                self._run(batch)
            except BaseException as e:  # handed to the waiting clients
                for *_, done, slot in batch:
                    slot["error"] = e
                    done.set()

    @torch.no_grad()
    def _run(self, batch) -> None:
        from chunkcache.model import cache_kwarg

        eng, dev = self.eng, self.eng.lm.device
        n = max(b[0].numel() for b in batch)
        pad = eng.tokenizer.pad_token_id if eng.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), n), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, (r, *_) in enumerate(batch):
            ids[i, n - r.numel() :], mask[i, n - r.numel() :] = r, 1
        ids, mask = ids.to(dev), mask.to(dev)
        out = eng.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        logits.cpu()
        now = time.perf_counter()
        for _, t0, _, slot in batch:
            slot["ttft"] = now - t0
        cache, tok = out.past_key_values, logits.argmax(-1, keepdim=True)
        for _ in range(self.w.new_tokens - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            o = eng.model(
                input_ids=tok, attention_mask=mask, use_cache=True, **{cache_kwarg(eng.model): cache}
            )
            cache, tok = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
        tok.cpu()
        self.batches.append(len(batch))
        for *_, done, slot in batch:
            slot["tokens"] = self.w.new_tokens
            done.set()


def _has_miss(texts: list[str]) -> bool:
    """Whether a query of ``_queries`` holds a passage never seen before (a miss)."""
    return any(t.startswith("[client ") for t in texts)


def _threads(call, streams, seconds: float) -> tuple[list[tuple[float, bool]], int, float]:
    ttfts: list[tuple[float, bool]] = []  # (TTFT, whether the query had a miss)
    tokens = [0]
    lock = threading.Lock()
    t_end = time.perf_counter() + seconds

    def client(stream):
        while time.perf_counter() < t_end:
            texts, q = next(stream)
            t, n = call(texts, q)
            with lock:
                ttfts.append((t, _has_miss(texts)))
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ttfts, tokens[0], time.perf_counter() - t0


def _tasks(acall, streams, seconds: float) -> tuple[list[tuple[float, bool]], int, float]:
    async def main():
        ttfts: list[tuple[float, bool]] = []
        tokens = 0
        t_end = time.perf_counter() + seconds

        async def client(stream):
            nonlocal tokens
            while time.perf_counter() < t_end:
                texts, q = next(stream)
                t, n = await acall(texts, q)
                ttfts.append((t, _has_miss(texts)))
                tokens += n

        t0 = time.perf_counter()
        await asyncio.gather(*(client(s) for s in streams))
        return ttfts, tokens, time.perf_counter() - t0

    return asyncio.run(main())


def _pct(qs: list[float], p: float) -> float:
    """The p-th percentile of sorted ``qs`` (nearest rank), nan for none."""
    return qs[min(len(qs) - 1, int(round(p / 100 * (len(qs) - 1))))] if qs else float("nan")


def _summary(name: str, ttfts: list[tuple[float, bool]], tokens: int, wall: float, **extra) -> dict:
    """One side's figures; ``ttfts``: (TTFT, whether the query had a miss). The queries with a
    miss and those without are summarised apart too (``hit``/``miss``: where a tail comes from)."""
    qs = sorted(t for t, _ in ttfts)
    split = {}
    for kind, want in (("hit", False), ("miss", True)):
        part = sorted(t for t, m in ttfts if m == want)
        split[f"{kind}_queries"] = len(part)
        split[f"ttft_p50_{kind}_s"], split[f"ttft_p99_{kind}_s"] = _pct(part, 50), _pct(part, 99)
    return {
        "side": name, "queries": len(qs), "tokens": tokens, "wall_s": wall, "qps": len(qs) / wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": _pct(qs, 50), "ttft_p99_s": _pct(qs, 99), "ttft_mean_s": statistics.fmean(qs) if qs else float("nan"),
        "ttft_p90_s": _pct(qs, 90), "ttft_max_s": qs[-1] if qs else float("nan"), **split, **extra,
    }  # fmt: skip


def _engine(model: str, codec: str, root: str, device: str, fusions: int = 1):
    from chunkcache.engine import ChunkCache

    if model in ("llama3-8b", "smollm2", "tiny"):  # random weights of a real shape, SmolLM2's tokenizer
        from chunkcache.bench.ttft import _tokenizer, build_model, speed_engine

        dev = torch.device(device)
        lm = build_model(model, torch.bfloat16 if dev.type == "cuda" else torch.float32, device)
        return speed_engine(lm.model, _tokenizer(), root, codec, concurrent_fusions=fusions)
    return ChunkCache(model=model, store=root, codec=codec, device=device, concurrent_fusions=fusions)


def run(
    eng,
    clients: int = 4,
    seconds: float = 60.0,
    workload: Workload = Workload(),
    full: str = "both",
    use_asyncio: bool = False,
    warmup: int = 2,
    log=print,
    warmup_s: float = 0.0,
    graph_warmup: bool = True,
    stream_base: int = 0,
) -> dict:
    """The load test on engine ``eng`` (its store gets the corpus); returns a JSON-able dict
    (``sides``: one summary per side). Each side first runs ``warmup`` calls from one thread,
    then ``warmup_s`` seconds of the same load from every client on other query streams
    (a server's steady state: CUDA graphs recorded for the shapes it meets, its device cache
    filled), neither counted. ``graph_warmup``: first ``eng.warmup`` over the workload's prompt
    sizes (fused side, without batching), as a server calls it at start-up. ``stream_base``
    seeds the query streams: a later run on the same engine needs its own, or the misses of an
    earlier run's streams, stored by then, come back as hits."""
    from chunkcache.bench.texts import passages, questions

    w = workload
    texts = passages(eng.tokenizer, w.passages + 64)
    corpus, fresh = texts[: w.passages], texts[w.passages :]
    qs = questions()
    t0 = time.perf_counter()
    eng.precompute(corpus, batch_size=4)
    log(f"{w.passages} passages precomputed ({eng.codec}) in {time.perf_counter() - t0:.1f}s")

    def streams(base=0):
        return [_queries(w, corpus, fresh, qs, seed=stream_base + base + c) for c in range(clients)]

    warmed = None
    if graph_warmup and getattr(eng, "batching", None) is None:
        # The fused side records the CUDA graphs (and compiles the kernels) of every prompt size
        # the workload can make before any query: the sizes of k corpus passages (or misses,
        # labelled) and of the questions, as a server would at start-up (``ChunkCache.warmup``).
        miss = [f"[client {clients + 20_000} miss {10**6}] {t}" for t in fresh]
        lens = sorted(len(b) // 8 for b in eng.resolve(corpus)[1])
        longest = sorted(lens + [len(b) // 8 for b in eng.resolve(miss)[1]])
        q_lens = [len(eng.tokenizer(q.strip(), add_special_tokens=False)["input_ids"]) for q in qs]
        warmed = eng.warmup((sum(lens[: w.k]), sum(longest[-w.k :])), (min(q_lens), max(q_lens)))
        log(
            f"graph warm-up: {warmed['points']} prompt sizes, {warmed['fusions']} fusions, "
            f"{warmed['graphs_recorded']} graphs in {warmed['seconds']:.1f}s"
        )

    def captures() -> int:  # CUDA graphs recorded so far by the fused side's stagings
        pool = getattr(eng, "_pool", None)
        stagings = pool.stagings() if pool is not None else []
        return sum(st.graphs.captures for st in stagings if getattr(st, "graphs", None) is not None)

    misses: list[dict] = []  # the fused calls' miss figures (engine stats)

    def measure(name, call, acall=None, **extra):
        warm = streams(base=10_000)[0]
        for _ in range(warmup):
            call(*next(warm))
        if warmup_s > 0:  # (other seeds: the measured streams' misses stay misses)
            _threads(call, streams(base=20_000), warmup_s)
        _sync()
        before = captures()
        misses.clear()
        if use_asyncio:
            got = _tasks(acall or (lambda t, q: asyncio.to_thread(call, t, q)), streams(), seconds)
        else:
            got = _threads(call, streams(), seconds)
        s = _summary(name, *got, **extra, graph_captures=captures() - before)
        if warmed is not None and name.startswith("fused"):
            s["graph_warmup"] = warmed
        log(
            f"  {name:14s} {s['queries']:5d} queries  {s['qps']:7.2f} q/s  {s['tokens_per_s']:8.1f} tok/s  "
            f"TTFT p50 {s['ttft_p50_s'] * 1e3:8.1f} ms  p90 {s['ttft_p90_s'] * 1e3:8.1f} ms  "
            f"p99 {s['ttft_p99_s'] * 1e3:8.1f} ms  max {s['ttft_max_s'] * 1e3:8.1f} ms  "
            f"graphs recorded {s['graph_captures']}"
        )
        if s["miss_queries"]:
            log(
                f"  {'':14s} with a miss {s['miss_queries']:4d}: p50 {s['ttft_p50_miss_s'] * 1e3:8.1f} ms  "
                f"p99 {s['ttft_p99_miss_s'] * 1e3:8.1f} ms;  without {s['hit_queries']:4d}: "
                f"p50 {s['ttft_p50_hit_s'] * 1e3:8.1f} ms  p99 {s['ttft_p99_hit_s'] * 1e3:8.1f} ms"
            )
        if misses:  # where a query with a miss spends its extra time (means over those calls)
            s["miss_breakdown"] = {
                k: statistics.fmean(m.get(k, 0.0) for m in misses)
                for k in ("chunks", "encode_s", "save_s", "wait_s")
            }
            s["miss_breakdown"]["calls"] = len(misses)
            b = s["miss_breakdown"]
            log(
                f"  {'':14s} {b['calls']} calls met misses: {b['chunks']:.2f} chunks encoded a call, "
                f"encode {b['encode_s'] * 1e3:.1f} ms, pack + write {b['save_s'] * 1e3:.1f} ms, "
                f"waiting for another's {b['wait_s'] * 1e3:.1f} ms (means)"
            )
        return s

    sides = []

    async def afused(t, q):
        from chunkcache.fuse import kv_to_cache

        t0 = time.perf_counter()
        res = await eng.afuse(t, q)
        res.logits.cpu()
        ttft = time.perf_counter() - t0
        if "misses" in res.stats:
            misses.append(res.stats["misses"])
        if getattr(eng, "decode_batching", None) is not None:
            n = 0
            async for _ in eng.decoder.atokens(res, w.new_tokens):
                n += 1
            return ttft, n
        n = await asyncio.to_thread(
            lambda: _decode(
                eng.model, kv_to_cache(res.kv), res.logits[None].to(eng.lm.device), w.new_tokens - 1
            )
        )
        return ttft, n

    b = getattr(eng, "batching", None)
    name = "fused"
    if b is not None:
        name = "fused batched" + ("" if b.preload else " lazy") + (" prep" if b.prep_stream else "")
        name += f" wait {b.max_wait_ms:g} ms" if b.max_wait_ms else ""
        name += " each" if b.recompute == "each" else ""
    if getattr(eng, "device_cache", None) is not None:
        name += " +dev"  # behind a device cache of hot entries
    if getattr(eng, "decode_batching", None) is not None:
        name += " +decode batched"  # answers decode together (continuous batching)
    sides.append(measure(name, lambda t, q: fused_request(eng, t, q, w, misses), afused))
    if b is not None:
        b = eng.batcher().stats()  # (warm-up batches included)
        sides[-1]["mean_batch"] = b["requests"] / b["batches"] if b["batches"] else 0.0
        sides[-1]["batch_sizes"] = b["sizes"]
    if full in ("sequential", "both"):
        sides.append(measure("full", lambda t, q: full_request(eng, t, q, w)))
    if full in ("batched", "both"):
        batcher = FullBatcher(eng, w, max_batch=clients)
        try:
            sides.append(measure("full batched", batcher.request))
        finally:
            batcher.close()
        sides[-1]["mean_batch"] = statistics.fmean(batcher.batches) if batcher.batches else 0.0
    fused = sides[0]
    best = max(sides[1:], key=lambda s: s["qps"]) if len(sides) > 1 else None
    ratios = {}
    if best is not None:
        ratios = {
            "baseline": best["side"],
            "qps": fused["qps"] / best["qps"],
            "tokens_per_s": fused["tokens_per_s"] / best["tokens_per_s"],
            "ttft_p50": best["ttft_p50_s"] / fused["ttft_p50_s"],
            "ttft_p99": best["ttft_p99_s"] / fused["ttft_p99_s"],
        }
        log(f"  fused vs {best['side']}: {json.dumps({k: v for k, v in ratios.items() if k != 'baseline'})}")
    return {
        "model": eng.lm.name,
        "device": torch.cuda.get_device_name() if eng.lm.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "codec": eng.codec,
        "clients": clients,
        "batching": None if getattr(eng, "batching", None) is None else eng.batching.__dict__,
        "asyncio": use_asyncio,
        "seconds": seconds,
        "warmup_seconds": warmup_s,
        "workload": w.__dict__,
        "policy": eng.default_fuse.policy,
        "recompute_ratio": eng.default_fuse.recompute_ratio,
        "sides": sides,
        "ratios": ratios,
    }


def cross_ratios(results: list[dict]) -> None:
    """For a result without full-prefill sides of its own (later fused settings of one run), its
    ratios against the best full side measured in the same run for the same clients, mode and
    workload."""
    for r in results:
        if r["ratios"] or not r["sides"]:
            continue
        fulls = [
            s for o in results
            if (o["clients"], o["asyncio"], o["workload"]) == (r["clients"], r["asyncio"], r["workload"])
            for s in o["sides"] if s["side"].startswith("full")
        ]  # fmt: skip
        if not fulls:
            continue
        best, fused = max(fulls, key=lambda s: s["qps"]), r["sides"][0]
        r["ratios"] = {
            "baseline": best["side"],
            "qps": fused["qps"] / best["qps"],
            "tokens_per_s": fused["tokens_per_s"] / best["tokens_per_s"],
            "ttft_p50": best["ttft_p50_s"] / fused["ttft_p50_s"],
            "ttft_p99": best["ttft_p99_s"] / fused["ttft_p99_s"],
        }


def table(results: list[dict]) -> str:
    lines = [
        "| model | device | clients | mode | fusions | miss | side | queries | q/s | tok/s | TTFT p50 ms | TTFT p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mode = "asyncio" if r["asyncio"] else "threads"
        for s in r["sides"]:
            lines.append(
                f"| {r['model']} | {r['device']} | {r['clients']} | {mode} | {r.get('concurrent_fusions', 1)} | "
                f"{r['workload']['miss']} | {s['side']} | {s['queries']} | "
                f"{s['qps']:.2f} | {s['tokens_per_s']:.1f} | {s['ttft_p50_s'] * 1e3:.1f} | {s['ttft_p99_s'] * 1e3:.1f} |"
            )
        if r["ratios"]:
            x = r["ratios"]
            lines.append(
                f"| | | | | | | {r['sides'][0]['side']} / {x['baseline']} | | {x['qps']:.2f}x | {x['tokens_per_s']:.2f}x | "
                f"{x['ttft_p50']:.2f}x lower | {x['ttft_p99']:.2f}x lower |"
            )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    labels, qps, p99 = [], [], []
    for r in results:
        for s in r["sides"]:
            labels.append(
                f"{s['side']}\n{r['clients']} {'tasks' if r['asyncio'] else 'threads'}, f{r.get('concurrent_fusions', 1)}"
            )
            qps.append(s["qps"])
            p99.append(s["ttft_p99_s"] * 1e3)
    axes[0].bar(labels, qps, color="tab:blue")
    axes[0].set_ylabel("queries/s")
    axes[1].bar(labels, p99, color="tab:red")
    axes[1].set_ylabel("TTFT p99 ms")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{results[0]['model']} on {results[0]['device']}, {results[0]['codec']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m", help="a model name, or a random shape: llama3-8b, smollm2"
    )
    p.add_argument("--clients", default="4", help="comma list of client counts")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per side")
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=5.0,
        help="seconds of the same load before each side is measured (not counted): steady state",
    )
    p.add_argument(
        "--graph-warmup",
        default="on",
        choices=["on", "off"],
        help="the fused side calls ChunkCache.warmup over the workload's prompt sizes first (a server's start-up)",
    )
    p.add_argument("--passages", type=int, default=64)
    p.add_argument("--k", type=int, default=8, help="passages per query")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--miss", type=float, default=0.05)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--codec", default="int8")
    p.add_argument(
        "--fusions", default="1", help="comma list of the engine's concurrent_fusions (fused side)"
    )
    p.add_argument("--full", default="both", choices=["sequential", "batched", "both", "none"])
    p.add_argument(
        "--batching",
        default="off",
        help="comma list: off (each caller fuses alone), on (BatchConfig), lazy (BatchConfig(preload=False)), "
        "prep (BatchConfig(prep_stream=True)), each (BatchConfig(recompute='each'))",
    )
    p.add_argument("--max-batch", type=int, default=None, help="BatchConfig.max_batch (default: clients)")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="BatchConfig.max_wait_ms")
    p.add_argument("--mode", default="threads", help="comma list: threads, asyncio")
    p.add_argument(
        "--decode",
        default="each",
        help="comma list (fused side): each (every answer decodes alone on its caller's thread), "
        "batched (ChunkCache(decode_batching=DecodeConfig()): one step for every active answer)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--dir", default=None, help="folder for the temporary store")
    p.add_argument(
        "--device-cache",
        type=float,
        default=0.0,
        help="GiB of device cache of hot entries for the fused side",
    )
    p.add_argument("--out", default="bench_results/serve", help="output prefix: .json, .md, .png")


def run_cli(args: argparse.Namespace) -> int:
    w = Workload(passages=args.passages, k=args.k, zipf=args.zipf, miss=args.miss, new_tokens=args.new_tokens)
    results = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = tempfile.mkdtemp(prefix="serve-", dir=args.dir)
    fusions = [int(x) for x in args.fusions.split(",")]
    eng = _engine(args.model, args.codec, root, device, fusions[0])
    if args.device_cache:  # the fused side keeps hot entries on the device (ChunkCache(device_cache_bytes=))
        from chunkcache.devicecache import DeviceCache

        eng.device_cache = DeviceCache(eng.lm.device, int(args.device_cache * 2**30))
    print(f"{args.model} on {device}, codec {args.codec}")
    command = "chunkcache bench serve " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("bench", "command", "func")
    )
    from chunkcache.batch import BatchConfig

    batching = args.batching.split(",")
    if not set(batching) <= {"off", "on", "lazy", "prep", "each"}:
        raise SystemExit(f"--batching takes off, on, lazy, prep and each, got {args.batching!r}")
    decodes = args.decode.split(",")
    if not set(decodes) <= {"each", "batched"}:
        raise SystemExit(f"--decode takes each and batched, got {args.decode!r}")
    from chunkcache.decode import DecodeConfig

    for mode in args.mode.split(","):
        for k in [int(x) for x in args.clients.split(",")]:
            settings = [(f, b, d) for d in decodes for b in batching for f in fusions]
            for i, (f, b, d) in enumerate(settings):  # later settings: the fused side only
                print(f"\n== {k} clients ({mode}), concurrent_fusions {f}, batching {b}, decode {d}")
                eng._pool, eng.concurrent_fusions, eng._batcher = None, f, None
                if eng._decoder is not None:
                    eng._decoder.close()
                eng._decoder = None
                eng.decode_batching = DecodeConfig(max_batch=k) if d == "batched" else None
                eng.batching = None
                if b != "off":
                    eng.batching = BatchConfig(
                        max_batch=args.max_batch or k,
                        max_wait_ms=args.max_wait_ms,
                        preload=b != "lazy",
                        prep_stream=b == "prep",
                        recompute="each" if b == "each" else "packed",
                    )
                full = args.full if i == 0 else "none"
                res = run(
                    eng,
                    clients=k,
                    seconds=args.seconds,
                    workload=w,
                    full=full,
                    use_asyncio=mode == "asyncio",
                    warmup_s=args.warmup_seconds,
                    graph_warmup=args.graph_warmup == "on",
                    stream_base=100_000 * len(results),  # each run its own misses
                )
                res.update(
                    model=args.model,
                    concurrent_fusions=f,
                    decode=d,
                    command=command,
                    device_cache_gib=args.device_cache,
                )
                results.append(res)
                Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    cross_ratios(results)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    if eng._decoder is not None:
        eng._decoder.close()
    eng.store.close()
    shutil.rmtree(root, ignore_errors=True)
    write_report(args.out, table(results), plot, results)
    return 0


main = standalone("chunkcache bench serve", __doc__, add_arguments, run_cli)


if __name__ == "__main__":
    raise SystemExit(main())
