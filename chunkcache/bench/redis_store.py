"""Redis benchmark: read GB/s from Redis (one server and a 3-node cluster) beside LMDB and a plain file.

Writes N chunk entries of a realistic shape into each backend and reads them all back (best of
``repeats`` passes, warm: page cache for file and LMDB, memory for Redis), one ``get`` per entry
and one pipelined ``get_many`` per pass; also ``get_layers`` of a quarter of the layers, which
moves only the pieces those layers lie in. Ratios are against the plain file in the same run.
Without ``--url``/``--cluster-url`` it starts its own ``redis-server`` processes on loopback
ports (no persistence) and stops them after.

    chunkcache bench redis --n 16                          # SmolLM2-135M shape, 512 tokens
    chunkcache bench redis --shape llama3-8b --n 4 --piece-mib 8
    rows = run(n=8)                                        # dict of results
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

from chunkcache.bench import standalone
from chunkcache.bench.store import SHAPES, _best, _make_chunk
from chunkcache.format import pack_chunk
from chunkcache.layout import ChunkKV
from chunkcache.store import LMDBStore

__all__ = ["local_redis", "run"]


def _port(cluster: bool) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not cluster or port < 55535:
            return port


@contextlib.contextmanager
def local_redis(nodes: int = 1):
    """Yield the URL of a throwaway redis-server (``nodes`` = 1) or an n-node cluster (``?cluster=true``)."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server not on PATH (apt-get install redis-server) and no --url given")
    work, procs = tempfile.mkdtemp(prefix="chunkcache-bench-redis-"), []
    try:
        ports = []
        for i in range(nodes):
            port, d = _port(nodes > 1), os.path.join(work, str(i))
            os.makedirs(d)
            args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
                    "--appendonly", "no", "--logfile", "redis.log"]  # fmt: skip
            if nodes > 1:
                args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports.append(port)
        for port in ports:
            _wait(["redis-cli", "-p", str(port), "ping"], "PONG")
        if nodes == 1:
            yield f"redis://127.0.0.1:{ports[0]}/0?cluster=false"
            return
        addrs = [f"127.0.0.1:{p}" for p in ports]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        for port in ports:
            _wait(["redis-cli", "-p", str(port), "cluster", "info"], "cluster_state:ok")
        yield f"redis://127.0.0.1:{ports[0]}/0?cluster=true"
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)


def _wait(cmd: list[str], want: str, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while want not in subprocess.run(cmd, capture_output=True, text=True).stdout:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(cmd)} never answered {want}")
        time.sleep(0.05)


def run(
    n: int = 16,
    shape: str = "smollm2",
    tokens: int = 512,
    repeats: int = 3,
    piece_mib: float = 1.0,
    url: str | None = None,
    cluster_url: str | None = None,
) -> dict:
    """Run the benchmark; returns {"entry_bytes", "rows": {name: GB/s}, ...} and prints a table."""
    from chunkcache.store.redis_store import RedisStore

    sh = SHAPES[shape]
    base = _make_chunk(sh, tokens, 0)
    values = []
    for i in range(n):
        c = ChunkKV(base.token_ids.roll(i), base.kv, 1, base.token_scores, {"i": i})
        values.append((f"{i:064x}", pack_chunk(c, "raw", {"bench": True})))
    keys = [k for k, _ in values]
    total = sum(len(v) for _, v in values)
    quarter = range(0, max(sh.layers // 4, 1))
    rows: dict[str, float] = {}
    work = tempfile.mkdtemp(prefix="chunkcache-bench-")
    try:
        fpath, offsets, off = os.path.join(work, "plain.bin"), [], 0
        with open(fpath, "wb") as f:
            for _, v in values:
                f.write(v)
                offsets.append((off, len(v)))
                off += len(v)
        fd = os.open(fpath, os.O_RDONLY)
        rows["plain file (pread)"] = total / _best(
            lambda: [os.pread(fd, ln, o) for o, ln in offsets], repeats
        )
        os.close(fd)
        lmdb_store = LMDBStore(os.path.join(work, "lmdb"), map_size=2 * total + (64 << 20))
        lmdb_store.put_many(values)
        rows["LMDB get"] = total / _best(lambda: [lmdb_store.get(k) for k in keys], repeats)
        lmdb_store.close()

        with contextlib.ExitStack() as stack:
            targets = {
                "Redis 1 node": url or stack.enter_context(local_redis(1)),
                "Redis cluster": cluster_url or stack.enter_context(local_redis(3)),
            }
            for name, u in targets.items():
                store = RedisStore(u, piece_bytes=int(piece_mib * 2**20), prefix="chunkcache-bench:")
                t = time.perf_counter()
                for k, v in values:
                    store.put(k, v)
                rows[f"{name} put"] = total / (time.perf_counter() - t)
                rows[f"{name} get"] = total / _best(
                    lambda s=store: [s.get(k, touch=False) for k in keys], repeats
                )
                rows[f"{name} get_many"] = total / _best(
                    lambda s=store: s.get_many(keys, touch=False), repeats
                )
                t_layers = _best(lambda s=store: [s.get_layers(k, quarter) for k in keys], repeats)
                rows[f"{name} get_layers 1/4"] = total / 4 / t_layers
                store.flushdb_prefix()
                store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gbps = {k: v / 1e9 for k, v in rows.items()}
    out = {"shape": shape, "tokens": tokens, "entries": n, "entry_bytes": total // n,
           "piece_bytes": int(piece_mib * 2**20), "GBps": gbps}  # fmt: skip
    print(_table(out))
    return out


def _table(r: dict) -> str:
    g = r["GBps"]
    base = g["plain file (pread)"]
    lines = [
        f"shape {r['shape']}, {r['tokens']} tokens/chunk, {r['entries']} entries of {r['entry_bytes'] / 1e6:.2f} MB "
        f"(raw bf16), Redis pieces of {r['piece_bytes'] / 2**20:g} MiB, loopback, warm",
        "",
        f"{'':30}{'GB/s':>8}{'vs file':>9}",
    ]
    for name, v in g.items():
        lines.append(f"{name:30}{v:8.2f}{v / base:9.2f}")
    lines.append("(get_layers 1/4: GB/s of the bytes a quarter of the layers needs; put: one HSET per entry)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=16, help="number of chunk entries (default: 16)")
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES), help="model KV shape")
    p.add_argument("--tokens", type=int, default=512, help="tokens per chunk (default: 512)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported (default: 3)")
    p.add_argument("--piece-mib", type=float, default=1.0, help="Redis piece size in MiB (default: 1)")
    p.add_argument("--url", default=None, help="an existing Redis server (default: start one)")
    p.add_argument("--cluster-url", default=None, help="an existing Redis Cluster (default: start 3 nodes)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")


def run_cli(args: argparse.Namespace) -> int:
    out = run(n=args.n, shape=args.shape, tokens=args.tokens, repeats=args.repeats, piece_mib=args.piece_mib,
              url=args.url, cluster_url=args.cluster_url)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    return 0


main = standalone("chunkcache bench redis", __doc__, add_arguments, run_cli)


if __name__ == "__main__":
    raise SystemExit(main())
