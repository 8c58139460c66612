"""Chunk keys: deterministic, stable across runs and input types, sensitive to every input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from chunkcache.keys import KeyInputs, chunk_key

ARGS = ([1, 2, 3], "smollm2@abc", "bfloat16", "int4", {"sink": "bos", "sink_ids": [1]}, 1)
GOLDEN = chunk_key(*ARGS)


def test_key_is_hex_and_stable_across_processes():
    assert len(GOLDEN) == 64 and int(GOLDEN, 16) >= 0
    code = (
        "from chunkcache.keys import chunk_key;"
        "print(chunk_key([1, 2, 3], 'smollm2@abc', 'bfloat16', 'int4', {'sink_ids': [1], 'sink': 'bos'}, 1))"
    )
    # A fresh interpreter (different hash seed) gives the same key: no Python hash() inside.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})  # fmt: skip
    assert out.stdout.strip() == GOLDEN


def test_pinned_value():
    # Pinned: changing what a key hashes orphans every stored entry, so it must be deliberate.
    assert GOLDEN == "7727b0cac9680f66f1e07f5f2dff99c99bbf456f86e514fd866adade01941bcd"


def test_token_id_types_agree():
    ids = [5, 70000, 3]
    base = chunk_key(ids, *ARGS[1:])
    assert chunk_key(torch.tensor(ids), *ARGS[1:]) == base
    assert chunk_key(torch.tensor(ids, dtype=torch.int32), *ARGS[1:]) == base
    assert chunk_key(np.array(ids, dtype=np.uint32), *ARGS[1:]) == base
    assert chunk_key((5, 70000, 3), *ARGS[1:]) == base


def test_every_input_changes_the_key():
    variants = [
        ([1, 2, 4], *ARGS[1:]),
        ([1, 2], *ARGS[1:]),
        ([1, 2, 3, 0], *ARGS[1:]),
        (ARGS[0], "smollm2@abd", *ARGS[2:]),
        (*ARGS[:2], "float32", *ARGS[3:]),
        (*ARGS[:3], "raw", *ARGS[4:]),
        (*ARGS[:4], {"sink": "prefix", "sink_ids": [1]}, 1),
        (*ARGS[:4], {"sink": "bos"}, 1),
        (*ARGS[:5], 2),
    ]
    keys = {chunk_key(*v) for v in variants}
    assert len(keys) == len(variants) and GOLDEN not in keys


def test_settings_order_does_not_matter():
    a = chunk_key([1], "m", "bfloat16", "raw", {"a": 1, "b": [1, 2]}, 1)
    b = chunk_key([1], "m", "bfloat16", "raw", {"b": [1, 2], "a": 1}, 1)
    assert a == b


def test_rejects_what_cannot_be_hashed_canonically():
    with pytest.raises(ValueError):
        chunk_key([[1, 2]], "m", "bfloat16", "raw", {}, 1)
    with pytest.raises(ValueError):
        chunk_key([1.5], "m", "bfloat16", "raw", {}, 1)
    with pytest.raises(ValueError):
        chunk_key([1], "m", "bfloat16", "raw", {"x": float("nan")}, 1)
    with pytest.raises(TypeError):
        KeyInputs("m", "bfloat16", "raw", {"x": object()}, 1)


def test_key_inputs_describe_the_key():
    inputs = KeyInputs(*ARGS[1:])
    assert inputs.key(ARGS[0]) == GOLDEN
    d = inputs.to_dict()
    assert d == {
        "model_fingerprint": "smollm2@abc",
        "dtype": "bfloat16",
        "codec": "int4",
        "settings": {"sink": "bos", "sink_ids": [1]},
        "format_version": 1,
    }
    assert KeyInputs.from_dict(d) == inputs
