"""Faults with real processes and real OS errors: a writer killed by SIGKILL, entries damaged behind
the store's back, read-only paths, a full disk (a real 1 MiB tmpfs; skipped where it cannot be
mounted). More hostile cases (crashes, crafted entries, Redis faults): ``test_store_hostile``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lmdb
import pytest
from store_worker import entry

from chunkcache.errors import StoreError, StoreFullError, StoreReadOnlyError
from chunkcache.format import load_chunk
from chunkcache.store import LMDBStore, verify_store

WORKER = str(Path(__file__).with_name("store_worker.py"))
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}


def test_sigkill_mid_write_loop_leaves_a_consistent_store_and_the_rerun_resumes(tmp_path):
    path = str(tmp_path / "s")
    n = 200
    cmd = [sys.executable, WORKER, "write", path, str(n), "--tokens", "256"]  # ~0.5 MB per entry
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=ENV)
    committed = []
    for line in p.stdout:
        if line.startswith("put "):
            committed.append(line.split()[1])
        if len(committed) >= 25:
            break
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    with LMDBStore(path) as s:
        keys = set(s.keys())
        assert set(committed) <= keys  # "put" is printed after the commit: all of them survived
        assert verify_store(s) == []  # and whatever else is there is whole
        st = s.stats()
        assert st.entries == len(keys) and st.bytes == sum(nb for _, nb in s.items())
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert rerun.returncode == 0, rerun.stderr
    put, skip = map(int, rerun.stdout.splitlines()[-1].split()[1:])
    assert skip == len(keys) and put + skip == n
    with LMDBStore(path, readonly=True) as s:
        assert s.stats().entries == n and verify_store(s) == []


def _damage(path: Path, edits: dict[str, bytes]) -> None:
    """Overwrite values in the store's ``chunks`` database through lmdb directly."""
    env = lmdb.open(str(path), max_dbs=4)
    db = env.open_db(b"chunks")
    with env.begin(write=True) as txn:
        for k, v in edits.items():
            txn.put(k.encode(), v, db=db)
    env.close()


def test_damaged_entries_are_detected_reported_deleted_and_never_returned(tmp_path):
    items = dict(entry(i) for i in range(4))
    (k_flip, v_flip), (k_cut, v_cut), (k_ok, _), (k_junk, _) = items.items()
    with LMDBStore(tmp_path) as s:
        s.put_many(items)
    flipped = bytearray(v_flip)
    flipped[len(flipped) // 2] ^= 0xFF
    _damage(tmp_path, {k_flip: bytes(flipped), k_cut: v_cut[: len(v_cut) // 3], k_junk: b"\x00" * 100})
    with LMDBStore(tmp_path) as s:
        bad = dict(verify_store(s))
        assert set(bad) == {k_flip, k_cut, k_junk}
        assert "checksum" in bad[k_flip] and "truncated" in bad[k_cut] and "magic" in bad[k_junk]
        for k in (k_flip, k_cut, k_junk):
            with pytest.warns(RuntimeWarning, match=f"dropping damaged entry {k}"):
                assert load_chunk(s, k) is None
            assert not s.contains(k) and s.get(k) is None
        assert load_chunk(s, k_ok) is not None
        assert list(s.keys()) == [k_ok] and s.stats().bytes == len(items[k_ok])


@contextlib.contextmanager
def _mount_tmpfs(options: str):
    """A fresh tmpfs mounted with ``options``, or None where mounting is not permitted."""
    where = tempfile.mkdtemp(prefix="chunkcache-tmpfs-")
    try:
        cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", where]
        ok = subprocess.run(cmd, capture_output=True).returncode == 0
    except OSError:  # no mount binary
        ok = False
    try:
        yield where if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", where], capture_output=True)
        os.rmdir(where)


def test_unwritable_paths_give_clear_errors(tmp_path):
    # A file where the store's directory should be: a real ENOTDIR from the OS.
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create chunk store") as e:
        LMDBStore(tmp_path / "file" / "store")
    assert not isinstance(e.value, lmdb.Error)
    # /sys refuses new entries even to root (EACCES).
    if not os.access("/sys", os.W_OK) or _sys_refuses():
        with pytest.raises(StoreReadOnlyError, match="cannot create chunk store"):
            LMDBStore("/sys/chunkcache-test-store")


def _sys_refuses() -> bool:
    try:
        os.mkdir("/sys/chunkcache-probe")
    except OSError:
        return True
    os.rmdir("/sys/chunkcache-probe")
    return False


def test_read_only_filesystem(tmp_path):
    with _mount_tmpfs("size=1m,ro") as mnt:
        if mnt is None:
            pytest.skip("mounting a tmpfs is not permitted here")
        with pytest.raises(StoreReadOnlyError, match="Read-only file system"):
            LMDBStore(os.path.join(mnt, "store"))


def test_full_disk_gives_store_full_and_loses_nothing_committed():
    """A real 1 MiB tmpfs; where it cannot be mounted (not root), skip: a faked disk (a commit
    patched to raise the very error text the code parses) would test nothing."""
    small = [entry(i, tokens=16) for i in range(3)]  # ~17 KB each
    big = entry(99, tokens=2048)  # ~2 MB: cannot fit in 1 MiB
    with _mount_tmpfs("size=1m") as mnt:
        if mnt is None:
            pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): no real full disk")
        with LMDBStore(os.path.join(mnt, "store"), map_size=64 << 20) as s:
            _fill_and_overflow(s, small, big)
            assert s.stats().failed_writes == 1


def _fill_and_overflow(s: LMDBStore, small, big) -> None:
    for k, v in small:
        s.put(k, v)
    with pytest.raises(StoreFullError, match="disk is full"):
        s.put(*big)
    assert not s.contains(big[0])
    assert s.stats().entries == 3 and verify_store(s) == []
    assert all(s.get(k) == v for k, v in small)
    s.delete(small[0][0])  # still usable after the failed write
    assert s.stats().entries == 2
