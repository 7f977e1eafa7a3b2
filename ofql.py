"""One-Step Flow Q-Learning (OFQL): offline RL with a one-step MeanFlow policy. Docs: docs/ofql.md

Paper: "Revisiting Diffusion Q-Learning: From Iterative Denoising to One-Step Action Generation".
OFQL is Diffusion Q-Learning with its T-step DDPM replaced by an average-velocity (MeanFlow) policy
u(a_t, r, t; s) that acts in ONE network call, a = eps - u(eps, 0, 1; s) (Eq. 18). Behaviour cloning
regresses u onto the MeanFlow target (Eq. 16-17), from one Jacobian-vector product; the Q term
backpropagates through that one call (no BPTT); the critic's next actions come from the current policy
(no target actor).

Usage:
    python ofql.py --env-id hopper-medium-v2    # a D4RL name, mapped to a Minari dataset
    python ofql.py --env-id hopper-medium-v2 --paper-variant    # the paper's exact OFQL (below)
    MINARI_DATASETS_PATH=/path/to/datasets python ofql.py --env-id sac/hopper/medium-replay-v0
    python ofql.py --env-id hopper-medium-replay-v2 --dataset-path hopper_medium_replay-v2.hdf5
    python ofql.py --resume runs/{run_name}     # continue an interrupted run (Ctrl-C checkpoints)
    python ofql.py --help                       # every flag

Choices the paper leaves open (docs/ofql.md): eta per task (ours, see TASKS); raw t, r in [0, 1] go into
the time embeddings, as in MeanFlow; the BC loss averages over action dimensions, as DQL's does. Our defaults
depart from the paper where it made OFQL's Q term work (issue 19): a quarter of each batch's BC pairs at the acting
pair (r, t) = (0, 1), evaluation with an EMA of the actor's weights, and eta 2.0 on locomotion; --paper-variant
trains and acts as the paper does.
"""

import copy
import difflib
import json
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Literal

