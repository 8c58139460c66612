"""The streaming reader's own throughput (CPU): 6 int8 entries of 32 layers x 8 heads x 512
tokens x 128 (203 MB) in an LMDB store behind a ThrottledStore, read by stream.LayerStream; the
best of 3. Argument 1: the stream module file (to compare versions), argument 2: the link's
bytes/s (1e12: the reader alone), argument 3 (optional): "arena" to land in a reused
``pipeline.Staging.landing`` arena (this version only).

    PYTHONPATH=. .venv/bin/python bench_results/session9/adaptive/stream_rate.py chunkcache/stream.py 1e12 arena
"""
import importlib.util
import sys
import tempfile

import torch

sys.path.insert(0, "tests")
from store_worker import entry  # noqa: E402

from chunkcache.pipeline import Staging  # noqa: E402
from chunkcache.store import LMDBStore  # noqa: E402
from chunkcache.store.throttled import ThrottledStore  # noqa: E402

mod = sys.argv[1]
spec = importlib.util.spec_from_file_location("s", mod)
S = importlib.util.module_from_spec(spec)
spec.loader.exec_module(S)
arena = len(sys.argv) > 3 and sys.argv[3] == "arena"
st = Staging(torch.device("cpu"))
d = tempfile.mkdtemp()
with LMDBStore(d + "/s") as lm:
    items = [entry(i, codec="int8", tokens=512, layers=32, heads=8, head_dim=128) for i in range(6)]
    lm.put_many(items)
    total = sum(len(v) for _, v in items)
    slow = ThrottledStore(lm, bytes_per_s=float(sys.argv[2]))
    ts = []
    for _ in range(4):
        kw = {"landing": st.landing} if arena else {}
        s = S.LayerStream(slow, [k for k, _ in items], **kw).start()
        s.wait(31)
        s.close()
        ts.append(s.t_last - s.t_start)
    print(f"{mod}{' (arena)' if arena else ''}: {total / 1e6:.0f} MB, link alone {total / float(sys.argv[2]) * 1e3:.0f} ms, "
          f"stream {min(ts[1:]) * 1e3:.0f} ms (best of 3 after one warm-up)")
