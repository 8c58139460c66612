"""CUDA graphs for fusion's layer loops, so a fused prefill is not bound by kernel launches.

A fusion runs the probe (the question over the stale cache) and the recompute (the selected
tokens plus the question) through every layer: 25-30 small ops a layer, about 2 ms of host time
per layer on the H100 host measured here, for a GPU that needs far less (BENCHMARKS.md, section 3).
``FusionGraphs`` records those loops once per shape and replays them:

    graphs = FusionGraphs()                 # one per device and model; Staging holds one
    buf = graphs.kv_buffer(lm, n)           # [L, 2, H, N_b, D] persistent, N_b = n rounded up
    out = graphs.run(key, body, inputs, reads=(lm.model, buf))
                                            # eager the first ``min_uses - 1`` times a key is
                                            # seen, then captured, then replayed

Shapes are padded to buckets so that queries of similar size share a graph: the KV length to a
multiple of ``n_bucket`` (keys past the prompt are invisible under the position-causal mask, and
the padding stays zero or holds an earlier prompt's finite values: 0 attention weight either
way), and the recomputed rows to a multiple of ``row_bucket`` (the fusion then recomputes a few
more tokens than the ratio asks, never fewer). A graph reads the buffer it was captured with, so
the buffer is persistent: a fusion that uses it returns a copy of the KV, and one
``FusionGraphs`` serves one fusion at a time (``pipeline.StagingPool`` hands each fusion a
``Staging`` of its own, graphs included).

Threads: captures are serialised process-wide (``_CAPTURE``): concurrent captures would share
the capture stream and torch's generator-state registration (16 threads capturing at once killed
the process in a CUDAGraph destructor, issue 13). They are recorded on a stream of the process's
own (``capture_stream``), not on one of torch's pooled streams, which another thread's work may
share. A graph keeps the objects it reads (``reads``: the
model, the KV buffer) alive and is keyed by them, so no new object at a freed address can ever
replay a graph recorded over an old one. A thread captures only after it ran some body eagerly
itself (per-thread cuBLAS handles are created on first use, which a capture forbids), and a key is
captured only after it ran eagerly ``min_uses - 1`` times (by any thread: its Triton kernels are
compiled by then). Before session 8 every thread ran every key eagerly once: under 8 client
threads that was most of a short load test.

What it knows: CUDA graph capture and replay, static inputs. What it does not know: what the
bodies compute (``fuse``).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable

import torch

from chunkcache.model import LoadedModel

__all__ = ["FusionGraphs"]

_CAPTURE = threading.Lock()
"""Held while any graph is recorded in this process."""

_CAPTURE_STREAMS: dict[int, torch.cuda.Stream | None] = {}
"""Per device index, the stream graphs are recorded on (``capture_stream``; under ``_CAPTURE``)."""


def capture_stream(index: int) -> torch.cuda.Stream | None:
    """The stream this process records its graphs on, on device ``index``: one of its own
    (``hostmap.own_stream``), never one of torch's pooled streams, so no other thread's work (a
    staging's copies, a miss's encoding, each on a pooled ``torch.cuda.Stream``) can land on the
    stream while a graph is recorded there (torch.cuda.graph's default capture stream is pooled:
    in GPU calls 2 and 3 of session 16 a capture was invalidated under concurrent fusions). None
    where the CUDA runtime cannot make one: torch's default then. Call under ``_CAPTURE``."""
    if index not in _CAPTURE_STREAMS:
        from chunkcache.hostmap import own_stream

        _CAPTURE_STREAMS[index] = own_stream(torch.device("cuda", index))
    return _CAPTURE_STREAMS[index]


