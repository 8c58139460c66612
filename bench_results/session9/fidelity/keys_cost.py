"""Host cost of choosing each prompt position's entry (ChunkCache._prompt_keys, once per fusion): the default
prefix sink and exact_first, 16 chunks, tiny model (the cost does not depend on the model).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python bench_results/session9/fidelity/keys_cost.py
"""

import sys
import timeit

sys.path.insert(0, "tests")
from conftest import tiny_model
from transformers import AutoTokenizer

from chunkcache.engine import ChunkCache
from chunkcache.model import resolve

where, gguf = resolve("smollm2-135m")
tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
texts = [f"Passage {i}: " + "some words here " * 40 for i in range(16)]
for kw in ({}, {"sink": "context", "exact_first": True}):
    e = ChunkCache(model=tiny_model(), tokenizer=tok, store=None, **kw)
    keys, ids = e.resolve(texts)
    n = 2000
    t = timeit.timeit(lambda e=e, keys=keys, ids=ids: e._prompt_keys(keys, ids), number=n) / n
    print(kw or "default", f"_prompt_keys for 16 chunks: {t * 1e6:.1f} us")
