"""The native module's stub, python/smolcandle/_native.pyi, describes the module as built: every
class, method, property, function and constant of one is in the other, of the same kind and with
the same parameters, so the stub cannot drift from the bindings unnoticed."""

from __future__ import annotations

import ast
import inspect
import sys
import types
from pathlib import Path

import smolcandle
from smolcandle import _native

STUB = Path(smolcandle.__file__).parent / "_native.pyi"

#: The special methods a stub spells out (a class's constructor is ``__init__`` in the stub and
#: ``__new__`` in the bindings); others, such as ``__repr__``, every object has.
PROTOCOL = {"__init__", "__iter__", "__next__", "__enter__", "__exit__", "__len__", "__getitem__", "__call__"}


def _parameters_of_stub(node: ast.FunctionDef, *, bound: bool) -> list[tuple[str, str, bool]]:
    """``(name, kind, has a default)`` of each parameter, without ``self``."""
    a = node.args
    positional = [*a.posonlyargs, *a.args]
    defaults = [False] * (len(positional) - len(a.defaults)) + [True] * len(a.defaults)
    out = [(p.arg, "positional", d) for p, d in zip(positional, defaults)]
    if a.vararg:
        out.append((a.vararg.arg, "*", False))
    out += [(p.arg, "keyword", d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append((a.kwarg.arg, "**", False))
    return out[1:] if bound else out


def _parameters_at_run_time(obj: object) -> list[tuple[str, str, bool]]:
    kinds = {
        inspect.Parameter.POSITIONAL_ONLY: "positional",
        inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
        inspect.Parameter.VAR_POSITIONAL: "*",
        inspect.Parameter.KEYWORD_ONLY: "keyword",
        inspect.Parameter.VAR_KEYWORD: "**",
    }
    params = inspect.signature(obj).parameters.values()
    return [(p.name, kinds[p.kind], p.default is not inspect.Parameter.empty) for p in params]


def _stub() -> tuple[dict[str, ast.FunctionDef], set[str], dict[str, dict[str, tuple[str, ast.FunctionDef]]]]:
    """The stub's functions, constants, and classes with their members as ``(kind, node)``."""
    functions: dict[str, ast.FunctionDef] = {}
    constants: set[str] = set()
    classes: dict[str, dict[str, tuple[str, ast.FunctionDef]]] = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            constants.add(node.target.id)
        elif isinstance(node, ast.ClassDef):
            members = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    decorators = {d.id for d in item.decorator_list if isinstance(d, ast.Name)}
                    kind = "property" if "property" in decorators else "staticmethod" if "staticmethod" in decorators else "method"
                    members[item.name] = (kind, item)
            classes[node.name] = members
    return functions, constants, classes


def _kind_at_run_time(cls: type, name: str) -> str:
    member = vars(cls)[name]
    if isinstance(member, staticmethod):
        return "staticmethod"
    if inspect.isdatadescriptor(member):
        return "property"
    return "method"


def _members_at_run_time(cls: type) -> dict[str, str]:
    out = {}
    for name in vars(cls):
        if name == "__new__":
            out["__init__"] = "method"
        elif not name.startswith("_") or name in PROTOCOL:
            out[name] = _kind_at_run_time(cls, name)
    return out


def test_the_stub_names_the_module_s_classes_functions_and_constants():
    functions, constants, classes = _stub()
    public = {name: value for name, value in vars(_native).items() if not name.startswith("__") or name == "__version__"}
    assert set(classes) == {n for n, v in public.items() if isinstance(v, type)}
    assert set(functions) == {n for n, v in public.items() if isinstance(v, types.BuiltinFunctionType)}
    assert constants == {n for n, v in public.items() if not isinstance(v, (type, types.BuiltinFunctionType))}


def test_each_class_s_members_are_the_stub_s_of_the_same_kind():
    _, _, classes = _stub()
    for name, stubbed in classes.items():
        cls = getattr(_native, name)
        at_run_time = _members_at_run_time(cls)
        assert {m: kind for m, (kind, _) in stubbed.items()} == at_run_time, name


def test_functions_and_methods_take_the_stub_s_parameters():
    functions, _, classes = _stub()
    for name, node in functions.items():
        assert _parameters_of_stub(node, bound=False) == _parameters_at_run_time(getattr(_native, name)), name
    for cls_name, members in classes.items():
        cls = getattr(_native, cls_name)
        for name, (kind, node) in members.items():
            if kind == "property" or name in PROTOCOL - {"__init__"}:
                continue
            stubbed = _parameters_of_stub(node, bound=kind != "staticmethod")
            if name == "__init__":  # the class's signature is its constructor's, without self
                at_run_time = _parameters_at_run_time(cls)
            else:  # a method's is its descriptor's, with self
                at_run_time = _parameters_at_run_time(vars(cls)[name].__func__ if kind == "staticmethod" else getattr(cls, name))
                at_run_time = at_run_time[1:] if kind == "method" else at_run_time
            assert stubbed == at_run_time, f"{cls_name}.{name}"


def test_a_drifted_stub_is_caught(tmp_path, monkeypatch):
    """The checks above fail on a stub without a property the module has."""
    text = STUB.read_text()
    monkeypatch.setattr(sys.modules[__name__], "STUB", tmp_path / "drifted.pyi")
    (tmp_path / "drifted.pyi").write_text(text.replace("    def queue_position(self) -> int:", "    def queue_place(self) -> int:"))
    try:
        test_each_class_s_members_are_the_stub_s_of_the_same_kind()
    except AssertionError as e:
        assert "TokenStream" in str(e)
    else:
        raise AssertionError("a stub without TokenStream.queue_position passed")
