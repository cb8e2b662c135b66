"""Where things live: the package's imports follow its layering (README, "Development").

Every module's imports are read with ``ast``, those inside functions included: no import cycle
between modules or between the parts of the package (its sub-packages and top-level modules),
``core/`` imports nothing above it, the lower parts import no stage, and an import inside a
function is there for an optional or slow-to-import dependency, with a comment saying so. The
pack's worker processes import no torch.
"""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "pathgan"
#: Imported inside functions only: optional extras, or dependencies slow to import where a
#: process must start fast (``pathgan --help``, the pack's workers, the demo's parent process).
LAZY_DEPENDENCIES = {"tensorflow", "triton", "torchmetrics", "torchvision", "timm", "wandb",
                     "webdataset", "openslide", "tiffslide", "tifffile", "pyarrow",
                     "huggingface_hub"}
#: The stages (and the commands that call them): nothing below them may import one.
STAGES = {"shards", "embed", "train", "sample", "evaluation", "publish", "demo",
          "commands", "cli", "__main__"}
LOWER = {"core", "config", "runs", "models", "encoders"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


class Import:
    def __init__(self, module: str, target: str, line: int, in_function: bool, commented: bool):
        self.module, self.target, self.line = module, target, line
        self.in_function, self.commented = in_function, commented

    def __repr__(self) -> str:
        return f"{MODULES[self.module].relative_to(REPO)}:{self.line} imports {self.target}"


def _imports(module: str) -> list[Import]:
    path = MODULES[module]
    lines = path.read_text().splitlines()
    found = []

    def visit(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import | ast.ImportFrom):
                if isinstance(child, ast.Import):
                    targets = [alias.name for alias in child.names]
                else:
                    base = child.module or ""
                    # `from pathgan.shards import slides` imports the module pathgan.shards.slides
                    targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES
                               else base for alias in child.names]
                commented = _commented(lines, child.lineno)
                found.extend(Import(module, target, child.lineno, in_function, commented)
                             for target in dict.fromkeys(targets))
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def _commented(lines: list[str], line: int) -> bool:
    """An import carries a comment, or one of the import lines right above it does, or the
    line above them is a comment."""
    index = line - 1
    while index > 0 and lines[index - 1].strip().startswith(("import ", "from ")):
        index -= 1
    block = lines[index:line]
    above = lines[index - 1].strip() if index > 0 else ""
    return any("#" in text for text in block) or above.startswith("#")


IMPORTS = [found for module in MODULES for found in _imports(module)]


def part(module: str) -> str:
    """The part of the package a module belongs to: its sub-package, or itself when it is a
    top-level module (``config``, ``runs``, ``embed``, ...); ``pathgan`` for the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _internal(found: Import) -> str | None:
    """The pathgan module an import reaches, or None for another package's."""
    target = found.target
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph, as the nodes along it, or None."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = "open"
        trail.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return [*trail[trail.index(nxt):], nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        state[node] = "done"
        trail.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := walk(node)):
            return found
    return None


def _module_edges() -> dict[str, set[str]]:
    """Module -> the modules it imports, and, for a module of another sub-package, that
    sub-package's ``__init__`` (Python runs it first)."""
    edges: dict[str, set[str]] = {}
    for found in IMPORTS:
        target = _internal(found)
        if target is None or target == found.module:
            continue
        edges.setdefault(found.module, set()).add(target)
        package = target.rpartition(".")[0]
        if package not in ("", "pathgan", found.module) and package in MODULES \
                and not found.module.startswith(package + "."):
            edges[found.module].add(package)
    return edges


def _part_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for source, targets in _module_edges().items():
        for target in targets:
            if part(source) != part(target):
                edges.setdefault(part(source), set()).add(part(target))
    return edges


def test_no_import_cycle_between_modules():
    assert _cycle(_module_edges()) is None


def test_no_import_cycle_between_parts_of_the_package():
    edges = _part_edges()
    parts = set(edges) | {target for targets in edges.values() for target in targets}
    assert {"core", "shards", "train", "evaluation", "publish", "runs", "config"} <= parts
    assert _cycle(edges) is None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_core_imports_nothing_above_it():
    above = [found for found in IMPORTS if part(found.module) == "core"
             and (target := _internal(found)) and part(target) != "core"]
    assert above == []


def test_the_lower_parts_import_no_stage():
    upward = [found for found in IMPORTS if part(found.module) in LOWER
              and (target := _internal(found)) and part(target) in STAGES]
    assert upward == []


def test_stages_reach_each_other_only_where_the_layering_says():
    """Training runs the in-loop evaluation; evaluation never trains; publishing reads the
    evaluations' files through runs.py; only training reads train/real_data.py."""
    pairs = {(part(found.module), part(target), target) for found in IMPORTS
             if (target := _internal(found))}
    assert not [p for p in pairs if p[0] == "evaluation" and p[1] == "train"]
    assert not [p for p in pairs if p[0] == "publish" and p[1] in ("evaluation", "train")]
    assert not [p for p in pairs if p[2] == "pathgan.train.real_data" and p[0] != "train"]
    assert not [p for p in pairs if p[0] in ("shards", "encoders", "models") and p[1] == "sample"]


def test_imports_inside_functions_are_for_optional_or_slow_dependencies():
    inner = [found for found in IMPORTS if found.in_function]
    for found in inner:
        top = found.target.split(".")[0]
        # commands/ imports its stage when the command runs: `pathgan --help` stays fast
        allowed = top in LAZY_DEPENDENCIES or (top == "pathgan" and part(found.module) ==
                                               "commands")
        assert allowed, f"{found}: import it at the top of the module"
        assert found.commented, f"{found}: say in a comment why it is imported here"


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``statement``."""
    code = f"import sys; {statement}; print(' '.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=REPO)
    return set(result.stdout.split())


def test_pack_workers_import_no_torch():
    """The modules of the functions the pack's spawned workers run, and of the objects sent to
    them, load without torch (about a second of CPU per worker) or webdataset."""
    loaded = loaded_after("import pathgan.shards.plan, pathgan.shards.spool, "
                          "pathgan.shards.options, pathgan.shards.sources")
    assert "pathgan.shards.plan" in loaded and not {"torch", "webdataset"} & loaded


def test_pack_hands_its_workers_only_functions_of_the_worker_modules():
    pack = ast.parse((PACKAGE / "shards" / "pack.py").read_text())
    submitted = {node.args[1].id for node in ast.walk(pack)
                 if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "run_all"
                 and isinstance(node.args[0], ast.Name) and node.args[0].id == "pool"}
    assert submitted == {"plan_slide", "spool_unit"}
    imported = {alias.name: node.module for node in pack.body
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert {imported[name] for name in submitted} == {"pathgan.shards.plan",
                                                      "pathgan.shards.spool"}


def test_the_command_line_parser_imports_no_stage():
    """``pathgan --help`` builds every command's parser: the commands import their stages only
    when they run."""
    loaded = loaded_after("from pathgan.cli import build_parser; build_parser()")
    stages = {m for m in loaded if m.startswith("pathgan.")
              and not m.startswith(("pathgan.commands", "pathgan.core", "pathgan.cli"))}
    assert "pathgan.commands.train" in loaded and "torch" not in loaded and stages == set()
