"""Tests of dql.py: the "vp" schedule, DDPM and DDIM sampling, BPTT through every step, an end-to-end run with the
EMA target actor, and the ddpm step count. SIGTERM + --resume with the target actor: tests/test_robustness.py."""

import json

import numpy as np
import pytest
import torch
from conftest import HOPPER_DATASET_ID, run_script

import dql


def test_vp_schedule_matches_the_formula():
    """alpha_i = exp(-b_min / T - (b_max - b_min)(2i - 1) / (2 T^2)) and the DDPM posterior, computed here independently."""
    for T in (5, 3):
        actor = dql.Actor(4, 2, -np.ones(2), np.ones(2), diffusion_steps=T)
        i = np.arange(1, T + 1)
        alphas = np.exp(-0.1 / T - 0.5 * (10.0 - 0.1) * (2 * i - 1) / T**2)
        betas = 1 - alphas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        expected = {
            "alphas": alphas,
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "posterior_variance": betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * np.sqrt(alphas) / (1 - alphas_cumprod),
        }
        for name, value in expected.items():
            buffer = getattr(actor, name)
            assert buffer.dtype == torch.float32 and buffer.shape == (T,), name
            np.testing.assert_allclose(buffer.numpy(), value, rtol=1e-6, err_msg=name)
    # T = 5: the chain ends close to N(0, I), and the last denoising step adds no noise
    actor = dql.Actor(4, 2, -np.ones(2), np.ones(2))
    assert actor.alphas_cumprod[-1].item() == pytest.approx(np.exp(-5.05), rel=1e-5)
    assert actor.posterior_variance[0].item() == 0.0


def test_diffusion_loss_regresses_the_noise():
    torch.manual_seed(0)
    actor = dql.Actor(4, 2, -np.ones(2), np.ones(2))
    obs, actions, noise = torch.randn(32, 4), torch.rand(32, 2) * 2 - 1, torch.randn(32, 2)
    t = torch.randint(5, (32,))
    abar = actor.alphas_cumprod[t][:, None]
    expected = ((actor(abar.sqrt() * actions + (1 - abar).sqrt() * noise, t.float(), obs) - noise) ** 2).mean()
    assert torch.allclose(dql.diffusion_loss(actor, obs, actions, t, noise), expected)


def test_ddpm_and_ddim_actions_are_bounded():
    actor = dql.Actor(4, 2, np.array([-1.0, -0.5]), np.array([1.0, 0.5]))
    actor.final_layer.bias.data.fill_(-3.0)  # push raw samples past the bounds
    obs = torch.randn(64, 4)
    for sampler, steps in (("ddpm", None), ("ddim", 1), ("ddim", 3), ("ddim", 5)):
        with torch.no_grad():
            actions = dql.sample_actions(actor, obs, sampler, steps)
        assert actions.shape == (64, 2), (sampler, steps)
        assert (actions[:, 0].abs() <= 1).all() and (actions[:, 1].abs() <= 0.5).all(), (sampler, steps)
    critic = dql.Critic(4, 2)
    assert dql.select_actions(actor, critic, torch.randn(7, 4), 5, "ddim", 1).shape == (7, 2)
    assert dql.select_actions(actor, critic, torch.randn(7, 4), 5, "ddpm", 5).shape == (7, 2)
    with pytest.raises(ValueError, match="unknown sampler"):
        dql.sample_actions(actor, obs, "euler")


def test_one_step_ddim_is_the_clipped_x0_prediction_from_noise():
    """DDIM with one step: a = clip((x_T - sqrt(1 - abar) eps(x_T, T - 1)) / sqrt(abar)), abar at the noisiest step."""
    torch.manual_seed(0)
    actor = dql.Actor(4, 2, -np.ones(2), np.ones(2))
    obs = torch.randn(16, 4)
    torch.manual_seed(1)
    with torch.no_grad():
        actions = dql.sample_actions(actor, obs, "ddim", 1)
        torch.manual_seed(1)
        x = torch.randn(16, 2)
        abar = actor.alphas_cumprod[4]
        expected = ((x - (1 - abar).sqrt() * actor(x, torch.full((16,), 4.0), obs)) / abar.sqrt()).clamp(-1, 1)
    assert torch.allclose(actions, expected)


class ZeroGradAtCall:
    """Wraps actor.forward: the output of network call `k` (1-based, in sampling order) passes no gradient back."""

    def __init__(self, actor: dql.Actor, k: int):
        self.forward, self.k, self.calls = actor.forward, k, 0

    def __call__(self, *inputs):
        self.calls += 1
        out = self.forward(*inputs)
        if self.calls == self.k or self.k == -1:
            out.register_hook(torch.zeros_like)
        return out


