"""Tests of ofql.py: names and task rows, the MeanFlow target and loss, one-step sampling, the EMA, an end-to-end run
and the learning test. What ofql.py shares with dql.py and fql.py (data, checks, signals, resume): test_robustness.py
and test_faults.py."""

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import HOPPER_DATASET_ID, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ofql


def test_d4rl_names_map_to_minari_ids_and_unknown_ones_say_what_to_try():
    assert ofql.resolve_dataset_id("hopper-medium-v2") == "mujoco/hopper/medium-v0"
    assert ofql.resolve_dataset_id("walker2d-expert-v2") == "mujoco/walker2d/expert-v0"
    assert ofql.resolve_dataset_id("walker2d-medium-expert-v2") == "mujoco/walker2d/medium-expert-v0"
    assert ofql.resolve_dataset_id("antmaze-umaze-diverse-v2") == "D4RL/antmaze/umaze-diverse-v1"
    assert ofql.resolve_dataset_id("kitchen-partial-v0") == "D4RL/kitchen/partial-v2"
    assert ofql.resolve_dataset_id("pen-human-v1") == "D4RL/pen/human-v2"
    assert ofql.resolve_dataset_id("sac/hopper/medium-replay-v0") == "sac/hopper/medium-replay-v0"  # Minari id as given
    with pytest.raises(ValueError, match=r"^unknown --env-id hoper-medium-v2; try hopper-medium or .* or a Minari id$"):
        ofql.resolve_dataset_id("hoper-medium-v2")
    url = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium_replay-v2.hdf5"
    with pytest.raises(ValueError) as error:
        ofql.resolve_dataset_id("hopper-medium-replay-v2")
    assert (
        str(error.value)
        == f"unknown --env-id hopper-medium-replay-v2; try --dataset-path {url.rsplit('/', 1)[1]} from {url} or a Minari id"
    )


def test_task_table_fills_defaults_and_command_line_wins():
    args, line = ofql.task_defaults(ofql.Args(env_id="sac/hopper/medium-replay-v0"))
    assert (args.grad_norm, args.max_q_backup, args.reward_tune, args.total_steps) == (4.0, False, "none", 2_000_000)
    assert line.startswith("task row hopper-medium-replay: lr 0.0003, eta 2.0,") and "not the defaults" not in line
    args, line = ofql.task_defaults(ofql.Args(env_id="antmaze-medium-play-v2", eta=0.3, max_q_backup=True))
    assert (args.eta, args.max_q_backup, args.lr, args.reward_tune) == (0.3, True, 1e-3, "cql")
    assert line.endswith("(not the defaults: eta)")  # max_q_backup True is the row's


def test_our_variant_is_the_default_and_the_papers_is_one_flag_away():
    """Ours: acting pairs, the EMA's actions, the row's eta (2.0 on locomotion); --paper-variant, and the default on an
    expert's data: none of them and eta from the paper's grid (0.01 on locomotion, the row's where that is in the
    grid); a flag still wins."""
    ours, line = ofql.task_defaults(ofql.Args(env_id="sac/hopper/medium-replay-v0"))
    assert (ours.acting_ratio, ours.eval_ema, ours.eta) == (0.25, True, 2.0)
    assert line.endswith("acting_ratio 0.25, eval_ema True") and "paper" not in line
    paper, line = ofql.task_defaults(ofql.Args(env_id="sac/hopper/medium-replay-v0", paper_variant=True))
    assert (paper.acting_ratio, paper.eval_ema, paper.eta) == (0.0, False, 0.01)
    assert line.startswith("task row hopper-medium-replay: lr 0.0003, eta 0.01,") and "paper" not in line
    assert line.endswith("acting_ratio 0.0, eval_ema False")
    assert ofql.row_defaults(paper, "hopper-medium-replay") == ofql.row_defaults(ours, "hopper-medium-replay") | {
        "acting_ratio": 0.0, "eval_ema": False, "eta": 0.01,
    }  # fmt: skip
    assert replace(paper, paper_variant=False, eval_ema=None, acting_ratio=None, eta=None) == replace(
        ofql.Args(env_id="sac/hopper/medium-replay-v0"), lr=paper.lr, max_q_backup=paper.max_q_backup,
        reward_tune=paper.reward_tune, total_steps=paper.total_steps, grad_norm=paper.grad_norm,
    )  # fmt: skip
    expert = ofql.task_defaults(ofql.Args(env_id="sac/hopper/expert-v0"))[0]  # an expert's data: the paper's
    assert (expert.acting_ratio, expert.eval_ema, expert.eta) == (0.0, False, 0.01)
    medium_expert = ofql.task_defaults(ofql.Args(env_id="hopper-medium-expert-v2"))[0]  # ours
    assert (medium_expert.acting_ratio, medium_expert.eval_ema, medium_expert.eta) == (0.25, True, 2.0)
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


