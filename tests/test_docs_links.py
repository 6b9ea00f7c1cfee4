"""The README and docs/ stay true to the repository: every relative link (and #anchor) resolves, the
generated configuration reference matches the schemas, the README stays a short page, and a
newcomer reaches each main task within two links."""
import re
import subprocess
import sys

import pytest

from helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path):
    """GitHub's heading anchors of a Markdown file."""
    out = set()
    for line in path.read_text().splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower().replace("`", ""))
            out.add(text.replace(" ", "-"))
    return out


def _links(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links inside code blocks are code
    return LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    bad = []
    for target in _links(page):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading '#{anchor}' in {dest.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_readme_is_a_newcomers_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)


def test_config_reference_is_generated_from_the_schemas():
    out = subprocess.run([sys.executable, "docs/make_config_reference.py", "--check"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("task,needle", [
    ("train CartPole", "python -m recipes.dreamer --env cartpole"),
    ("a routing run", "python -m recipes.routing --algo ppo --env tsp20"),
    ("a custom env", "env.factory=mypkg.myenv:make_env"),
])
def test_each_main_task_is_within_two_links_of_the_readme(task, needle):
    readme = REPO / "README.md"
    reachable = {readme}
    for _ in range(2):
        for page in list(reachable):
            for target in _links(page):
                path = target.partition("#")[0]
                if path.endswith(".md") and not re.match(r"[a-z]+://", path):
                    reachable.add((page.parent / path).resolve())
    assert any(p.exists() and needle in p.read_text() for p in reachable), task
