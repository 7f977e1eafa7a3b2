"""Tests of ofql.py: data, the MeanFlow target and loss, one-step sampling, and an end-to-end run."""

import copy
import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import HOPPER_DATASET_ID, ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ofql


def test_d4rl_names_map_to_minari_ids():
    assert ofql.resolve_dataset_id("hopper-medium-v2") == "mujoco/hopper/medium-v0"
    assert ofql.resolve_dataset_id("walker2d-expert-v2") == "mujoco/walker2d/expert-v0"
    assert ofql.resolve_dataset_id("antmaze-umaze-diverse-v2") == "D4RL/antmaze/umaze-diverse-v1"
    assert ofql.resolve_dataset_id("kitchen-partial-v0") == "D4RL/kitchen/partial-v2"
    assert ofql.resolve_dataset_id("pen-human-v1") == "D4RL/pen/human-v2"
    assert ofql.resolve_dataset_id("sac/hopper/medium-replay-v0") == "sac/hopper/medium-replay-v0"  # Minari id as given


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ValueError, match="Did you mean: hopper-medium"):
        ofql.resolve_dataset_id("hoper-medium-v2")
    with pytest.raises(ValueError, match="--dataset-path hopper_medium_replay-v2.hdf5"):
        ofql.resolve_dataset_id("hopper-medium-replay-v2")


def test_task_table_fills_defaults_and_command_line_wins():
    args, line = ofql.task_defaults(ofql.Args(env_id="sac/hopper/medium-replay-v0"))
    assert (args.grad_norm, args.max_q_backup, args.reward_tune, args.total_steps) == (4.0, False, "none", 2_000_000)
    assert line.startswith("task row hopper-medium-replay: lr 0.0003, eta 2.0,") and "not the defaults" not in line
    args, line = ofql.task_defaults(ofql.Args(env_id="antmaze-medium-play-v2", eta=0.3, max_q_backup=True))
    assert (args.eta, args.max_q_backup, args.lr, args.reward_tune) == (0.3, True, 1e-3, "cql")
    assert line.endswith("(not the defaults: eta)")  # max_q_backup True is the row's


def test_our_variant_is_the_default_and_the_papers_is_one_flag_away():
    """Ours: acting pairs, the EMA's actions, the row's eta (2.0 on locomotion); --paper-variant: none of them and eta
    from the paper's grid (0.01 on locomotion, the row's where that is in the grid); a flag still wins."""
    ours, line = ofql.task_defaults(ofql.Args(env_id="sac/hopper/medium-replay-v0"))
    assert (ours.acting_ratio, ours.eval_ema, ours.eta) == (0.25, True, 2.0)
    assert line.endswith("acting_ratio 0.25, eval_ema True") and "paper" not in line
    paper, line = ofql.task_defaults(ofql.Args(env_id="sac/hopper/medium-replay-v0", paper_variant=True))
    assert (paper.acting_ratio, paper.eval_ema, paper.eta) == (0.0, False, 0.01)
    assert line.startswith("task row hopper-medium-replay, the paper's variant: lr 0.0003, eta 0.01,")
    assert replace(paper, paper_variant=False, eval_ema=None, acting_ratio=None, eta=None) == replace(
        ofql.Args(env_id="sac/hopper/medium-replay-v0"), lr=paper.lr, max_q_backup=paper.max_q_backup,
        reward_tune=paper.reward_tune, total_steps=paper.total_steps, grad_norm=paper.grad_norm,
    )  # fmt: skip
    assert ofql.task_defaults(ofql.Args(env_id="kitchen-mixed-v0", paper_variant=True))[0].eta == 0.001
    assert ofql.task_defaults(ofql.Args(env_id="mine/robot/demos-v0", paper_variant=True))[0].eta == 0.01  # hopper's
    flags = ofql.Args(env_id="hopper-medium-v2", paper_variant=True, eta=0.1, acting_ratio=0.1, eval_ema=True)
    args, line = ofql.task_defaults(flags)
    assert (args.acting_ratio, args.eval_ema, args.eta) == (0.1, True, 0.1)
    assert line.endswith("(not the defaults: eta, acting_ratio, eval_ema)")


