"""Tests of ofql_jax.py: the same tables as ofql.py, the JVP target, agreement with ofql.py's torch code, an end-to-end run."""

import inspect
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import HOPPER_DATASET_ID, ROOT, stop_with_sigterm

jax = pytest.importorskip("jax")  # a guard only: CI installs the `jax` extra, so these tests run there
import jax.numpy as jnp  # noqa: E402

import ofql  # noqa: E402
import ofql_jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")


def torch_to_flax(named_tensors) -> dict:
    """ofql.py's (name, parameter) pairs as flax params: `mid_layer.2.weight` -> params/mid_layer/layers_2/kernel (transposed)."""
    params = {}
    for name, value in named_tensors:
        *path, leaf = name.split(".")
        node = params
        for part in path:
            node = node.setdefault(f"layers_{part}" if part.isdigit() else part, {})
        value = value.detach().numpy()
        node["kernel" if leaf == "weight" else "bias"] = jnp.asarray(value.T if leaf == "weight" else value)
    return {"params": params}


def error_of(function, *args) -> str:
    with pytest.raises(ValueError) as error:
        function(*args)
    return str(error.value)


def test_tables_and_names_are_ofqls():
    assert ofql_jax.TASKS == ofql.TASKS and ofql_jax.DOMAIN_ROWS == ofql.DOMAIN_ROWS
    assert ofql_jax.TASK_FIELDS == ofql.TASK_FIELDS and ofql_jax.DEFAULT_TASK == ofql.DEFAULT_TASK
    assert (ofql_jax.OUR_VARIANT, ofql_jax.PAPER_VARIANT) == (ofql.OUR_VARIANT, ofql.PAPER_VARIANT)
    assert ofql_jax.PAPER_ETAS == ofql.PAPER_ETAS
    assert ofql_jax.D4RL_TO_MINARI == ofql.D4RL_TO_MINARI and ofql_jax.D4RL_REF_SCORES == ofql.D4RL_REF_SCORES
    assert ofql_jax.D4RL_FILE_ENVS == ofql.D4RL_FILE_ENVS and ofql_jax.D4RL_FILE_URL == ofql.D4RL_FILE_URL
    assert (ofql_jax.TIME_MU, ofql_jax.TIME_SIGMA, ofql_jax.MAX_EVAL_ENVS) == (
        ofql.TIME_MU,
        ofql.TIME_SIGMA,
        ofql.MAX_EVAL_ENVS,
    )
    assert ofql_jax.RANGES == ofql.RANGES | {"updates_per_call": "[1, inf)", "num_seeds": "[1, inf)"}
    assert ofql_jax.resolve_dataset_id("hopper-medium-v2") == "mujoco/hopper/medium-v0"
    for name in ("hoper-medium-v2", "hopper-medium-replay-v2"):  # the same message
        assert error_of(ofql_jax.resolve_dataset_id, name) == error_of(ofql.resolve_dataset_id, name)
    assert ofql_jax.resolve_dataset_id("walker2d-medium-expert-v2") == "mujoco/walker2d/medium-expert-v0"
    args, line = ofql_jax.task_defaults(ofql_jax.Args(env_id="antmaze-medium-play-v2", eta=0.3, max_q_backup=True))
    assert line == ofql.task_defaults(ofql.Args(env_id="antmaze-medium-play-v2", eta=0.3, max_q_backup=True))[1]
    for flags in ({"env_id": "sac/hopper/medium-replay-v0", "paper_variant": True}, {"env_id": "sac/hopper/expert-v0"}):
        assert ofql_jax.task_defaults(ofql_jax.Args(**flags))[1] == ofql.task_defaults(ofql.Args(**flags))[1]
    assert (args.eta, args.max_q_backup, args.lr, args.reward_tune, args.total_steps) == (
        0.3,
        True,
        1e-3,
        "cql",
        1_000_000,
    )


def test_dataset_arrays_equal_ofqls(minari_path):
    args = ofql_jax.Args(env_id=HOPPER_DATASET_ID, reward_tune="cql")
    data, *_, ref_scores = ofql_jax.load_task(args, HOPPER_DATASET_ID, jax.devices("cpu")[0])
    args = ofql.Args(env_id=HOPPER_DATASET_ID, reward_tune="cql")
    expected, *_, expected_ref_scores = ofql.load_task(args, HOPPER_DATASET_ID, torch.device("cpu"))
    assert data.keys() == expected.keys() and ref_scores == expected_ref_scores
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(data[key]), value.numpy(), err_msg=key)


