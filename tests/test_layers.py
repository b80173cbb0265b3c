"""The house's shape: one installed top-level name, no import cycles, and arrows that point down.

Layers, from the bottom: the building blocks (`sentimerge.pipeline.core`, and the methods `sentimerge.curriculum`,
`sentimerge.experts`, `sentimerge.merge`), the stage scripts (`sentimerge.pipeline.<stage>`), and on top the
orchestrators and entry points (`run`, `report`, the API, the CLI, the kill harness). The imports are read from the
source (every `import`, also inside functions), so a lazy import cannot hide an upward arrow.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"sentimerge": "sentimerge", "sentimerge.pipeline": "pipeline", "sentimerge.experts": "experts",
           "sentimerge.merge": "merge", "sentimerge.curriculum": "curriculum"}
BUILDING_BLOCKS = ("sentimerge.pipeline.core", "sentimerge.curriculum", "sentimerge.experts", "sentimerge.merge")
# above the stage scripts: they may import any stage
ORCHESTRATORS = {"sentimerge", "sentimerge.__main__", "sentimerge.pipeline.__main__", "sentimerge.pipeline.api",
                 "sentimerge.pipeline.cli", "sentimerge.pipeline.run", "sentimerge.pipeline.report",
                 "sentimerge.pipeline.killtest"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def imports_of(path: Path, modules: dict[str, Path], *, scripts: bool = True) -> set[str]:
    """The project modules `path` imports (`from package import module` counts as the module); with
    `scripts=False`, not the imports of its `if __name__ == "__main__":` block (a script's entry, the top by nature)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set() if scripts else {id(inner) for node in ast.walk(tree) if _is_main_guard(node)
                                     for inner in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path `a -> b -> ... -> a`, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph(*, scripts: bool = True) -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules, scripts=scripts) - {name} for name, path in modules.items()}


def test_the_cycle_finder_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_reader_sees_lazy_imports_and_packages(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from sentimerge.pipeline import run\n    import sentimerge.merge.lora\n"
                      "if __name__ == '__main__':\n    from sentimerge.pipeline.cli import main\n")
    modules = project_modules()
    assert imports_of(source, modules) == {"sentimerge.pipeline.run", "sentimerge.merge.lora",
                                           "sentimerge.pipeline.cli"}
    assert "sentimerge.pipeline.cli" not in imports_of(source, modules, scripts=False)


def test_no_import_cycle_among_the_project_modules():
    # a `__main__` block runs only in the process that started the module as a script, never on import
    graph = import_graph(scripts=False)
    assert len(graph) > 40  # the reader found the project
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _layer(module: str) -> int:
    if module.startswith(BUILDING_BLOCKS):
        return 0
    if module in ORCHESTRATORS or module == "sentimerge.pipeline":
        return 2
    return 1  # a stage script


@pytest.mark.parametrize("layer,name", [(0, "building block"), (1, "stage script")])
def test_arrows_point_down(layer, name):
    """A building block imports only building blocks; a stage script imports building blocks, never another stage
    or an entry point (its `__main__` block may call the CLI)."""
    upward = [f"{module} -> {target}" for module, targets in import_graph(scripts=False).items()
              if _layer(module) == layer for target in sorted(targets) if _layer(target) >= layer
              and not (layer == 0 and target.startswith(BUILDING_BLOCKS))]
    assert not upward, f"a {name} imports one at its level or above:\n" + "\n".join(upward)


def test_module_names_say_what_they_are():
    """No module shadows the standard library's (an `inspect.py`), and no two share a file name (two `search.py`:
    which one is the stage?)."""
    names = [name.rsplit(".", 1)[-1] for name in project_modules() if not name.endswith("__main__")]
    # allowed twice: each package's own `config` section, and a package's name for the stage script that drives it
    # (`sentimerge.pipeline.experts` runs `sentimerge.experts`)
    leaves = [name for name in names if name not in ("sentimerge", "pipeline", "core", "experts", "merge",
                                                     "curriculum", "config")]
    assert not [name for name in names if name in sys.stdlib_module_names]
    assert sorted({name for name in leaves if leaves.count(name) > 1}) == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` would install (built offline, with this environment's setuptools)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for item in ("pyproject.toml", "README.md", *FOLDERS.values()):  # a copy: the build writes next to its source
        if (ROOT / item).is_dir():
            shutil.copytree(ROOT / item, source / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / item, source / item)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(source)], capture_output=True, text=True,
                            env={**os.environ, "PIP_NO_INDEX": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return next(out.glob("sentimerge-*.whl"))


def test_the_wheel_installs_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"sentimerge"}
    for package in ("pipeline/core", "experts", "merge", "curriculum"):
        assert f"sentimerge/{package}/__init__.py" in names
    assert "sentimerge/pipeline/cli.py" in names and "sentimerge/pipeline/core/scoring.py" in names


def test_installs_beside_other_distributions_named_merge_and_experts(wheel, tmp_path):
    """PyPI has distributions that install top-level `merge` and `experts`: with sentimerge beside them, each
    import still means what its owner installed."""
    site = tmp_path / "site"
    for other in ("merge", "experts"):
        (site / other).mkdir(parents=True)
        (site / other / "__init__.py").write_text(f"OWNER = 'another distribution named {other}'\n")
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                             str(site), str(wheel)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    check = ("import merge, experts, sentimerge, sentimerge.merge.genome, sentimerge.experts.config\n"
             "assert merge.OWNER.endswith('merge') and experts.OWNER.endswith('experts')\n"
             f"assert sentimerge.__file__.startswith({str(site)!r}), sentimerge.__file__\n"
             "assert sentimerge.merge.genome.Genome and sentimerge.load_config\n")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr[-2000:]


def test_importing_sentimerge_is_light():
    """`import sentimerge` loads no torch and no stage: each API name loads its module on first use."""
    code = ("import sys, sentimerge\nassert 'torch' not in sys.modules, 'torch'\n"
            "assert not [m for m in sys.modules if m.startswith('sentimerge.pipeline.') and "
            "not m.startswith('sentimerge.pipeline.core')]\n"
            "assert callable(sentimerge.run) and sentimerge.SentimentModel\n"
            "assert set(sentimerge.__all__) <= set(dir(sentimerge))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
