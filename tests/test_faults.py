"""Fault injection in all four scripts: a signal in each phase (start-up, training, periodic and final evaluation, a
checkpoint write), kill -9, every kind of wrong file for --checkpoint and --resume, unwritable places, --resume of a
finished run, --track without a wandb login. Each case asserts the exit code, one line on stderr, no traceback, and
that what was saved before is intact and resumable: a run stopped in its evaluations and resumed twice ends with the
losses and scores of an uninterrupted one."""

import fcntl
import importlib
import json
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios

import pytest
from conftest import HOPPER_DATASET_ID, ROOT

SCRIPTS = ("ofql", "dql", "fql", "ofql_jax")
CHECKPOINT = {"ofql_jax": "checkpoint.msgpack"}
# evaluations long enough to be interrupted: 60 episodes in 4 envs, a progress line at each quarter
FLAGS = "--total-steps 40 --eval-freq 20 --log-freq 10 --eval-episodes 60 --final-eval-episodes 60 --max-eval-envs 4"


def checkpoint_name(script: str) -> str:
    return CHECKPOINT.get(script, "checkpoint.pt")


def command(script: str, *flags: str) -> list[str]:
    jax_flags = ["--updates-per-call", "10"] if script == "ofql_jax" else []
    base = ["--env-id", HOPPER_DATASET_ID, "--no-cuda", "--threads", "1", *jax_flags]
    return [sys.executable, str(ROOT / f"{script}.py"), *(base if "--resume" not in flags else []), *flags]


def run(script: str, cwd, *flags: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(command(script, *flags), cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def signal_at(script: str, cwd, flags: tuple[str, ...], line_start: str, signum: int, env=None) -> tuple[int, str, str]:
    """Run, send `signum` once a stdout line starts with `line_start`; the exit code, stdout and stderr."""
    env = (env or os.environ) | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command(script, *flags), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(line_start):
            process.send_signal(signum)
            break
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, "".join(lines) + stdout, stderr


def assert_one_line(stderr: str, *parts: str):
    """stderr's last line holds every part, and stderr no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    for part in parts:
        assert part in last, stderr[-2000:]


def the_run(cwd) -> str:
    (run_dir,) = (cwd / "runs").iterdir()
    return os.path.relpath(run_dir, cwd)


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def scalars(run_dir) -> dict:
    """The losses and scores logged to tensorboard (timings apart)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("losses/") or tag == "charts/normalized_score"]
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in tags}


@pytest.fixture(scope="module")
def finished_runs(minari_path, tmp_path_factory) -> dict:
    """One finished run per script (20 updates, checkpointed at its evaluation and at its end): their folders."""
    runs = {}
    for script in SCRIPTS:
        cwd = tmp_path_factory.mktemp(f"finished_{script}")
        flags = "--total-steps 20 --eval-freq 10 --log-freq 10 --eval-episodes 1 --final-eval-episodes 2".split()
        done = run(script, cwd, *flags, "--save-model")
        assert done.returncode == 0, done.stderr[-2000:]
        runs[script] = cwd / the_run(cwd)
    return runs


