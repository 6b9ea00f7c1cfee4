"""benchmarks/report.py: benchmarks/RESULTS.md is current, and lists exactly the results that carry
the provenance stamp of benchmarks/provenance.py (with their commit), counting the others."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import BENCHMARKS, REPO


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("report", None)
    return importlib.import_module("report")


def test_results_md_is_current():
    """After a benchmark writes a stamped JSON, run `python benchmarks/report.py` and commit RESULTS.md."""
    proc = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def _stamp(commit: str, dirty: bool = False, **extra) -> dict:
    return {"git_commit": commit, "git_dirty": dirty, "torch": "2.13.0", "torchrl": "0.14.1", "tensordict": "0.14.3",
            "python": "3.11.7", "cpu": "test cpu", "cpu_count": 2, "torch_threads_harness": 2, **extra,
            "argv": ["benchmarks/x.py"], "date": "2026-12-05T10:11:12+00:00"}


def test_rows_carry_the_commit_and_skip_unstamped_results(report, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    top = "0123456789abcdef0123456789abcdef01234567"
    nested = "fedcba9876543210fedcba9876543210fedcba98"
    # stamp at the top level (dreamer_vs_ppo.py's layout), one row per run, with a PNG next to it
    (results / "dreamer_vs_ppo.json").write_text(json.dumps({
        "benchmark": "dreamer_vs_ppo", "budget_s": 60.0, "seed": 0, "references": {},
        "results": [{"env": "cartpole", "algo": "dreamer", "best_eval": 500.0, "final_eval": 480.5, "env_steps": 20000,
                     "wall_clock_s": 59.0, "evals": []},
                    {"env": "cartpole", "algo": "ppo", "best_eval": float("nan"), "final_eval": 31.0,
                     "env_steps": 40000, "wall_clock_s": 58.0, "evals": []}],
        **_stamp(top, torch_threads_runs=1)}))
    (results / "dreamer_vs_ppo.png").write_bytes(b"")
    # stamp nested under "provenance", kind from the file name, dirty tree
    (results / "my_bench_run2.json").write_text(json.dumps({"ok": True, "wall_s": 3.5, "run_dir": "/tmp/x",
                                                            "provenance": _stamp(nested, dirty=True)}))
    # no stamp: not listed, counted
    (results / "old_bench.json").write_text(json.dumps({"ok": True, "git": "not a stamp", "commit": top}))
    (results / "old_bench.png").write_bytes(b"")

    rows = report.table_rows(results)
    assert list(rows) == ["dreamer_vs_ppo", "my_bench_run2"]
    vs = rows["dreamer_vs_ppo"]
    assert [r["algorithm"] for r in vs] == ["dreamer", "ppo"]
    assert {r["commit"] for r in vs} == {"01234567"}
    assert {r["threads"] for r in vs} == {1}  # the runs' threads, not the harness's
    assert vs[0]["files"] == "[json](results/dreamer_vs_ppo.json) [png](results/dreamer_vs_ppo.png)"
    (generic,) = rows["my_bench_run2"]
    assert generic["commit"] == "fedcba98+dirty" and generic["threads"] == 2
    assert generic["ok"] is True and generic["wall_s"] == 3.5 and "provenance" not in generic
    assert generic["files"] == "[json](results/my_bench_run2.json)"

    text = report.render(results)
    assert "old_bench" not in text and top[:8] in text and "fedcba98+dirty" in text
    assert "| cartpole | ppo | — | 31 |" in text  # NaN shown as a dash
    assert "2026-12-05 10:11" in text
    assert text.rstrip().endswith("1 older result file carries no provenance stamp and is not listed.")
    assert report.render(results) == text  # deterministic

    # --check: missing and stale files fail with one line, a fresh one passes
    out = tmp_path / "RESULTS.md"
    args = ["--results", str(results), "--out", str(out)]
    assert report.main([*args, "--check"]) == 1
    assert report.main(args) == 0 and out.read_text() == text
    assert report.main([*args, "--check"]) == 0
    (results / "late.json").write_text(json.dumps(_stamp(top)))
    assert report.main([*args, "--check"]) == 1


def test_kind_from_benchmark_field_or_script_prefix(report, tmp_path):
    prefixes = {"crash_resume", "dreamer_throughput", "dreamer"}
    assert report.kind_of(tmp_path / "crash_resume_corrupt4.json", {}, prefixes) == "crash_resume"
    assert report.kind_of(tmp_path / "dreamer_throughput_2threads.json", {}, prefixes) == "dreamer_throughput"
    assert report.kind_of(tmp_path / "crash_resumed.json", {}, prefixes) == "crash_resumed"  # whole words only
    assert report.kind_of(tmp_path / "x.json", {"benchmark": "dreamer_vs_ppo"}, prefixes) == "dreamer_vs_ppo"
    assert report.find_stamp({"a": [{"b": {"git_commit": "c"}}]}) == {"git_commit": "c"}
    assert report.find_stamp({"git": {"commit": "c"}}) is None


def test_write_json_makes_folders_replaces_whole_files_and_keeps_the_old_one_on_failure(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("provenance", None)
    provenance = importlib.import_module("provenance")
    path = tmp_path / "deep" / "er" / "result.json"
    assert provenance.write_json(path, {"a": 1}) == path
    assert json.loads(path.read_text()) == {"a": 1} and f"wrote {path}" in capsys.readouterr().out
    provenance.write_json(path, {"b": [1.5, None]}, announce=False)
    assert json.loads(path.read_text()) == {"b": [1.5, None]} and capsys.readouterr().out == ""
    with pytest.raises(TypeError):  # not JSON: nothing half-written, the previous result stays
        provenance.write_json(path, {"c": object()})
    assert json.loads(path.read_text()) == {"b": [1.5, None]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]


def test_throughput_rows_name_the_size_and_shapes(report):
    """An ``--ours-only`` row at another env's shapes does not read like the reference-size rows: the size
    preset and the batch / observation / action shapes are columns (older files: the reference sizes at
    CartPole's shapes)."""
    ours = report.rows_dreamer_throughput({"size": "tiny", "batch": 32, "seq_len": 32, "obs_dim": 8, "action_dim": 4,
                                           "ours_updates_per_s": 8.35, "compile": "full"})[0]
    assert (ours["size"], ours["batch, shapes"]) == ("tiny", "32x32, obs 8 / 4 actions")
    assert ours["ratio"] is None and ours["TorchRL updates/s"] is None
    old = report.rows_dreamer_throughput({"batch": 8, "seq_len": 16, "ours_updates_per_s": 15.0,
                                          "torchrl_updates_per_s": 7.5})[0]
    assert (old["size"], old["batch, shapes"], old["ratio"]) == ("reference 137k", "8x16, obs 4 / 2 actions", 2.0)


def test_value_check_rows_put_belief_beside_outcome(report):
    """``dreamer_value_check.py``'s table: one row per (episode end, legs) group, each imagined figure beside
    the env's, and a group without the open-loop figure shows a dash, not a crash."""
    record = {"run_dir": "/x/runs/20261207-020911", "env_steps": 790016, "actions": "sample", "summary": {
        "truncated, air": {"rows": 285, "value": 118.3, "return": 14.7, "imagined_reward": 2.08, "real_reward": 1.9,
                           "imagined_end_value": 122.8, "open_loop_end_value": 121.9, "real_end_value": 116.0},
        "landed, air": {"rows": 360, "value": 125.1, "return": 79.8, "imagined_reward": 5.02, "real_reward": 5.55}}}
    rows = report.rows_value_check(record)
    assert [r["end, legs"] for r in rows] == ["landed, air", "truncated, air"]
    hover = rows[1]
    assert (hover["run"], hover["critic value"], hover["return that followed"]) == ("20261207-020911", 118.3, 14.7)
    assert hover["horizon reward: imagined / real"] == "2.08 / 1.9"
    assert hover["value after the horizon: imagined / open loop / real"] == "122.8 / 121.9 / 116"
    assert rows[0]["value after the horizon: imagined / open loop / real"] is None
    assert report.kind_of(BENCHMARKS / "results" / "dreamer_value_check_seed0.json", record,
                          report.known_prefixes(BENCHMARKS / "results")) == "dreamer_value_check"


def test_result_path_takes_a_bare_name_into_results_and_a_path_as_given(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("provenance", None)
    provenance = importlib.import_module("provenance")
    assert provenance.result_path("episode_ends_seed1") == provenance.RESULTS / "episode_ends_seed1.json"
    assert provenance.result_path(tmp_path / "x") == tmp_path / "x.json"
    assert provenance.result_path(str(tmp_path / "x.json")) == tmp_path / "x.json"
    assert provenance.result_path("sub/y") == Path("sub/y.json")
    assert provenance.result_path("y.json") == Path("y.json")
