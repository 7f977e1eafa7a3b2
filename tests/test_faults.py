"""Fault injection in all four scripts: a signal in each phase (start-up: the imports and the data loading; training;
periodic and final evaluation; a checkpoint write), kill -9, every kind of wrong file for --checkpoint and --resume,
--resume of a finished run, --track without a wandb login or with a bad WANDB_MODE. Each case asserts the exit code,
one line on stderr, no traceback, and that what was saved before is intact and resumable: a run stopped in its
evaluations and resumed twice ends with the losses and scores of an uninterrupted one."""

import fcntl
import importlib
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import asdict

import pytest
import torch
from conftest import HOPPER_DATASET_ID, ROOT, no_run_folder

SCRIPTS = ("ofql", "dql", "fql", "ofql_jax")
TORCH_SCRIPTS = ("ofql", "dql", "fql")
PLUMBING = ("ofql", "ofql_jax")  # runs that test PLUMBING alone: dql.py and fql.py hold ofql.py's (test_robustness.py)
CHECKPOINT = {"ofql_jax": "checkpoint.msgpack"}
# evaluations long enough to be interrupted: 60 episodes, a progress line at each quarter; quick ones otherwise
FLAGS = "--total-steps 40 --eval-freq 20 --log-freq 10 --eval-episodes 60 --final-eval-episodes 60 --num-candidates 2"
FLAGS += " --batch-size 64"


def checkpoint_name(script: str) -> str:
    return CHECKPOINT.get(script, "checkpoint.pt")


def command(script: str, *flags: str) -> list[str]:
    jax_flags = ["--updates-per-call", "10"] if script == "ofql_jax" else []
    base = ["--env-id", HOPPER_DATASET_ID, "--no-cuda", *jax_flags]
    return [sys.executable, str(ROOT / f"{script}.py"), *(base if "--resume" not in flags else []), *flags]