def actor_gradient_of_q(actor: dql.Actor, critic: dql.Critic, obs: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    wrapper = ZeroGradAtCall(actor, k)
    actor.forward = wrapper  # the instance attribute shadows Actor.forward
    actor.zero_grad()
    torch.manual_seed(1)  # the same noise every time
    critic(obs, dql.sample_actions(actor, obs))[0].sum().backward()
    del actor.forward
    return torch.cat([p.grad.flatten() for p in actor.parameters()]), wrapper.calls


def test_q_gradient_reaches_the_actor_through_every_denoising_step():
    torch.manual_seed(0)
    actor, critic = dql.Actor(6, 3, -np.ones(3), np.ones(3)), dql.Critic(6, 3)
    obs = torch.randn(256, 6)
    full, calls = actor_gradient_of_q(actor, critic, obs, k=0)
    assert calls == 5 and full.abs().sum() > 0
    for k in range(1, 6):  # cutting the gradient at any one of the T steps changes the actor's gradient
        cut, _ = actor_gradient_of_q(actor, critic, obs, k)
        assert not torch.allclose(cut, full, rtol=1e-4, atol=1e-9), k
    none, _ = actor_gradient_of_q(actor, critic, obs, k=-1)  # cut at every step: nothing is left
    assert none.abs().sum() == 0


SUMMARY_KEYS = (
    "algorithm exp_name env_id dataset_id seed total_steps normalized_score normalized_score_std best_normalized_score return_mean "
    "eval_episodes train_seconds updates_per_second hours_per_million_updates decision_hz device eval_sampler eval_steps"
).split()


def run_dql(tmp_path, *flags: str, check: bool = True) -> dict:
    if not {"--eval-only", "--resume"} & set(flags):
        flags = ("--env-id", HOPPER_DATASET_ID, *flags)
    run = run_script("dql", tmp_path, "--no-cuda", *flags)
    if not check:
        return {"returncode": run.returncode, "stderr": run.stderr}
    assert run.returncode == 0, run.stderr[-3000:]
    (summary_path,) = sorted(tmp_path.glob("runs/*/summary.json"), key=lambda p: p.stat().st_mtime)[-1:]
    return json.loads(summary_path.read_text()) | {"stdout": run.stdout, "run_dir": summary_path.parent}


def test_end_to_end_run_and_one_step_ddim_evaluation(minari_path, tmp_path):
    flags = "--total-steps 200 --batch-size 64 --eval-freq 100 --eval-episodes 2 --final-eval-episodes 2 --log-freq 100"
    summary = run_dql(tmp_path, *flags.split(), "--ema-start", "150", "--save-model")
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert summary["algorithm"] == "dql" and summary["total_steps"] == 200 and summary["eval_episodes"] == 2
    assert (summary["eval_sampler"], summary["eval_steps"]) == ("ddpm", 5)
    episodes = np.array(summary["episode_normalized_scores"])  # each final episode's score, their mean the score
    assert len(episodes) == 2 and episodes.mean() == pytest.approx(summary["normalized_score"])
    assert episodes.std() == pytest.approx(summary["normalized_score_std"])
    assert [step for step, _ in summary["evaluations"]] == [100, 200]
    assert summary["args"]["eta"] == 1.0 and summary["args"]["grad_norm"] == 9.0  # DQL's hopper-medium row
    assert summary["updates_per_second"] > 0 and summary["decision_hz"] > 0 and "update 200/200" in summary["stdout"]
    checkpoint = torch.load(summary["run_dir"] / "model.pt")
    ema = "actor_ema" if "actor_ema" in checkpoint else "actor_target"  # the target actor, an EMA of the actor
    assert set(checkpoint) == {"actor", ema, "critic", "critic_target", "args", "script"}
    torch.manual_seed(1)  # the script's seed: the actor's initial weights, which the target keeps until update 150
    initial = dql.Actor(11, 3, -np.ones(3), np.ones(3)).state_dict()
    params = [k for k in initial if k in dict(dql.Actor(11, 3, -np.ones(3), np.ones(3)).named_parameters())]
    target_moved = sum((checkpoint[ema][k] - initial[k]).norm() ** 2 for k in params) ** 0.5
    actor_moved = sum((checkpoint["actor"][k] - initial[k]).norm() ** 2 for k in params) ** 0.5
    assert 0 < target_moved < 0.1 * actor_moved  # 11 EMA steps of weight 0.005 (updates 150, 155, ..., 200)

    # the paper's ablation "DQL + DDIM (1)": the DDPM-trained model evaluated with one deterministic DDIM step
    evaluation = run_dql(
        tmp_path, "--eval-only", str(summary["run_dir"] / "model.pt"), "--final-eval-episodes", "2",
        "--eval-sampler", "ddim", "--eval-steps", "1",
    )  # fmt: skip
    assert (evaluation["eval_sampler"], evaluation["eval_steps"], evaluation["total_steps"]) == ("ddim", 1, 0)
    assert np.isfinite(evaluation["normalized_score"]) and evaluation["decision_hz"] > 0
    assert evaluation["dataset_id"] == HOPPER_DATASET_ID and evaluation["args"]["ema_start"] == 150  # the model's


def test_ddpm_with_fewer_eval_steps_fails_at_once(tmp_path):
    """ddpm cannot skip steps: one line naming the fix, before any data is read or any run folder is made."""
    failed = run_dql(tmp_path, "--eval-steps", "1", check=False)
    assert failed["returncode"] != 0 and "Traceback" not in failed["stderr"], failed["stderr"][-2000:]
    (line,) = failed["stderr"].strip().splitlines()
    assert line.startswith("error: --eval-steps 1") and "--eval-sampler ddim" in line, line
    assert not (tmp_path / "runs").exists()
