"""The ``chunkcache`` command line: each subcommand is one library call.

    chunkcache precompute docs/ --store cache.lmdb --codec int4
    chunkcache stats --store cache.lmdb
    chunkcache bench store --n 100

Subcommands live in ``COMMANDS`` (name -> (help, add_arguments, run)); benchmarks in
``BENCH_COMMANDS`` (name -> module exposing ``add_arguments(parser)`` and ``run_cli(args) -> int``,
help taken from the module docstring's first line). Heavy imports (torch, the model) happen inside
the run functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from chunkcache.corpus import TEXT_SUFFIXES

__all__ = ["BENCH_COMMANDS", "COMMANDS", "build_parser", "main", "parse_size"]

_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
          "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '2GiB' -> 2**31, '1024' -> 1024 (decimal units, binary with 'iB')."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500MB, 2GiB, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _open(args: argparse.Namespace, readonly: bool):
    from chunkcache.store import open_store

    # a redis:// URL is a shared store: these commands scan every key there (ops use)
    return open_store(args.store, readonly=readonly, eviction=getattr(args, "policy", "lru"))


def _show(key: str) -> str:
    """A key as printable text: bytes that were not UTF-8 in the store appear as \\x escapes."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _codec_names() -> list[str]:
    from chunkcache.codec import CODECS  # the registry: a codec added there is offered here

    return sorted(CODECS)


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store", required=True, help="path of the LMDB chunk store (a directory), or a redis:// URL"
    )


# -- store commands ---------------------------------------------------------------------------


