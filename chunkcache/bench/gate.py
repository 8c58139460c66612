"""Gate benchmark: the correctness gate's differences for exact and deliberately broken models.

For each dtype it loads the model, measures the gate (``chunkcache.gate.measure``: logits of
fusion at ratio 1 and re-rotated layer-0 keys, each against a full prefill) on the model as it is,
and on two broken copies whose rotary theta is off by each of ``--factors``:

- ``attention theta``: every attention layer applies a rotary of another theta than the model's
  rotary embedding (what chunkcache's layer code and re-rotation use), as a model with its own
  per-layer rotary would;
- ``rotary forward``: the rotary embedding computes cos/sin with another theta than its
  ``inv_freq`` buffer, which re-rotation by a delta uses.

It prints each difference beside the dtype's tolerance (``gate.TOLERANCE``): the exact model must
sit far below it, the broken ones far above.

    chunkcache bench gate --dtypes float32,bfloat16 --factors 1.01,1.1,2
"""

from __future__ import annotations

import argparse
import copy
import json

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model name, HF id or path")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated model dtypes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--factors", default="1.01,1.1,2", help="comma-separated: broken theta = factor x theta")
    p.add_argument("--out", default=None, help="write JSON results here")


def break_attention_theta(model: torch.nn.Module, factor: float) -> None:
    """Make every attention layer rotate q/k with ``theta * factor`` instead of the cos/sin the
    model's rotary embedding hands it (in place, through forward hooks)."""
    rot = model.model.rotary_emb
    inv = rot.inv_freq.double()
    d = 2 * inv.numel()
    broken = inv / factor ** (
        torch.arange(inv.numel(), device=inv.device) * 2.0 / d
    )  # theta -> factor x theta
    positions: dict[str, torch.Tensor] = {}

    def grab(_mod, args, kwargs):
        positions["p"] = kwargs.get("position_ids", args[1] if len(args) > 1 else None)

    def swap(_mod, args, kwargs):
        cos, _ = kwargs["position_embeddings"]
        angles = positions["p"].to(torch.float64)[..., None] * broken.to(cos.device)  # [B, N, D/2]
        emb = torch.cat([angles, angles], dim=-1)
        kwargs["position_embeddings"] = (emb.cos().to(cos.dtype), emb.sin().to(cos.dtype))
        return args, kwargs

    rot.register_forward_pre_hook(grab, with_kwargs=True)
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(swap, with_kwargs=True)


def break_rotary_forward(model: torch.nn.Module, factor: float) -> None:
    """Make the rotary embedding's forward use ``theta * factor`` while its ``inv_freq`` buffer
    keeps ``theta`` (in place)."""
    rot = model.model.rotary_emb
    inv = rot.inv_freq.clone()
    d = 2 * inv.numel()
    broken = inv / factor ** (torch.arange(inv.numel(), device=inv.device) * 2.0 / d)
    plain = type(rot).forward

    def forward(x, position_ids):
        saved = rot.inv_freq.clone()
        rot.inv_freq.copy_(broken)
        try:
            return plain(rot, x, position_ids)
        finally:
            rot.inv_freq.copy_(saved)

    rot.forward = forward


def run_cli(args: argparse.Namespace) -> int:
    from chunkcache import checks
    from chunkcache.engine import ChunkCache
    from chunkcache.gate import LOGITS_TOLERANCE, TOLERANCE, measure
    from chunkcache.model import load_model

    device = checks.device(args.device)
    factors = [float(f) for f in args.factors.split(",")]
    variants = [("exact", None, 1.0)] + [
        (f"{kind} x{f:g}", brk, f)
        for f in factors
        for kind, brk in (
            ("attention theta", break_attention_theta),
            ("rotary forward", break_rotary_forward),
        )
    ]
    rows = []
    print(f"model {args.model}, device {device.type}; relative differences from a full prefill\n")
    print(f"{'dtype':<10}{'variant':<24}{'logits diff':>13}{'keys diff':>12}{'tolerances':>16}  verdict")
    for name in args.dtypes.split(","):
        dtype = checks.dtype(name)
        base = load_model(args.model, dtype=dtype, device=device)
        for variant, brk, factor in variants:
            model = base.model
            if brk is not None:  # a copy of the model, broken
                model = copy.deepcopy(base.model)
                brk(model, factor)
            eng = ChunkCache(model=model, tokenizer=base.tokenizer, store=None)
            r = measure(eng)
            verdict = "pass" if r.passed else "REFUSED"
            print(f"{name:<10}{variant:<24}{r.logits_diff:>13.2e}{r.keys_diff:>12.2e}{f'{LOGITS_TOLERANCE[dtype]:g} / {TOLERANCE[dtype]:g}':>16}"
                  f"  {verdict} ({r.seconds:.2f}s, {r.prompt_tokens} tokens)", flush=True)  # fmt: skip
            rows.append({"dtype": name, "variant": variant, "logits_diff": r.logits_diff, "keys_diff": r.keys_diff,
                         "tolerance": TOLERANCE[dtype], "logits_tolerance": LOGITS_TOLERANCE[dtype], "passed": r.passed, "seconds": r.seconds})  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "chunkcache bench gate " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                if k in ("model", "dtypes", "device", "factors") and v is not None), "rows": rows}, f, indent=2)  # fmt: skip
    return 0