def test_d4rl_file_and_nested_observations_read_as_ofqls(tmp_path):
    rng = np.random.default_rng(0)
    timeouts, terminals = np.zeros(20, dtype=bool), np.zeros(20, dtype=bool)
    timeouts[9], terminals[15] = True, True
    path = str(tmp_path / "hopper_medium_replay-v2.hdf5")
    with h5py.File(path, "w") as f:
        arrays = dict(
            observations=rng.standard_normal((20, 11)),
            actions=rng.uniform(-1, 1, (20, 3)),
            rewards=rng.standard_normal(20),
        )
        for name, value in (arrays | dict(terminals=terminals, timeouts=timeouts)).items():
            f.create_dataset(name, data=value)
    transitions, expected = ofql_jax.d4rl_transitions(path), ofql.d4rl_transitions(path)
    assert (
        transitions.keys() == expected.keys() and len(transitions["obs"]) == 18
    )  # the timeout row and the last are dropped
    for key, value in expected.items():
        np.testing.assert_array_equal(transitions[key], value, err_msg=key)
    with pytest.raises(ValueError, match="not a readable hdf5 file"):
        ofql_jax.d4rl_transitions(str(tmp_path / "missing.hdf5"))
    nested = {"b": {"y": np.ones((2, 1)), "x": np.zeros((2, 2))}, "a": np.full((2, 1), 2.0)}
    np.testing.assert_array_equal(ofql_jax.flatten_obs(nested), [[2.0, 0, 0, 1], [2.0, 0, 0, 1]])


def test_mean_flow_target_matches_finite_differences():
    """u_tgt = v - (t - r) du/dt with du/dt = v . d_a u + d_t u (Eq. 16), against a central difference in float64."""
    with jax.enable_x64(True):
        actor = ofql_jax.Actor(3, (-1.0,) * 3, (1.0,) * 3)
        keys = jax.random.split(jax.random.PRNGKey(0), 6)
        a_t, v, obs = (
            jax.random.normal(k, shape, jnp.float64)
            for k, shape in zip(keys[:3], [(8, 3), (8, 3), (8, 5)], strict=True)
        )
        t = jax.random.uniform(keys[3], (8,), jnp.float64)
        r = t * jax.random.uniform(keys[4], (8,), jnp.float64)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), actor.init(keys[5], a_t, r, t, obs))
        u_tgt = ofql_jax.mean_flow_target(actor, params, a_t, r, t, obs, v)
        h = 1e-6  # move along the trajectory: a_t by h v, t by h, r fixed
        du_dt = (actor.apply(params, a_t + h * v, r, t + h, obs) - actor.apply(params, a_t - h * v, r, t - h, obs)) / (
            2 * h
        )
        expected = v - (t - r)[:, None] * du_dt
        assert u_tgt.dtype == jnp.float64
        np.testing.assert_allclose(u_tgt, expected, rtol=1e-6, atol=1e-8)
        assert not np.allclose(u_tgt, v, atol=1e-3)  # the derivative term is really there
        grads = jax.grad(lambda p: ofql_jax.mean_flow_target(actor, p, a_t, r, t, obs, v).sum())(params)
        assert all((g == 0).all() for g in jax.tree.leaves(grads))  # the target is a constant for the optimiser


def test_time_pairs_are_ordered_with_flow_pairs_first_and_acting_pairs_last():
    t, r = ofql_jax.sample_time_pairs(jax.random.PRNGKey(0), 1000, 0.5, 0.0)
    assert t.shape == r.shape == (1000,)
    assert ((0 < r) & (r <= t) & (t < 1)).all()
    assert (r == t).sum().item() == 500 + (r[500:] == t[500:]).sum().item()
    t, r = ofql_jax.sample_time_pairs(jax.random.PRNGKey(0), 1000, 0.5, 0.25)
    assert (t[750:] == 1).all() and (r[750:] == 0).all()
    assert (r[:500] == t[:500]).all() and ((0 < r[:750]) & (r[:750] <= t[:750]) & (t[:750] < 1)).all()


