"""Stores that never crash the process, never serve another model's KV, never stop serving: each
case of issue 17 on a real LMDB / a real redis-server, with real processes where a crash (SIGSEGV,
SIGBUS) or a hang is what would happen.

Crashes and hangs are run in a child process (``subprocess``), so a regression fails the test
with the signal instead of killing the test run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model
from redis_servers import RedisServer, require_redis
from store_worker import KEY_INPUTS, craft, entry

from chunkcache.engine import ChunkCache
from chunkcache.errors import CorruptEntryError, StoreError, StoreFullError
from chunkcache.format import pack_chunk, unpack_chunk, verify_entry
from chunkcache.pipeline import entry_views
from chunkcache.store import LMDBStore, MemoryStore

TESTS = Path(__file__).parent
WORKER = str(TESTS / "store_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(TESTS)}


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``chunkcache ARGS`` in a child process: for what would crash the process (SIGBUS)."""
    code = "import sys; from chunkcache.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def _main(*args: str) -> subprocess.CompletedProcess:
    """``chunkcache ARGS`` in this process (fast), as a CompletedProcess."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from chunkcache.cli import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(list(args))
    except SystemExit as e:
        rc = e.code
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _tmpfs(size: str):
    """A real tmpfs (this machine runs tests as root), or a skip saying why not."""
    where = tempfile.mkdtemp(prefix="chunkcache-tmpfs-")
    try:
        ok = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where], capture_output=True
        )
    except OSError as e:
        ok = e
    if not isinstance(ok, subprocess.CompletedProcess) or ok.returncode != 0:
        os.rmdir(where)
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {getattr(ok, 'stderr', ok)!r}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], capture_output=True)
        os.rmdir(where)


def _fill(path: str) -> None:
    """Fill the file system under ``path`` to the last byte."""
    fd = os.open(os.path.join(path, "ballast"), os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 16, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)


# -- 1. one handle, zero-copy readers and a growing writer -------------------------------------


def test_zero_copy_readers_survive_a_writer_growing_the_map(tmp_path):
    """Readers on ``pipeline.entry_views`` (the fast path's reader, on CPU here) and a writer
    growing a 64 KiB map, all on one handle: SIGSEGV within seconds before the map lock."""
    out = subprocess.run(
        [sys.executable, WORKER, "threads", str(tmp_path / "s"), "3"], capture_output=True, text=True,
        timeout=120, env=ENV,
    )  # fmt: skip
    assert out.returncode == 0, (out.returncode, out.stdout[-500:], out.stderr[-2000:])
    reads, size = out.stdout.split()[1], int(out.stdout.split()[3])
    assert int(reads) > 0 and size > 1 << 16  # the readers read while the map really grew


def test_views_adopt_a_map_grown_by_another_process(tmp_path):
    path = str(tmp_path / "s")
    store = LMDBStore(path, map_size=1 << 16)
    key, value = entry(0, tokens=4)
    store.put(key, value)
    # another process grows the map far beyond this handle's size
    grow = subprocess.run([sys.executable, WORKER, "write", path, "12", "--tokens", "512"],
                          capture_output=True, text=True, timeout=120, env=ENV)  # fmt: skip
    assert grow.returncode == 0, grow.stderr
    with entry_views(store, [key]) as [view]:  # lmdb.MapResizedError before
        assert bytes(view) == value
    assert store.stats().entries == 13
    store.close()


def test_a_views_block_refuses_to_grow_the_map_from_inside(tmp_path):
    """A write that must move the map while this very thread holds views would wait for itself:
    it fails with a StoreError instead (and nothing is written)."""
    with LMDBStore(tmp_path / "s", map_size=1 << 16) as store:
        key, value = entry(0, tokens=4)
        store.put(key, value)
        with store.views([key]) as [view]:
            with pytest.raises(StoreError, match="views"):
                store.put(*entry(1, tokens=1024))
            assert bytes(view) == value
        store.put(*entry(1, tokens=1024))  # fine outside the block


# -- 2. SIGBUS: truncated data file, full file system at creation ------------------------------


def _truncated(tmp_path, keep: float) -> Path:
    path = tmp_path / "s"
    with LMDBStore(path, map_size=1 << 22) as s:
        s.put_many([entry(i, tokens=64) for i in range(20)])
    data = path / "data.mdb"
    os.truncate(data, int(data.stat().st_size * keep) // 4096 * 4096)
    return path


def test_truncated_data_file_is_refused_not_a_crash(tmp_path):
    path = _truncated(tmp_path, 0.8)
    out = _cli("verify", "--store", str(path))  # SIGBUS (-7) before
    assert out.returncode == 2 and "truncated" in out.stderr, (out.returncode, out.stderr[-500:])


@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_truncated_data_file_is_refused_at_open(tmp_path, keep):
    path = _truncated(tmp_path, keep)
    for readonly in (True, False):
        with pytest.raises(StoreError, match="truncated"):
            LMDBStore(path, readonly=readonly)


def test_creating_a_store_on_a_full_file_system_is_a_clear_error():
    with _tmpfs("1m") as mnt:
        _fill(mnt)
        code = (
            "import sys\nfrom chunkcache.store import LMDBStore\nfrom chunkcache.errors import StoreFullError\n"
            "try:\n    LMDBStore(sys.argv[1])\nexcept StoreFullError as e:\n    print('full', e)\n"
        )
        out = subprocess.run([sys.executable, "-c", code, os.path.join(mnt, "store")],
                             capture_output=True, text=True, timeout=60, env=ENV)  # fmt: skip
        assert out.returncode == 0 and out.stdout.startswith("full"), (out.returncode, out.stderr[-500:])


# -- 3. Redis hashes with garbage framing ------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url():
    require_redis()
    with RedisServer() as server:
        yield server


@pytest.mark.parametrize("n", [b"1000000000000", b"abc", b"-3", b"0"])
def test_redis_entry_with_garbage_framing_is_dropped_not_looped_over(redis_url, n):
    from chunkcache.store.redis_store import RedisStore

    store = RedisStore(redis_url.url, socket_timeout=5)
    key, value = entry(int.from_bytes(n[:2], "little"), tokens=8)
    store.put(key, value)
    store._run("t", lambda r: r.hset(store._rkey(key), "n", n))
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match="dropping damaged entry"):
        assert store.get(key) is None  # n=10**12 looped "forever" before; n=abc raised ValueError
    assert time.monotonic() - t0 < 5 and not store.contains(key)
    store._run("t", lambda r: r.hset(store._rkey(key), mapping={"n": n, "p7": b"junk"}))
    store.put(key, value)  # a garbage hash can always be rewritten (ValueError before)
    assert store.get(key) == value
    assert sorted(store._run("t", lambda r: r.hkeys(store._rkey(key)))) == sorted(
        [b"n", b"pb", b"nbytes", b"tokens", b"crc", b"p0"]
    )  # the junk field is gone
    assert dict(store.entries())[key].nbytes == len(value)
    store.delete(key)
    store.close()


def test_redis_out_of_memory_is_store_full_and_the_engine_serves_anyway(smol_tokenizer):
    require_redis()
    from chunkcache.store.redis_store import RedisStore

    with RedisServer(extra=("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")) as server:
        store = RedisStore(server.url)
        with pytest.raises(StoreFullError, match="full"):
            store.put(*entry(0, tokens=4096, layers=4))  # ~8 MB: over maxmemory
        assert store.stats().failed_writes == 1
        eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=store)
        want = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=None).fuse(PASSAGES, QUESTION)
        with pytest.warns(RuntimeWarning, match="cannot write to the chunk store") as rec:
            got = eng.fuse(PASSAGES, QUESTION)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        assert sum(str(w.message).startswith("chunkcache: cannot write") for w in rec) == 1  # warned once
        assert store.stats().failed_writes >= 2
        store.close()


def test_engine_serves_when_redis_is_down_or_frozen(smol_tokenizer):
    require_redis()
    from chunkcache.store.redis_store import RedisStore

    want = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=None).fuse(PASSAGES, QUESTION)
    with RedisServer() as server:
        store = RedisStore(server.url, socket_timeout=0.5, connect_timeout=0.5, retries=0)
        eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=store)
        server.proc.send_signal(19)  # SIGSTOP: frozen, the socket stays open
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = eng.fuse(PASSAGES, QUESTION)
        finally:
            server.proc.send_signal(18)  # SIGCONT
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        server.kill()  # down
        store._down_until = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = eng.fuse(PASSAGES[:2], QUESTION)
        assert got.logits.shape[-1] == want.logits.shape[-1]
        assert store.failed_writes >= 2  # stats() would scan the (down) server
        store.close()


# -- 4, 5. identity and geometry of an entry under the engine's own key ------------------------


def _forge(eng: ChunkCache, text: str, edit=None, key_info=None, codec=None, chunk_edit=None) -> bytes:
    """An entry under ``eng``'s key for ``text`` with valid checksums and one thing changed."""
    ids = eng._chunk_ids(text)
    key = eng.precompute_ids([ids])[0]
    raw = eng.store.get(key)
    if key_info is not None or codec is not None or chunk_edit is not None:
        chunk = unpack_chunk(raw)
        if chunk_edit is not None:
            chunk = chunk_edit(chunk)
        raw = pack_chunk(chunk, codec or eng.codec, eng.key_info() if key_info is None else key_info)
    if edit is not None:
        raw = craft(raw, edit)
    eng.store.put(key, raw)
    return raw


FORGERIES = {
    "no key record": dict(key_info={}),
    "key record of another dtype": dict(key_info={**KEY_INPUTS.to_dict()}),
    "int4 KV under a raw key": dict(edit=lambda h: {**h, "key": {**h["key"], "codec": "int4"}}),
    "bf16 KV under a fp32 key": dict(chunk_edit=lambda c: c.to(dtype=torch.bfloat16)),
    "base_pos edited": dict(edit=lambda h: {**h, "base_pos": h["base_pos"] + 3}),
    "num_tokens + 10": dict(edit=lambda h: {**h, "num_tokens": h["num_tokens"] + 10}),
    "num_tokens = 1e7": dict(edit=lambda h: {**h, "num_tokens": 10**7}),
    "meta.key_info a string": dict(edit=lambda h: {**h, "meta": {"key_info": "x"}, "key": "x"}),
    "sections = []": dict(edit=lambda h: {**h, "sections": []}),
    "wrong kv-head count": dict(
        chunk_edit=lambda c: type(c)(
            c.token_ids, torch.cat([c.kv, c.kv], dim=2), c.base_pos, c.token_scores, c.meta
        )
    ),
}


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "fast_path"])
def forged_engine(request, smol_tokenizer):
    """One engine per path with its clean result: every case leaves the store clean again."""
    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=None, fast_path=request.param)
    return eng, eng.fuse(PASSAGES[:2], QUESTION).logits


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_forged_entry_under_the_engines_key_is_replaced_not_used(case, forged_engine):
    eng, want = forged_engine
    eng.store.delete(eng.key(PASSAGES[0]))
    _forge(eng, PASSAGES[0], **FORGERIES[case])
    with pytest.warns(RuntimeWarning, match="dropping damaged entry"):
        got = eng.fuse(PASSAGES[:2], QUESTION)
    torch.testing.assert_close(got.logits, want, rtol=0, atol=0)  # the forged one was never used
    raw = eng.store.get(eng.key(PASSAGES[0]))
    assert verify_entry(raw, eng.key(PASSAGES[0])) is None  # replaced under the engine's own key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(eng.fuse(PASSAGES[:2], QUESTION).logits, want)  # and then a clean hit


