"""GPU benchmark of the kernels, each printed beside its torch baseline measured in the same run.

    selected_attention   n = 15% of N selected queries (Llama-3-8B heads: Hq 32, Hkv 8, D 128, bf16)
                         vs SDPA with the bool position mask (what the torch path does) and vs
                         SDPA flash without a mask over the same q/k/v (a floor: no masking cost)
    rerotate_scatter     one chunk-layer (8 kv heads, D 128) per codec, in GB/s of bytes read + written,
                         vs the torch reference (decode, rotate, copy as separate ops)

Needs CUDA and triton; it knows nothing about models. Run on the device machine:

    python -m chunkcache.kernels.bench_kernels                 # all
    python -m chunkcache.kernels.bench_kernels --sweep         # also try launch configs
"""

from __future__ import annotations

import argparse

import torch

from .reference import INT4_GROUP, rerotate_scatter_reference


def _bench(fn, reps: int = 50) -> float:
    """Median milliseconds per call (triton.testing.do_bench: warmup, L2 flush between calls)."""
    import triton.testing

    return triton.testing.do_bench(fn, rep=reps, return_mode="median")


def bench_selected_attention(n_keys: int, frac: float = 0.15, sweep: bool = False, seed: int = 0) -> None:
    from .selected_attention_triton import selected_attention

    hq, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(seed)
    n = int(frac * n_keys)
    q = torch.randn(hq, n, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(hkv, n_keys, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(hkv, n_keys, d, device="cuda", dtype=dtype, generator=gen)
    q_pos = torch.randperm(n_keys, device="cuda", generator=gen)[:n].sort().values
    scale = d**-0.5

    group = hq // hkv
    k_rep = k.repeat_interleave(group, 0)[None]  # SDPA gets pre-expanded GQA (not timed)
    v_rep = v.repeat_interleave(group, 0)[None]
    mask = torch.arange(n_keys, device="cuda")[None, :] <= q_pos[:, None]  # [n, N] bool

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def masked():
        return sdpa(q[None], k_rep, v_rep, attn_mask=mask, scale=scale)

    def flash_no_mask():
        return sdpa(q[None], k_rep, v_rep, scale=scale)

    def ours():
        return selected_attention(q, q_pos, k, v, scale=scale)

    err = (ours().float() - masked()[0].float()).abs().max().item()
    t_ours, t_mask, t_flash = _bench(ours), _bench(masked), _bench(flash_no_mask)
    # useful work: only visible (query, key) pairs, 4 flops per pair per dim (QK^T and PV)
    pairs = float((q_pos + 1).sum()) * hq
    tflops = 4 * pairs * d / (t_ours * 1e-3) / 1e12
    print(
        f"selected_attention N={n_keys:6d} n={n:5d}: triton {t_ours:7.3f} ms ({tflops:5.1f} TFLOP/s useful) | "
        f"SDPA bool mask {t_mask:7.3f} ms ({t_mask / t_ours:4.1f}x) | SDPA flash no mask {t_flash:7.3f} ms "
        f"({t_flash / t_ours:4.2f}x) | max |err| vs SDPA {err:.3g}"
    )
    if sweep:
        for cfg in [
            (64, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (128, 64, 4, 3),
            (64, 32, 4, 2),
            (128, 32, 8, 4),
        ]:
            try:
                t = _bench(lambda cfg=cfg: selected_attention(q, q_pos, k, v, scale=scale, config=cfg))
                print(f"    config BLOCK_M,BLOCK_N,warps,stages={cfg}: {t:7.3f} ms")
            except Exception as exc:  # an out-of-resources config is a data point, not a failure
                print(f"    config {cfg}: failed ({type(exc).__name__}: {str(exc)[:80]})")


def _chunk_parts(codec: str, h: int, t: int, d: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    dev = "cuda"
    if codec == "raw":
        return {"kv": torch.randn(2, h, t, d, device=dev, dtype=dtype)}
    if codec == "int8":
        q8 = lambda: torch.randint(-127, 128, (h, t, d), device=dev, dtype=torch.int8)  # noqa: E731
        return {
            "k_q": q8(),
            "v_q": q8(),
            "k_scale": torch.rand(h, d, device=dev).half(),
            "v_scale": torch.rand(h, t, device=dev).half(),
        }
    if codec == "int2":  # a real encode: its kept-row indices must be distinct
        from chunkcache.codec import CODECS

        parts = CODECS["int2"].encode(torch.randn(1, 2, h, t, d, device=dev))
        return {name: x[0].to(dev) for name, x in parts.items()}
    g = -(-t // INT4_GROUP)
    q4 = lambda: torch.randint(0, 256, (h, t, d // 2), device=dev, dtype=torch.uint8)  # noqa: E731
    return {
        "k_q": q4(),
        "v_q": q4(),
        "k_scale": torch.rand(h, g, d, device=dev).half(),
        "k_min": torch.randn(h, g, d, device=dev).half(),
        "v_scale": torch.rand(h, t, device=dev).half(),
        "v_min": torch.randn(h, t, device=dev).half(),
    }


def bench_rerotate_scatter(tokens: int = 512, n_slots: int = 8192, sweep: bool = False) -> None:
    from .rerotate_scatter_triton import rerotate_scatter

    h, d, dtype = 8, 128, torch.bfloat16
    ang = torch.rand(d // 2, device="cuda") * 6
    cos, sin = torch.cat((ang.cos(), ang.cos())), torch.cat((ang.sin(), ang.sin()))
    buf = torch.zeros(2, h, n_slots, d, device="cuda", dtype=dtype)  # [2, H, N, D], one layer
    for codec in ("raw", "int8", "int4", "int2"):
        parts = _chunk_parts(codec, h, tokens, d, dtype)
        moved = (
            sum(x.numel() * x.element_size() for x in parts.values())
            + 2 * h * tokens * d * buf.element_size()
        )
        t_ours = _bench(lambda: rerotate_scatter(codec, parts, cos, sin, buf[0], buf[1], 100))  # noqa: B023
        t_ref = _bench(lambda: rerotate_scatter_reference(codec, parts, cos, sin, buf[0], buf[1], 100))  # noqa: B023
        print(
            f"rerotate_scatter {codec:4s} T={tokens:5d}: triton {t_ours * 1e3:8.1f} us "
            f"({moved / t_ours / 1e6:6.0f} GB/s, {moved / 2**20:5.2f} MiB moved) | torch reference "
            f"{t_ref * 1e3:8.1f} us ({t_ref / t_ours:4.1f}x)"
        )
        for block_t in (4, 8, 16, 32, 64) if sweep else ():
            t = _bench(lambda: rerotate_scatter(codec, parts, cos, sin, buf[0], buf[1], 100, block_t=block_t))  # noqa: B023
            print(f"    block_t={block_t:3d}: {t * 1e3:8.1f} us ({moved / t / 1e6:6.0f} GB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time alternative launch configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for n_keys in (8192, 32768):
        bench_selected_attention(n_keys, sweep=args.sweep)
    for tokens in (512, 8192):
        bench_rerotate_scatter(tokens, n_slots=tokens + 200, sweep=args.sweep)


if __name__ == "__main__":
    main()