def test_losses_and_actions_agree_with_ofql(monkeypatch):
    """The same weights, batch, (t, r) and noise in ofql.py (torch) and ofql_jax.py: losses, gradients and actions agree."""
    obs_dim, action_dim, batch = 11, 3, 64
    low, high = np.array([-1.0, -0.5, -1.0]), np.array([1.0, 0.5, 1.0])
    torch.manual_seed(0)
    torch_actor, torch_critic = ofql.Actor(obs_dim, action_dim, low, high), ofql.Critic(obs_dim, action_dim)
    actor, critic = ofql_jax.Actor(action_dim, tuple(low), tuple(high)), ofql_jax.Critic()
    actor_params, critic_params = (
        torch_to_flax(torch_actor.named_parameters()),
        torch_to_flax(torch_critic.named_parameters()),
    )
    obs, actions, target_q = torch.randn(batch, obs_dim), torch.rand(batch, action_dim) * 2 - 1, torch.randn(batch, 1)
    noise = torch.randn(batch, action_dim)
    t, r = ofql.sample_time_pairs(batch, 0.5, 0.25, torch.device("cpu"))
    j = {
        name: jnp.asarray(x.numpy())
        for name, x in dict(obs=obs, actions=actions, target_q=target_q, noise=noise, t=t, r=r).items()
    }
    # the converter fills exactly flax's own parameter tree
    assert jax.tree.structure(actor_params) == jax.tree.structure(
        actor.init(jax.random.PRNGKey(0), j["actions"], j["t"], j["r"], j["obs"])
    )
    assert jax.tree.structure(critic_params) == jax.tree.structure(
        critic.init(jax.random.PRNGKey(0), j["obs"], j["actions"])
    )

    # MeanFlow loss (Eq. 17) and its gradient
    bc_loss = ofql.mean_flow_loss(torch_actor, obs, actions, t, r, noise)
    bc_loss.backward()
    jax_bc_loss, jax_grads = jax.value_and_grad(ofql_jax.mean_flow_loss, argnums=1)(
        actor, actor_params, j["obs"], j["actions"], j["t"], j["r"], j["noise"]
    )
    np.testing.assert_allclose(jax_bc_loss, bc_loss.item(), rtol=1e-5, atol=1e-5)
    for expected, got in zip(
        jax.tree.leaves(torch_to_flax((name, p.grad) for name, p in torch_actor.named_parameters())),
        jax.tree.leaves(jax_grads),
        strict=True,
    ):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)

    # critic loss for a given target, as ofql.py's update computes it
    q1, q2 = torch_critic(obs, actions)
    critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
    jax_critic_loss, q_mean = ofql_jax.td_loss(critic, critic_params, j["obs"], j["actions"], j["target_q"])
    np.testing.assert_allclose(jax_critic_loss, critic_loss.item(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(q_mean, q1.mean().item(), rtol=1e-5, atol=1e-5)

    # one-step actions (Eq. 18), bounds included: ofql.py's randn made to return the noise JAX draws from the same key
    key = jax.random.PRNGKey(1)
    jax_noise = torch.tensor(np.asarray(jax.random.normal(key, (batch, action_dim))))
    monkeypatch.setattr(torch, "randn", lambda *shape, **kwargs: jax_noise)
    jax_actions = ofql_jax.sample_actions(actor, actor_params, j["obs"], key)
    with torch.no_grad():
        torch_actions = ofql.sample_actions(torch_actor, obs)
    np.testing.assert_allclose(jax_actions, torch_actions.numpy(), rtol=1e-5, atol=1e-5)
    assert (np.abs(np.asarray(jax_actions)) <= high).all()


SUMMARY_KEYS = (
    "algorithm exp_name env_id dataset_id seed total_steps normalized_score normalized_score_std best_normalized_score return_mean "
    "eval_episodes train_seconds updates_per_second hours_per_million_updates decision_hz device compile_seconds "
    "eval_seconds num_candidates threads updates_per_call resumed_from_step evaluations args"
).split()


COMMAND = [
    sys.executable,
    "-u",
    str(ROOT / "ofql_jax.py"),
    "--env-id",
    HOPPER_DATASET_ID,
    "--no-cuda",
]
FLAGS = "--total-steps 300 --eval-freq 150 --eval-episodes 2 --final-eval-episodes 2 --log-freq 100 --updates-per-call 50".split()


def run_ofql_jax(tmp_path, *flags: str) -> dict:
    """An ofql_jax.py run on the Hopper test data (that of the checkpoint or run with --checkpoint, --resume)."""
    command = [c for c in COMMAND if c not in ("--env-id", HOPPER_DATASET_ID)] if "--eval-only" in flags else COMMAND
    run = subprocess.run([*command, *flags], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (summary_path,) = sorted(tmp_path.glob("runs/*/summary.json"), key=lambda p: p.stat().st_mtime)[-1:]
    return json.loads(summary_path.read_text()) | {"stdout": run.stdout, "run_dir": summary_path.parent}


def logged_scalars(run_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def full_run(minari_path, tmp_path_factory) -> dict:
    """300 updates uninterrupted, checkpointing every 100, the networks saved."""
    return run_ofql_jax(tmp_path_factory.mktemp("full"), *FLAGS, "--checkpoint-freq", "100", "--save-model")


def test_end_to_end_run_writes_summary_and_model(full_run, tmp_path):
    summary = full_run
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert (
        summary["algorithm"] == "ofql_jax"
        and summary["dataset_id"] == HOPPER_DATASET_ID
        and summary["total_steps"] == 300
    )
    assert summary["eval_episodes"] == 2 and summary["device"] == "cpu"
    assert [summary["args"][flag] for flag in ("acting_ratio", "eval_ema", "eta")] == [0.25, True, 2.0]  # ours
    episodes = np.array(summary["episode_normalized_scores"])  # each final episode's score, their mean the score
    assert len(episodes) == 2 and episodes.mean() == pytest.approx(summary["normalized_score"])
    assert episodes.std() == pytest.approx(summary["normalized_score_std"])
    assert summary["updates_per_call"] == 50  # 50 divides 100, 150 and 300: kept
    assert [step for step, _ in summary["evaluations"]] == [150, 300]
    assert (
        summary["normalized_score"] == summary["evaluations"][-1][1]
        and summary["best_normalized_score"] >= summary["normalized_score"]
    )
    ref_min, ref_max = ofql_jax.D4RL_REF_SCORES["hopper"]
    assert summary["normalized_score"] == pytest.approx(100 * (summary["return_mean"] - ref_min) / (ref_max - ref_min))
    assert summary["train_seconds"] > 0 and summary["updates_per_second"] > 0 and summary["decision_hz"] > 0
    assert summary["compile_seconds"] > 0
    assert summary["hours_per_million_updates"] == pytest.approx(1e6 / summary["updates_per_second"] / 3600)
    assert "update 300/300" in summary["stdout"] and "updates/s" in summary["stdout"]
    assert list(summary["run_dir"].glob("events.out.tfevents.*"))  # tensorboard log
    assert (summary["run_dir"] / "checkpoint.msgpack").is_file() and summary["resumed_from_step"] is None
    assert not [key for key in summary if "seed" in key and key != "seed"]  # one seed: today's summary, no seed keys

    # the checkpoint evaluates alone (--env-id not needed: the run's dataset and flags, those given winning), with
    # plain one-step sampling
    evaluation = run_ofql_jax(tmp_path, "--eval-only", str(summary["run_dir"] / "checkpoint.msgpack"),
                              "--final-eval-episodes", "3", "--num-candidates", "1")  # fmt: skip
    assert evaluation["total_steps"] == 0 and evaluation["eval_episodes"] == 3 and evaluation["num_candidates"] == 1
    assert evaluation["dataset_id"] == HOPPER_DATASET_ID and evaluation["args"]["eval_freq"] == 150
    assert evaluation["compile_seconds"] == 0
    assert "training" not in evaluation["stdout"] and "updates/s" not in evaluation["stdout"]  # it did not train
    assert np.isfinite(evaluation["normalized_score"]) and evaluation["decision_hz"] > 0


def test_the_backend_starts_as_the_flags_ask_or_the_run_stops_with_one_line(monkeypatch, tmp_path):
    """XLA reads --threads and --no-cuda once, as its backend starts: parse_args starts it after they are final; a
    backend that cannot start (a JAX_PLATFORMS that names none) is one line, before a run folder."""
    env = {**os.environ, "JAX_PLATFORMS": "bogus"}
    command = [sys.executable, str(ROOT / "ofql_jax.py")]  # with --no-cuda, the CPU backend whatever JAX_PLATFORMS
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [run.stderr.strip()], run.stderr[-3000:]
    assert run.stderr.startswith("error: JAX did not start (Unable to initialize backend 'bogus'"), run.stderr
    assert not (tmp_path / "runs").exists()
    started = []
    devices = ofql_jax.jax.devices  # started in this process already: the flags the first call finds
    monkeypatch.setattr(ofql_jax.jax, "devices", lambda: started.append(os.environ.get("XLA_FLAGS", "")) or devices())
    monkeypatch.setattr(ofql_jax.jax.config, "update", lambda name, value: started.append((name, value)))
    monkeypatch.setattr(sys, "argv", ["ofql_jax.py", "--no-cuda", "--threads", "1"])
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    ofql_jax.parse_args()
    assert started[:2] == [("jax_platforms", "cpu"), " --xla_cpu_multi_thread_eigen=false"], started


# Several seeds in one run (--num-seeds): a leading seed axis, the update and the policy vmapped over it.
SEED_FLAGS = "--total-steps 40 --eval-freq 20 --eval-episodes 2 --final-eval-episodes 2 --log-freq 10 --updates-per-call 10".split()


def test_evaluation_of_several_seeds_is_each_seeds_own():
    """Two seeds' policies in one vectorized env: each seed's returns and policy calls are those of its evaluation alone."""

    def make_env():
        return ofql_jax.gym.make("Hopper-v5", max_episode_steps=30)

    def policy_of(counts: list, seeds_gain: np.ndarray):  # a deterministic policy per seed, counting its active calls
        def policy(obs, active):
            counts.append(active.copy())
            obs = obs.reshape(len(seeds_gain), -1, obs.shape[-1])
            return np.tanh(seeds_gain[:, None, None] * obs[..., :3]).reshape(-1, 3)

        return policy

    def evaluate(policy, seeds):  # 3 episodes per seed (in 2 envs where evaluate takes max_envs)
        max_envs = [2] if "max_envs" in inspect.signature(ofql_jax.evaluate).parameters else []
        return ofql_jax.evaluate(policy, make_env, 3, *max_envs, seeds, lambda: None)

    together_counts, alone_counts = [], [[], []]
    together = evaluate(policy_of(together_counts, np.array([1.0, -2.0])), [5, 9])
    alone = [
        evaluate(policy_of(alone_counts[k], np.array([gain])), [seed])
        for k, (gain, seed) in enumerate(((1.0, 5), (-2.0, 9)))
    ]
    assert together.shape == (2, 3)
    np.testing.assert_array_equal(together, np.concatenate(alone))  # the same episodes, in the same order
    assert [sum(active[k] for active in together_counts) for k in range(2)] == [len(counts) for counts in alone_counts]


def test_seeds_in_one_run(minari_path, tmp_path):
    """Seeds 1 and 2 in one run, checkpointing every 20 updates, the networks saved: each follows its single run (seed
    1: test_golden.py); both stop and resume exactly; the model evaluates both. One test: one run of the seeds for the
    three (pytest-xdist runs a module's fixture once per worker)."""
    (tmp_path / "seeds").mkdir()
    seeds_run = run_ofql_jax(
        tmp_path / "seeds", *SEED_FLAGS, "--num-seeds", "2", "--checkpoint-freq", "20", "--save-model"
    )
    for check in (seeds_follow_their_single_runs, seeds_stop_and_resume_exactly, seeds_model_evaluates_every_seed):
        (tmp_path / check.__name__).mkdir()
        check(seeds_run, tmp_path / check.__name__)


def seeds_follow_their_single_runs(seeds_run, tmp_path):
    """Seed 2 of `--seed 1 --num-seeds 2` draws the keys, batches and evaluation envs of `--seed 2`: the same losses and
    scores to float32 rounding (the batched matmuls round differently). Seed 1: test_golden.py."""
    single = subprocess.run(
        [*COMMAND, *SEED_FLAGS, "--seed", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert single.returncode == 0, single.stderr[-3000:]
    batched = logged_scalars(seeds_run["run_dir"])
    (single_dir,) = tmp_path.glob("runs/*")
    single, summary = logged_scalars(single_dir), json.loads((single_dir / "summary.json").read_text())
    for name in ofql_jax.LOSSES:
        expected = single[f"losses/{name}"]
        assert sorted(expected) == [10, 20, 30, 40]
        got = batched[f"losses/{name}/seed_2"]
        np.testing.assert_allclose(
            [got[step] for step in expected], list(expected.values()), rtol=1e-4, atol=1e-6, err_msg=name
        )
    assert [step for step, _ in seeds_run["seed_evaluations"][1]] == [20, 40]
    np.testing.assert_allclose(
        [score for _, score in seeds_run["seed_evaluations"][1]],
        [score for _, score in summary["evaluations"]],
        rtol=1e-4,
    )
    assert seeds_run["seed_normalized_scores"][1] == pytest.approx(summary["normalized_score"], rel=1e-4)

    # what a run of several seeds adds: each seed's scores, their mean and spread across seeds, the mean's curves
    summary = seeds_run
    assert summary["num_seeds"] == 2 and summary["seeds"] == [1, 2] and summary["eval_episodes"] == 2
    seed_scores = np.array(summary["seed_normalized_scores"])
    assert summary["seed_normalized_score_mean"] == pytest.approx(seed_scores.mean()) == summary["normalized_score"]
    assert summary["seed_normalized_score_std"] == pytest.approx(seed_scores.std())
    episodes = np.array(summary["episode_normalized_scores"]).reshape(2, 2)  # seed by seed
    np.testing.assert_allclose(episodes.mean(axis=1), seed_scores, rtol=1e-6)
    assert summary["seed_best_normalized_scores"] == [
        max(score for _, score in curve) for curve in summary["seed_evaluations"]
    ]
    assert [step for step, _ in summary["evaluations"]] == [20, 40]
    assert summary["evaluations"][-1][1] == pytest.approx(seed_scores.mean())
    assert (
        summary["stdout"]
        .strip()
        .splitlines()[-1]
        .startswith(
            f"{HOPPER_DATASET_ID}: 2 seeds, normalized score {seed_scores.mean():.1f} +- {seed_scores.std():.1f} across seeds"
        )
    )
    assert batched["charts/normalized_score"][40] == pytest.approx(seed_scores.mean(), rel=1e-6)
    assert batched["losses/critic_loss"][40] == pytest.approx(
        (batched["losses/critic_loss/seed_1"][40] + batched["losses/critic_loss/seed_2"][40]) / 2, rel=1e-6
    )


def seeds_stop_and_resume_exactly(seeds_run, tmp_path):
    """SIGTERM checkpoints every seed, --resume continues them exactly (the same losses and scores)."""
    cwd, flags = tmp_path / "interrupted", (*COMMAND[3:], *SEED_FLAGS, "--num-seeds", "2", "--checkpoint-freq", "20")
    run_dir, _ = stop_with_sigterm("ofql_jax", cwd, flags, after_update=10)
    interrupted = json.loads((run_dir / "summary.json").read_text())
    stopped = interrupted["interrupted_at_step"]
    assert 10 <= stopped < 40 and interrupted["seeds"] == [1, 2]
    saved = ofql_jax.load_saved(str(run_dir / "checkpoint.msgpack"), "--resume")
    assert (
        saved["key"].shape == (2, 2) and saved["args"]["num_seeds"] == 2 and len(saved["progress"]["policy_calls"]) == 2
    )
    assert all(
        leaf.shape[0] == 2
        for name in ("actor", "actor_ema", "critic", "critic_target", "actor_optimizer", "critic_optimizer")
        for leaf in jax.tree.leaves(saved[name])
        if leaf.ndim
    )

    resumed = run_ofql_jax(cwd, "--resume", str(run_dir.relative_to(cwd)))
    assert resumed["resumed_from_step"] == stopped and resumed["total_steps"] == 40
    for key in ("evaluations", "seed_evaluations", "seed_normalized_scores", "normalized_score"):  # the same keys drawn
        assert resumed[key] == seeds_run[key], key
    expected, got = logged_scalars(seeds_run["run_dir"]), logged_scalars(run_dir)
    for tag in [tag for tag in expected if tag.startswith("losses/")]:
        assert {step: got[tag][step] for step in expected[tag]} == expected[tag], tag


def seeds_model_evaluates_every_seed(seeds_run, tmp_path):
    """The model evaluates every seed; --resume with another --num-seeds: one line, the run kept."""
    run_dir = tmp_path / "runs" / seeds_run["run_dir"].name  # a copy: the fixture's run stays as it is
    shutil.copytree(seeds_run["run_dir"], run_dir)
    resume = ["--resume", str(run_dir), "--total-steps", "100"]  # a finished run goes on only with more
    refused = subprocess.run([*COMMAND[:3], *resume, "--num-seeds", "3"], capture_output=True, text=True, timeout=600)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith("error: "), refused.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["total_steps"] == 40  # the finished result, kept
    evaluation = run_ofql_jax(
        tmp_path,
        "--eval-only",
        str(seeds_run["run_dir"] / "model.msgpack"),
        "--final-eval-episodes",
        "2",
    )
    assert evaluation["total_steps"] == 0 and evaluation["num_seeds"] == 2 and evaluation["args"]["num_seeds"] == 2
    assert len(evaluation["seed_normalized_scores"]) == 2 and np.isfinite(evaluation["seed_normalized_scores"]).all()
    assert evaluation["stdout"].strip().splitlines()[-1].startswith(f"{HOPPER_DATASET_ID}: 2 seeds, normalized score")


def test_benchmark_table_gives_seed_updates_per_second_per_num_seeds():
    """tests/benchmark.py --jax-num-seeds 1 5: a row per N, and a last column of updates/s x N (the run itself: docs)."""
    import benchmark

    run = dict(decision_hz=300.0, rss_mib=900.0, compile_seconds=7.0)
    results = {
        f"ofql_jax --num-seeds {n}": [run | {"updates_per_second": ups, "args": {"num_seeds": n}}]
        for n, ups in ((1, 20.0), (5, 8.0))
    }
    rows = benchmark.table(results).splitlines()
    assert rows[0].endswith("| compile s | seed-updates/s |")
    assert rows[2].startswith("| ofql_jax.py --num-seeds 1 | 20.0 |") and rows[2].endswith("| 20.0 |")
    assert rows[3].startswith("| ofql_jax.py --num-seeds 5 | 8.0 |") and rows[3].endswith("| 40.0 |")
    assert "seed-updates/s" not in benchmark.table({"ofql_jax": [run | {"updates_per_second": 20.0}]})  # as before


def test_the_actors_ema_follows_dqls_schedule():
    """--eval-ema in ofql_jax.py: the EMA in the actor's train state moves as ofql.py's update_ema (the actor before
    ema_start, then every ema_every updates by 1 - ema_decay), and trains nothing: the update's losses are those
    without it."""
    args = ofql_jax.Args(eta=1.0, max_q_backup=False, grad_norm=0.0, lr=3e-4, ema_start=2, ema_every=2)
    args = replace(args, acting_ratio=0.25, eval_ema=True)
    actor, critic = ofql_jax.Actor(2, (-1.0, -1.0), (1.0, 1.0)), ofql_jax.Critic()
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    obs, actions = jax.random.normal(keys[0], (32, 5)), jax.random.uniform(keys[1], (32, 2), minval=-1, maxval=1)
    batch = (obs, actions, jax.random.normal(keys[2], (32, 1)), jax.random.normal(keys[3], (32, 5)), jnp.zeros((32, 1)))
    ema_state, critic_state = ofql_jax.train_states(actor, critic, args, {"obs": obs, "actions": actions}, *keys[4:6])
    plain_state, _ = ofql_jax.train_states(actor, critic, replace(args, eval_ema=False), {"obs": obs, "actions": actions}, *keys[4:6])  # fmt: skip
    assert plain_state.target_params is None and jax.tree.structure(ema_state.target_params) == jax.tree.structure(
        ema_state.params
    )

    def actor_state(target_params):
        return ema_state if target_params is None else ema_state.replace(target_params=target_params)

    other = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(keys[6], p.shape), ema_state.params)
    without = ofql_jax.update(actor, critic, replace(args, eval_ema=False), plain_state, critic_state, batch, keys[7])
    with_ema = ofql_jax.update(actor, critic, args, actor_state(other), critic_state, batch, keys[7])
    assert jax.tree.map(float, with_ema[2]) == jax.tree.map(float, without[2])

    state, targets = actor_state(other), []
    for _ in range(3):  # updates 1, 2, 3 (ema_start 2, ema_every 2): the actor, the EMA, unchanged
        previous = state
        state = ofql_jax.update(actor, critic, args, state, critic_state, batch, keys[7])[0]
        targets.append((previous, state))
    for number, (previous, state) in enumerate(targets, start=1):
        expected = {
            1: state.params,
            2: jax.tree.map(
                lambda old, new: args.ema_decay * old + (1 - args.ema_decay) * new, previous.target_params, state.params
            ),
            3: previous.target_params,
        }[number]
        for got, want in zip(jax.tree.leaves(state.target_params), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
