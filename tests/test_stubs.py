"""Each compiled module's .pyi stub names exactly its public names (and the
public members of its classes) with the same parameter names, so a stub
cannot drift from the .pyx it describes."""
import ast
import importlib
import inspect
import pathlib
import types

import pytest

import cpuattn

PKG = pathlib.Path(cpuattn.__file__).parent
SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "cpuattn"
COMPILED = sorted(p.stem for p in SRC.glob("_*.pyx"))


def _public(name):
    return not name.startswith("_")


def _stub_names(body):
    """name -> ast node (first definition) of the public names a stub body defines."""
    names = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found = [(node.name, node)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found = [(node.target.id, node)]
        elif isinstance(node, ast.Assign):
            found = [(t.id, node) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.ImportFrom):
            # only the explicit re-export form "from x import y as y" is public
            found = [(a.name, node) for a in node.names if a.asname == a.name]
        else:
            found = []
        for name, n in found:
            if _public(name):
                names.setdefault(name, n)
    return names


def _module_names(mod):
    """Public names a compiled module defines or re-exports (not modules, not
    classes or functions it merely imported from elsewhere)."""
    names = {}
    for name in dir(mod):
        obj = getattr(mod, name)
        if not _public(name) or isinstance(obj, types.ModuleType):
            continue
        if (inspect.isclass(obj) or callable(obj)) and getattr(obj, "__module__", None) != mod.__name__:
            continue
        names[name] = obj
    return names


def _stub(name):
    path = PKG / f"{name}.pyi"
    assert path.exists(), f"{name}.pyx has no stub {name}.pyi"
    return ast.parse(path.read_text(), str(path))


def _params(fn):
    return [p.name for p in inspect.signature(fn).parameters.values()]


def _stub_params(node):
    a = node.args
    return [x.arg for x in a.posonlyargs + a.args + ([a.vararg] if a.vararg else [])
            + a.kwonlyargs + ([a.kwarg] if a.kwarg else [])]


def test_every_compiled_module_has_a_stub():
    assert COMPILED == ["_backward", "_forward", "_plan", "_pool", "_quant", "_roofline", "_threads"]
    assert (PKG / "py.typed").exists()


@pytest.mark.parametrize("name", COMPILED)
def test_stub_matches_module(name):
    mod = importlib.import_module(f"cpuattn.{name}")
    assert mod.__file__.endswith((".so", ".pyd")), mod.__file__
    stub = _stub_names(_stub(name).body)
    real = _module_names(mod)
    assert sorted(stub) == sorted(real), (
        f"{name}.pyi: missing {sorted(set(real) - set(stub))}, "
        f"not in the module {sorted(set(stub) - set(real))}")
    for key, node in stub.items():
        obj = real[key]
        if isinstance(node, ast.FunctionDef):
            assert _stub_params(node) == _params(obj), f"{name}.{key}: parameters differ"
        elif isinstance(node, ast.ClassDef):
            members = {}
            for base in node.bases:   # members a stub class inherits from one in the same stub
                if isinstance(base, ast.Name) and isinstance(stub.get(base.id), ast.ClassDef):
                    members.update(_stub_names(stub[base.id].body))
            members.update(_stub_names(node.body))
            have = {m for m in dir(obj) if _public(m)}
            assert sorted(members) == sorted(have), (
                f"{name}.{key}: missing {sorted(have - set(members))}, "
                f"not in the class {sorted(set(members) - have)}")
            for m, mnode in members.items():
                attr = inspect.getattr_static(obj, m)
                if isinstance(mnode, ast.FunctionDef) and callable(attr):
                    want = _stub_params(mnode)
                    if not any(isinstance(d, ast.Name) and d.id == "property"
                               for d in mnode.decorator_list):
                        assert want == _params(getattr(obj, m)), \
                            f"{name}.{key}.{m}: parameters differ"


def test_stub_check_catches_drift():
    """The comparison above fails on a stub with a missing or an extra name."""
    stub = _stub_names(ast.parse("def get_isa() -> str: ...\nX: int\n").body)
    real = _module_names(importlib.import_module("cpuattn._threads"))
    assert set(stub) - set(real) == {"X"}
    assert "set_isa" in set(real) - set(stub)