class FusionGraphs:
    def __init__(
        self,
        n_bucket: int = 1024,
        row_bucket: int = 64,
        min_uses: int = 2,
        layer_group: int = 8,
        probe_bucket: int = 16,
    ) -> None:
        self.n_bucket, self.row_bucket, self.min_uses = n_bucket, row_bucket, min_uses
        self.probe_bucket = probe_bucket
        """The probe's question rows are padded to a multiple of this (phantom rows that see no
        key and write only to spare slots past the prompt), so questions of 7-30 tokens share two
        graphs instead of needing one each (a served workload's questions vary in length)."""
        self.layer_group = layer_group
        """Layers per recompute graph: each group waits only for its own layers to be loaded."""
        self.buffers: dict[tuple, tuple[torch.nn.Module, torch.Tensor]] = {}  # the model kept alive
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], object, tuple]] = {}
        self.seen: Counter = Counter()
        self.warmed: set[int] = set()  # threads that ran a body eagerly
        self.pool = None
        self.captures = 0  # how many graphs were recorded (diagnostics, tests)
        self.replays = 0
        self.eager = 0  # bodies run eagerly because their shape was not recorded yet

    def clear(self) -> None:
        """Drop every graph (and the objects it holds alive); the buffers stay. The next capture
        gets a new memory pool: the allocator releases a pool once its last graph is gone, and a
        capture into the released pool's handle fails an internal assert (``use_count > 0``,
        CUDACachingAllocator; H200, torch 2.11, session 7)."""
        self.graphs.clear()
        self.seen.clear()
        self.warmed.clear()
        self.pool = None

    def padded_length(self, n: int) -> int:
        """The buffer length for prompts of ``n`` tokens: ``n`` plus room for the probe's phantom
        rows, rounded up to the bucket."""
        return math.ceil((n + self.probe_bucket) / self.n_bucket) * self.n_bucket

    def padded_probe(self, n_q: int, spare: int) -> int:
        """Probe rows for a question of ``n_q`` tokens: rounded up to ``probe_bucket``, using at
        most ``spare`` slots past the prompt."""
        return min(n_q + spare, math.ceil(n_q / self.probe_bucket) * self.probe_bucket)

    def padded_rows(self, rows: int, limit: int) -> int:
        """``rows`` rounded up to the bucket, but at most ``limit``."""
        return min(limit, math.ceil(rows / self.row_bucket) * self.row_bucket)

    def kv_buffer(self, lm: LoadedModel, n: int) -> torch.Tensor:
        """The persistent ``[L, 2, H, N_b, D]`` buffer for prompts of ``n`` tokens (zeroed once)."""
        spec = lm.spec
        n_b = self.padded_length(n)
        key = (id(lm.model), spec.num_layers, spec.kv_heads, spec.head_dim, lm.dtype, str(lm.device), n_b)
        if key not in self.buffers:  # keyed by id(model), which the entry keeps alive
            self.buffers[key] = (lm.model, torch.zeros(
                spec.num_layers, 2, spec.kv_heads, n_b, spec.head_dim, dtype=lm.dtype, device=lm.device
            ))  # fmt: skip
        return self.buffers[key][1]

    def run(
        self, key: tuple, body: Callable[..., object], inputs: dict[str, torch.Tensor], reads: tuple = ()
    ):
        """``body(**inputs)``: eager until ``key`` was seen ``min_uses`` times, then recorded into a
        CUDA graph whose static inputs are copies of ``inputs`` and replayed from then on. The
        returned tensors of a replay are the graph's own: read them before the next ``run``.
        ``reads``: the objects besides ``inputs`` that the body reads (model, buffers); they are part
        of the key and the graph holds them, so their ids cannot be reused while it exists."""
        key = (*key, *(id(o) for o in reads))
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] += 1
            me = threading.get_ident()
            if self.seen[key] < self.min_uses or me not in self.warmed:
                # Eager; also a thread's first body, so the per-thread state it creates lazily
                # (cuBLAS/cuBLASLt handles) exists before this thread captures: creating it during
                # a capture fails it (and leaves the pool recording).
                out = body(**inputs)
                self.warmed.add(me)
                self.eager += 1
                return out
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            static = {k: v.clone() for k, v in inputs.items()}
            graph = torch.cuda.CUDAGraph()
            # thread_local: the loader's stager thread (and other fusions' threads) keep issuing
            # work on their own streams meanwhile
            with _CAPTURE:
                stream = capture_stream(torch.cuda.current_device())
                with torch.cuda.graph(
                    graph, pool=self.pool, stream=stream, capture_error_mode="thread_local"
                ):
                    out = body(**static)
            entry = self.graphs[key] = (graph, static, out, tuple(reads))
            self.captures += 1
        graph, static, out, _ = entry
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        self.replays += 1
        return out