def float64_batch(n: int = 8, obs_dim: int = 5, action_dim: int = 3) -> tuple:
    torch.manual_seed(0)
    actor = ofql.Actor(obs_dim, action_dim, -np.ones(action_dim), np.ones(action_dim)).double()
    a_t, v = torch.randn(n, action_dim, dtype=torch.float64), torch.randn(n, action_dim, dtype=torch.float64)
    return actor, a_t, v, torch.randn(n, obs_dim, dtype=torch.float64)


def test_actor_jvp_matches_finite_differences_and_torch_func():
    """actor.jvp: u as actor() gives it, with gradient, and du/dt = v . d_a u + d_t u (Eq. 16) without, against a
    central difference in float64 and against torch.func.jvp (forward AD, which the hand-written pass replaces)."""
    actor, a_t, v, obs = float64_batch()
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
    actor, _, noise, obs = float64_batch(16)
    actions = torch.rand(16, 3, dtype=torch.float64)
    t, r = (x.double() for x in ofql.sample_time_pairs(16, 0.5, 0.25, obs.device))
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


def test_time_pairs_are_ordered_with_flow_pairs_first_and_acting_pairs_last():
    """r <= t from the logit-normal; r = t on the first flow_ratio of the batch, (r, t) = (0, 1) on the last
    acting_ratio; with acting_ratio 0, the paper's pairs."""
    cpu = torch.device("cpu")
    t, r = ofql.sample_time_pairs(1000, 0.5, 0.0, cpu)
    assert t.shape == r.shape == (1000,)
    assert ((0 < r) & (r <= t) & (t < 1)).all()
    assert (r == t).sum().item() == 500 + (r[500:] == t[500:]).sum().item()
    t, r = ofql.sample_time_pairs(1000, 0.5, 0.25, cpu)
    assert (t[750:] == 1).all() and (r[750:] == 0).all()
    assert (r[:500] == t[:500]).all() and ((0 < r[:750]) & (r[:750] <= t[:750]) & (t[:750] < 1)).all()
    assert (r[500:750] < t[500:750]).all()
    logit = torch.logit(torch.cat(ofql.sample_time_pairs(100_000, 0.0, 0.0, cpu)).double())  # t, r: the ordered draws
    assert abs(logit.mean().item() - ofql.TIME_MU) < 0.02 and abs(logit.std().item() - ofql.TIME_SIGMA) < 0.02


def test_one_step_actions_are_bounded_and_differentiable_and_the_pick_is_by_q():
    actor = ofql.Actor(4, 2, np.array([-1.0, -0.5]), np.array([1.0, 0.5]))
    assert torch.equal(actor.low, torch.tensor([-1.0, -0.5])) and torch.equal(actor.high, torch.tensor([1.0, 0.5]))
    actor.final_layer.bias.data.fill_(-3.0)  # push raw samples past the bounds
    obs = torch.randn(64, 4)
    torch.manual_seed(0)
    actions = ofql.sample_actions(actor, obs)
    assert actions.shape == (64, 2)
    assert (actions[:, 0].abs() <= 1).all() and (actions[:, 1].abs() <= 0.5).all()
    torch.manual_seed(0)  # a = eps - u(eps, 0, 1; s) (Eq. 18), clipped
    noise, zeros = torch.randn(64, 2), torch.zeros(64)
    torch.testing.assert_close(actions, (noise - actor(noise, zeros, zeros + 1, obs)).clamp(actor.low, actor.high))

    critic = ofql.Critic(4, 2)
    assert ofql.select_actions(actor, critic, torch.randn(7, 4), num_candidates=5).shape == (7, 2)

    class FirstDimensionCritic(torch.nn.Module):  # Q = 1e6 a_0: the softmax over Q picks the highest first dimension
        def q_min(self, obs, action):
            return 1e6 * action[:, :1]

    actor.final_layer.bias.data.zero_()
    torch.manual_seed(1)
    picked = ofql.select_actions(actor, FirstDimensionCritic(), obs[:1], num_candidates=50)
    torch.manual_seed(1)
    candidates = ofql.sample_actions(actor, obs[:1].expand(50, 4))
    assert picked[0, 0] == candidates[:, 0].max()

    actor.zero_grad()
    critic(torch.randn(64, 4), ofql.sample_actions(actor, torch.randn(64, 4)))[0].sum().backward()
    assert actor.final_layer.weight.grad.abs().sum() > 0


