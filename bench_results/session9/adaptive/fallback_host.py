"""The fallback's host work beside a plain prefill's (CPU): a 2-layer tiny model over the test
passages (the forward is ~1 ms, so what differs is host work), ``engine.fuse`` under a plan that
falls back against ``bench.ttft._full_once`` (the H200 baseline), interleaved, 200 rounds;
medians and the difference.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench_results/session9/adaptive/fallback_host.py
"""
import statistics
import sys
import tempfile
import time

sys.path.insert(0, "tests")
from conftest import PASSAGES, QUESTION, tiny_model  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from chunkcache.adaptive import AdaptiveConfig  # noqa: E402
from chunkcache.bench.ttft import _full_once  # noqa: E402
from chunkcache.engine import ChunkCache  # noqa: E402
from chunkcache.model import resolve  # noqa: E402
from chunkcache.store import LMDBStore  # noqa: E402

where, gguf = resolve("smollm2-135m")
tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
model = tiny_model("llama", num_hidden_layers=2)
store = LMDBStore(tempfile.mkdtemp() + "/s")
base = ChunkCache(model=model, tokenizer=tok, store=store)
base.precompute(PASSAGES)
fb = ChunkCache(model=model, tokenizer=tok, store=store,
                adaptive=AdaptiveConfig(link_bytes_per_s=1.0, recompute_tokens_per_s=1e4))  # fmt: skip
runs = {"full": [], "fallback": []}
fns = {"full": lambda: _full_once(base, PASSAGES, QUESTION), "fallback": lambda: fb.fuse(PASSAGES, QUESTION)}
for _ in range(20):
    for f in fns.values():
        f()
stages = []
for r in range(200):
    for name in (("full", "fallback") if r % 2 else ("fallback", "full")):
        t = time.perf_counter()
        out = fns[name]()
        runs[name].append(time.perf_counter() - t)
        if name == "fallback":
            stages.append(out.stats["adaptive"]["seconds"] | {"total": out.stats["seconds"]["total"]})
assert out.stats["adaptive"]["choice"] == "full prefill"
med = {k: statistics.median(v) for k, v in runs.items()}
st = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
n = int(base.prompt_ids(PASSAGES, QUESTION).shape[1])
print(f"{n} prompt tokens, 2 layers: full {med['full'] * 1e3:.3f} ms, fallback {med['fallback'] * 1e3:.3f} ms, "
      f"difference {(med['fallback'] - med['full']) * 1e3:.3f} ms; fallback stages "
      + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in st.items()))  # fmt: skip
