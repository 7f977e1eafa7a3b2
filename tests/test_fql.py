"""Tests of fql.py: the flow matching loss, Euler sampling, BPTT through every step, an end-to-end run with the
EMA target actor. SIGTERM + --resume with the target actor: tests/test_robustness.py."""

import json

import numpy as np
import pytest
import torch
from conftest import HOPPER_DATASET_ID, run_script

import fql


def test_flow_matching_loss_regresses_the_conditional_velocity():
    """a_t = (1 - t) a + t eps, target eps - a (Eq. 11)."""
    torch.manual_seed(0)
    actor = fql.Actor(4, 2, -np.ones(2), np.ones(2))
    obs, actions, noise, t = torch.randn(32, 4), torch.rand(32, 2) * 2 - 1, torch.randn(32, 2), torch.rand(32)
    expected = ((actor((1 - t[:, None]) * actions + t[:, None] * noise, t, obs) - (noise - actions)) ** 2).mean()
    assert torch.allclose(fql.flow_matching_loss(actor, obs, actions, t, noise), expected)


def test_euler_actions_are_bounded_for_one_and_k_steps():
    actor = fql.Actor(4, 2, np.array([-1.0, -0.5]), np.array([1.0, 0.5]))
    actor.final_layer.bias.data.fill_(-3.0)  # push raw samples past the bounds
    obs = torch.randn(64, 4)
    for steps in (1, 5):
        with torch.no_grad():
            actions = fql.sample_actions(actor, obs, steps)
        assert actions.shape == (64, 2), steps
        assert (actions[:, 0].abs() <= 1).all() and (actions[:, 1].abs() <= 0.5).all(), steps
    assert fql.select_actions(actor, fql.Critic(4, 2), torch.randn(7, 4), 5, 1).shape == (7, 2)


def test_one_euler_step_is_noise_minus_velocity_at_t_1():
    torch.manual_seed(0)
    actor = fql.Actor(4, 2, -np.ones(2), np.ones(2))
    obs = torch.randn(16, 4)
    with torch.no_grad():
        torch.manual_seed(1)
        actions = fql.sample_actions(actor, obs, 1)
        torch.manual_seed(1)
        noise = torch.randn(16, 2)
        expected = (noise - actor(noise, torch.ones(16), obs)).clamp(-1, 1)
        torch.manual_seed(1)
        two_steps = fql.sample_actions(actor, obs, 2)
        half = noise - 0.5 * actor(noise, torch.ones(16), obs)
        expected_two = (half - 0.5 * actor(half, torch.full((16,), 0.5), obs)).clamp(-1, 1)
    assert torch.allclose(actions, expected) and torch.allclose(two_steps, expected_two, atol=1e-6)


class ZeroGradAtCall:
    """Wraps actor.forward: the output of network call `k` (1-based, in sampling order) passes no gradient back."""

    def __init__(self, actor: fql.Actor, k: int):
        self.forward, self.k, self.calls = actor.forward, k, 0

    def __call__(self, *inputs):
        self.calls += 1
        out = self.forward(*inputs)
        if self.calls == self.k or self.k == -1:
            out.register_hook(torch.zeros_like)
        return out


