"""Every ```python block of ``docs/*.md`` runs as written.

Each block runs in a fresh namespace (``__name__ == "__main__"``) with the current directory set to
a temporary one, so a snippet may write files. A block that must not run (it needs a GPU, a long
time or a file the reader has) is marked by an HTML comment on the line before its fence:

    <!-- no-run -->
    ```python
    ...
    ```

Tracebacks point at the Markdown file and its line numbers (the block is compiled with the file's
name and its own first line).
"""
from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest


def _repo_root() -> Path:
    """The directory holding ``pyproject.toml`` above this file (tests may live in sub-folders)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    raise RuntimeError(f"no pyproject.toml above {__file__}")


ROOT = _repo_root()
DOCS = ROOT / "docs"
NO_RUN = "<!-- no-run -->"
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


@dataclass(frozen=True)
class Block:
    path: Path
    number: int  # 1-based among the file's python blocks
    line: int  # 1-based line of the first code line
    code: str
    run: bool

    @property
    def name(self) -> str:
        return f"{self.path.name}:block{self.number}"


def python_blocks(text: str, path: Path) -> list[Block]:
    """The ```python (or ```py) blocks of Markdown ``text``, in order, with their no-run marks.

    A fence closes at a line with at least as many of the same fence characters; the code is
    dedented by the opening fence's indentation (blocks inside list items)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        lang = m.group("info").lower()
        start = i + 1
        j = start
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            j += 1
        if lang in ("python", "py", "python3"):
            previous = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            code = "\n".join(line[indent:] if line[:indent].strip() == "" else line for line in lines[start:j])
            blocks.append(Block(path, len(blocks) + 1, start + 1, code + "\n", run=previous != NO_RUN))
        i = j + 1
    return blocks


def _all_blocks() -> list[Block]:
    return [b for path in sorted(DOCS.glob("*.md")) for b in python_blocks(path.read_text(encoding="utf-8"), path)]


BLOCKS = _all_blocks()


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.run], ids=lambda b: b.name)
def test_docs_python_block_runs(block: Block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__", "__file__": str(block.path)}
    failure = None
    try:
        # padding keeps the Markdown file's line numbers in tracebacks (and syntax errors)
        exec(compile("\n" * (block.line - 1) + block.code, str(block.path), "exec"), namespace)
    except SystemExit as exc:  # sys.exit(0) ends a snippet normally
        if exc.code not in (None, 0):
            failure = f"exited with {exc.code!r}\n\n{traceback.format_exc()}"
    except Exception as exc:  # any other failure of a snippet is a docs failure
        failure = f"raised {type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
    if failure is not None:  # outside the except block: the report shows the snippet's traceback only
        rel = block.path.relative_to(ROOT)
        pytest.fail(f"{rel}: python block {block.number} (line {block.line}) {failure}", pytrace=False)


def test_docs_have_runnable_python_blocks():
    """The docs exist and hold runnable blocks (a moved folder must not make the test above vacuous)."""
    assert (DOCS / "api.md").is_file()
    assert sum(b.run for b in BLOCKS if b.path.name == "api.md") >= 2


def test_block_extraction_and_no_run_marker():
    text = "\n".join([
        "# Title",                      # 1
        "```python",                    # 2
        "x = 1",                        # 3
        "```",                          # 4
        "<!-- no-run -->",              # 5
        "",                             # 6
        "```python",                    # 7
        "raise SystemExit('skipped')",  # 8
        "```",                          # 9
        "```bash",                      # 10
        "echo not python",              # 11
        "```",                          # 12
        "- item:",                      # 13
        "  ````py",                     # 14
        "  if True:",                   # 15
        "      y = '```'",              # 16
        "  ````",                       # 17
    ])
    blocks = python_blocks(text, Path("doc.md"))
    assert [(b.number, b.line, b.run) for b in blocks] == [(1, 3, True), (2, 8, False), (3, 15, True)]
    assert blocks[0].code == "x = 1\n"
    assert blocks[2].code == "if True:\n    y = '```'\n"
    namespace: dict = {}
    exec(blocks[2].code, namespace)
    assert namespace["y"] == "```"
