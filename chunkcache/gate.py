"""Correctness gate: before an engine fuses for a model, check that fusion is exact for it.

The first time an engine meets a model (by weight fingerprint, dtype and device kind), a short
two-passage prompt is run twice: as a plain full prefill through the model's own ``forward``, and
through chunkcache (chunks encoded behind the sink, assembled with re-rotated keys, fused at
ratio 1, where every chunk token is recomputed by chunkcache's own layer code). Two differences
are measured, each relative to the reference's largest magnitude:

- ``logits``: the next-token logits of fusion at ratio 1 against the full prefill. It catches a
  model whose layers do something chunkcache's re-implementation does not (a rotary applied
  inside attention with another theta, a norm or activation it does not know);
- ``keys``: the re-rotated layer-0 keys of the assembled cache against the full prefill's layer-0
  keys (a layer-0 key depends only on its token and position, so re-rotation must reproduce it).
  It catches a rotary whose re-rotation by a position delta is not exact.

Either beyond the dtype's tolerance (``TOLERANCE`` for the keys, ``LOGITS_TOLERANCE`` for the
logits) refuses fusion with ``FusionGateError``,
naming the model and the difference. The result is stored as a small JSON record beside the
entries (``Store.put_record``; a memory store keeps it in memory), so it runs once per model and
store. What it does not know: selection policies, codecs (the gate's caches never touch the
store), the GPU fast path (it checks the maths on the model's own device, eagerly).

    result = gate.check(engine)     # run now, record, raise FusionGateError on a mismatch
    gate.ensure(engine)             # use the stored result if there is one (called by engine.fuse)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from chunkcache.errors import FusionGateError, StoreError

__all__ = [
    "GATE_VERSION",
    "GateResult",
    "LOGITS_TOLERANCE",
    "TOLERANCE",
    "check",
    "ensure",
    "measure",
    "record_name",
]

GATE_VERSION = 1
"""Part of the record name: bump when what the gate checks changes, so models are checked again."""

PASSAGES = (
    "The lighthouse on the northern cape was built in 1874 from granite quarried nearby.",
    "Its keeper, Ada Lund, kept a logbook of every ship that passed during the great storm.",
)
QUESTION = "Who kept a logbook during the storm?"

TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-3,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}
"""Largest allowed relative difference (``max |a - b| / max |b|``) of the re-rotated layer-0 keys
per model dtype. A layer-0 key is one projection and one rotation away from its token, so only a
rounding or two separate the two sides: measured (BENCHMARKS.md, "correctness gate") 1.2e-6 in
fp32 and 6.4e-3 in bf16 for an exact SmolLM2, against 0.255 for a rotary theta off by 2x."""

LOGITS_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 0.2,
}
"""Largest allowed relative difference of the next-token logits at ratio 1, per model dtype. In
fp32 both sides agree to 1e-6. In 16-bit dtypes the two sides round differently in every layer
(SDPA with an explicit mask against causal SDPA) and that drift grows with depth: 1.2-1.8e-2 for
an exact SmolLM2 in bf16 on the CPU, 0.064 for a random-weight Llama-3-8B shape in bf16 on an H200.
So in 16-bit dtypes this check only catches layers that do something else entirely (differences
of order 1); the keys check is the one that catches a rotary that re-rotates wrongly."""


@dataclass(frozen=True)
class GateResult:
    """One gate run (what is recorded in the store)."""

    model: str
    """The model's name as the engine loaded it."""
    fingerprint: str
    """Its weight fingerprint."""
    dtype: str
    """Model dtype, e.g. ``float32``."""
    device: str
    """Device kind the check ran on (``cpu``, ``cuda``)."""
    logits_diff: float
    """``max |fused - full| / max |full|`` of the next-token logits at ratio 1."""
    keys_diff: float
    """``max |rerotated - full| / max |full|`` of the chunk tokens' layer-0 keys."""
    tolerance: float
    """The dtype's tolerance for ``keys_diff`` (``TOLERANCE``)."""
    prompt_tokens: int
    """Length of the gate's prompt."""
    seconds: float
    """Wall time of the check."""
    version: int = GATE_VERSION
    logits_tolerance: float = 0.0
    """The dtype's tolerance for ``logits_diff`` (``LOGITS_TOLERANCE``)."""

    @property
    def passed(self) -> bool:
        return self.logits_diff <= self.logits_tolerance and self.keys_diff <= self.tolerance

    def error(self) -> FusionGateError:
        what = []
        if self.logits_diff > self.logits_tolerance:
            what.append(
                f"logits at ratio 1 differ from a full prefill by {self.logits_diff:.3g} "
                f"(tolerance {self.logits_tolerance:g})"
            )
        if self.keys_diff > self.tolerance:
            what.append(
                f"re-rotated layer-0 keys differ from the full prefill's by {self.keys_diff:.3g} "
                f"(tolerance {self.tolerance:g})"
            )
        return FusionGateError(
            f"fusion is not exact for model {self.model!r} ({self.dtype}, {self.device}, fingerprint "
            f"{self.fingerprint[:12]}): {' and '.join(what)} (relative to the reference's largest "
            "value). Its layers or rotary differ from what chunkcache re-implements, so fused caches "
            "would be wrong; fusion is refused"
        )


