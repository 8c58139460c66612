"""A newcomer's mistakes get a clear error before any expensive work: model names resolved locally
first, engine and CLI arguments checked before the model loads, ``fuse`` arguments checked
before any fusion, and the CLI printing one line instead of a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import PASSAGES, QUESTION, tiny_model

from chunkcache import checks
from chunkcache.cli import BENCH_COMMANDS, build_parser, main
from chunkcache.engine import ChunkCache
from chunkcache.errors import ModelNotFoundError, StoreReadOnlyError
from chunkcache.model import ALIASES, load_model, resolve


@pytest.fixture
def no_transformers_load(monkeypatch):
    """Any attempt to load a model through transformers (network, disk) fails the test."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("transformers was asked to load a model")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


@pytest.fixture
def no_model_load(monkeypatch):
    """The engine must not get as far as loading a model."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("chunkcache.engine.load_model", refuse)


# ---- model names ------------------------------------------------------------------------------


def test_unknown_names_fail_at_once_listing_the_aliases(tmp_path, no_transformers_load):
    for name in ("smollm2-13m", "not a model", "a/b/c", "../x"):
        with pytest.raises(ModelNotFoundError) as e:
            load_model(name)
        assert all(alias in str(e.value) for alias in ALIASES), str(e.value)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="no config.json.*weights.gguf"):
        load_model(str(tmp_path / "m"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        load_model(str(tmp_path / "notes.txt"))


def test_local_sources_resolve_without_the_network(tmp_path):
    folder, gguf = resolve("smollm2-135m")
    assert gguf
    assert resolve(f"{folder}/{gguf}") == (folder, gguf)  # a .gguf path
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == (str(tmp_path), None)  # a model folder
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)


# ---- engine arguments, before the model loads ----------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"codec": "int3"}, ValueError, "unknown codec 'int3'"),
        ({"policy": "nope"}, ValueError, "unknown policy"),
        ({"recompute_ratio": 1.5}, ValueError, "recompute_ratio"),
        ({"recompute_ratio": "0.5"}, TypeError, "recompute_ratio"),
        ({"sink": "eos"}, ValueError, "sink"),
        ({"dtype": "float64x"}, ValueError, "dtype 'float64x'"),
        ({"dtype": torch.int8}, ValueError, "dtype"),
        ({"device": "tpu:0:x"}, ValueError, "device"),
    ],
)
def test_engine_arguments_checked_before_the_model_loads(no_model_load, kwargs, error, match):
    with pytest.raises(error, match=match):
        ChunkCache(model="smollm2-135m", **kwargs)


def test_codecs_come_from_the_registry(no_model_load, monkeypatch):
    from chunkcache import codec

    monkeypatch.setitem(codec.CODECS, "int3", codec.CODECS["int4"])  # a codec someone registered
    with pytest.raises(AssertionError, match="model was loaded"):  # accepted: got as far as loading
        ChunkCache(model="smollm2-135m", codec="int3")


def test_store_path_checked_before_the_model_loads(tmp_path, no_model_load):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreReadOnlyError, match="not a directory"):
        ChunkCache(model="smollm2-135m", store=str(tmp_path / "file"))
    with pytest.raises(StoreReadOnlyError, match="cannot be created"):
        ChunkCache(model="smollm2-135m", store=str(tmp_path / "file" / "below"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if checks.os.access(ro, checks.os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(StoreReadOnlyError, match="cannot be created"):
            ChunkCache(model="smollm2-135m", store=str(ro / "cache.lmdb"))
    finally:
        ro.chmod(0o700)


# ---- fuse / generate arguments ------------------------------------------------------------------


def test_fuse_arguments_give_clear_errors(tiny_engine):
    with pytest.raises(TypeError, match="one str"):
        tiny_engine.fuse(PASSAGES[0], QUESTION)
    with pytest.raises(TypeError, match="query must be the question string"):
        tiny_engine.fuse(PASSAGES, None)
    with pytest.raises(ValueError, match="query is blank"):
        tiny_engine.fuse(PASSAGES, "  ")
    with pytest.raises(TypeError, match=r"chunks\[1\] must be a str"):
        tiny_engine.fuse([PASSAGES[0], 3], QUESTION)
    with pytest.raises(TypeError, match="recompute_ratio"):
        tiny_engine.fuse(PASSAGES, QUESTION, recompute_ratio="0.1")
    with pytest.raises(TypeError, match="one str"):
        tiny_engine.generate(PASSAGES[0], QUESTION)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_engine.generate(PASSAGES, QUESTION, max_new_tokens=0)
    with pytest.raises(TypeError, match="one str"):
        tiny_engine.precompute(PASSAGES[0])


def test_prompt_longer_than_the_context_is_refused_before_fusing(smol_tokenizer, monkeypatch):
    eng = ChunkCache(model=tiny_model(max_position_embeddings=256), tokenizer=smol_tokenizer)
    monkeypatch.setattr(eng, "_ensure_gate", lambda: pytest.fail("fusion work began"))
    long = " ".join(["The tower stands in Paris."] * 40)  # about 240 tokens, with the template over 256
    with pytest.raises(ValueError, match=r"prompt is \d+ tokens .* at most 256"):
        eng.fuse([long], QUESTION)


def test_generator_settings_checked_at_construction(tiny_engine):
    from chunkcache.integrations.langchain import ChunkCacheGenerator

    for bad in (
        {"recompute_ratio": 1.5},
        {"recompute_ratio": -0.1},
        {"policy": "nope"},
        {"max_new_tokens": 0},
    ):
        with pytest.raises(ValueError):
            ChunkCacheGenerator(engine=tiny_engine, **bad)
    assert ChunkCacheGenerator(engine=tiny_engine, recompute_ratio=1.0, policy="epic").policy == "epic"


# ---- the CLI ------------------------------------------------------------------------------------


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


@pytest.fixture
def no_engine(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the CLI built an engine before checking its input")

    monkeypatch.setattr("chunkcache.engine.ChunkCache", refuse)


def test_precompute_input_checked_before_the_model_loads(tmp_path, capsys, no_engine):
    store = str(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_text("not a text file")
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": 42}) + "\n")
    ok = tmp_path / "a.txt"
    ok.write_text("hello")
    cases = [
        ([str(tmp_path / "missing.txt"), "--store", store], "no such file"),
        ([str(tmp_path / "empty"), "--store", store], "no documents"),
        ([str(jl), "--store", store], "is int, not a string"),
        ([str(ok), "--store", store, "--codec", "int3"], "unknown codec"),
        ([str(ok), "--store", store, "--dtype", "float64x"], "float64x"),
        ([str(ok), "--store", str(ok)], "not a directory"),
        ([str(ok), "--store", store, "--emit", str(tmp_path)], "is a folder"),
        ([str(ok), "--store", store, "--chunk-tokens", "8", "--overlap", "8"], "overlap"),
    ]
    for argv, match in cases:
        assert main(["precompute", *argv]) == 2
        assert match in _one_line_error(capsys)


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["precompute"])
    assert e.value.code == 2
    assert "required" in _one_line_error(capsys)


def test_bench_help_lists_every_benchmark(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in BENCH_COMMANDS), out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    top = capsys.readouterr().out
    assert all(name in top for name in BENCH_COMMANDS), top


def test_cli_unknown_model_is_one_line_not_a_traceback(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    r = subprocess.run(
        [sys.executable, "-m", "chunkcache.cli", "precompute", str(tmp_path / "a.txt"), "--store",
         str(tmp_path / "s"), "--model", "smollm2-13m"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown model 'smollm2-13m'" in lines[0] and "smollm2-135m" in lines[0], (
        r.stderr
    )
