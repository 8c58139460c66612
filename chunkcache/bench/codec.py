"""Codec benchmark: the same SmolLM2 chunk caches through each chunkcache codec and LMCache's CacheGen.

Per question of ``musique_dev.json`` (k passages), the passages are precomputed once (lossless);
then every codec encodes and decodes those same caches, and fusion runs on the decoded caches:

  bytes/token   the codec's bytes over every chunk (every part: scales, zero points, kept tokens),
                beside bf16's 2 * layers * 2 * kv_heads * head_dim
  enc, dec GB/s bf16-equivalent bytes per second of encode and of decode (CPU, torch; CacheGen:
                LMCache's numba arithmetic coder)
  KL            KL(full prefill || fused) at the answer start and per answer token (teacher-forced
                along the full prefill's greedy answer), at ``--policy``/``--ratio``; the naive-reuse
                gap (ratio 0, lossless) is the yardstick: "% of gap" = (KL - KL lossless) / KL naive

Fusion on CPU decodes entries before it fuses, so fusing the decoded caches as lossless entries
gives exactly the KL a stored entry of that codec gives. CacheGen runs through LMCache 0.5.6's own
``naive_serde`` (``CacheGenSerializer`` / ``CacheGenDeserializer``, which call
``v1/platform/torch_ops/cachegen_kernels.py`` on CPU), with the layer bins LMCache uses for models
of 10 or more layers (keys 32 bins in layers 0-9, 16 after; values 32 bins in layers 0-1, 16 after).
LMCache is never a dependency of chunkcache: install it for this benchmark only, e.g.
``pip download lmcache==0.5.6 --no-deps`` and unpack it on ``PYTHONPATH``, with numba and what its
modules import. Its serde pickles its output (``to_bytes``), which chunkcache never reads back from
storage; the benchmark counts both the pickled bytes and the payload (bytestreams, CDFs, maxima).

What it does not know: how fusion works; it calls the engine.

    chunkcache bench codec --questions 3 --out bench_results/codec.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from chunkcache.bench import standalone
from chunkcache.bench.quality import DEFAULT_DATA, full_reference, kl, teacher_forced

LMCACHE_HINT = (
    "pip download lmcache==0.5.6 --no-deps; unzip the wheel onto PYTHONPATH; pip install numba "
    "cachetools sortedcontainers prometheus_client aiohttp aiofile msgspec pyzmq cryptography"
)


class CacheGen:
    """LMCache's CacheGen serde on CPU for one model shape (layers, kv heads, head_dim)."""

    name = "cachegen"

    def __init__(self, layers: int, heads: int, head_dim: int, max_tokens: int = 4096) -> None:
        try:
            from lmcache.storage_backend.serde.cachegen_basics import QuantizationSpec
            from lmcache.v1.storage_backend.naive_serde import cachegen_decoder as dec
            from lmcache.v1.storage_backend.naive_serde import cachegen_encoder as enc
            from lmcache.v1.storage_backend.naive_serde.cachegen_basics import CacheGenConfig
        except ImportError as e:
            raise RuntimeError(f"LMCache's CacheGen serde cannot be imported ({e}); {LMCACHE_HINT}") from e
        # LMCache's own choice for a model of >= 10 layers (CacheGenConfig.from_model_name); built
        # here because from_model_name needs the model on the Hugging Face hub.
        split_k, split_v = min(10, layers), min(2, layers)
        cfg = CacheGenConfig(
            nlayers=layers,
            kspecs=[QuantizationSpec(0, split_k, 32), QuantizationSpec(split_k, layers, 16)],
            vspecs=[QuantizationSpec(0, split_v, 32), QuantizationSpec(split_v, layers, 16)],
        )
        self.ser = object.__new__(enc.CacheGenSerializer)  # its __init__ only derives these fields
        self.ser.cachegen_config, self.ser.chunk_size = cfg, max_tokens
        self.ser.key_bins, self.ser.value_bins = self.ser.make_key_bins(cfg), self.ser.make_value_bins(cfg)
        self.des = object.__new__(dec.CacheGenDeserializer)
        self.des.cachegen_config, self.des.chunk_size, self.des.output_buffer = cfg, max_tokens, None
        self.des.key_bins, self.des.value_bins = self.ser.key_bins, self.ser.value_bins
        self.heads, self.head_dim = heads, head_dim
        self._bytes_type = enc.BytesBufferMemoryObj

    def encode(self, kv: torch.Tensor) -> bytes:  # kv: [L, 2, H, T, D]
        L, _, H, T, D = kv.shape
        self.ser.kv_shape = (L, 2, T, H, D)
        self.des.dtype = kv.dtype
        lt = kv.permute(1, 0, 3, 2, 4).reshape(2, L, T, H * D).contiguous()  # KV_2LTD

        class _Obj:  # the two attributes serialize() reads
            tensor = lt

            @staticmethod
            def parent():
                return None

        return bytes(self.ser.serialize(_Obj()).byte_array)

    def payload_nbytes(self, blob: bytes) -> int:
        """Bytes of the coded data itself (bytestreams, lengths, CDFs, maxima), without pickling."""
        from lmcache.storage_backend.serde.cachegen_basics import CacheGenGPUEncoderOutput

        out = CacheGenGPUEncoderOutput.from_bytes(blob)
        n = sum(t.numel() * t.element_size() for t in (out.cdf, out.max_tensors_key, out.max_tensors_value))
        for c in out.data_chunks:
            n += c.bytestream.numel() * c.bytestream.element_size()
            n += c.bytestream_lengths.numel() * c.bytestream_lengths.element_size()
        return n

    def decode(self, blob: bytes, shape: tuple[int, ...]) -> torch.Tensor:  # -> [L, 2, H, T, D]
        L, _, H, T, D = shape
        obj = self.des.deserialize(self._bytes_type(blob))
        return obj.tensor.view(2, L, T, H, D).permute(1, 0, 3, 2, 4).contiguous()