@pytest.mark.parametrize(
    "env_id, row",
    [("ant-medium-v2", "hopper-medium"), ("door-human-v1", "pen-human"), ("walker2d-expert-v2", "walker2d-medium")]
    + [("mine/robot/demos-v0", "hopper-medium")],
)
def test_a_task_without_a_row_borrows_one_and_says_which(env_id, row):
    args, line = ofql.task_defaults(ofql.Args(env_id=env_id))
    assert line.startswith(f"{ofql.task_name(env_id)} has no row in TASKS, borrowing {row}'s: ")
    assert (args.lr, args.grad_norm) == ofql.TASKS[row][:1] + ofql.TASKS[row][-1:]


def test_dataset_to_tensors_keeps_transitions_aligned(minari_path):
    dataset = ofql.load_dataset(HOPPER_DATASET_ID)
    data = ofql.dataset_to_tensors(ofql.minari_transitions(dataset), "none", torch.device("cpu"))
    episodes = list(dataset.iterate_episodes())
    assert data["obs"].shape == (dataset.total_steps, 11) and data["actions"].shape == (dataset.total_steps, 3)
    # next_obs of one step is obs of the next within an episode; episode boundaries are not crossed
    first = len(episodes[0].rewards)
    assert torch.equal(data["next_obs"][: first - 1], data["obs"][1:first])
    assert torch.allclose(
        data["next_obs"][first - 1], torch.as_tensor(episodes[0].observations[-1], dtype=torch.float32)
    )
    # terminals are terminations only: a truncated episode's last step is not terminal
    assert data["terminals"].sum().item() == sum(int(e.terminations.sum()) for e in episodes)
    truncated = [e for e in episodes if e.truncations[-1]]
    assert truncated and not any(e.terminations[-1] for e in truncated)
    shaped = ofql.dataset_to_tensors(ofql.minari_transitions(dataset), "cql", torch.device("cpu"))
    assert torch.allclose(shaped["rewards"], (data["rewards"] - 0.5) * 4, atol=1e-5)


def test_dict_observations_flatten_in_sorted_key_order():
    obs = {"observation": np.ones((4, 27)), "desired_goal": np.full((4, 2), 2.0), "achieved_goal": np.zeros((4, 2))}
    flat = ofql.flatten_obs(obs)
    assert flat.shape == (4, 31)
    assert (flat[:, :2] == 0).all() and (flat[:, 2:4] == 2).all() and (flat[:, 4:] == 1).all()
    assert np.array_equal(ofql.flatten_obs(flat), flat)  # arrays pass through


def with_torch_mish(actor: ofql.Actor) -> ofql.Actor:
    """A copy of the actor with torch's nn.Mish, which torch.func transforms can go through (our CPU Mish cannot)."""
    reference = copy.deepcopy(actor)
    for parent in reference.modules():
        for name, child in parent.named_children():
            if isinstance(child, ofql.Mish):
                setattr(parent, name, torch.nn.Mish())
    return reference


@pytest.mark.parametrize("interval", [False, True])
def test_actor_jvp_matches_finite_differences_and_torch_func(interval):
    """actor.jvp: u as actor() gives it, with gradient, and du/dt = v . d_a u + d_t u (Eq. 16) without, against a
    central difference in float64 and against torch.func.jvp (forward AD, which the hand-written pass replaces); also
    with --interval-conditioning, where the second embedding's input t - r moves with t."""
    torch.manual_seed(0)
    actor = ofql.Actor(5, 3, -np.ones(3), np.ones(3), interval=interval).double()
    a_t, v, obs = (
        torch.randn(8, 3, dtype=torch.float64),
        torch.randn(8, 3, dtype=torch.float64),
        torch.randn(8, 5, dtype=torch.float64),
    )
    t = torch.rand(8, dtype=torch.float64)
    r = t * torch.rand(8, dtype=torch.float64)
    u, du_dt = actor.jvp(a_t, r, t, obs, v)
    assert u.requires_grad and not du_dt.requires_grad
    assert torch.equal(u, actor(a_t, r, t, obs))
    h = 1e-6  # move along the trajectory: a_t by h v, t by h, r fixed
    with torch.no_grad():
        central = (actor(a_t + h * v, r, t + h, obs) - actor(a_t - h * v, r, t - h, obs)) / (2 * h)
        reference = with_torch_mish(actor)
        _, forward_ad = torch.func.jvp(lambda a_t, t: reference(a_t, r, t, obs), (a_t, t), (v, torch.ones_like(t)))
    assert torch.allclose(du_dt, central, rtol=1e-6, atol=1e-8)
    assert torch.allclose(du_dt, forward_ad, rtol=1e-12, atol=1e-12)
    assert du_dt.abs().mean() > 1e-3  # the derivative term is really there (an untrained actor: small, not zero)