def test_an_entry_checked_once_is_checked_again_only_where_its_bytes_differ(monkeypatch, smol_tokenizer):
    """The identity memo of ``_check_entry``: the same header and tokens under the same key pass
    on a lookup; any edit of the header (even one the checks accept), other tokens asked for, or
    another key are checked in full again."""
    import chunkcache.format as F
    from chunkcache.errors import ForeignEntryError, ModelMismatchError
    from chunkcache.keys import token_bytes

    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=None)
    ids = eng._chunk_ids(PASSAGES[0])
    key = eng.precompute_ids([ids])[0]
    raw = eng.store.get(key)
    calls = []
    real = F.check_identity
    monkeypatch.setattr(F, "check_identity", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])

    def check(raw, key=key, want=ids):
        header, parts = F.unpack_parts(raw, verify=False)
        eng._check_entry(key, header, parts["token_ids"], token_bytes(want), eng._info(), raw)

    check(raw)
    check(raw)
    assert calls == [key]  # the repeat was a lookup
    edited = craft(raw, lambda h: {**h, "meta": {**h.get("meta", {}), "note": "x"}})  # accepted, yet other bytes
    check(edited)
    assert calls == [key, key]
    forged = craft(raw, lambda h: {**h, "base_pos": h["base_pos"] + 1})
    with pytest.raises(ForeignEntryError, match="base_pos"):
        check(forged)
    with pytest.raises(ModelMismatchError, match="other tokens"):  # a bad text index record, on a hit
        check(raw, want=ids[:-1] + [ids[-1] + 1])
    other = eng.precompute_ids([eng._chunk_ids(PASSAGES[1])])[0]
    with pytest.raises(ForeignEntryError, match="do not hash"):  # another key: checked in full
        check(raw, key=other)
    n = len(calls)
    check(raw)  # (the memo holds the edited one's digest now: the last that passed under the key)
    check(raw)
    assert len(calls) == n + 1


