"""Diffusion Q-Learning (DQL): offline RL with a T-step DDPM policy. Docs: docs/dql.md

Paper: Wang, Hunt, Zhou (2023) "Diffusion Policies as an Expressive Policy Class for Offline RL".
A DDPM eps(a_i, i; s) (Eq. 6) on DQL's "vp" schedule, T = 5 steps from x_T ~ N(0, I) (Eq. 5);
a Q term through every step (BPTT, Eq. 8), next actions from an EMA target actor (Eq. 7).
Equation numbers: "Revisiting Diffusion Q-Learning" (ofql.py), whose Eq. 2-8 restate DQL.

Usage:
    python dql.py --env-id hopper-medium-v2
    python dql.py --env-id hopper-medium-v2 --eval-sampler ddim --eval-steps 1  # "DQL + DDIM (1)"
    python dql.py --resume runs/{run_name}  # continue a stopped run

Ours (docs/dql.md): --eval-sampler ddim, a deterministic DDIM on --eval-steps of the T steps
(evaluation only); the time embedding takes the raw step index i in {0..T-1}.
"""

import os
import signal
import sys

if __name__ == "__main__":  # a signal while the libraries import: one line, no traceback

    def exit_in_start_up(signum, frame):
        name = signal.Signals(signum).name
        print(f"{name}: stopped in start-up, nothing written", file=sys.stderr)
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, exit_in_start_up)
    signal.signal(signal.SIGTERM, exit_in_start_up)

