"""Every script: the datasets of the paper's Table 1, bad input and bad data, a stop on a non-finite loss, SIGTERM
checkpoints with --resume, and reproducible CPU runs. Parametrized over the scripts, which share no code (the torch
scripts share their PLUMBING section, byte for byte)."""

import importlib
import json
import os
import subprocess
import sys
import time

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest
import torch
from conftest import (
    HOPPER_DATASET_ID,
    ROOT,
    hopper_episodes,
    no_run_folder,
    run_script,
    stop_with_sigterm,
    write_d4rl_file,
)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

SCRIPTS = ["ofql", "dql", "fql", "ofql_jax"]
TORCH_SCRIPTS = ["ofql", "dql", "fql"]
PLUMBING = ["ofql", "ofql_jax"]  # runs that test PLUMBING alone: dql.py and fql.py hold ofql.py's (tested below)
LOSSES = ("critic_loss", "bc_loss", "q_loss", "actor_loss", "q_mean", "q_gap", "action_mse", "q_grad_ratio")  # all log
QUICK = ("--no-cuda", "--eval-freq", "100000", "--final-eval-episodes", "1")


def module(script: str):
    if script == "ofql_jax":
        pytest.importorskip("jax")  # a guard only: CI installs the `jax` extra
    return importlib.import_module(script)


def cpu(script: str):
    return torch.device("cpu") if script in TORCH_SCRIPTS else module(script).jax.devices("cpu")[0]


def run(script: str, cwd, *flags: str, env: dict | None = None, timeout: int = 600):
    return run_script(script, cwd, *flags, env=env, timeout=timeout)


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


def ema_name(saved: dict) -> str:
    """The actor's EMA copy: the OFQL scripts' `actor_ema` (--eval-ema), dql.py's and fql.py's target actor."""
    return "actor_ema" if "actor_ema" in saved else "actor_target"


def plumbing(script: str) -> tuple[str, str]:
    """The script's start-up signal handler (its first lines of code) and its PLUMBING section (from its `# PLUMBING`
    line to the main block)."""
    text = (ROOT / f"{script}.py").read_text()
    start_up = text[text.index("\nimport os\n") : text.index("signal.signal(signal.SIGTERM, exit_in_start_up)\n")]
    return start_up, text[text.index("\n# PLUMBING") : text.index('\nif __name__ == "__main__":\n    stop = stop_')]


@pytest.mark.parametrize("script", ["dql", "fql"])
def test_the_torch_scripts_share_their_plumbing_byte_for_byte(script):
    """dql.py and fql.py hold ofql.py's start-up handler and PLUMBING section as they are: names, data, checks,
    checkpoints, signals and logs behave alike in the three, so the tests of those alone run on ofql.py."""
    assert plumbing(script) == plumbing("ofql")


