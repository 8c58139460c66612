"""Loading that adapts to the link: per chunk, fetch it (at which stored precision) or recompute it.

A chunk's cache can come over the tier's link (``bytes / link rate``) or be recomputed from its
token ids on the model's device (``tokens / recompute rate``, the same independent encode as
precompute, so a recomputed chunk equals a lossless stored one). The two run at once (fetches on
a thread, recompute on the caller's), so the load takes max(fetch time, recompute time). The
planner moves the chunks that are dearest to fetch per recompute second to recompute while that
lowers the maximum, for each stored precision, and takes the best-quality precision whose
estimate is within ``slack`` of the fastest (Cake's "compute or load? both"; CacheGen's
per-chunk level).

    time ->   link:     fetch c0 | fetch c2 | fetch c3
              device:   recompute c1 | recompute c4          TTFT ~ max(both) + fusion

Rates are measured, not guessed: ``Rates`` keeps an exponential average of the bytes/s every
fetch through the engine achieved and of the tokens/s every recompute achieved; until a rate has
been seen once, every chunk is fetched (and that measures the link). It knows nothing about
stores, codecs' byte formats or fusion; ``engine`` calls ``load``.

    eng = ChunkCache(store=remote, codec="int2", adaptive=AdaptiveConfig())
    res = eng.fuse(passages, question); res.stats["adaptive"]   # what was chosen and why
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = ["AdaptiveConfig", "ChunkPlan", "Plan", "Rates", "plan"]


@dataclass(frozen=True)
class AdaptiveConfig:
    """How fusion loads its chunks when they come from a slow tier."""

    enabled: bool = True
    """False: always fetch every chunk (the plain path; stats still say so)."""
    slack: float = 0.1
    """Take a better-quality precision if its estimate is at most this fraction slower."""
    link_bytes_per_s: float | None = None
    """Fix the link rate instead of measuring it (benchmarks, projections)."""
    recompute_tokens_per_s: float | None = None
    """Fix the recompute rate instead of measuring it."""
    smoothing: float = 0.5
    """Weight of the newest measurement in the running averages."""

    def __post_init__(self) -> None:
        if self.slack < 0 or not 0 < self.smoothing <= 1:
            raise ValueError("slack must be >= 0 and smoothing in (0, 1]")
        for name in ("link_bytes_per_s", "recompute_tokens_per_s"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive")


class Rates:
    """Measured link bytes/s and recompute tokens/s (exponential averages; thread-safe)."""

    def __init__(self, smoothing: float = 0.5) -> None:
        self.smoothing = smoothing
        self.link: float | None = None
        self.recompute: float | None = None
        self._lock = threading.Lock()

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def saw_fetch(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            with self._lock:
                self.link = self._mix(self.link, nbytes / seconds)

    def saw_recompute(self, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            with self._lock:
                self.recompute = self._mix(self.recompute, tokens / seconds)


@dataclass(frozen=True)
class ChunkPlan:
    action: str  # "fetch" or "recompute"
    precision: str | None  # the stored codec fetched (None when recomputed)
    fetch_s: float | None  # estimated seconds to fetch at that precision (None: rate unknown)
    recompute_s: float | None


@dataclass(frozen=True)
class Plan:
    chunks: list[ChunkPlan]
    estimate_s: float | None  # max(fetch, recompute) of the plan, when both rates are known
    reason: str
    rates: dict = field(default_factory=dict)

    def stats(self) -> dict:
        return {
            "reason": self.reason,
            "estimate_s": self.estimate_s,
            "rates": self.rates,
            "fetched": {
                p: sum(1 for c in self.chunks if c.precision == p)
                for p in {c.precision for c in self.chunks}
                if p
            },
            "recomputed": sum(1 for c in self.chunks if c.action == "recompute"),
            "chunks": [c.__dict__ for c in self.chunks],
        }


def plan(
    tokens: Sequence[int],
    sizes: Sequence[Mapping[str, int]],  # per chunk: stored precision -> bytes, best quality first
    link_bytes_per_s: float | None,
    recompute_tokens_per_s: float | None,
    *,
    enabled: bool = True,
    slack: float = 0.1,
) -> Plan:
    """Choose, per chunk, fetch at which precision or recompute (see the module docstring)."""
    if len(tokens) != len(sizes) or any(not s for s in sizes):
        raise ValueError("every chunk needs its token count and at least one stored precision")
    rates = {"link_bytes_per_s": link_bytes_per_s, "recompute_tokens_per_s": recompute_tokens_per_s}
    best = [next(iter(s)) for s in sizes]
    if not enabled or link_bytes_per_s is None or recompute_tokens_per_s is None:
        fetch = [
            None if link_bytes_per_s is None else s[p] / link_bytes_per_s
            for s, p in zip(sizes, best, strict=True)
        ]
        rec = [None if recompute_tokens_per_s is None else t / recompute_tokens_per_s for t in tokens]
        chunks = [ChunkPlan("fetch", p, f, r) for p, f, r in zip(best, fetch, rec, strict=True)]
        why = "adaptation off: fetch all"
        if enabled:
            why = "rates not measured yet: fetch all (measures the link)"
            if recompute_tokens_per_s is None:  # probe: recompute the shortest chunk alongside
                i = min(range(len(tokens)), key=tokens.__getitem__)
                chunks[i] = ChunkPlan("recompute", None, fetch[i], None)
                why = "rates not measured yet: fetch all but the shortest chunk, recompute it (measures both)"
        return Plan(chunks, None, why, rates)
    rec = [t / recompute_tokens_per_s for t in tokens]
    precisions = list(dict.fromkeys(p for s in sizes for p in s))  # in the order stored, best first
    options = []
    for rank, p in enumerate(precisions):
        # each chunk at p if stored at p, else at its smallest stored precision
        pick = [p if p in s else min(s, key=s.get) for s in sizes]
        fetch = [s[q] / link_bytes_per_s for s, q in zip(sizes, pick, strict=True)]
        order = sorted(range(len(tokens)), key=lambda i: fetch[i] / rec[i], reverse=True)
        moved: set[int] = set()
        f_total, r_total = sum(fetch), 0.0
        for i in order:  # move while it lowers max(fetch, recompute)
            if max(f_total - fetch[i], r_total + rec[i]) < max(f_total, r_total):
                moved.add(i)
                f_total, r_total = f_total - fetch[i], r_total + rec[i]
            else:
                break
        chunks = [
            ChunkPlan("recompute", None, fetch[i], rec[i])
            if i in moved
            else ChunkPlan("fetch", pick[i], fetch[i], rec[i])
            for i in range(len(tokens))
        ]
        options.append((max(f_total, r_total), rank, p, chunks))
    fastest = min(o[0] for o in options)
    est, _, p, chunks = min((o for o in options if o[0] <= fastest * (1 + slack)), key=lambda o: o[1])
    n_rec = sum(c.action == "recompute" for c in chunks)
    fetch_all = sum(s[best_p] for s, best_p in zip(sizes, best, strict=True)) / link_bytes_per_s
    reason = (
        f"link {link_bytes_per_s / 1e9:.3g} GB/s, recompute {recompute_tokens_per_s:.4g} tokens/s: "
        f"fetch {len(chunks) - n_rec} at {p}, recompute {n_rec}; estimated {est * 1e3:.1f} ms "
        f"(fetch all at their best precision: {fetch_all * 1e3:.1f} ms, recompute all: {sum(rec) * 1e3:.1f} ms)"
    )
    return Plan(chunks, est, reason, rates)


def load(
    chunks_plan: Plan,
    fetch: Callable[[int, str], object],  # (chunk index, precision) -> chunk cache; timed here
    fetch_nbytes: Callable[[int, str], int],
    recompute: Callable[[list[int]], list],  # chunk indices -> their caches, in that order
    tokens: Sequence[int],
    rates: Rates,
) -> list:
    """Run a plan: fetches on a thread while this thread recomputes; records both rates."""
    n = len(chunks_plan.chunks)
    out: list = [None] * n
    to_fetch = [i for i, c in enumerate(chunks_plan.chunks) if c.action == "fetch"]
    to_rec = [i for i, c in enumerate(chunks_plan.chunks) if c.action == "recompute"]

    def fetch_all() -> None:
        for i in to_fetch:
            p = chunks_plan.chunks[i].precision
            t = time.perf_counter()
            out[i] = fetch(i, p)
            rates.saw_fetch(fetch_nbytes(i, p), time.perf_counter() - t)

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(fetch_all)
        if to_rec:
            t = time.perf_counter()
            for i, c in zip(to_rec, recompute(to_rec), strict=True):
                out[i] = c
            rates.saw_recompute(sum(tokens[i] for i in to_rec), time.perf_counter() - t)
        job.result()
    return out