import difflib
import json
import math
import random
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, replace
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
    threads: int = 1
    """torch CPU threads (0: torch's default; 1: fastest here)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "ofql"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """save the trained networks into `runs/{run_name}/model.pt`"""
    eval_only: str | None = None
    """no training: evaluate this model.pt or checkpoint.pt (its run's flags)"""
    checkpoint_freq: int = 0
    """also checkpoint every this many updates (0: at evaluations)"""
    resume: str | None = None
    """a run folder to continue, with its flags (those given win)"""
    compile: bool = False
    """torch.compile the update and the policy call"""
    cudagraphs: bool = False
    """replay the update and the policy from CUDA graphs (GPU only)"""

    # Data and evaluation
    env_id: str = "hopper-medium-v2"
    """a D4RL name (hopper-medium-v2) or a Minari dataset id"""
    dataset_path: str | None = None
    """a D4RL hdf5 file to train on; --env-id names its task"""
    total_steps: int | None = None
    """number of gradient updates"""
    batch_size: int = 256
    """the batch size of each update"""
    eval_freq: int = 50_000
    """evaluate every this many updates"""
    eval_episodes: int = 10
    """episodes of each periodic evaluation"""
    final_eval_episodes: int = 150
    """episodes of the final evaluation (the paper: 50 x 3)"""
    num_candidates: int = 50
    """candidate actions per state, one picked by softmax over Q"""
    log_freq: int = 1000
    """log the losses every this many updates"""

    # Algorithm specific arguments (None: the task's row in TASKS)
    lr: float | None = None
    """learning rate of the actor"""
    eta: float | None = None
    """weight of the normalized Q term in the actor loss"""
    max_q_backup: bool | None = None
    """critic target: max over 10 next actions, min over critics"""
    reward_tune: Literal["none", "cql", "normalize"] | None = None
    """cql: (r - 0.5) * 4; normalize: (r - mean) / std"""
    grad_norm: float | None = None
    """clip the gradient norms (0: no clipping)"""
    critic_lr: float = 3e-4
    """learning rate of the critic"""
    gamma: float = 0.99
    """the discount factor"""
    tau: float = 0.005
    """target critic smoothing coefficient"""
    diffusion_steps: int = 5
    """T: denoising steps of the DDPM, in training and for the critic's next actions"""
    eval_sampler: Literal["ddpm", "ddim"] = "ddpm"
    """at evaluation: ddpm, the trained T-step chain; ddim, deterministic, --eval-steps of T"""
    eval_steps: int | None = None
    """denoising steps at evaluation (None: T; ddpm always takes all T)"""
    ema_decay: float = 0.995
    """decay of the actor's EMA (DQL's target actor, Eq. 7)"""
    ema_start: int = 1000
    """the target actor keeps its initial weights until this update"""
    ema_every: int = 5
    """the EMA updates every this many updates"""


# Per-task defaults, all DQL's (its main.py; updates are epochs x 1000).
TASK_FIELDS = ("lr", "eta", "max_q_backup", "reward_tune", "total_steps", "grad_norm")
TASKS = {
    "halfcheetah-medium": (3e-4, 1.0, False, "none", 2_000_000, 9.0),
    "hopper-medium": (3e-4, 1.0, False, "none", 2_000_000, 9.0),
    "walker2d-medium": (3e-4, 1.0, False, "none", 2_000_000, 1.0),
    "halfcheetah-medium-replay": (3e-4, 1.0, False, "none", 2_000_000, 2.0),
    "hopper-medium-replay": (3e-4, 1.0, False, "none", 2_000_000, 4.0),
    "walker2d-medium-replay": (3e-4, 1.0, False, "none", 2_000_000, 4.0),
    "halfcheetah-medium-expert": (3e-4, 1.0, False, "none", 2_000_000, 7.0),
    "hopper-medium-expert": (3e-4, 1.0, False, "none", 2_000_000, 5.0),
    "walker2d-medium-expert": (3e-4, 1.0, False, "none", 2_000_000, 5.0),
    "antmaze-umaze": (3e-4, 0.5, False, "cql", 1_000_000, 2.0),
    "antmaze-umaze-diverse": (3e-4, 2.0, True, "cql", 1_000_000, 3.0),
    "antmaze-medium-play": (1e-3, 2.0, True, "cql", 1_000_000, 2.0),
    "antmaze-medium-diverse": (3e-4, 3.0, True, "cql", 1_000_000, 1.0),
    "antmaze-large-play": (3e-4, 4.5, True, "cql", 1_000_000, 10.0),
    "antmaze-large-diverse": (3e-4, 3.5, True, "cql", 1_000_000, 7.0),
    "kitchen-complete": (3e-4, 0.005, False, "none", 250_000, 9.0),
    "kitchen-partial": (3e-4, 0.005, False, "none", 1_000_000, 10.0),
    "kitchen-mixed": (3e-4, 0.005, False, "none", 1_000_000, 10.0),
    "pen-human": (3e-5, 0.15, False, "normalize", 1_000_000, 7.0),
    "pen-cloned": (3e-5, 0.1, False, "normalize", 1_000_000, 8.0),
}


def row_defaults(args: Args, row: str) -> dict:
    """The task row's values and --eval-steps (None: T), checked: at most T, all for ddpm."""
    steps, T = args.eval_steps or 0, args.diffusion_steps  # below 1: RANGES
    if steps > T:
        raise ValueError(f"--eval-steps {steps}: must be in [1, diffusion_steps]")
    if 0 < steps < T and args.eval_sampler == "ddpm":
        raise ValueError(f"--eval-steps {steps}: ddpm takes all T = {T} steps; fewer need --eval-sampler ddim")
    return dict(zip(TASK_FIELDS, TASKS[row], strict=True)) | {"eval_steps": T}


# ALGO LOGIC: networks, DDPM and DDIM sampling, the diffusion loss, the update, action selection
class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        freqs = torch.exp(torch.arange(dim // 2) * -(np.log(10000) / (dim // 2 - 1)))
        self.register_buffer("freqs", freqs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        x = x[:, None] * self.freqs[None, :]
        return torch.cat((x.sin(), x.cos()), dim=-1)


def time_mlp(t_dim: int = 16) -> nn.Sequential:
    return nn.Sequential(
        SinusoidalPosEmb(t_dim),
        nn.Linear(t_dim, t_dim * 2),
        Mish(),
        nn.Linear(t_dim * 2, t_dim),
    )


class Actor(nn.Module):
    """Noise prediction eps(a_i, i; s): DQL's MLP, the DDPM schedule in its buffers."""

    def __init__(self, obs_dim, action_dim, low, high, diffusion_steps=5, hidden_dim=256, t_dim=16):
        super().__init__()
        self.t_mlp = time_mlp(t_dim)
        self.mid_layer = nn.Sequential(
            nn.Linear(action_dim + t_dim + obs_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
            nn.Linear(hidden_dim, hidden_dim), Mish(),
        )  # fmt: skip
        self.final_layer = nn.Linear(hidden_dim, action_dim)
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32))
        for name, value in vp_schedule(diffusion_steps).items():
            self.register_buffer(name, value)

    def forward(self, a_t, t, obs) -> torch.Tensor:
        x = torch.cat([a_t, self.t_mlp(t), obs], dim=-1)
        return self.final_layer(self.mid_layer(x))


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

    def forward(self, obs, action) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, action], dim=-1)
        return self.q1_model(x), self.q2_model(x)

    def q_min(self, obs, action) -> torch.Tensor:
        return torch.min(*self(obs, action))


def vp_schedule(T: int, b_min=0.1, b_max=10.0) -> dict[str, torch.Tensor]:
    """DQL's "vp" schedule, alpha_i = exp(-b_min / T - (b_max - b_min)(2i - 1) / (2 T^2)),
    and the DDPM posterior q(x_{i-1} | x_i, x_0), from float64."""
    i = torch.arange(1, T + 1, dtype=torch.float64)
    alphas = torch.exp(-b_min / T - 0.5 * (b_max - b_min) * (2 * i - 1) / T**2)
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    betas = 1 - alphas
    schedule = dict(betas=betas, alphas=alphas, alphas_cumprod=abar)
    schedule |= dict(alphas_cumprod_prev=abar_prev)
    schedule["posterior_variance"] = betas * (1 - abar_prev) / (1 - abar)
    schedule["posterior_mean_coef1"] = betas * abar_prev.sqrt() / (1 - abar)
    schedule["posterior_mean_coef2"] = (1 - abar_prev) * alphas.sqrt() / (1 - abar)
    return {name: value.float() for name, value in schedule.items()}


def sample_actions(actor: Actor, obs, sampler="ddpm", steps=None) -> torch.Tensor:
    """Reverse diffusion from x_T ~ N(0, I), x0 clipped at each step; differentiable
    through every call (BPTT). ddpm: DQL's T-step ancestral chain (Eq. 5); ddim:
    deterministic, on `steps` of the T steps (evaluation only)."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}: use ddpm or ddim")
    T, n = actor.betas.shape[0], obs.shape[0]
    num = T if sampler == "ddpm" else steps or T
    timesteps = np.linspace(T - 1, 0, num).round().astype(int).tolist()
    x = torch.randn(n, actor.low.shape[0], device=obs.device)
    for i, i_next in zip(timesteps, timesteps[1:] + [-1], strict=True):
        eps = actor(x, torch.full((n,), float(i), device=obs.device), obs)
        abar = actor.alphas_cumprod[i]
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        x0 = x0.clamp(actor.low, actor.high)
        if sampler == "ddim":  # x0 and eps taken to the next step's noise level
            abar_next = actor.alphas_cumprod_prev[i_next + 1]  # abar_{-1} = 1
            x = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps
        else:  # the posterior mean of q(x_{i-1} | x_i, x0), noise but at the end
            x = actor.posterior_mean_coef1[i] * x0 + actor.posterior_mean_coef2[i] * x
            if i > 0:
                x = x + actor.posterior_variance[i].sqrt() * torch.randn_like(x)
    return x.clamp(actor.low, actor.high)


def diffusion_loss(actor: Actor, obs, actions, t, noise) -> torch.Tensor:
    """DDPM BC (Eq. 6): eps(a_i, i; s) regressed onto the noise eps in a_i."""
    abar = actor.alphas_cumprod[t][:, None]
    a_t = abar.sqrt() * actions + (1 - abar).sqrt() * noise
    return F.mse_loss(actor(a_t, t.float(), obs), noise)


def actor_losses(actor: Actor, critic: Critic, args: Args, obs, actions, swap: bool):
    """DDPM BC (Eq. 6) and -Q / |Q| (Eq. 8), the Q term through all T steps (BPTT)."""
    t = torch.randint(args.diffusion_steps, (len(obs),), device=obs.device)
    bc_loss = diffusion_loss(actor, obs, actions, t, torch.randn_like(actions))
    q1, q2 = critic(obs, sample_actions(actor, obs))
    q, q_scale = (q2, q1) if swap else (q1, q2)  # a random critic for Q, the other its scale
    return bc_loss, -q.mean() / q_scale.abs().mean().detach()


def gradient_step(optimizer, module: nn.Module, loss: torch.Tensor, grad_norm: float):
    """Backward into the module's own parameters, clip (0: none), step."""
    optimizer.zero_grad()
    loss.backward(inputs=list(module.parameters()))
    if grad_norm > 0:
        nn.utils.clip_grad_norm_(module.parameters(), max_norm=grad_norm)
    optimizer.step()


def update(networks, optimizers, args, obs, actions, rewards, next_obs, terminals, swap):
    """Critic, actor and target critic: tensors in, detached tensors out, no host sync."""
    actor, critic, critic_target = networks["actor"], networks["critic"], networks["critic_target"]
    actor_target = networks["actor_target"]
    # critic: clipped double-Q target (Eq. 7), next actions from the EMA target actor
    with torch.no_grad():
        if args.max_q_backup:  # 10 next actions per s': max per critic, then min
            next_obs_rep = next_obs.repeat_interleave(10, dim=0)
            next_q1, next_q2 = critic_target(next_obs_rep, sample_actions(actor_target, next_obs_rep))
            next_q1 = next_q1.view(-1, 10).amax(1, keepdim=True)
            next_q = torch.min(next_q1, next_q2.view(-1, 10).amax(1, keepdim=True))
        else:
            next_q = critic_target.q_min(next_obs, sample_actions(actor_target, next_obs))
        target_q = rewards + (1 - terminals) * args.gamma * next_q
    current_q1, current_q2 = critic(obs, actions)
    critic_loss = F.mse_loss(current_q1, target_q) + F.mse_loss(current_q2, target_q)
    gradient_step(optimizers["critic_optimizer"], critic, critic_loss, args.grad_norm)

    # actor: DDPM BC (Eq. 6) - eta * Q / |Q| (Eq. 8)
    bc_loss, q_loss = actor_losses(actor, critic, args, obs, actions, swap)
    actor_loss = bc_loss + args.eta * q_loss
    gradient_step(optimizers["actor_optimizer"], actor, actor_loss, args.grad_norm)

    # target critic: Polyak averaging, fused
    with torch.no_grad():
        targets, sources = list(critic_target.parameters()), list(critic.parameters())
        torch._foreach_lerp_(targets, sources, args.tau)
    losses = dict(critic_loss=critic_loss, bc_loss=bc_loss, q_loss=q_loss)
    losses |= dict(actor_loss=actor_loss, q_mean=current_q1.mean())
    return {name: loss.detach() for name, loss in losses.items()}


def update_actor_target(networks: dict, step: int, args: Args):
    """The EMA target actor (Eq. 7) from `ema_start`; until then its initial weights."""
    if step >= args.ema_start and step % args.ema_every == 0:
        with torch.no_grad():
            params = list(networks["actor"].parameters())
            targets = list(networks["actor_target"].parameters())
            torch._foreach_lerp_(targets, params, 1 - args.ema_decay)


@torch.no_grad()
def diagnostics(networks: dict, data: dict, args: Args, step: int) -> dict:
    """What the Q term does, on a batch of its own: Q1 of the policy's actions minus
    the data's, their distance, |grad q_loss| / |grad bc_loss|."""
    actor, critic, device = networks["actor"], networks["critic"], data["obs"].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + step)
        idx = torch.randint(len(data["obs"]), (args.batch_size,), device=device)
        obs, actions = data["obs"][idx], data["actions"][idx]
        policy_actions = sample_actions(actor, obs)
        with torch.enable_grad():  # each loss's own gradient (.grad untouched)
            bc_grads, q_grads = (
                torch.autograd.grad(loss, list(actor.parameters()))
                for loss in actor_losses(actor, critic, args, obs, actions, swap=False)
            )
    q_gap = (critic(obs, policy_actions)[0] - critic(obs, actions)[0]).mean()
    norm = torch.nn.utils.get_total_norm
    q_grad_ratio = norm(q_grads) / norm(bc_grads)
    action_mse = F.mse_loss(policy_actions, actions)
    return dict(q_gap=q_gap, action_mse=action_mse, q_grad_ratio=q_grad_ratio)


