"""The public API is typed: every public function and method of fasttrain/ and fasttrain_kernels/ annotates each parameter
and its return, so that mypy (in the README's test command) checks their callers against them.

mypy itself cannot require annotations on public functions only (--disallow-untyped-defs takes every function),
and the Triton kernels must keep their parameters as they are: @triton.jit reads the annotations (tl.constexpr, and
a type hint changes how an argument is specialized). The kernels are private (`_..._kernel`), so this walk over the
source sees only what is public: a name without a leading underscore (dunders included), not nested in a function,
not in a private class. `self`/`cls` and the return of __init__ need no annotation.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fasttrain", "fasttrain_kernels")


def is_public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def unannotated(function: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> list[str]:
    """The parameters of `function` without an annotation, then "return" if its return has none."""
    a = function.args
    positional = [*a.posonlyargs, *a.args]
    params = [*positional, *a.kwonlyargs, *([a.vararg] if a.vararg else []), *([a.kwarg] if a.kwarg else [])]
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in function.decorator_list)
    if in_class and not static and positional and positional[0].arg in ("self", "cls"):
        params.remove(positional[0])
    missing = [p.arg for p in params if p.annotation is None]
    if function.returns is None and function.name != "__init__":
        missing.append("return")
    return missing


def gaps(path: Path, root: Path = ROOT) -> list[str]:
    """ "file: Class.function: what is not annotated" for each public function of the module at `path`."""
    found = []
    relative = path.relative_to(root).as_posix()

    def visit(node: ast.AST, classes: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                if is_public(child.name):
                    visit(child, [*classes, child.name])
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # A function's own nested functions and classes are not public: not visited.
                missing = unannotated(child, bool(classes)) if is_public(child.name) else []
                if missing:
                    found.append(f"{relative}: {'.'.join([*classes, child.name])}: {', '.join(missing)}")
            else:  # statements that hold definitions: if TYPE_CHECKING, try/except, ...
                visit(child, classes)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), [])
    return found


def all_gaps() -> set[str]:
    return {gap for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py")) for gap in gaps(path)}


def test_public_functions_are_annotated():
    found = sorted(all_gaps())
    assert not found, "public functions without annotations (parameters or return):\n" + "\n".join(found)


def test_the_walk_finds_gaps(tmp_path):
    """The check itself: what it reports and what it leaves alone."""
    source = """
def f(x, y: int) -> int: ...
def g(x: int): ...
def _private(x): ...
def __getattr__(name: str): ...
class C:
    def __init__(self, a): ...
    def m(self, *args, **kwargs) -> None: ...
    @classmethod
    def k(cls) -> None: ...
    @staticmethod
    def s(self) -> None: ...
    def _p(self, x): ...
    class Inner:
        def n(self): ...
class _Hidden:
    def m(self, x): ...
def outer() -> None:
    def nested(x): ...
if True:
    def conditional(x) -> None: ...
"""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mod.py").write_text(source)
    assert gaps(package / "mod.py", tmp_path) == [
        "pkg/mod.py: f: x",
        "pkg/mod.py: g: return",
        "pkg/mod.py: __getattr__: return",
        "pkg/mod.py: C.__init__: a",
        "pkg/mod.py: C.m: args, kwargs",
        "pkg/mod.py: C.s: self",
        "pkg/mod.py: C.Inner.n: return",
        "pkg/mod.py: conditional: x",
    ]
