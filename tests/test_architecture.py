"""Layering of the four top-level folders, the public API of their packages, and the import graph
in ``docs/architecture.md`` (see that page for what each folder is for).

Imports are read with ``ast`` by ``docs/make_import_graph.py`` (every ``import`` statement counts,
also inside functions and under ``if TYPE_CHECKING:``); nothing of the checked code is run except
in the public-API tests.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


def _repo_root() -> Path:
    """The directory holding ``pyproject.toml`` above this file (tests may live in sub-folders)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    raise RuntimeError(f"no pyproject.toml above {__file__}")


ROOT = _repo_root()


def _load_graph_tool():
    spec = importlib.util.spec_from_file_location("make_import_graph", ROOT / "docs" / "make_import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


graph_tool = _load_graph_tool()

# folder -> the folders it must not import
FORBIDDEN = {
    "torchrl_dreamer": {"envs", "baselines", "recipes"},  # the library stands alone
    "envs": {"torchrl_dreamer", "baselines", "recipes"},  # envs need TorchRL only
    "baselines": {"recipes"},
    "recipes": set(),  # recipe -> recipe imports: see RECIPE_TO_RECIPE
}
# The only imports between two recipes: recipes/routing.py is the one command that picks an
# algorithm (--algo ppo|dreamer), so it imports the two routing recipes whose main it runs.
RECIPE_TO_RECIPE = {
    ("recipes.routing", "recipes.ppo_routing"),
    ("recipes.routing", "recipes.dreamer_routing"),
}
PACKAGES = ("torchrl_dreamer", "torchrl_dreamer.dreamer", "envs", "baselines")


def layering_violations(imports) -> list[str]:
    """``file:line: message`` for each import that breaks the rules above."""
    out = []
    for imp in imports:
        src, dst = graph_tool.folder_of(imp.importer), graph_tool.folder_of(imp.target)
        if dst in FORBIDDEN[src]:
            out.append(f"{imp.path}:{imp.line}: {imp.importer} imports {imp.target} ({src} must not import {dst})")
        elif src == dst == "recipes" and imp.importer != imp.target \
                and (imp.importer, imp.target) not in RECIPE_TO_RECIPE:
            out.append(f"{imp.path}:{imp.line}: {imp.importer} imports {imp.target} (a recipe must not import "
                       "another recipe; shared code belongs in torchrl_dreamer or baselines)")
    return out


def test_every_folder_is_parsed():
    imports, modules = graph_tool.collect_imports()
    for folder in graph_tool.FOLDERS:
        assert folder in modules, f"{folder}/__init__.py not found"
    assert {"recipes.routing", "recipes.dreamer", "baselines.mappo", "envs.routing",
            "torchrl_dreamer.dreamer.update"} <= modules
    # the dispatcher's imports are found (inside its function), so the allow-list is not vacuous
    assert {(i.importer, i.target) for i in imports} >= RECIPE_TO_RECIPE


def test_layering():
    imports, _ = graph_tool.collect_imports()
    violations = layering_violations(imports)
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_layering_check_reports_file_and_line(tmp_path):
    """The checker itself, on a small tree with one violation of each kind."""
    files = {
        "torchrl_dreamer/__init__.py": "",
        "torchrl_dreamer/a.py": "import os\nfrom envs.routing import TSPEnv\n",
        "torchrl_dreamer/sub/__init__.py": "from .. import a\n",
        "torchrl_dreamer/sub/b.py": "def f():\n    from ...recipes import x\n",  # beyond the top: ignored
        "envs/__init__.py": "",
        "envs/routing.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torchrl_dreamer.a\n",
        "baselines/__init__.py": "",
        "baselines/p.py": "from envs import routing\nfrom torchrl_dreamer.sub import b\nimport recipes.one\n",
        "recipes/__init__.py": "",
        "recipes/one.py": "from . import two\n",
        "recipes/two.py": "from baselines.p import f\n",
        "recipes/routing.py": "def main():\n    from recipes.ppo_routing import main\n    from recipes.one import x\n",
        "recipes/ppo_routing.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    imports, _ = graph_tool.collect_imports(tmp_path)
    assert layering_violations(imports) == [
        "baselines/p.py:3: baselines.p imports recipes.one (baselines must not import recipes)",
        "envs/routing.py:3: envs.routing imports torchrl_dreamer.a (envs must not import torchrl_dreamer)",
        "recipes/one.py:1: recipes.one imports recipes.two (a recipe must not import another recipe; shared code "
        "belongs in torchrl_dreamer or baselines)",
        "recipes/routing.py:3: recipes.routing imports recipes.one (a recipe must not import another recipe; shared "
        "code belongs in torchrl_dreamer or baselines)",
        "torchrl_dreamer/a.py:2: torchrl_dreamer.a imports envs.routing (torchrl_dreamer must not import envs)",
    ]
    targets = {(i.importer, i.target) for i in imports}
    assert ("torchrl_dreamer.sub", "torchrl_dreamer.a") in targets  # relative import from a package
    assert ("baselines.p", "envs.routing") in targets  # "from package import module" targets the module


def test_import_graph_in_docs_is_current():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    fresh = graph_tool.replace_graph(text, graph_tool.render_graph())
    assert fresh == text, ("docs/architecture.md: the import graph is stale; run `python docs/make_import_graph.py` "
                           "and commit the result")


# --- public API ---------------------------------------------------------------------------------


def _type_checking_names(package: str) -> set[str]:
    """Names imported under ``if TYPE_CHECKING:`` in the package's ``__init__.py``."""
    path = Path(importlib.util.find_spec(package).origin)
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            for stmt in ast.walk(node):
                if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                    names |= {alias.asname or alias.name for alias in stmt.names}
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_public_api_is_complete_and_documented(package):
    pkg = importlib.import_module(package)
    exported = pkg.__all__
    assert len(set(exported)) == len(exported), "duplicates in __all__"
    assert set(exported) == set(pkg._EXPORTS), "__all__ and _EXPORTS differ"
    assert _type_checking_names(package) - {"dreamer"} == set(exported), "__all__ and the TYPE_CHECKING imports differ"
    for name in exported:
        assert not name.startswith("_"), name
        module = importlib.import_module(pkg._EXPORTS[name], package)
        assert name in getattr(module, "__all__", ()), f"{name} is not in {module.__name__}.__all__"
        assert getattr(pkg, name) is getattr(module, name)
        assert name in pkg.__doc__, f"{name} is missing from the {package} docstring"
    with pytest.raises(AttributeError):
        pkg.no_such_name  # noqa: B018


def test_import_is_light():
    """Importing the four packages loads none of their modules (nor torch): names load on first use,
    so ``import torchrl_dreamer`` costs far less than ``import torchrl``."""
    code = ("import sys, torchrl_dreamer, torchrl_dreamer.dreamer, envs, baselines\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torchrl', 'tensordict', 'torchrl_dreamer', 'envs', 'baselines', 'recipes')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['baselines', 'envs', 'torchrl_dreamer', 'torchrl_dreamer.dreamer']"


def test_library_loads_without_envs_baselines_recipes():
    """Every public name of the library, loaded: envs, baselines and recipes stay unimported."""
    code = ("import sys\n"
            "from torchrl_dreamer import *\n"
            "from torchrl_dreamer.dreamer import *\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'envs', 'baselines', 'recipes'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_recipe_has_a_console_script_with_the_python_m_behaviour():
    """setup.cfg's console scripts point at each recipe module's ``cli`` (the same ``main`` that
    ``python -m`` runs, with one-line errors), one per recipe command."""
    import configparser
    import importlib

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = dict(line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    targets = {name.strip(): target.strip() for name, target in scripts.items()}
    assert targets == {"td-dreamer": "recipes.dreamer:cli", "td-routing": "recipes.routing:cli",
                       "td-ppo": "recipes.ppo:cli", "td-mappo-vmas": "recipes.mappo_vmas:cli",
                       "td-check-env": "torchrl_dreamer.check_env:main"}
    targets.pop("td-check-env")  # a plain main(argv) -> exit status, like python -m torchrl_dreamer.check_env
    for target in targets.values():
        module, _, attr = target.partition(":")
        mod = importlib.import_module(module)
        assert callable(getattr(mod, attr)) and callable(mod.main)
