"""The house rules, checked: imports point down (no circle), functions and classes stay short, and
the documented flag table is the command line's."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "parallel_nn"
MAX_FUNCTION_LINES = 50
MAX_CLASS_LINES = 200


def imports_of(path: Path) -> set[str]:
    """The package's modules that `path` imports, at the top or inside a function, in any form:
    `from . import x`, `from .x import y`, `from parallel_nn import x`, `from parallel_nn.x import y`,
    `import parallel_nn.x`."""
    found = set()
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            absolute = node.level == 0 and (node.module or "").split(".")[0] == "parallel_nn"
            if node.level == 1 or absolute:
                parts = (node.module or "").split(".")[1 if absolute else 0 :]
                if parts and parts[0]:
                    found.add(parts[0])
                else:  # from . import x / from parallel_nn import x: x may be a module
                    found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("parallel_nn."))
    return found


def import_graph() -> dict[str, set[str]]:
    return {p.stem: imports_of(p) - {p.stem} for p in PACKAGE.glob("*.py")}


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


def test_the_import_reader_sees_every_form(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import parallel_nn.mnist\nfrom parallel_nn import optim, UserError\nfrom parallel_nn.backends import x\n"
                      "def f():\n    from . import faults\n    from .local import y\n")
    assert imports_of(sample) == {"mnist", "optim", "backends", "faults", "local"}


def test_the_package_imports_have_no_circle():
    graph = import_graph()
    assert graph["backends"] >= {"local", "ray_backend"}  # the parser sees function-level imports too
    assert not cycle(graph), f"import circle: {' -> '.join(cycle(graph))}"


def test_the_shared_engine_module_knows_no_backend():
    assert not import_graph()["engine"] & {"local", "ray_backend", "worker", "ray_worker", "backends"}


def test_functions_and_classes_are_short():
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
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
