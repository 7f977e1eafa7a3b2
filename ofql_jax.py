"""One-Step Flow Q-Learning (OFQL) in JAX (flax.linen + optax): ofql.py, translated. Docs: docs/ofql_jax.md

Paper: "Revisiting Diffusion Q-Learning: From Iterative Denoising to One-Step Action Generation".
OFQL is Diffusion Q-Learning with its T-step DDPM replaced by an average-velocity (MeanFlow) policy
u(a_t, r, t; s) that acts in ONE network call, a = eps - u(eps, 0, 1; s) (Eq. 18). Behaviour cloning
regresses u onto the MeanFlow target (Eq. 16-17), from one Jacobian-vector product; the Q term
backpropagates through that one call (no BPTT); the critic's next actions come from the current policy
(no target actor). The algorithm, the task table, the flags and summary.json are ofql.py's.

Usage:
    python ofql_jax.py --env-id hopper-medium-v2    # a D4RL name, mapped to a Minari dataset
    python ofql_jax.py --env-id hopper-medium-v2 --paper-variant    # the paper's exact OFQL (ofql.py's docstring)
    MINARI_DATASETS_PATH=/path/to/datasets python ofql_jax.py --env-id sac/hopper/medium-replay-v0
    python ofql_jax.py --env-id hopper-medium-replay-v2 --dataset-path hopper_medium_replay-v2.hdf5
    python ofql_jax.py --resume runs/{run_name}     # continue an interrupted run (Ctrl-C checkpoints)
    python ofql_jax.py --num-seeds 5                # seeds 1..5 in one vmapped program: mean +- std across seeds
    python ofql_jax.py --help                       # every flag

What is JAX's own (docs/ofql_jax.md): the dataset lives on the device and each batch is drawn inside the compiled
update; --updates-per-call updates run in one jitted `lax.scan`, the train state donated; PRNG keys are explicit;
layers start as torch.nn.Linear's; files are msgpack (model.msgpack, checkpoint.msgpack). --num-seeds N trains N seeds
as one program, jax.vmap over a leading seed axis of the train states (each seed's keys those of its single run). On a
GPU, XLA may run float32 matmuls in TF32: JAX_DEFAULT_MATMUL_PRECISION=highest gives torch's arithmetic.
"""

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

import flax
import flax.linen as nn
import gymnasium as gym
import h5py
import jax
import jax.numpy as jnp
import minari
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    num_seeds: int = 1
    """train seeds --seed ... --seed + num_seeds - 1 together, one vmapped program on the shared dataset"""
    cuda: bool = True
    """if toggled, JAX runs on the GPU when there is one (--no-cuda: the CPU)"""
    threads: int = 0
    """XLA CPU threads: 1 runs each op on one thread (steadiest on a busy small machine); 0: XLA's default"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "ofql"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """whether to save the trained networks into `runs/{run_name}/model.msgpack`"""
    eval_only: bool = False
    """skip training: evaluate the networks in --checkpoint"""
    checkpoint: str | None = None
    """a `model.msgpack` written by --save-model (or a `checkpoint.msgpack`), for --eval-only"""
    checkpoint_freq: int = 0
    """also write `runs/{run_name}/checkpoint.msgpack` every this many updates (0: at evaluations, the end, a stop)"""
    resume: str | None = None
    """a run folder to continue from its checkpoint.msgpack, with the run's own flags (those given here win)"""
    updates_per_call: int = 10
    """updates in one compiled call (a lax.scan), lowered to divide --log-freq, --eval-freq, --checkpoint-freq and
    --total-steps (and the update resumed from)"""

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
    **{flag: "[1, inf)" for flag in ("num_candidates", "max_eval_envs", "updates_per_call", "num_seeds", "ema_every")},
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


# ALGO LOGIC: networks, one-step sampling, time pairs, the MeanFlow loss (one JVP), the update, action selection
class Linear(nn.Module):
    """nn.Dense with torch.nn.Linear's initialisation, weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)): both
    scripts start from the same distribution of networks."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bound = 1 / np.sqrt(x.shape[-1])

        def init(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        bias = self.param("bias", init, (self.features,))
        return x @ kernel + bias


class SinusoidalPosEmb(nn.Module):
    dim: int

    def __call__(self, x: jax.Array) -> jax.Array:  # (B,) -> (B, dim)
        half = self.dim // 2
        freqs = jnp.exp(jnp.arange(half) * -(np.log(10000) / (half - 1)))
        x = x[:, None] * freqs[None, :]
        return jnp.concatenate((jnp.sin(x), jnp.cos(x)), axis=-1)


def time_mlp(t_dim: int = 16) -> nn.Sequential:
    return nn.Sequential([SinusoidalPosEmb(t_dim), Linear(t_dim * 2), jax.nn.mish, Linear(t_dim)])


class Actor(nn.Module):
    """Average velocity u(a_t, r, t; s): DQL's MLP with a second time embedding, for r (interval: for t - r)."""

    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    interval: bool = False
    hidden_dim: int = 256
    t_dim: int = 16

    def setup(self):
        self.t_mlp = time_mlp(self.t_dim)
        self.r_mlp = time_mlp(self.t_dim)
        self.mid_layer = nn.Sequential([
            Linear(self.hidden_dim), jax.nn.mish,
            Linear(self.hidden_dim), jax.nn.mish,
            Linear(self.hidden_dim), jax.nn.mish,
        ])  # fmt: skip
        self.final_layer = Linear(self.action_dim)

    def __call__(self, a_t: jax.Array, r: jax.Array, t: jax.Array, obs: jax.Array) -> jax.Array:
        x = jnp.concatenate([a_t, self.t_mlp(t), self.r_mlp(t - r if self.interval else r), obs], axis=-1)
        return self.final_layer(self.mid_layer(x))


