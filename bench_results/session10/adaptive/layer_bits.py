"""Per-layer bit allocation (CacheGen gives shallow layers more bits), measured for fidelity on the
CPU: a simulation codec ``int2m_s4`` whose first --shallow layers are int4 and the rest int2m (each
layer encoded and decoded by that codec; the round-tripped KV is then stored raw for this
experiment, so its KL is the allocation's and its bytes are COMPUTED: int4's per layer for the
shallow ones, int2m's for the others). Registered in ``codec.CODECS`` for this process only, then
``chunkcache bench quality --codec int2m_s4 ...`` runs as usual.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python bench_results/session10/adaptive/layer_bits.py --shallow 4 -- \
        bench quality --device cpu --questions 10 --start 60 --policies qfast --ratios 0.15 --codec int2m_s4 --out ...
"""

from __future__ import annotations

import sys

import torch

from chunkcache import codec as C


def make(shallow: int) -> type:
    class ShallowInt4(C.RawCodec):
        name = "int2m_s4"

        def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
            C._check_kv(kv)
            lo, hi = C.get_codec("int4"), C.get_codec("int2m")
            s = min(shallow, kv.shape[0])
            parts = []
            if s:
                parts.append(lo.decode(lo.encode(kv[:s]), kv.dtype))
            if s < kv.shape[0]:
                parts.append(hi.decode(hi.encode(kv[s:]), kv.dtype))
            return {"kv": torch.cat(parts).to("cpu").contiguous()}

    return ShallowInt4


if __name__ == "__main__":
    i = sys.argv.index("--")
    shallow = int(sys.argv[sys.argv.index("--shallow") + 1])
    C.CODECS["int2m_s4"] = make(shallow)()
    from chunkcache.cli import main

    sys.exit(main(sys.argv[i + 1 :]))
