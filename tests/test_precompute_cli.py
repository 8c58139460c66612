"""The precompute CLI end to end, as a real process on a real LMDB store: a model given as a plain
Hugging Face folder, resumable precompute after kill -9, keys that match ``ChunkCache.key``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from chunkcache.cli import main
from chunkcache.engine import ChunkCache


def _corpus(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(
                json.dumps({"text": f"Document {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}."})
                + "\n"
            )


def _cli(*args):
    return [sys.executable, "-m", "chunkcache.cli", *map(str, args)]


def test_kill_9_during_precompute_then_rerun_resumes(tmp_path, model_dir):
    corpus, store = tmp_path / "docs.jsonl", tmp_path / "store"
    _corpus(corpus, 120)
    args = [
        "precompute",
        corpus,
        "--store",
        store,
        "--model",
        model_dir,
        "--batch-size",
        "1",
        "--sink",
        "bos",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(_cli(*args), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    seen, deadline = b"", time.time() + 240
    while time.time() < deadline:  # wait until the progress bar shows a few stored slices
        ch = p.stderr.read1(4096) if hasattr(p.stderr, "read1") else p.stderr.read(1)
        if not ch:
            break
        seen += ch
        done = [int(m) for m in re.findall(rb"(\d+)/120", seen)]
        if done and max(done) >= 12:
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, seen[-500:]

    assert main(["verify", "--store", str(store)]) == 0  # every entry that is there is whole
    rerun = subprocess.run(
        _cli(*args, "--emit", tmp_path / "chunks.jsonl"), capture_output=True, text=True, env=env, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    stored_now = int(re.search(r"(\d+) stored now, (\d+) in store", rerun.stdout).group(1))
    assert 0 < stored_now <= 120 - 12 and "120 in store" in rerun.stdout  # resumed, not restarted
    assert main(["verify", "--store", str(store)]) == 0

    # The emitted keys are the engine's keys for the same texts, and the store is a hit for all.
    rows = [json.loads(line) for line in open(tmp_path / "chunks.jsonl")]
    eng = ChunkCache(model=str(model_dir), store=str(store), sink="bos", device="cpu")
    assert all(eng.key(r["text"]) == r["key"] for r in rows[:10])
    assert all(eng.contains([r["text"] for r in rows]))
    eng.store.close()


def test_precompute_exact_first_stores_both_variants(tmp_path, model_dir, capsys):
    corpus, store = tmp_path / "docs.jsonl", tmp_path / "store"
    _corpus(corpus, 3)
    args = ["precompute", str(corpus), "--store", str(store), "--model", str(model_dir), "--device", "cpu"]
    assert main([*args, "--sink", "context", "--exact-first"]) == 0
    assert "6 stored now, 6 in store" in capsys.readouterr().out  # each chunk twice
    texts = [json.loads(line)["text"] for line in open(corpus)]
    for kw in ({"sink": "context", "exact_first": True}, {"sink": "context"}, {}):  # the prefix sink's too
        eng = ChunkCache(model=str(model_dir), store=str(store), device="cpu", **kw)
        assert all(eng.contains(texts)), kw
        eng.store.close()
    capsys.readouterr()
    assert main([*args, "--exact-first"]) != 0  # refused, naming the sink it needs
    assert "only for sink='context'" in capsys.readouterr().err