def _bf16_bytes(kv: torch.Tensor) -> int:
    return kv.numel() * 2


@torch.no_grad()
def run(engine, codecs: list[str], data_path=DEFAULT_DATA, questions: int = 3, start: int = 0,
        passages: int = 5, policy: str = "qfast", ratio: float = 0.15, answer_tokens: int = 16,
        log=print, partial: str | Path | None = None) -> dict:  # fmt: skip
    """Returns ``{"rows": [per question and codec], "summary": {codec: {...}}}``."""
    from chunkcache.codec import get_codec
    from chunkcache.format import pack_chunk
    from chunkcache.layout import ChunkKV
    from chunkcache.store import MemoryStore

    spec = None
    data = json.loads(Path(data_path).read_text())[start : start + questions]
    rows, t0 = [], time.perf_counter()
    lossless_store = engine.store
    cachegen = None
    for qi, ex in enumerate(data):
        texts = [f"{c['title']}\n{c['text']}" for c in ex["ctxs"][:passages]]
        question = ex["question"]
        engine.store = lossless_store
        engine.precompute(texts)
        chunks = engine.chunks(texts)
        ids = engine.prompt_ids(texts, question).to(engine.lm.device)
        full_first, full_forced, forced_ans, _ = full_reference(engine, ids, answer_tokens, 0)

        def fused_kl(r, pol, texts=texts, question=question, ref=(full_first, full_forced, forced_ans)):
            f = engine.fuse(texts, question, recompute_ratio=r, policy=pol)
            first, forced, ans = ref
            return float(kl(first, f.logits)), float(kl(forced, teacher_forced(engine, f, ans)).mean())

        naive = fused_kl(0.0, "cacheblend")
        for name in codecs:
            nbytes = enc_s = dec_s = 0.0
            payload = None
            decoded = []
            for ch in chunks:
                kv = ch.kv
                if spec is None:
                    spec = tuple(kv.shape[i] for i in (0, 2, 4))
                if name == "cachegen":
                    if cachegen is None:
                        cachegen = CacheGen(*spec)
                    t = time.perf_counter()
                    blob = cachegen.encode(kv)
                    enc_s += time.perf_counter() - t
                    t = time.perf_counter()
                    out = cachegen.decode(blob, tuple(kv.shape))
                    dec_s += time.perf_counter() - t
                    nbytes += len(blob)
                    payload = (payload or 0) + cachegen.payload_nbytes(blob)
                else:
                    codec = get_codec(name)
                    t = time.perf_counter()
                    parts = codec.encode(kv)
                    enc_s += time.perf_counter() - t
                    t = time.perf_counter()
                    out = codec.decode(parts, kv.dtype)
                    dec_s += time.perf_counter() - t
                    nbytes += sum(p.numel() * p.element_size() for p in parts.values())
                decoded.append(
                    ChunkKV(
                        token_ids=ch.token_ids,
                        kv=out.to(kv.dtype).contiguous(),
                        base_pos=ch.base_pos,
                        meta=dict(ch.meta),
                    )
                )
            store = MemoryStore()  # the decoded caches as lossless entries, same keys
            for ch in decoded:
                store.put(
                    engine.key_for_ids(ch.token_ids.tolist()), pack_chunk(ch, engine.codec, engine.key_info())
                )
            engine.store = store
            kf, ka = fused_kl(ratio, policy)
            bf16 = sum(_bf16_bytes(c.kv) for c in chunks)
            tokens = sum(c.kv.shape[3] for c in chunks)
            rows.append({
                "q": start + qi, "codec": name, "tokens": tokens, "bytes": nbytes, "payload_bytes": payload,
                "bf16_bytes": bf16, "enc_s": enc_s, "dec_s": dec_s, "kl_first": kf, "kl_answer": ka,
                "naive_kl_first": naive[0], "naive_kl_answer": naive[1],
            })  # fmt: skip
            engine.store = lossless_store
        if partial:
            Path(partial).write_text(json.dumps({"rows": rows}))
        if log:
            log(f"[{qi + 1}/{len(data)}] {time.perf_counter() - t0:.0f}s", flush=True)
            log(table(summarize(rows)), flush=True)
    return {"rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    out = {}
    names = list(dict.fromkeys(r["codec"] for r in rows))
    ref = [r for r in rows if r["codec"] == "raw"]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    for name in names:
        rs = [r for r in rows if r["codec"] == name]
        s = {
            "n": len(rs),
            "bytes_per_token": sum(r["bytes"] for r in rs) / sum(r["tokens"] for r in rs),
            "x_smaller_than_bf16": sum(r["bf16_bytes"] for r in rs) / sum(r["bytes"] for r in rs),
            "enc_gbps": sum(r["bf16_bytes"] for r in rs) / sum(r["enc_s"] for r in rs) / 1e9,
            "dec_gbps": sum(r["bf16_bytes"] for r in rs) / sum(r["dec_s"] for r in rs) / 1e9,
            "kl_first": mean(rs, "kl_first"),
            "kl_answer": mean(rs, "kl_answer"),
            "naive_kl_first": mean(rs, "naive_kl_first"),
            "naive_kl_answer": mean(rs, "naive_kl_answer"),
        }
        if rs[0]["payload_bytes"] is not None:
            s["payload_x_smaller"] = sum(r["bf16_bytes"] for r in rs) / sum(r["payload_bytes"] for r in rs)
        if len(ref) == len(rs):  # same questions
            for k in ("first", "answer"):
                s[f"gap_pct_{k}"] = 100 * (s[f"kl_{k}"] - mean(ref, f"kl_{k}")) / s[f"naive_kl_{k}"]
        out[name] = s
    return out


def table(summary: dict) -> str:
    lines = [
        f"{'codec':9s} {'n':>3s} {'B/token':>8s} {'x<bf16':>7s} {'enc GB/s':>9s} {'dec GB/s':>9s} "
        f"{'KL@start':>9s} {'%gap':>6s} {'KL/token':>9s} {'%gap':>6s}"
    ]
    for name, s in summary.items():
        x = f"{s['x_smaller_than_bf16']:.2f}"
        if "payload_x_smaller" in s:
            x += f" ({s['payload_x_smaller']:.2f} payload)"
        lines.append(
            f"{name:9s} {s['n']:3d} {s['bytes_per_token']:8.0f} {x:>7s} {s['enc_gbps']:9.3f} {s['dec_gbps']:9.3f} "
            f"{s['kl_first']:9.4f} {s.get('gap_pct_first', float('nan')):6.1f} {s['kl_answer']:9.4f} "
            f"{s.get('gap_pct_answer', float('nan')):6.1f}"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=str(DEFAULT_DATA), help="MuSiQue-style JSON (question, answers, ctxs)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--passages", type=int, default=5)
    p.add_argument(
        "--codecs",
        default="raw,int8,int4,int2,int2r,int2m,cachegen",
        help="comma list; raw is the lossless yardstick",
    )
    p.add_argument("--policy", default="qfast")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--out", default=None, help="write JSON results here (rewritten after every question)")


def run_cli(args: argparse.Namespace) -> int:
    from chunkcache.engine import ChunkCache

    codecs = [c for c in args.codecs.split(",") if c]
    engine = ChunkCache(model=args.model, dtype=args.dtype, device="cpu", codec="raw")
    res = run(engine, codecs, data_path=args.data, questions=args.questions, start=args.start,
              passages=args.passages, policy=args.policy, ratio=args.ratio, partial=args.out)  # fmt: skip
    print(table(res["summary"]))
    res["command"] = " ".join(["chunkcache", "bench", "codec"] + sys.argv[1:])
    res["settings"] = vars(args)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


main = standalone("chunkcache bench codec", __doc__, add_arguments, run_cli)


if __name__ == "__main__":
    sys.exit(main())