def test_update_ema_follows_dqls_schedule():
    """networks["actor_ema"] is the actor before ema_start, then moves by 1 - ema_decay every ema_every updates; no EMA
    (--eval-ema False): nothing to do."""
    args = ofql.Args(ema_start=4, ema_every=2, ema_decay=0.9)
    torch.manual_seed(0)
    actor = ofql.Actor(5, 2, -np.ones(2), np.ones(2))
    ema = copy.deepcopy(actor)
    networks = {"actor": actor, "actor_ema": ema}
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    ofql.update_ema(networks, 5, args)  # off the ema_every grid
    assert all(torch.equal(p, q) for p, q in zip(ema.parameters(), before, strict=True))
    ofql.update_ema(networks, 6, args)
    for p, q, a in zip(ema.parameters(), before, actor.parameters(), strict=True):
        torch.testing.assert_close(p, 0.9 * q + 0.1 * a)
    ofql.update_ema(networks, 3, args)  # before ema_start: the actor's weights
    assert all(torch.equal(p, a) for p, a in zip(ema.parameters(), actor.parameters(), strict=True))
    ofql.update_ema({"actor": actor}, 6, args)


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
            t, r = ofql.sample_time_pairs(256, flow_ratio, 0.0, torch.device("cpu"))
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
    "eval_episodes train_seconds updates_per_second hours_per_million_updates decision_hz device threads"
).split()


