"""The figures by command on small budgets: docs/fig3_toy.py (the paper's Fig. 3) and docs/ablation.py (Table 2 and
the eta sweep): they run, write their PNGs and print their tables."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HOPPER_DATASET_ID

ROOT = Path(__file__).resolve().parents[1]


def test_fig3_toy_quick_writes_a_png_and_a_table_of_finite_distances(tmp_path):
    pytest.importorskip("matplotlib")  # a guard only: CI installs the plot extra
    out = tmp_path / "fig.png"
    command = [sys.executable, str(ROOT / "docs" / "fig3_toy.py"), "--quick", "--out", str(out)]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = re.findall(r"^(flow matching|MeanFlow)\s+(\d+)\s+(\S+)$", run.stdout, re.MULTILINE)
    assert [(method, int(steps)) for method, steps, _ in rows] == [
        ("flow matching", 1),
        ("flow matching", 2),
        ("flow matching", 5),
        ("flow matching", 10),
        ("MeanFlow", 1),
    ], run.stdout
    assert all(math.isfinite(float(distance)) for _, _, distance in rows), run.stdout


def ablation(*args: str, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "docs" / "ablation.py"), *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_ablation_trains_every_method_skips_finished_runs_goes_on_and_reports(minari_path, tmp_path):
    """docs/ablation.py on a tiny budget: the Table 2 rows and both BC controls for one dataset and seed; a second call starts nothing;
    a larger --total-steps resumes the trained runs from their checkpoints and re-evaluates the one-step variants;
    report writes the figure and a table with every row and the dataset's mean return."""
    pytest.importorskip("matplotlib")
    flags = "--threads 1 --no-cuda --final-eval-episodes 2 --eval-episodes 1 --max-eval-envs 2 --log-freq 10"
    grid = ("ablation", "--datasets", HOPPER_DATASET_ID, "--seeds", "1", "--eval-freq", "10", "--jobs", "2")
    grid += ("--runs-dir", "runs", f"--flags={flags}")
    first = ablation(*grid, "--total-steps", "20", cwd=tmp_path)
    assert "0 of 8 runs done" in first and "8 of 8 runs done" in first and "FAILED" not in first
    again = ablation(*grid, "--total-steps", "20", cwd=tmp_path)
    assert "8 of 8 runs done; 0 to go" in again and "start" not in again
    longer = ablation(*grid, "--total-steps", "30", "--methods", "ofql", "dql", "dql-ddim1", cwd=tmp_path)
    assert "0 of 3 runs done" in longer and "3 of 3 runs done" in longer
    data = tmp_path / "runs" / "ablation" / HOPPER_DATASET_ID.replace("/", "_")
    (ofql_run,) = (data / "ofql" / "seed1" / "runs").glob("*/summary.json")
    summary = json.loads(ofql_run.read_text())
    assert (summary["total_steps"], summary["resumed_from_step"]) == (30, 20)
    report = ablation("report", "--runs-dir", "runs", "--out", str(tmp_path), cwd=tmp_path)
    png = tmp_path / f"ablation_{data.name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = dict(re.findall(r"^\| ([^|]+?) \| (-?[\d.]+)(?: \+- [\d.]+)? \|", report, re.MULTILINE))
    labels = [
        "DQL (5)",
        "FQL (5)",
        "OFQL (1)",
        "OFQL (1), the paper's variant",
        "OFQL, eta 0 (BC only)",
        "DQL, eta 0 (BC only)",
        "DQL + DDIM (1)",
        "FQL (1)",
    ]
    assert set(rows) == {*labels, "dataset mean return"}, report
    assert all(math.isfinite(float(score)) for score in rows.values())


def test_eta_sweep_trains_each_eta_and_reports_score_against_eta(minari_path, tmp_path):
    pytest.importorskip("matplotlib")
    flags = "--threads 1 --no-cuda --final-eval-episodes 2 --eval-episodes 1 --max-eval-envs 2 --log-freq 10"
    sweep = ("eta-sweep", "--datasets", HOPPER_DATASET_ID, "--seeds", "1", "2", "--etas", "0.01", "0.3")
    sweep += (
        "--total-steps",
        "10",
        "--eval-freq",
        "10",
        "--script",
        "ofql.py",
        "--runs-dir",
        "runs",
        f"--flags={flags}",
    )
    assert "4 of 4 runs done" in ablation(*sweep, cwd=tmp_path)
    report = ablation("report", "--runs-dir", "runs", "--out", str(tmp_path / "figures"), cwd=tmp_path)  # made
    assert (tmp_path / "figures" / "eta_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = re.findall(r"^\| ([\d.]+) \| (-?[\d.]+) \+- [\d.]+ \| .* \| (\d) \| 10 \|$", report, re.MULTILINE)
    assert [(eta, seeds) for eta, _, seeds in rows] == [("0.01", "2"), ("0.3", "2")], report


def test_fig4_speed_reads_the_benchmark_outputs_in_docs_and_writes_a_png(tmp_path):
    """docs/fig4_speed.py on the committed benchmark outputs: a bar per table row, hours per 1M updates from updates/s."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig4.png"
    inputs = sorted(str(path) for path in (ROOT / "docs" / "benchmarks").glob("*.md"))
    command = [sys.executable, str(ROOT / "docs" / "fig4_speed.py"), *inputs, "--out", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = re.findall(r"^\| (\S+\.py[^|]*) \| ([\d.]+) \| (\d+) \|$", run.stdout, re.MULTILINE)
    assert ("ofql.py --cudagraphs", "0.41", "3991") in rows and ("dql.py --cudagraphs", "0.74", "1447") in rows
    assert len(rows) == sum(
        path.read_text().count("\n| ") - path.read_text().count("\n| script") for path in map(Path, inputs)
    )


def test_ablation_stopped_by_sigterm_checkpoints_its_runs_and_resumes_them(minari_path, tmp_path):
    """SIGTERM to the runner reaches each script once: it checkpoints and stops; the same command resumes it."""
    flags = "--threads 1 --no-cuda --final-eval-episodes 1 --eval-episodes 1 --max-eval-envs 1 --log-freq 10"
    grid = [sys.executable, str(ROOT / "docs" / "ablation.py"), "ablation", "--datasets", HOPPER_DATASET_ID]
    grid += ["--seeds", "1", "--methods", "ofql", "--total-steps", "600", "--eval-freq", "200", f"--flags={flags}"]
    runner = subprocess.Popen(grid, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "runs" / "paper" / "ablation" / HOPPER_DATASET_ID.replace("/", "_") / "ofql" / "seed1" / "log.txt"
    for _ in range(300):  # until training is under way
        if log.is_file() and "update 20/600" in log.read_text():
            break
        time.sleep(0.5)
    runner.send_signal(signal.SIGTERM)
    output = runner.communicate(timeout=300)[0]
    assert runner.returncode == 0 and "0 of 1 runs done" in output, output
    assert "stopped at update" in log.read_text() and "KeyboardInterrupt" not in log.read_text()
    resumed = ablation(*grid[2:], cwd=tmp_path)
    assert "1 of 1 runs done" in resumed and "--resume" in log.read_text().split("$ ")[-1]