def test_verify_and_inspect_report_malformed_entries_and_delete_cleans_them(tmp_path):
    path = str(tmp_path / "s")
    good_key, good = entry(0)
    bad = {
        "sections=[]": craft(entry(1)[1], lambda h: {**h, "sections": []}),
        "key_info=x": craft(entry(2)[1], lambda h: {**h, "key": "x"}),
        "deep JSON": craft(entry(3)[1], header_bytes=b"[" * 100_000 + b"]" * 100_000),
        "bomb": craft(entry(4, codec="int8")[1], lambda h: _bomb(h)),
        "foreign key": entry(5)[1],
    }
    keys = {name: entry(i + 1, codec="int8" if name == "bomb" else "raw")[0] for i, name in enumerate(bad)}
    keys["foreign key"] = entry(6)[0]  # a whole, valid entry under another chunk's key
    with LMDBStore(path) as s:
        s.put(good_key, good)
        for name, v in bad.items():
            s.put(keys[name], v)
    out = _main("verify", "--store", path)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-800:]
    assert out.stdout.count("BAD ") == len(bad) and "1 of 6 entries ok" in out.stdout, out.stdout
    for name in bad:
        ins = _main("inspect", "--store", path, keys[name])
        assert ins.returncode == 1 and "Traceback" not in ins.stderr, (name, ins.stderr[-800:])
        assert "damaged" in json.loads(ins.stdout)
    assert _main("inspect", "--store", path, good_key).returncode == 0
    assert _main("verify", "--store", path, "--delete").returncode == 1
    assert _main("verify", "--store", path).returncode == 0  # cleaned


