"""Write the API reference (docs/API.md) from the docstrings of the public names.

    python tools/api_docs.py            # regenerate docs/API.md (after a build)
    python tools/api_docs.py --check    # exit 1 if docs/API.md is out of date
    python tools/api_docs.py --gaps     # list public names whose docstring lacks a section

The public surface is ``cpuattn.__all__`` (classes with their public methods
and properties), ``cpuattn.layers``, and the optional ``cpuattn.torch`` and
``cpuattn.integrations.hf`` (documented only when torch / transformers import;
the output says which were left out, so a partial reference cannot pass for a
whole one). Only the standard library is used (``inspect``), and the output
depends only on the source: no addresses, no machine facts.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import functools
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "API.md"
# (module, what it needs beyond numpy); order is the order of the sections.
MODULES = [
    ("cpuattn", None),
    ("cpuattn.layers", None),
    ("cpuattn.torch", "torch"),
    ("cpuattn.integrations.hf", "transformers"),
]
# Google-style section headings (a line "Args:"); --gaps looks for these.
ARGS_HEADINGS = ("Args", "Arguments", "Parameters")
RETURNS_HEADINGS = ("Returns", "Yields")
RAISES_HEADINGS = ("Raises",)
WIDTH = 88
FINAL = re.compile(r"^Final\[(.*)\]$")  # a stub's read-only marker; the heading says property


def _anchor(name: str) -> str:
    """GitHub's heading anchor for ``### `name` ``: lower case, dots dropped."""
    return re.sub(r"[^a-z0-9_\- ]", "", name.lower()).replace(" ", "-")


class _Ann(str):
    """An annotation kept as source text (``from __future__ import annotations``),
    printed without the quotes ``inspect`` would put around a string."""

    def __repr__(self) -> str:
        return str(self)