@torch.no_grad()
def select_actions(actor: Actor, critic_target: Critic, obs, num_candidates: int, sampler, steps):
    """`num_candidates` actions per state, one drawn by softmax over min-Q."""
    n = obs.shape[0]
    obs_rep = obs.repeat_interleave(num_candidates, dim=0)  # (n * c, obs_dim)
    actions = sample_actions(actor, obs_rep, sampler, steps).view(n, num_candidates, -1)
    q = critic_target.q_min(obs_rep, actions.flatten(0, 1)).view(n, num_candidates)
    probs = F.softmax(q, dim=-1)
    # torch.multinomial's draw, without a host sync
    pick = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)
    return actions[torch.arange(n, device=obs.device), pick]


# Fast paths: torch's functions in fewer kernels (each tested against torch's own)
def mish_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e^x and n = e^x (e^x + 2): tanh(softplus(x)) = n / (n + 2), from one exp."""
    e = torch.exp(x.clamp(max=20.0))  # past 20, n / (n + 2) is 1 in float32
    return e, e * (e + 2)


def mish_derivative(x, e, n) -> torch.Tensor:
    """mish'(x) = n / (n + 2) + 4 x e^x (e^x + 1) / (n + 2)^2."""
    return (n + 4 * x * e * (e + 1) / (n + 2)) / (n + 2)


class MishFunction(torch.autograd.Function):
    """Mish with its closed-form backward: a few kernels, not a dozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        e, n = mish_parts(x)
        ctx.save_for_backward(x, e, n)
        return x * n / (n + 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * mish_derivative(*ctx.saved_tensors)


class Mish(nn.Module):
    """x tanh(softplus(x)): closed form on CPU (over 2x faster), torch's kernel on GPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MishFunction.apply(x) if x.is_cpu else F.mish(x)