@pytest.mark.parametrize("script", SCRIPTS)
def test_signals_in_both_evaluations_lose_nothing_and_the_resumed_run_is_the_uninterrupted_one(
    script, minari_path, tmp_path
):
    (tmp_path / "u").mkdir(), (tmp_path / "a").mkdir()
    whole = run(script, tmp_path / "u", *FLAGS.split())
    assert whole.returncode == 0, whole.stderr[-2000:]
    checkpoint = checkpoint_name(script)

    # SIGTERM in the periodic evaluation at update 20: interrupted at once, the checkpoint made before it kept
    code, out, err = signal_at(script, tmp_path / "a", FLAGS.split(), "evaluation at update 20: 15/60", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert_one_line(err, "SIGTERM: stopped at update 20; continue from update 20", "--resume")
    run_dir = tmp_path / "a" / the_run(tmp_path / "a")
    summary = read_json(run_dir / "summary.json")
    assert summary["interrupted_at_step"] == 20 and summary["evaluations"] == [] and (run_dir / checkpoint).is_file()
    assert not list(run_dir.glob("*.tmp"))

    # resumed: it evaluates at update 20 first; SIGINT in the final evaluation
    resume = ("--resume", os.path.relpath(run_dir, tmp_path / "a"))
    code, out, err = signal_at(script, tmp_path / "a", resume, "evaluation at update 40: 15/60", signal.SIGINT)
    assert code == 128 + signal.SIGINT, err[-2000:]
    assert_one_line(err, "SIGINT: stopped at update 40; continue from update 40")
    assert "update 20: normalized score" in out and read_json(run_dir / "summary.json")["interrupted_at_step"] == 40

    # resumed again: only the final evaluation is left; the run ends as the uninterrupted one did
    again = run(script, tmp_path / "a", *resume)
    assert again.returncode == 0, again.stderr[-2000:]
    summary, reference = (
        read_json(run_dir / "summary.json"),
        read_json(next((tmp_path / "u" / "runs").iterdir()) / "summary.json"),
    )
    assert summary["evaluations"] == reference["evaluations"] and len(summary["evaluations"]) == 2
    assert summary["normalized_score"] == reference["normalized_score"] and "interrupted_at_step" not in summary
    assert scalars(run_dir) == scalars(next((tmp_path / "u" / "runs").iterdir()))

    # a finished run refuses --resume (its result is kept), and goes on with more updates, keeping its summary
    refused = run(script, tmp_path / "a", *resume)
    assert refused.returncode == 1 and not refused.stdout.strip(), refused.stdout[-2000:]
    assert_one_line(refused.stderr, "error: --resume", "the run finished at update 40", "--total-steps above 40")
    assert read_json(run_dir / "summary.json") == summary
    longer = run(script, tmp_path / "a", *resume, "--total-steps", "60")
    assert longer.returncode == 0, longer.stderr[-2000:]
    assert (
        read_json(run_dir / "summary_40.json") == summary and read_json(run_dir / "summary.json")["total_steps"] == 60
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_in_start_up_ends_at_once_with_one_line(script, minari_path, tmp_path):
    code, out, err = signal_at(script, tmp_path, ("--total-steps", "100"), "", signal.SIGINT)  # at its first line
    assert code == 128 + signal.SIGINT, err[-2000:]
    assert_one_line(err, "SIGINT: stopped during start-up (no update made)")


@pytest.mark.parametrize("script", SCRIPTS)
def test_kill_9_loses_at_most_one_evaluation_interval(script, minari_path, tmp_path):
    flags = "--total-steps 40 --eval-freq 20 --log-freq 10 --eval-episodes 1 --final-eval-episodes 2".split()
    code, out, err = signal_at(script, tmp_path, flags, "update 30/", signal.SIGKILL)
    assert code == -signal.SIGKILL
    resumed = run(script, tmp_path, "--resume", the_run(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        "from update 20" in resumed.stdout
        and read_json(tmp_path / the_run(tmp_path) / "summary.json")["total_steps"] == 40
    )


def wrong_files(script: str, finished: dict, tmp_path) -> dict:
    """Each kind of wrong file or folder: its path, and what the error line says."""
    own = finished[script] / checkpoint_name(script)
    truncated, empty, text = (
        tmp_path / f"truncated{own.suffix}",
        tmp_path / f"empty{own.suffix}",
        tmp_path / "notes.txt",
    )
    truncated.write_bytes(own.read_bytes()[: own.stat().st_size // 2])
    empty.write_bytes(b"")
    text.write_text("not a checkpoint\n")
    cases = {
        "a folder": (tmp_path, "a folder"),
        "no such file": (tmp_path / "missing.pt", "no such file"),
        "empty": (empty, "not a complete"),
        "truncated": (truncated, "not a complete"),
        "text": (text, "not a complete"),
    }
    if script != "ofql_jax":
        other = "dql" if script == "ofql" else "ofql"
        cases["another script's"] = (finished[other] / "checkpoint.pt", f"written by {other}.py (its flags")
        cases["ofql_jax.py's"] = (finished["ofql_jax"] / "checkpoint.msgpack", ".msgpack files are ofql_jax.py's")
    else:
        cases["a torch file"] = (finished["ofql"] / "checkpoint.pt", ".pt files are the torch scripts'")
    return cases


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_wrong_file_for_checkpoint_and_resume_gives_one_line(script, finished_runs, monkeypatch, tmp_path):
    module = importlib.import_module(script)
    monkeypatch.chdir(tmp_path)

    def error_of(*flags: str) -> str:
        monkeypatch.setattr(sys, "argv", [f"{script}.py", "--env-id", HOPPER_DATASET_ID, *flags])
        with pytest.raises(SystemExit) as exit_info:
            module.parse_args()
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and "\n" not in message, message
        return message

    for kind, (path, says) in wrong_files(script, finished_runs, tmp_path).items():
        message = error_of("--eval-only", "--checkpoint", str(path))
        assert message.startswith(f"error: --checkpoint {path}") and says in message, (kind, message)
        folder = tmp_path / "resume" / kind.replace(" ", "_").replace("'", "")
        folder.mkdir(parents=True)
        if path.is_file():
            shutil.copy(path, folder / checkpoint_name(script))
        message = error_of("--resume", str(folder))
        assert message.startswith(f"error: --resume {folder}"), (kind, message)

    checkpoint = finished_runs[script] / checkpoint_name(script)
    assert "a file; --resume takes the run folder" in error_of("--resume", str(checkpoint))
    assert "no such folder" in error_of("--resume", str(tmp_path / "nowhere"))
    assert f"no {checkpoint_name(script)} there" in error_of("--resume", str(tmp_path))
    assert "the run finished at update 20" in error_of("--resume", str(finished_runs[script]))
    (tmp_path / "runs").write_text("a file where the run folders go")
    assert "is not a folder, and the run writes runs/" in error_of()
    assert not list(tmp_path.glob("runs*/*"))
    saved = module.load_saved(str(checkpoint), "--resume")  # the good files still load
    assert saved["script"] == f"{script}.py" and saved["progress"]["step"] == 20


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_during_a_checkpoint_write_waits_for_the_file(script, monkeypatch, tmp_path):
    """A second signal while save_atomically writes is handled once the file is whole: no half file, no .tmp."""
    module = importlib.import_module(script)
    stop = module.stop_requests()
    stop["phase"], stop["signals"] = "training", [signal.SIGTERM]  # a first signal already asked for a checkpoint
    replace = os.replace

    def replace_after_a_signal(source, target):
        os.kill(os.getpid(), signal.SIGINT)  # held until the write is done
        replace(source, target)

    monkeypatch.setattr(module.os, "replace", replace_after_a_signal)
    path = str(tmp_path / checkpoint_name(script))
    try:
        with pytest.raises(module.Interrupted):
            module.save_atomically(path, {"progress": {"step": 7}, "args": {}})
        assert module.load_saved(path, "--resume") == {"progress": {"step": 7}, "args": {}}
        assert os.listdir(tmp_path) == [os.path.basename(path)]
        monkeypatch.setattr(module.os, "replace", replace)
        with pytest.raises(TypeError):  # a failed write leaves no temporary file, and the last good file
            module.save_atomically(str(tmp_path / "summary.json"), {"not json": object()})
        assert os.listdir(tmp_path) == [os.path.basename(path)]
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize("script", SCRIPTS)
def test_track_without_a_wandb_login_fails_with_one_line(script, minari_path, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    failed = run(script, tmp_path, "--track", "--total-steps", "10", env=env)
    assert failed.returncode == 1
    assert_one_line(failed.stderr, "error: --track: wandb could not start", "wandb login", "WANDB_MODE=offline")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_terminal_gets_a_progress_bar(script, minari_path, tmp_path):
    """On a terminal the updates and the evaluation's episodes show as tqdm bars; in a file, as lines (other tests)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    flags = "--total-steps 20 --eval-freq 10 --log-freq 10 --eval-episodes 1 --final-eval-episodes 2".split()
    process = subprocess.Popen(command(script, *flags), cwd=tmp_path, stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the script closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=600) == 0, output[-2000:]
    text = output.decode(errors="replace")
    assert "update/s" in text and "critic" in text and "evaluation at update 10" in text, text[-2000:]
    assert "update 10/20 |" not in text  # the bar, not the log line


def test_the_runner_and_the_figure_scripts_say_what_went_wrong_in_one_line(minari_path, tmp_path):
    """docs/ablation.py: a misspelled dataset stops before any job, a job failing on a bad --flags value is reported
    with the script's own error line (and not as resumable), report fails when it finds no runs; docs/fig4_speed.py
    given a missing or a wrong file."""

    def docs(script: str, *args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / "docs" / script), *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    grid = ("eta-sweep", "--seeds", "1", "--etas", "0.1", "--total-steps", "10", "--eval-freq", "10")
    misspelled = docs("ablation.py", *grid, "--datasets", "test/hoper/rollouts-v0")
    assert (
        misspelled.returncode == 1
        and not (tmp_path / "runs" / "paper" / "eta_sweep" / "test_hoper_rollouts-v0").exists()
    )
    assert_one_line(misspelled.stderr, "error: --datasets: test/hoper/rollouts-v0 is not local")
    bad_flags = docs(
        "ablation.py", *grid, "--datasets", HOPPER_DATASET_ID, "--flags=--threads 1 --no-cuda --batch-size 0"
    )
    assert bad_flags.returncode == 1, bad_flags.stdout[-2000:]
    assert "FAILED: error: --batch-size 0: out of range" in bad_flags.stdout
    assert "1 failed (their error above" in bad_flags.stdout and "to go" not in bad_flags.stdout.splitlines()[-1]
    empty = docs("ablation.py", "report", "--runs-dir", str(tmp_path / "nothing"))
    assert empty.returncode == 1 and not empty.stdout
    assert_one_line(empty.stderr, f"error: --runs-dir {tmp_path / 'nothing'}: no finished runs")
    missing = docs("fig4_speed.py", str(tmp_path / "missing.md"), "--out", str(tmp_path / "fig4.png"))
    assert missing.returncode == 1 and not (tmp_path / "fig4.png").exists()
    assert_one_line(missing.stderr, "missing.md: cannot be read as a benchmark output")
    wrong = docs("fig4_speed.py", str(ROOT / "README.md"), "--out", str(tmp_path / "fig4.png"))
    assert wrong.returncode == 1 and not (tmp_path / "fig4.png").exists()
    assert_one_line(wrong.stderr, "README.md: no table of tests/benchmark.py in it")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_value_tyro_cannot_parse_is_tyros_error_with_exit_code_2(script, tmp_path):
    failed = run(script, tmp_path, "--batch-size", "abc")
    assert failed.returncode == 2 and "batch-size" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "runs").exists()