def _stats_args(p: argparse.ArgumentParser) -> None:
    _add_store(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _stats(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    with _open(args, readonly=True) as store:
        s = store.stats()
    if args.json:
        print(json.dumps(asdict(s)))
    else:
        print(f"store      {args.store}")
        print(f"entries    {s.entries}")
        print(f"bytes      {s.bytes} ({_human(s.bytes)})")
        print(f"file       {_human(s.file_bytes)}")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    _add_store(p)
    p.add_argument("--delete", action="store_true", help="also delete the damaged and the stale entries")


def _verify(args: argparse.Namespace) -> int:
    from chunkcache.store import verify_store

    with _open(args, readonly=not args.delete) as store:
        n = store.stats().entries
        bad = verify_store(store, delete=args.delete)
    stale = [(k, r) for k, r in bad if r.startswith("stale:")]
    damaged = [(k, r) for k, r in bad if not r.startswith("stale:")]
    for key, reason in damaged:
        print(f"BAD {_show(key)}: {reason}")
    for key, reason in stale:
        print(f"STALE {_show(key)}: {reason.removeprefix('stale: ')}")
    print(f"{n - len(bad)} of {n} entries ok" + (f", {len(damaged)} damaged" if damaged else "")
          + (f", {len(stale)} stale (another format version)" if stale else ""))  # fmt: skip
    if bad and args.delete:
        print(f"deleted {len(damaged)} damaged and {len(stale)} stale entries")
    elif stale:
        print("stale entries are not damage; `chunkcache verify --delete` or `chunkcache evict` removes them")
    return 1 if damaged else 0


def _evict_args(p: argparse.ArgumentParser) -> None:
    _add_store(p)
    p.add_argument(
        "--to", required=True, type=parse_size, metavar="SIZE", help="target size, e.g. 500MB, 2GiB"
    )
    p.add_argument("--policy", default="lru", choices=["lru", "cost"], help="eviction policy (default: lru)")


def _evict(args: argparse.Namespace) -> int:
    from chunkcache.store import remove_stale

    with _open(args, readonly=False) as store:
        before = store.stats().bytes
        stale = remove_stale(store)  # unusable by this build: they go first
        gone = store.evict_to(args.to)
        after = store.stats().bytes
    print(f"removed {len(stale)} stale entries (another format version)" if stale else "no stale entries")
    print(f"evicted {len(gone)} entries ({args.policy}): {_human(before)} -> {_human(after)}")
    return 0


def _ls_args(p: argparse.ArgumentParser) -> None:
    _add_store(p)
    p.add_argument("--sort", default="key", choices=["key", "size", "access", "hits"], help="sort order")
    p.add_argument("--limit", type=int, default=None, help="print at most this many entries")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


def _ls(args: argparse.Namespace) -> int:
    with _open(args, readonly=True) as store:
        rows = list(store.entries())
    order = {"key": lambda r: r[0], "size": lambda r: -r[1].nbytes, "access": lambda r: -r[1].last_access,
             "hits": lambda r: -r[1].hits}  # fmt: skip
    rows.sort(key=order[args.sort])
    for key, e in rows[: args.limit]:
        try:
            when = datetime.fromtimestamp(e.last_access / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        except (ValueError, OverflowError, OSError):  # a damaged access record
            when = "?"
        if args.json:
            print(json.dumps({"key": _show(key), "nbytes": e.nbytes, "tokens": e.tokens, "hits": e.hits,
                              "last_access_ns": e.last_access, "created_ns": e.created}))  # fmt: skip
        else:
            print(f"{_show(key)}  {e.nbytes:>12}  {e.tokens:>6} tok  {e.hits:>5} hits  {when}")
    return 0


def _inspect_args(p: argparse.ArgumentParser) -> None:
    _add_store(p)
    p.add_argument("key", help="the entry's key (see `chunkcache ls`)")


def _inspect(args: argparse.Namespace) -> int:
    from chunkcache.errors import CorruptEntryError
    from chunkcache.format import read_header, verify_entry

    if not args.key:
        print("no entry '' (keys are 64 hex characters, see `chunkcache ls`)", file=sys.stderr)
        return 1
    with _open(args, readonly=True) as store:
        raw = store.get(args.key, touch=False)
    if raw is None:
        print(f"no entry {_show(args.key)}", file=sys.stderr)
        return 1
    try:
        header = read_header(raw)
    except CorruptEntryError as e:
        print(json.dumps({"entry_key": _show(args.key), "nbytes": len(raw), "damaged": str(e)}, indent=2))
        return 1
    damage = verify_entry(raw, args.key)
    # "key" in the header holds the key *inputs* (their one copy); the store key itself is "entry_key".
    out = {"entry_key": _show(args.key), "nbytes": len(raw), "ok": damage is None, **header}
    if damage is not None:
        out["damaged"] = damage
    print(json.dumps(out, indent=2))
    return 0 if damage is None else 1


# -- precompute -------------------------------------------------------------------------------


def _precompute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a text file, a folder of .txt/.md files, or a .jsonl file")
    p.add_argument(
        "--store", required=True, help="path of the LMDB chunk store (created if missing), or a redis:// URL"
    )
    p.add_argument(
        "--model", default="smollm2-135m", help="model name, HF id or path (default: smollm2-135m)"
    )
    p.add_argument("--codec", default="raw", help=f"KV codec: {', '.join(_codec_names())} (default: raw)")
    p.add_argument("--text-field", default=None, help="JSONL field holding the text (default: text)")
    p.add_argument("--chunk-tokens", type=int, default=512, help="tokens per chunk (default: 512)")
    p.add_argument(
        "--overlap", type=int, default=32, help="tokens shared by consecutive chunks (default: 32)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="chunks encoded per forward pass (default: 8)")
    p.add_argument(
        "--sink",
        default="prefix",
        choices=["bos", "prefix", "context"],
        help="attention sink chunks are encoded behind; must match the engine's (default: prefix)",
    )
    p.add_argument(
        "--exact-first",
        action="store_true",
        help="with --sink context: also store each chunk behind the prefix alone, for the engine's "
        "exact_first (a prompt's first chunk fused from it; twice the precompute and bytes)",
    )
    p.add_argument(
        "--token-scores",
        action="store_true",
        help="also store each chunk's per-token context-impact scores, for the engine's "
        "token_scores=True (policy qimpact); part of the keys",
    )
    p.add_argument(
        "--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on CUDA, float32 on CPU)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--emit",
        default=None,
        help="write the chunk texts with their keys as JSONL here (index these texts in your vector store)",
    )
    p.add_argument(
        "--shard",
        default=None,
        type=_parse_shard,
        metavar="I/N",
        help="only the chunks whose key satisfies int(key, 16) %% N == I: N machines split one corpus "
        "into a shared store (--store redis://...) without duplicate work; --emit writes this "
        "shard's chunks",
    )


def _check_writable_file(path: str) -> None:
    """Raise ValueError unless ``path`` can be created or overwritten as a file."""
    import os
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{path} is a folder; give a file path")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(p if p.exists() else parent, os.W_OK):
        raise ValueError(f"cannot write {path}: permission denied")


def _parse_shard(text: str) -> tuple[int, int]:
    """'2/8' -> (2, 8): shard 2 of 8 (0-based)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise argparse.ArgumentTypeError(f"not a shard: {text!r} (I/N with 0 <= I < N, e.g. 0/4)")
    return int(m.group(1)), int(m.group(2))


def _precompute(args: argparse.Namespace) -> int:
    from chunkcache import checks
    from chunkcache.corpus import chunk_tokens, iter_documents, split_text
    from chunkcache.engine import ChunkCache

    # Everything that can be checked without the model is checked before loading it.
    checks.codec(args.codec)
    checks.dtype(args.dtype)
    checks.device(args.device)
    chunk_tokens([], args.chunk_tokens, args.overlap)  # the window
    checks.store_writable(args.store)
    if args.emit:
        _check_writable_file(args.emit)
    docs = list(iter_documents(args.input, text_field=args.text_field))  # paths, JSON lines, fields
    if not docs:
        raise ValueError(
            f"no documents with text in {args.input} (a folder is searched for "
            f"{'/'.join(TEXT_SUFFIXES)} files; JSONL records need a non-blank text field)"
        )
    eng = ChunkCache(
        model=args.model,
        store=args.store,
        codec=args.codec,
        sink=args.sink,
        exact_first=args.exact_first,
        token_scores=args.token_scores,
        dtype=args.dtype,
        device=args.device,
    )
    texts, sources = [], []
    count = lambda text: len(eng.template.chunk_ids(text))  # noqa: E731 - tokens as the engine caches them
    for doc in docs:
        for text in split_text(eng.tokenizer, doc.text, args.chunk_tokens, args.overlap, count=count):
            texts.append(text)
            sources.append(doc.source)
    if args.shard is not None:  # the same split on every machine: it depends on the key alone
        i, n = args.shard
        mine = [j for j, t in enumerate(texts) if int(eng.key(t), 16) % n == i]
        texts, sources = [texts[j] for j in mine], [sources[j] for j in mine]
    before = eng.store.stats().entries
    keys = eng.precompute(texts, batch_size=args.batch_size, progress=True)
    if args.emit:
        with open(args.emit, "w") as f:
            for key, text, source in zip(keys, texts, sources, strict=True):
                f.write(json.dumps({"key": key, "source": source, "text": text}) + "\n")
    s = eng.store.stats()
    print(f"{len(set(sources))} documents, {len(texts)} chunks ({len(set(keys))} distinct); "
          f"{s.entries - before} stored now, {s.entries} in store ({_human(s.bytes)})")  # fmt: skip
    eng.store.close()
    return 0


# -- check ------------------------------------------------------------------------------------


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m", help="model name, HF id or path (default: smollm2-135m)"
    )
    p.add_argument(
        "--store", default=None, help="chunk store to record the result in (default: none, in memory)"
    )
    p.add_argument(
        "--sink",
        default="prefix",
        choices=["bos", "prefix", "context"],
        help="attention sink (default: prefix)",
    )
    p.add_argument(
        "--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on CUDA, float32 on CPU)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _check(args: argparse.Namespace) -> int:
    from chunkcache import gate
    from chunkcache.engine import ChunkCache
    from chunkcache.errors import FusionGateError

    eng = ChunkCache(model=args.model, store=args.store, sink=args.sink, dtype=args.dtype, device=args.device)
    try:
        r = gate.check(eng)
    except FusionGateError as e:
        print(f"REFUSED {e}")
        return 1
    finally:
        eng.store.close()
    print(f"ok {r.model} ({r.dtype}, {r.device}): logits at ratio 1 within {r.logits_diff:.2e}, re-rotated "
          f"keys within {r.keys_diff:.2e} of a full prefill (tolerances {r.logits_tolerance:g} / {r.tolerance:g}; {r.prompt_tokens} "
          f"tokens, {r.seconds:.2f}s)" + (f"; recorded in {args.store}" if args.store else ""))  # fmt: skip
    return 0


# -- bench ------------------------------------------------------------------------------------

BENCH_COMMANDS: dict[str, str] = {
    "gate": "chunkcache.bench.gate",
    "store": "chunkcache.bench.store",
    "quality": "chunkcache.bench.quality",
    "precompute": "chunkcache.bench.precompute",
    "redis": "chunkcache.bench.redis_store",
    "ttft": "chunkcache.bench.ttft",
    "codec": "chunkcache.bench.codec",
    "adaptive": "chunkcache.bench.adaptive",
    "serve": "chunkcache.bench.serve",
    "decode": "chunkcache.bench.decode",
}
"""Benchmark name -> module with ``add_arguments(parser)`` and ``run_cli(args) -> int``."""


def _bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module in BENCH_COMMANDS.items():
        mod = importlib.import_module(module)
        doc = (mod.__doc__ or "").strip().splitlines()
        bp = sub.add_parser(
            name, help=doc[0] if doc else name, description=(mod.__doc__ or "").split("\n\n")[0]
        )
        mod.add_arguments(bp)
        bp.set_defaults(func=mod.run_cli)


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int] | None]

COMMANDS: dict[str, Command] = {
    "precompute": ("chunk documents and store their KV caches (resumable)", _precompute_args, _precompute),
    "check": (
        "the correctness gate: fusion at ratio 1 against a full prefill of a short prompt",
        _check_args,
        _check,
    ),  # fmt: skip
    "stats": ("entries and bytes in a store", _stats_args, _stats),
    "ls": ("list entries with size, tokens, hits, last access", _ls_args, _ls),
    "inspect": ("print one entry's header as JSON", _inspect_args, _inspect),
    "verify": ("check every entry (header, shapes, checksums, key); exit 1 on damage", _verify_args, _verify),
    "evict": (
        "remove stale entries, then evict by policy until the store is under a size",
        _evict_args,
        _evict,
    ),
    "bench": (f"benchmarks ({', '.join(BENCH_COMMANDS)})", _bench_args, None),
}
"""Subcommand name -> (help, add_arguments, run). ``run`` None: the subparsers set ``func``."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``chunkcache precompute: error: ... (see --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chunkcache", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        if run is not None:
            p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit status. Library errors (every ``ChunkCacheError``) and
    bad arguments or input print one line, not a traceback, and exit 2."""
    from chunkcache.errors import ChunkCacheError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ChunkCacheError, OSError, ValueError, TypeError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        print(f"chunkcache {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"chunkcache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
