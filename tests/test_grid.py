"""docs/ablation.py's grids through submitit's real local executor: two datasets and two seeds, seeds batched into one
ofql_jax.py --num-seeds job or one ofql.py job each, skipped when finished, resumed with a larger budget, stopped by a Ctrl-C
to the whole process group; Table 1's plan, its missing files and one of its rows trained and reported."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import pytest
from conftest import HOPPER_DATASET_ID, create_dataset, hopper_episodes

ROOT = Path(__file__).resolve().parents[1]
OTHER_DATASET_ID = "test/hopper/other-v0"
FLAGS = "--threads 1 --no-cuda --final-eval-episodes 2 --eval-episodes 1 --log-freq 10"


def runner(*args: str, cwd, expect: int = 0, env=None) -> str:
    command = [sys.executable, str(ROOT / "docs" / "ablation.py"), *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def two_datasets(minari_path) -> tuple[str, str]:
    if not (minari_path / OTHER_DATASET_ID).exists():
        create_dataset(OTHER_DATASET_ID, hopper_episodes(num_episodes=20, seed=5), gym.make("Hopper-v5").spec)
    return HOPPER_DATASET_ID, OTHER_DATASET_ID


def test_a_grid_runs_through_submitit_skips_finished_runs_resumes_and_reports_both_kinds(two_datasets, tmp_path):
    pytest.importorskip("matplotlib")
    sweep = ("eta-sweep", "--datasets", *two_datasets, "--seeds", "1", "2", "--eval-freq", "10", "--jobs", "2")
    sweep += ("--runs-dir", "runs", f"--flags={FLAGS}")
    batched = runner(*sweep, "--etas", "0.01", "--batch-seeds", "--total-steps", "20", cwd=tmp_path)
    assert "0 of 2 runs done" in batched and "2 of 2 runs done" in batched, batched
    results = list((tmp_path / "runs" / "submitit").glob("*_result.pkl"))  # written by submitit's workers
    assert len(results) == 2, sorted(os.listdir(tmp_path / "runs" / "submitit"))
    one_each = runner(*sweep, "--etas", "0.3", "--total-steps", "20", "--script", "ofql.py", cwd=tmp_path)
    assert "4 of 4 runs done" in one_each, one_each
    again = runner(*sweep, "--etas", "0.01", "--batch-seeds", "--total-steps", "20", cwd=tmp_path)
    assert "2 of 2 runs done; 0 to go" in again and "start" not in again
    longer = runner(*sweep, "--etas", "0.01", "--batch-seeds", "--total-steps", "30", cwd=tmp_path)
    assert "0 of 2 runs done" in longer and "2 of 2 runs done" in longer, longer
    for dataset in two_datasets:
        folder = tmp_path / "runs" / "eta_sweep" / dataset.replace("/", "_")
        (summary,) = (folder / "eta0.01" / "seeds1-2" / "runs").glob("*/summary.json")
        summary = json.loads(summary.read_text())
        assert (summary["total_steps"], summary["resumed_from_step"], summary["seeds"]) == (30, 20, [1, 2])
        assert sorted(path.name for path in (folder / "eta0.3").iterdir()) == ["seed1", "seed2"]
    report = runner("report", "--runs-dir", "runs", "--out", "figures", cwd=tmp_path)  # --out made
    assert (tmp_path / "figures" / "eta_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = re.findall(r"^\| ([\d.]+) \| -?[\d.]+ \+- [\d.]+ \| .* \| (\d) \| (\d+) \|$", report, re.MULTILINE)
    assert rows == [("0.01", "2", "30"), ("0.3", "2", "20")] * 2, report


def test_a_ctrl_c_to_the_process_group_stops_each_script_once_and_the_same_command_resumes(two_datasets, tmp_path):
    """The terminal's Ctrl-C reaches every process of its group: the engine's controllers ignore it and the scripts
    run in their own sessions, so each script gets the runner's one SIGTERM, checkpoints and stops; the runner exits
    as a process stopped by SIGINT does (130), so that a shell loop over grids stops too."""
    grid = [sys.executable, str(ROOT / "docs" / "ablation.py"), "eta-sweep", "--datasets", two_datasets[0]]
    grid += ["--seeds", "1", "2", "--etas", "0.01", "--total-steps", "4000", "--eval-freq", "2000", "--script"]
    grid += ["ofql.py", f"--flags={FLAGS}", "--runs-dir", "runs"]
    runner_process = subprocess.Popen(
        grid, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    folder = tmp_path / "runs" / "eta_sweep" / two_datasets[0].replace("/", "_") / "eta0.01"
    logs = [folder / "seed1" / "log.txt", folder / "seed2" / "log.txt"]
    for _ in range(600):  # until both train
        if all(log.is_file() and "update 20/4000" in log.read_text() for log in logs):
            break
        time.sleep(0.5)
    os.killpg(runner_process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the runner and all it started
    output = runner_process.communicate(timeout=300)[0]
    assert runner_process.returncode == 128 + signal.SIGINT and "interrupted at update" in output, output
    for log in logs:
        text = log.read_text()
        assert text.count("SIGTERM: checkpointing") == 1 and "stopped at update" in text, text[-2000:]
        assert "SIGINT" not in text and "Traceback" not in text, text[-2000:]
    stopped = [json.loads(next((log.parent / "runs").glob("*/summary.json")).read_text()) for log in logs]
    budget = str(max(summary["interrupted_at_step"] for summary in stopped) + 20)  # the budget cut: quick to end
    resumed = runner(*grid[2:], "--total-steps", budget, cwd=tmp_path)
    assert "2 of 2 runs done" in resumed and all("--resume" in log.read_text().split("$ ")[-1] for log in logs)


def test_table1_prints_its_plan_and_estimate_and_lists_missing_files_before_anything_starts(tmp_path):
    plan = runner("table1", "--d4rl-dir", str(tmp_path), "--batch-seeds", "--dry-run", cwd=tmp_path)
    rows = re.findall(r"^\| (\S+-v\d) \| (\S+) \| ([\d.]+) \| ([\d,]+) \| 1 \| ([\d.]+) \|$", plan, re.MULTILINE)
    assert len(rows) == 20 and ("hopper-medium-replay-v2", "hopper_medium_replay-v2.hdf5", "2", "2,000,000") in [
        row[:4] for row in rows
    ], plan
    assert ("antmaze-umaze-v2", "Minari", "0.5", "1,000,000") in [row[:4] for row in rows]
    estimate = float(re.search(r"estimate: ([\d.]+) GPU-hours", plan).group(1))
    assert estimate == pytest.approx(sum(float(row[4]) for row in rows), abs=0.2) and estimate > 0
    assert "9 D4RL files are not in --d4rl-dir" in plan
    url = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/walker2d_medium_expert-v2.hdf5"
    assert f"walker2d_medium_expert-v2.hdf5  {url}" in plan
    refused = runner("table1", "--d4rl-dir", str(tmp_path), "--tasks", "hopper-medium", cwd=tmp_path, expect=1)
    assert "error: --d4rl-dir" in refused and "1 files missing" in refused and not (tmp_path / "runs").exists()
    unknown = runner("table1", "--tasks", "hopper-medum", cwd=tmp_path, expect=1)
    assert "error: --tasks hopper-medum: not a row of Table 1" in unknown
    wrong_script = runner(
        "eta-sweep", "--datasets", "x", "--script", "ofql.py", "--batch-seeds", cwd=tmp_path, expect=2
    )
    assert "use --script ofql_jax.py" in wrong_script and not (tmp_path / "runs").exists()
    no_sbatch = runner("eta-sweep", "--datasets", "hopper-medium-v2", "--executor", "slurm", cwd=tmp_path, expect=1)
    assert no_sbatch.splitlines()[-1].startswith("error: --executor slurm: no sbatch here")


def test_table1_trains_a_row_from_a_d4rl_file_with_its_seeds_batched_in_one_wandb_group(d4rl_file, tmp_path):
    pytest.importorskip("matplotlib")
    table = ("table1", "--tasks", "hopper-medium-replay", "--d4rl-dir", str(d4rl_file.parent), "--seeds", "1", "2")
    table += ("--batch-seeds", "--total-steps", "20", "--eval-freq", "10", "--runs-dir", "runs")
    env = os.environ | {"WANDB_MODE": "offline"}
    trained = runner(*table, f"--flags={FLAGS} --track", cwd=tmp_path, env=env)
    assert "1 of 1 runs done" in trained, trained
    folder = tmp_path / "runs" / "table1" / "hopper-medium-replay" / "ofql" / "seeds1-2"
    (wandb_file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    assert b"table1-runs" in wandb_file.read_bytes()  # the grid's wandb group
    report = runner("report", "--runs-dir", "runs", cwd=tmp_path)
    assert re.search(r"^\| hopper-medium-replay \| -?[\d.]+ \+- [\d.]+ \| .* \| 2 \| 20 \|$", report, re.MULTILINE)
    assert (tmp_path / "runs" / "report" / "table1.md").is_file()


def test_report_splits_a_batched_run_into_seeds_episode_by_episode():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "docs" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    batched = {"num_seeds": 2, "seeds": [1, 2], "eval_episodes": 2, "normalized_score": 15.0}
    batched |= {"seed_normalized_scores": [10.0, 20.0], "seed_best_normalized_scores": [12.0, 21.0]}
    batched |= {"seed_evaluations": [[[5, 12.0]], [[5, 21.0]]], "episode_normalized_scores": [9.0, 11.0, 18.0, 22.0]}
    first, second = ablation.each_seed(batched)
    assert (first["seed"], first["normalized_score"], first["episode_normalized_scores"]) == (1, 10.0, [9.0, 11.0])
    assert (second["seed"], second["normalized_score"], second["episode_normalized_scores"]) == (2, 20.0, [18.0, 22.0])
    older = {key: value for key, value in batched.items() if key != "episode_normalized_scores"}  # before the key
    assert all("episode_normalized_scores" not in each for each in ablation.each_seed(older))