def test_mean_flow_loss_regresses_u_onto_the_stopped_target():
    """The loss is MSE(u, v - (t - r) du/dt) (Eq. 16-17); its gradient flows through u only, not through the target."""
    torch.manual_seed(0)
    actor = ofql.Actor(5, 3, -np.ones(3), np.ones(3)).double()
    obs, actions, noise = (
        torch.randn(16, 5, dtype=torch.float64),
        torch.rand(16, 3, dtype=torch.float64),
        torch.randn(16, 3, dtype=torch.float64),
    )
    t, r = ofql.sample_time_pairs(16, 0.5, -0.4, 1.0, obs.device)
    t, r = t.double(), r.double()
    loss = ofql.mean_flow_loss(actor, obs, actions, t, r, noise)
    a_t, v = (1 - t[:, None]) * actions + t[:, None] * noise, noise - actions
    with torch.no_grad():
        reference = with_torch_mish(actor)
        _, du_dt = torch.func.jvp(lambda a_t, t: reference(a_t, r, t, obs), (a_t, t), (v, torch.ones_like(t)))
    expected = torch.nn.functional.mse_loss(actor(a_t, r, t, obs), v - (t - r)[:, None] * du_dt)
    grads = torch.autograd.grad(loss, list(actor.parameters()))
    expected_grads = torch.autograd.grad(expected, list(actor.parameters()))
    assert torch.allclose(loss, expected, rtol=1e-12)
    assert all(torch.allclose(g, e, rtol=1e-9, atol=1e-12) for g, e in zip(grads, expected_grads, strict=True))

    # --adaptive-power p: each pair's error e_i weighted by the stopped 1 / (e_i + c)^p (MeanFlow's adaptive weighting)
    errors = (actor(a_t, r, t, obs) - (v - (t - r)[:, None] * du_dt)).pow(2).mean(dim=-1)
    weighted = ofql.mean_flow_loss(actor, obs, actions, t, r, noise, power=1.0, c=1e-3)
    assert torch.allclose(weighted, (errors / (errors + 1e-3)).mean(), rtol=1e-12)
    weighted_grads = torch.autograd.grad(weighted, list(actor.parameters()))
    expected_grads = torch.autograd.grad((errors / (errors.detach() + 1e-3)).mean(), list(actor.parameters()))
    assert all(torch.allclose(g, e, rtol=1e-9, atol=1e-12) for g, e in zip(weighted_grads, expected_grads, strict=True))
    assert not all(torch.allclose(g, e) for g, e in zip(weighted_grads, grads, strict=True))  # not the plain loss


def test_time_pairs_are_ordered_with_half_on_the_diagonal():
    t, r = ofql.sample_time_pairs(1000, 0.5, -0.4, 1.0, torch.device("cpu"))
    assert t.shape == r.shape == (1000,)
    assert ((0 < r) & (r <= t) & (t < 1)).all()
    assert (r == t).sum().item() == 500 + (r[500:] == t[500:]).sum().item()


def test_acting_ratio_puts_the_batchs_end_at_the_acting_pair():
    t, r = ofql.sample_time_pairs(1000, 0.5, -0.4, 1.0, torch.device("cpu"), acting_ratio=0.25)
    assert (t[750:] == 1).all() and (r[750:] == 0).all()
    assert (r[:500] == t[:500]).all() and ((0 < r[:750]) & (r[:750] <= t[:750]) & (t[:750] < 1)).all()
    t, r = ofql.sample_time_pairs(10, 1.0, -0.4, 1.0, torch.device("cpu"), acting_ratio=0.3)  # the acting pairs win
    assert (r[:7] == t[:7]).all() and (t[7:] == 1).all() and (r[7:] == 0).all()


