"""Every Python block of README.md runs as pasted, with the default model, in a temporary folder.

A block is its own Python session unless the line before it says
``<!-- readme-test: continues the previous block -->`` (it then runs in the namespace of the
previous block that ran). ``<!-- readme-test: skip: REASON -->`` skips a block; the README says why
(a CUDA device, a Redis server, the reader's own LLM). Ending a session closes the stores its
engines opened, as leaving Python would. ``load_model`` is memoised across sessions so the model
is read from its package once: the blocks still run exactly as written.
"""

from __future__ import annotations

import functools
import re
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^(?P<indent>[ \t]*)```python\n(?P<code>.*?)^(?P=indent)```", re.S | re.M)
_MARK = re.compile(r"<!--\s*readme-test:\s*(?P<what>continues|skip)\b:?\s*(?P<why>.*?)\s*-->")


def readme_blocks() -> list[tuple[int, str, str | None, str]]:
    """(line, mode, reason, code) per Python block; mode is ``new``, ``continues`` or ``skip``."""
    text = README.read_text()
    out = []
    for m in _BLOCK.finditer(text):
        before = text[: m.start()].rstrip().splitlines()
        mark = _MARK.search(before[-1]) if before else None
        mode = mark.group("what") if mark else "new"
        reason = mark.group("why") if mark and mode == "skip" else None
        line = text[: m.start()].count("\n") + 1
        out.append((line, mode, reason, textwrap.dedent(m.group("code"))))
    return out


def test_readme_marks_are_understood():
    blocks = readme_blocks()
    assert len(blocks) >= 6
    assert all(reason for _, mode, reason, _ in blocks if mode == "skip"), "a skip must say why"
    assert blocks[0][1] == "new"


@pytest.mark.slow
def test_readme_python_blocks_run_as_pasted(tmp_path, monkeypatch):
    import chunkcache.engine as engine_module
    from chunkcache.engine import ChunkCache

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(engine_module, "load_model", functools.cache(engine_module.load_model))
    sessions: list[dict] = []
    ran = 0
    for line, mode, _, code in readme_blocks():
        if mode == "skip":
            continue
        if mode == "new" or not sessions:
            for ns in sessions[-1:]:
                _end_session(ns, ChunkCache)
            sessions.append({"__name__": "__main__"})
        try:
            exec(compile(code, f"README.md:{line}", "exec"), sessions[-1])
        except Exception as e:
            raise AssertionError(f"README.md block at line {line} fails as pasted: {e!r}\n{code}") from e
        ran += 1
    for ns in sessions[-1:]:
        _end_session(ns, ChunkCache)
    assert ran >= 4


def _end_session(ns: dict, engine_type) -> None:
    for value in ns.values():
        if isinstance(value, engine_type):
            value.store.close()
