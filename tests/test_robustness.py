"""Every script: the datasets of the paper's Table 1, bad input, a stop on a non-finite loss, SIGINT/SIGTERM
checkpoints with --resume, and reproducible CPU runs. Parametrized over the four scripts, which share no code."""

import importlib
import json
import os
import subprocess
import sys
import time

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from conftest import HOPPER_DATASET_ID, ROOT, hopper_episodes, stop_with_sigterm, write_d4rl_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPTS = ["ofql", "dql", "fql", "ofql_jax"]
TORCH_SCRIPTS = ["ofql", "dql", "fql"]
LOSSES = ("critic_loss", "bc_loss", "q_loss", "actor_loss", "q_mean", "q_gap", "action_mse", "q_grad_ratio")  # all log
QUICK = ("--no-cuda", "--threads", "1", "--eval-freq", "100000", "--final-eval-episodes", "1", "--max-eval-envs", "1")


def module(script: str):
    if script == "ofql_jax":
        pytest.importorskip("jax")  # a guard only: CI installs the `jax` extra
    return importlib.import_module(script)


def run(script: str, cwd, *flags: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / f"{script}.py"), *flags]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def summary_of(cwd) -> dict:
    (path,) = (cwd / "runs").glob("*/summary.json")
    return json.loads(path.read_text())


def logged_losses(run_dir) -> dict[str, dict[int, float]]:
    """Every logged loss of a run folder (all its tensorboard files, resumed parts included): name -> {update: value}."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("losses/") and "/seed_" not in tag]
    losses = {tag.removeprefix("losses/"): {e.step: e.value for e in events.Scalars(tag)} for tag in tags}
    assert set(LOSSES) <= set(losses), sorted(losses)
    return losses


def load_model(path) -> dict:
    if path.suffix == ".msgpack":
        from flax.serialization import msgpack_restore

        return msgpack_restore(path.read_bytes())
    return {name: dict(value) if isinstance(value, dict) else value for name, value in torch.load(path).items()}


def save_model(saved: dict, path):
    if path.suffix == ".msgpack":
        from flax.serialization import msgpack_serialize

        path.write_bytes(msgpack_serialize(saved))
    else:
        torch.save(saved, path)


def arrays(tree) -> list[np.ndarray]:
    """A network's arrays, by name (torch's state dicts and JAX's nested dicts alike)."""
    if isinstance(tree, dict):
        return [array for name in sorted(tree) for array in arrays(tree[name])]
    return [np.asarray(tree)]


