"""The figures by command on small budgets: docs/fig3_toy.py (the paper's Fig. 3) and docs/ablation.py (Table 2; its
eta sweep in test_grid.py): they run, write their PNGs and print their tables; bad input is one error line before
anything runs."""

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
    """By default into the current folder: the committed figure is rebuilt only when named."""
    pytest.importorskip("matplotlib")  # a guard only: CI installs the plot extra
    committed = (ROOT / "docs" / "fig3_toy.png").read_bytes()
    command = [sys.executable, str(ROOT / "docs" / "fig3_toy.py"), "--quick"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "fig3_toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (ROOT / "docs" / "fig3_toy.png").read_bytes() == committed
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
    flags = "--threads 1 --no-cuda --final-eval-episodes 2 --eval-episodes 1 --log-freq 10"
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
    flags = "--threads 1 --no-cuda --final-eval-episodes 1 --eval-episodes 1 --log-freq 10"
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
    assert runner.returncode == 128 + signal.SIGTERM and "0 of 1 runs done" in output, output
    assert "stopped at update" in log.read_text() and "KeyboardInterrupt" not in log.read_text()
    stopped = json.loads(next((log.parent / "runs").glob("*/summary.json")).read_text())["interrupted_at_step"]
    resumed = ablation(*grid[2:], "--total-steps", str(stopped + 20), cwd=tmp_path)  # the budget cut: quick to end
    assert "1 of 1 runs done" in resumed and "--resume" in log.read_text().split("$ ")[-1]


GRID = ("eta-sweep", "--seeds", "1", "--etas", "0.1", "--total-steps", "10", "--eval-freq", "10", "--runs-dir", "runs")
BAD_INPUTS = {  # script and arguments, run in a folder that holds a file named `file`; the error line's text
    "fig3-no-updates": (("fig3_toy.py", "--steps", "0"), "error: --steps 0: out of range"),
    "fig3-negative-updates": (("fig3_toy.py", "--steps", "-10"), "error: --steps -10: out of range"),
    "fig3-no-samples": (("fig3_toy.py", "--samples", "0"), "error: --samples 0: out of range"),
    "fig3-negative-samples": (("fig3_toy.py", "--samples", "-5"), "error: --samples -5: out of range"),
    "fig3-negative-threads": (("fig3_toy.py", "--threads", "-1"), "error: --threads -1: out of range"),
    "fig3-unknown-format": (("fig3_toy.py", "--out", "f.xyz"), "error: --out f.xyz: .xyz is not an image format"),
    "fig3-under-a-file": (("fig3_toy.py", "--out", "file/f.png"), "file is a file"),
    "fig4-unknown-format": (
        ("fig4_speed.py", str(ROOT / "docs" / "benchmarks" / "cpu.md"), "--out", "f4.xyz"),
        "error: --out f4.xyz: .xyz is not an image format",
    ),
    "fig4-missing-input": (("fig4_speed.py", "missing.md"), "missing.md: cannot be read as a benchmark output"),
    "fig4-wrong-input": (("fig4_speed.py", str(ROOT / "README.md")), "README.md: no table of tests/benchmark.py in it"),
    "report-out-a-file": (("ablation.py", "report", "--out", "file"), "error: --out file: a file"),
    "report-no-runs": (
        ("ablation.py", "report", "--runs-dir", "nothing"),
        "error: --runs-dir nothing: no finished runs",
    ),
    "grid-no-jobs": (("ablation.py", *GRID, "--datasets", HOPPER_DATASET_ID, "--jobs", "0"), "error: --jobs 0: out of"),
    "grid-misspelled-dataset": (
        ("ablation.py", *GRID, "--datasets", "hoper-medium-v2"),
        "error: --datasets: unknown --env-id hoper-medium-v2",
    ),
    "grid-job-bad-value": (
        ("ablation.py", *GRID, "--datasets", HOPPER_DATASET_ID, "--flags=--threads 1 --no-cuda --batch-size 0"),
        "FAILED: error: --batch-size 0: must be in [1, inf)",
    ),
    "grid-job-unknown-flag": (
        ("ablation.py", *GRID, "--datasets", HOPPER_DATASET_ID, "--flags=--threads 1 --no-cuda --no-such-flag"),
        "FAILED: error: Unrecognized options: --no-such-flag",
    ),
}


@pytest.mark.parametrize("arguments, expected", BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_bad_input_is_one_error_line_and_writes_nothing(arguments, expected, minari_path, tmp_path):
    """An argument error stops the script before it runs (exit code 2 from the parser, 1 after it); a grid job that
    failed on its flags is reported with its error line, as failed, not as resumable."""
    pytest.importorskip("matplotlib")
    (tmp_path / "file").write_text("not a folder")
    command = [sys.executable, str(ROOT / "docs" / arguments[0]), *arguments[1:]]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    errors = [line for line in output.splitlines() if "error:" in line]
    assert run.returncode in (1, 2) and "Traceback" not in run.stderr, output[-3000:]
    assert len(errors) == 1 and expected in errors[0], output[-3000:]
    assert errors == run.stderr.splitlines()[-1:] or "FAILED: error:" in errors[0], output[-3000:]
    assert "resumable" not in output and "to go" not in (run.stdout.splitlines() or [""])[-1], output[-3000:]
    written = [path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file()]
    kept = [path for path in written if path.name in ("file", "log.txt", "dataset.json") or "submitit" in path.parts]
    assert written == kept and (tmp_path / "file").read_text() == "not a folder", written  # a grid job's logs only
