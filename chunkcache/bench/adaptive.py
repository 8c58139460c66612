"""Adaptive loading on a real shaped link: a redis-server in a network namespace, reached through a
veth pair that ``tc`` limits to each bandwidth in turn (Linux, root; set up and torn down here).

    root namespace  10.77.0.1  cc-veth0 ==tbf rate R==  cc-veth1  10.77.0.2  namespace cc-bench
                    the engine (SmolLM2, CPU)                    redis-server

Per bandwidth, on the same question (``--passages`` MuSiQue passages, stored once with
``--codec`` and any ``--precisions``), the TTFT from the question to the first token's logits of:
full prefill (``logits_to_keep=1``); fused with plain fetching (every chunk over the link, whole,
decoded, then ``fuse_kv``: the CPU's default path); fused with adaptive loading
(``AdaptiveConfig(precisions=...)``: measured rates; the front chunks recomputed in place while
the back ones are fetched whole and decoded, or a full prefill: the CPU's default path); and the
same adaptive engine streaming the fetched chunks layer by layer into the pipelined fusion
(``fast_path=True``, the GPU's default path; on this CPU the pipelined fusion itself is slower
than the eager one). Medians of ``--reps`` rounds, each running the methods once in a
rotating order (a busy machine's load falls on all alike); before them, two adaptive fusions
per engine measure the link at the new bandwidth (its last rate forgotten; the first reading of
a process is a warm-up the planner drops). The link itself is measured too (a 32 MB GET, median of 3), since a
veth pair on a small machine may not reach the rate ``tc`` allows. Rates and choices are printed
beside the times.

    sudo chunkcache bench adaptive --rates 1,10,25 --out bench_results/adaptive.json
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from chunkcache.bench import standalone
from chunkcache.bench.quality import DEFAULT_DATA

NS, DEV0, DEV1, IP0, IP1, PORT = "cc-bench", "cc-veth0", "cc-veth1", "10.77.0.1", "10.77.0.2", 6399


def _sh(*cmd: str, ns: bool = False) -> None:
    full = ["ip", "netns", "exec", NS, *cmd] if ns else list(cmd)
    subprocess.run(full, check=True, capture_output=True)


class ShapedLink:
    """The namespace, the veth pair, tbf on both ends, and redis-server inside; ``close`` undoes all."""

    def __init__(self) -> None:
        self.redis = None
        self.close()  # leftovers of an interrupted run
        _sh("ip", "netns", "add", NS)
        _sh("ip", "link", "add", DEV0, "type", "veth", "peer", "name", DEV1)
        _sh("ip", "link", "set", DEV1, "netns", NS)
        _sh("ip", "addr", "add", f"{IP0}/24", "dev", DEV0)
        _sh("ip", "link", "set", DEV0, "up")
        _sh("ip", "addr", "add", f"{IP1}/24", "dev", DEV1, ns=True)
        _sh("ip", "link", "set", DEV1, "up", ns=True)
        _sh("ip", "link", "set", "lo", "up", ns=True)
        self.redis = subprocess.Popen(
            ["ip", "netns", "exec", NS, "redis-server", "--port", str(PORT), "--bind", IP1, "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(100):
            try:
                socket.create_connection((IP1, PORT), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("redis-server in the namespace did not start")
        self.url = f"redis://{IP1}:{PORT}/0"

    def measure(self, nbytes: int = 32 << 20, reps: int = 3) -> float:
        """Bytes/s of one GET of ``nbytes`` through the link (median of ``reps``)."""
        import redis

        r = redis.Redis(host=IP1, port=PORT)
        r.set("cc-bench-blob", b"\x5a" * nbytes)
        secs, _ = _median_s(lambda: r.get("cc-bench-blob"), reps)
        r.delete("cc-bench-blob")
        r.close()
        return nbytes / secs

    def set_rate(self, gbit: float) -> None:
        burst = max(64 * 1024, int(gbit * 1e9 / 8 / 250))  # 4 ms of data
        for dev, ns in ((DEV0, False), (DEV1, True)):
            subprocess.run((["ip", "netns", "exec", NS] if ns else []) + ["tc", "qdisc", "del", "dev", dev, "root"],
                           capture_output=True)  # fmt: skip
            _sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{gbit}gbit", "burst", str(burst),
                "latency", "50ms", ns=ns)  # fmt: skip

    def close(self) -> None:
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)
            self.redis = None
        subprocess.run(["ip", "link", "del", DEV0], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ms(stages: dict) -> str:
    return " ".join(f"{k} {v * 1e3:.0f}" for k, v in stages.items())


def _median_s(fn, reps: int) -> tuple[float, object]:
    """(median seconds of ``reps`` calls, the last call's result)."""
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _interleaved(fns: dict, reps: int) -> dict[str, tuple[float, object]]:
    """Each of ``fns`` once per round, ``reps`` rounds, the order rotating, so that a change in the
    machine's load meanwhile falls on every method alike: name -> (median seconds, last result)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    last: dict[str, object] = {}
    for r in range(reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            last[n] = fns[n]()
            times[n].append(time.perf_counter() - t)
    return {n: (statistics.median(times[n]), last[n]) for n in names}


@torch.no_grad()
def run(args) -> dict:
    from chunkcache.adaptive import AdaptiveConfig
    from chunkcache.engine import ChunkCache
    from chunkcache.store.redis_store import RedisStore

    ex = json.loads(Path(args.data).read_text())[args.question]
    texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][: args.passages]]
    question = ex["question"]
    rows = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still tears the link down
    with ShapedLink() as link:
        store = RedisStore(link.url)
        kw = dict(store=store, codec=args.codec, device="cpu")
        plain = ChunkCache(model=args.model, dtype=args.dtype, **kw)
        lm = plain.lm
        conf = AdaptiveConfig(precisions=args.precisions)
        adapt = ChunkCache(model=lm.model, tokenizer=lm.tokenizer, adaptive=conf, **kw)
        streamed = ChunkCache(model=lm.model, tokenizer=lm.tokenizer, adaptive=conf, fast_path=True, **kw)
        link.set_rate(max(args.rates))
        adapt.precompute(texts)  # every precision
        ids = plain.prompt_ids(texts, question)
        entry_bytes = sum(len(store.get(plain.key(t))) for t in texts)
        for gbit in args.rates:
            link.set_rate(gbit)
            link_bps = link.measure()
            for eng in (adapt, streamed):
                eng._rates.forget_link()  # the last bandwidth's rate: these calls measure this one
                for _ in range(2 if eng._rates.prefill else 4):  # (first: the prefill rate, then the link)
                    eng.fuse(texts, question)
            got = _interleaved({"full": lambda: lm.model(input_ids=ids, logits_to_keep=1),
                                "plain": lambda: plain.fuse(texts, question),
                                "adaptive": lambda: adapt.fuse(texts, question),
                                "adaptive_streamed": lambda: streamed.fuse(texts, question)}, args.reps)  # fmt: skip
            full = got["full"][0]
            row = {"gbit": gbit, "link_measured_bytes_per_s": link_bps, "full_s": full}
            for name in ("plain", "adaptive", "adaptive_streamed"):
                row[f"{name}_s"], row[f"{name}_vs_full"] = got[name][0], got[name][0] / full
            for name in ("adaptive", "adaptive_streamed"):
                stats = got[name][1].stats["adaptive"]
                row[name] = {k: stats[k] for k in ("choice", "recomputed", "fetched", "reason", "rates")}
                row[name]["stages_s"] = stats["seconds"]
            rows.append(row)
            a, w = row["adaptive"], row["adaptive_streamed"]
            print(f"{gbit:6g} Gb/s (measured {link_bps * 8 / 1e9:.2f} Gb/s)  full {full * 1e3:8.1f} ms | plain fetch "
                  f"{row['plain_s'] * 1e3:8.1f} ms ({row['plain_vs_full']:.2f}x) | adaptive "
                  f"{row['adaptive_s'] * 1e3:8.1f} ms ({row['adaptive_vs_full']:.2f}x) | adaptive streamed "
                  f"{row['adaptive_streamed_s'] * 1e3:8.1f} ms ({row['adaptive_streamed_vs_full']:.2f}x)\n"
                  f"    adaptive: {a['choice']}, recomputed {a['recomputed']}/{len(texts)}, fetched {a['fetched']}, "
                  f"stages {_ms(a['stages_s'])}: {a['reason']}\n"
                  f"    streamed: {w['choice']}, recomputed {w['recomputed']}/{len(texts)}, fetched {w['fetched']}, "
                  f"stages {_ms(w['stages_s'])}", flush=True)  # fmt: skip
        store.close()
    return {"rows": rows, "prompt_tokens": int(ids.shape[1]), "entry_bytes": entry_bytes,
            "codec": args.codec, "precisions": list(args.precisions), "passages": args.passages}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--question", type=int, default=0)
    p.add_argument("--passages", type=int, default=5)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--codec", default="int8")
    p.add_argument("--precisions", type=lambda s: tuple(x for x in s.split(",") if x), default=("int2",),
                   help="further codecs stored for adaptive loading (comma list; '' for none)")  # fmt: skip
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 10.0, 25.0],
                   help="link bandwidths in Gb/s")  # fmt: skip
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)


def run_cli(args: argparse.Namespace) -> int:
    res = run(args)
    res["command"] = " ".join(["chunkcache", "bench", "adaptive"] + sys.argv[1:])
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


main = standalone("chunkcache bench adaptive", __doc__, add_arguments, run_cli)


if __name__ == "__main__":
    sys.exit(main())