class Critic(nn.Module):
    """Twin Q networks, as in DQL."""

    hidden_dim: int = 256

    def setup(self):
        def q_net() -> nn.Sequential:
            return nn.Sequential([
                Linear(self.hidden_dim), jax.nn.mish,
                Linear(self.hidden_dim), jax.nn.mish,
                Linear(self.hidden_dim), jax.nn.mish,
                Linear(1),
            ])  # fmt: skip

        self.q1_model, self.q2_model = q_net(), q_net()

    def __call__(self, obs: jax.Array, action: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = jnp.concatenate([obs, action], axis=-1)
        return self.q1_model(x), self.q2_model(x)

    def q_min(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        return jnp.minimum(*self(obs, action))


class ActorTrainState(TrainState):
    target_params: flax.core.FrozenDict | None  # the EMA copy (--target-actor, --eval-ema); None: none (the paper's)


class CriticTrainState(TrainState):
    target_params: flax.core.FrozenDict


def sample_actions(actor: Actor, params, obs: jax.Array, key: jax.Array, noise_scale: float = 1.0) -> jax.Array:
    """One-step action a = eps - u(eps, r=0, t=1; s) (Eq. 18), clipped to the action bounds; differentiable."""
    noise = noise_scale * jax.random.normal(key, (obs.shape[0], actor.action_dim))
    zeros, ones = jnp.zeros(obs.shape[0]), jnp.ones(obs.shape[0])
    low, high = jnp.array(actor.action_low), jnp.array(actor.action_high)
    return jnp.clip(noise - actor.apply(params, noise, zeros, ones, obs), low, high)


def sample_time_pairs(
    key, batch_size: int, flow_ratio: float, mu: float, sigma: float, acting_ratio=0.0, zero_r_ratio=0.0
):
    """(t, r) from a logit-normal, ordered so that r <= t; r = t for the first `flow_ratio` of the batch, (r, t) =
    (0, 1), the pair one-step actions are drawn with (Eq. 18), for the last `acting_ratio`, and r = 0 for the
    `zero_r_ratio` before them (the later shares win)."""
    pair = jax.nn.sigmoid(jax.random.normal(key, (2, batch_size)) * sigma + mu)
    t, r = pair.max(axis=0), pair.min(axis=0)
    index = jnp.arange(batch_size)
    equal, acting = index < round(flow_ratio * batch_size), index >= batch_size - round(acting_ratio * batch_size)
    zero_r = index >= batch_size - round((acting_ratio + zero_r_ratio) * batch_size)
    return jnp.where(acting, 1.0, t), jnp.where(zero_r, 0.0, jnp.where(equal, t, r))


def mean_flow_target(actor: Actor, params, a_t, r, t, obs, v) -> jax.Array:
    """u_tgt = v - (t - r) du/dt with du/dt = v . d_a u + d_t u (Eq. 16): one JVP along the tangent (v, 0, 1), with no
    gradient through the target."""
    params = jax.lax.stop_gradient(params)
    tangents = (v, jnp.zeros_like(r), jnp.ones_like(t))
    _, du_dt = jax.jvp(lambda a_t, r, t: actor.apply(params, a_t, r, t, obs), (a_t, r, t), tangents)
    return jax.lax.stop_gradient(v - (t - r)[:, None] * du_dt)


def mean_flow_loss(actor: Actor, params, obs, actions, t, r, noise, power: float = 0.0, c: float = 1e-3) -> jax.Array:
    """MeanFlow behaviour cloning (Eq. 17) on the path a_t = (1 - t) a + t eps with velocity v = eps - a: u regressed
    onto u_tgt (Eq. 16). power > 0: MeanFlow's adaptive weighting, each pair's error (mean over action dimensions)
    weighted by the stopped 1 / (error + c)^power."""
    a_t = (1 - t[:, None]) * actions + t[:, None] * noise
    u_tgt = mean_flow_target(actor, params, a_t, r, t, obs, noise - actions)
    error = jnp.mean((actor.apply(params, a_t, r, t, obs) - u_tgt) ** 2, axis=-1)  # (B,)
    return jnp.mean(error / (jax.lax.stop_gradient(error) + c) ** power)


def td_loss(critic: Critic, params, obs, actions, target_q) -> tuple[jax.Array, jax.Array]:
    """Both critics regressed onto the same (clipped double-Q) target; also Q1's mean, for logging."""
    current_q1, current_q2 = critic.apply(params, obs, actions)
    return jnp.mean((current_q1 - target_q) ** 2) + jnp.mean((current_q2 - target_q) ** 2), current_q1.mean()


def adam(lr: float, grad_norm: float) -> optax.GradientTransformation:
    """Adam after clipping the gradients' global norm (grad_norm 0: no clipping), one per network as in ofql.py; the
    same state either way, so that a resumed run may change --grad-norm."""
    return optax.chain(optax.clip_by_global_norm(grad_norm) if grad_norm > 0 else optax.identity(), optax.adam(lr))


def actor_losses(actor: Actor, critic: Critic, args: Args, params, critic_params, obs, actions, key, swap):
    """The actor's two losses: MeanFlow BC (Eq. 17) at sampled (t, r), and -Q / |Q| (Eq. 19), the Q term through ONE
    network call."""
    key_time, key_noise, key_pi = jax.random.split(key, 3)
    t, r = sample_time_pairs(
        key_time, obs.shape[0], args.flow_ratio, args.time_mu, args.time_sigma, args.acting_ratio, args.zero_r_ratio
    )
    noise = jax.random.normal(key_noise, actions.shape)
    bc_loss = mean_flow_loss(actor, params, obs, actions, t, r, noise, args.adaptive_power, args.adaptive_c)
    q1, q2 = critic.apply(critic_params, obs, sample_actions(actor, params, obs, key_pi))
    scale1, scale2 = jax.lax.stop_gradient(jnp.abs(q1).mean()), jax.lax.stop_gradient(jnp.abs(q2).mean())
    return bc_loss, -jnp.where(swap, q2.mean() / scale1, q1.mean() / scale2)


def update(actor: Actor, critic: Critic, args: Args, actor_state, critic_state, batch: tuple, key: jax.Array):
    """One update of critic, actor and target critic: a pure function of the train states, a batch and a key."""
    obs, actions, rewards, next_obs, terminals = batch
    key_next, key_actor, key_swap = jax.random.split(key, 3)
    next_params = actor_state.target_params if args.target_actor else actor_state.params
    # critic: clipped double-Q target with next actions in one step from the CURRENT policy (the paper: no target
    # actor), or with --target-actor from the EMA target actor
    if args.max_q_backup:  # 10 next actions per s': max per critic, then min over critics
        next_obs_rep = jnp.repeat(next_obs, 10, axis=0)
        next_actions = sample_actions(actor, next_params, next_obs_rep, key_next)
        next_qs = critic.apply(critic_state.target_params, next_obs_rep, next_actions)
        next_q = jnp.minimum(*(next_q.reshape(-1, 10).max(1, keepdims=True) for next_q in next_qs))
    else:
        next_actions = sample_actions(actor, next_params, next_obs, key_next)
        next_q = critic.apply(critic_state.target_params, next_obs, next_actions, method=Critic.q_min)
    target_q = jax.lax.stop_gradient(rewards + (1 - terminals) * args.gamma * next_q)
    critic_loss_fn = partial(td_loss, critic, obs=obs, actions=actions, target_q=target_q)
    (critic_loss, q_mean), grads = jax.value_and_grad(critic_loss_fn, has_aux=True)(critic_state.params)
    critic_state = critic_state.apply_gradients(grads=grads)

    # actor: MeanFlow BC (Eq. 17) - eta * Q / |Q| (Eq. 19)
    swap = jax.random.uniform(key_swap) < 0.5  # a random critic for Q, the other for its scale (no lax.cond)

    def actor_loss_fn(params):
        bc_loss, q_loss = actor_losses(actor, critic, args, params, critic_state.params, obs, actions, key_actor, swap)
        return bc_loss + args.eta * q_loss, (bc_loss, q_loss)

    (actor_loss, (bc_loss, q_loss)), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(actor_state.params)
    actor_state = actor_state.apply_gradients(grads=grads)  # no gradient step of the critic
    if actor_state.target_params is not None:  # the EMA copy: the actor before `ema_start`, then every `ema_every`
        before, ema = actor_state.step < args.ema_start, actor_state.step % args.ema_every == 0  # this update's number
        weight = jnp.where(before, 1.0, jnp.where(ema, 1 - args.ema_decay, 0.0))
        actor_target = optax.incremental_update(actor_state.params, actor_state.target_params, weight)
        actor_state = actor_state.replace(target_params=actor_target)

    # target critic: Polyak averaging
    target_params = optax.incremental_update(critic_state.params, critic_state.target_params, args.tau)
    critic_state = critic_state.replace(target_params=target_params)
    losses = dict(critic_loss=critic_loss, bc_loss=bc_loss, q_loss=q_loss, actor_loss=actor_loss, q_mean=q_mean)
    return actor_state, critic_state, losses


def update_many(actor, critic, args: Args, num_updates: int, actor_state, critic_state, key, first, data):
    """`num_updates` updates in one `lax.scan` (as fast as a Python-unrolled loop, far quicker to compile), each on a
    batch drawn on the device. `first` carries the number of the first update with a non-finite loss (0: none yet).
    Returns the new states, key and `first`, and the losses of the last update."""

    def body(carry, step_key):
        actor_state, critic_state, first = carry
        key_batch, key_update = jax.random.split(step_key)
        idx = jax.random.randint(key_batch, (args.batch_size,), 0, data["obs"].shape[0])
        batch = tuple(data[name][idx] for name in BATCH_KEYS)
        actor_state, critic_state, losses = update(actor, critic, args, actor_state, critic_state, batch, key_update)
        finite = jnp.isfinite(jnp.stack(list(losses.values()))).all()
        first = jnp.where(finite | (first > 0), first, actor_state.step)  # step: this update's number
        return (actor_state, critic_state, first), losses

    key, *step_keys = jax.random.split(key, num_updates + 1)
    (actor_state, critic_state, first), losses = jax.lax.scan(
        body, (actor_state, critic_state, first), jnp.stack(step_keys)
    )
    return actor_state, critic_state, key, first, jax.tree.map(lambda x: x[-1], losses)


def over_seeds(f: Callable, num_seeds: int, in_axes=0) -> Callable:
    """f mapped over a leading seed axis of its arguments (jax.vmap; in_axes None for what seeds share: the dataset).
    One seed calls f itself, with no seed axis: the single-seed program, its numbers and its files, unchanged."""
    return jax.vmap(f, in_axes=in_axes) if num_seeds > 1 else f


def diagnostics(actor: Actor, critic: Critic, args: Args, actor_params, critic_params, data, key, step) -> dict:
    """What the Q term does to the policy, on a batch of its own (its key folded with the step: the training keys are
    left as they were): q_gap, the critic's Q1 of the policy's actions minus Q1 of the data's (above 0: rated above the
    data; growing with eta while the score does not: the policy exploits the critic); action_mse, the squared distance
    of the policy's actions from the data's at the same states (how far the Q term moves the policy from the data);
    acting_bc_loss, the MeanFlow loss (Eq. 17) at the acting pair (r, t) = (0, 1) of one-step sampling (Eq. 18), beside
    the batch's bc_loss; q_grad_ratio, the norm of q_loss's gradient over the actor's weights against bc_loss's (times
    eta: the Q term's pull beside behaviour cloning's, comparable across the scripts)."""
    key_batch, key_pi, key_noise, key_actor = jax.random.split(jax.random.fold_in(key, step), 4)
    idx = jax.random.randint(key_batch, (args.batch_size,), 0, data["obs"].shape[0])
    obs, actions = data["obs"][idx], data["actions"][idx]
    policy_actions = sample_actions(actor, actor_params, obs, key_pi)
    ones, noise = jnp.ones(obs.shape[0]), jax.random.normal(key_noise, actions.shape)
    acting_bc_loss = mean_flow_loss(actor, actor_params, obs, actions, ones, 1 - ones, noise)
    q_gap = (critic.apply(critic_params, obs, policy_actions)[0] - critic.apply(critic_params, obs, actions)[0]).mean()
    both_losses = partial(actor_losses, actor, critic, args, critic_params=critic_params, obs=obs, actions=actions)
    grads = jax.jacrev(lambda p: jnp.stack(both_losses(p, key=key_actor, swap=False)))(actor_params)  # leaves (2, ...)
    bc_grad_norm, q_grad_norm = jnp.sqrt(sum(jnp.sum(g.reshape(2, -1) ** 2, 1) for g in jax.tree.leaves(grads)))
    action_mse = jnp.mean((policy_actions - actions) ** 2)
    losses = dict(q_gap=q_gap, action_mse=action_mse, q_grad_ratio=q_grad_norm / bc_grad_norm)
    return losses | dict(acting_bc_loss=acting_bc_loss)


def select_actions(
    actor: Actor, critic: Critic, actor_params, critic_target_params, obs, key, num_candidates: int, noise_scale: float
):
    """Evaluation policy: `num_candidates` actions per state, one drawn from softmax over the target critic's min-Q."""
    n = obs.shape[0]
    key_actions, key_pick = jax.random.split(key)
    obs_rep = jnp.repeat(obs, num_candidates, axis=0)  # (n * c, obs_dim)
    actions = sample_actions(actor, actor_params, obs_rep, key_actions, noise_scale).reshape(n, num_candidates, -1)
    q = critic.apply(critic_target_params, obs_rep, actions.reshape(n * num_candidates, -1), method=Critic.q_min)
    pick = jax.random.categorical(key_pick, q.reshape(n, num_candidates), axis=-1)  # (n,): a draw from softmax(q)
    return actions[jnp.arange(n), pick]


# EVALUATION: normalized returns of the evaluation policy, and its decision frequency
def evaluate(policy, make_env, num_episodes: int, max_envs: int, seeds: list[int], episode_done) -> np.ndarray:
    """Returns (seeds, episodes): `num_episodes` episodes of each seed's policy in its own envs (reset with its seed),
    all in one vectorized env with one policy call per step for all seeds and envs; `episode_done()` as each one
    ends. policy(obs, active) takes the observations seed by seed and which seeds still run episodes."""
    num_seeds, num_envs = len(seeds), min(num_episodes, max_envs)
    quota = np.full(num_envs, num_episodes // num_envs) + (np.arange(num_envs) < num_episodes % num_envs)
    quota = np.tile(quota, num_seeds)
    envs = gym.vector.SyncVectorEnv([make_env] * len(quota), autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=[seed + i for seed in seeds for i in range(num_envs)])  # a single run's env seeds
    returns, running, finished = [[] for _ in seeds], np.zeros(len(quota)), np.zeros(len(quota), dtype=int)
    try:
        while (finished < quota).any():
            active = (finished < quota).reshape(num_seeds, num_envs).any(axis=1)
            actions = np.asarray(policy(flatten_obs(obs).astype(np.float32), active))
            obs, rewards, terminations, truncations, _ = envs.step(actions)
            running += rewards
            for i in np.flatnonzero(terminations | truncations):
                if finished[i] < quota[i]:
                    returns[i // num_envs].append(running[i])
                    episode_done()
                finished[i] += 1
                running[i] = 0.0
    finally:  # also when a signal interrupts it
        envs.close()
    return np.array(returns)


def decision_frequency(policy, obs: np.ndarray, warmup: int = 10, repeats: int = 100) -> float:
    """Decisions per second for ONE state (of each seed, in one call: `obs` is one state per seed), candidate sampling
    and selection included, result on the host."""
    active = np.ones(len(obs), dtype=bool)
    for _ in range(warmup):  # the first call compiles the policy for one state
        np.asarray(policy(obs, active))
    start = time.perf_counter()
    for _ in range(repeats):
        np.asarray(policy(obs, active))  # np.asarray waits for the device
    return repeats / (time.perf_counter() - start)


# PLUMBING: dataset names and loading, checks, checkpoints, logging (ofql.py's; the files msgpack, not torch.save)
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
SCRIPT, CHECKPOINT, MODEL = os.path.basename(__file__), "checkpoint.msgpack", "model.msgpack"
NETWORKS, OPTIMIZERS = ("actor", "critic", "critic_target"), ("actor_optimizer", "critic_optimizer")
LOSSES = ("critic_loss", "bc_loss", "q_loss", "actor_loss", "q_mean")
LOSSES += ("q_gap", "action_mse", "q_grad_ratio", "acting_bc_loss")  # the diagnostics, at log steps


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
            f"--eval-only needs --checkpoint PATH, a model.msgpack written by --save-model (or a checkpoint.msgpack), "
            f"and --checkpoint goes with --eval-only (continue a run with --resume); got {args.checkpoint}"
        )


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
            run_seeds = saved["args"].get("num_seeds", 1)  # 1 in checkpoints from before the flag
            if args.num_seeds != run_seeds:
                raise ValueError(f"--num-seeds {args.num_seeds}: the run trains {run_seeds} seeds")
        elif args.eval_only and args.checkpoint:
            saved = load_saved(args.checkpoint, "--checkpoint")
            if args.eval_ema is None:  # act as the model's run did
                args = replace(args, eval_ema=saved["args"].get("eval_ema", False))
            if args.eval_ema and "actor_target" not in saved:
                raise ValueError(f"--eval-ema: {args.checkpoint} holds no EMA copy of the actor (its run acted with its"
                                 " trained weights, without --target-actor); use --eval-ema False")  # fmt: skip
            model_args = {"num_seeds": 1, "interval_conditioning": False} | saved["args"]  # older models lack them
            args = replace(
                args, num_seeds=model_args["num_seeds"], interval_conditioning=model_args["interval_conditioning"]
            )
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
        with open(path, "rb") as f:
            saved = flax.serialization.msgpack_restore(f.read())  # nested dicts of numpy arrays and values
    except Exception as error:  # not msgpack (a torch .pt), truncated, empty
        problem = " ".join(str(error).split(". ")[0].split())[:100]
        hint = " (.pt files are the torch scripts')" if path.endswith(".pt") else ""
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


def dataset_to_tensors(transitions: dict[str, np.ndarray], reward_tune: str, device) -> dict[str, jax.Array]:
    """Reward shaping per task, then float32 arrays on `device`: rewards and terminals as (N, 1)."""
    data = transitions | {"rewards": transitions["rewards"][:, None], "terminals": transitions["terminals"][:, None]}
    if reward_tune == "cql":
        data["rewards"] = (data["rewards"] - 0.5) * 4.0
    elif reward_tune == "normalize":
        data["rewards"] = (data["rewards"] - data["rewards"].mean()) / data["rewards"].std()
    return {k: jax.device_put(np.asarray(v, dtype=np.float32), device) for k, v in data.items()}


def reference_scores(dataset: minari.MinariDataset, dataset_id: str, domain: str) -> tuple[float, float]:
    """D4RL's (min, max) return for the domain, else the dataset's own reference scores."""
    if domain in D4RL_REF_SCORES:
        return D4RL_REF_SCORES[domain]
    metadata = dataset.storage.metadata
    if metadata.get("ref_min_score") is None or metadata.get("ref_max_score") is None:
        raise ValueError(f"{dataset_id}: no D4RL reference returns for {domain!r} and none in the dataset's metadata")
    return metadata["ref_min_score"], metadata["ref_max_score"]


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


def log_losses(writer: SummaryWriter, losses: dict, first_nonfinite: np.ndarray, progress: dict, args: Args, bar):
    """The losses (read from the device, one per seed) to tensorboard and a progress line (means over seeds; or the
    terminal's bar); a non-finite loss, whose first update the scan tracked, ends the run before anything is saved,
    naming its seed."""
    seeds = [args.seed + k for k in range(args.num_seeds)]
    step, losses = progress["step"], {name: np.asarray(losses[name]).tolist() for name in LOSSES}  # jit sorts keys
    first = np.reshape(first_nonfinite, -1)  # per seed
    if first.any():
        k = int(np.argmin(np.where(first > 0, first, np.iinfo(first.dtype).max)))  # the seed that went first
        which = f" of seed {seeds[k]}" if args.num_seeds > 1 else ""
        writer.close()
        last_step, last = progress["last_losses"]
        raise SystemExit(
            f"error: non-finite loss at update {first[k]}{which} (at update {step}: "
            f"{format_losses(seed_values(losses, k))}); the last finite losses, at update {last_step}: "
            f"{format_losses(seed_values(last, k))}. Nothing was saved after them. Lower --lr or --critic-lr, or clip "
            "gradients with --grad-norm."
        )
    progress["last_losses"] = (step, losses)
    for name, values in losses.items():
        add_seed_scalars(writer, f"losses/{name}", values, step, seeds)
    updates_per_second = step / max(progress["train_seconds"], 1e-9)
    writer.add_scalar("charts/updates_per_second", updates_per_second, step)
    values = f"critic {np.mean(losses['critic_loss']):.3f} | bc {np.mean(losses['bc_loss']):.3f} | "
    values += f"q {np.mean(losses['q_loss']):.3f}"
    if bar is not None:  # the bar shows the rate and the ETA
        bar.update(step - bar.n)
        bar.set_postfix_str(values)
        return
    eta = duration((args.total_steps - step) / updates_per_second)
    print(f"update {step}/{args.total_steps} | {updates_per_second:.1f} updates/s | ETA {eta} | {values}")


def seed_values(values: dict, k: int) -> dict:
    """Seed k's entry of each value: a list per seed in a run of several seeds, a number in a run of one."""
    return {name: np.reshape(value, -1)[k] for name, value in values.items()}


def add_seed_scalars(writer: SummaryWriter, tag: str, values, step: int, seeds: list[int]):
    """One value per seed to tensorboard: their mean under `tag`, and with several seeds each under tag/seed_{seed}."""
    values = np.reshape(values, -1)
    writer.add_scalar(tag, values.mean(), step)
    for seed, value in zip(seeds, values, strict=True) if len(seeds) > 1 else ():
        writer.add_scalar(f"{tag}/seed_{seed}", value, step)


def seed_results(progress: dict, seeds: list[int], scores: np.ndarray | None = None) -> dict:
    """What a run of several seeds adds to summary.json (nothing for one seed): each seed's evaluations and best
    score; with the final `scores` (seeds, episodes), each seed's score and their mean and std across seeds."""
    if len(seeds) == 1:
        return {}
    curves = [[(step, each[k]) for step, each in progress["seed_evaluations"]] for k in range(len(seeds))]
    results = {"num_seeds": len(seeds), "seeds": seeds}
    results["seed_best_normalized_scores"] = [max((score for _, score in curve), default=None) for curve in curves]
    if scores is not None:
        seed_scores = scores.mean(axis=1)
        results["seed_normalized_scores"] = seed_scores.tolist()
        results["seed_normalized_score_mean"] = float(seed_scores.mean())
        results["seed_normalized_score_std"] = float(seed_scores.std())  # across seeds: what papers report
    return results | {"seed_evaluations": curves}


def seeds_line(summary: dict) -> str:
    """The last line of a run of several seeds: the final score's mean +- std across seeds, and each seed's."""
    each = ", ".join(f"{score:.1f}" for score in summary["seed_normalized_scores"])
    return (
        f"{summary['dataset_id']}: {summary['num_seeds']} seeds, normalized score "
        f"{summary['seed_normalized_score_mean']:.1f} +- {summary['seed_normalized_score_std']:.1f} across seeds "
        f"(seeds {summary['seeds'][0]}-{summary['seeds'][-1]}: {each})"
    )


def format_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in losses.items()) or "none yet"


def named_states(actor_state: ActorTrainState, critic_state: CriticTrainState) -> dict:
    """The train states by ofql.py's names: NETWORKS' parameters (and --target-actor's), then OPTIMIZERS' states."""
    networks = {"actor": actor_state.params, "critic": critic_state.params, "critic_target": critic_state.target_params}
    if actor_state.target_params is not None:
        networks["actor_target"] = actor_state.target_params
    return networks | {"actor_optimizer": actor_state.opt_state, "critic_optimizer": critic_state.opt_state}


def save_checkpoint(run_dir: str, actor_state, critic_state, key: jax.Array, progress: dict, args: Args):
    states = named_states(actor_state, critic_state)
    state = {name: flax.serialization.to_state_dict(value) for name, value in states.items()}
    progress["checkpoint_step"] = progress["step"]
    progress = progress | {  # msgpack takes lists, not tuples
        "evaluations": [list(evaluation) for evaluation in progress["evaluations"]],
        "last_losses": list(progress["last_losses"]),
    }
    content = state | {"key": key, "progress": progress, "args": asdict(args), "script": SCRIPT}
    save_atomically(f"{run_dir}/{CHECKPOINT}", content)


def keep_final_summary(run_dir: str):
    """A finished run that goes on keeps its final summary.json as summary_{updates}.json."""
    summary = final_summary(run_dir)
    if summary:
        os.replace(f"{run_dir}/summary.json", f"{run_dir}/summary_{summary['total_steps']}.json")
        print(f"{run_dir}: the finished run's summary.json kept as summary_{summary['total_steps']}.json")


def restore(saved: dict, actor_state, critic_state, key: jax.Array, resume: bool) -> tuple:
    """The networks from a checkpoint or model; when resuming, also the optimizers, the update count and the PRNG
    key. Returns the train states and the key."""
    templates = named_states(actor_state, critic_state)
    names = [name for name in templates if resume or name not in OPTIMIZERS]
    try:
        state = {name: flax.serialization.from_state_dict(templates[name], saved[name]) for name in names}
        shapes = [[leaf.shape for leaf in jax.tree.leaves(tree[name])] for tree in (state, templates) for name in names]
        if shapes[: len(names)] != shapes[len(names) :]:
            raise ValueError("the arrays have other shapes")
    except (KeyError, ValueError) as error:  # another script's model, or another dataset's shapes
        problem = " ".join(str(error).split())[:200]
        raise SystemExit(f"error: the saved networks do not fit this script and dataset ({problem})") from None
    state = jax.device_put(state)
    actor_state = actor_state.replace(params=state["actor"], target_params=state.get("actor_target"))
    critic_state = critic_state.replace(params=state["critic"], target_params=state["critic_target"])
    if resume:
        step = saved["progress"]["step"]  # for every seed, in a buffer per state: both are donated
        actor_state = actor_state.replace(
            step=jnp.full_like(actor_state.step, step), opt_state=state["actor_optimizer"]
        )
        critic_state = critic_state.replace(
            step=jnp.full_like(critic_state.step, step), opt_state=state["critic_optimizer"]
        )
        key = jax.device_put(saved["key"])
    return actor_state, critic_state, key


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
    summary |= {"device": device.platform, "threads": args.threads}
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
    stopped run never leaves half a file, and a failed write no temporary one. JSON or msgpack."""
    held, handlers = [], {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in handlers:  # Python runs signal handlers in the main thread, which is writing: record them
        signal.signal(signum, lambda signum, frame: held.append(signum))
    try:
        if path.endswith(".json"):
            with open(path + ".tmp", "w") as f:
                json.dump(content, f, indent=2)
        else:
            with open(path + ".tmp", "wb") as f:
                f.write(flax.serialization.msgpack_serialize(jax.device_get(content)))
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

    # TRY NOT TO MODIFY: seeding (the backend is chosen first: the first JAX computation starts it)
    if args.threads == 1:  # read when the CPU backend starts
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    if not args.cuda:
        jax.config.update("jax_platforms", "cpu")  # do not even start (and preallocate on) a GPU
    device = jax.devices()[0]
    jax.config.update("jax_default_device", device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    # each seed's keys as its single run derives them, stacked on a leading seed axis (none with one seed)
    seeds, seed_axis = [args.seed + k for k in range(args.num_seeds)], (args.num_seeds,) if args.num_seeds > 1 else ()
    seed_keys = [jax.random.split(jax.random.PRNGKey(seed), 4) for seed in seeds]
    key, actor_key, critic_key, eval_key = jnp.stack(seed_keys, axis=1) if args.num_seeds > 1 else seed_keys[0]

    # data: transitions on the device; for evaluation, the env the data was recorded on
    try:
        transitions, make_env, action_space, (ref_min, ref_max) = load_task(args, dataset_id)
        data = dataset_to_tensors(transitions, args.reward_tune, device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    obs_dim, action_dim = data["obs"].shape[1], data["actions"].shape[1]
    sizes = f"{len(data['obs']):,} transitions, obs_dim {obs_dim}, action_dim {action_dim}"
    print(f"{dataset_id}: {sizes}, {device.platform}")
    if args.num_seeds > 1:
        print(f"seeds {seeds[0]}-{seeds[-1]}: {args.num_seeds} train states in one vmapped program, the data shared")

    action_bounds = tuple(action_space.low.tolist()), tuple(action_space.high.tolist())
    actor = Actor(action_dim, *action_bounds, args.interval_conditioning)
    critic = Critic()
    obs0, actions0, times0 = data["obs"][:1], data["actions"][:1], jnp.zeros(1)

    def train_states(actor_key: jax.Array, critic_key: jax.Array) -> tuple[ActorTrainState, CriticTrainState]:
        actor_params = actor.init(actor_key, actions0, times0, times0, obs0)
        critic_params = critic.init(critic_key, obs0, actions0)
        actor_state = ActorTrainState.create(
            apply_fn=actor.apply,
            params=actor_params,
            target_params=jax.tree.map(jnp.copy, actor_params) if args.target_actor or args.eval_ema else None,
            tx=adam(args.lr, args.grad_norm),
        )
        critic_state = CriticTrainState.create(
            apply_fn=critic.apply,
            params=critic_params,
            target_params=jax.tree.map(jnp.copy, critic_params),
            tx=adam(args.critic_lr, args.grad_norm),
        )
        return actor_state, critic_state

    actor_state, critic_state = over_seeds(train_states, args.num_seeds)(actor_key, critic_key)
    if saved:  # --resume: networks, optimizers, update count, PRNG key; --eval-only: networks
        actor_state, critic_state, key = restore(saved, actor_state, critic_state, key, resume=bool(args.resume))
    progress = saved["progress"] if args.resume else {"step": 0, "evaluations": [], "wandb_id": None}
    if not args.resume:  # policy calls per seed: a number with one seed
        progress |= {"policy_calls": np.zeros(seed_axis, dtype=int).tolist()}
        progress |= {"seed_evaluations": []} if args.num_seeds > 1 else {}
    progress |= {"start_step": progress["step"], "last_losses": (progress["step"], {})}
    progress.setdefault("checkpoint_step", progress["step"] if args.resume else None)
    for name in ("train_seconds", "eval_seconds", "compile_seconds"):
        progress.setdefault(name, 0.0)
    if args.eval_only:
        args.total_steps = 0

    # logging: only now that the data loaded, so that a failed start leaves no run folder behind
    run_dir = run_dir if args.resume else claim_run_folder(run_dir)
    writer = start_logging(args, run_dir, progress)
    if args.resume:
        keep_final_summary(run_dir)
        print(f"resuming {run_dir} from update {progress['step']}")

    # --updates-per-call updates per compiled call, as many as divide every update at which the host acts
    host_steps = (args.log_freq, args.eval_freq, args.checkpoint_freq, args.total_steps, progress["step"])
    updates_per_call = math.gcd(args.updates_per_call, *host_steps)
    if updates_per_call != args.updates_per_call and args.total_steps > progress["step"]:
        print(f"--updates-per-call {args.updates_per_call} lowered to {updates_per_call} to divide --log-freq, "
              "--eval-freq, --checkpoint-freq and --total-steps (and the update resumed from)")  # fmt: skip
    update_seeds = over_seeds(partial(update_many, actor, critic, args, updates_per_call), args.num_seeds,
                              in_axes=(0, 0, 0, 0, None))  # fmt: skip
    train_step = jax.jit(update_seeds, donate_argnums=(0, 1, 2, 3))

    def seed_policy(actor_params, critic_target_params, eval_key: jax.Array, call, obs: jax.Array) -> jax.Array:
        key = jax.random.fold_in(eval_key, call)  # a fresh key per call, no host-side split
        return select_actions(
            actor, critic, actor_params, critic_target_params, obs, key, args.num_candidates, args.eval_noise_scale
        )

    @jax.jit
    def policy_step(actor_params, critic_target_params, eval_key, calls, obs_by_seed) -> jax.Array:
        """Every seed's actions, (seeds x states, action_dim): one program per call, no device work outside it."""
        actions = over_seeds(seed_policy, args.num_seeds)(
            actor_params, critic_target_params, eval_key, calls, obs_by_seed
        )
        return actions.reshape(-1, action_dim)

    diagnose = jax.jit(over_seeds(partial(diagnostics, actor, critic, args), args.num_seeds, (0, 0, None, 0, None)))
    diagnostics_key = jnp.stack([jax.random.PRNGKey(seed) for seed in seeds]).reshape(*seed_axis, 2)  # not a split one

    def policy(obs: np.ndarray, active: np.ndarray) -> jax.Array:
        """Actions for (seeds x states, obs_dim) observations, seed by seed, in one call. A seed counts the calls
        while it is `active` (checkpointed): its evaluation keys are its single run's, and a resumed run's."""
        calls = np.asarray(progress["policy_calls"])
        progress["policy_calls"] = (calls + active.reshape(seed_axis)).tolist()
        obs_by_seed = obs.reshape(*seed_axis, -1, obs.shape[-1])
        acting_params = actor_state.target_params if args.eval_ema else actor_state.params
        return policy_step(acting_params, critic_state.target_params, eval_key, calls, obs_by_seed)

    def evaluate_and_log(step: int, num_episodes: int) -> np.ndarray:
        """Scores (seeds, episodes); logged: the mean, and with several seeds each seed's mean and their spread."""
        stop["phase"] = "evaluation"  # a signal interrupts it: the run resumes from the checkpoint made before it
        if stop["signals"]:
            raise Interrupted(stop["signals"][0])
        episode_done = episode_counter(num_episodes * len(seeds), step)
        env_seeds = [seed + step for seed in seeds]
        returns = evaluate(policy, make_env, num_episodes, args.max_eval_envs, env_seeds, episode_done)
        stop["phase"] = "training"
        scores = 100 * (returns - ref_min) / (ref_max - ref_min)
        seed_scores, pooled = scores.mean(axis=1), scores.reshape(-1)
        progress["evaluations"].append((step, float(pooled.mean())))  # with equal episodes, the mean of seeds
        add_seed_scalars(writer, "charts/normalized_score", seed_scores, step, seeds)
        line = f"update {step}: normalized score {pooled.mean():.1f} +- {pooled.std():.1f} over {len(pooled)} episodes"
        if args.num_seeds > 1:
            progress["seed_evaluations"].append([step, seed_scores.tolist()])  # msgpack takes lists
            each = ", ".join(f"{score:.1f}" for score in seed_scores)
            line += f"; across seeds {seed_scores.mean():.1f} +- {seed_scores.std():.1f} ({each})"
        tqdm.write(line)
        return scores

    # TRY NOT TO MODIFY: the training loop. A checkpoint precedes each evaluation: a run resumed there evaluates first
    charge = stopwatch(progress)
    first_nonfinite = jnp.zeros(seed_axis, dtype=jnp.int32)  # the first update with a non-finite loss (0: none yet)
    if args.total_steps > progress["step"]:  # compiled ahead of the loop, timed apart from training
        print(f"compiling {updates_per_call} updates per call (XLA: seconds on a CPU, up to minutes on a GPU)")
        compiling = time.perf_counter()
        train_step = train_step.lower(actor_state, critic_state, key, first_nonfinite, data).compile()
        charge("compile_seconds")
        print(f"compiled {updates_per_call} updates per call in {time.perf_counter() - compiling:.1f} s")
    stop["phase"] = "training"
    bar = progress_bar(args.total_steps, progress["step"], "update")
    try:
        if 0 < progress["step"] < args.total_steps and progress["step"] % args.eval_freq == 0:
            evaluate_and_log(progress["step"], args.eval_episodes)
            charge("eval_seconds")
        for step in range(progress["step"] + updates_per_call, args.total_steps + 1, updates_per_call):
            actor_state, critic_state, key, first_nonfinite, losses = train_step(
                actor_state, critic_state, key, first_nonfinite, data
            )  # a batch drawn and updated on the device, updates_per_call times; dispatched, not waited for
            progress["step"] = step

            stopping = bool(stop["signals"])  # read once: a later signal is handled after the next call
            evaluating = step % args.eval_freq == 0 and step < args.total_steps
            checkpointing = stopping or evaluating or step == args.total_steps
            checkpointing |= args.checkpoint_freq > 0 and step % args.checkpoint_freq == 0
            if step % args.log_freq == 0 or checkpointing:
                losses |= diagnose(actor_state.params, critic_state.params, data, diagnostics_key, step)
                host_losses, first = jax.device_get((losses, first_nonfinite))  # the only host synchronisation
                charge("train_seconds")
                log_losses(writer, host_losses, first, progress, args, bar)
            if checkpointing:  # before this update's evaluation, which draws policy keys
                save_checkpoint(run_dir, actor_state, critic_state, key, progress, args)
            if stopping:
                raise Interrupted(stop["signals"][0])
            if evaluating:
                evaluate_and_log(step, args.eval_episodes)
                charge("eval_seconds")
        if bar is not None:
            bar.close()

        if args.save_model:
            networks = named_states(actor_state, critic_state)
            model = {
                name: flax.serialization.to_state_dict(networks[name]) for name in networks if name not in OPTIMIZERS
            }
            save_atomically(f"{run_dir}/{MODEL}", model | {"args": asdict(args), "script": SCRIPT})
            print(f"model saved to {run_dir}/{MODEL}")

        # final evaluation, decision frequency and summary
        scores = evaluate_and_log(args.total_steps, args.final_eval_episodes)  # (seeds, episodes)
        stop["phase"] = "evaluation"
        decision_hz = decision_frequency(policy, np.repeat(data["obs"][:1], args.num_seeds, axis=0))
    except Interrupted as interrupted:
        stop["phase"] = "stopping"
        write_summary(run_dir, progress, args, dataset_id, device, updates_per_call=updates_per_call,
                      interrupted_at_step=progress["step"], **seed_results(progress, seeds))  # fmt: skip
        writer.close()
        print(stopped_line(interrupted, progress, args, run_dir), file=sys.stderr)
        sys.exit(128 + interrupted.signum)
    writer.add_scalar("charts/decision_hz", decision_hz, args.total_steps)
    pooled = scores.reshape(-1)  # every episode of every seed
    final = dict(normalized_score=float(pooled.mean()), normalized_score_std=float(pooled.std()))
    final |= dict(episode_normalized_scores=pooled.tolist())  # each episode's, seed by seed: a rare failure shows here
    final |= dict(return_mean=float(pooled.mean() / 100 * (ref_max - ref_min) + ref_min), eval_episodes=len(scores[0]))
    final |= dict(decision_hz=decision_hz, updates_per_call=updates_per_call, **seed_results(progress, seeds, scores))
    summary = write_summary(run_dir, progress, args, dataset_id, device, **final)
    stop["phase"] = "done"
    print(result_line(summary, run_dir))
    if args.num_seeds > 1:
        print(seeds_line(summary))
    writer.close()
    if args.track:
        import wandb

        wandb.finish()
