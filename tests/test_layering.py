"""The layering of DESIGN.md, pinned: kernels <- models <- loading <- generation/pipelines/training, with
quantization and distributed applied from outside. The imports of every loom module are read with `ast` (lazy
imports inside functions count too: they are edges all the same, and a cycle through one is still a cycle)."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import loom

LOOM_DIR = Path(loom.__file__).resolve().parent

# All a model file may import from loom (DESIGN.md: a model file holds modules and plain data; kernels sit below
# models; loading, quantization, distributed and the workflows sit above them or are applied from outside).
MODELS_MAY_IMPORT = ("loom.models", "loom.kernels", "loom.configuration", "loom.modeling", "loom.outputs",
                     "loom.utils")


@dataclass(frozen=True)
class Edge:
    file: str  # relative to the package's parent, e.g. "loom/models/bert.py"
    line: int
    importer: str
    imported: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.importer} -> {self.imported}"


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    root = package_dir.parent
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, level: int, importer: str, is_package: bool) -> str:
    """The absolute module name a (possibly relative) import refers to."""
    if level == 0:
        return name
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a module of the package (`loom.x.Y` names class Y of loom.x)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _is_import_module_call(node: ast.AST) -> bool:
    """`importlib.import_module("a.literal.name")`: a lazy import by another spelling (a computed name is not seen)."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    first = node.args[0]
    return name == "import_module" and isinstance(first, ast.Constant) and isinstance(first.value, str)


def import_edges(package_dir: Path) -> list[Edge]:
    """Every import of the package, anywhere in a file (module level or inside a function), resolved to the module
    it loads. Imports of modules outside the package are kept with their absolute name (e.g. `ctypes`)."""
    modules = module_files(package_dir)
    root = package_dir.parent
    edges = []
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(node.module or "", node.level, importer, is_package)
                # `from pkg import sub` loads pkg.sub when sub is a module; otherwise it names something in pkg.
                targets = [
                    f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module for alias in node.names
                ]
            elif _is_import_module_call(node):
                targets = [node.args[0].value]
            else:
                continue
            for target in dict.fromkeys(targets):
                edges.append(Edge(rel, node.lineno, importer, _known(target, modules) or target))
    return sorted(edges, key=lambda edge: (edge.file, edge.line, edge.imported))


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def forbidden_edges(package_dir: Path, kernel_files: frozenset[str] = frozenset()) -> list[Edge]:
    """The edges that break the layering, for a package laid out like loom (its name is the directory's).
    `kernel_files` (paths like "loom/native.py") count as part of `<package>.kernels`."""
    top = package_dir.name
    modules = module_files(package_dir)
    kernel_modules = {name for name, path in modules.items()
                      if path.relative_to(package_dir.parent).as_posix() in kernel_files}

    def in_kernels(name: str) -> bool:
        return _inside(name, f"{top}.kernels") or name in kernel_modules

    models_may_import = tuple(name.replace("loom", top, 1) for name in MODELS_MAY_IMPORT)
    bad = []
    for edge in import_edges(package_dir):
        internal = _inside(edge.imported, top)
        if in_kernels(edge.importer):
            if internal and not in_kernels(edge.imported):
                bad.append(edge)
        elif _inside(edge.imported, "ctypes"):
            bad.append(edge)
        elif _inside(edge.importer, f"{top}.models") and internal and not in_kernels(edge.imported) \
                and not any(_inside(edge.imported, allowed) for allowed in models_may_import):
            bad.append(edge)
    return bad


def import_cycles(package_dir: Path) -> list[list[Edge]]:
    """A shortest cycle (as its list of edges) through each module that is on one, modules already reported skipped.
    An edge to a package (`from loom.x import name`) is an edge to its __init__, so a submodule importing a name
    from its own package's __init__, which imports that submodule, is a cycle too (and a real one: whichever is
    imported first sees the other half-initialised)."""
    top = package_dir.name
    graph: dict[str, dict[str, Edge]] = {}
    for edge in import_edges(package_dir):
        if not _inside(edge.imported, top) or edge.imported == edge.importer:
            continue
        graph.setdefault(edge.importer, {}).setdefault(edge.imported, edge)
    cycles, seen = [], set()
    for start in sorted(graph):
        if start in seen:
            continue
        path = _shortest_path(graph, start, start)
        if path:
            cycles.append(path)
            seen.update(edge.importer for edge in path)
    return cycles


