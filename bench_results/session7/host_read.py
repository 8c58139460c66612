"""Host-side cost per call of the fast path's read stage (issue 13 req. 3), step by step, without
the fusion's compute: random 32-layer model with the Llama-3-8B KV geometry (8 kv heads x 128),
tiny hidden size; int8 LMDB store; 16 chunks of 512 tokens; CPU. Absolute times: this machine."""
import sys, tempfile, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from chunkcache.bench.ttft import _tokenizer
from chunkcache.bench.texts import passages
from chunkcache.engine import ChunkCache
from chunkcache.format import unpack_parts, verify_small_sections, has_layer_sums
from chunkcache.pipeline import entry_views, LoadPlan

torch.set_num_threads(1)
cfg = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=64, intermediate_size=64,
    num_hidden_layers=32, num_attention_heads=8, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=65536, tie_word_embeddings=False)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
tok = _tokenizer()
n_chunks = int(sys.argv[1]) if len(sys.argv) > 1 else 16
texts = passages(tok, n_chunks, 512)
root = tempfile.mkdtemp()
eng = ChunkCache(model=model, tokenizer=tok, store=f"{root}/s", codec="int8")
eng.precompute(texts, batch_size=8)
q = "Who wrote the passage about the river?"
N = 20
def timeit(name, fn):
    fn()
    t = time.perf_counter()
    for _ in range(N):
        out = fn()
    print(f"{name:28s} {(time.perf_counter()-t)/N*1e3:8.3f} ms")
    return out
cfgq, keys, ids, suffix = timeit("check_query (resolve..)", lambda: eng._check_query(texts, q, None, None))
timeit("resolve", lambda: eng.resolve(texts))
timeit("suffix_ids", lambda: eng._suffix_ids(q))
def views():
    with entry_views(eng.store, keys) as es:
        return [bytes(0) for _ in es]
timeit("entry_views", views)
with entry_views(eng.store, keys) as es:
    es = list(es)
    parsed = timeit("unpack_parts x16", lambda: [unpack_parts(e, verify=False) for e in es])
    timeit("verify_small_sections x16", lambda: [verify_small_sections(e, h) for e, (h, _) in zip(es, parsed)])
    timeit("check_entry x16", lambda: [eng._check_entry(keys[i], h, p["token_ids"], ids[i]) for i, (h, p) in enumerate(parsed)])
    offs = list(range(0, 512 * n_chunks, 512))
    timeit("LoadPlan.build", lambda: LoadPlan.build(eng.lm, parsed, offs, torch.device("cpu"), check_layers=[True]*len(parsed)))
import cProfile, pstats
with entry_views(eng.store, keys) as es:
    es = list(es)
    pr = cProfile.Profile(); pr.enable()
    for _ in range(N):
        parsed = [unpack_parts(e, verify=False) for e in es]
        [verify_small_sections(e, h) for e, (h, _) in zip(es, parsed)]
        [eng._check_entry(keys[i], h, p["token_ids"], ids[i]) for i, (h, p) in enumerate(parsed)]
        LoadPlan.build(eng.lm, parsed, offs, torch.device("cpu"), check_layers=[True]*len(parsed))
    pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
pr = cProfile.Profile(); pr.enable()
for _ in range(N):
    views()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(20)