def _bomb(h: dict) -> dict:
    """An int8 entry whose v_q claims one token while kv_shape says many: v_q * v_scale would
    broadcast to [L, H, T, D] from a few bytes (2.37 GiB from 73 KB in the issue)."""
    h = json.loads(json.dumps(h))
    s = h["sections"]["v_q"]
    L, H, T, D = s["shape"]
    s["shape"], s["nbytes"] = [L, H, 1, D], L * H * D
    return h


def test_the_memory_bomb_is_refused_before_decoding(monkeypatch):
    from chunkcache.codec import CODECS

    raw = craft(entry(4, codec="int8")[1], _bomb)
    called = []
    monkeypatch.setattr(CODECS["int8"], "decode", lambda *a: called.append(1))
    with pytest.raises(CorruptEntryError, match="v_q"):
        unpack_chunk(raw)
    assert not called and "v_q" in verify_entry(raw)  # verify called it OK before


def test_a_hostile_remote_entry_through_a_tiered_store_is_dropped(tmp_path, smol_tokenizer):
    from chunkcache.store.tiered import TieredStore

    remote = MemoryStore()
    eng = ChunkCache(
        model=tiny_model(), tokenizer=smol_tokenizer, store=TieredStore(LMDBStore(tmp_path / "l"), remote)
    )
    want = eng.fuse(PASSAGES[:2], QUESTION).logits
    key = eng.key(PASSAGES[0])
    hostile = craft(remote.get(key), lambda h: {**h, "sections": {"token_ids": [1]}})
    eng.store.local.delete(key)
    remote.put(key, hostile)
    with pytest.warns(RuntimeWarning, match="dropping damaged entry"):
        got = eng.fuse(PASSAGES[:2], QUESTION).logits
    assert torch.equal(got, want) and remote.get(key) != hostile
    eng.store.close()


