"""Users have the repository and nothing else: no file may refer to development material they
do not have (the design notes it grew from, issue numbers, development rounds) or to a folder
beside the checkout. Result data (benchmarks/results/) is exempt: its file names and argv are
historical records."""
import re
import shutil
import subprocess

import pytest

from helpers import REPO

# split so that this file does not match itself
PATTERNS = [
    re.compile("SEEDS" + "_DIGEST|seeds " + "digest", re.I),
    re.compile(r"\bstop[- ]?1?[0-9]\b(?! (at|after|training|early|when|if|once|before|here))", re.I),
    re.compile(r"\b(the|this|that) " + r"issue\b|\bissue " + r"#?[0-9]+\b", re.I),
    re.compile(r"\b(in|from|per) the " + r"note\b|hand-" + "rolled", re.I),
    re.compile(r"\.\./" + "shared|shared" + "/data"),
]


def _files():
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for rel in listed.stdout.decode().split("\0"):
        path = REPO / rel
        if rel and not rel.startswith("benchmarks/results/") and path.is_file():
            raw = path.read_bytes()
            if b"\0" not in raw[:8000]:
                yield rel, raw.decode("utf-8", errors="replace")


def test_no_file_refers_to_material_outside_the_repository():
    offenders = [f"{rel}:{i}: {line.strip()[:120]}" for rel, text in _files()
                 for i, line in enumerate(text.splitlines(), 1) if any(p.search(line) for p in PATTERNS)]
    assert not offenders, "references users cannot follow:\n" + "\n".join(offenders)


@pytest.mark.parametrize("line", ["see SEEDS" + "_DIGEST 1.1", "the stop" + "-15 code", "as the " + "issue asks",
                                  "issue " + "22", "in the " + "note", "../" + "shared" + "/data"])
def test_the_patterns_catch_what_they_are_for(line):
    assert any(p.search(line) for p in PATTERNS)


@pytest.mark.parametrize("line", ["eval.stop_at_return=475", "stop at the first evaluation", "a non-issue",
                                  "stopping at 30720 env steps"])
def test_the_patterns_leave_ordinary_words_alone(line):
    assert not any(p.search(line) for p in PATTERNS)