def test_zero_r_ratio_puts_r_at_zero_before_the_acting_pairs():
    """--zero-r-ratio (H1 of issue 19): r = 0 with t from the sampler on its share, just before the acting pairs."""
    t, r = ofql.sample_time_pairs(1000, 0.5, -0.4, 1.0, torch.device("cpu"), acting_ratio=0.25, zero_r_ratio=0.1)
    assert (t[750:] == 1).all() and (r[750:] == 0).all()
    assert (r[650:750] == 0).all() and ((0 < t[650:750]) & (t[650:750] < 1)).all() and t[650:750].std() > 0.1
    assert (r[:500] == t[:500]).all() and ((0 < r[:650]) & (r[:650] <= t[:650]) & (t[:650] < 1)).all()
    t, r = ofql.sample_time_pairs(10, 0.5, -0.4, 1.0, torch.device("cpu"), zero_r_ratio=0.8)  # r = 0 wins over r = t
    assert (r[:2] == t[:2]).all() and (r[2:] == 0).all() and (t[2:] < 1).all()


def test_interval_conditioning_embeds_t_minus_r():
    """--interval-conditioning: the actor's second time embedding takes t - r (MeanFlow's code) instead of r."""
    torch.manual_seed(0)
    actor = ofql.Actor(5, 3, -np.ones(3), np.ones(3))
    interval = copy.deepcopy(actor)
    interval.interval = True
    a_t, obs, t = torch.randn(8, 3), torch.randn(8, 5), torch.rand(8)
    r = t * torch.rand(8)
    assert torch.equal(interval(a_t, r, t, obs), actor(a_t, t - r, t, obs))
    assert not torch.allclose(interval(a_t, r, t, obs), actor(a_t, r, t, obs))


def test_one_step_actions_are_bounded_and_differentiable():
    actor = ofql.Actor(4, 2, np.array([-1.0, -0.5]), np.array([1.0, 0.5]))
    actor.final_layer.bias.data.fill_(-3.0)  # push raw samples past the bounds
    actions = ofql.sample_actions(actor, torch.randn(64, 4))
    assert actions.shape == (64, 2)
    assert (actions[:, 0].abs() <= 1).all() and (actions[:, 1].abs() <= 0.5).all()
    critic = ofql.Critic(4, 2)
    selected = ofql.select_actions(actor, critic, torch.randn(7, 4), num_candidates=5, noise_scale=1.0)
    assert selected.shape == (7, 2)
    # --eval-noise-scale s: eps ~ N(0, s^2 I) into the same one-step map; at 0 every candidate is the same action
    obs = torch.randn(64, 4)
    torch.manual_seed(0)
    noise = 2.0 * torch.randn(64, 2)
    zeros = torch.zeros(64)
    expected = (noise - actor(noise, zeros, zeros + 1, obs)).clamp(actor.action_low, actor.action_high)
    torch.manual_seed(0)
    torch.testing.assert_close(ofql.sample_actions(actor, obs, noise_scale=2.0), expected)
    candidates = ofql.sample_actions(actor, obs[:1].expand(5, 4), noise_scale=0.0)
    assert torch.equal(candidates, candidates[:1].expand(5, 2)) and not torch.equal(expected[:1], candidates[:1])
    actor.final_layer.bias.data.zero_()
    critic(torch.randn(64, 4), ofql.sample_actions(actor, torch.randn(64, 4)))[0].sum().backward()
    assert actor.final_layer.weight.grad.abs().sum() > 0


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 200) -> float:
    directions = torch.nn.functional.normalize(
        torch.randn(2, num_projections, generator=torch.Generator().manual_seed(0)), dim=0
    )
    return ((x @ directions).sort(0).values - (y @ directions).sort(0).values).abs().mean().item()


def test_one_step_mean_flow_beats_one_step_flow_matching_on_a_multimodal_target():
    """The paper's Fig. 3 in small: eight Gaussians on a ring, the same network and budget for both.

    Flow matching is MeanFlow with r = t everywhere (flow_ratio 1): the network then learns the marginal
    velocity v(a_t, t), and its one-step sample is eps - v(eps, 1). MeanFlow's is eps - u(eps, 0, 1)."""

    def ring(n: int) -> torch.Tensor:
        angles = torch.randint(8, (n,)) * (2 * np.pi / 8)
        return 0.7 * torch.stack([angles.cos(), angles.sin()], 1) + 0.05 * torch.randn(n, 2)

    def train(flow_ratio: float) -> ofql.Actor:
        torch.manual_seed(0)
        actor = ofql.Actor(1, 2, -np.ones(2), np.ones(2), hidden_dim=128)
        optimizer = torch.optim.Adam(actor.parameters(), lr=1e-3)
        for _ in range(1500):
            actions, obs = ring(256), torch.zeros(256, 1)
            t, r = ofql.sample_time_pairs(256, flow_ratio, -0.4, 1.0, torch.device("cpu"))
            loss = ofql.mean_flow_loss(actor, obs, actions, t, r, torch.randn_like(actions))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return actor

    mean_flow, flow_matching = train(flow_ratio=0.5), train(flow_ratio=1.0)
    obs, noise, target = torch.zeros(4000, 1), torch.randn(4000, 2), ring(4000)
    ones = torch.ones(4000)
    with torch.no_grad():
        mean_flow_samples = noise - mean_flow(noise, 0 * ones, ones, obs)
        flow_matching_samples = noise - flow_matching(noise, ones, ones, obs)
    mean_flow_distance = sliced_wasserstein(mean_flow_samples, target)
    flow_matching_distance = sliced_wasserstein(flow_matching_samples, target)
    print(
        f"sliced Wasserstein to the target, 1 step: MeanFlow {mean_flow_distance:.3f}, flow matching {flow_matching_distance:.3f}"
    )
    assert mean_flow_distance < 0.5 * flow_matching_distance