# Datasets ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_d4rl_file_rows_become_transitions(script, tmp_path):
    """No next_observations: the next row is the next observation, and rows with a time-out (and the last) are dropped."""
    episodes = hopper_episodes(5, seed=3)
    transitions = module(script).d4rl_transitions(str(write_d4rl_file(tmp_path / "a.hdf5", episodes)))
    expected = [
        (e.observations[i], e.observations[i + 1], e.terminations[i]) for e in episodes for i in range(len(e.rewards))
    ]
    expected = [
        row
        for row, e_last in zip(expected, np.concatenate([e.truncations for e in episodes]), strict=True)
        if not e_last
    ]
    if not episodes[-1].truncations[-1]:
        expected = expected[:-1]  # the file's last row has no successor
    assert len(transitions["obs"]) == len(expected) and transitions["actions"].shape == (len(expected), 3)
    np.testing.assert_array_equal(transitions["obs"], [obs for obs, _, _ in expected])
    moves_on = ~np.array(
        [terminal for _, _, terminal in expected]
    )  # after a termination the next row starts a new episode
    np.testing.assert_array_equal(
        transitions["next_obs"][moves_on], np.array([next_obs for _, next_obs, _ in expected])[moves_on]
    )
    np.testing.assert_array_equal(transitions["terminals"], [terminal for _, _, terminal in expected])
    # with next_observations every row is a transition
    transitions = module(script).d4rl_transitions(
        str(write_d4rl_file(tmp_path / "b.hdf5", episodes, with_next_observations=True))
    )
    assert len(transitions["obs"]) == sum(len(e.rewards) for e in episodes)
    np.testing.assert_array_equal(transitions["next_obs"][-1], episodes[-1].observations[-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_medium_expert_is_combined_once_then_local(script, medium_and_expert, capsys):
    dataset_id = module(script).resolve_dataset_id("hopper-medium-expert-v2")
    assert dataset_id == "mujoco/hopper/medium-expert-v0"
    if dataset_id in minari.list_local_datasets():
        minari.delete_dataset(dataset_id)
    dataset = module(script).load_dataset(dataset_id)
    assert dataset.total_steps == sum(medium_and_expert) and "combining" in capsys.readouterr().out
    assert module(script).load_dataset(dataset_id).total_steps == sum(medium_and_expert)
    assert "combining" not in capsys.readouterr().out  # reused from the local store


@pytest.mark.parametrize("script", SCRIPTS)
def test_antmaze_dict_observations_and_a_goal_ending_eval_env(script, antmaze_dataset):
    m = module(script)
    args, _ = m.task_defaults(m.Args(env_id=antmaze_dataset))
    assert (args.reward_tune, args.lr) == ("cql", 3e-4)
    transitions, make_env, action_space, ref_scores = m.load_task(args, antmaze_dataset)
    assert transitions["obs"].shape[1] == 2 + 2 + 27  # achieved_goal, desired_goal, observation
    assert action_space.shape == (8,) and ref_scores == (0.0, 1.0)  # normalized score = success rate
    env = make_env()
    assert env.unwrapped.continuing_task is False  # the episode ends at the goal, as in D4RL
    np.testing.assert_array_equal(
        transitions["obs"][0],
        m.flatten_obs(next(minari.load_dataset(antmaze_dataset).iterate_episodes()).observations)[0],
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_pen_rewards_are_normalized_and_scored_with_the_datasets_references(script, pen_dataset):
    m = module(script)
    args, _ = m.task_defaults(m.Args(env_id=pen_dataset))
    assert (args.reward_tune, args.lr) == ("normalize", 3e-5)
    transitions, _, _, ref_scores = m.load_task(args, pen_dataset)
    assert ref_scores == (-10.0, 3000.0)
    device = torch.device("cpu") if script in TORCH_SCRIPTS else m.jax.devices("cpu")[0]
    rewards = np.asarray(m.dataset_to_tensors(transitions, args.reward_tune, device)["rewards"])
    assert abs(rewards.mean()) < 1e-4 and abs(rewards.std() - 1) < 1e-3


def test_antmaze_runs_end_to_end(antmaze_dataset, tmp_path):
    result = run("ofql", tmp_path, "--env-id", antmaze_dataset, "--total-steps", "20", "--log-freq", "10", *QUICK)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = summary_of(tmp_path)
    assert summary["normalized_score"] in (0.0, 100.0)  # one episode: success or not


@pytest.mark.parametrize("script", SCRIPTS)
def test_d4rl_file_runs_end_to_end_on_the_gymnasium_env(script, d4rl_file, minari_path, tmp_path):
    flags = (
        "--env-id",
        "hopper-medium-replay-v2",
        "--dataset-path",
        str(d4rl_file),
        "--total-steps",
        "20",
        "--log-freq",
        "10",
    )
    result = run(script, tmp_path, *flags, *QUICK)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "evaluated on Gymnasium's Hopper-v4" in result.stdout
    summary = summary_of(tmp_path)
    assert summary["dataset_id"] == str(d4rl_file) and summary["args"]["grad_norm"] == 4.0  # hopper-medium-replay's row


# Bad input: exit code not 0, one message that names the fix, no traceback, nothing left behind -----------------------


def bad_inputs(tmp_path, d4rl_file) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp_path / "corrupt.hdf5"
    corrupt.write_bytes(d4rl_file.read_bytes()[:2000])
    no_timeouts = write_d4rl_file(tmp_path / "no_timeouts.hdf5", hopper_episodes(2, seed=0), drop="timeouts")
    cases = {
        "unknown env id": (["--env-id", "hoper-medium-v2"], "Did you mean: hopper-medium"),
        "medium-replay asked of Minari": (
            ["--env-id", "hopper-medium-replay-v2"],
            "--dataset-path hopper_medium_replay-v2.hdf5",
        ),
        "dataset not local, offline": (["--env-id", "hopper-medium-v2"], "minari download mujoco/hopper/medium-v0"),
        "missing file": (
            ["--env-id", "hopper-medium-replay-v2", "--dataset-path", "missing.hdf5"],
            "missing.hdf5: no such file",
        ),
        "corrupt file": (
            ["--env-id", "hopper-medium-replay-v2", "--dataset-path", str(corrupt)],
            "not a readable hdf5 file",
        ),
        "file without timeouts": (
            ["--env-id", "hopper-medium-replay-v2", "--dataset-path", str(no_timeouts)],
            "no timeouts in the file",
        ),
        "file of another env": (
            ["--env-id", "walker2d-medium-replay-v2", "--dataset-path", str(d4rl_file)],
            "do not match the env Walker2d-v4",
        ),
        "resume without a checkpoint": (["--resume", str(tmp_path / "runs" / "nothing")], "nothing: no such folder"),
        "eval-only without a model": (
            ["--eval-only", "--checkpoint", "missing.pt"],
            "--checkpoint missing.pt: no such file",
        ),
    }
    import mujoco

    if tuple(int(part) for part in mujoco.__version__.split(".")[:2]) >= (3, 12):
        cases["kitchen on mujoco >= 3.12"] = (["--env-id", "kitchen-partial-v0"], "pip install -e '.[kitchen]'")
    return cases


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_fails_with_one_readable_message(script, d4rl_file, tmp_path):
    module(script)
    env = os.environ | {
        "MINARI_DATASETS_PATH": str(tmp_path / "empty"),
        "HF_HUB_OFFLINE": "1",
    }  # offline, and fast about it
    for case, (flags, message) in bad_inputs(tmp_path, d4rl_file).items():
        result = run(script, tmp_path, *flags, "--no-cuda", env=env, timeout=60)
        assert result.returncode != 0, case
        assert message in result.stderr and "error:" in result.stderr, (case, result.stderr[-1500:])
        assert "Traceback" not in result.stderr, (case, result.stderr[-1500:])
        assert not (tmp_path / "runs").exists(), case


# Every numeric flag out of its range, and every combination that cannot work: one line naming the flag, at once.
OUT_OF_RANGE = {
    "seed": "-1",
    "threads": "-1",
    "checkpoint_freq": "-1",
    "total_steps": "-5",
    "batch_size": "0",
    "eval_freq": "0",
    "eval_episodes": "0",
    "final_eval_episodes": "0",
    "num_candidates": "0",
    "max_eval_envs": "0",
    "log_freq": "0",
    "lr": "0",
    "critic_lr": "nan",
    "eta": "-0.1",
    "grad_norm": "-1",
    "gamma": "1.5",
    "tau": "0",
    "flow_ratio": "1.5",
    "acting_ratio": "-0.5",
    "zero_r_ratio": "1.5",
    "adaptive_power": "-1",
    "adaptive_c": "0",
    "time_mu": "inf",
    "time_sigma": "0",
    "diffusion_steps": "0",
    "flow_steps": "0",
    "eval_steps": "0",
    "eval_noise_scale": "-0.5",
    "ema_decay": "1.5",
    "ema_start": "-1",
    "ema_every": "0",
    "updates_per_call": "0",
    "num_seeds": "0",
}


def parse_error(script: str, monkeypatch, *flags: str) -> str:
    """The message with which the script's argument parsing stops, in this process (no dataset is read)."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--no-cuda", *flags])
    with pytest.raises(SystemExit) as stop:
        module(script).parse_args()
    return str(stop.value.code)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_out_of_range_fails_at_once(script, monkeypatch):
    ranges = module(script).RANGES
    assert set(ranges) <= set(OUT_OF_RANGE), "a flag with a range but no case here"
    for flag in ranges:
        message = parse_error(script, monkeypatch, f"--{flag.replace('_', '-')}", OUT_OF_RANGE[flag])
        assert message.startswith(f"error: --{flag.replace('_', '-')} ") and ranges[flag] in message, message
        assert "\n" not in message


@pytest.mark.parametrize("script", SCRIPTS)
def test_combinations_that_cannot_work_fail_at_once(script, monkeypatch, tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    cases = {
        ("--eval-only", "--checkpoint", str(model), "--resume", str(tmp_path)): "--eval-only and --resume",
        ("--checkpoint", str(model)): "--checkpoint goes with --eval-only",
        ("--eval-only",): "--eval-only needs --checkpoint PATH",
        ("--resume", str(tmp_path)): "no checkpoint",
    }
    if script in TORCH_SCRIPTS:
        cases[("--cudagraphs",)] = "--cudagraphs needs a CUDA GPU"
    if script == "dql":  # ddim takes 1 to T of the T steps (ddpm all of them: tested in test_dql.py)
        cases[("--eval-sampler", "ddim", "--eval-steps", "6")] = (
            "--eval-steps 6: out of range, must be in [1, diffusion_steps]"
        )
    for flags, expected in cases.items():
        message = parse_error(script, monkeypatch, *flags)
        assert message.startswith("error: ") and expected in message and "\n" not in message, (flags, message)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_leaves_no_traceback_and_no_run_folder(script, minari_path, tmp_path):
    result = run(script, tmp_path, "--env-id", HOPPER_DATASET_ID, "--no-cuda", "--batch-size", "0", timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-1500:]
    assert result.stderr.strip().splitlines() == ["error: --batch-size 0: out of range, must be in [1, inf)"]
    assert result.stdout == "" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_started_in_the_same_second_under_the_same_name_takes_a_folder_of_its_own(script, minari_path, tmp_path):
    """As if a shell loop's `&` jobs had started the same run a moment before: a new run takes the name's `-2`."""
    claim = module(script).claim_run_folder
    name = str(tmp_path / "claims" / "run")
    assert [claim(name) for _ in range(3)] == [name, f"{name}-2", f"{name}-3"] and os.path.isdir(f"{name}-3")
    now = int(time.time())
    taken = [
        tmp_path / "runs" / f"{HOPPER_DATASET_ID.replace('/', '_')}__{script}__1__{t}" for t in range(now, now + 60)
    ]
    for folder in taken:
        folder.mkdir(parents=True)
    result = run(script, tmp_path, "--env-id", HOPPER_DATASET_ID, "--total-steps", "2", "--log-freq", "1", *QUICK)
    assert result.returncode == 0, result.stderr[-2000:]
    (summary,) = (tmp_path / "runs").glob("*/summary.json")
    assert summary.parent.name.endswith("-2") and summary.parent.name.removesuffix("-2") in {f.name for f in taken}
    assert not any(any(folder.iterdir()) for folder in taken)


@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(script, minari_path, tmp_path):
    """An actor learning rate of 1e30 makes the losses of the second update non-finite."""
    flags = (
        "--env-id",
        HOPPER_DATASET_ID,
        "--total-steps",
        "50",
        "--log-freq",
        "10",
        "--checkpoint-freq",
        "1",
        "--lr",
        "1e30",
    )
    result = run(script, tmp_path, *flags, *QUICK)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        "non-finite loss at update 2" in result.stderr
        and "the last finite losses, at update 1: critic_loss" in result.stderr
    )
    (checkpoint,) = (tmp_path / "runs").glob("*/checkpoint.*")
    if script in TORCH_SCRIPTS:
        saved = torch.load(checkpoint)
        assert saved["progress"]["step"] == 1 and all(value.isfinite().all() for value in saved["actor"].values())


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_same_losses_and_resume_continues_exactly(script, minari_path, tmp_path):
    """Two runs with the same seed log identical losses at every update, also when the second logs (and computes the
    diagnostics) half as often: they do not touch the training's RNG; a run stopped by SIGTERM and resumed logs the
    same losses as the uninterrupted one, in the same run folder."""
    flags = ("--env-id", HOPPER_DATASET_ID, "--total-steps", "120", "--log-freq", "1", *QUICK)
    sparser = ("--log-freq", "2") + (("--updates-per-call", "1") if script == "ofql_jax" else ())  # same scan length
    runs = {}
    for name, more in (("first", ()), ("second", sparser)):
        (tmp_path / name).mkdir()
        assert run(script, tmp_path / name, *flags, *more).returncode == 0
        runs[name] = logged_losses(next((tmp_path / name / "runs").iterdir()))
    assert all(len(series) == 120 for series in runs["first"].values())
    assert runs["second"] == {
        name: {s: v for s, v in series.items() if s % 2 == 0} for name, series in runs["first"].items()
    }
    assert ("acting_bc_loss" in runs["first"]) == script.startswith("ofql")

    # interrupted at update ~40 by SIGTERM, then resumed
    cwd = tmp_path / "interrupted"
    run_dir, output = stop_with_sigterm(script, cwd, flags, after_update=40)
    partial = json.loads((run_dir / "summary.json").read_text())
    stopped_at = partial["interrupted_at_step"]
    assert 40 <= stopped_at < 120 and f"--resume {os.path.join('runs', run_dir.name)}" in output
    resumed = run(script, cwd, "--resume", os.path.join("runs", run_dir.name))  # the run's own --threads 1, --no-cuda
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = summary_of(cwd)
    assert summary["resumed_from_step"] == stopped_at and summary["total_steps"] == 120
    assert summary["threads"] == 1 and summary["args"]["threads"] == 1 and summary["args"]["cuda"] is False
    assert logged_losses(run_dir) == runs["first"]


@pytest.mark.parametrize("script", TORCH_SCRIPTS)
def test_closed_form_mish_matches_torch_mish(script):
    """The CPU Mish (one exp, closed-form backward) against torch's F.mish: values and gradients in float64 over a range
    that reaches the clamp, and torch's gradcheck of the custom backward."""
    mish = module(script).Mish()
    x = torch.linspace(-40, 40, 4001, dtype=torch.float64, requires_grad=True)
    reference = torch.nn.functional.mish(x)
    (grad,) = torch.autograd.grad(mish(x).sum(), x)
    (reference_grad,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(mish(x), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(mish, (torch.randn(6, 5, dtype=torch.float64, requires_grad=True) * 5,))


def assert_trains_like_eager(script: str, tmp_path, flags: tuple[str, ...], name: str, flag: str):
    """Runs the script in tmp_path/eager and, with `flag`, in tmp_path/{name}: the same losses up to float rounding."""
    losses = {}
    for folder, extra in (("eager", ()), (name, (flag,))):
        (tmp_path / folder).mkdir()
        result = run(script, tmp_path / folder, *flags, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        losses[folder] = logged_losses(next((tmp_path / folder / "runs").iterdir()))
    for loss, series in losses["eager"].items():
        np.testing.assert_allclose(
            list(losses[name][loss].values()), list(series.values()), rtol=1e-3, atol=1e-4, err_msg=loss
        )


@pytest.mark.parametrize("script", TORCH_SCRIPTS)
def test_compile_trains_like_eager(script, minari_path, tmp_path):
    """--compile (torch.compile of the update and of the policy call) on CPU: the same losses up to float rounding,
    compilation timed apart from training."""
    flags = ("--env-id", HOPPER_DATASET_ID, "--total-steps", "20", "--log-freq", "1", *QUICK)
    assert_trains_like_eager(script, tmp_path, flags, "compiled", "--compile")
    summary = summary_of(tmp_path / "compiled")
    assert (
        summary["compile_seconds"] > 0
        and summary["decision_hz"] > 0
        and summary_of(tmp_path / "eager")["compile_seconds"] == 0
    )


@pytest.mark.parametrize("script", TORCH_SCRIPTS)
def test_cudagraphs_without_a_gpu_fails_with_one_readable_message(script, tmp_path):
    result = run(script, tmp_path, "--env-id", HOPPER_DATASET_ID, "--cudagraphs", "--no-cuda", timeout=60)
    assert (
        result.returncode != 0 and "--cudagraphs needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; the CPU path is tested above")
@pytest.mark.parametrize("script", TORCH_SCRIPTS)
def test_cudagraphs_train_like_eager_on_a_gpu(script, minari_path, tmp_path):
    """--cudagraphs (the update and the policy call captured, then replayed) on a GPU: the losses of an eager GPU run
    up to float rounding, past the warm-up and capture (update 4), and a decision frequency measured by replays."""
    flags = ("--env-id", HOPPER_DATASET_ID, "--total-steps", "20", "--log-freq", "1", *QUICK[1:], "--cuda")
    assert_trains_like_eager(script, tmp_path, flags, "graphs", "--cudagraphs")
    assert summary_of(tmp_path / "graphs")["decision_hz"] > 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_restores_the_ema_copy_of_the_actor(script, minari_path, tmp_path):
    """The EMA copy of the actor (dql.py's and fql.py's target actor; the OFQL scripts' for --eval-ema) is
    checkpointed with the other networks: a run stopped by SIGTERM after the EMA updates began, then resumed, ends with
    the same networks, the copy included, as an uninterrupted one."""
    flags = "--total-steps 60 --batch-size 64 --log-freq 1 --ema-start 10 --ema-every 3 --save-model"
    flags = ("--env-id", HOPPER_DATASET_ID, *flags.split(), *QUICK, *(("--eval-ema", "True") * ("ofql" in script)))
    (tmp_path / "whole").mkdir()
    assert run(script, tmp_path / "whole", *flags).returncode == 0
    run_dir, _ = stop_with_sigterm(script, tmp_path / "interrupted", flags, after_update=25)
    (checkpoint_path,) = run_dir.glob("checkpoint.*")
    checkpoint = load_model(checkpoint_path)
    assert {"actor_target", "actor_optimizer", "critic_optimizer"} <= set(checkpoint)
    assert 25 <= checkpoint["progress"]["step"] < 60
    assert run(script, tmp_path / "interrupted", "--resume", str(run_dir)).returncode == 0
    assert summary_of(tmp_path / "interrupted")["resumed_from_step"] == checkpoint["progress"]["step"]
    (model,) = (tmp_path / "whole" / "runs").glob("*/model.*")
    expected, got = load_model(model), load_model(run_dir / model.name)
    assert not np.array_equal(arrays(got["actor_target"])[-1], arrays(checkpoint["actor_target"])[-1])  # EMA went on
    for name in ("actor", "actor_target", "critic", "critic_target"):
        pairs = zip(arrays(expected[name]), arrays(got[name]), strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs), name


def wandb_offline_runs(wandb_dir) -> dict[str, list[bytes]]:
    """The offline runs under wandb_dir/wandb: run id -> the raw records (.wandb files) of each of its parts."""
    runs = {}
    for folder in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        (records,) = folder.glob("run-*.wandb")
        runs.setdefault(folder.name.rsplit("-", 1)[1], []).append(records.read_bytes())
    return runs


@pytest.mark.parametrize("script", SCRIPTS)
def test_track_logs_an_offline_wandb_run_and_a_resumed_run_continues_it(script, minari_path, tmp_path):
    """--track with WANDB_MODE=offline: the run holds the config and the tensorboard metrics synced into it; stopped
    by SIGTERM and resumed, it keeps its own flags unless the command line names them, and continues the same wandb
    run (same id)."""
    env = os.environ | {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true")  # for stop_with_sigterm
    try:
        flags = ("--env-id", HOPPER_DATASET_ID, "--total-steps", "400", "--log-freq", "5", "--track", *QUICK)
        run_dir, _ = stop_with_sigterm(script, tmp_path / "cwd", flags, after_update=20)
    finally:
        for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT"):
            os.environ.pop(key)
    (run_id, parts), *others = wandb_offline_runs(tmp_path).items()
    assert not others and len(parts) == 1
    assert b"losses/critic_loss" in parts[0] and b"charts/updates_per_second" in parts[0]  # synced from tensorboard
    assert HOPPER_DATASET_ID.encode() in parts[0] and b"num_candidates" in parts[0]  # the config
    resumed = run(
        script, tmp_path / "cwd", "--resume", str(run_dir), "--total-steps", "30", "--eval-episodes", "3", env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the run's own flags (--threads 1, --no-cuda, --track, --log-freq 5), except those the command line names
    saved = summary_of(tmp_path / "cwd")["args"]
    assert (saved["threads"], saved["cuda"], saved["track"], saved["log_freq"]) == (1, False, True, 5)
    assert (saved["total_steps"], saved["eval_episodes"], saved["resume"]) == (30, 3, str(run_dir))
    runs = wandb_offline_runs(tmp_path)
    assert list(runs) == [run_id] and len(runs[run_id]) == 2
    assert b"charts/normalized_score" in runs[run_id][1]  # the final evaluation, logged to the same run


@pytest.mark.parametrize("script", SCRIPTS)
def test_d4rl_files_evaluate_on_d4rls_models(script, monkeypatch, tmp_path):
    """D4RL's -v2 data came from gym's v3 envs. Of Gymnasium's envs, v4 has their models (and rewards); v5 changed
    Walker2d's right-foot friction from 0.9 to 1.9 and, for Hopper and Walker2d, the reward of the step that falls."""
    import mujoco

    monkeypatch.chdir(tmp_path)  # mujoco writes its warnings (HalfCheetah's old settotalmass) to MUJOCO_LOG.TXT here

    def model(env_id: str):
        return gym.make(env_id).unwrapped.model

    def differences(a, b) -> set[str]:
        names = [name for name in dir(a) if not name.startswith("_") and isinstance(getattr(a, name, None), np.ndarray)]
        return {name for name in names if not np.array_equal(getattr(a, name), getattr(b, name))}

    envs = module(script).D4RL_FILE_ENVS
    assert set(envs) == {"hopper", "halfcheetah", "walker2d"}
    for domain, env_id in envs.items():
        chosen, v5 = model(env_id), model(env_id.replace("-v4", "-v5"))
        assert differences(chosen, v5) == ({"geom_friction"} if domain == "walker2d" else set()), domain
    walker = model(envs["walker2d"])
    friction = {
        mujoco.mj_id2name(walker, mujoco.mjtObj.mjOBJ_GEOM, i): walker.geom_friction[i, 0] for i in range(walker.ngeom)
    }
    assert (friction["foot_geom"], friction["foot_left_geom"]) == (0.9, 1.9)  # D4RL's walker2d.xml
    # the step on which the hopper falls still pays the healthy reward, as in gym's Hopper-v3
    env = gym.make(envs["hopper"])
    env.reset(seed=0)
    terminated = False
    while not terminated:
        _, reward, terminated, _, info = env.step(np.ones(3, dtype=np.float32))
    assert reward == pytest.approx(info["x_velocity"] - 1e-3 * 3 + 1.0)


@pytest.mark.parametrize("script", TORCH_SCRIPTS)
def test_cuda_graphed_keeps_one_graph_per_input_shapes_and_host_values(script, monkeypatch):
    """--cudagraphs wraps the update and the policy in tensordict's CudaGraphModule, one per input shapes and coin
    (a graph replays one shape and one branch). Without CUDA, CudaGraphModule runs the function as it is."""
    import tensordict.nn

    made, real = [], tensordict.nn.CudaGraphModule

    def counting(fn, warmup):
        made.append(warmup)
        return real(fn, warmup=warmup)

    monkeypatch.setattr(tensordict.nn, "CudaGraphModule", counting)
    graphed = module(script).cuda_graphed(lambda x, swap: {"y": x * 2 if swap else x + 1})
    x, other = torch.ones(2, 3), torch.ones(5, 3)
    outputs = [graphed(x, True), graphed(x, True), graphed(x, False), graphed(other, True)]
    assert len(made) == 3 and made[0] >= 2
    assert [o["y"].tolist() for o in outputs] == [(x * 2).tolist()] * 2 + [(x + 1).tolist(), (other * 2).tolist()]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_failed_download_prints_one_line(script, tmp_path):
    """Without network, Minari's download retries (huggingface_hub logs each retry): the user sees one error line."""
    env = {k: v for k, v in os.environ.items() if k not in ("MINARI_DATASETS_PATH", "HF_HUB_OFFLINE")}
    env |= {"HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: refused at once
    result = run(script, tmp_path, "--env-id", "hopper-expert-v2", "--no-cuda", env=env, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: mujoco/hopper/expert-v0 is not local") and "MINARI_DATASETS_PATH unset" in line
    assert not (tmp_path / "runs").exists()


def cut_first_array(tree):
    """tree with its first array one row shorter (depth first): a model of other shapes, as another dataset's."""
    for name, value in tree.items():
        if isinstance(value, dict):
            return tree | {name: cut_first_array(value)}
        return tree | {name: value[:-1]}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_model_of_other_shapes_fails_with_one_line(script, minari_path, tmp_path):
    """--eval-only with a model whose arrays do not fit this dataset's networks: one line, exit code 1, no traceback,
    no run folder."""
    flags = ("--env-id", HOPPER_DATASET_ID, *QUICK)
    assert run(script, tmp_path, *flags, "--total-steps", "2", "--log-freq", "1", "--save-model").returncode == 0
    (model,) = (tmp_path / "runs").glob("*/model.*")
    other = tmp_path / f"other{model.suffix}"
    saved = load_model(model)
    save_model(saved | {"critic": cut_first_array(saved["critic"])}, other)
    result = run(script, tmp_path, *flags, "--eval-only", "--checkpoint", str(other), timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: the saved networks do not fit this script")
    assert len(list((tmp_path / "runs").iterdir())) == 1


@pytest.mark.parametrize("script", TORCH_SCRIPTS)
def test_q_grad_ratio_is_the_norm_of_q_losss_gradient_against_bc_losss(script):
    """losses/q_grad_ratio: the actor's two losses (actor_losses, as the update takes them) on the diagnostics' own
    batch, the norm of each one's gradient over the actor's weights, q_loss's over bc_loss's; the weights' .grad and
    the training's RNG untouched."""
    m = module(script)
    args, _ = m.task_defaults(m.Args(eta=1.0, batch_size=64))
    torch.manual_seed(0)
    actor, critic = m.Actor(5, 2, -np.ones(2), np.ones(2)), m.Critic(5, 2)
    data = {"obs": torch.randn(200, 5), "actions": torch.rand(200, 2) * 2 - 1}
    rng = torch.get_rng_state()
    ratio = m.diagnostics({"actor": actor, "critic": critic}, data, args, step=7)["q_grad_ratio"]
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in actor.parameters())

    torch.manual_seed(args.seed + 7)  # the diagnostics' batch, then what they draw before the two losses
    idx = torch.randint(200, (64,))
    obs, actions = data["obs"][idx], data["actions"][idx]
    with torch.no_grad():
        m.sample_actions(actor, obs, *([args.flow_steps] if script == "fql" else []))
        if script == "ofql":
            torch.randn_like(actions)  # the acting pair's noise
    norms = []
    for loss in m.actor_losses(actor, critic, args, obs, actions, swap=False):
        actor.zero_grad()
        loss.backward(inputs=list(actor.parameters()))
        norms.append(torch.sqrt(sum((p.grad**2).sum() for p in actor.parameters())))
    torch.testing.assert_close(ratio, norms[1] / norms[0])
    assert 0 < ratio < 100


@pytest.mark.parametrize("script", ["ofql", "ofql_jax"])
def test_eval_ema_acts_with_the_ema_copy_and_leaves_training_alone(script, minari_path, tmp_path):
    """--eval-ema (on by default): training as without it (the same actor and critic), the EMA copy saved with the
    model; --eval-only acts as the model's run did: with the copy, as a model whose actor is that copy (the same
    episode), not as the trained actor (--eval-ema False); a model without a copy acts with its trained weights, and
    is refused in one line with --eval-ema True."""
    flags = ("--env-id", HOPPER_DATASET_ID, *QUICK, "--total-steps", "20", "--log-freq", "10", "--save-model")
    flags += ("--ema-start", "5", "--ema-every", "2")
    for name, more in (("plain", ("--eval-ema", "False")), ("ema", ())):
        (tmp_path / name).mkdir()
        assert run(script, tmp_path / name, *flags, *more).returncode == 0
    (plain,), (ema,) = ((tmp_path / name / "runs").glob("*/model.*") for name in ("plain", "ema"))
    plain_model, ema_model = load_model(plain), load_model(ema)
    assert "actor_target" not in plain_model and ema_model["args"]["eval_ema"]
    for name in ("actor", "critic"):
        pairs = zip(arrays(plain_model[name]), arrays(ema_model[name]), strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs), name
    copy_as_actor = tmp_path / f"copy_as_actor{ema.suffix}"
    save_model({name: value for name, value in ema_model.items() if name != "actor_target"}
               | {"actor": ema_model["actor_target"]}, copy_as_actor)  # fmt: skip

    returns = {}
    off = ("--eval-ema", "False")
    cases = (("with_copy", ema, ()), ("copy", copy_as_actor, off), ("trained", ema, off), ("as_run", plain, ()))
    for name, model, more in cases:
        (tmp_path / name).mkdir()
        result = run(script, tmp_path / name, *QUICK, "--env-id", HOPPER_DATASET_ID, "--eval-only", "--checkpoint",
                     str(model), *more)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        returns[name] = summary_of(tmp_path / name)["return_mean"]
    assert returns["with_copy"] == returns["copy"] != returns["trained"], returns
    assert not summary_of(tmp_path / "as_run")["args"]["eval_ema"]  # as its run did

    (tmp_path / "refused").mkdir()
    result = run(script, tmp_path / "refused", *QUICK, "--env-id", HOPPER_DATASET_ID, "--eval-only", "--checkpoint",
                 str(plain), "--eval-ema", "True")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --eval-ema: {plain} holds no EMA copy")
    assert not (tmp_path / "refused" / "runs").exists()