# -- 8. serving goes on when the store cannot be written ---------------------------------------


def test_fuse_serves_on_a_full_disk_and_counts_the_failed_writes(smol_tokenizer):
    want = (
        ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=None).fuse(PASSAGES, QUESTION).logits
    )
    with _tmpfs("1m") as mnt:
        eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=os.path.join(mnt, "s"))
        _fill(mnt)
        with pytest.warns(RuntimeWarning, match="cannot write to the chunk store") as rec:
            got = eng.fuse(PASSAGES, QUESTION).logits
            again = eng.fuse(PASSAGES, QUESTION).logits
        assert torch.equal(got, want) and torch.equal(again, want)
        assert sum(str(w.message).startswith("chunkcache: cannot write") for w in rec) == 1
        assert eng.store.stats().failed_writes == 8  # 4 chunks, twice: nothing could be stored
        eng.store.close()


# -- 9. smaller ones ----------------------------------------------------------------------------


def test_permission_only_read_only_store_opens_with_readonly(tmp_path, smol_tokenizer):
    """A store another user made (directory and files not writable by us; no read-only file
    system): the clear refusal names ``readonly=True``, and that opens it. Root ignores file
    modes, so as root the child runs without CAP_DAC_OVERRIDE (``setpriv``)."""
    import shutil

    path = tmp_path / "s"
    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=str(path))
    eng.precompute(PASSAGES[:2])
    eng.store.close()
    for p in [*path.iterdir(), path]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: file modes cannot be enforced")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
    code = (
        "import sys\nfrom chunkcache.store import LMDBStore\nfrom chunkcache.errors import StoreReadOnlyError\n"
        "try:\n    LMDBStore(sys.argv[1])\nexcept StoreReadOnlyError as e:\n    print('refused:', e)\n"
        "s = LMDBStore(sys.argv[1], readonly=True)\nprint('entries', s.stats().entries, len(s.get(next(iter(s.keys())))))\n"
    )
    try:
        out = subprocess.run([*prefix, sys.executable, "-W", "ignore", "-c", code, str(path)],
                             capture_output=True, text=True, timeout=60, env=ENV)  # fmt: skip
    finally:
        for p in [path, *path.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert out.returncode == 0, out.stderr[-1500:]
    assert "refused:" in out.stdout and "readonly=True" in out.stdout and "entries 2" in out.stdout, (
        out.stdout
    )


def test_odd_keys_do_not_crash_ls_inspect_verify_evict(tmp_path):
    import lmdb

    path = str(tmp_path / "s")
    with LMDBStore(path) as s:
        s.put(*entry(0))
    env = lmdb.open(path, max_dbs=4)
    with env.begin(write=True) as txn:  # a key that is not UTF-8, written behind the store's back
        k, v = b"\xff\xfe-not-utf8", entry(1)[1]
        txn.put(k, v, db=env.open_db(b"chunks", txn=txn))
        txn.put(k, bytes(40), db=env.open_db(b"access", txn=txn))
    env.close()
    ls = _main("ls", "--store", path)
    assert ls.returncode == 0 and "\\xff\\xfe-not-utf8" in ls.stdout, ls.stderr[-800:]
    for args in (["inspect", "--store", path, ""], ["verify", "--store", path]):
        out = _main(*args)
        assert out.returncode == 1 and "Traceback" not in out.stderr, (args, out.stderr[-800:])
    assert _main("verify", "--store", path, "--delete").returncode == 1
    ev = _main("evict", "--store", path, "--to", "0")
    assert ev.returncode == 0, ev.stderr[-800:]
    with LMDBStore(path) as s:
        assert s.stats().entries == 0


# -- issue 15: stale entries, a damaged index ----------------------------------------------------


def test_old_format_version_entries_are_stale_not_damaged(tmp_path):
    import struct

    path = str(tmp_path / "s")
    key, value = entry(0)
    old = bytearray(value)
    struct.pack_into("<I", old, 8, 0)  # written by a build of format version 0
    with LMDBStore(path) as s:
        s.put(key, bytes(old))
        s.put(*entry(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "damaged" warning
            from chunkcache.format import load_chunk

            assert load_chunk(s, key) is None and s.contains(key)  # a miss, not deleted
    out = _main("verify", "--store", path)
    assert (
        out.returncode == 0 and "STALE" in out.stdout and "1 stale" in out.stdout and "BAD" not in out.stdout
    )
    ev = _main("evict", "--store", path, "--to", "1GB")
    assert "removed 1 stale" in ev.stdout, ev.stdout
    with LMDBStore(path) as s:
        assert not s.contains(key) and s.stats().entries == 1


def test_a_damaged_lmdb_index_is_called_damaged_and_refuses_writes(tmp_path):
    path = tmp_path / "s"
    with LMDBStore(path) as s:
        s.put_many([entry(i, tokens=64) for i in range(8)])
    data = bytearray((path / "data.mdb").read_bytes())
    # point both meta pages' main-database root at an empty page: the index "lists nothing"
    for meta in (0, 4096):
        off = meta + 16 + 24 + 48  # page header, magic..mapsize, free db, then the main db record
        data[off + 6 : off + 48] = bytes(42)  # depth, page counts, entries: 0
        data[off + 40 : off + 48] = (2**64 - 1).to_bytes(8, "little")  # md_root = P_INVALID
    (path / "data.mdb").write_bytes(bytes(data))
    out = _main("verify", "--store", str(path))
    assert out.returncode == 2 and "damaged" in out.stderr and "not a chunkcache store" not in out.stderr, (
        out.stderr
    )
    with pytest.raises(StoreError, match="damaged"):
        LMDBStore(path)  # the engine's open: refused, nothing written
    assert (path / "data.mdb").read_bytes() == bytes(data)


def test_inspect_prints_the_key_inputs_once(tmp_path, smol_tokenizer):
    eng = ChunkCache(model=tiny_model(), tokenizer=smol_tokenizer, store=str(tmp_path / "s"))
    key = eng.precompute(PASSAGES[:1])[0]
    eng.store.close()
    out = _main("inspect", "--store", str(tmp_path / "s"), key)
    assert out.returncode == 0 and out.stdout.count("model_fingerprint") == 1, out.stdout


@pytest.mark.gpu
def test_gpu_zero_copy_readers_survive_map_growth(tmp_path, smol_tokenizer):
    """The CUDA fast path (views of the map, page-locked for direct copies) on one store handle
    while another thread's puts keep growing the map: every fusion equals the first, no crash."""
    import threading

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    store = LMDBStore(tmp_path / "s", map_size=1 << 16)
    model = tiny_model().to("cuda", torch.bfloat16)
    eng = ChunkCache(model=model, tokenizer=smol_tokenizer, store=store, fast_path=True, concurrent_fusions=2)
    ref = eng.fuse(PASSAGES, QUESTION)
    assert ref.stats.get("fast_path") is True
    stop = time.monotonic() + 6
    errors, fused = [], [0]

    def read() -> None:
        try:
            while time.monotonic() < stop:
                got = eng.fuse(PASSAGES, QUESTION)
                assert got.stats.get("fast_path") is True and torch.equal(got.logits, ref.logits)
                fused[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def write() -> None:
        i = 1000
        try:
            while time.monotonic() < stop:
                store.put(*entry(i, tokens=128 + (i % 5) * 128, layers=2))
                i += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(2)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert fused[0] > 0 and store._env.info()["map_size"] > 1 << 16
    store.close()
