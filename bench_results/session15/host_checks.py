"""Lead, session 15: host cost per entry of the read phase on this CPU (kv8b: the 8B model's KV
geometry, tiny weights; 16 int8 chunks of 512 tokens): header parse, views, entry checks with and
without the identity memo (raw=), LoadPlan.build. .venv/bin/python bench_results/session15/host_checks.py"""
import time, tempfile, torch, json, timeit
from chunkcache.bench import ttft as T
from chunkcache.bench.texts import passages, questions
from chunkcache import format as F, pipeline as P
T.SHAPES["kv8b"] = dict(vocab_size=49152, hidden_size=256, intermediate_size=256, num_hidden_layers=32,
                        num_attention_heads=8, num_key_value_heads=8, head_dim=128, rope_theta=500000.0)
lm = T.build_model("kv8b", torch.float32, "cpu")
tok = T._tokenizer()
texts = passages(tok, 16, tokens=512)
eng = T.speed_engine(lm.model, tok, tempfile.mkdtemp(), "int8", fast_path=True)
eng.precompute(texts, batch_size=4)
keys, ids = eng.resolve(texts)
keys, infos = eng._prompt_keys(keys, ids)
def us(f, n=200):
    return round(timeit.timeit(f, number=n) / n * 1e6, 1)
with eng.store.views(keys) as views:
    e = views[0]
    mv = memoryview(e).cast("B")
    h = F.read_header(mv)
    print("header json bytes", len(json.dumps(h)), "sections", list(h["sections"]))
    print("read_header us", us(lambda: F.read_header(mv)))
    print("unpack_parts us", us(lambda: F.unpack_parts(e, verify=False)))
    parsed = [F.unpack_parts(x, verify=False) for x in views]
    hh, parts = parsed[0]
    print("verify_small us", us(lambda: F.verify_small_sections(e, hh)))
    print("check_entry us", us(lambda: eng._check_entry(keys[0], hh, parts["token_ids"], ids[0], infos[0])))
    print("check_entry raw us", us(lambda: eng._check_entry(keys[0], hh, parts["token_ids"], ids[0], infos[0], e)))
    from chunkcache.keys import KeyInputs
    print("KeyInputs.from_dict us", us(lambda: KeyInputs.from_dict(hh["key"])))
    inp = KeyInputs.from_dict(hh["key"])
    print("inputs.key us", us(lambda: inp.key(parts["token_ids"])))
    print("diff_key_info us", us(lambda: F.diff_key_info(hh["key"], infos[0])))
    st = P.Staging(torch.device("cpu"))
    offs = [10 + 512 * i for i in range(16)]
    print("LoadPlan.build 16 us", us(lambda: P.LoadPlan.build(lm, parsed, offs, torch.device("cpu")), 50))
    import cProfile, pstats
    cProfile.run("for _ in range(50): P.LoadPlan.build(lm, parsed, offs, torch.device('cpu'))", "/tmp/lp.prof")
    pstats.Stats("/tmp/lp.prof").sort_stats("tottime").print_stats(15)
    cProfile.run("for _ in range(200): eng._check_entry(keys[0], hh, parts['token_ids'], ids[0], infos[0])", "/tmp/ce.prof")
    pstats.Stats("/tmp/ce.prof").sort_stats("tottime").print_stats(12)
    cProfile.run("for _ in range(200): F.unpack_parts(e, verify=False)", "/tmp/up.prof")
    pstats.Stats("/tmp/up.prof").sort_stats("tottime").print_stats(12)
    cProfile.run("for _ in range(50): P.LoadPlan.build(lm, parsed, offs, torch.device('cpu'), check_layers=[True]*16)", "/tmp/lp2.prof")
    pstats.Stats("/tmp/lp2.prof").sort_stats("cumulative").print_stats(25)