def run_ofql(cwd, *flags: str) -> dict:
    """An ofql.py run in cwd (on the Hopper test data unless flags name an --env-id, a --checkpoint or --resume):
    its summary, stdout and run folder."""
    if not {"--env-id", "--eval-only", "--resume"} & set(flags):
        flags = ("--env-id", HOPPER_DATASET_ID, *flags)
    run = run_script("ofql", cwd, "--no-cuda", *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    (summary_path,) = sorted(cwd.glob("runs/*/summary.json"), key=lambda p: p.stat().st_mtime)[-1:]
    return json.loads(summary_path.read_text()) | {"stdout": run.stdout, "run_dir": summary_path.parent}


def test_end_to_end_run_writes_summary_and_model(minari_path, tmp_path):
    flags = "--total-steps 100 --eval-freq 50 --eval-episodes 2 --final-eval-episodes 2 --log-freq 50 --ema-start 50 --save-model"
    summary = run_ofql(tmp_path, *flags.split(), "--max-q-backup", "True")
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert (
        summary["algorithm"] == "ofql" and summary["dataset_id"] == HOPPER_DATASET_ID and summary["total_steps"] == 100
    )
    assert summary["eval_episodes"] == 2 and summary["device"] == "cpu" and summary["threads"] == 1  # the default
    assert [summary["args"][flag] for flag in ("acting_ratio", "eval_ema", "eta", "max_q_backup")] == [
        0.25,
        True,
        2.0,
        True,
    ]
    episodes = np.array(summary["episode_normalized_scores"])  # each final episode's score, their mean the score
    assert len(episodes) == 2 and episodes.mean() == pytest.approx(summary["normalized_score"])
    assert episodes.std() == pytest.approx(summary["normalized_score_std"])
    assert [step for step, _ in summary["evaluations"]] == [50, 100]
    assert (
        summary["normalized_score"] == summary["evaluations"][-1][1]
        and summary["best_normalized_score"] >= summary["normalized_score"]
    )
    ref_min, ref_max = ofql.D4RL_REF_SCORES["hopper"]
    assert summary["normalized_score"] == pytest.approx(100 * (summary["return_mean"] - ref_min) / (ref_max - ref_min))
    assert summary["train_seconds"] > 0 and summary["updates_per_second"] > 0 and summary["decision_hz"] > 0
    assert summary["hours_per_million_updates"] == pytest.approx(1e6 / summary["updates_per_second"] / 3600)
    assert "update 100/100" in summary["stdout"] and "updates/s" in summary["stdout"]
    assert list(summary["run_dir"].glob("events.out.tfevents.*"))  # tensorboard log
    model = torch.load(summary["run_dir"] / "model.pt")
    assert set(model) == {"actor", "actor_ema", "critic", "critic_target", "args", "script"}
    weights = [name for name, _ in ofql.Actor(11, 3, -np.ones(3), np.ones(3)).named_parameters()]  # not the buffers
    assert all(
        not torch.equal(model["actor_ema"][name], model["actor"][name]) for name in weights
    )  # an EMA, not a copy

    # the saved networks evaluate alone (--env-id not needed), with plain one-step sampling
    evaluation = run_ofql(tmp_path, "--eval-only", str(summary["run_dir"] / "model.pt"),
                          "--final-eval-episodes", "3", "--num-candidates", "1")  # fmt: skip
    assert evaluation["total_steps"] == 0 and evaluation["eval_episodes"] == 3 and evaluation["num_candidates"] == 1
    # no --env-id: the model's dataset, and its run's flags but those given
    assert (evaluation["dataset_id"], evaluation["args"]["eval_freq"], evaluation["args"]["max_q_backup"]) == (
        HOPPER_DATASET_ID, 50, True
    )  # fmt: skip
    assert np.isfinite(evaluation["normalized_score"]) and evaluation["decision_hz"] > 0
    assert "training" not in evaluation["stdout"] and "updates/s" not in evaluation["stdout"]  # it did not train


@pytest.mark.parametrize("pairs", ["acting", "papers"])
def test_ofql_learns_at_a_q_weight_where_the_papers_pairs_collapse(pairs, pendulum_dataset, tmp_path):
    """The learning test (real data, real training, about a minute and a half on one CPU thread; the halves run on both
    workers): one noisy controller's Pendulum data (narrow, as HalfCheetah medium's; the data scores about 67), eta
    10. With acting pairs, 2,000 updates of 128 pairs score up at the data, 60 points above the same seed's untrained
    networks (0.0: docs/ofql.md); with the paper's pairs (--acting-ratio 0) the same run collapses to about random,
    40 points below the acting pairs' floor, the MeanFlow loss at the acting pair far above the batch's (as on
    HalfCheetah at eta 0.3), where acting pairs hold it near the batch's. All evaluated alike (20 episodes, 50
    candidates, the Q pick, the trained weights)."""
    evaluation = ("--env-id", pendulum_dataset, "--final-eval-episodes", "20", "--eval-ema", "False")
    training = (*evaluation, "--total-steps", "2000", "--batch-size", "128", "--eta", "10", "--eval-freq", "2000")
    ratio = {"acting": "0.25", "papers": "0"}[pairs]
    trained = run_ofql(tmp_path / "trained", *training, "--log-freq", "1000", "--acting-ratio", ratio)
    events = EventAccumulator(str(trained["run_dir"]))
    events.Reload()
    last = {}  # the instruments at 2,000 updates
    for loss in ("q_gap", "action_mse", "acting_bc_loss", "bc_loss"):
        assert [e.step for e in events.Scalars(f"losses/{loss}")] == [1000, 2000]
        assert all(np.isfinite(e.value) for e in events.Scalars(f"losses/{loss}"))
        last[loss] = events.Scalars(f"losses/{loss}")[-1].value
    score = trained["normalized_score"]
    if pairs == "acting":
        assert score > 60, score
        assert last["acting_bc_loss"] < 3 * last["bc_loss"], last  # held at the data
    else:
        assert score < 20, score
        assert last["acting_bc_loss"] > 20 * last["bc_loss"], last  # the acting point left the data
