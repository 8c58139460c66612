"""Loading that adapts to the link: which chunks to fetch (at which stored precision), which to
recompute in place, or a plain full prefill.

A fused prompt's chunks can come over the tier's link (``bytes / link rate``) or be recomputed
*inside the fusion*: their tokens run at their true positions through every layer, attending to
everything before them (exact, as in a full prefill). The recomputed chunks are always the
**front** ones (Cake: "compute from the front while loading from the back"): they attend only to
the template prefix and to each other, so they run while the link delivers the back chunks.
The back chunks arrive layer by layer (``stream.LayerStream``: layer l of every fetched entry,
then l + 1, ...), and the pipelined loader stages each layer into the fusion as it arrives, so the
fusion's probe runs behind the link; what remains after the last layer arrives (the probe's last
layers, the selection, the recompute of the selected tokens: the *tail*) is about the same for
any split, since the selection budget is a share of every chunk token. The plan, per number
``k`` of front chunks recomputed and per stored precision ``p`` of the fetched ones::

    time ->   link:    fetch chunks k .. n-1 at p, layer-major  |
              device:  recompute chunks 0 .. k-1 | probe layer by layer as the layers arrive | tail
    estimate(k, p) = overrun x (max(fetch_s, recompute_s) + tail_s),   tail_s = chunk tokens / fuse rate,
                     recompute_s = max(the host's time to queue a front, front tokens / recompute rate)

It takes the ``k < n`` with the least estimate per precision, then the best-quality precision
whose estimate is within ``slack`` of the fastest (CacheGen's per-chunk level) and below a full
prefill's. If the fastest is no faster than a full prefill (chunk tokens / the *prefill* rate: a
slow link), it does the plain full prefill instead, planned from the rates alone (no store round
trip), so it costs what a plain prefill costs.

Rates are measured, not guessed: ``Rates`` keeps exponential averages of the bytes/s each fetch
achieved, the tokens/s of the front's recompute inside a fusion (``recompute``) and of plain full
prefills (``prefill``: the fallback's estimate; two readings, since a front that shares the host
with the link's reader ran at a quarter of the standalone rate on the H200), the tail's chunk
tokens/s, and ``overrun``: how much longer fused calls took than their estimate (at least 1;
it rises at once and falls slowly, so a plan that ended slower than the prefill it was compared
with makes the next plan account for it). The first reading of each kind is a warm-up and is
dropped. Until the prefill rate is known, calls are full prefills (they measure it); then, until
the link is known, a call recomputes every chunk but the last in place and fetches that one (about
a prefill plus the tail, whatever the link: it measures the link, the front and the tail). A rate
that makes every mix look slower than a prefill would never be measured again, so after
``explore_every`` full prefills in a row one call runs such a mix. This module knows nothing about
stores, codecs' bytes or fusion maths; ``engine.ChunkCache`` runs the plan.

    eng = ChunkCache(store=remote, codec="int8", adaptive=AdaptiveConfig(precisions=("int2",)))
    res = eng.fuse(passages, question); res.stats["adaptive"]   # what was chosen and why
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["AdaptiveConfig", "ChunkPlan", "Plan", "Rates", "overlap", "plan"]


@dataclass(frozen=True)
class AdaptiveConfig:
    """How fusion loads its chunks when they come from a slow tier."""

    enabled: bool = True
    """False: always fetch every chunk at the engine's codec (the plain path; stats still say so)."""
    precisions: tuple[str, ...] = ()
    """Further codecs each chunk is stored in besides the engine's own (separate entries: the key
    hashes the codec), best quality first, e.g. ``("int2",)`` beside an int8 engine. Precompute
    writes them all; the planner picks per chunk and link rate."""
    slack: float = 0.1
    """Take a better-quality precision if its estimate is at most this fraction slower."""
    fallback: bool = True
    """Do a plain full prefill when the best plan is estimated no faster than one."""
    link_bytes_per_s: float | None = None
    """Fix the link rate instead of measuring it (benchmarks, projections)."""
    recompute_tokens_per_s: float | None = None
    """Fix the recompute rate (tokens through every layer per second) instead of measuring it."""
    fuse_tokens_per_s: float | None = None
    """Fix the fusion's tail rate (chunk tokens of the prompt per second of fusion after the last
    fetched layer arrived and the front was recomputed) instead of measuring it."""
    recompute_chunks: int | None = None
    """Fix how many front chunks are recomputed in place (the rest fetched; no fallback): for
    benchmarks and tests. None: planned."""
    smoothing: float = 0.5
    """Weight of the newest measurement in the running averages."""
    explore_every: int = 16
    """A rate that no plan measures any more is measured again after this many calls (it may have
    been a bad reading, or the link or the load changed): after that many full-prefill fallbacks
    in a row, one call runs a mix (every chunk but the last recomputed in place: about a prefill
    plus the fusion's tail; only when that one fetch is estimated no longer than a prefill, else
    the count starts again, and the store is not asked); after
    that many fused calls that recomputed nothing (so the recompute rate is not refreshed), one
    call recomputes the first chunk in place (at most a chunk's recompute more). 0: never."""

    def __post_init__(self) -> None:
        from chunkcache import checks

        if not isinstance(self.precisions, tuple):
            raise TypeError(
                f"precisions must be a tuple of codec names, got {type(self.precisions).__name__}"
            )
        for p in self.precisions:
            checks.codec(p)
        if len(set(self.precisions)) != len(self.precisions):
            raise ValueError(f"precisions lists a codec twice: {self.precisions}")
        if self.slack < 0 or not 0 < self.smoothing <= 1:
            raise ValueError("slack must be >= 0 and smoothing in (0, 1]")
        for name in ("link_bytes_per_s", "recompute_tokens_per_s", "fuse_tokens_per_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")
        checks.nonnegative_int(self.explore_every, "explore_every")
        if self.recompute_chunks is not None:
            checks.nonnegative_int(self.recompute_chunks, "recompute_chunks")


