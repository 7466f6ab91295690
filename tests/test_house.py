"""The house rules, checked: imports point down (no circle), functions and classes stay short, and
the documented flag table is the command line's."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "parallel_nn"
MAX_FUNCTION_LINES = 50
MAX_CLASS_LINES = 200


def module_name(path: Path) -> str:
    """parallel_nn/parallel/local/pool.py -> "parallel.local.pool"; a package's __init__.py -> the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(source: str, name: str, known: set[str], is_package: bool = False) -> set[str]:
    """The package's modules that module `name` (its text `source`) imports, at the top or inside a
    function, in any form: `from parallel_nn import x`, `from parallel_nn.a import x` (x a module
    or a name in a), `import parallel_nn.a.b`; relative imports resolved from `name`'s package."""
    found = set()
    package = [p for p in name.split(".") if p] if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] + (node.module or "").split(".")
            elif (node.module or "").split(".")[0] == "parallel_nn":
                base = node.module.split(".")[1:]
            else:
                continue
            base = [b for b in base if b]
            for alias in node.names:
                whole = ".".join(base + [alias.name])
                found.add(whole if whole in known else ".".join(base))
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith("parallel_nn."))
    return found


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imports_of(path.read_text(), name, known, path.name == "__init__.py") - {name}
            for name, path in modules().items()}


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle, as the modules around it, or [] if there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str]:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [module, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return []


def test_the_cycle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_import_reader_sees_every_form():
    text = ("import parallel_nn.data.mnist\nfrom parallel_nn import faults, UserError\nfrom parallel_nn.parallel.backends import x\n"
            "from parallel_nn.parallel import trace\ndef f():\n    from . import loop\n    from ..nn.network import y\n")
    known = {"", "faults", "data.mnist", "parallel.backends", "parallel.trace", "run.loop", "nn.network"}
    assert imports_of(text, "run.sample", known) == {"data.mnist", "faults", "", "parallel.backends", "parallel.trace",
                                                     "run.loop", "nn.network"}


# The rooms, lowest first: a module imports only from its own room or a lower one, so the
# architecture reads from the bottom up (the package's own modules are the floor; cli the roof).
LAYERS = ["", "kernels", "nn", "data", "parallel", "run", "web", "cli"]


def layer(module: str) -> int:
    room = module.split(".")[0] if "." in module or module in LAYERS else ""
    return LAYERS.index("cli" if module == "__main__" else room)


def test_the_package_imports_have_no_circle():
    graph = import_graph()
    assert graph["parallel.backends"] >= {"parallel.local.pool", "parallel.ray.actors"}  # function-level imports too
    assert not cycle(graph), f"import circle: {' -> '.join(cycle(graph))}"


def test_every_room_imports_only_from_itself_or_below():
    upward = [f"{m} -> {i}" for m, imported in import_graph().items() for i in imported if layer(i) > layer(m)]
    assert not upward, f"imports that point up ({' < '.join(LAYERS)}): {upward}"


def test_the_layers_are_what_the_package_holds():
    rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert rooms == set(LAYERS) - {"", "cli"}
    assert layer("web.serve") > layer("run.train") > layer("parallel.local.pool") > layer("nn.network") > layer("atomic")


def test_the_package_imports_itself_by_absolute_paths():
    relative = [f"{name}:{node.lineno}" for name, path in modules().items()
                for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.level]
    assert not relative, f"relative imports (write `from parallel_nn.<room> import ...`): {relative}"


def test_what_every_backend_shares_knows_no_backend():
    graph = import_graph()
    for shared in ("parallel.base", "parallel.shards"):
        assert not {m for m in graph[shared] if m.startswith(("parallel.local", "parallel.ray", "parallel.backends"))}


def test_functions_and_classes_are_short():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = {ast.ClassDef: MAX_CLASS_LINES, ast.FunctionDef: MAX_FUNCTION_LINES}.get(type(node))
            if limit and node.end_lineno - node.lineno + 1 > limit:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"over {MAX_FUNCTION_LINES} lines (functions) or {MAX_CLASS_LINES} (classes): {long}"


def documented_flags() -> set[str]:
    """The flags in the first cell of each row of the README's flag table (the full list, as the design asks)."""
    flags = set()
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `-"):
            first = line.split("|")[1]
            flags.update(re.findall(r"`(--?[a-z][a-z-]*)", first))
    return flags


def help_flags() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "parallel_nn", "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", out)) - {"--help"}


def test_the_flag_table_is_the_command_line():
    documented, offered = documented_flags(), help_flags()
    assert len(documented) > 20  # the table was found
    assert documented == offered, f"only documented: {sorted(documented - offered)}; only in --help: {sorted(offered - documented)}"


def anchors(page: Path) -> set[str]:
    """The #anchors GitHub gives the page's headings (not `#` lines inside code blocks): lower case,
    punctuation dropped, spaces to hyphens."""
    found, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif line.startswith("#") and not in_code:
            found.add(re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-"))
    return found


def test_the_readme_is_a_front_page_and_its_links_resolve():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if "://" in target:
                continue
            linked = (page.parent / target) if target else page
            assert linked.exists(), f"{page.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in anchors(linked), f"{page.name} links to {target}#{anchor}: no such heading"


def test_the_design_page_s_example_runs_on_real_data(tmp_path):
    """docs/design.md's listener example, as a reader would paste it (real MNIST, linked in)."""
    real = ROOT / "datasets" / "mnist"
    if not (real / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("real MNIST not present (run `make datasets`)")
    page = (ROOT / "docs" / "design.md").read_text()
    example = re.search(r"```python\n(.*?)```", page, re.S)[1]
    assert "from parallel_nn" in example and "train(" in example
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "mnist").symlink_to(real)
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"4 steps; last loss [\d.]+\n", done.stdout)