import gymnasium as gym
import h5py
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled by default"""
    threads: int = 0
    """torch CPU threads (0: torch's default); 1 is steadiest on a busy small machine"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "ofql"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """whether to save the trained networks into `runs/{run_name}/model.pt`"""
    eval_only: bool = False
    """skip training: evaluate the networks in --checkpoint"""
    checkpoint: str | None = None
    """a `model.pt` written by --save-model (or a `checkpoint.pt`), for --eval-only"""
    checkpoint_freq: int = 0
    """also write `runs/{run_name}/checkpoint.pt` every this many updates (0: at evaluations, the end and a stop)"""
    resume: str | None = None
    """a run folder to continue from its checkpoint.pt, with the run's own flags (those given here win)"""
    compile: bool = False
    """torch.compile the update and the policy call"""
    cudagraphs: bool = False
    """replay the update and the policy call from CUDA graphs (tensordict's CudaGraphModule; GPU only)"""

    # Data and evaluation
    env_id: str = "hopper-medium-v2"
    """a D4RL name (hopper-medium-v2) or a Minari dataset id (mujoco/hopper/medium-v0)"""
    dataset_path: str | None = None
    """a D4RL hdf5 file to train on instead of Minari's data; --env-id names its task"""
    total_steps: int | None = None
    """number of gradient updates (None: the task's row in TASKS)"""
    batch_size: int = 256
    """the batch size of each update"""
    eval_freq: int = 50_000
    """evaluate every this many updates"""
    eval_episodes: int = 10
    """episodes of each periodic evaluation"""
    final_eval_episodes: int = 150
    """episodes of the final evaluation (the paper: 50 envs x 3 episodes)"""
    num_candidates: int = 50
    """candidate actions per state at evaluation, one picked by softmax over min-Q (1: plain sampling)"""
    eval_noise_scale: float = 1.0
    """the evaluation's one-step noise eps ~ N(0, scale^2 I) (1: the paper's Eq. 18; training always draws N(0, I))"""
    max_eval_envs: int = 50
    """at most this many evaluation envs step together"""
    log_freq: int = 1000
    """log the losses and a progress line every this many updates"""

    # Algorithm specific arguments (None: the task's row in TASKS)
    paper_variant: bool = False
    """the paper's exact OFQL where our defaults depart from it: its BC pairs alone (acting ratio 0), one-step actions
    from the trained weights (no EMA), and eta from its grid (PAPER_ETAS); flags left at None take these"""
    lr: float | None = None
    """learning rate of the actor (None: the task's row in TASKS)"""
    eta: float | None = None
    """weight of the normalized Q term in the actor loss, Eq. 19 (None: the task's row in TASKS)"""
    max_q_backup: bool | None = None
    """critic target: max over 10 next actions per critic, then min over critics (None: the task's row)"""
    reward_tune: Literal["none", "cql", "normalize"] | None = None
    """reward shaping: cql (r - 0.5) * 4, normalize (r - mean) / std (None: the task's row in TASKS)"""
    grad_norm: float | None = None
    """clip the gradient norms of actor and critic, 0: no clipping (None: the task's row in TASKS)"""
    critic_lr: float = 3e-4
    """learning rate of the critic"""
    gamma: float = 0.99
    """the discount factor"""
    tau: float = 0.005
    """target critic smoothing coefficient"""
    flow_ratio: float = 0.5
    """fraction of each batch with r = t (plain flow matching pairs)"""
    acting_ratio: float | None = None
    """fraction of each batch (its end, before flow_ratio's) at (r, t) = (0, 1), where one-step sampling acts (Eq. 18)
    (None: 0.25, ours; 0, the paper's, with --paper-variant)"""
    zero_r_ratio: float = 0.0
    """fraction of each batch (before acting_ratio's) with r = 0 and t from the sampler: intervals that end at the data,
    as one-step sampling's does; 0: the paper's"""
    interval_conditioning: bool = False
    """the second time embedding takes the interval t - r (MeanFlow's official code), not r; off: the paper's (t, r)"""
    adaptive_power: float = 0.0
    """MeanFlow's adaptive loss weighting: each pair's BC error weighted by the stopped 1 / (error + c)^p (MeanFlow's
    p: 1); 0: plain MSE, the paper's"""
    adaptive_c: float = 1e-3
    """the constant c of --adaptive-power's weights"""
    target_actor: bool = False
    """the critic's next actions from an EMA copy of the actor (dql.py's, --ema-*), not the current policy; off: the
    paper's (no target policy)"""
    eval_ema: bool | None = None
    """evaluation acts with that EMA copy of the actor (--ema-*), as MeanFlow samples with EMA weights, not the
    trained weights (None: True, ours; False, the paper's, with --paper-variant; --eval-only: as the model's run did)"""
    ema_decay: float = 0.995
    """--target-actor, --eval-ema: the EMA's decay"""
    ema_start: int = 1000
    """--target-actor, --eval-ema: the EMA starts at this update (the copy is the actor until then)"""
    ema_every: int = 5
    """--target-actor, --eval-ema: the EMA updates every this many updates"""
    time_mu: float = -0.4
    """mean of the logit-normal that t and r are drawn from"""
    time_sigma: float = 1.0
    """std of the logit-normal that t and r are drawn from"""


# The valid values of every numeric flag, checked before anything runs: "[" and "]" include the bound, "(" and ")" not;
# a bound may be another flag.
RANGES = {
    **{flag: "[0, 4294967295]" for flag in ("seed",)},
    **{flag: "[0, inf)" for flag in ("threads", "checkpoint_freq", "total_steps", "eta", "grad_norm", "ema_start")},
    **{flag: "[1, inf)" for flag in ("batch_size", "eval_freq", "eval_episodes", "final_eval_episodes", "log_freq")},
    **{flag: "[1, inf)" for flag in ("num_candidates", "max_eval_envs", "ema_every")},
    **{flag: "(0, inf)" for flag in ("lr", "critic_lr", "time_sigma")},
    **{"gamma": "[0, 1]", "tau": "(0, 1]", "flow_ratio": "[0, 1]", "acting_ratio": "[0, 1]", "zero_r_ratio": "[0, 1]"},
    **{"adaptive_power": "[0, inf)", "adaptive_c": "(0, inf)", "ema_decay": "[0, 1]", "eval_noise_scale": "[0, inf)"},
    **{"time_mu": "(-inf, inf)"},
}

# Per-task defaults, the fields of TASK_FIELDS in order. lr, max-Q backup, reward shaping, updates (epochs x 1000)
# and gradient norms are DQL's; eta is OURS (the paper does not publish OFQL's): 2.0 on locomotion, the best measured
# with acting pairs and the EMA's actions: at 100k updates far above DQL on a Hopper dataset, within 1.5 points of it
# on a HalfCheetah one (docs/ofql.md, issue 19); the paper's grid elsewhere (more Q on AntMaze, more BC on Kitchen).
TASK_FIELDS = ("lr", "eta", "max_q_backup", "reward_tune", "total_steps", "grad_norm")
TASKS = {
    "halfcheetah-medium": (3e-4, 2.0, False, "none", 2_000_000, 9.0),
    "hopper-medium": (3e-4, 2.0, False, "none", 2_000_000, 9.0),
    "walker2d-medium": (3e-4, 2.0, False, "none", 2_000_000, 1.0),
    "halfcheetah-medium-replay": (3e-4, 2.0, False, "none", 2_000_000, 2.0),
    "hopper-medium-replay": (3e-4, 2.0, False, "none", 2_000_000, 4.0),
    "walker2d-medium-replay": (3e-4, 2.0, False, "none", 2_000_000, 4.0),
    "halfcheetah-medium-expert": (3e-4, 2.0, False, "none", 2_000_000, 7.0),
    "hopper-medium-expert": (3e-4, 2.0, False, "none", 2_000_000, 5.0),
    "walker2d-medium-expert": (3e-4, 2.0, False, "none", 2_000_000, 5.0),
    "antmaze-umaze": (3e-4, 0.5, False, "cql", 1_000_000, 2.0),
    "antmaze-umaze-diverse": (3e-4, 0.5, True, "cql", 1_000_000, 3.0),
    "antmaze-medium-play": (1e-3, 0.5, True, "cql", 1_000_000, 2.0),
    "antmaze-medium-diverse": (3e-4, 0.5, True, "cql", 1_000_000, 1.0),
    "antmaze-large-play": (3e-4, 0.5, True, "cql", 1_000_000, 10.0),
    "antmaze-large-diverse": (3e-4, 0.5, True, "cql", 1_000_000, 7.0),
    "kitchen-complete": (3e-4, 0.001, False, "none", 250_000, 9.0),
    "kitchen-partial": (3e-4, 0.001, False, "none", 1_000_000, 10.0),
    "kitchen-mixed": (3e-4, 0.001, False, "none", 1_000_000, 10.0),
    "pen-human": (3e-5, 0.1, False, "normalize", 1_000_000, 7.0),
    "pen-cloned": (3e-5, 0.1, False, "normalize", 1_000_000, 8.0),
}


# ALGO LOGIC: networks, one-step sampling, the MeanFlow loss, the update, action selection
class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.arange(half) * -(np.log(10000) / (half - 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        x = x[:, None] * self.freqs[None, :]
        return torch.cat((x.sin(), x.cos()), dim=-1)


def time_mlp(t_dim: int = 16) -> nn.Sequential:
    return nn.Sequential(SinusoidalPosEmb(t_dim), nn.Linear(t_dim, t_dim * 2), Mish(), nn.Linear(t_dim * 2, t_dim))


class Actor(nn.Module):
    """Average velocity u(a_t, r, t; s): DQL's MLP with a second time embedding, for r (interval: for t - r)."""

    def __init__(self, obs_dim, action_dim, action_low, action_high, interval=False, hidden_dim=256, t_dim=16):
        super().__init__()
        self.interval = interval
        self.t_mlp = time_mlp(t_dim)
        self.r_mlp = time_mlp(t_dim)
        self.mid_layer = nn.Sequential(
            nn.Linear(action_dim + 2 * t_dim + obs_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
        )  # fmt: skip
        self.final_layer = nn.Linear(hidden_dim, action_dim)
        self.register_buffer("action_low", torch.as_tensor(action_low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(action_high, dtype=torch.float32))

    def forward(self, a_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        x = torch.cat([a_t, self.t_mlp(t), self.r_mlp(t - r if self.interval else r), obs], dim=-1)
        return self.final_layer(self.mid_layer(x))

    def jvp(self, a_t, r, t, obs, v) -> tuple[torch.Tensor, torch.Tensor]:
        """u(a_t, r, t; s) and du/dt = v . d_a u + d_t u, the derivative along the tangent (v, 0, 1) (Eq. 16): what
        torch.func.jvp(self, (a_t, r, t, obs), (v, 0, 1, 0)) gives, from one pass with u's gradient kept."""
        t_emb, t_emb_dot = forward_and_tangent(self.t_mlp, t, torch.ones_like(t))
        if self.interval:  # d(t - r)/dt = 1
            r_emb, r_emb_dot = forward_and_tangent(self.r_mlp, t - r, torch.ones_like(t))
        else:
            r_emb = self.r_mlp(r)
            r_emb_dot = torch.zeros_like(r_emb)
        x = torch.cat([a_t, t_emb, r_emb, obs], dim=-1)
        x_dot = torch.cat([v, t_emb_dot, r_emb_dot, torch.zeros_like(obs)], dim=-1)
        return forward_and_tangent([*self.mid_layer, self.final_layer], x, x_dot)


class Critic(nn.Module):
    """Twin Q networks, as in DQL."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int = 256):
        super().__init__()

        def q_net() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(obs_dim + action_dim, hidden_dim), Mish(),
                nn.Linear(hidden_dim, hidden_dim), Mish(),
                nn.Linear(hidden_dim, hidden_dim), Mish(),
                nn.Linear(hidden_dim, 1),
            )  # fmt: skip

        self.q1_model, self.q2_model = q_net(), q_net()

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, action], dim=-1)
        return self.q1_model(x), self.q2_model(x)

    def q_min(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.min(*self(obs, action))


def sample_actions(actor: Actor, obs: torch.Tensor, noise_scale: float = 1.0) -> torch.Tensor:
    """One-step action a = eps - u(eps, r=0, t=1; s) (Eq. 18), clipped to the action bounds; differentiable."""
    noise = noise_scale * torch.randn(obs.shape[0], actor.action_low.shape[0], device=obs.device)
    zeros, ones = torch.zeros(obs.shape[0], device=obs.device), torch.ones(obs.shape[0], device=obs.device)
    return (noise - actor(noise, zeros, ones, obs)).clamp(actor.action_low, actor.action_high)


def sample_time_pairs(
    batch_size: int, flow_ratio: float, mu: float, sigma: float, device, acting_ratio=0.0, zero_r_ratio=0.0
):
    """(t, r) from a logit-normal, ordered so that r <= t; r = t for the first `flow_ratio` of the batch, (r, t) =
    (0, 1), the pair one-step actions are drawn with (Eq. 18), for the last `acting_ratio`, and r = 0 for the
    `zero_r_ratio` before them (the later shares win)."""
    t, r = torch.sigmoid(torch.randn(2, batch_size, device=device) * sigma + mu).sort(dim=0, descending=True).values
    index = torch.arange(batch_size, device=device)
    equal, acting = index < round(flow_ratio * batch_size), index >= batch_size - round(acting_ratio * batch_size)
    zero_r = index >= batch_size - round((acting_ratio + zero_r_ratio) * batch_size)
    return torch.where(acting, 1.0, t), torch.where(zero_r, 0.0, torch.where(equal, t, r))


def mean_flow_loss(actor: Actor, obs, actions, t, r, noise, power: float = 0.0, c: float = 1e-3) -> torch.Tensor:
    """MeanFlow behaviour cloning (Eq. 17) on the path a_t = (1 - t) a + t eps with velocity v = eps - a:
    u regressed onto u_tgt = v - (t - r) du/dt (Eq. 16), with no gradient through the target. power > 0: MeanFlow's
    adaptive weighting, each pair's error (mean over action dimensions) weighted by the stopped 1 / (error + c)^power.
    """
    a_t = (1 - t[:, None]) * actions + t[:, None] * noise
    v = noise - actions
    u, du_dt = actor.jvp(a_t, r, t, obs, v)
    error = (u - (v - (t - r)[:, None] * du_dt)).pow(2).mean(dim=-1)  # (B,)
    return (error / (error.detach() + c) ** power).mean()


def gradient_step(optimizer: torch.optim.Optimizer, module: nn.Module, loss: torch.Tensor, grad_norm: float):
    """Backward into the module's own parameters only, clip their norm (grad_norm 0: no clipping), step."""
    optimizer.zero_grad()
    loss.backward(inputs=list(module.parameters()))
    if grad_norm > 0:
        nn.utils.clip_grad_norm_(module.parameters(), max_norm=grad_norm)
    optimizer.step()


def actor_losses(actor: Actor, critic: Critic, args: Args, obs, actions, swap: bool):
    """The actor's two losses: MeanFlow BC (Eq. 17) at sampled (t, r), and -Q / |Q| (Eq. 19), the Q term through ONE
    network call."""
    t, r = sample_time_pairs(
        len(obs), args.flow_ratio, args.time_mu, args.time_sigma, obs.device, args.acting_ratio, args.zero_r_ratio
    )
    bc_loss = mean_flow_loss(actor, obs, actions, t, r, torch.randn_like(actions), args.adaptive_power, args.adaptive_c)
    q1, q2 = critic(obs, sample_actions(actor, obs))
    q, q_scale = (q2, q1) if swap else (q1, q2)  # a random critic for Q, the other for its scale
    return bc_loss, -q.mean() / q_scale.abs().mean().detach()


def update(networks: dict, optimizers: dict, args: Args, obs, actions, rewards, next_obs, terminals, swap: bool):
    """One update of critic, actor and target critic: tensors in, detached tensors out, no host synchronisation."""
    actor, critic, critic_target = networks["actor"], networks["critic"], networks["critic_target"]
    actor_target = networks["actor_target"] if args.target_actor else actor
    # critic: clipped double-Q target with next actions in one step from the CURRENT policy (the paper: no target
    # actor), or with --target-actor from the EMA target actor
    with torch.no_grad():
        if args.max_q_backup:  # 10 next actions per s': max per critic, then min over critics
            next_obs_rep = next_obs.repeat_interleave(10, dim=0)
            next_q1, next_q2 = critic_target(next_obs_rep, sample_actions(actor_target, next_obs_rep))
            next_q = torch.min(next_q1.view(-1, 10).amax(1, keepdim=True), next_q2.view(-1, 10).amax(1, keepdim=True))
        else:
            next_q = critic_target.q_min(next_obs, sample_actions(actor_target, next_obs))
        target_q = rewards + (1 - terminals) * args.gamma * next_q
    current_q1, current_q2 = critic(obs, actions)
    critic_loss = F.mse_loss(current_q1, target_q) + F.mse_loss(current_q2, target_q)
    gradient_step(optimizers["critic_optimizer"], critic, critic_loss, args.grad_norm)

    # actor: MeanFlow BC (Eq. 17) - eta * Q / |Q| (Eq. 19)
    bc_loss, q_loss = actor_losses(actor, critic, args, obs, actions, swap)
    actor_loss = bc_loss + args.eta * q_loss
    gradient_step(optimizers["actor_optimizer"], actor, actor_loss, args.grad_norm)  # no weight gradients of the critic

    # target critic: Polyak averaging, fused
    with torch.no_grad():
        torch._foreach_lerp_(list(critic_target.parameters()), list(critic.parameters()), args.tau)
    losses = dict(
        critic_loss=critic_loss, bc_loss=bc_loss, q_loss=q_loss, actor_loss=actor_loss, q_mean=current_q1.mean()
    )
    return {name: loss.detach() for name, loss in losses.items()}


def update_actor_target(actor_target: Actor | None, actor: Actor, step: int, args: Args):
    """--target-actor, --eval-ema: the EMA copy of the actor, dql.py's from `ema_start` (by 1 - ema_decay every
    `ema_every` updates); before it the copy is the actor (dql.py's keeps its initial weights), so that a short run
    does not act with untrained weights. Outside `update`: the condition is on the host's step."""
    if actor_target is not None and (step < args.ema_start or step % args.ema_every == 0):
        weight = 1.0 if step < args.ema_start else 1 - args.ema_decay  # lerp by 1: the actor's weights exactly
        with torch.no_grad():
            torch._foreach_lerp_(list(actor_target.parameters()), list(actor.parameters()), weight)


@torch.no_grad()
def diagnostics(networks: dict, data: dict, args: Args, step: int) -> dict[str, torch.Tensor]:
    """What the Q term does to the policy, on a batch of its own (drawn with the step as seed: the training RNG is left
    as it was): q_gap, the critic's Q1 of the policy's actions minus Q1 of the data's (above 0: rated above the data;
    growing with eta while the score does not: the policy exploits the critic); action_mse, the squared distance of
    the policy's actions from the data's at the same states (how far the Q term moves the policy from the data);
    acting_bc_loss, the MeanFlow loss (Eq. 17) at the acting pair (r, t) = (0, 1) of one-step sampling (Eq. 18), beside
    the batch's bc_loss; q_grad_ratio, the norm of q_loss's gradient over the actor's weights against bc_loss's (times
    eta: the Q term's pull beside behaviour cloning's, comparable across the scripts)."""
    actor, critic, device = networks["actor"], networks["critic"], data["obs"].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + step)
        idx = torch.randint(len(data["obs"]), (args.batch_size,), device=device)
        obs, actions = data["obs"][idx], data["actions"][idx]
        policy_actions = sample_actions(actor, obs)
        ones = torch.ones(len(obs), device=device)
        acting_bc_loss = mean_flow_loss(actor, obs, actions, ones, 1 - ones, torch.randn_like(actions))
        with torch.enable_grad():  # each loss's own gradient, returned (the weights' .grad untouched)
            bc_grads, q_grads = (
                torch.autograd.grad(loss, list(actor.parameters()))
                for loss in actor_losses(actor, critic, args, obs, actions, swap=False)
            )
    q_gap = (critic(obs, policy_actions)[0] - critic(obs, actions)[0]).mean()
    q_grad_ratio = torch.nn.utils.get_total_norm(q_grads) / torch.nn.utils.get_total_norm(bc_grads)
    action_mse = F.mse_loss(policy_actions, actions)
    losses = dict(q_gap=q_gap, action_mse=action_mse, q_grad_ratio=q_grad_ratio)
    return losses | dict(acting_bc_loss=acting_bc_loss)


@torch.no_grad()
def select_actions(
    actor: Actor, critic_target: Critic, obs: torch.Tensor, num_candidates: int, noise_scale: float
) -> torch.Tensor:
    """Evaluation policy: `num_candidates` actions per state, one drawn from softmax over the target critic's min-Q."""
    n = obs.shape[0]
    obs_rep = obs.repeat_interleave(num_candidates, dim=0)  # (n * c, obs_dim)
    actions = sample_actions(actor, obs_rep, noise_scale).view(n, num_candidates, -1)
    q = critic_target.q_min(obs_rep, actions.flatten(0, 1)).view(n, num_candidates)
    probs = F.softmax(q, dim=-1)
    pick = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)  # torch.multinomial's draw, no host sync
    return actions[torch.arange(n, device=obs.device), pick]


# Fast paths: the same functions as torch's, in fewer kernels (each one tested against torch's own)
@torch.no_grad()
def tangent(layer: nn.Module, x: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
    """Forward-mode derivative of one of the actor's layers at x along x_dot."""
    if isinstance(layer, nn.Linear):
        return F.linear(x_dot, layer.weight)
    if isinstance(layer, Mish):
        return x_dot * mish_derivative(x, *mish_parts(x))
    if isinstance(layer, SinusoidalPosEmb):  # d/dx (sin fx, cos fx) = (f cos fx, -f sin fx)
        fx, f_dot = x[:, None] * layer.freqs[None, :], x_dot[:, None] * layer.freqs[None, :]
        return torch.cat((f_dot * fx.cos(), -f_dot * fx.sin()), dim=-1)
    raise TypeError(f"no tangent for {type(layer).__name__}")


def forward_and_tangent(layers, x: torch.Tensor, x_dot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layers applied to x (with gradient) and their derivatives to x_dot (without): a JVP written out, as
    torch's forward AD also multiplies by the weights' zero tangents (twice the matmuls, pytorch#69687)."""
    for layer in layers:
        x, x_dot = layer(x), tangent(layer, x, x_dot)
    return x, x_dot


def mish_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e^x and n = e^x (e^x + 2), from which tanh(softplus(x)) = n / (n + 2): Mish from one exp."""
    e = torch.exp(x.clamp(max=20.0))  # past 20, n / (n + 2) is 1 in float32
    return e, e * (e + 2)


def mish_derivative(x: torch.Tensor, e: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """mish'(x) = n / (n + 2) + 4 x e^x (e^x + 1) / (n + 2)^2."""
    return (n + 4 * x * e * (e + 1) / (n + 2)) / (n + 2)


class MishFunction(torch.autograd.Function):
    """Mish with its closed-form backward: a few kernels where autograd would chain a dozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        e, n = mish_parts(x)
        ctx.save_for_backward(x, e, n)
        return x * n / (n + 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * mish_derivative(*ctx.saved_tensors)


class Mish(nn.Module):
    """nn.Mish, x tanh(softplus(x)); on CPU in closed form (torch's tanh and log1p are slow there: over 2x faster,
    forward and backward), on GPU torch's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MishFunction.apply(x) if x.is_cpu else F.mish(x)


# EVALUATION: normalized returns of the evaluation policy, and its decision frequency
def evaluate(policy, make_env, num_episodes: int, max_envs: int, seed: int, device, episode_done) -> np.ndarray:
    """Returns of `num_episodes` episodes, run in a vectorized env with one policy call per step for all envs;
    `episode_done()` as each one ends."""
    num_envs = min(num_episodes, max_envs)
    quota = np.full(num_envs, num_episodes // num_envs) + (np.arange(num_envs) < num_episodes % num_envs)
    envs = gym.vector.SyncVectorEnv([make_env] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=seed)
    returns, running, finished = [], np.zeros(num_envs), np.zeros(num_envs, dtype=int)
    try:
        while (finished < quota).any():
            actions = policy(torch.as_tensor(flatten_obs(obs), dtype=torch.float32, device=device)).cpu().numpy()
            obs, rewards, terminations, truncations, _ = envs.step(actions)
            running += rewards
            for i in np.flatnonzero(terminations | truncations):
                if finished[i] < quota[i]:
                    returns.append(running[i])
                    episode_done()
                finished[i] += 1
                running[i] = 0.0
    finally:  # also when a signal interrupts it
        envs.close()
    return np.array(returns)


def decision_frequency(policy, obs: torch.Tensor, warmup: int = 10, repeats: int = 100) -> float:
    """Decisions per second for ONE state, candidate sampling and selection included, result on the host."""
    for _ in range(warmup):
        policy(obs[:1]).cpu()
    start = time.perf_counter()
    for _ in range(repeats):
        policy(obs[:1]).cpu()  # .cpu() synchronizes the device
    return repeats / (time.perf_counter() - start)


# PLUMBING: dataset names and loading, checks, checkpoints, logging (the same in ofql.py, dql.py and fql.py)
# D4RL names (version dropped) -> Minari ids. Minari has no medium-expert: load_dataset combines medium and expert
# the first time it is asked for, then keeps it in the local Minari store.
LOCOMOTION = ("hopper", "halfcheetah", "walker2d", "ant", "humanoid")
ANTMAZE = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
ADROIT = ("pen", "door", "hammer", "relocate")
D4RL_TO_MINARI = {
    **{f"{e}-{k}": f"mujoco/{e}/{k}-v0" for e in LOCOMOTION for k in ("medium", "expert", "simple", "medium-expert")},
    **{f"antmaze-{k}": f"D4RL/antmaze/{k}-v1" for k in ANTMAZE},
    **{f"kitchen-{k}": f"D4RL/kitchen/{k}-v2" for k in ("complete", "partial", "mixed")},
    **{f"{e}-{k}": f"D4RL/{e}/{k}-v2" for e in ADROIT for k in ("human", "cloned", "expert")},
}
COMBINED = {f"mujoco/{e}/medium-expert-v0": (f"mujoco/{e}/medium-v0", f"mujoco/{e}/expert-v0") for e in LOCOMOTION}
# A task without a row in TASKS borrows its domain's row, else DEFAULT_TASK's, and says so.
DOMAIN_ROWS = {
    **{domain: f"{domain}-medium" for domain in ("halfcheetah", "hopper", "walker2d")},
    **{"antmaze": "antmaze-medium-play", "kitchen": "kitchen-partial"},
    **{domain: "pen-human" for domain in ADROIT},
}
DEFAULT_TASK = "hopper-medium"
# Where our defaults depart from a choice the paper states (issue 19, docs/ofql.md): BC pairs at the acting pair,
# evaluation with an EMA of the actor's weights, and locomotion's eta outside the paper's grid {0.001, ..., 0.5}.
# --paper-variant takes the paper's: PAPER_VARIANT, and eta from PAPER_ETAS where the row's domain is there.
OUR_VARIANT = {"acting_ratio": 0.25, "eval_ema": True}
PAPER_VARIANT = {"acting_ratio": 0.0, "eval_ema": False}
PAPER_ETAS = {domain: 0.01 for domain in ("halfcheetah", "hopper", "walker2d")}  # its grid's best in our sweep
# D4RL's normalization constants (min, max): random and expert returns of the original tasks.
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "antmaze": (0.0, 1.0),
    "kitchen": (0.0, 4.0),
}
# --dataset-path: D4RL recorded its -v2 data in gym's v3 envs (mujoco-py); Gymnasium's v4 envs are the same models
# and rewards on the new mujoco bindings. v5 differs: Walker2d-v5's right foot has friction 1.9 (D4RL: 0.9), and
# Hopper-v5 and Walker2d-v5 give no healthy reward on the step that falls.
D4RL_FILE_ENVS = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4"}
D4RL_FILE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{name}-v2.hdf5"
KITCHEN_MUJOCO = (3, 12)  # FrankaKitchen-v1 fails on mujoco >= 3.12 (a joint-type assertion); `kitchen` extra pins it
BATCH_KEYS = ("obs", "actions", "rewards", "next_obs", "terminals")
SCRIPT, CHECKPOINT, MODEL = os.path.basename(__file__), "checkpoint.pt", "model.pt"


def strip_version(name: str) -> str:
    return re.sub(r"-v\d+$", "", name)


def resolve_dataset_id(env_id: str) -> str:
    """A Minari id (it contains a slash) as given; a D4RL name mapped through D4RL_TO_MINARI."""
    if "/" in env_id:
        return env_id
    name = strip_version(env_id)
    if name in D4RL_TO_MINARI:
        return D4RL_TO_MINARI[name]
    if name.endswith("-medium-replay") and name.split("-")[0] in D4RL_FILE_ENVS:
        url = D4RL_FILE_URL.format(name=name.replace("-", "_"))
        raise ValueError(
            f"{env_id!r}: Minari has no medium-replay datasets. Train on D4RL's file: download {url} and run "
            f"with --env-id {env_id} --dataset-path {os.path.basename(url)}"
        )
    close = difflib.get_close_matches(name, D4RL_TO_MINARI, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown --env-id {env_id!r}.{hint} Known: {', '.join(D4RL_TO_MINARI)}; or a Minari id.")


def task_name(env_id: str) -> str:
    """`hopper-medium-v2` or `mujoco/hopper/medium-v0` -> `hopper-medium`: the key of TASKS and of its domain."""
    if "/" in env_id:
        domain, kind = env_id.split("/")[-2:]
        return f"{domain}-{strip_version(kind)}"
    return strip_version(env_id)


def task_defaults(args: Args) -> tuple[Args, str]:
    """Every None field of TASK_FIELDS filled from the task's row and the variant's (ours, or --paper-variant's), and a
    line saying which row and variant, and what differs."""
    task = task_name(args.env_id)
    row = task if task in TASKS else DOMAIN_ROWS.get(task.split("-")[0], DEFAULT_TASK)
    defaults = dict(zip(TASK_FIELDS, TASKS[row], strict=True)) | (PAPER_VARIANT if args.paper_variant else OUR_VARIANT)
    if args.paper_variant:
        defaults["eta"] = PAPER_ETAS.get(row.split("-")[0], defaults["eta"])
    args = replace(args, **{f: v for f, v in defaults.items() if getattr(args, f) is None})
    differ = [f for f, v in defaults.items() if getattr(args, f) != v]  # set by a flag (--eval-only: by the model)
    values = ", ".join(f"{field} {getattr(args, field)}" for field in defaults)
    source = f"task row {row}" if row == task else f"{task} has no row in TASKS, borrowing {row}'s"
    variant = ", the paper's variant" if args.paper_variant else ""
    return args, f"{source}{variant}: {values}" + (f" (not the defaults: {', '.join(differ)})" if differ else "")


def check_args(args: Args):
    """Every numeric flag in its RANGES interval, and the combinations that cannot work: ValueError naming the flag."""
    for flag, interval in RANGES.items():
        value = getattr(args, flag)
        if value is None:  # filled in later from another flag (an evaluation step count)
            continue
        low, high = (
            getattr(args, b) if hasattr(args, b) else float(b) for b in interval[1:-1].replace(" ", "").split(",")
        )
        above = value > low if interval[0] == "(" else value >= low
        below = value < high if interval[-1] == ")" else value <= high
        if not (above and below):  # NaN is in no interval
            raise ValueError(f"--{flag.replace('_', '-')} {value}: out of range, must be in {interval}")
    if args.eval_only != bool(args.checkpoint):
        raise ValueError(
            f"--eval-only needs --checkpoint PATH, a model.pt written by --save-model (or a checkpoint.pt), "
            f"and --checkpoint goes with --eval-only (continue a run with --resume); got {args.checkpoint}"
        )
    if args.cudagraphs and not (args.cuda and torch.cuda.is_available()):
        raise ValueError("--cudagraphs needs a CUDA GPU (and --cuda); on CPU, use --compile")


def parse_args() -> tuple[Args, dict | None, str, str]:
    """The command line, checked; with --resume, the run's own flags under it, and its checkpoint; the dataset id;
    the run folder. Every problem a user can fix ends here, with one line naming it, before anything is written."""
    args, saved = tyro.cli(Args), None
    try:
        if args.eval_only and args.resume:
            raise ValueError("--eval-only and --resume: choose one (evaluate a model, or continue a run)")
        if args.resume:
            saved = load_saved(run_file(args.resume, CHECKPOINT), "--resume")
            args = tyro.cli(Args, default=Args(**saved["args"] | {"resume": args.resume}))
            check_continues(args.resume, saved["progress"]["step"], args.total_steps)
        elif args.eval_only and args.checkpoint:
            saved = load_saved(args.checkpoint, "--checkpoint")
            if args.eval_ema is None:  # act as the model's run did
                args = replace(args, eval_ema=saved["args"].get("eval_ema", False))
            if args.eval_ema and "actor_target" not in saved:
                raise ValueError(f"--eval-ema: {args.checkpoint} holds no EMA copy of the actor (its run acted with its"
                                 " trained weights, without --target-actor); use --eval-ema False")  # fmt: skip
            args = replace(args, interval_conditioning=saved["args"].get("interval_conditioning", False))  # its actor
        dataset_id = args.dataset_path or resolve_dataset_id(args.env_id)
        args, task_line = task_defaults(args)
        check_args(args)
        run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = args.resume or f"runs/{run_name}"
        check_writable(run_dir)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(task_line)
    return args, saved, dataset_id, run_dir


def run_file(run_dir: str, name: str) -> str:
    """`name` in the run folder that --resume names; ValueError if that is not a folder holding it."""
    if os.path.isfile(run_dir):
        raise ValueError(f"--resume {run_dir}: a file; --resume takes the run folder (here {os.path.dirname(run_dir)})")
    if not os.path.isfile(os.path.join(run_dir, name)):
        where = "no such folder" if not os.path.isdir(run_dir) else f"no {name} there"
        raise ValueError(f"--resume {run_dir}: {where} (a run writes {name} at every evaluation and when stopped)")
    return os.path.join(run_dir, name)


def load_saved(path: str, flag: str) -> dict:
    """A checkpoint or model this script wrote; ValueError naming the flag for a folder, an unreadable or truncated
    file, another format, or another script's file."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: {'a folder' if os.path.isdir(path) else 'no such file'}; give a {CHECKPOINT} "
                         f"or a {MODEL} of {SCRIPT}")  # fmt: skip
    try:
        saved = torch.load(path, map_location="cpu")
    except Exception as error:  # not torch's format (an ofql_jax.py .msgpack), truncated, empty
        problem = " ".join(str(error).split(". ")[0].split())[:100]
        hint = " (.msgpack files are ofql_jax.py's)" if path.endswith(".msgpack") else ""
        raise ValueError(f"{flag} {path}: not a complete {CHECKPOINT} or {MODEL}{hint} ({type(error).__name__}: "
                         f"{problem}); use another checkpoint or write it again") from None  # fmt: skip
    if not isinstance(saved, dict) or "args" not in saved:
        raise ValueError(f"{flag} {path}: not a {CHECKPOINT} or {MODEL} (it holds no flags)")
    other = sorted(set(saved["args"]) - {field.name for field in fields(Args)})
    if saved.get("script", SCRIPT) != SCRIPT or other:
        flags = f" (its flags {', '.join(other[:3])} are not {SCRIPT}'s)" if other else ""
        raise ValueError(f"{flag} {path}: written by {saved.get('script', 'another script')}{flags}, not {SCRIPT}")
    return saved


def check_continues(run_dir: str, step: int, total_steps: int):
    """A run continues to --total-steps from its checkpoint's update; a finished run (its summary.json final) only
    with more updates than it made, and from its end: its result is never retrained or overwritten."""
    if total_steps < step:
        raise ValueError(f"--total-steps {total_steps}: the run is at update {step}")
    summary = final_summary(run_dir)
    if summary and total_steps <= summary["total_steps"]:
        raise ValueError(
            f"--resume {run_dir}: the run finished at update {summary['total_steps']} (normalized score "
            f"{summary['normalized_score']:.1f}, summary.json). --total-steps above {summary['total_steps']} continues "
            f"it; --eval-only --checkpoint {os.path.join(run_dir, CHECKPOINT)} evaluates it again"
        )
    if summary and step < summary["total_steps"]:
        raise ValueError(
            f"--resume {run_dir}: the run finished at update {summary['total_steps']}, but its {CHECKPOINT} is from "
            f"update {step} (an older {SCRIPT} kept none at the end): it cannot continue from its end; start a new run"
        )


def final_summary(run_dir: str) -> dict | None:
    """The run folder's summary.json if the run finished (not one written when it was stopped)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: not a finished result
        return None
    return summary if "interrupted_at_step" not in summary and summary.get("normalized_score") is not None else None


def check_writable(run_dir: str):
    """The run folder, or for a new run the nearest existing folder above it, must take files."""
    folder = run_dir
    while not os.path.exists(folder):
        folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        what = "not a folder" if not os.path.isdir(folder) else "not writable"
        raise ValueError(f"{os.path.abspath(folder)} is {what}, and the run writes {run_dir}: run from a folder you "
                         "can write to (or fix its permissions)")  # fmt: skip


def claim_run_folder(run_dir: str) -> str:
    """Make a new run's folder. Runs started in the same second under one name (a shell loop of `&` jobs over etas)
    would share it and overwrite each other's checkpoints: a later one takes `{run_dir}-2` (then -3, ...) instead.
    `os.makedirs` fails on a folder that exists, so two processes cannot both take one."""
    suffix = 1
    while True:
        folder = run_dir if suffix == 1 else f"{run_dir}-{suffix}"
        try:
            os.makedirs(folder)
            return folder
        except FileExistsError:
            suffix += 1


def load_dataset(dataset_id: str) -> minari.MinariDataset:
    """The local copy under MINARI_DATASETS_PATH; else, for medium-expert, medium and expert combined (and kept
    locally); else a download from the Minari remote."""
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        local = minari.storage.get_dataset_path(dataset_id)
    if dataset_id in COMBINED:
        parts = [load_dataset(part) for part in COMBINED[dataset_id]]
        print(f"{dataset_id}: combining {' and '.join(COMBINED[dataset_id])} into {local}")
        try:
            return minari.combine_datasets(parts, new_dataset_id=dataset_id)
        except BaseException:  # interrupted or failed: no half-written dataset left in the store
            minari.delete_dataset(dataset_id)
            raise
    print(f"{dataset_id} is not in {local}: downloading it")
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # one message below, not one per retry
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as error:  # no network, or no such dataset on the remote
        where = (
            "set by MINARI_DATASETS_PATH" if os.environ.get("MINARI_DATASETS_PATH") else "MINARI_DATASETS_PATH unset"
        )
        raise ValueError(
            f"{dataset_id} is not local ({local}, {where}) and could not be downloaded ({type(error).__name__}: "
            f"{error}). With internet: `minari download {dataset_id}`, then copy it into MINARI_DATASETS_PATH here; "
            "or check the id with `minari list remote`."
        ) from None


def flatten_obs(obs) -> np.ndarray:
    """Dict observations -> one array, keys in sorted order, nested dicts likewise (AntMaze: achieved_goal,
    desired_goal, observation)."""
    if isinstance(obs, dict):
        return np.concatenate([flatten_obs(obs[k]) for k in sorted(obs)], axis=-1)
    return np.asarray(obs)


def minari_transitions(dataset: minari.MinariDataset) -> dict[str, np.ndarray]:
    """Flatten the episodes into transitions; done = termination only (a truncation is not terminal)."""
    obs, actions, rewards, next_obs, terminals = [], [], [], [], []
    for episode in dataset.iterate_episodes():
        episode_obs = flatten_obs(episode.observations)  # (N + 1, obs_dim)
        obs.append(episode_obs[:-1])
        next_obs.append(episode_obs[1:])
        actions.append(episode.actions)
        rewards.append(episode.rewards)
        terminals.append(episode.terminations)
    columns = (obs, actions, rewards, next_obs, terminals)
    return {key: np.concatenate(column) for key, column in zip(BATCH_KEYS, columns, strict=True)}


def d4rl_transitions(path: str) -> dict[str, np.ndarray]:
    """An original D4RL hdf5 file, read with h5py (no d4rl, no mujoco-py). Without `next_observations`, the next
    observation is the next row, and rows marked `timeouts` (and the file's last) are dropped: their successor
    is the next episode's start. Done = `terminals` only."""
    if not os.path.isfile(path):
        raise ValueError(f"--dataset-path {path}: no such file")
    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in keys if key not in f]
            if missing:
                raise ValueError(f"--dataset-path {path}: no {', '.join(missing)} in the file; D4RL's hold {keys}")
            raw = {key: f[key][()] for key in (*keys, "next_observations") if key in f}
    except OSError as error:  # not hdf5, truncated, unreadable
        raise ValueError(f"--dataset-path {path}: not a readable hdf5 file ({error}); download it again") from None
    if len({len(value) for value in raw.values()}) != 1 or raw["observations"].ndim != 2 or raw["actions"].ndim != 2:
        shapes = ", ".join(f"{key} {value.shape}" for key, value in raw.items())
        raise ValueError(f"--dataset-path {path}: inconsistent arrays ({shapes}); expected (N, dim) and (N,)")
    if "next_observations" in raw:
        keep, next_obs = np.ones(len(raw["observations"]), dtype=bool), raw["next_observations"]
    else:
        keep, next_obs = ~raw["timeouts"].astype(bool), np.roll(raw["observations"], -1, axis=0)
        keep[-1] = False
    columns = (raw["observations"], raw["actions"], raw["rewards"], next_obs, raw["terminals"])
    return {key: column[keep] for key, column in zip(BATCH_KEYS, columns, strict=True)}


def load_task(args: Args, dataset_id: str) -> tuple[dict[str, np.ndarray], Callable, gym.spaces.Box, tuple]:
    """Transitions, the evaluation env's constructor, its action space and the (min, max) reference returns.
    Every problem a user can fix raises ValueError with the fix."""
    domain = task_name(args.env_id).split("-")[0]
    if args.dataset_path:
        if domain not in D4RL_FILE_ENVS:
            raise ValueError(f"--dataset-path takes {', '.join(D4RL_FILE_ENVS)} files, not {domain!r}")
        transitions, ref_scores = d4rl_transitions(args.dataset_path), D4RL_REF_SCORES[domain]
        make_env = partial(gym.make, D4RL_FILE_ENVS[domain])
        print(f"{args.dataset_path}: D4RL's data, evaluated on Gymnasium's {D4RL_FILE_ENVS[domain]} (D4RL's model)")
        warnings.filterwarnings("ignore", message=r".*is out of date\. You should consider upgrading")  # v4 on purpose
    else:
        if domain == "kitchen":
            import mujoco

            if tuple(int(part) for part in mujoco.__version__.split(".")[:2]) >= KITCHEN_MUJOCO:
                raise ValueError(
                    f"FrankaKitchen-v1 fails on mujoco >= 3.12 (installed: {mujoco.__version__}): "
                    "pip install -e '.[kitchen]' (gymnasium-robotics and mujoco<3.12)"
                )
        dataset = load_dataset(dataset_id)
        transitions, ref_scores = minari_transitions(dataset), reference_scores(dataset, dataset_id, domain)
        # AntMaze: an episode ends at the goal, so the normalized score is D4RL's success rate
        goal_ends = {"continuing_task": False} if domain == "antmaze" else {}
        make_env = partial(dataset.recover_environment, eval_env=True, **goal_ends)
    try:
        env = make_env()
    except ImportError as error:
        raise ValueError(
            f"{args.env_id}: its env needs the module {error.name!r}: pip install -e '.[robotics]'"
        ) from None
    obs_dim, action_space = flatten_obs(env.reset(seed=args.seed)[0]).shape[-1], env.action_space
    env.close()
    data_dims = (transitions["obs"].shape[1], transitions["actions"].shape[1])
    if data_dims != (obs_dim, action_space.shape[0]):
        raise ValueError(
            f"{args.dataset_path or dataset_id}: observations and actions of size {data_dims} do not match "
            f"the env {env.spec.id}'s {(obs_dim, action_space.shape[0])}; check --env-id"
        )
    return transitions, make_env, action_space, ref_scores


def dataset_to_tensors(transitions: dict[str, np.ndarray], reward_tune: str, device) -> dict[str, torch.Tensor]:
    """Reward shaping per task, then float32 tensors on `device`: rewards and terminals as (N, 1)."""
    data = transitions | {"rewards": transitions["rewards"][:, None], "terminals": transitions["terminals"][:, None]}
    if reward_tune == "cql":
        data["rewards"] = (data["rewards"] - 0.5) * 4.0
    elif reward_tune == "normalize":
        data["rewards"] = (data["rewards"] - data["rewards"].mean()) / data["rewards"].std()
    return {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in data.items()}


def reference_scores(dataset: minari.MinariDataset, dataset_id: str, domain: str) -> tuple[float, float]:
    """D4RL's (min, max) return for the domain, else the dataset's own reference scores."""
    if domain in D4RL_REF_SCORES:
        return D4RL_REF_SCORES[domain]
    metadata = dataset.storage.metadata
    if metadata.get("ref_min_score") is None or metadata.get("ref_max_score") is None:
        raise ValueError(f"{dataset_id}: no D4RL reference returns for {domain!r} and none in the dataset's metadata")
    return metadata["ref_min_score"], metadata["ref_max_score"]


def cuda_graphed(fn: Callable, warmup: int = 3) -> Callable:
    """fn replayed from CUDA graphs by tensordict's CudaGraphModule, one graph per input shapes and host values
    (the critics' coin; the number of evaluation envs), as a graph replays one shape and one branch."""
    from tensordict.nn import CudaGraphModule

    graphs = {}

    def graphed(*inputs):
        key = tuple(x.shape if torch.is_tensor(x) else x for x in inputs)
        if key not in graphs:
            graphs[key] = CudaGraphModule(fn, warmup=warmup)
        return graphs[key](*inputs)

    return graphed


def start_logging(args: Args, run_dir: str, progress: dict) -> SummaryWriter:
    """wandb with --track (a resumed run continues its wandb run), syncing tensorboard, whose writer this returns."""
    if args.track:
        import wandb

        try:
            run = wandb.init(
                project=args.wandb_project_name,
                entity=args.wandb_entity,
                sync_tensorboard=True,
                config=vars(args),
                name=os.path.basename(os.path.normpath(run_dir)),
                save_code=True,
                id=progress["wandb_id"],
                resume="allow",
            )
        except wandb.Error as error:  # no API key, no network
            if not args.resume:  # a failed start leaves no run folder behind: the new one is still empty
                os.removedirs(run_dir)
            problem = " ".join(str(error).split())[:200]
            raise SystemExit(f"error: --track: wandb could not start ({problem}); `wandb login`, or WANDB_MODE=offline "
                             "to log locally (`wandb sync` later)") from None  # fmt: skip
        progress["wandb_id"] = run.id
    writer = SummaryWriter(run_dir, purge_step=progress["step"] + 1 if args.resume else None)  # drop what followed
    table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return writer


def stopwatch(progress: dict) -> Callable[[str], None]:
    """charge(key) adds the seconds since the previous charge to progress[key]: training, evaluation and
    compilation timed apart."""
    last = [time.perf_counter()]

    def charge(key: str):
        now = time.perf_counter()
        progress[key] += now - last[0]
        last[0] = now

    return charge


class Interrupted(Exception):
    """A SIGINT or SIGTERM that stops the run where it is (an evaluation, or a second signal in training)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_requests() -> dict:
    """SIGINT (Ctrl-C) and SIGTERM, by stop["phase"]. start-up: nothing to save yet, the run ends at once; training:
    the loop finishes its update, checkpoints and stops, a second signal raises Interrupted at once; evaluation:
    Interrupted at once (the checkpoint precedes it); stopping: ignored; done: the results are saved, it ends."""
    stop = {"phase": "start-up", "signals": []}

    def request_stop(signum, frame):
        stop["signals"].append(signum)
        name, phase = signal.Signals(signum).name, stop["phase"]
        if phase in ("start-up", "done"):
            print(f"{name}: stopped during {phase} ({'no update made' if phase == 'start-up' else 'all saved'})",
                  file=sys.stderr)  # fmt: skip
            raise SystemExit(128 + signum)
        if phase == "evaluation" or (phase == "training" and len(stop["signals"]) > 1):
            raise Interrupted(signum)
        if phase == "training":
            tqdm.write(f"{name}: checkpointing after this update (again to stop at once)")

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop


def progress_bar(total: int, initial: int, unit: str, desc: str | None = None) -> tqdm | None:
    """A tqdm bar on a terminal; None when stdout is a file (a cluster's log), which gets progress lines instead."""
    if not sys.stdout.isatty():
        return None
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, leave=False)


def episode_counter(num_episodes: int, step: int) -> Callable[[], None]:
    """Called as each evaluation episode ends: a bar on a terminal; in a log, a line at each quarter of 50 or more."""
    bar, done = progress_bar(num_episodes, 0, "episode", f"evaluation at update {step}"), [0]

    def episode_done():
        done[0] += 1
        if bar is not None:
            bar.update()
            if done[0] == num_episodes:
                bar.close()
        elif num_episodes >= 50 and done[0] < num_episodes and done[0] % (num_episodes // 4) == 0:
            print(f"evaluation at update {step}: {done[0]}/{num_episodes} episodes", flush=True)

    return episode_done


def duration(seconds: float) -> str:
    """`2 h 05 min`, `12 min`, `40 s`."""
    if seconds >= 3600:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def log_losses(writer: SummaryWriter, losses: dict[str, torch.Tensor], progress: dict, args: Args, bar: tqdm | None):
    """The losses to tensorboard and a progress line (or the terminal's bar); a non-finite loss ends the run before
    anything is saved."""
    step, losses = progress["step"], {name: loss.item() for name, loss in losses.items()}  # the only host sync
    if not all(math.isfinite(value) for value in losses.values()):
        writer.close()
        last_step, last = progress["last_losses"]
        raise SystemExit(
            f"error: non-finite loss at update {step} ({format_losses(losses)}); the last finite losses, at update "
            f"{last_step}: {format_losses(last)}. Nothing was saved after them. Lower --lr or --critic-lr, or clip "
            "gradients with --grad-norm."
        )
    progress["last_losses"] = (step, losses)
    for name, value in losses.items():
        writer.add_scalar(f"losses/{name}", value, step)
    updates_per_second = step / max(progress["train_seconds"], 1e-9)
    writer.add_scalar("charts/updates_per_second", updates_per_second, step)
    values = f"critic {losses['critic_loss']:.3f} | bc {losses['bc_loss']:.3f} | q {losses['q_loss']:.3f}"
    if bar is not None:  # the bar shows the rate and the ETA
        bar.update(step - bar.n)
        bar.set_postfix_str(values)
        return
    eta = duration((args.total_steps - step) / updates_per_second)
    print(f"update {step}/{args.total_steps} | {updates_per_second:.1f} updates/s | ETA {eta} | {values}")


def format_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in losses.items()) or "none yet"


def save_checkpoint(run_dir: str, networks: dict, optimizers: dict, progress: dict, args: Args):
    state = {name: module.state_dict() for name, module in (networks | optimizers).items()}
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    rng = {"rng": torch.get_rng_state(), "cuda_rng": cuda_rng}
    progress["checkpoint_step"] = progress["step"]
    content = state | rng | {"progress": progress, "args": asdict(args), "script": SCRIPT}
    save_atomically(f"{run_dir}/{CHECKPOINT}", content)


def keep_final_summary(run_dir: str):
    """A finished run that goes on keeps its final summary.json as summary_{updates}.json."""
    summary = final_summary(run_dir)
    if summary:
        os.replace(f"{run_dir}/summary.json", f"{run_dir}/summary_{summary['total_steps']}.json")
        print(f"{run_dir}: the finished run's summary.json kept as summary_{summary['total_steps']}.json")


def restore(saved: dict, networks: dict, optimizers: dict, resume: bool):
    """The networks from a checkpoint or model; when resuming, also the optimizers and the RNG streams."""
    try:
        for name, module in networks.items():
            module.load_state_dict(saved[name])
    except (KeyError, RuntimeError) as error:  # another script's model, or another dataset's shapes
        problem = " ".join(str(error).split())[:200]
        raise SystemExit(f"error: the saved networks do not fit this script and dataset ({problem})") from None
    if resume:
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(saved[name])
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])


def write_summary(run_dir: str, progress: dict, args: Args, dataset_id: str, device, **results) -> dict:
    trained = progress["train_seconds"] > 0
    updates_per_second = progress["step"] / progress["train_seconds"] if trained else None
    summary = {"algorithm": SCRIPT[: -len(".py")], "exp_name": args.exp_name, "env_id": args.env_id}
    summary |= {"dataset_id": dataset_id, "seed": args.seed}
    summary |= {"total_steps": progress["step"], **results, "num_candidates": args.num_candidates}
    summary["best_normalized_score"] = max((score for _, score in progress["evaluations"]), default=None)
    summary |= {key: progress[key] for key in ("train_seconds", "eval_seconds", "compile_seconds")}
    summary["updates_per_second"] = updates_per_second
    summary["hours_per_million_updates"] = 1e6 / updates_per_second / 3600 if trained else None
    summary |= {"device": str(device), "threads": torch.get_num_threads()}
    summary["resumed_from_step"] = progress["start_step"] if args.resume else None
    summary |= {"evaluations": progress["evaluations"], "args": asdict(args)}
    save_atomically(f"{run_dir}/summary.json", summary)
    return summary


def result_line(summary: dict, run_dir: str) -> str:
    """The run's last line: final and best score; training time and speed, if it trained; decision frequency."""
    line = f"{summary['dataset_id']}: normalized score {summary['normalized_score']:.1f} +- "
    line += f"{summary['normalized_score_std']:.1f} (best {summary['best_normalized_score']:.1f}) | "
    if summary["updates_per_second"]:
        line += f"training {summary['train_seconds']:.0f} s, {summary['updates_per_second']:.1f} updates/s, "
        line += f"{summary['hours_per_million_updates']:.2f} h per 1M updates | "
    return line + f"{summary['decision_hz']:.1f} decisions/s | {run_dir}/summary.json"


def stopped_line(interrupted: Interrupted, progress: dict, args: Args, run_dir: str) -> str:
    """What a stopped run says last: where it stopped, and how to go on."""
    line = f"{interrupted}: stopped at update {progress['step']}"
    if args.eval_only:
        return line + "; nothing to resume: run the same command again to evaluate"
    if progress["checkpoint_step"] is None:
        return line + ", before its first checkpoint: nothing to resume, start it again"
    return line + f"; continue from update {progress['checkpoint_step']}: python {SCRIPT} --resume {run_dir}"


def save_atomically(path: str, content: dict):
    """Write to a temporary file, then rename, SIGINT and SIGTERM held meanwhile (handled once the file is whole): a
    stopped run never leaves half a file, and a failed write no temporary one. JSON or torch.save."""
    held, handlers = [], {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in handlers:  # Python runs signal handlers in the main thread, which is writing: record them
        signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        if path.endswith(".json"):
            with open(path + ".tmp", "w") as f:
                json.dump(content, f, indent=2)
        else:
            torch.save(content, path + ".tmp")
        os.replace(path + ".tmp", path)
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        for signum, handler in handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in held:  # handled now, as if received here
            signal.raise_signal(signum)


if __name__ == "__main__":
    stop = stop_requests()  # SIGINT, SIGTERM: in start-up the run ends at once; later it checkpoints first
    args, saved, dataset_id, run_dir = parse_args()  # checked; with --resume, the run's flags under the command line's

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # data: transitions on the device; for evaluation, the env the data was recorded on
    try:
        transitions, make_env, action_space, (ref_min, ref_max) = load_task(args, dataset_id)
        data = dataset_to_tensors(transitions, args.reward_tune, device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    obs_dim, action_dim = data["obs"].shape[1], data["actions"].shape[1]
    print(f"{dataset_id}: {len(data['obs']):,} transitions, obs_dim {obs_dim}, action_dim {action_dim}, {device}")

    actor = Actor(obs_dim, action_dim, action_space.low, action_space.high, args.interval_conditioning).to(device)
    critic = Critic(obs_dim, action_dim).to(device)
    critic_target = Critic(obs_dim, action_dim).to(device)
    critic_target.load_state_dict(critic.state_dict())
    # fused: one kernel, no host sync; capturable: step() inside a CUDA graph (torch.compile handles it otherwise)
    adam = partial(torch.optim.Adam, fused=True, capturable=args.cudagraphs and not args.compile)
    actor_optimizer = adam(actor.parameters(), lr=args.lr)
    critic_optimizer = adam(critic.parameters(), lr=args.critic_lr)
    networks = {"actor": actor, "critic": critic, "critic_target": critic_target}
    if args.target_actor or args.eval_ema:  # dql.py's EMA target actor: the critic's next actions, or evaluation's
        networks["actor_target"] = copy.deepcopy(actor)
    optimizers = {"actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer}
    if saved:  # --resume: networks, optimizers, RNG; --eval-only: networks
        restore(saved, networks, optimizers, resume=bool(args.resume))
    progress = saved["progress"] if args.resume else {"step": 0, "evaluations": [], "wandb_id": None}
    progress |= {"start_step": progress["step"], "last_losses": (progress["step"], {})}
    progress.setdefault("checkpoint_step", progress["step"] if args.resume else None)
    for key in ("train_seconds", "eval_seconds", "compile_seconds"):
        progress.setdefault(key, 0.0)
    if args.eval_only:
        args.total_steps = 0

    # logging: only now that the data loaded, so that a failed start leaves no run folder behind
    run_dir = run_dir if args.resume else claim_run_folder(run_dir)
    writer = start_logging(args, run_dir, progress)
    if args.resume:
        keep_final_summary(run_dir)
        print(f"resuming {run_dir} from update {progress['step']}")

    train_step = partial(update, networks, optimizers, args)
    acting_actor = networks["actor_target"] if args.eval_ema else actor
    policy = partial(select_actions, acting_actor, critic_target, num_candidates=args.num_candidates)
    policy = partial(policy, noise_scale=args.eval_noise_scale)
    if args.compile:
        import torch._inductor.config

        torch._inductor.config.fallback_random = True  # torch's own RNG stream, as in eager mode: resumable
        train_step, policy = torch.compile(train_step), torch.compile(policy)
    if args.cudagraphs:
        train_step, policy = cuda_graphed(train_step), cuda_graphed(policy)
    if args.compile and args.total_steps > progress["step"]:
        print("torch.compile: the first update for each critic order compiles (a minute or more, timed apart)")

    def evaluate_and_log(step: int, num_episodes: int) -> np.ndarray:
        stop["phase"] = "evaluation"  # a signal interrupts it: the run resumes from the checkpoint made before it
        if stop["signals"]:
            raise Interrupted(stop["signals"][0])
        episode_done = episode_counter(num_episodes, step)
        returns = evaluate(policy, make_env, num_episodes, args.max_eval_envs, args.seed + step, device, episode_done)
        stop["phase"] = "training"
        scores = 100 * (returns - ref_min) / (ref_max - ref_min)
        progress["evaluations"].append((step, float(scores.mean())))
        writer.add_scalar("charts/normalized_score", scores.mean(), step)
        line = f"normalized score {scores.mean():.1f} +- {scores.std():.1f} over {len(scores)} episodes"
        tqdm.write(f"update {step}: {line}")
        return scores

    # TRY NOT TO MODIFY: the training loop. A checkpoint precedes each evaluation: a run resumed there evaluates first
    charge, compiled, stop["phase"] = stopwatch(progress), set(), "training"
    bar = progress_bar(args.total_steps, progress["step"], "update")
    try:
        if 0 < progress["step"] < args.total_steps and progress["step"] % args.eval_freq == 0:
            evaluate_and_log(progress["step"], args.eval_episodes)
            charge("eval_seconds")
        for step in range(progress["step"] + 1, args.total_steps + 1):
            idx = torch.randint(len(data["obs"]), (args.batch_size,), device=device)
            swap = bool(torch.rand(()) < 0.5)  # which critic gives Q: a host coin (CPU generator), no device sync
            losses = train_step(*(data[key][idx] for key in BATCH_KEYS), swap)
            update_actor_target(networks.get("actor_target"), actor, step, args)
            progress["step"] = step
            if args.compile and swap not in compiled:  # the first call for each coin compiles: timed apart
                compiled.add(swap)
                charge("compile_seconds")

            stopping = bool(stop["signals"])  # read once: a later signal is handled after the next update
            evaluating = step % args.eval_freq == 0 and step < args.total_steps
            checkpointing = stopping or evaluating or step == args.total_steps
            checkpointing |= args.checkpoint_freq > 0 and step % args.checkpoint_freq == 0
            if step % args.log_freq == 0 or checkpointing:
                charge("train_seconds")
                log_losses(writer, losses, progress, args, bar)
                for name, value in diagnostics(networks, data, args, step).items():  # after the update: not checked
                    writer.add_scalar(f"losses/{name}", value.item(), step)
            if checkpointing:  # before this update's evaluation, which draws from the same RNG
                save_checkpoint(run_dir, networks, optimizers, progress, args)
            if stopping:
                raise Interrupted(stop["signals"][0])
            if evaluating:
                evaluate_and_log(step, args.eval_episodes)
                charge("eval_seconds")
        if bar is not None:
            bar.close()

        if args.save_model:
            model = {name: module.state_dict() for name, module in networks.items()}
            save_atomically(f"{run_dir}/{MODEL}", model | {"args": asdict(args), "script": SCRIPT})
            print(f"model saved to {run_dir}/{MODEL}")

        # final evaluation, decision frequency and summary
        scores = evaluate_and_log(args.total_steps, args.final_eval_episodes)
        stop["phase"] = "evaluation"
        decision_hz = decision_frequency(policy, data["obs"])
    except Interrupted as interrupted:
        stop["phase"] = "stopping"
        write_summary(run_dir, progress, args, dataset_id, device, interrupted_at_step=progress["step"])
        writer.close()
        print(stopped_line(interrupted, progress, args, run_dir), file=sys.stderr)
        sys.exit(128 + interrupted.signum)
    writer.add_scalar("charts/decision_hz", decision_hz, args.total_steps)
    final = dict(normalized_score=float(scores.mean()), normalized_score_std=float(scores.std()))
    final |= dict(episode_normalized_scores=scores.tolist())  # each episode's: a rare failure shows here
    final |= dict(return_mean=float(scores.mean() / 100 * (ref_max - ref_min) + ref_min), eval_episodes=len(scores))
    summary = write_summary(run_dir, progress, args, dataset_id, device, **final, decision_hz=decision_hz)
    stop["phase"] = "done"
    print(result_line(summary, run_dir))
    writer.close()
    if args.track:
        import wandb

        wandb.finish()