# Datasets ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_d4rl_file_rows_become_transitions(script, tmp_path):
    """No next_observations: the next row is the next observation, and rows with a time-out (and the last) are dropped."""
    episodes = hopper_episodes(5, seed=3)
    transitions = module(script).d4rl_transitions(str(write_d4rl_file(tmp_path / "a.hdf5", episodes)))
    expected = [
        (e.observations[i], e.observations[i + 1], e.terminations[i]) for e in episodes for i in range(len(e.rewards))
    ]
    timeouts = np.concatenate([e.truncations for e in episodes])
    expected = [row for row, timeout in zip(expected, timeouts, strict=True) if not timeout]
    if not episodes[-1].truncations[-1]:
        expected = expected[:-1]  # the file's last row has no successor
    assert len(transitions["obs"]) == len(expected) and transitions["actions"].shape == (len(expected), 3)
    np.testing.assert_array_equal(transitions["obs"], [obs for obs, _, _ in expected])
    moves_on = ~np.array([terminal for _, _, terminal in expected])  # after a termination the next row starts anew
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
def test_load_task_gives_aligned_shaped_transitions_and_each_tasks_env_and_scores(
    script, minari_path, antmaze_dataset, pen_dataset
):
    """load_task: the transitions on the device, rewards and terminals (N, 1), next_obs the next step's obs within an
    episode, terminal = termination (not truncation), the task's reward shaping; AntMaze's dict observations flattened
    and an eval env that ends at the goal (the score a success rate); pen's rewards normalized, its dataset's reference
    scores."""
    m, device = module(script), cpu(script)

    def load(dataset_id: str, **flags):
        args, _ = m.task_defaults(m.Args(env_id=dataset_id, batch_size=16, **flags))
        data, make_env, action_space, ref_scores = m.load_task(args, dataset_id, device)
        return args, {key: np.asarray(value) for key, value in data.items()}, make_env, action_space, ref_scores

    _, data, _, action_space, ref_scores = load(HOPPER_DATASET_ID)
    dataset = minari.load_dataset(HOPPER_DATASET_ID)
    episodes, n = list(dataset.iterate_episodes()), dataset.total_steps
    assert data["obs"].shape == data["next_obs"].shape == (n, 11) and data["actions"].shape == (n, 3)
    assert data["rewards"].shape == data["terminals"].shape == (n, 1) and data["obs"].dtype == np.float32
    assert action_space.shape == (3,) and ref_scores == m.D4RL_REF_SCORES["hopper"]
    first = len(episodes[0].rewards)
    np.testing.assert_array_equal(data["next_obs"][: first - 1], data["obs"][1:first])
    np.testing.assert_allclose(data["next_obs"][first - 1], episodes[0].observations[-1], rtol=1e-6)
    assert data["terminals"].sum() == sum(int(e.terminations.sum()) for e in episodes)
    truncated = [e for e in episodes if e.truncations[-1]]
    assert truncated and not any(e.terminations[-1] for e in truncated)
    _, shaped, _, _, _ = load(HOPPER_DATASET_ID, reward_tune="cql")
    np.testing.assert_allclose(shaped["rewards"], (data["rewards"] - 0.5) * 4, atol=1e-5)

    args, data, make_env, action_space, ref_scores = load(antmaze_dataset)
    assert (args.reward_tune, args.lr) == ("cql", 3e-4)
    assert data["obs"].shape[1] == 2 + 2 + 27  # achieved_goal, desired_goal, observation
    assert action_space.shape == (8,) and ref_scores == (0.0, 1.0)  # normalized score = success rate
    assert make_env().unwrapped.continuing_task is False  # the episode ends at the goal, as in D4RL
    first_obs = m.flatten_obs(next(minari.load_dataset(antmaze_dataset).iterate_episodes()).observations)[0]
    np.testing.assert_array_equal(data["obs"][0], first_obs.astype(np.float32))

    args, data, _, _, ref_scores = load(pen_dataset)
    assert (args.reward_tune, args.lr) == ("normalize", 3e-5) and ref_scores == (-10.0, 3000.0)
    assert abs(data["rewards"].mean()) < 1e-4 and abs(data["rewards"].std() - 1) < 1e-3


