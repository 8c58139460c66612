"""Real ``redis-server`` processes for the tests, and a worker that stands in for another host.

Servers run on free loopback ports in temporary folders (no persistence) and are killed by the
test that started them; nothing touches a system Redis.

    with RedisServer() as r: r.url                      # "redis://127.0.0.1:PORT/0"
    with RedisClusterProcs(3) as c: c.url                # three primaries, 16384 slots shared
    python tests/redis_servers.py precompute URL...      # another "host": precompute PASSAGES
    python tests/redis_servers.py fuse URL...            # another "host": fuse, print stats as JSON

``require_redis()`` skips with a reason when redis-server or redis-py is missing, but fails under
CI=true: there the tests must run (``.ci/services.sh`` installs the server).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest


def require_redis() -> None:
    """Skip (or, in CI, fail) when a real Redis cannot be started here."""
    missing = []
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        missing.append("redis-server/redis-cli not on PATH (Debian: apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        missing.append("redis-py not installed (pip install -e '.[redis]')")
    if missing:
        reason = "; ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the Redis tests cannot run: {reason}. .ci/services.sh installs it.")
        pytest.skip(reason)


def _free_port(cluster: bool = False) -> int:
    """A loopback port that is free now (and, for cluster nodes, whose bus port +10000 is too)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 and cluster:
            continue
        if not cluster:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port found")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server on 127.0.0.1, no persistence; ``kill()`` is SIGKILL (a crash)."""

    def __init__(self, cluster: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.dir = tempfile.mkdtemp(prefix="chunkcache-redis-")
        self.port = _free_port(cluster)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--protected-mode", "no", "--logfile", "redis.log", *extra]  # fmt: skip
        if cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-node-timeout", "2000"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"redis-server on port {self.port} did not start (log in {self.dir})")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        )
        return out.stdout

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RedisClusterProcs:
    """``n`` cluster-enabled redis-servers joined by ``redis-cli --cluster create`` (no replicas)."""

    def __init__(self, n: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(n):
                self.nodes.append(RedisServer(cluster=True))
            addrs = [f"127.0.0.1:{s.port}" for s in self.nodes]
            out = subprocess.run(
                ["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr}")
            deadline = time.monotonic() + 15
            while not all("cluster_state:ok" in s.cli("cluster", "info") for s in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0?cluster=true"

    def close(self) -> None:
        for s in self.nodes:
            s.close()

    def __enter__(self) -> RedisClusterProcs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def servers():
    """A single server and a three-node cluster, both up for the ``with`` body."""
    with RedisServer() as single, RedisClusterProcs(3) as cluster:
        yield single, cluster


# -- the other host ---------------------------------------------------------------------------


def _host(role: str, urls: list[str]) -> int:
    """Precompute (``precompute``) or fuse (``fuse``) the test passages against each store URL."""
    import json

    from conftest import PASSAGES, QUESTION, tiny_model
    from transformers import AutoTokenizer

    from chunkcache.engine import ChunkCache
    from chunkcache.model import resolve

    where, gguf = resolve("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    model = tiny_model("llama")
    for url in urls:
        eng = ChunkCache(model=model, tokenizer=tok, store=url)
        if role == "precompute":
            keys = eng.precompute(PASSAGES)
            out = {"url": url, "keys": keys}
        else:
            res = eng.fuse(PASSAGES[::-1], QUESTION)
            s = eng.store.stats()
            out = {"url": url, "hits": s.hits, "misses": s.misses, "entries": s.entries,
                   "logits": res.logits[:64].tolist(), "argmax": int(res.logits.argmax())}  # fmt: skip
        eng.store.close()
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_host(sys.argv[1], sys.argv[2:]))
