"""Draws the imports between the repository's four top-level folders into ``docs/architecture.md``.

    python docs/make_import_graph.py          # rewrites the graph between the markers
    python docs/make_import_graph.py --check  # exit status 1 if the file's graph is stale

Every ``.py`` file under ``torchrl_dreamer/``, ``envs/``, ``baselines/`` and ``recipes/`` is parsed
with :mod:`ast` (nothing is imported or run). Every ``import`` / ``from ... import`` statement
counts, wherever it stands: at module level, inside a function, or under ``if TYPE_CHECKING:``.
The picture is a Mermaid ``flowchart TB`` (GitHub renders it): one subgraph per folder, one node
per module that takes part in a drawn arrow, and an arrow ``A --> B`` when module A imports module
B and the two are in different folders, or are two different recipes. Imports inside one folder
of the library are left out (they do not concern the layering).

``tests/test_architecture.py`` uses :func:`collect_imports` for the layering rules and fails when
the graph in ``docs/architecture.md`` differs from :func:`render_graph`'s.
"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE_MD = ROOT / "docs" / "architecture.md"
START, END = "<!-- import-graph:start -->", "<!-- import-graph:end -->"
# top to bottom in the picture; envs has no imports of its own, so it sits apart on the side
FOLDERS = ("recipes", "baselines", "torchrl_dreamer", "envs")
TITLES = {
    "recipes": "recipes/ : runnable scripts",
    "baselines": "baselines/ : PPO algorithms",
    "torchrl_dreamer": "torchrl_dreamer/ : the library",
    "envs": "envs/ : shipped envs",
}


@dataclass(frozen=True, order=True)
class Import:
    """One import statement's target: ``importer`` (dotted module) imports ``target`` at ``path:line``."""

    importer: str
    target: str
    path: str  # relative to the repository root, with "/"
    line: int


def module_name(path: Path, root: Path = ROOT) -> str:
    """``torchrl_dreamer/dreamer/agent.py`` -> ``torchrl_dreamer.dreamer.agent``; ``pkg/__init__.py`` -> ``pkg``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(root: Path = ROOT) -> list[Path]:
    """The ``.py`` files of the four folders (no caches, no hidden folders), sorted."""
    files = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).parts
            if not any(part.startswith(".") or part == "__pycache__" for part in rel):
                files.append(path)
    return files


def collect_imports(root: Path = ROOT) -> tuple[list[Import], set[str]]:
    """All imports of the four folders whose target is one of their modules (or packages), and the
    set of module names. ``from a import b`` targets the module ``a.b`` when that is a file or a
    package of the repository, else ``a``; relative imports are resolved against the importer."""
    files = python_files(root)
    modules = {module_name(p, root) for p in files}
    found: set[Import] = set()
    for path in files:
        importer = module_name(path, root)
        is_package = path.name == "__init__.py"
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = importer.split(".") if is_package else importer.split(".")[:-1]
                    up = node.level - 1
                    if up > len(package) - 1:
                        continue  # beyond the top-level package: Python raises; nothing to draw
                    base = ".".join(package[:len(package) - up] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    full = f"{base}.{alias.name}" if alias.name != "*" else base
                    targets.append(full if full in modules else base)
            for target in targets:
                # the longest prefix of the target that is a module of the repository
                parts = target.split(".")
                while parts and ".".join(parts) not in modules:
                    parts.pop()
                if parts:
                    found.add(Import(importer, ".".join(parts), rel, node.lineno))
    return sorted(found), modules


def folder_of(module: str) -> str:
    return module.split(".")[0]


def drawn_edges(imports: list[Import]) -> list[tuple[str, str]]:
    """Module pairs of the picture: imports that cross folders, and imports between two recipes."""
    edges = set()
    for imp in imports:
        a, b = imp.importer, imp.target
        if a == b:
            continue
        if folder_of(a) != folder_of(b) or folder_of(a) == "recipes":
            edges.add((a, b))
    return sorted(edges)


def _node_id(module: str) -> str:
    return "m_" + module.replace(".", "_")  # a prefix: no clash with subgraph ids or Mermaid keywords


def _label(module: str, modules: set[str]) -> str:
    path = module.replace(".", "/")
    # a package's own module is its __init__.py
    if any(m.startswith(module + ".") for m in modules):
        return path + "/__init__.py"
    return path + ".py"


def render_graph(root: Path = ROOT) -> str:
    """The Mermaid block (with its fences) for the current code."""
    imports, modules = collect_imports(root)
    edges = drawn_edges(imports)
    shown = sorted({m for edge in edges for m in edge})
    lines = ["```mermaid", "flowchart TB"]
    for folder in FOLDERS:
        members = [m for m in shown if folder_of(m) == folder]
        if not members:
            continue
        lines.append(f'    subgraph g_{folder}["{TITLES[folder]}"]')
        # sub-packages (torchrl_dreamer.dreamer) get their own box inside the folder's
        groups: dict[str, list[str]] = {}
        for m in members:
            parts = m.split(".")
            sub = ".".join(parts[:2]) if len(parts) > 2 else ""
            groups.setdefault(sub, []).append(m)
        for m in groups.pop("", []):
            lines.append(f'        {_node_id(m)}["{_label(m, modules)}"]')
        for sub, subs in groups.items():
            lines.append(f'        subgraph g_{sub.replace(".", "_")}["{sub.replace(".", "/")}/"]')
            for m in subs:
                lines.append(f'            {_node_id(m)}["{_label(m, modules)}"]')
            lines.append("        end")
        lines.append("    end")
    for a, b in edges:
        lines.append(f"    {_node_id(a)} --> {_node_id(b)}")
    lines.append("```")
    return "\n".join(lines)


def replace_graph(text: str, graph: str) -> str:
    """``text`` with everything between the markers replaced by ``graph``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{ARCHITECTURE_MD.name} must hold {START} then {END}, once each")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{graph}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if the graph is stale")
    args = parser.parse_args(argv)
    text = ARCHITECTURE_MD.read_text(encoding="utf-8")
    new = replace_graph(text, render_graph())
    if args.check:
        if new != text:
            print(f"{ARCHITECTURE_MD.relative_to(ROOT)}: the import graph is stale; run python docs/make_import_graph.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        ARCHITECTURE_MD.write_text(new, encoding="utf-8")
        print(f"updated {ARCHITECTURE_MD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
