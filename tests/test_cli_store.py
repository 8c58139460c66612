"""The store subcommands through ``main([...])`` on a store filled with random entries."""

from __future__ import annotations

import json

import lmdb
import pytest
from store_worker import KEY_INPUTS, entry

from chunkcache.cli import build_parser, main, parse_size
from chunkcache.store import LMDBStore


@pytest.fixture
def store_path(tmp_path):
    path = str(tmp_path / "s")
    items = [entry(i) for i in range(3)] + [entry(i, "int4") for i in range(3, 5)]
    with LMDBStore(path) as s:
        s.put_many(items)
    return path, dict(items)


def test_stats(store_path, capsys):
    path, items = store_path
    assert main(["stats", "--store", path, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["entries"] == 5 and s["bytes"] == sum(len(v) for v in items.values())
    assert main(["stats", "--store", path]) == 0
    assert "entries    5" in capsys.readouterr().out


def test_ls(store_path, capsys):
    path, items = store_path
    assert main(["ls", "--store", path, "--json", "--sort", "size"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["key"] for r in rows} == set(items) and rows[0]["nbytes"] == max(len(v) for v in items.values())
    assert all(r["tokens"] == 16 and r["hits"] == 0 for r in rows)
    assert main(["ls", "--store", path, "--limit", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_inspect(store_path, capsys):
    path, items = store_path
    key = next(iter(items))
    assert main(["inspect", "--store", path, key]) == 0
    h = json.loads(capsys.readouterr().out)
    assert h["entry_key"] == key and h["key"] == KEY_INPUTS.to_dict()
    assert h["codec"] == "raw" and h["ok"] is True
    assert h["kv_shape"] == [2, 2, 2, 16, 64] and h["num_tokens"] == 16 and h["meta"] == {"seed": 0}
    assert main(["inspect", "--store", path, "nope"]) == 1


def test_verify_reports_damage_with_nonzero_exit(store_path, capsys):
    path, items = store_path
    assert main(["verify", "--store", path]) == 0
    assert "5 of 5 entries ok" in capsys.readouterr().out
    bad_key = sorted(items)[1]
    env = lmdb.open(path, max_dbs=4)
    with env.begin(write=True) as txn:
        v = bytearray(items[bad_key])
        v[-5] ^= 1
        txn.put(bad_key.encode(), bytes(v), db=env.open_db(b"chunks", txn=txn))
    env.close()
    assert main(["verify", "--store", path]) == 1
    out = capsys.readouterr().out
    assert f"BAD {bad_key}" in out and "4 of 5 entries ok, 1 damaged" in out
    assert main(["verify", "--store", path, "--delete"]) == 1
    assert main(["verify", "--store", path]) == 0
    assert "4 of 4 entries ok" in capsys.readouterr().out


@pytest.mark.parametrize("policy", ["lru", "cost"])
def test_evict(store_path, capsys, policy):
    path, items = store_path
    one = max(len(v) for v in items.values())
    assert main(["evict", "--store", path, "--to", f"{one}B", "--policy", policy]) == 0
    assert "evicted" in capsys.readouterr().out
    with LMDBStore(path, readonly=True) as s:
        assert s.stats().bytes <= one and s.stats().entries >= 1
        left = set(s.keys())
    if policy == "cost":  # int4 entries are worth more per byte: one of them stays
        assert left <= set(list(items)[3:])


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["stats", "--store", str(tmp_path / "missing")]) == 2
    assert "no chunk store" in capsys.readouterr().err


def test_parse_size_and_help():
    assert parse_size("500MB") == 500_000_000 and parse_size("2GiB") == 2**31 and parse_size("1024") == 1024
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")
    help_text = build_parser().format_help()
    for cmd in ("precompute", "stats", "verify", "evict", "ls", "inspect", "bench"):
        assert cmd in help_text
    with pytest.raises(SystemExit):
        main(["bench", "store", "--help"])