def actor_gradient_of_q(actor: fql.Actor, critic: fql.Critic, obs: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    wrapper = ZeroGradAtCall(actor, k)
    actor.forward = wrapper  # the instance attribute shadows Actor.forward
    actor.zero_grad()
    torch.manual_seed(1)  # the same noise every time
    critic(obs, fql.sample_actions(actor, obs, 5))[0].sum().backward()
    del actor.forward
    return torch.cat([p.grad.flatten() for p in actor.parameters()]), wrapper.calls


def test_q_gradient_reaches_the_actor_through_every_euler_step():
    torch.manual_seed(0)
    actor, critic = fql.Actor(6, 3, -np.ones(3), np.ones(3)), fql.Critic(6, 3)
    obs = torch.randn(256, 6)
    full, calls = actor_gradient_of_q(actor, critic, obs, k=0)
    assert calls == 5 and full.abs().sum() > 0
    for k in range(1, 6):  # cutting the gradient at any one of the K steps changes the actor's gradient
        cut, _ = actor_gradient_of_q(actor, critic, obs, k)
        assert not torch.allclose(cut, full, rtol=1e-4, atol=1e-9), k
    none, _ = actor_gradient_of_q(actor, critic, obs, k=-1)  # cut at every step: nothing is left
    assert none.abs().sum() == 0


SUMMARY_KEYS = (
    "algorithm exp_name env_id dataset_id seed total_steps normalized_score normalized_score_std best_normalized_score return_mean "
    "eval_episodes train_seconds updates_per_second hours_per_million_updates decision_hz device eval_steps"
).split()


def run_fql(tmp_path, *flags: str) -> dict:
    if not {"--eval-only", "--resume"} & set(flags):
        flags = ("--env-id", HOPPER_DATASET_ID, *flags)
    run = run_script("fql", tmp_path, "--no-cuda", *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    (summary_path,) = sorted(tmp_path.glob("runs/*/summary.json"), key=lambda p: p.stat().st_mtime)[-1:]
    return json.loads(summary_path.read_text()) | {"stdout": run.stdout, "run_dir": summary_path.parent}


def test_end_to_end_run_and_one_step_evaluation(minari_path, tmp_path):
    flags = "--total-steps 200 --batch-size 64 --eval-freq 100 --eval-episodes 2 --final-eval-episodes 2 --log-freq 100"
    summary = run_fql(tmp_path, *flags.split(), "--ema-start", "150", "--save-model")
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert summary["algorithm"] == "fql" and summary["total_steps"] == 200 and summary["eval_episodes"] == 2
    assert summary["eval_steps"] == 5 and "eval_sampler" not in summary
    episodes = np.array(summary["episode_normalized_scores"])  # each final episode's score, their mean the score
    assert len(episodes) == 2 and episodes.mean() == pytest.approx(summary["normalized_score"])
    assert episodes.std() == pytest.approx(summary["normalized_score_std"])
    assert [step for step, _ in summary["evaluations"]] == [100, 200]
    assert summary["args"]["eta"] == 1.0 and summary["args"]["flow_steps"] == 5  # DQL's hopper-medium row
    assert summary["updates_per_second"] > 0 and summary["decision_hz"] > 0 and "update 200/200" in summary["stdout"]
    checkpoint = torch.load(summary["run_dir"] / "model.pt")
    ema = "actor_ema" if "actor_ema" in checkpoint else "actor_target"  # the target actor, an EMA of the actor
    assert set(checkpoint) == {"actor", ema, "critic", "critic_target", "args", "script"}
    torch.manual_seed(1)  # the script's seed: the actor's initial weights, which the target keeps until update 150
    initial = fql.Actor(11, 3, -np.ones(3), np.ones(3)).state_dict()
    params = [k for k in initial if k in dict(fql.Actor(11, 3, -np.ones(3), np.ones(3)).named_parameters())]
    target_moved = sum((checkpoint[ema][k] - initial[k]).norm() ** 2 for k in params) ** 0.5
    actor_moved = sum((checkpoint["actor"][k] - initial[k]).norm() ** 2 for k in params) ** 0.5
    assert 0 < target_moved < 0.1 * actor_moved  # 11 EMA steps of weight 0.005 (updates 150, 155, ..., 200)

    # the paper's ablation "FQL (1)": trained with 5 Euler steps, evaluated with one
    evaluation = run_fql(
        tmp_path,
        "--eval-only",
        str(summary["run_dir"] / "model.pt"),
        "--final-eval-episodes",
        "2",
        "--eval-steps",
        "1",
    )
    assert (evaluation["eval_steps"], evaluation["total_steps"]) == (1, 0)
    assert np.isfinite(evaluation["normalized_score"]) and evaluation["decision_hz"] > 0
    assert evaluation["dataset_id"] == HOPPER_DATASET_ID and evaluation["args"]["ema_start"] == 150  # the model's
