"""The tree is the architecture: fasttrain/'s folders stand in one column, each importing only itself and those
below it; no two modules in a folder differ only by a suffix, and every module says what it is
(docs/architecture.md).

Floors, lowest first (FLOORS): system -> config -> compute -> formats -> preparation -> data -> model ->
checkpoints -> evaluation -> optimization -> planning -> training -> the commands and the package itself.
fasttrain_kernels/ stands alone and never imports fasttrain. No folder holds more than MAX_MODULES modules, each package's __init__ names its
modules in reading order, no module holds more than MAX_MODULE_LINES lines and no function more than
MAX_FUNCTION_LINES (a reader holds each at once; a total says nothing about that, issue 100).
"""

from __future__ import annotations

import ast
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = ("ation", "ing", "ion", "ed", "er", "e", "s")  # what turns one concept's name into a twin's


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in ("fasttrain", "fasttrain_kernels") for p in (ROOT / package).rglob("*.py")}


# fasttrain/'s folders, lowest first: each imports only itself and those before it here. "" is the top floor:
# the commands (fasttrain/*.py) and the package itself, which may import every folder.
FLOORS = (
    "system",  # errors, atomic writes, the run lock, signals: the process and its files
    "config",
    "compute",  # the device, precision and kernels, the kernel table, processes under torchrun
    "formats",  # the tokenizer, token shards, a prepared folder: what preparation writes and the rest reads
    "preparation",
    "data",
    "model",
    "checkpoints",  # a run's state, its saves and its run directory
    "evaluation",  # the loss sums, validation, a trained model loaded back, the harness
    "optimization",  # the objective, the optimizers, the learning rate's schedule
    "planning",  # what a run decides before it allocates: the shape, context, reading of the corpus, memory
    "training",
    "",
)


