"""The streaming reader's own throughput (CPU): 6 int8 entries of 32 layers x 8 heads x 512
tokens x 128 (203 MB) in an LMDB store behind a ThrottledStore, read by stream.LayerStream; the
best of 3. Argument 1: the stream module file (to compare two versions), argument 2: the link's
bytes/s (1e12: the reader alone).

    PYTHONPATH=. .venv/bin/python bench_results/session8/adaptive/stream_rate.py chunkcache/stream.py 1e12
"""
import sys, time, tempfile, importlib
sys.path.insert(0, "tests")
from store_worker import entry
from chunkcache.store import LMDBStore
from chunkcache.store.throttled import ThrottledStore
mod = sys.argv[1]
spec = importlib.util.spec_from_file_location("s", mod); S = importlib.util.module_from_spec(spec); spec.loader.exec_module(S)
d = tempfile.mkdtemp()
with LMDBStore(d + "/s") as lm:
    items = [entry(i, codec="int8", tokens=512, layers=32, heads=8, head_dim=128) for i in range(6)]
    lm.put_many(items)
    total = sum(len(v) for _, v in items)
    slow = ThrottledStore(lm, bytes_per_s=float(sys.argv[2]))
    ts = []
    for _ in range(3):
        st = S.LayerStream(slow, [k for k, _ in items]).start(); st.wait(31); st.close()
        ts.append(st.t_last - st.t_start)
    print(mod, f"{total/1e6:.0f} MB, link alone {total/float(sys.argv[2])*1e3:.0f} ms, stream {min(ts)*1e3:.0f} ms")
