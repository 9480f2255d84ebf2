"""The documentation checks itself: the API reference matches the docstrings,
and every runnable example in the Markdown files and the docstrings runs.

Convention for Markdown (README.md, docs/*.md except the generated API.md): a
fenced block opened with exactly ```python runs; blocks of one file run in
order in one namespace (a guide builds on its earlier blocks), like one
doctest session. A block whose first line is ``# not run`` (say why after it)
is skipped, and one whose first line is ``# needs: torch, transformers``
runs only where those modules import (CI has them; the wheel tests may
not); any other fence (```text, ```bash, an indented block) is not code
to run. Docstrings: ``>>>`` examples run as doctests with ``np`` and
``cpuattn`` imported.
"""
from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import cpuattn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import api_docs  # noqa: E402  (tools/ is not a package)

MARKDOWN = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "API.md")
FENCE_OPEN = re.compile(r"^```python\s*$")
NOT_RUN = "# not run"
NEEDS = re.compile(r"^# needs: *(.+)$")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number of the first code line, code) of every ```python block."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        if FENCE_OPEN.match(lines[i]):
            start = i + 1
            i = start
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            if i == len(lines):
                raise AssertionError(f"{path.name}:{start}: unclosed ```python block")
            blocks.append((start + 1, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return blocks


def _needs_optional():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


def test_api_reference_is_current(tmp_path):
    # The committed reference documents the optional modules too, so compare
    # only where they import (CI has torch and transformers).
    _needs_optional()
    out = tmp_path / "API.md"
    assert api_docs.main(["--out", str(out)]) == 0
    committed = (ROOT / "docs" / "API.md").read_text()
    if out.read_text() != committed:
        diff = api_docs.difflib.unified_diff(committed.splitlines(True), out.read_text().splitlines(True),
                                             "docs/API.md", "regenerated", n=1)
        pytest.fail("docs/API.md is out of date; run `python tools/api_docs.py`:\n" + "".join(list(diff)[:80]))
    assert api_docs.main(["--out", str(out), "--check"]) == 0


def test_api_reference_covers_every_public_name():
    text = api_docs.generate()
    for mod in (cpuattn, cpuattn.layers):
        for name in mod.__all__:
            assert f"### `{mod.__name__}.{name}`" in text, name
    for name in ("append", "plan", "write"):
        assert f"#### `cpuattn.PagePool.{name}`" in text, name
    assert "#### `cpuattn.PagedPlan.run`" in text
    assert " at 0x" not in text  # no addresses: the output must not change between runs
    assert text == api_docs.generate()


def test_api_reference_says_when_optional_modules_are_missing(monkeypatch):
    monkeypatch.setattr(api_docs, "MODULES", api_docs.MODULES[:1] + [("cpuattn._no_such_module", "nothing")])
    text = api_docs.generate()
    assert "**Incomplete:** generated without `cpuattn._no_such_module` (needs nothing)." in text
    assert "## cpuattn._no_such_module" not in text


def test_python_blocks_parser(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("a\n```python\nx = 1\n```\n```text\nnot code\n```\n```python\n# not run: needs a GPU\nboom\n```\n")
    assert python_blocks(md) == [(3, "x = 1\n"), (9, "# not run: needs a GPU\nboom\n")]
    md.write_text("```python\nx = 1\n")
    with pytest.raises(AssertionError, match="unclosed"):
        python_blocks(md)


def run_markdown(path: Path) -> dict:
    """Run the runnable blocks of ``path`` in order in one namespace; return it."""
    ns: dict = {"__name__": f"__{path.stem}_examples__"}
    for lineno, code in python_blocks(path):
        first = (code.lstrip().splitlines() or [""])[0]
        if first.startswith(NOT_RUN):
            continue
        needs = NEEDS.match(first)
        if needs and any(importlib.util.find_spec(m.strip()) is None for m in needs.group(1).split(",")):
            continue  # an optional dependency is missing here; CI has them all
        # Pad with newlines so a traceback names the line in the Markdown file.
        exec(compile("\n" * (lineno - 1) + code, str(path), "exec"), ns)
    return ns


def test_run_markdown_conventions(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("```python\nx = 1\n```\n```python\n# not run: illustration\nboom\n```\n"
                  "```python\n# needs: no_such_module_cpuattn\nboom\n```\n"
                  "```python\n# needs: numpy\ny = x + 1\n```\n```text\nboom\n```\n")
    assert run_markdown(md)["y"] == 2
    md.write_text("```python\nx = 1\n\n1 / 0\n```\n")
    with pytest.raises(ZeroDivisionError) as err:
        run_markdown(md)
    assert err.traceback[-1].lineno + 1 == 4  # the line in the Markdown file (traceback is 0-based)


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_examples_run(path):
    run_markdown(path)


def _public_objects():
    """Every public module, function, class and method the reference documents."""
    for modname, needs in api_docs.MODULES:
        if needs is not None and importlib.util.find_spec(needs) is None:
            continue
        mod = importlib.import_module(modname)
        yield modname, mod
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or not (callable(obj) or inspect.isclass(obj)):
                continue
            yield f"{modname}.{name}", obj
            if inspect.isclass(obj):
                for mname, raw in api_docs._members(obj):
                    yield f"{modname}.{name}.{mname}", raw if api_docs._is_property(raw) else getattr(obj, mname)


def test_docstring_examples_run():
    finder = doctest.DocTestFinder(recurse=False, exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    objects = list(_public_objects())
    assert len(objects) > 50, "the public surface was not found"  # a vacuous pass would hide that
    for qual, obj in objects:
        for test in finder.find(obj, qual, module=False, globs={"np": np, "cpuattn": cpuattn}):
            runner.run(test, out=report.append)
    assert runner.summarize(verbose=False).failed == 0, "".join(report)