def folder(module: str) -> str:
    """The folder of fasttrain/ that `module` is in; "" for the commands and the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (ROOT / "fasttrain" / parts[1]).is_dir() else ""


def floor(module: str) -> int:
    """0 is the lowest floor; a module may import its own floor and those below."""
    return FLOORS.index(folder(module))


def imported_modules(path: Path) -> set[str]:
    """The fasttrain and fasttrain_kernels modules `path` imports, lazily inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from package import module` names the module
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {m for m in found if m.split(".")[0] in ("fasttrain", "fasttrain_kernels")}


GRAPH = {name: imported_modules(path) for name, path in MODULES.items()}


def test_the_floors_are_the_folders_of_fasttrain():
    """Every folder of fasttrain/ with modules in it stands on one floor of its own, and every floor is a folder."""
    folders = {p.parent.name for p in (ROOT / "fasttrain").glob("*/*.py")}
    assert folders == set(FLOORS) - {""}, (
        f"folders not in FLOORS: {folders - set(FLOORS)}; gone: {set(FLOORS) - folders - {''}}"
    )


def test_every_import_points_down_the_floors():
    """No module imports a folder above its own: with one folder a floor, no two folders import each other."""
    upward = [
        f"{m} ({folder(m) or 'commands'}, floor {floor(m)}) imports {dep} ({folder(dep) or 'commands'}, floor {floor(dep)})"
        for m, deps in GRAPH.items()
        if m.split(".")[0] == "fasttrain"
        for dep in deps
        if dep.split(".")[0] == "fasttrain" and floor(dep) > floor(m)
    ]
    assert not upward, "\n".join(upward)


def test_an_upward_import_is_caught():
    """The rule itself: training may import checkpoints, checkpoints may not import training, nor system config."""
    assert floor("fasttrain.checkpoints.checkpoint") < floor("fasttrain.training.trainer")
    assert floor("fasttrain.system.errors") < floor("fasttrain.config") < floor("fasttrain.compute.device")
    assert floor("fasttrain.formats.shards") < floor("fasttrain.preparation.cache") < floor("fasttrain.data.mixture")
    assert floor("fasttrain.evaluation.validation") < floor("fasttrain.training.trainer") < floor("fasttrain.doctor")
    assert floor("fasttrain") == floor("fasttrain.doctor") == len(FLOORS) - 1


def test_kernels_stand_alone():
    assert not [
        m
        for m, deps in GRAPH.items()
        if m.split(".")[0] == "fasttrain_kernels" and any(d.split(".")[0] == "fasttrain" for d in deps)
    ]


def test_no_import_cycles():
    def cycle_from(start: str, path: tuple[str, ...]) -> tuple[str, ...] | None:
        for dep in GRAPH.get(path[-1], ()):
            if dep == start:
                return path + (dep,)
            if dep not in path and dep in GRAPH and dep > start:  # each cycle is found from its smallest name
                found = cycle_from(start, path + (dep,))
                if found:
                    return found
        return None

    cycles = [" -> ".join(c) for m in GRAPH for c in [cycle_from(m, (m,))] if c]
    assert not cycles, "\n".join(cycles)


def stems(name: str) -> set[str]:
    """`name` and what is left of it without each suffix it ends with (keeping at least 4 letters)."""
    return {name} | {name[: -len(s)] for s in SUFFIXES if name.endswith(s) and len(name) - len(s) >= 4}


def twins(a: str, b: str) -> bool:
    return bool(stems(a) & stems(b))


@pytest.mark.parametrize("folder", sorted({p.parent for p in MODULES.values()}), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_two_modules_in_a_folder_differ_only_by_a_suffix(folder):
    names = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    found = [(a, b) for a, b in itertools.combinations(names, 2) if twins(a, b)]
    assert not found, f"{folder.relative_to(ROOT)}: {found}"


def test_the_twin_rule_catches_what_the_old_tree_had():
    for a, b in (
        ("checkpoint", "checkpointing"),
        ("evaluate", "evaluation"),
        ("trainer", "trained"),
        ("train", "trainer"),
    ):
        assert twins(a, b)
    assert not twins("trainer", "trained_model") and not twins("corpus", "documents")


def test_every_module_has_a_docstring():
    missing = [name for name, path in MODULES.items() if ast.get_docstring(ast.parse(path.read_text())) is None]
    assert not missing, missing


def imports_line(module: str) -> str:
    """The line a module's opening paragraphs carry: what it imports of its own project, lazily or not."""
    top = module.split(".")[0]
    deps = sorted(d[len(top) + 1 :] for d in GRAPH[module] if d.split(".")[0] == top and d not in (module, top))
    return f"Imports from {top}: {', '.join(deps) or 'nothing'}."


def test_every_module_says_what_it_imports_in_its_opening_lines():
    """So a reader knows a module's place before reading its code; the line is checked against the imports, so
    an import added without it (or one left in it after the import went) fails here with the line to write."""
    wrong = []
    for name, path in MODULES.items():
        opening = " ".join((ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[:3])
        if imports_line(name) not in " ".join(opening.split()):
            wrong.append(f"{path.relative_to(ROOT)}: {imports_line(name)}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.subprocess
def test_hugging_faces_kernels_installs_beside_ours_and_another_fasttrain_kernels_is_refused(tmp_path):
    """PyPI's other `kernels` (Hugging Face's) first on sys.path changes nothing: ours is fasttrain_kernels. A
    fasttrain_kernels that is not the one beside this fasttrain (another fasttrain's) is refused in one line."""
    for where, name in (("hf", "kernels"), ("other", "fasttrain_kernels")):
        (tmp_path / where / name).mkdir(parents=True)
        (tmp_path / where / name / "__init__.py").write_text("")

    def python(code: str, *path: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*path, ROOT]))}
        return subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
        )

    both = python(
        "import kernels, fasttrain, fasttrain_kernels; from fasttrain_kernels import FusedAdamW; "
        "print(kernels.__file__); print(fasttrain_kernels.__file__)",
        tmp_path / "hf",
    )
    hf_file, ours_file = both.stdout.split()
    assert both.returncode == 0 and hf_file.startswith(str(tmp_path)) and ours_file.startswith(str(ROOT)), both
    other = python("import fasttrain", tmp_path / "other")  # another fasttrain_kernels first
    assert other.returncode != 0
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fasttrain needs the fasttrain_kernels beside it") and str(tmp_path) in last


MAX_MODULES = 15  # a folder a reader can hold in their head; the next concept gets a folder of its own
FOLDERS = sorted({p.parent for p in MODULES.values()})


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_folder_holds_more_than_fifteen_modules(folder):
    names = [p.stem for p in folder.glob("*.py") if p.stem != "__init__"]
    assert len(names) <= MAX_MODULES, f"{folder.relative_to(ROOT)}: {len(names)} modules"


MAX_MODULE_LINES = 500  # a module a reader holds in their head
MAX_FUNCTION_LINES = 80  # a function a reader holds at once, decorators and docstring included (issue 100)
# Functions still over MAX_FUNCTION_LINES, each to be split along a seam (never packed to fit): an entry leaves
# this list when its function is split, and the test fails on an entry that is no longer long, so it only shrinks.
LONG_FUNCTIONS: set[str] = set()


def function_lengths() -> dict[str, int]:
    """Every function and method of fasttrain/: "path:name" -> its lines, decorators included (the longest of a
    name in a module, where several share it)."""
    lengths: dict[str, int] = {}
    for path in sorted((ROOT / "fasttrain").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                key = f"{path.relative_to(ROOT)}:{node.name}"
                lengths[key] = max(lengths.get(key, 0), (node.end_lineno or node.lineno) - first + 1)
    return lengths


def test_each_module_within_five_hundred_lines():
    sizes = {p: p.read_bytes().count(b"\n") for p in (ROOT / "fasttrain").rglob("*.py")}  # as `wc -l` counts
    over = [f"{p.relative_to(ROOT)} {n}" for p, n in sizes.items() if n > MAX_MODULE_LINES]
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split out a concept of their own): {over}"


def test_each_function_within_eighty_lines():
    lengths = function_lengths()
    over = {key for key, n in lengths.items() if n > MAX_FUNCTION_LINES}
    new = sorted(f"{key} {lengths[key]}" for key in over - LONG_FUNCTIONS)
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines (split along a seam): {new}"
    split = sorted(LONG_FUNCTIONS - over)
    assert not split, f"no longer over {MAX_FUNCTION_LINES} lines: take them out of LONG_FUNCTIONS: {split}"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_package_names_its_modules_in_its_opening_lines(folder):
    opening = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    unnamed = [p.stem for p in folder.glob("*.py") if p.stem != "__init__" and not re.search(rf"\b{p.stem}\b", opening)]
    assert not unnamed, f"{folder.relative_to(ROOT)}/__init__.py does not name {unnamed}"