def run(script: str, cwd, *flags: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(command(script, *flags), cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def start(script: str, cwd, flags, env=None) -> subprocess.Popen:
    env = (env or os.environ) | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        command(script, *flags), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def signal_at(script: str, cwd, flags: tuple[str, ...], line_start: str, signum: int, env=None) -> tuple[int, str, str]:
    """Run, send `signum` once a stdout line starts with `line_start`; the exit code, stdout and stderr."""
    process = start(script, cwd, flags, env)
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


def module(script: str):
    if script == "ofql_jax":
        pytest.importorskip("jax")  # a guard only: CI installs the `jax` extra
    return importlib.import_module(script)


@pytest.mark.parametrize("script", PLUMBING)
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

    # a finished run refuses --resume unless asked for more updates (test_every_wrong_file_...), and goes on with them
    # keeping its summary as summary_40.json (test_robustness.py's test_non_finite_loss_...)


def handles_sigterm(pid: int) -> bool:
    """The process has a SIGTERM handler of its own (Linux: SigCgt in /proc): the script's first lines ran."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


@pytest.mark.parametrize("script", PLUMBING)
def test_a_signal_in_start_up_ends_at_once_with_one_line_and_no_run_folder(script, minari_path, tmp_path):
    """SIGTERM while the libraries import, SIGINT while the data loads (after the task line, before the data's):
    exit code 128 + signal, one line on stderr, no traceback, no run folder."""
    process = start(script, tmp_path, ("--total-steps", "100"))
    deadline = time.monotonic() + 60
    while not handles_sigterm(process.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and out == "", (out, err[-2000:])  # before the task line
    assert err.strip().splitlines() == ["SIGTERM: stopped in start-up, nothing written"], err[-2000:]

    code, out, err = signal_at(script, tmp_path, ("--total-steps", "100"), "", signal.SIGINT)  # at its first line
    assert code == 128 + signal.SIGINT and "borrowing hopper-medium's" in out, (out, err[-2000:])  # the task line
    assert "transitions" not in out, out  # the data had not loaded yet
    assert err.strip().splitlines() == ["SIGINT: stopped in start-up, nothing written"], err[-2000:]
    assert no_run_folder(tmp_path)


@pytest.mark.parametrize("script", PLUMBING)
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


def wrong_files(script: str, own, tmp_path) -> dict:
    """Each kind of wrong file or folder: its path, and what the error line says besides the flag and the path."""
    truncated, empty, text = (
        tmp_path / f"truncated{own.suffix}",
        tmp_path / f"empty{own.suffix}",
        tmp_path / "notes.txt",
    )
    truncated.write_bytes(own.read_bytes()[: own.stat().st_size // 2])
    empty.write_bytes(b"")
    text.write_text("not a checkpoint\n")
    says = f"not a file of {script}.py"
    cases = {
        "a folder": (tmp_path, says),
        "no such file": (tmp_path / "missing.pt", says),
        "empty": (empty, says),
        "truncated": (truncated, says),
        "text": (text, says),
    }
    if script in TORCH_SCRIPTS:  # the same format, but another script's
        other = "dql" if script == "ofql" else "ofql"
        another = tmp_path / "another.pt"
        torch.save(torch.load(own) | {"script": f"{other}.py"}, another)
        cases["another script's"] = (another, f"{says} (written by {other}.py)")
    else:
        torch_file = tmp_path / "torch.pt"
        torch.save({"args": {}, "script": "ofql.py"}, torch_file)
        cases["a torch file"] = (torch_file, says)
    return cases


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_wrong_file_for_eval_only_and_resume_gives_one_line(script, minari_path, monkeypatch, tmp_path):
    module_ = module(script)
    finished_run = tmp_path / "finished"  # a run finished at update 20: its checkpoint and summary, as the script saves
    finished_run.mkdir()
    checkpoint = finished_run / checkpoint_name(script)
    args = asdict(module_.Args(env_id=HOPPER_DATASET_ID, total_steps=20))
    module_.save_atomically(str(checkpoint), {"args": args, "script": f"{script}.py", "progress": {"step": 20}})
    module_.save_atomically(str(finished_run / "summary.json"), {"total_steps": 20, "args": args})
    monkeypatch.chdir(tmp_path)

    def error_of(*flags: str) -> str:
        monkeypatch.setattr(sys, "argv", [f"{script}.py", "--env-id", HOPPER_DATASET_ID, *flags])
        with pytest.raises(SystemExit) as exit_info:
            module_.parse_args()
        message = str(exit_info.value.code)
        assert message.startswith("error: ") and "\n" not in message, message
        return message

    for kind, (path, says) in wrong_files(script, checkpoint, tmp_path).items():
        message = error_of("--eval-only", str(path))
        assert message.startswith(f"error: --eval-only {path}: {says}"), (kind, message)
        folder = tmp_path / "resume" / kind.replace(" ", "_").replace("'", "")
        folder.mkdir(parents=True)
        if path.is_file():
            (folder / checkpoint_name(script)).write_bytes(path.read_bytes())
        message = error_of("--resume", str(folder))
        assert message.startswith(f"error: --resume {folder}") and says in message, (kind, message)

    for where in (checkpoint, tmp_path / "nowhere", tmp_path):  # a file, no folder, a folder without a checkpoint
        assert error_of("--resume", str(where)).startswith(f"error: --resume {where}")
    refused = error_of("--resume", str(finished_run))  # a finished run: its result is kept unless more is asked for
    assert refused == (
        f"error: --total-steps 20: {finished_run} is at update 20 and finished; ask for more, or evaluate it with"
        f" --eval-only {finished_run}/{checkpoint_name(script)}"
    )
    (tmp_path / "runs").write_text("a file where the run folders go")
    assert error_of().endswith(f"{tmp_path / 'runs'} is not a writable folder: run elsewhere")
    saved = module_.load_saved(str(checkpoint), "--resume")  # the good files still load
    assert saved["script"] == f"{script}.py" and saved["progress"]["step"] == 20


@pytest.mark.parametrize("script", TORCH_SCRIPTS)
def test_a_signal_during_a_checkpoint_write_keeps_the_last_good_file(script, monkeypatch, tmp_path):
    """A second signal (the first asked for a checkpoint) stops at once, also in the middle of save_atomically: the
    file there before is whole, no temporary file is left; a failed write as well."""
    module_ = module(script)
    stop = module_.stop_requests()
    path = str(tmp_path / checkpoint_name(script))
    replace = os.replace
    try:
        module_.save_atomically(path, {"progress": {"step": 7}, "args": {}, "script": f"{script}.py"})
        stop["phase"], stop["signals"] = "training", [signal.SIGTERM]  # a first signal already asked for a checkpoint

        def replace_after_a_signal(source, target):
            os.kill(os.getpid(), signal.SIGINT)
            replace(source, target)

        monkeypatch.setattr(module_.os, "replace", replace_after_a_signal)
        with pytest.raises(module_.Interrupted):
            module_.save_atomically(path, {"progress": {"step": 8}, "args": {}, "script": f"{script}.py"})
        assert module_.load_saved(path, "--resume")["progress"] == {"step": 7}
        assert os.listdir(tmp_path) == [os.path.basename(path)]
        monkeypatch.setattr(module_.os, "replace", replace)
        with pytest.raises(TypeError):  # a failed write leaves no temporary file, and the last good file
            module_.save_atomically(str(tmp_path / "summary.json"), {"not json": object()})
        assert os.listdir(tmp_path) == [os.path.basename(path)]
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.parametrize("script", PLUMBING)
def test_track_without_a_wandb_login_or_with_a_bad_mode_fails_with_one_line(script, minari_path, tmp_path):
    clean = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")} | {"HOME": str(tmp_path)}
    for env in (clean, clean | {"WANDB_MODE": "bogus"}):
        failed = run(script, tmp_path, "--track", "--total-steps", "10", env=env)
        assert failed.returncode == 1, failed.stderr[-2000:]
        assert_one_line(failed.stderr, "error: --track: wandb did not start (", "wandb login", "WANDB_MODE=offline")
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr[-2000:]
        assert no_run_folder(tmp_path)


@pytest.mark.parametrize("script", PLUMBING)
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


@pytest.mark.parametrize("script", PLUMBING)
def test_a_value_tyro_cannot_parse_is_tyros_error_with_exit_code_2(script, tmp_path):
    failed = run(script, tmp_path, "--batch-size", "abc")
    assert failed.returncode == 2 and "batch-size" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "runs").exists()