def test_antmaze_runs_end_to_end(antmaze_dataset, tmp_path):
    flags = ("--env-id", antmaze_dataset, "--total-steps", "20", "--log-freq", "10", "--batch-size", "64", *QUICK)
    result = run("ofql", tmp_path, *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert summary_of(tmp_path)["normalized_score"] in (0.0, 100.0)  # one episode: success or not


@pytest.mark.parametrize("script", PLUMBING)
def test_a_d4rl_file_runs_end_to_end_in_a_run_folder_of_its_own(script, d4rl_file, minari_path, tmp_path):
    """A D4RL file trains and evaluates on its Gymnasium env, with its task's row. Its run folder is its own: as if a
    shell loop's `&` jobs had started the same run a moment before, it takes the name's `-2`; an --exp-name with a slash
    or spaces gives `_` in the folder's name."""
    now = int(time.time())
    taken = [tmp_path / "runs" / f"hopper-medium-replay-v2__my_runs_a_b__1__{t}" for t in range(now, now + 60)]
    for folder in taken:
        folder.mkdir(parents=True)
    flags = ("--env-id", "hopper-medium-replay-v2", "--dataset-path", str(d4rl_file), "--total-steps", "20")
    result = run(script, tmp_path, *flags, "--log-freq", "10", "--exp-name", "my runs/a b", *QUICK)
    assert result.returncode == 0, result.stderr[-2000:]
    (path,) = (tmp_path / "runs").glob("*/summary.json")
    summary = json.loads(path.read_text())
    assert summary["dataset_id"] == str(d4rl_file) and summary["args"]["grad_norm"] == 4.0  # hopper-medium-replay's row
    assert summary["exp_name"] == "my runs/a b" and path.parent.name.endswith("-2")
    assert path.parent.name.removesuffix("-2") in {f.name for f in taken}
    assert not any(any(folder.iterdir()) for folder in taken)


def test_d4rl_files_evaluate_on_d4rls_models(monkeypatch, tmp_path):
    """D4RL's -v2 data came from gym's v3 envs. Of Gymnasium's envs, v4 has their models (and rewards); v5 changed
    Walker2d's right-foot friction from 0.9 to 1.9 and, for Hopper and Walker2d, the reward of the step that falls.
    Every script takes the same envs."""
    import mujoco

    monkeypatch.chdir(tmp_path)  # mujoco writes its warnings (HalfCheetah's old settotalmass) to MUJOCO_LOG.TXT here

    def model(env_id: str):
        return gym.make(env_id).unwrapped.model

    def differences(a, b) -> set[str]:
        names = [name for name in dir(a) if not name.startswith("_") and isinstance(getattr(a, name, None), np.ndarray)]
        return {name for name in names if not np.array_equal(getattr(a, name), getattr(b, name))}

    envs = module("ofql").D4RL_FILE_ENVS
    assert set(envs) == {"hopper", "halfcheetah", "walker2d"}
    for script in SCRIPTS[1:]:
        if script != "ofql_jax" or importlib.util.find_spec("jax"):
            assert module(script).D4RL_FILE_ENVS == envs, script
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


# Bad input and bad data: exit code 1, one line that names the fix, no traceback, nothing left behind ---------------


def parse_error(script: str, monkeypatch, *flags: str) -> str:
    """The message with which the script's argument parsing stops, in this process (no dataset is read)."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--no-cuda", *flags])
    with pytest.raises(SystemExit) as stop:
        module(script).parse_args()
    return str(stop.value.code)


def load_error(script: str, monkeypatch, *flags: str) -> str:
    """The flags parse; the line with which the script stops on loading the data (as its main block prints it)."""
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--no-cuda", *flags])
    args, _, dataset_id, _ = module(script).parse_args()
    with pytest.raises(ValueError) as error:
        module(script).load_task(args, dataset_id, cpu(script))
    return f"error: {error.value}"


def bad_data_files(tmp_path, d4rl_file) -> dict:
    """D4RL-layout files that cannot be trained on: their paths."""
    corrupt = tmp_path / "corrupt.hdf5"
    corrupt.write_bytes(d4rl_file.read_bytes()[:2000])
    empty = tmp_path / "empty.hdf5"
    with h5py.File(empty, "w") as f:
        for key, shape in dict(
            observations=(0, 11), actions=(0, 3), rewards=(0,), terminals=(0,), timeouts=(0,)
        ).items():
            f[key] = np.zeros(shape, dtype=bool if len(shape) == 1 and key != "rewards" else np.float32)
    nan_reward = write_d4rl_file(tmp_path / "nan_reward.hdf5", hopper_episodes(3, seed=0))
    with h5py.File(nan_reward, "r+") as f:
        f["rewards"][5] = np.nan
    no_timeouts = write_d4rl_file(tmp_path / "no_timeouts.hdf5", hopper_episodes(2, seed=0), drop="timeouts")
    return dict(corrupt=corrupt, empty=empty, nan_reward=nan_reward, no_timeouts=no_timeouts)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_and_bad_data_fail_with_one_line(script, d4rl_file, monkeypatch, tmp_path):
    """Wrong names, files and data: one line naming the dataset (or the flag) and the fix; in a run, exit code 1, that
    line alone on stderr, no traceback, no run folder."""
    monkeypatch.chdir(tmp_path)
    files = bad_data_files(tmp_path, d4rl_file)
    replay = ("--env-id", "hopper-medium-replay-v2", "--dataset-path")
    url = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium_replay-v2.hdf5"
    at_parse = {
        ("--env-id", "hoper-medium-v2"): "error: unknown --env-id hoper-medium-v2; try hopper-medium",
        ("--env-id", "hopper-medium-replay-v2"): f"try --dataset-path hopper_medium_replay-v2.hdf5 from {url}",
        ("--resume", str(tmp_path / "runs" / "nothing")): f"error: --resume {tmp_path / 'runs' / 'nothing'}",
        ("--eval-only", "missing.pt"): "error: --eval-only missing.pt: not a file of",
    }
    for flags, message in at_parse.items():
        error = parse_error(script, monkeypatch, *flags)
        assert message in error and "\n" not in error, (flags, error)
    at_load = {
        (*replay, "missing.hdf5"): "missing.hdf5: not a readable hdf5 file",
        (*replay, str(files["corrupt"])): f"{files['corrupt']}: not a readable hdf5 file",
        (*replay, str(files["no_timeouts"])): f"{files['no_timeouts']}: not D4RL's columns",
        ("--env-id", "walker2d-medium-replay-v2", "--dataset-path", str(d4rl_file)): (
            f"{d4rl_file}: observations and actions of size (11, 3), not the env's (17, 6)"
        ),
        (*replay, str(files["empty"])): f"error: {files['empty']}: no transitions",
        (*replay, str(files["nan_reward"]), "--batch-size", "16"): (
            f"error: {files['nan_reward']}: values that are not finite in rewards"
        ),
        (*replay, str(d4rl_file), "--batch-size", "10000"): (
            f"error: {d4rl_file}: fewer transitions than --batch-size 10000"
        ),
    }
    for flags, message in at_load.items():
        error = load_error(script, monkeypatch, *flags)
        assert message in error and "\n" not in error, (flags, error)
    # in a run: the line alone, at once (a bad flag), or once the data is read (a bad dataset)
    cases = {("--threads", "100000"): "error: --threads 100000: must be in [0, os.cpu_count()]"}
    cases[(*replay, str(files["nan_reward"]), "--batch-size", "16")] = at_load[(*replay, str(files["nan_reward"]), "--batch-size", "16")]  # fmt: skip
    for flags, message in cases.items():
        result = run(script, tmp_path, "--no-cuda", *flags, timeout=300)
        assert result.returncode == 1 and "Traceback" not in result.stderr, (flags, result.stderr[-1500:])
        assert result.stderr.strip().splitlines() == [message], (flags, result.stderr[-1500:])
        assert no_run_folder(tmp_path), flags


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
    "log_freq": "0",
    "lr": "0",
    "critic_lr": "nan",
    "eta": "-0.1",
    "grad_norm": "-1",
    "gamma": "1.5",
    "tau": "0",
    "flow_ratio": "1.5",
    "acting_ratio": "-0.5",
    "diffusion_steps": "0",
    "flow_steps": "0",
    "eval_steps": "0",
    "ema_decay": "1.5",
    "ema_start": "-1",
    "ema_every": "0",
    "updates_per_call": "0",
    "num_seeds": "0",
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_out_of_range_fails_at_once(script, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    m = module(script)
    ranges = m.RANGES
    assert set(ranges) <= set(OUT_OF_RANGE), "a flag with a range but no case here"
    cases = [(flag, OUT_OF_RANGE[flag]) for flag in ranges if flag in m.Args.__dataclass_fields__]
    cases.append(("threads", "100000"))  # above os.cpu_count()
    if "acting_ratio" in m.Args.__dataclass_fields__:
        cases.append(("acting_ratio", "0.6"))  # above 1 - flow_ratio (0.5): the pairs would overlap
    for flag, value in cases:
        message = parse_error(script, monkeypatch, f"--{flag.replace('_', '-')}", value)
        assert message.startswith(f"error: --{flag.replace('_', '-')} ") and message.endswith(
            f": must be in {ranges[flag]}"
        ), message
        assert "\n" not in message
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--no-cuda"])
    assert m.parse_args()[0].threads == 1  # one torch CPU thread unless asked: fastest for these networks


@pytest.mark.parametrize("script", SCRIPTS)
def test_combinations_that_cannot_work_fail_at_once(script, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cases = {("--eval-only", "model.pt", "--resume", "runs/x"): "--resume RUN trains on: one of them"}
    # batches no machine holds (the kernel would kill the run), a run folder's name no file system takes
    cases[("--num-candidates", "100000000")] = "batches of about 38146 GiB, more than the "
    cases[("--batch-size", "10000000")] = "batches of about 1220 GiB, more than the "
    cases[("--exp-name", "x" * 250)] = "bytes, over 255: a shorter --exp-name"
    for flag in ("--resume", "--eval-only", "--dataset-path", "--exp-name"):  # an unset shell variable
        cases[(flag, "")] = f"error: {flag} '': empty; a value, or no flag"
    if script in TORCH_SCRIPTS:
        cases[("--cudagraphs",)] = "--cudagraphs needs a CUDA GPU; on CPU, use --compile"
    if script == "dql":  # ddim takes 1 to T of the T steps (ddpm all of them: tested in test_dql.py)
        cases[("--eval-sampler", "ddim", "--eval-steps", "6")] = "--eval-steps 6"
    for flags, expected in cases.items():
        message = parse_error(script, monkeypatch, *flags)
        assert message.startswith("error: ") and expected in message and "\n" not in message, (flags, message)


@pytest.mark.parametrize("script", PLUMBING)
def test_a_file_that_cannot_be_written_is_one_line_and_the_last_one_stands(script, monkeypatch, tmp_path):
    m = module(script)
    path = tmp_path / "summary.json"
    m.save_atomically(str(path), {"step": 1})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(m.json, "dump", full_disk)
    with pytest.raises(SystemExit) as stop:
        m.save_atomically(str(path), {"step": 2})
    message = str(stop.value.code)
    assert (
        message.startswith(f"error: {path} not written ([Errno 28] No space left on device; ") and "\n" not in message
    )
    assert message.endswith(" MiB free); what was saved before stands"), message
    assert json.loads(path.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["summary.json"]  # no .tmp left
    with pytest.raises(
        SystemExit, match=r"removed/checkpoint\S* not written \(.*(exist|No such file)"
    ):  # its folder removed
        m.save_atomically(str(tmp_path / "removed" / m.CHECKPOINT), {"step": 2})


# Training: a non-finite loss, reproducible runs, stop and resume ---------------------------------------------------


@pytest.mark.parametrize("script", PLUMBING)
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(script, minari_path, tmp_path):
    """A finished run goes on with --eta 1e39 (inf in float32: the actor's loss of the next update is not finite): one
    line naming the update (and in a run of several seeds the first seed's) and the last finite losses, the checkpoint
    of update 10 kept, no summary of its own."""
    flags = ("--env-id", HOPPER_DATASET_ID, "--total-steps", "10", "--log-freq", "5", *QUICK)
    seeds = ("--num-seeds", "2", "--seed", "7") if script == "ofql_jax" else ()
    assert run(script, tmp_path, *flags, *seeds).returncode == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    more = ("--resume", str(run_dir), "--total-steps", "20", "--checkpoint-freq", "1", "--eta", "1e39")
    result = run(script, tmp_path, *more)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    which = " of seed 7" if seeds else ""
    assert line.startswith(f"error: non-finite loss at update 11{which} (") and "actor_loss -inf" in line, line
    assert "; at update 10: " in line and "--grad-norm" in line, line
    (checkpoint,) = run_dir.glob("checkpoint.*")
    assert module(script).load_saved(str(checkpoint), "--resume")["progress"]["step"] == 10
    assert not (run_dir / "summary.json").exists()  # the finished run's kept as summary_10.json
    assert json.loads((run_dir / "summary_10.json").read_text())["total_steps"] == 10
    if script in TORCH_SCRIPTS:
        assert all(value.isfinite().all() for value in torch.load(checkpoint)["actor"].values())


@pytest.mark.parametrize("script", SCRIPTS)
def test_same_seed_same_losses_and_resume_continues_exactly(script, minari_path, tmp_path):
    """A run stopped by SIGTERM after the actor's EMA began and resumed, logging (and computing the diagnostics) half
    as often, logs the losses of the uninterrupted run with the same seed at the updates both log, in the same run
    folder (the logging does not touch the training's RNG, the checkpoint restores it), and ends with the same
    networks, the EMA copy included (checkpointed with the others)."""
    flags = ("--env-id", HOPPER_DATASET_ID, "--total-steps", "60", "--batch-size", "64", *QUICK)
    flags += ("--ema-start", "10", "--ema-every", "3", "--save-model")
    assert run(script, tmp_path / "whole", *flags, "--log-freq", "1").returncode == 0
    whole = logged_losses(next((tmp_path / "whole" / "runs").iterdir()))
    assert all(len(series) == 60 for series in whole.values())
    assert ("acting_bc_loss" in whole) == script.startswith("ofql")

    # interrupted at update ~26 by SIGTERM, then resumed
    cwd, sparser = tmp_path / "interrupted", ("--log-freq", "2") + ("--updates-per-call", "1") * (script == "ofql_jax")
    run_dir, output = stop_with_sigterm(script, cwd, (*flags, *sparser), after_update=26)
    partial = json.loads((run_dir / "summary.json").read_text())
    stopped_at = partial["interrupted_at_step"]
    assert 26 <= stopped_at < 60 and f"--resume {os.path.join('runs', run_dir.name)}" in output
    (checkpoint_path,) = run_dir.glob("checkpoint.*")
    checkpoint = load_model(checkpoint_path)
    ema = ema_name(checkpoint)
    assert {ema, "actor_optimizer", "critic_optimizer"} <= set(checkpoint)
    assert checkpoint["progress"]["step"] == stopped_at
    resumed = run(script, cwd, "--resume", os.path.join("runs", run_dir.name))  # the run's own flags
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = summary_of(cwd)
    assert summary["resumed_from_step"] == stopped_at and summary["total_steps"] == 60
    assert summary["threads"] == 1 and summary["args"]["threads"] == 1 and summary["args"]["cuda"] is False  # defaults
    expected = {
        name: {s: v for s, v in series.items() if s % 2 == 0 or s == stopped_at} for name, series in whole.items()
    }
    assert logged_losses(run_dir) == expected
    (model,) = (tmp_path / "whole" / "runs").glob("*/model.*")
    expected, got = load_model(model), load_model(run_dir / model.name)
    assert not np.array_equal(arrays(got[ema])[-1], arrays(checkpoint[ema])[-1])  # the EMA went on after the resume
    for name in ("actor", ema, "critic", "critic_target"):
        pairs = zip(arrays(expected[name]), arrays(got[name]), strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs), name


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
        result = run(script, tmp_path / folder, *flags, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        losses[folder] = logged_losses(next((tmp_path / folder / "runs").iterdir()))
    for loss, series in losses["eager"].items():
        np.testing.assert_allclose(
            list(losses[name][loss].values()), list(series.values()), rtol=1e-3, atol=1e-4, err_msg=loss
        )


@pytest.mark.parametrize("script", TORCH_SCRIPTS)
def test_compile_trains_like_eager(script, minari_path, tmp_path):
    """--compile (torch.compile of the update and of the policy call) on CPU: the same losses up to float rounding
    (the diagnostics, logged with them, are computed on the weights the compiled update left), compilation timed apart
    from training. One update: one of the update's two graphs (one per coin), the slowest part of the suite."""
    flags = ("--env-id", HOPPER_DATASET_ID, "--total-steps", "1", "--batch-size", "64", *QUICK)
    assert_trains_like_eager(script, tmp_path, flags, "compiled", "--compile")
    summary = summary_of(tmp_path / "compiled")
    assert summary["compile_seconds"] > 0 and summary["decision_hz"] > 0
    assert summary_of(tmp_path / "eager")["compile_seconds"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; the CPU path is tested above")
@pytest.mark.parametrize("script", TORCH_SCRIPTS)
def test_cudagraphs_train_like_eager_on_a_gpu(script, minari_path, tmp_path):
    """--cudagraphs (the update and the policy call captured, then replayed) on a GPU: the losses of an eager GPU run
    up to float rounding, past the warm-up and capture (update 4), and a decision frequency measured by replays."""
    flags = ("--env-id", HOPPER_DATASET_ID, "--total-steps", "20", "--log-freq", "1", *QUICK[1:], "--cuda")
    assert_trains_like_eager(script, tmp_path, flags, "graphs", "--cudagraphs")
    assert summary_of(tmp_path / "graphs")["decision_hz"] > 0


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


# wandb, downloads, saved models ---------------------------------------------------------------------------------


def wandb_offline_runs(wandb_dir) -> dict[str, list[bytes]]:
    """The offline runs under wandb_dir/wandb: run id -> the raw records (.wandb files) of each of its parts."""
    runs = {}
    for folder in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        (records,) = folder.glob("run-*.wandb")
        runs.setdefault(folder.name.rsplit("-", 1)[1], []).append(records.read_bytes())
    return runs


@pytest.mark.parametrize("script", PLUMBING)
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
    # the run's own flags (--no-cuda, --track, --log-freq 5), except those the command line names
    saved = summary_of(tmp_path / "cwd")["args"]
    assert (saved["cuda"], saved["track"], saved["log_freq"]) == (False, True, 5)
    assert (saved["total_steps"], saved["eval_episodes"], saved["resume"]) == (30, 3, str(run_dir))
    runs = wandb_offline_runs(tmp_path)
    assert list(runs) == [run_id] and len(runs[run_id]) == 2
    assert b"charts/normalized_score" in runs[run_id][1]  # the final evaluation, logged to the same run


def test_a_failed_download_prints_one_line(tmp_path):
    """Without network, Minari's download retries for about 25 s (huggingface_hub logs each retry): the user sees one
    error line. Both plumbings at once, as the wait is the library's backoff, not work."""
    env = {k: v for k, v in os.environ.items() if k not in ("MINARI_DATASETS_PATH", "HF_HUB_OFFLINE")}
    env |= {"HOME": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: refused at once
    processes = {}
    for script in PLUMBING:
        (tmp_path / script).mkdir()
        command = [sys.executable, str(ROOT / f"{script}.py"), "--env-id", "hopper-expert-v2", "--no-cuda"]
        processes[script] = subprocess.Popen(command, cwd=tmp_path / script, env=env, stderr=subprocess.PIPE, text=True)
    for script, process in processes.items():
        stderr = process.communicate(timeout=300)[1]
        assert process.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
        line = stderr.strip().splitlines()[-1]
        assert line.startswith("error: mujoco/hopper/expert-v0: not in MINARI_DATASETS_PATH and not downloaded"), line
        assert stderr.strip() == line, "huggingface_hub's retries on stderr"
        assert "`minari download mujoco/hopper/expert-v0`" in line
        assert no_run_folder(tmp_path / script)


def cut_first_array(tree):
    """tree with its first array one row shorter (depth first): a model of other shapes, as another dataset's."""
    for name, value in tree.items():
        if isinstance(value, dict):
            return tree | {name: cut_first_array(value)}
        return tree | {name: value[:-1]}


@pytest.mark.parametrize("script", TORCH_SCRIPTS)
def test_resume_restores_the_optimizer_but_takes_the_learning_rate_given(script):
    """--resume RUN --lr X: Adam's moments from the checkpoint, the learning rate X (ofql_jax.py builds its optimizer
    from the flags, so it takes X as well)."""
    net = torch.nn.Linear(2, 2)
    trained = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.ones(1, 2)).sum().backward()
    trained.step()
    saved = {"net": net.state_dict(), "opt": trained.state_dict(), "rng": torch.get_rng_state(), "cuda_rng": []}
    resumed = torch.optim.Adam(net.parameters(), lr=5e-4)
    module(script).restore(saved, {"net": net}, {"opt": resumed}, resume=True)
    assert resumed.param_groups[0]["lr"] == 5e-4
    moments = [state["exp_avg"] for state in resumed.state_dict()["state"].values()]
    assert len(moments) == 2 and all(m.abs().sum() > 0 for m in moments)


@pytest.mark.parametrize("script", PLUMBING)
def test_a_model_of_other_shapes_fails_with_one_line(script, minari_path, tmp_path):
    """--eval-only with a model whose arrays do not fit the dataset's networks (the model's own: its flags name the
    dataset): one line, exit code 1, no traceback, no run folder. A model evaluates on its dataset with its run's
    flags, those of the command line winning: each script's end-to-end test."""
    flags = ("--env-id", HOPPER_DATASET_ID, *QUICK, "--total-steps", "2", "--log-freq", "1", "--save-model")
    assert run(script, tmp_path, *flags).returncode == 0
    (model,) = (tmp_path / "runs").glob("*/model.*")
    other = tmp_path / f"other{model.suffix}"
    saved = load_model(model)
    save_model(saved | {"critic": cut_first_array(saved["critic"])}, other)
    result = run(script, tmp_path, "--eval-only", str(other), timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: the saved networks do not fit ("), line
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
    """--eval-ema (on by default): training as without it (the same actor and critic; --paper-variant with our acting
    ratio and eta trains without it), the EMA copy saved with the model; --eval-only acts as the model's run did: with
    the copy, as a model whose actor is that copy (the same episode), not as the trained actor (--eval-ema False); a
    model without a copy is refused in one line with --eval-ema True (ofql.py, in this process)."""
    flags = ("--env-id", HOPPER_DATASET_ID, *QUICK, "--total-steps", "20", "--log-freq", "10", "--save-model")
    flags += ("--ema-start", "5", "--ema-every", "2")
    for name, more in (("plain", ("--paper-variant", "--acting-ratio", "0.25", "--eta", "2.0")), ("ema", ())):
        assert run(script, tmp_path / name, *flags, *more).returncode == 0
    (plain,), (ema,) = ((tmp_path / name / "runs").glob("*/model.*") for name in ("plain", "ema"))
    plain_model, ema_model = load_model(plain), load_model(ema)
    assert "actor_ema" not in plain_model and ema_model["args"]["eval_ema"]
    assert [plain_model["args"][flag] for flag in ("paper_variant", "eval_ema", "acting_ratio", "eta")] == [True, False, 0.25, 2.0]  # fmt: skip
    for name in ("actor", "critic"):
        pairs = zip(arrays(plain_model[name]), arrays(ema_model[name]), strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs), name
    copy_as_actor = tmp_path / f"copy_as_actor{ema.suffix}"
    save_model({name: value for name, value in ema_model.items() if name != "actor_ema"}
               | {"actor": ema_model["actor_ema"]}, copy_as_actor)  # fmt: skip

    returns = {}
    off = ("--eval-ema", "False")
    for name, model, more in (("with_copy", ema, ()), ("copy", copy_as_actor, off), ("trained", ema, off)):
        result = run(script, tmp_path / name, *QUICK, "--eval-only", str(model), *more)
        assert result.returncode == 0, result.stderr[-2000:]
        returns[name] = summary_of(tmp_path / name)["return_mean"]
    assert returns["with_copy"] == returns["copy"] != returns["trained"], returns

    if script == "ofql":  # a model without a copy, with --eval-ema True: refused in one line
        actor = module(script).Actor(11, 3, -np.ones(3), np.ones(3))
        networks = {"actor": actor, "critic": module(script).Critic(11, 3), "actor_ema": actor}
        with pytest.raises(SystemExit, match=r"^error: the saved networks do not fit \(.*actor_ema"):
            module(script).restore(plain_model, networks, {}, resume=False)