SUMMARY_KEYS = (
    "algorithm exp_name env_id dataset_id seed total_steps normalized_score normalized_score_std best_normalized_score return_mean "
    "eval_episodes train_seconds updates_per_second hours_per_million_updates decision_hz device"
).split()


def run_ofql(tmp_path, *flags: str) -> dict:
    """An ofql.py run in tmp_path (on the Hopper test data unless flags name an --env-id; a later one wins)."""
    tmp_path.mkdir(exist_ok=True)
    command = [
        sys.executable,
        str(ROOT / "ofql.py"),
        "--env-id",
        HOPPER_DATASET_ID,
        "--no-cuda",
        "--threads",
        "1",
        *flags,
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (summary_path,) = sorted(tmp_path.glob("runs/*/summary.json"), key=lambda p: p.stat().st_mtime)[-1:]
    return json.loads(summary_path.read_text()) | {"stdout": run.stdout, "run_dir": summary_path.parent}


def test_end_to_end_run_writes_summary_and_model(minari_path, tmp_path):
    flags = "--total-steps 300 --eval-freq 150 --eval-episodes 2 --final-eval-episodes 2 --log-freq 100 --save-model"
    summary = run_ofql(tmp_path, *flags.split())
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert (
        summary["algorithm"] == "ofql" and summary["dataset_id"] == HOPPER_DATASET_ID and summary["total_steps"] == 300
    )
    assert summary["eval_episodes"] == 2 and summary["device"] == "cpu"
    assert [summary["args"][flag] for flag in ("acting_ratio", "eval_ema", "eta")] == [0.25, True, 2.0]  # ours
    episodes = np.array(summary["episode_normalized_scores"])  # each final episode's score, their mean the score
    assert len(episodes) == 2 and episodes.mean() == pytest.approx(summary["normalized_score"])
    assert episodes.std() == pytest.approx(summary["normalized_score_std"])
    assert [step for step, _ in summary["evaluations"]] == [150, 300]
    assert (
        summary["normalized_score"] == summary["evaluations"][-1][1]
        and summary["best_normalized_score"] >= summary["normalized_score"]
    )
    ref_min, ref_max = ofql.D4RL_REF_SCORES["hopper"]
    assert summary["normalized_score"] == pytest.approx(100 * (summary["return_mean"] - ref_min) / (ref_max - ref_min))
    assert summary["train_seconds"] > 0 and summary["updates_per_second"] > 0 and summary["decision_hz"] > 0
    assert summary["hours_per_million_updates"] == pytest.approx(1e6 / summary["updates_per_second"] / 3600)
    assert "update 300/300" in summary["stdout"] and "updates/s" in summary["stdout"]
    assert list(summary["run_dir"].glob("events.out.tfevents.*"))  # tensorboard log

    # the saved networks evaluate alone, with plain one-step sampling
    evaluation = run_ofql(
        tmp_path,
        "--eval-only",
        "--checkpoint",
        str(summary["run_dir"] / "model.pt"),
        "--final-eval-episodes",
        "3",
        "--num-candidates",
        "1",
    )
    assert evaluation["total_steps"] == 0 and evaluation["eval_episodes"] == 3 and evaluation["num_candidates"] == 1
    assert np.isfinite(evaluation["normalized_score"]) and evaluation["decision_hz"] > 0
    assert "training" not in evaluation["stdout"] and "updates/s" not in evaluation["stdout"]  # it did not train


def test_ofql_learns_at_a_q_weight_where_the_papers_pairs_collapse(pendulum_dataset, tmp_path):
    """The learning test (issue 19; real data, real training, about three minutes on one CPU thread): one noisy
    controller's Pendulum data (narrow, as HalfCheetah medium's; the data scores about 67), eta 10. With acting pairs,
    2,000 updates score well above the same seed's untrained networks and up at the data; with the paper's pairs
    (--acting-ratio 0) the same run collapses to about random, the MeanFlow loss at the acting pair far
    above the batch's (as on HalfCheetah at eta 0.3), where acting pairs hold it near the batch's. All evaluated
    alike (20 episodes, 50 candidates, the Q pick, the trained weights)."""
    evaluation = ("--env-id", pendulum_dataset, "--final-eval-episodes", "20", "--max-eval-envs", "20", "--eval-ema")
    evaluation += ("False",)
    untrained = run_ofql(tmp_path / "untrained", *evaluation, "--total-steps", "0")
    training = (*evaluation, "--total-steps", "2000", "--eta", "10", "--eval-freq", "2000", "--log-freq", "1000")
    acting, papers = (
        run_ofql(tmp_path / name, *training, "--acting-ratio", ratio)
        for name, ratio in (("acting_pairs", "0.25"), ("papers_pairs", "0"))
    )
    scores = {
        name: run["normalized_score"] for name, run in (("untrained", untrained), ("acting", acting), ("paper", papers))
    }
    assert scores["acting"] > scores["untrained"] + 40 and scores["acting"] > 55, scores
    assert scores["paper"] < 30 and scores["acting"] > scores["paper"] + 40, scores
    last = {}  # the instruments at 2,000 updates
    for name, run in (("acting", acting), ("paper", papers)):
        events = EventAccumulator(str(run["run_dir"]))
        events.Reload()
        for loss in ("q_gap", "action_mse", "acting_bc_loss", "bc_loss"):
            assert [e.step for e in events.Scalars(f"losses/{loss}")] == [1000, 2000]
            assert all(np.isfinite(e.value) for e in events.Scalars(f"losses/{loss}"))
            last[name, loss] = events.Scalars(f"losses/{loss}")[-1].value
    assert last["paper", "acting_bc_loss"] > 20 * last["paper", "bc_loss"], last  # the acting point left the data
    assert last["acting", "acting_bc_loss"] < 3 * last["acting", "bc_loss"], last  # held there


def test_the_issue_19_variants_run_from_the_command_line(minari_path, tmp_path):
    """--acting-ratio, --zero-r-ratio, --interval-conditioning, --adaptive-power, --target-actor and its EMA flags,
    --max-q-backup True through the CLI: recorded in summary.json, finite losses and score, the EMA copy saved with the
    model (moved away from the actor's initial weights); --eval-only builds the model's actor, with its conditioning,
    and samples with --eval-noise-scale."""
    summary = run_ofql(
        tmp_path, "--total-steps", "20", "--acting-ratio", "0.25", "--zero-r-ratio", "0.25", "--interval-conditioning",
        "--adaptive-power", "1", "--adaptive-c", "0.01", "--target-actor", "--ema-decay", "0.9", "--ema-start", "5",
        "--ema-every", "2", "--max-q-backup", "True",
        "--save-model", "--log-freq", "10", "--eval-freq", "20", "--final-eval-episodes", "1",
        "--max-eval-envs", "1",
    )  # fmt: skip
    flags = ("acting_ratio", "zero_r_ratio", "interval_conditioning", "adaptive_power", "adaptive_c", "target_actor")
    flags += ("ema_decay", "ema_start", "ema_every", "max_q_backup")
    assert [summary["args"][flag] for flag in flags] == [0.25, 0.25, True, 1.0, 0.01, True, 0.9, 5, 2, True]
    assert np.isfinite(summary["normalized_score"])  # and the losses finite: a non-finite one ends the run (exit 1)
    model = torch.load(summary["run_dir"] / "model.pt")
    weights = [name for name, _ in ofql.Actor(11, 3, -np.ones(3), np.ones(3)).named_parameters()]  # not the buffers
    assert set(model["actor_target"]) == set(model["actor"]) > set(weights)
    assert all(not torch.equal(model["actor_target"][name], model["actor"][name]) for name in weights)
    evaluation = run_ofql(
        tmp_path, "--eval-only", "--checkpoint", str(summary["run_dir"] / "model.pt"), "--final-eval-episodes", "1",
        "--eval-noise-scale", "1.5",
    )  # fmt: skip
    assert evaluation["args"]["interval_conditioning"] and np.isfinite(evaluation["normalized_score"])
    assert summary["args"]["eval_noise_scale"] == 1.0 and evaluation["args"]["eval_noise_scale"] == 1.5
    paper = run_ofql(tmp_path / "paper", "--paper-variant", "--total-steps", "20", "--save-model", "--log-freq", "10",
                     "--eval-freq", "20", "--final-eval-episodes", "1", "--max-eval-envs", "1")  # fmt: skip
    variant = ("paper_variant", "acting_ratio", "eval_ema", "eta")
    assert [paper["args"][flag] for flag in variant] == [True, 0, False, 0.01]
    assert "actor_target" not in torch.load(paper["run_dir"] / "model.pt") and np.isfinite(paper["normalized_score"])


def small_networks(target_actor: bool, obs_dim: int = 5, action_dim: int = 2) -> tuple[dict, dict]:
    torch.manual_seed(0)
    actor, critic = (
        ofql.Actor(obs_dim, action_dim, -np.ones(action_dim), np.ones(action_dim)),
        ofql.Critic(obs_dim, action_dim),
    )
    networks = {"actor": actor, "critic": critic, "critic_target": copy.deepcopy(critic)}
    if target_actor:
        networks["actor_target"] = copy.deepcopy(actor)
    optimizers = {
        name: torch.optim.Adam(networks[name[: -len("_optimizer")]].parameters())
        for name in ("actor_optimizer", "critic_optimizer")
    }
    return networks, optimizers


def test_target_actor_gives_the_critics_next_actions_and_follows_dqls_ema():
    """--target-actor (H2 of issue 19): the critic's target takes its next actions from the EMA copy (a copy equal to
    the actor: the same update as without one; another copy: another critic loss, the same BC loss; with --eval-ema
    alone the copy does not train anything), and the copy moves as dql.py's EMA from ema_start (every ema_every updates,
    by 1 - ema_decay) and is the actor before it."""
    args = ofql.Args(eta=1.0, max_q_backup=False, grad_norm=0.0, target_actor=True, ema_start=4, ema_every=2)
    args = replace(args, acting_ratio=0.0, eval_ema=False)
    batch = (torch.randn(32, 5), torch.rand(32, 2) * 2 - 1, torch.randn(32, 1), torch.randn(32, 5), torch.zeros(32, 1))
    losses = {}
    for name, case_args, perturb in (
        ("without", replace(args, target_actor=False), None),
        ("copy", args, 0.0),
        ("other", args, 0.5),
        ("other for evaluation", replace(args, target_actor=False, eval_ema=True), 0.5),
    ):
        networks, optimizers = small_networks(perturb is not None)
        if perturb:
            with torch.no_grad():
                for p in networks["actor_target"].parameters():
                    p.add_(perturb * torch.randn_like(p))
        torch.manual_seed(1)
        losses[name] = ofql.update(networks, optimizers, case_args, *batch, swap=False)
    values = {name: {k: v.item() for k, v in case.items()} for name, case in losses.items()}
    assert values["copy"] == values["without"] == values["other for evaluation"]
    assert losses["other"]["critic_loss"] != losses["without"]["critic_loss"]
    assert losses["other"]["bc_loss"] == losses["without"]["bc_loss"]

    networks, _ = small_networks(True)
    actor, actor_target = networks["actor"], networks["actor_target"]
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(1.0)
    before = [p.clone() for p in actor_target.parameters()]
    ofql.update_actor_target(actor_target, actor, 5, args)  # off the ema_every grid
    assert all(torch.equal(p, q) for p, q in zip(actor_target.parameters(), before, strict=True))
    ofql.update_actor_target(actor_target, actor, 6, args)
    for p, q, a in zip(actor_target.parameters(), before, actor.parameters(), strict=True):
        torch.testing.assert_close(p, args.ema_decay * q + (1 - args.ema_decay) * a)
    ofql.update_actor_target(actor_target, actor, 3, args)  # before ema_start (4): the actor's weights
    assert all(torch.equal(p, a) for p, a in zip(actor_target.parameters(), actor.parameters(), strict=True))
    ofql.update_actor_target(None, actor, 6, args)  # no target actor: nothing to do