class Rates:
    """Measured rates (exponential averages; thread-safe): per stored precision the link's bytes/s
    (a fetch's store reads and checks, and, where the fetch decodes, the decode), the tokens/s of
    the front's recompute inside a fusion (``recompute``, from fronts the device bounded) and of
    plain full prefills (``prefill``, chunk tokens of the prompt per second), the host's time to
    queue a front (``front_host``: the least a front takes), the fusion's tail (chunk tokens of the prompt per
    second of fusion after the last fetched layer arrived), and ``overrun``, fused calls' measured
    over estimated seconds (``saw_estimate``).

    The first reading of each kind (per precision for the link) is a warm-up and is not used: a
    process's first fusion pays one-off costs (allocations, kernel compilation, caches) that would
    otherwise hold a rate far too low, and a plan that then never runs that mix never measures it
    again (measured: a first fusion at 163 tokens/s against 1,118-1,418 later). ``fallbacks`` counts
    full prefills since a fused plan last ran (or an exploration was found too slow to run), ``unrecomputed`` calls since the recompute rate was
    last read (``AdaptiveConfig.explore_every``)."""

    def __init__(self, smoothing: float = 0.5) -> None:
        self.smoothing = smoothing
        self.link: dict[str, float] = {}
        self.recompute: float | None = None
        self.prefill: float | None = None
        self.fuse: float | None = None
        self.overrun: float | None = None
        self.front_host: float | None = None
        self.fallbacks = 0
        self.unrecomputed = 0
        self.link_probe: str | None = None
        """The engine's link probe beside a full prefill: None (not started), "running", "done",
        "failed" (nothing could be read)."""
        self._warm: set[str] = set()  # kinds whose warm-up reading was seen
        self._lock = threading.Lock()

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def _past_warmup(self, kind: str) -> bool:
        if kind in self._warm:
            return True
        self._warm.add(kind)
        return False

    def saw(self, what: Literal["recompute", "prefill", "fuse"], tokens: float, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            with self._lock:
                if self._past_warmup(what):
                    setattr(self, what, self._mix(getattr(self, what), tokens / seconds))

    def saw_fetch(self, precision: str, nbytes: float, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            with self._lock:
                if self._past_warmup("link:" + precision):
                    self.link[precision] = self._mix(self.link.get(precision), nbytes / seconds)

    def saw_front(self, tokens: int, device_s: float, host_s: float | None) -> None:
        """A front of ``tokens`` ran ``device_s`` on the device after the host took ``host_s`` to
        queue it (None: not measured, e.g. on the CPU). The host's time is the least any front
        takes (``front_host``; a transformers forward costs ~40-60 ms of launches at 32 layers);
        the tokens/s are read only from a front the device, not the host, bounded (a device
        span near the queueing time says nothing about the rate: one 512-token chunk "ran" at
        14,000 tokens/s on the H200, the prefill runs at 32,000)."""
        if host_s is not None and host_s > 0:
            with self._lock:
                if self._past_warmup("front_host"):
                    self.front_host = self._mix(self.front_host, host_s)
        if host_s is None or device_s > 1.2 * host_s:
            self.saw("recompute", tokens, device_s)

    def saw_estimate(self, estimated_s: float, measured_s: float) -> None:
        """A fused call took ``measured_s`` (to its logits on the host) where its plan estimated
        ``estimated_s`` (before the overrun factor). A rise is taken at once (the next plan must
        not repeat a plan that ran late), a fall is averaged in."""
        if estimated_s > 0 and measured_s > 0:
            with self._lock:
                if self._past_warmup("overrun"):
                    r = measured_s / estimated_s
                    old = self.overrun
                    self.overrun = r if old is None or r > old else self._mix(old, r)

    def discard(self, kinds: Sequence[str]) -> None:
        """A call whose readings of ``kinds`` are not used (it paid one-off costs: CUDA graphs
        recorded, or run eagerly until they are); it stands for their warm-up."""
        with self._lock:
            self._warm.update(kinds)

    def forget_link(self) -> None:
        """Drop the link rates (the link changed), keeping the warm-up state: the next fetch's
        reading is used at once (the engine's next call is a full prefill beside a link probe)."""
        with self._lock:
            self.link = {}
            self.link_probe = None  # (the engine probes it again beside a full prefill)


@dataclass(frozen=True)
class ChunkPlan:
    action: Literal["fetch", "recompute", "prefill"]
    precision: str | None
    """The stored codec fetched (None unless fetched)."""
    fetch_s: float | None
    """Estimated seconds to fetch it at that precision (None: link rate unknown)."""
    recompute_s: float | None


@dataclass(frozen=True)
class Plan:
    chunks: list[ChunkPlan]
    front: int
    """Chunks ``0 .. front-1`` are recomputed in place, the rest fetched."""
    full_prefill: bool
    """Do a plain full prefill instead (every chunk's action is then ``prefill``)."""
    estimate_s: float | None
    """Estimated load + fusion seconds of the plan, when the rates are known."""
    full_s: float | None
    """Estimated seconds of a full prefill (all chunk tokens / recompute rate)."""
    reason: str
    rates: dict = field(default_factory=dict)

    def stats(self) -> dict:
        return {
            "choice": "full prefill" if self.full_prefill else "fused",
            "reason": self.reason,
            "estimate_s": self.estimate_s,
            "full_prefill_estimate_s": self.full_s,
            "rates": self.rates,
            "fetched": {
                p: sum(1 for c in self.chunks if c.precision == p)
                for p in dict.fromkeys(c.precision for c in self.chunks)
                if p
            },
            "recomputed": sum(1 for c in self.chunks if c.action != "fetch"),
            "chunks": [c.__dict__ for c in self.chunks],
        }


def plan(
    tokens: Sequence[int],  # per chunk, in prompt order
    sizes: Sequence[Mapping[str, int]],  # per chunk: stored precision -> bytes, best quality first
    link_bytes_per_s: float | Mapping[str, float] | None,  # one rate, or per precision (measured ones)
    recompute_tokens_per_s: float | None,  # the front's, inside a fusion
    fuse_tokens_per_s: float | None = None,  # None: the fusion's tail counts as free
    *,
    prefill_tokens_per_s: float | None = None,  # a plain full prefill's (None: the recompute rate)
    overrun: float | None = None,  # fused calls' measured / estimated seconds (``Rates.overrun``)
    front_floor_s: float | None = None,  # the least a front takes: the host's time to queue one
    enabled: bool = True,
    slack: float = 0.1,
    fallback: bool = True,
    front: int | None = None,  # fix the number of front chunks recomputed (then no fallback)
) -> Plan:
    """Choose the front chunks to recompute in place, the precision of the fetched rest, or a full
    prefill (see the module docstring). Pure arithmetic, O(precisions x chunks): microseconds."""
    n = len(tokens)
    if n != len(sizes) or any(not s for s in sizes) or any(t <= 0 for t in tokens):
        raise ValueError("every chunk needs a positive token count and at least one stored precision")
    if front is not None and not 0 <= front <= n:
        raise ValueError(f"front must be in 0..{n}, got {front}")
    link_of = _link_rates(link_bytes_per_s)
    rec_rate, fuse_rate = recompute_tokens_per_s, fuse_tokens_per_s
    full_rate = prefill_tokens_per_s or rec_rate
    rec_rate = rec_rate or prefill_tokens_per_s  # no front measured yet: as fast as a prefill
    late = max(1.0, overrun or 1.0)  # (a plan is never assumed faster than its own estimate)
    floor = front_floor_s or 0.0
    shown = dict(link_bytes_per_s) if isinstance(link_bytes_per_s, Mapping) else link_bytes_per_s
    rates = {"link_bytes_per_s": shown, "recompute_tokens_per_s": rec_rate, "fuse_tokens_per_s": fuse_rate,
             "prefill_tokens_per_s": full_rate, "overrun": late, "front_floor_s": front_floor_s}  # fmt: skip
    rec = [None if rec_rate is None else t / rec_rate for t in tokens]
    full_s = None if full_rate is None else sum(tokens) / full_rate
    tail = sum(tokens) / fuse_rate if fuse_rate else 0.0  # after the last fetched layer: any k < n

    def chunks_for(k: int, pick: Sequence[str]) -> list[ChunkPlan]:
        fetch = [None if link_of is None else s[q] / link_of(q) for s, q in zip(sizes, pick, strict=True)]
        return [
            ChunkPlan("recompute", None, fetch[i], rec[i])
            if i < k
            else ChunkPlan("fetch", pick[i], fetch[i], rec[i])
            for i in range(n)
        ]

    def estimates(pick: Sequence[str]) -> list[float]:
        """estimate(k, pick) for every k = 0 .. n: late x (max(fetch of chunks k.., recompute of
        0..k-1) + tail); k = n (everything recomputed in place) has no tail."""
        back = [0.0] * (n + 1)  # back[k]: seconds to fetch chunks k .. n-1
        for i in range(n - 1, -1, -1):
            back[i] = back[i + 1] + sizes[i][pick[i]] / link_of(pick[i])  # type: ignore[misc]
        out, front_tokens = [], 0
        for k in range(n + 1):
            front_s = max(floor, front_tokens / rec_rate) if k else 0.0  # type: ignore[operator]
            out.append(late * (max(back[k], front_s) + (tail if k < n else 0.0)))
            if k < n:
                front_tokens += tokens[k]
        return out

    best = [next(iter(s)) for s in sizes]
    known = link_of is not None and rec_rate is not None
    if fallback and enabled and front is None and full_rate is None:
        why = "rates not measured yet: a full prefill (measures the prefill rate)"
        return Plan([ChunkPlan("prefill", None, None, None) for _ in tokens], n, True, None, None, why, rates)
    if not enabled or front is not None or not known:
        if not enabled:
            k, why = 0, "adaptation off: fetch all"
        elif front is not None:
            k, why = front, f"fixed split: recompute the first {front} in place, fetch {n - front}"
        elif rec_rate is None:  # (no fallback: nothing measured at all)
            k = 1 if n > 1 else 0
            why = "rates not measured yet: recompute the first chunk in place, fetch the rest (measures both)"
        else:  # about a prefill plus the tail, however slow the link: measures link, front and tail
            k = n - 1
            why = "link not measured yet: recompute all but the last chunk in place, fetch that one (measures the link)"
        est = estimates(best)[k] if known else None
        return Plan(chunks_for(k, best), k, False, est, full_s, why, rates)

    precisions = list(dict.fromkeys(p for s in sizes for p in s))  # in the order stored, best first
    # k = n (every chunk recomputed in place) is a prefill done the slow way: with the fallback
    # allowed, the prefill itself stands for it
    splits = range(n) if fallback else range(n + 1)
    options = []
    for rank, p in enumerate(precisions):
        pick = [p if p in s else min(s, key=s.get) for s in sizes]  # else its smallest stored one
        ests = estimates(pick)
        k = min(splits, key=lambda k, ests=ests: (ests[k], k))
        options.append((ests[k], rank, p, k, pick))
    fastest = min(o[0] for o in options)
    per = {q: link_of(q) for q in precisions}  # type: ignore[misc]

    def detail() -> str:  # built only for the reason text
        fetch_all = sum(s[b] / link_of(b) for s, b in zip(sizes, best, strict=True))  # type: ignore[misc]
        return (
            "link "
            + ", ".join(f"{q} {r / 1e9:.3g} GB/s" for q, r in per.items())
            + f", recompute {rec_rate:.4g} tokens/s, fusion tail "
            + (f"{tail * 1e3:.1f} ms" if fuse_rate else "not measured")
            + (f", estimates x{late:.3g} (measured overrun)" if late > 1 else "")
            + f": fetch all at their best precision {fetch_all * 1e3:.1f} ms, full prefill {full_s * 1e3:.1f} ms"  # type: ignore[operator]
            + f" ({full_rate:.4g} tokens/s)"
        )

    if fallback and fastest >= full_s:  # type: ignore[operator]
        est, _, p, k, pick = min(options, key=lambda o: (o[0], o[1]))
        prefill = [ChunkPlan("prefill", None, c.fetch_s, c.recompute_s) for c in chunks_for(n, pick)]
        why = f"full prefill: the best mix (recompute {k}, fetch {n - k} at {p}) is estimated {est * 1e3:.1f} ms; {detail()}"
        return Plan(prefill, n, True, est, full_s, why, rates)
    # the best-quality precision within slack of the fastest (and, with the fallback, faster than it)
    ok = [o for o in options if o[0] <= fastest * (1 + slack) and (not fallback or o[0] < full_s)]  # type: ignore[operator]
    est, _, p, k, pick = min(ok, key=lambda o: o[1])
    why = f"recompute the first {k} in place, fetch {n - k} at {p}: estimated {est * 1e3:.1f} ms; {detail()}"
    return Plan(chunks_for(k, pick), k, False, est, full_s, why, rates)


def _link_rates(link) -> Callable[[str], float] | None:
    """precision -> bytes/s from one rate or measured ones (a precision not measured yet: the
    slowest measured), or None when nothing is known."""
    if link is None:
        return None
    if not isinstance(link, Mapping):
        return lambda p: link
    if not link:
        return None
    slowest = min(link.values())
    return lambda p: link.get(p, slowest)


def overlap(
    fetch: Callable[[int], object],  # chunk index -> its fetched form (or None: unusable)
    indices: Sequence[int],
    compute: Callable[[], object],
) -> tuple[list, object, float, float]:
    """``fetch`` each of ``indices`` in order on a thread while this thread runs ``compute``;
    returns (fetched, compute's result, fetch seconds, compute seconds). An exception on the
    fetch thread is raised here, after ``compute`` finished."""
    out: list = [None] * len(indices)

    def fetch_all() -> float:
        t = time.perf_counter()
        for j, i in enumerate(indices):
            out[j] = fetch(i)
        return time.perf_counter() - t

    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(fetch_all) if indices else None
        t = time.perf_counter()
        result = compute()
        t_compute = time.perf_counter() - t
        t_fetch = job.result() if job is not None else 0.0
    return out, result, t_fetch, t_compute