def _shortest_path(graph: dict[str, dict[str, Edge]], source: str, target: str) -> list[Edge] | None:
    frontier, came_from = [source], {}
    while frontier:
        next_frontier = []
        for node in frontier:
            for neighbour, edge in sorted(graph.get(node, {}).items()):
                if neighbour == target:
                    path = [edge]
                    while path[0].importer != source:
                        path.insert(0, came_from[path[0].importer])
                    return path
                if neighbour not in came_from and neighbour != source:
                    came_from[neighbour] = edge
                    next_frontier.append(neighbour)
        frontier = next_frontier
    return None


def _report(title: str, lines: list[str]) -> str:
    return title + ":\n  " + "\n  ".join(lines)


def test_no_forbidden_edges():
    found = forbidden_edges(LOOM_DIR, frozenset())
    assert not found, _report("imports that break DESIGN.md's layering", [str(edge) for edge in found])


def test_no_import_cycles():
    cycles = import_cycles(LOOM_DIR)
    lines = [" ; ".join(str(edge) for edge in cycle) for cycle in cycles]
    assert not cycles, _report("import cycles among loom modules (lazy imports included)", lines)


def test_walker_sees_every_import_form_in_loom():
    edges = {(e.importer, e.imported) for e in import_edges(LOOM_DIR)}
    # One edge of loom's per import form, so a walker that misses a form fails here and not silently
    assert ("loom.models.bert", "loom.models.common") in edges  # module level, absolute
    assert ("loom.tokenization.tokenizer", "loom.tokenization.chat") in edges  # `from . import chat`
    assert ("loom.modeling", "loom.load_stages") in edges  # `from loom import load_stages` inside from_pretrained
    assert ("loom.utils", "loom.tokenization.tool_schema") in edges  # importlib.import_module("...")


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_walker_fails_on_a_synthetic_package(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "from . import models\n",
        "pkg/kernels/__init__.py": "import ctypes\n",
        "pkg/kernels/ops.py": "def f():\n    from ..models import bert  # kernels reaching up\n",
        "pkg/models/__init__.py": "",
        "pkg/models/bert.py": "from .. import kernels\ndef load():\n    import pkg.training.trainer\n",
        "pkg/training/__init__.py": "",
        "pkg/training/trainer.py": "import ctypes\nfrom pkg.training import loop\n",
        "pkg/training/loop.py": "def run():\n    from .trainer import Trainer\n",
        "pkg/native.py": "import ctypes\nfrom pkg.kernels import ops\n",  # kernel layer outside kernels/
        "pkg/models/gpt2.py": "from pkg import native, utils\nfrom pkg.models.bert import load\nimport torch\n",
        "pkg/utils.py": "import importlib\ndef f():\n    importlib.import_module('pkg.quantization')\n",
        "pkg/quantization.py": "from pkg.models import gpt2\n",
    })
    bad = {str(edge) for edge in forbidden_edges(pkg, kernel_files=frozenset({"pkg/native.py"}))}
    assert bad == {
        "pkg/kernels/ops.py:2 pkg.kernels.ops -> pkg.models.bert",
        "pkg/models/bert.py:3 pkg.models.bert -> pkg.training.trainer",
        "pkg/training/trainer.py:1 pkg.training.trainer -> ctypes",
    }
    cycles = [[str(edge) for edge in cycle] for cycle in import_cycles(pkg)]
    assert cycles == [
        [  # three modules long, closed by a lazy importlib call
            "pkg/models/gpt2.py:1 pkg.models.gpt2 -> pkg.utils",
            "pkg/utils.py:3 pkg.utils -> pkg.quantization",
            "pkg/quantization.py:1 pkg.quantization -> pkg.models.gpt2",
        ],
        [
            "pkg/training/loop.py:2 pkg.training.loop -> pkg.training.trainer",
            "pkg/training/trainer.py:2 pkg.training.trainer -> pkg.training.loop",
        ],
    ]
    # without its kernel-layer entry, native.py's ctypes and a model's import of native.py are forbidden
    bad = {str(edge) for edge in forbidden_edges(pkg)}
    assert {"pkg/native.py:1 pkg.native -> ctypes", "pkg/models/gpt2.py:1 pkg.models.gpt2 -> pkg.native"} <= bad
    edges = {str(edge) for edge in import_edges(pkg)}
    assert "pkg/utils.py:3 pkg.utils -> pkg.quantization" in edges  # importlib.import_module with a literal name