def _tolerances(dtype: torch.dtype) -> dict[str, float]:
    """``tolerance`` (keys) and ``logits_tolerance`` of a model dtype (bf16's for others)."""
    return {
        "tolerance": TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16]),
        "logits_tolerance": LOGITS_TOLERANCE.get(dtype, LOGITS_TOLERANCE[torch.bfloat16]),
    }


def record_name(engine) -> str:
    """The store record of this engine's model: ``gate/v{version}/{fingerprint}/{dtype}/{device}``."""
    dtype = str(engine.lm.dtype).removeprefix("torch.")
    return f"gate/v{GATE_VERSION}/{engine.lm.fingerprint}/{dtype}/{engine.lm.device.type}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@torch.no_grad()
def measure(engine) -> GateResult:
    """Run the gate's prompt both ways on ``engine``'s model; nothing is stored."""
    from chunkcache.fuse import FuseConfig, assemble, fuse_kv
    from chunkcache.model import cache_kwarg
    from chunkcache.precompute import encode_chunks

    t0 = time.perf_counter()
    lm, template = engine.lm, engine.template
    prefix_ids = engine._prefix_ids
    with (
        engine._tok_lock
    ):  # the engine's tokenizer calls are serialised (fast tokenizers are not thread-safe)
        chunk_ids = [template.chunk_ids(p) for p in PASSAGES]
        suffix = template.suffix_ids(QUESTION)
        ids = template.build(chunk_ids, QUESTION).to(lm.device)  # [1, N]

    from transformers import DynamicCache

    cache = DynamicCache()
    out = lm.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(lm.model): cache})
    full_logits = out.logits[0, -1].float()
    full_k0 = cache.layers[0].keys[0] if hasattr(cache, "layers") else cache.key_cache[0][0]  # [H, N, D]

    prefix_kv = engine.prefix_kv()  # the engine's own (computed once, reused by every fusion)
    sink = engine.variants()[0].sink_ids  # (None: each chunk its own context; any sink serves here)
    chunks = encode_chunks(lm, chunk_ids, template.prefix_ids() if sink is None else sink)
    buf, chunk_of, _ = assemble(lm, prefix_kv, chunks, len(suffix))
    in_chunks = chunk_of >= 0
    keys_diff = _rel(buf[0, 0][:, in_chunks], full_k0[:, in_chunks])
    fused = fuse_kv(lm, prefix_kv, chunks, prefix_ids, suffix, FuseConfig(recompute_ratio=1.0))
    logits_diff = _rel(fused.logits, full_logits)
    return GateResult(
        model=lm.name,
        fingerprint=lm.fingerprint,
        dtype=str(lm.dtype).removeprefix("torch."),
        device=lm.device.type,
        logits_diff=logits_diff,
        keys_diff=keys_diff,
        prompt_tokens=int(ids.shape[1]),
        seconds=time.perf_counter() - t0,
        **_tolerances(lm.dtype),
    )


def check(engine) -> GateResult:
    """Run the gate now and record the result in the engine's store (replacing an older one);
    raise FusionGateError if fusion is not exact for the model."""
    result = measure(engine)
    try:
        engine.store.put_record(record_name(engine), asdict(result))
    except StoreError as e:  # a full disk or a read-only store must not stop serving
        warnings.warn(f"chunkcache: the correctness gate's result could not be recorded in the store "
                      f"({e}); it is kept for this engine only", RuntimeWarning, stacklevel=2)  # fmt: skip
    if not result.passed:
        raise result.error()
    return result


def ensure(engine) -> GateResult:
    """The recorded gate result of the engine's model, or a fresh ``check`` if there is none.
    A recorded failure raises FusionGateError again without rerunning (``check`` reruns it)."""
    record = engine.store.get_record(record_name(engine))
    if record is not None:
        try:
            result = GateResult(**record)
        except TypeError:  # a record of another shape: check again
            return check(engine)
        result = replace(result, **_tolerances(engine.lm.dtype))  # today's tolerances
        if not result.passed:
            raise result.error()
        return result
    return check(engine)