# EVALUATION: returns of the evaluation policy, and its decision frequency
def evaluate(policy, make_env, num_episodes: int, seed: int, device, done) -> np.ndarray:
    """Returns of `num_episodes` episodes in a vector env, one policy call per step."""
    num_envs = min(num_episodes, MAX_EVAL_ENVS)
    quota = np.full(num_envs, num_episodes // num_envs)
    quota += np.arange(num_envs) < num_episodes % num_envs
    autoreset = gym.vector.AutoresetMode.SAME_STEP
    envs = gym.vector.SyncVectorEnv([make_env] * num_envs, autoreset_mode=autoreset)
    obs, _ = envs.reset(seed=seed)
    returns, running = [], np.zeros(num_envs)
    finished = np.zeros(num_envs, dtype=int)
    try:
        while (finished < quota).any():
            obs = torch.as_tensor(flatten_obs(obs), dtype=torch.float32, device=device)
            obs, rewards, terminations, truncations, _ = envs.step(policy(obs).cpu().numpy())
            running += rewards
            for i in np.flatnonzero(terminations | truncations):
                if finished[i] < quota[i]:
                    returns.append(running[i])
                    done()
                finished[i] += 1
                running[i] = 0.0
    finally:  # also when a signal interrupts it
        envs.close()
    return np.array(returns)


def decision_frequency(policy, obs: torch.Tensor, warmup=10, repeats=100) -> float:
    """Decisions per second for ONE state, candidates and pick included."""
    for _ in range(warmup):
        policy(obs[:1]).cpu()
    start = time.perf_counter()
    for _ in range(repeats):
        policy(obs[:1]).cpu()  # .cpu() synchronizes the device
    return repeats / (time.perf_counter() - start)


# PLUMBING: data, checks, checkpoints, logging (the same in ofql.py, dql.py, fql.py)
# D4RL names -> Minari ids (medium-expert: medium and expert, combined on first use)
LOCOMOTION = ("hopper", "halfcheetah", "walker2d", "ant", "humanoid")
ANTMAZE = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
ADROIT = ("pen", "door", "hammer", "relocate")
D4RL_TO_MINARI = {
    **{f"{e}-{k}": f"mujoco/{e}/{k}-v0" for e in LOCOMOTION for k in ("medium", "expert", "simple")},
    **{f"{e}-medium-expert": f"mujoco/{e}/medium-expert-v0" for e in LOCOMOTION},
    **{f"antmaze-{k}": f"D4RL/antmaze/{k}-v1" for k in ANTMAZE},
    **{f"kitchen-{k}": f"D4RL/kitchen/{k}-v2" for k in ("complete", "partial", "mixed")},
    **{f"{e}-{k}": f"D4RL/{e}/{k}-v2" for e in ADROIT for k in ("human", "cloned", "expert")},
}
# A task without a row borrows its domain's (else DEFAULT_TASK's)
DOMAIN_ROWS = {e: f"{e}-medium" for e in ("halfcheetah", "hopper", "walker2d")}
DOMAIN_ROWS |= {"antmaze": "antmaze-medium-play", "kitchen": "kitchen-partial"}
DOMAIN_ROWS |= dict.fromkeys(ADROIT, "pen-human")
DEFAULT_TASK = "hopper-medium"
D4RL_REF_SCORES = {  # (random, expert) returns of D4RL's tasks
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "antmaze": (0.0, 1.0),
    "kitchen": (0.0, 4.0),
}
# D4RL's files: gym's v3 envs, whose models are Gymnasium's v4
D4RL_FILE_ENVS = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4"}
D4RL_FILE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{name}-v2.hdf5"
# Valid values, checked first: "[" includes a bound, "(" not; a bound is an expression
RANGES = dict.fromkeys(["seed"], "[0, 2**32 - 1]") | {"threads": "[0, os.cpu_count()]"}
RANGES |= dict.fromkeys(["checkpoint_freq", "total_steps", "eta", "grad_norm", "ema_start"], "[0, inf)")
RANGES |= dict.fromkeys(["batch_size", "eval_freq", "eval_episodes", "final_eval_episodes"], "[1, inf)")
RANGES |= dict.fromkeys(["log_freq", "num_candidates", "ema_every"], "[1, inf)")
RANGES |= dict.fromkeys(["diffusion_steps", "flow_steps", "eval_steps"], "[1, inf)")
RANGES |= dict.fromkeys(["lr", "critic_lr"], "(0, inf)")
RANGES |= dict.fromkeys(["gamma", "ema_decay", "flow_ratio"], "[0, 1]")
RANGES |= {"tau": "(0, 1]", "acting_ratio": "[0, 1 - flow_ratio]"}
MAX_EVAL_ENVS = 50  # evaluation envs that step together
BATCH_KEYS = ("obs", "actions", "rewards", "next_obs", "terminals")
SCRIPT, CHECKPOINT, MODEL = os.path.basename(__file__), "checkpoint.pt", "model.pt"


def resolve_dataset_id(env_id: str) -> str:
    """A Minari id (with a slash) as given; a D4RL name through D4RL_TO_MINARI."""
    name = re.sub(r"-v\d+$", "", env_id)
    if "/" in env_id or name in D4RL_TO_MINARI:
        return D4RL_TO_MINARI.get(name, env_id)
    hint = difflib.get_close_matches(name, D4RL_TO_MINARI, n=3, cutoff=0.5)
    if name.endswith("-medium-replay"):  # not on Minari: D4RL's file
        url = D4RL_FILE_URL.format(name=name.replace("-", "_"))
        hint = [f"--dataset-path {os.path.basename(url)} from {url}"]
    raise ValueError(f"unknown --env-id {env_id}; try {' or '.join(hint + ['a Minari id'])}")


def task_name(env_id: str) -> str:
    """`hopper-medium-v2` or `mujoco/hopper/medium-v0` -> `hopper-medium`."""
    return re.sub(r"-v\d+$", "", "-".join(env_id.split("/")[-2:]))


def task_defaults(args: Args) -> tuple[Args, str]:
    """None fields from the task's row, and a line saying which."""
    task = task_name(args.env_id)
    row = task if task in TASKS else DOMAIN_ROWS.get(task.split("-")[0], DEFAULT_TASK)
    defaults = row_defaults(args, row)
    args = replace(args, **{f: v for f, v in defaults.items() if getattr(args, f) is None})
    line = f"task row {row}" if row == task else f"{task} has no row in TASKS, borrowing {row}'s"
    line += ": " + ", ".join(f"{f} {getattr(args, f)}" for f in defaults)
    differ = [f for f, v in defaults.items() if getattr(args, f) != v]
    return args, line + (f" (not the defaults: {', '.join(differ)})" if differ else "")


def check_args(args: Args):
    """No empty flag; each in its RANGES interval; flags that go together; batches that fit."""
    for flag, value in vars(args).items():  # `--resume $RUN`, RUN unset: not a fresh run
        if value == "":
            raise ValueError(f"--{flag.replace('_', '-')} '': empty; a value, or no flag")
    names = vars(args) | {"inf": math.inf, "os": os}
    for flag, interval in RANGES.items():
        if (value := getattr(args, flag, None)) is None:  # not this script's, or unset
            continue
        low, high = (eval(bound, names) for bound in interval[1:-1].split(", "))
        above = value > low if interval[0] == "(" else value >= low
        if not (above and (value < high if interval[-1] == ")" else value <= high)):
            raise ValueError(f"--{flag.replace('_', '-')} {value}: must be in {interval}")
    gpu = args.cuda and torch.cuda.is_available()
    if args.cudagraphs and not gpu:
        raise ValueError("--cudagraphs needs a CUDA GPU; on CPU, use --compile")
    # a row's bytes, about: in an update (measured: 100-190k), in evaluation (8k)
    need = max(args.batch_size * 2**17, MAX_EVAL_ENVS * args.num_candidates * 2**13)
    memory = torch.cuda.mem_get_info()[1] if gpu else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > memory:
        flags = f"--batch-size {args.batch_size}, --num-candidates {args.num_candidates}"
        raise ValueError(f"{flags}: batches of about {need >> 30} GiB, more than the {memory >> 30} GiB here")


def parse_args() -> tuple[Args, dict | None, str, str]:
    """The command line over a saved run's flags, checked."""
    args, saved = tyro.cli(Args), None
    try:
        if args.eval_only and args.resume:
            raise ValueError("--eval-only FILE evaluates, --resume RUN trains on: one of them")
        if args.resume or args.eval_only:
            flag = "--eval-only" if args.eval_only else "--resume"
            saved = load_saved(args.eval_only or f"{args.resume}/{CHECKPOINT}", flag)
            args = tyro.cli(Args, default=Args(**saved["args"] | {"resume": None}))
        dataset_id = args.dataset_path or resolve_dataset_id(args.env_id)
        args, task_line = task_defaults(args)
        check_args(args)
        step, done = (saved["progress"]["step"], finished(args.resume)) if args.resume else (0, None)
        if args.total_steps < step or (done and args.total_steps <= done["total_steps"]):
            raise ValueError(
                f"--total-steps {args.total_steps}: {args.resume} is at update {step}"
                + (" and finished" if done else "") + "; ask for more, or evaluate it with"
                f" --eval-only {args.resume}/{CHECKPOINT}"
            )  # fmt: skip
        name = re.sub(r"[^\w.-]", "_", f"{args.env_id}__{args.exp_name}__{args.seed}")
        run_dir = args.resume or f"runs/{name}__{int(time.time())}"
        check_writable(run_dir)
    except ValueError as error:
        raise SystemExit("error: " + " ".join(str(error).split())) from None  # one line
    print(task_line)
    return args, saved, dataset_id, run_dir


def load_saved(path: str, flag: str) -> dict:
    """A checkpoint or model of this script, or ValueError naming the flag."""
    try:
        saved = torch.load(path, map_location="cpu")
        Args(**saved["args"])  # every flag one of this script's
        if saved["script"] != SCRIPT:
            raise ValueError(f"written by {saved['script']}")
    except Exception as error:  # no such file, another format, truncated, another script's
        problem = " ".join(str(error).split())[:100]
        raise ValueError(f"{flag} {path}: not a file of {SCRIPT} ({problem})") from None
    return saved


def finished(run_dir: str) -> dict | None:
    """A finished run's summary.json (not a stopped run's)."""
    try:
        with open(f"{run_dir}/summary.json") as f:
            summary = json.load(f)
    except (OSError, ValueError):  # none, or unreadable: no finished result
        return None
    return None if "interrupted_at_step" in summary else summary


def check_writable(run_dir: str):
    """The run folder, or the nearest folder above it, must take files; its name must fit."""
    folder = run_dir
    while not os.path.exists(folder):
        folder = os.path.dirname(folder) or "."
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
        raise ValueError(f"{os.path.abspath(folder)} is not a writable folder: run elsewhere")
    name, longest = os.fsencode(os.path.basename(run_dir)), os.pathconf(folder, "PC_NAME_MAX")
    if len(name) + len(b"-99") > longest:  # room for a suffix
        raise ValueError(f"{run_dir}: a name of {len(name)} bytes, over {longest}: a shorter --exp-name")


def open_run(args: Args, run_dir: str, progress: dict) -> tuple[str, SummaryWriter]:
    """The run folder (-2, -3, ... if taken), wandb, tensorboard."""
    folder, suffix = run_dir, 1
    while not args.resume:
        try:
            os.makedirs(folder)  # fails on a folder that exists: no two runs share one
            break
        except FileExistsError:
            suffix += 1
            folder = f"{run_dir}-{suffix}"
    if summary := finished(folder):  # a finished run goes on: its result is kept
        os.replace(f"{folder}/summary.json", f"{folder}/summary_{summary['total_steps']}.json")
    if args.track:
        try:
            import wandb

            name = os.path.basename(os.path.normpath(folder))
            progress["wandb_id"] = wandb.init(
                project=args.wandb_project_name, entity=args.wandb_entity, name=name,
                config=vars(args), sync_tensorboard=True, save_code=True,
                id=progress["wandb_id"], resume="allow",
            ).id  # fmt: skip
        except Exception as error:  # no login, no network, a bad setting
            if not args.resume:
                os.removedirs(folder)  # and an empty runs/
            problem = " ".join(str(error).split())[:200]
            fix = "`wandb login`, or WANDB_MODE=offline to log locally"
            raise SystemExit(f"error: --track: wandb did not start ({problem}); {fix}") from None
    if args.resume:
        print(f"resuming {folder} from update {progress['step']}")
    writer = SummaryWriter(folder, purge_step=progress["step"] + 1 if args.resume else None)
    table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return folder, writer


def load_dataset(dataset_id: str) -> minari.MinariDataset:
    """The local copy, else medium-expert combined, else a download."""
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        local = minari.storage.get_dataset_path(dataset_id)
    if dataset_id.endswith("/medium-expert-v0"):
        parts = [load_dataset(dataset_id.replace("medium-expert", k)) for k in ("medium", "expert")]
        print(f"{dataset_id}: combining medium and expert into {local}")
        try:
            return minari.combine_datasets(parts, new_dataset_id=dataset_id)
        except BaseException:  # no half-written dataset left in the store
            minari.delete_dataset(dataset_id)
            raise
    print(f"{dataset_id} is not in {local}: downloading it")
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # one line below, not one per retry
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as error:  # no network, or no such dataset
        problem = " ".join(str(error).split())[:200]
        raise ValueError(
            f"{dataset_id}: not in MINARI_DATASETS_PATH and not downloaded ({problem}); "
            f"with internet, `minari download {dataset_id}`, then copy it to {local}"
        ) from None


def flatten_obs(obs) -> np.ndarray:
    """Dict observations (AntMaze's) -> one array, keys sorted."""
    if isinstance(obs, dict):
        return np.concatenate([flatten_obs(obs[k]) for k in sorted(obs)], axis=-1)
    return np.asarray(obs)


def minari_transitions(dataset: minari.MinariDataset) -> dict[str, np.ndarray]:
    """Episodes as transitions; terminal: a termination, not a truncation."""
    columns = {key: [] for key in BATCH_KEYS}
    for episode in dataset.iterate_episodes():
        obs = flatten_obs(episode.observations)  # (N + 1, obs_dim)
        columns["obs"].append(obs[:-1])
        columns["next_obs"].append(obs[1:])
        columns["actions"].append(episode.actions)
        columns["rewards"].append(episode.rewards)
        columns["terminals"].append(episode.terminations)
    return {key: np.concatenate(column) for key, column in columns.items()}


def d4rl_transitions(path: str) -> dict[str, np.ndarray]:
    """A D4RL hdf5 file; without next_observations, rows at `timeouts` and the last go."""
    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    try:
        with h5py.File(path, "r") as f:
            raw = {key: f[key][()] for key in (*keys, "next_observations") if key in f}
    except OSError as error:  # no such file, not hdf5, truncated
        raise ValueError(f"--dataset-path {path}: not a readable hdf5 file ({error})") from None
    if set(keys) - set(raw) or len({len(column) for column in raw.values()}) > 1:
        raise ValueError(f"--dataset-path {path}: not D4RL's columns {keys} of one length")
    keep = np.ones(len(raw["rewards"]), dtype=bool)
    if "next_observations" not in raw:
        keep = ~raw["timeouts"].astype(bool) & (np.arange(len(keep)) < len(keep) - 1)
        raw["next_observations"] = np.roll(raw["observations"], -1, axis=0)
    names = ("observations", "actions", "rewards", "next_observations", "terminals")
    return {key: raw[name][keep] for key, name in zip(BATCH_KEYS, names, strict=True)}


def load_task(args: Args, dataset_id: str, device) -> tuple:
    """The data, checked once; the eval env, its action space, reference returns."""
    domain = task_name(args.env_id).split("-")[0]
    if args.dataset_path:
        if domain not in D4RL_FILE_ENVS:
            raise ValueError(f"--dataset-path takes {', '.join(D4RL_FILE_ENVS)} files")
        data, ref_scores = d4rl_transitions(args.dataset_path), D4RL_REF_SCORES[domain]
        make_env = partial(gym.make, D4RL_FILE_ENVS[domain])
        warnings.filterwarnings("ignore", message=r".*is out of date\. You should consider")
    else:
        try:
            dataset = load_dataset(dataset_id)
        except OSError as error:  # the store is not a folder, or not readable
            store = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
            raise ValueError(f"{dataset_id}: {error} (MINARI_DATASETS_PATH {store})") from None
        data, ref_scores = minari_transitions(dataset), D4RL_REF_SCORES.get(domain)
        meta = dataset.storage.metadata
        ref_scores = ref_scores or (meta.get("ref_min_score"), meta.get("ref_max_score"))
        # AntMaze: an episode ends at the goal, so the score is D4RL's success rate
        goal_ends = {"continuing_task": False} if domain == "antmaze" else {}
        make_env = partial(dataset.recover_environment, eval_env=True, **goal_ends)
    try:
        env = make_env()
        obs_dim = flatten_obs(env.reset(seed=args.seed)[0]).shape[-1]
    except Exception as error:  # a missing package (robotics, mujoco<3.12 for kitchen)
        problem = " ".join(str(error).split())[:200]
        raise ValueError(f"{args.env_id}: its env did not start ({problem})") from None
    env_dims = (obs_dim, env.action_space.shape[0])
    env.close()
    dims = tuple(data[k].shape[1] if data[k].ndim == 2 else None for k in ("obs", "actions"))
    not_finite = [key for key, column in data.items() if not np.isfinite(column).all()]
    for problem, found in {
        f"observations and actions of size {dims}, not the env's {env_dims}": dims != env_dims,
        "no transitions": len(data["rewards"]) == 0,
        f"fewer transitions than --batch-size {args.batch_size}": len(data["rewards"]) < args.batch_size,
        f"values that are not finite in {', '.join(not_finite)}": not_finite,
        "no reference returns (ref_min_score, ref_max_score) in its metadata": None in ref_scores,
    }.items():  # fmt: skip
        if found:
            raise ValueError(f"{args.dataset_path or dataset_id}: {problem}")
    data |= {key: data[key][:, None] for key in ("rewards", "terminals")}  # (N, 1)
    if args.reward_tune == "cql":
        data["rewards"] = (data["rewards"] - 0.5) * 4.0
    elif args.reward_tune == "normalize":
        data["rewards"] = (data["rewards"] - data["rewards"].mean()) / data["rewards"].std()
    data = {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in data.items()}
    return data, make_env, env.action_space, ref_scores


def cuda_graphed(fn, warmup: int = 3):
    """fn from CUDA graphs, one per input shapes and host values."""
    from tensordict.nn import CudaGraphModule

    graphs = {}

    def graphed(*inputs):
        key = tuple(x.shape if torch.is_tensor(x) else x for x in inputs)
        if key not in graphs:
            graphs[key] = CudaGraphModule(fn, warmup=warmup)
        return graphs[key](*inputs)

    return graphed


class Interrupted(BaseException):
    """SIGINT or SIGTERM; no `except Exception` takes it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_requests() -> dict:
    """SIGINT, SIGTERM: in start-up exit; in training checkpoint after the update
    (a second: at once); in evaluation stop at once."""
    stop = {"phase": "start-up", "signals": []}

    def request_stop(signum, frame):
        stop["signals"].append(signum)
        if stop["phase"] == "start-up":
            exit_in_start_up(signum, frame)
        if stop["phase"] == "evaluation" or len(stop["signals"]) > 1:
            raise Interrupted(signum)
        tqdm.write(f"{signal.Signals(signum).name}: checkpointing after this update")

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop


def stopwatch(progress: dict):
    """charge(key): the seconds since the last charge into progress[key]."""
    last = [time.perf_counter()]

    def charge(key: str):
        now = time.perf_counter()
        progress[key] += now - last[0]
        last[0] = now

    return charge


def progress_bar(total: int, initial: int, unit: str, desc=None) -> tqdm:
    """A bar on a terminal; in a log, lines instead."""
    disable = not sys.stdout.isatty()
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, leave=False, disable=disable)


def episode_counter(num_episodes: int, step: int):
    """Called as each episode ends: the bar, or in a log a line a quarter."""
    desc, done = f"evaluation at update {step}", [0]
    bar = progress_bar(num_episodes, 0, "episode", desc)

    def episode_done():
        done[0] += 1
        bar.update()
        if done[0] == num_episodes:
            bar.close()
        elif bar.disable and num_episodes >= 50 and done[0] % (num_episodes // 4) == 0:
            print(f"{desc}: {done[0]}/{num_episodes} episodes", flush=True)

    return episode_done


def log_losses(writer, losses: dict, progress: dict, args: Args, bar: tqdm):
    """Losses to tensorboard and the bar or a line; a non-finite one ends the run."""
    step, losses = progress["step"], {name: loss.item() for name, loss in losses.items()}
    if not all(map(math.isfinite, losses.values())):
        last_step, last = progress["last_losses"]
        raise SystemExit(
            f"error: non-finite loss at update {step} ({format_losses(losses)}); at update "
            f"{last_step}: {format_losses(last)}; nothing saved since. Lower --lr or "
            "--critic-lr, or clip gradients with --grad-norm"
        )
    progress["last_losses"] = (step, losses)
    for name, value in losses.items():
        writer.add_scalar(f"losses/{name}", value, step)
    rate = step / max(progress["train_seconds"], 1e-9)
    writer.add_scalar("charts/updates_per_second", rate, step)
    values = " | ".join(f"{k[:-5]} {losses[k]:.3f}" for k in ("critic_loss", "bc_loss", "q_loss"))
    bar.update(step - bar.n)
    bar.set_postfix_str(values)
    if bar.disable:  # a log: a line
        eta = tqdm.format_interval((args.total_steps - step) / rate)
        print(f"update {step}/{args.total_steps} | {rate:.1f} updates/s | ETA {eta} | {values}")


def format_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in losses.items()) or "none yet"


def save_checkpoint(run_dir: str, networks: dict, optimizers: dict, progress: dict, args):
    states = {name: m.state_dict() for name, m in (networks | optimizers).items()}
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    progress["checkpoint_step"] = progress["step"]
    states |= {"rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "progress": progress}
    save_atomically(f"{run_dir}/{CHECKPOINT}", states | {"args": asdict(args), "script": SCRIPT})


def restore(saved: dict, networks: dict, optimizers: dict, resume: bool):
    """The networks; with --resume also the optimizers and RNG streams."""
    try:
        for name, module in networks.items():
            module.load_state_dict(saved[name])
    except (KeyError, RuntimeError) as error:  # another dataset's shapes, a missing EMA
        problem = " ".join(str(error).split())[:200]
        raise SystemExit(f"error: the saved networks do not fit ({problem})") from None
    if resume:
        for name, optimizer in optimizers.items():
            lrs = [group["lr"] for group in optimizer.param_groups]  # the flags' (--lr wins)
            optimizer.load_state_dict(saved[name])
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"]:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])


def write_summary(run_dir, progress, args, dataset_id, device, **results) -> dict:
    ups = progress["step"] / progress["train_seconds"] if progress["train_seconds"] else None
    summary = {"algorithm": SCRIPT[:-3], "exp_name": args.exp_name, "env_id": args.env_id}
    summary |= {"dataset_id": dataset_id, "seed": args.seed, "total_steps": progress["step"]}
    summary |= results | {"num_candidates": args.num_candidates}
    scores = [score for _, score in progress["evaluations"]]
    summary["best_normalized_score"] = max(scores, default=None)
    summary |= {k: progress[k] for k in ("train_seconds", "eval_seconds", "compile_seconds")}
    summary["updates_per_second"] = ups
    summary["hours_per_million_updates"] = 1e6 / ups / 3600 if ups else None
    summary |= {"device": str(device), "threads": torch.get_num_threads()}
    summary["resumed_from_step"] = progress["start_step"] if args.resume else None
    summary |= {"evaluations": progress["evaluations"], "args": asdict(args)}
    save_atomically(f"{run_dir}/summary.json", summary)
    return summary


def result_line(summary: dict, run_dir: str) -> str:
    """The run's last line."""
    line = f"{summary['dataset_id']}: normalized score {summary['normalized_score']:.1f} +- "
    line += f"{summary['normalized_score_std']:.1f} (best {summary['best_normalized_score']:.1f}) | "
    if summary["updates_per_second"]:
        line += f"training {summary['train_seconds']:.0f} s, "
        line += f"{summary['updates_per_second']:.1f} updates/s | "
    return line + f"{summary['decision_hz']:.1f} decisions/s | {run_dir}/summary.json"


def stopped_line(interrupted: Interrupted, progress: dict, args: Args, run_dir: str) -> str:
    """Where a stopped run stopped, and how to go on."""
    line = f"{interrupted}: stopped at update {progress['step']}"
    if args.eval_only or progress["checkpoint_step"] is None:
        return line + ": nothing to resume, run the same command again"
    step = progress["checkpoint_step"]
    return line + f"; continue from update {step}: python {SCRIPT} --resume {run_dir}"


def save_atomically(path: str, content: dict):
    """Via a temporary file: a stop never leaves half a file."""
    try:
        if path.endswith(".json"):
            with open(path + ".tmp", "w") as f:
                json.dump(content, f, indent=2)
        else:
            torch.save(content, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as error:  # a full disk (torch: RuntimeError), a folder removed
        problem = " ".join(str(error).split())[:200]
        folder = os.path.dirname(path) or "."
        problem += f"; {shutil.disk_usage(folder).free >> 20} MiB free" if os.path.isdir(folder) else ""
        raise SystemExit(f"error: {path} not written ({problem}); what was saved before stands") from None
    finally:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")


if __name__ == "__main__":
    stop = stop_requests()  # SIGINT, SIGTERM: see its phases
    args, saved, dataset_id, run_dir = parse_args()

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    try:  # the data, checked; its env, for evaluation
        data, make_env, action_space, (ref_min, ref_max) = load_task(args, dataset_id, device)
    except ValueError as error:
        raise SystemExit("error: " + " ".join(str(error).split())) from None  # one line
    obs_dim, action_dim = data["obs"].shape[1], data["actions"].shape[1]
    print(f"{dataset_id}: {len(data['obs']):,} transitions, {obs_dim=}, {action_dim=}, {device}")

    actor = Actor(obs_dim, action_dim, action_space.low, action_space.high, args.diffusion_steps).to(device)
    actor_target = Actor(obs_dim, action_dim, action_space.low, action_space.high, args.diffusion_steps).to(device)
    actor_target.load_state_dict(actor.state_dict())  # drawn, then overwritten: the RNG stream as before
    critic = Critic(obs_dim, action_dim).to(device)
    critic_target = Critic(obs_dim, action_dim).to(device)
    critic_target.load_state_dict(critic.state_dict())
    # fused: one kernel; capturable: step() inside a CUDA graph
    adam = partial(torch.optim.Adam, fused=True, capturable=args.cudagraphs and not args.compile)
    actor_optimizer = adam(actor.parameters(), lr=args.lr)
    critic_optimizer = adam(critic.parameters(), lr=args.critic_lr)
    networks = {"actor": actor, "critic": critic, "critic_target": critic_target}
    networks["actor_target"] = actor_target  # the EMA of Eq. 7
    optimizers = {"actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer}
    if saved:  # --resume: networks, optimizers, RNG; --eval-only: networks
        restore(saved, networks, optimizers, resume=bool(args.resume))
    progress = {"step": 0, "evaluations": [], "checkpoint_step": None, "wandb_id": None}
    progress |= dict.fromkeys(["train_seconds", "eval_seconds", "compile_seconds"], 0.0)
    progress |= saved["progress"] if args.resume else {}
    progress |= {"start_step": progress["step"], "last_losses": (progress["step"], {})}
    if args.eval_only:  # no training, nothing to save
        args = replace(args, total_steps=0, save_model=False)

    # the run folder last: a failed start leaves none
    if stop["signals"]:  # a signal that a library swallowed
        exit_in_start_up(stop["signals"][0], None)
    run_dir, writer = open_run(args, run_dir, progress)

    train_step = partial(update, networks, optimizers, args)
    policy = partial(select_actions, actor, critic_target, num_candidates=args.num_candidates)
    policy = partial(policy, sampler=args.eval_sampler, steps=args.eval_steps)
    if args.compile:
        import torch._inductor.config

        torch._inductor.config.fallback_random = True  # torch's RNG stream: resumable
        train_step, policy = torch.compile(train_step), torch.compile(policy)
    if args.cudagraphs:
        train_step, policy = cuda_graphed(train_step), cuda_graphed(policy)

    def evaluate_and_log(step: int, num_episodes: int) -> np.ndarray:
        stop["phase"] = "evaluation"  # a signal stops it: the checkpoint precedes it
        if stop["signals"]:
            raise Interrupted(stop["signals"][0])
        done = episode_counter(num_episodes, step)
        returns = evaluate(policy, make_env, num_episodes, args.seed + step, device, done)
        stop["phase"] = "training"
        scores = 100 * (returns - ref_min) / (ref_max - ref_min)
        progress["evaluations"].append((step, float(scores.mean())))
        writer.add_scalar("charts/normalized_score", scores.mean(), step)
        tqdm.write(f"update {step}: normalized score {scores.mean():.1f} +- {scores.std():.1f}")
        charge("eval_seconds")
        return scores

    # TRY NOT TO MODIFY: the training loop; a checkpoint precedes each evaluation
    charge, compiled, stop["phase"] = stopwatch(progress), set(), "training"
    bar = progress_bar(args.total_steps, progress["step"], "update")
    try:
        if 0 < progress["step"] < args.total_steps and progress["step"] % args.eval_freq == 0:
            evaluate_and_log(progress["step"], args.eval_episodes)  # resumed before it
        for step in range(progress["step"] + 1, args.total_steps + 1):
            idx = torch.randint(len(data["obs"]), (args.batch_size,), device=device)
            swap = bool(torch.rand(()) < 0.5)  # which critic gives Q: a host coin
            losses = train_step(*(data[key][idx] for key in BATCH_KEYS), swap)
            update_actor_target(networks, step, args)
            progress["step"] = step
            if args.compile and swap not in compiled:  # the first call per coin compiles
                compiled.add(swap)
                charge("compile_seconds")

            stopping = bool(stop["signals"])  # read once
            evaluating = step % args.eval_freq == 0 and step < args.total_steps
            checkpointing = stopping or evaluating or step == args.total_steps
            checkpointing |= args.checkpoint_freq > 0 and step % args.checkpoint_freq == 0
            if step % args.log_freq == 0 or checkpointing:
                charge("train_seconds")
                losses |= diagnostics(networks, data, args, step)
                log_losses(writer, losses, progress, args, bar)
            if checkpointing:
                save_checkpoint(run_dir, networks, optimizers, progress, args)
            if stopping:
                raise Interrupted(stop["signals"][0])
            if evaluating:
                evaluate_and_log(step, args.eval_episodes)
        bar.close()

        if args.save_model:
            model = {name: module.state_dict() for name, module in networks.items()}
            save_atomically(f"{run_dir}/{MODEL}", model | {"args": asdict(args), "script": SCRIPT})
            print(f"model saved to {run_dir}/{MODEL}")

        scores = evaluate_and_log(args.total_steps, args.final_eval_episodes)
        stop["phase"] = "evaluation"
        decision_hz = decision_frequency(policy, data["obs"])
        stop["phase"] = "training"  # the summary is written whole
    except Interrupted as interrupted:
        stop["phase"] = "training"
        step = progress["step"]
        write_summary(run_dir, progress, args, dataset_id, device, interrupted_at_step=step)
        writer.close()
        print(stopped_line(interrupted, progress, args, run_dir), file=sys.stderr)
        sys.exit(128 + interrupted.signum)
    writer.add_scalar("charts/decision_hz", decision_hz, args.total_steps)
    final = dict(normalized_score=float(scores.mean()), normalized_score_std=float(scores.std()))
    final |= dict(episode_normalized_scores=scores.tolist(), eval_episodes=len(scores))
    final |= dict(return_mean=float(scores.mean() / 100 * (ref_max - ref_min) + ref_min))
    final |= dict(decision_hz=decision_hz)
    final |= dict(eval_sampler=args.eval_sampler, eval_steps=args.eval_steps)
    summary = write_summary(run_dir, progress, args, dataset_id, device, **final)
    print(result_line(summary, run_dir))
    writer.close()
    if args.track:
        import wandb

        wandb.finish()
    if stop["signals"]:  # one that came while the results were written
        print(f"{Interrupted(stop['signals'][0])}: stopped at the end, all saved", file=sys.stderr)
        sys.exit(128 + stop["signals"][0])