@functools.lru_cache(maxsize=None)
def _stub_defs(modname: str) -> dict[str, object]:
    """Signatures (as functions) and attribute annotations from the ``.pyi`` stub
    beside a compiled module: Cython objects carry no signature of their own."""
    mod = sys.modules[modname]
    path = Path(getattr(mod, "__file__", "") or "")
    pyi = path.parent / (path.name.split(".")[0] + ".pyi")
    if not pyi.is_file():
        return {}
    out: dict[str, object] = {}

    def visit(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")
            elif isinstance(node, ast.FunctionDef):  # the last overload is the general one
                node.decorator_list, node.body = [], [ast.Pass()]
                ns: dict = {}
                try:
                    exec(compile("from __future__ import annotations\n" + ast.unparse(node), str(pyi), "exec"), ns)
                except NameError:  # a default that names something: introspect the object instead
                    continue
                out[prefix + node.name] = ns[node.name]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                out[prefix + node.target.id] = _Ann(ast.unparse(node.annotation))

    visit(ast.parse(pyi.read_text()).body, "")
    return out


def _stub(obj, qual: str):
    """The stub entry for ``obj`` (``qual`` is its name inside its module), or None."""
    module = getattr(obj, "__module__", None) or ""
    return _stub_defs(module).get(qual) if module in sys.modules else None


def _signature(name: str, obj, stub=None) -> str:
    """``name(params) -> ret``, one parameter per line when it is long."""
    try:
        sig = inspect.signature(stub or obj)
    except (TypeError, ValueError):
        return f"{name}(...)  # signature not introspectable"
    params, kinds = [], []
    for p in sig.parameters.values():
        if p.name in ("self", "cls") and (inspect.isclass(obj) or not params):
            continue
        if isinstance(p.annotation, str):
            p = p.replace(annotation=_Ann(p.annotation))
        if p.kind is p.KEYWORD_ONLY and p.VAR_POSITIONAL not in kinds and p.KEYWORD_ONLY not in kinds:
            params.append("*")  # the markers Signature.__str__ would print
        if p.kind is not p.POSITIONAL_ONLY and p.POSITIONAL_ONLY in kinds[-1:]:
            params.append("/")
        params.append(str(p))
        kinds.append(p.kind)
    if kinds[-1:] == [inspect.Parameter.POSITIONAL_ONLY]:
        params.append("/")
    ret = ""
    if sig.return_annotation is not inspect.Signature.empty and not inspect.isclass(obj):
        ann = sig.return_annotation
        ret = " -> " + (ann if isinstance(ann, str) else inspect.formatannotation(ann))
    one = f"{name}({', '.join(params)}){ret}"
    text = one if len(one) <= WIDTH else f"{name}(\n" + "".join(f"    {p},\n" for p in params) + f"){ret}"
    # Defaults that are objects print their address; that would change every run.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Yields|Raises|Attributes|Examples?|Notes?|Warns?):\s*$")
LISTED = ("Args", "Arguments", "Parameters", "Raises", "Attributes", "Warns")
ITEM = re.compile(r"^    (\S[^:(]*?):(?:\s+(.*))?$")  # "    name: text" (a name has no parenthesis)


def _markdown(doc: str) -> str:
    """Google-style docstring text as Markdown: sections become bold headings,
    ``name: text`` entries list items, ``>>>`` runs fenced code, roles plain code."""
    doc = re.sub(r":(?:func|class|meth|attr|mod|data|exc):`~?([^`]+)`", r"``\1``", doc)
    doc = re.sub(r"::$", ":", doc, flags=re.M)  # reST's literal-block marker; Markdown indents suffice
    out: list[str] = []
    section, in_code = None, False
    for line in doc.splitlines():
        m = SECTION.match(line)
        if m:
            section = m.group(1)
            out += ["", f"**{section}**", ""]
            continue
        if section is None:
            out.append(line)
            continue
        if not line.strip():
            if in_code:
                out.append("```")
                in_code = False
            out.append("")
            continue
        if not line.startswith(" "):  # text back at the left margin ends the section
            section = None
            out.append(line)
            continue
        body = line[4:] if line.startswith("    ") else line.lstrip()
        if body.startswith(">>>") and not in_code:
            out.append("```pycon")
            in_code = True
        if in_code:
            out.append(body)
        elif section in LISTED and (item := ITEM.match(line)):
            out.append(f"- ``{item.group(1)}``: {item.group(2) or ''}".rstrip())
        elif section in LISTED:
            out.append("  " + body.strip())  # continuation of the item above
        else:
            out.append(body.strip())
    if in_code:
        out.append("```")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def _doc(obj) -> str:
    doc = inspect.getdoc(obj)
    return _markdown(doc.strip()) if doc else "*(no docstring)*"


def _members(cls) -> list[tuple[str, object]]:
    """Public methods and properties defined on ``cls`` itself, in source order."""
    out = []
    for name, raw in cls.__dict__.items():
        if name.startswith("_") and name not in ("__call__", "__enter__", "__exit__"):
            continue
        if name.startswith("__") and not (raw.__doc__ or "").strip():
            continue  # protocol methods without their own text say nothing new
        out.append((name, raw))
    return out


def _is_property(raw) -> bool:
    return isinstance(raw, property) or type(raw).__name__ == "getset_descriptor"


def _render_object(qual: str, obj, lines: list[str]) -> None:
    lines += [f"### `{qual}`", ""]
    short = qual.rsplit(".", 1)[-1]
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        bases = ", ".join(b.__name__ if b.__module__ == "builtins" else f"{b.__module__}.{b.__name__}"
                          for b in obj.__bases__)
        lines += [f"Exception, subclass of `{bases}`.", "", _doc(obj), ""]
        return
    if inspect.isclass(obj):
        init = _stub(obj, obj.__qualname__ + ".__init__")
        lines += ["```python", "class " + _signature(short, obj, init), "```", "", _doc(obj), ""]
        for name, raw in _members(obj):
            member = getattr(obj, name)
            stub = _stub(obj, f"{obj.__qualname__}.{name}")
            if _is_property(raw):
                typed = "`" + FINAL.sub(r"\1", stub) + "`. " if isinstance(stub, str) else ""
                text = _doc(raw) if (raw.__doc__ or "").strip() else "See the class docstring."
                lines += [f"#### `{qual}.{name}` (property)", "", typed + text, ""]
            else:
                kind = " (static method)" if isinstance(raw, staticmethod) else (
                    " (class method)" if isinstance(raw, classmethod) else "")
                lines += [f"#### `{qual}.{name}`{kind}", "", "```python",
                          _signature(name, member, stub if callable(stub) else None), "```", "", _doc(member), ""]
        return
    if callable(obj):
        stub = _stub(obj, getattr(obj, "__qualname__", short))
        lines += ["```python", _signature(short, obj, stub if callable(stub) else None), "```", "", _doc(obj), ""]
        return
    lines += [f"Constant: `{obj!r}`", ""]


def _public(mod) -> list[str]:
    names = getattr(mod, "__all__", None)
    if names is None:
        raise SystemExit(f"{mod.__name__} has no __all__: its public surface is undefined")
    return list(names)


def generate() -> str:
    """The whole reference as one Markdown string."""
    loaded, missing = [], []
    for modname, needs in MODULES:
        try:
            loaded.append(importlib.import_module(modname))
        except ImportError as exc:
            if needs is None:
                raise
            missing.append((modname, needs, exc))
    lines = [
        "# cpuattn API reference",
        "",
        "<!-- Generated by tools/api_docs.py from the docstrings; do not edit by hand.",
        "     Regenerate: python tools/api_docs.py   (tests/test_docs.py fails when it is stale) -->",
        "",
        "Layouts, dtypes, masks, determinism and errors are common to every call: the",
        "README's \"Use\" section states them once. Each entry below is the docstring of",
        "the public name, with its signature.",
        "",
    ]
    if missing:
        lines += ["**Incomplete:** generated without " + ", ".join(
            f"`{n}` (needs {needs})" for n, needs, _ in missing) + ".", ""]
    lines += ["Modules:", ""]
    for mod in loaded:
        lines.append(f"- [`{mod.__name__}`](#{_anchor(mod.__name__)})")
    lines.append("")
    for mod in loaded:
        lines += [f"## {mod.__name__}", "", _doc(mod), ""]
        for name in _public(mod):
            obj = getattr(mod, name)
            if inspect.ismodule(obj):
                lines += [f"### `{mod.__name__}.{name}`", "", f"Module: see [`{obj.__name__}`](#{_anchor(obj.__name__)}).", ""]
                continue
            _render_object(f"{mod.__name__}.{name}", obj, lines)
    return "\n".join(lines).rstrip() + "\n"


def gaps() -> list[str]:
    """Public callables whose docstring lacks a section: Args (if it takes any),
    Returns (unless it returns None), Raises (if it takes arguments), Examples."""
    found = []

    def check(qual: str, obj, stub, is_class: bool = False) -> None:
        doc = inspect.getdoc(obj) or ""
        if not doc:
            found.append(f"{qual}: no docstring")
            return
        try:
            sig = inspect.signature(stub if callable(stub) else obj)
            takes = any(p not in ("self", "cls") for p in sig.parameters)
            ret = sig.return_annotation
            returns = not is_class and ret not in (None, "None")
        except (TypeError, ValueError):
            takes, returns = True, not is_class
        have = {m.group(1) for line in doc.splitlines() if (m := SECTION.match(line))}
        miss = [section for section, wanted, heads in (
            ("Args", takes, ARGS_HEADINGS), ("Returns", returns, RETURNS_HEADINGS),
            ("Raises", takes, RAISES_HEADINGS)) if wanted and not have & set(heads)]
        if ">>>" not in doc:
            miss.append("Examples")
        if miss:
            found.append(f"{qual}: no {', '.join(miss)} section")

    for modname, _ in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for name in _public(mod):
            obj, qual = getattr(mod, name), f"{modname}.{name}"
            if inspect.ismodule(obj) or not callable(obj):
                continue
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                if not inspect.getdoc(obj):
                    found.append(f"{qual}: no docstring")
                continue
            if not inspect.isclass(obj):
                check(qual, obj, _stub(obj, getattr(obj, "__qualname__", name)))
                continue
            check(qual, obj, _stub(obj, obj.__qualname__ + ".__init__"), is_class=True)
            for mname, raw in _members(obj):
                if _is_property(raw):
                    if not (raw.__doc__ or "").strip():
                        found.append(f"{qual}.{mname}: property without docstring")
                    continue
                check(f"{qual}.{mname}", getattr(obj, mname), _stub(obj, f"{obj.__qualname__}.{mname}"))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write (default docs/API.md)")
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing; exit 1 on a difference")
    ap.add_argument("--gaps", action="store_true", help="list public names whose docstring lacks a section")
    args = ap.parse_args(argv)
    if args.gaps:
        print("\n".join(gaps()))
        return 0
    text = generate()
    if args.check:
        old = args.out.read_text() if args.out.exists() else ""
        if old == text:
            return 0
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                   str(args.out), "regenerated"))
        print(f"\n{args.out} is out of date: run python tools/api_docs.py", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    # run as a script from a checkout: the in-place build, as the tests use it
    # (never inside a test run: a changed sys.path reaches every process it spawns)
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
