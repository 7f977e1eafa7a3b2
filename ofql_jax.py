"""OFQL in JAX (flax + optax): ofql.py translated. Docs: docs/ofql_jax.md

ofql.py's algorithm, tasks, flags and summary.json. JAX's own: batches drawn on the
device, --updates-per-call updates per jitted lax.scan, explicit PRNG keys, msgpack
files; --num-seeds N: N seeds as one vmapped program, each with its single run's keys.
On a GPU, JAX_DEFAULT_MATMUL_PRECISION=highest gives torch's arithmetic (no TF32).

Usage:
    python ofql_jax.py --env-id hopper-medium-v2
    python ofql_jax.py --env-id hopper-medium-v2 --paper-variant
    python ofql_jax.py --num-seeds 5  # seeds 1..5 in one program
    python ofql_jax.py --resume runs/{run_name}  # continue a stopped run
"""

import os
import signal
import sys

if __name__ == "__main__":  # a signal while the libraries import: one line

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
    """train seeds --seed ... --seed + num_seeds - 1 as one vmapped program"""
    cuda: bool = True
    """if toggled, JAX runs on the GPU when there is one"""
    threads: int = 1
    """1: each XLA CPU op on one thread (steadiest); 0: XLA's default"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "ofql"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    save_model: bool = False
    """save the trained networks into `runs/{run_name}/model.msgpack`"""
    eval_only: str | None = None
    """no training: evaluate this model or checkpoint .msgpack (its run's flags)"""
    checkpoint_freq: int = 0
    """also checkpoint every this many updates (0: at evaluations)"""
    resume: str | None = None
    """a run folder to continue, with its flags (those given win)"""
    updates_per_call: int = 10
    """updates per compiled call, lowered to divide the host's steps"""

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
    paper_variant: bool = False
    """the paper's exact OFQL: acting ratio 0, no EMA, its eta (on expert data: the defaults)"""
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
    flow_ratio: float = 0.5
    """share of each batch with r = t (flow matching pairs)"""
    acting_ratio: float | None = None
    """share of each batch at the acting pair (r, t) = (0, 1)"""
    eval_ema: bool | None = None
    """act with the actor's EMA (as MeanFlow samples)"""
    ema_decay: float = 0.995
    """decay of the actor's EMA"""
    ema_start: int = 1000
    """the EMA starts at this update (the actor until then)"""
    ema_every: int = 5
    """the EMA updates every this many updates"""


# DQL's per-task values; eta is ours, the paper publishes none (docs/ofql.md)
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
OUR_VARIANT = {"acting_ratio": 0.25, "eval_ema": True}
PAPER_VARIANT = {"acting_ratio": 0.0, "eval_ema": False}
PAPER_ETAS = {"halfcheetah": 0.01, "hopper": 0.01, "walker2d": 0.01}  # best of its grid
TIME_MU, TIME_SIGMA = -0.4, 1.0  # the logit-normal of t and r (MeanFlow's)


def row_defaults(args: Args, row: str) -> dict:
    """The task row's values and the variant's: ours, or the paper's (--paper-variant; expert data)."""
    values = dict(zip(TASK_FIELDS, TASKS[row], strict=True))
    expert_data = task_name(args.env_id).split("-", 1)[-1] == "expert"
    if not (args.paper_variant or expert_data):
        return values | OUR_VARIANT
    return values | PAPER_VARIANT | {"eta": PAPER_ETAS.get(row.split("-")[0], values["eta"])}


# ALGO LOGIC: networks, one-step sampling, the MeanFlow loss, the update, action selection
class SinusoidalPosEmb(nn.Module):
    dim: int

    def __call__(self, x: jax.Array) -> jax.Array:  # (B,) -> (B, dim)
        half = self.dim // 2
        freqs = jnp.exp(jnp.arange(half) * -(np.log(10000) / (half - 1)))
        x = x[:, None] * freqs[None, :]
        return jnp.concatenate((jnp.sin(x), jnp.cos(x)), axis=-1)


def time_mlp(t_dim: int = 16) -> nn.Sequential:
    layers = [SinusoidalPosEmb(t_dim), Linear(t_dim * 2), jax.nn.mish]
    return nn.Sequential([*layers, Linear(t_dim)])


def mlp(hidden_dim: int, out_dim: int | None = None) -> nn.Sequential:
    """DQL's three hidden layers with Mish; a last layer of out_dim."""
    layers = [x for _ in range(3) for x in (Linear(hidden_dim), jax.nn.mish)]
    return nn.Sequential(layers + ([Linear(out_dim)] if out_dim else []))


class Actor(nn.Module):
    """Average velocity u(a_t, r, t; s): DQL's MLP, a second time embedding for r."""

    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    hidden_dim: int = 256
    t_dim: int = 16

    def setup(self):
        self.t_mlp = time_mlp(self.t_dim)
        self.r_mlp = time_mlp(self.t_dim)
        self.mid_layer = mlp(self.hidden_dim)
        self.final_layer = Linear(self.action_dim)

    def __call__(self, a_t, r, t, obs) -> jax.Array:
        x = [a_t, self.t_mlp(t), self.r_mlp(r), obs]
        return self.final_layer(self.mid_layer(jnp.concatenate(x, axis=-1)))


class Critic(nn.Module):
    """Twin Q networks, as in DQL."""

    hidden_dim: int = 256

    def setup(self):
        self.q1_model = mlp(self.hidden_dim, 1)
        self.q2_model = mlp(self.hidden_dim, 1)

    def __call__(self, obs, action) -> tuple[jax.Array, jax.Array]:
        x = jnp.concatenate([obs, action], axis=-1)
        return self.q1_model(x), self.q2_model(x)

    def q_min(self, obs, action) -> jax.Array:
        return jnp.minimum(*self(obs, action))


class Linear(nn.Module):
    """nn.Dense initialised as torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bound = 1 / np.sqrt(x.shape[-1])

        def init(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        return x @ kernel + self.param("bias", init, (self.features,))


class State(TrainState):
    target_params: flax.core.FrozenDict | None  # the critic's target, the actor's EMA


def adam(lr: float, grad_norm: float) -> optax.GradientTransformation:
    """Adam after clipping (0: none); one state shape either way."""
    clip = optax.clip_by_global_norm(grad_norm) if grad_norm > 0 else optax.identity()
    return optax.chain(clip, optax.adam(lr))


def train_states(actor: Actor, critic: Critic, args: Args, data, actor_key, critic_key):
    obs, actions, times = data["obs"][:1], data["actions"][:1], jnp.zeros(1)
    actor_params = actor.init(actor_key, actions, times, times, obs)
    critic_params = critic.init(critic_key, obs, actions)
    ema = jax.tree.map(jnp.copy, actor_params) if args.eval_ema else None
    target = jax.tree.map(jnp.copy, critic_params)
    tx, critic_tx = adam(args.lr, args.grad_norm), adam(args.critic_lr, args.grad_norm)
    return (
        State.create(apply_fn=actor.apply, params=actor_params, target_params=ema, tx=tx),
        State.create(apply_fn=critic.apply, params=critic_params, target_params=target, tx=critic_tx),
    )


def sample_actions(actor: Actor, params, obs, key) -> jax.Array:
    """One step, a = eps - u(eps, r=0, t=1; s) (Eq. 18), clipped; differentiable."""
    n = obs.shape[0]
    noise = jax.random.normal(key, (n, actor.action_dim))
    u = actor.apply(params, noise, jnp.zeros(n), jnp.ones(n), obs)
    return jnp.clip(noise - u, jnp.array(actor.action_low), jnp.array(actor.action_high))


def sample_time_pairs(key, batch_size: int, flow_ratio: float, acting_ratio: float):
    """(t, r) logit-normal with r <= t; r = t on the first `flow_ratio` of the batch,
    (r, t) = (0, 1), the acting pair (Eq. 18), on the last `acting_ratio`."""
    pair = jax.nn.sigmoid(jax.random.normal(key, (2, batch_size)) * TIME_SIGMA + TIME_MU)
    t, r = pair.max(axis=0), pair.min(axis=0)
    index = jnp.arange(batch_size)
    equal = index < round(flow_ratio * batch_size)
    acting = index >= batch_size - round(acting_ratio * batch_size)
    return jnp.where(acting, 1.0, t), jnp.where(acting, 0.0, jnp.where(equal, t, r))


def mean_flow_target(actor: Actor, params, a_t, r, t, obs, v) -> jax.Array:
    """u_tgt = v - (t - r) du/dt, du/dt from one JVP along (v, 0, 1) (Eq. 16); stopped."""
    params = jax.lax.stop_gradient(params)
    tangents = (v, jnp.zeros_like(r), jnp.ones_like(t))
    u = lambda a_t, r, t: actor.apply(params, a_t, r, t, obs)  # noqa: E731
    _, du_dt = jax.jvp(u, (a_t, r, t), tangents)
    return jax.lax.stop_gradient(v - (t - r)[:, None] * du_dt)


def mean_flow_loss(actor: Actor, params, obs, actions, t, r, noise) -> jax.Array:
    """MeanFlow BC (Eq. 17) on a_t = (1 - t) a + t eps, velocity v = eps - a."""
    a_t = (1 - t[:, None]) * actions + t[:, None] * noise
    u_tgt = mean_flow_target(actor, params, a_t, r, t, obs, noise - actions)
    error = jnp.mean((actor.apply(params, a_t, r, t, obs) - u_tgt) ** 2, axis=-1)
    return jnp.mean(error)


def td_loss(critic: Critic, params, obs, actions, target_q):
    """Both critics onto the clipped double-Q target; Q1's mean, to log."""
    q1, q2 = critic.apply(params, obs, actions)
    return jnp.mean((q1 - target_q) ** 2) + jnp.mean((q2 - target_q) ** 2), q1.mean()


def actor_losses(actor, critic, args, params, critic_params, obs, actions, key, swap):
    """MeanFlow BC (Eq. 17) and -Q / |Q| (Eq. 19), the Q term through ONE call."""
    key_time, key_noise, key_pi = jax.random.split(key, 3)
    t, r = sample_time_pairs(key_time, obs.shape[0], args.flow_ratio, args.acting_ratio)
    noise = jax.random.normal(key_noise, actions.shape)
    bc_loss = mean_flow_loss(actor, params, obs, actions, t, r, noise)
    q1, q2 = critic.apply(critic_params, obs, sample_actions(actor, params, obs, key_pi))
    scale1 = jax.lax.stop_gradient(jnp.abs(q1).mean())
    scale2 = jax.lax.stop_gradient(jnp.abs(q2).mean())
    # a random critic for Q, the other its scale
    return bc_loss, -jnp.where(swap, q2.mean() / scale1, q1.mean() / scale2)


def update(actor, critic, args: Args, actor_state, critic_state, batch, key):
    """Critic, actor, its EMA and the target critic: a pure function."""
    obs, actions, rewards, next_obs, terminals = batch
    key_next, key_actor, key_swap = jax.random.split(key, 3)
    # critic: clipped double-Q target, next actions from the CURRENT policy
    target_params = critic_state.target_params
    if args.max_q_backup:  # 10 next actions per s': max per critic, then min
        next_obs_rep = jnp.repeat(next_obs, 10, axis=0)
        next_actions = sample_actions(actor, actor_state.params, next_obs_rep, key_next)
        next_qs = critic.apply(target_params, next_obs_rep, next_actions)
        next_q = jnp.minimum(*(q.reshape(-1, 10).max(1, keepdims=True) for q in next_qs))
    else:
        next_actions = sample_actions(actor, actor_state.params, next_obs, key_next)
        next_q = critic.apply(target_params, next_obs, next_actions, method=Critic.q_min)
    target_q = jax.lax.stop_gradient(rewards + (1 - terminals) * args.gamma * next_q)
    loss_fn = partial(td_loss, critic, obs=obs, actions=actions, target_q=target_q)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (critic_loss, q_mean), grads = grad_fn(critic_state.params)
    critic_state = critic_state.apply_gradients(grads=grads)

    # actor: MeanFlow BC (Eq. 17) - eta * Q / |Q| (Eq. 19)
    swap = jax.random.uniform(key_swap) < 0.5

    def actor_loss_fn(params):
        losses = actor_losses(actor, critic, args, params, critic_state.params, obs, actions, key_actor, swap)
        return losses[0] + args.eta * losses[1], losses

    grad_fn = jax.value_and_grad(actor_loss_fn, has_aux=True)
    (actor_loss, (bc_loss, q_loss)), grads = grad_fn(actor_state.params)
    actor_state = actor_state.apply_gradients(grads=grads)
    if actor_state.target_params is not None:  # EMA: DQL's schedule
        step = actor_state.step  # this update's number
        weight = jnp.where(step % args.ema_every == 0, 1 - args.ema_decay, 0.0)
        weight = jnp.where(step < args.ema_start, 1.0, weight)
        ema = optax.incremental_update(actor_state.params, actor_state.target_params, weight)
        actor_state = actor_state.replace(target_params=ema)

    # target critic: Polyak averaging
    target_params = optax.incremental_update(critic_state.params, target_params, args.tau)
    critic_state = critic_state.replace(target_params=target_params)
    losses = dict(critic_loss=critic_loss, bc_loss=bc_loss, q_loss=q_loss)
    losses |= dict(actor_loss=actor_loss, q_mean=q_mean)
    return actor_state, critic_state, losses


def update_many(actor, critic, args, num_updates, actor_state, critic_state, key, first, data):
    """`num_updates` updates in one lax.scan on batches drawn on the device; `first`:
    the first update with a non-finite loss (0: none)."""

    def body(carry, step_key):
        actor_state, critic_state, first = carry
        key_batch, key_update = jax.random.split(step_key)
        idx = jax.random.randint(key_batch, (args.batch_size,), 0, data["obs"].shape[0])
        batch = tuple(data[name][idx] for name in BATCH_KEYS)
        actor_state, critic_state, losses = update(actor, critic, args, actor_state, critic_state, batch, key_update)
        finite = jnp.isfinite(jnp.stack(list(losses.values()))).all()
        first = jnp.where(finite | (first > 0), first, actor_state.step)
        return (actor_state, critic_state, first), losses

    key, *step_keys = jax.random.split(key, num_updates + 1)
    carry = (actor_state, critic_state, first)
    (actor_state, critic_state, first), losses = jax.lax.scan(body, carry, jnp.stack(step_keys))
    return actor_state, critic_state, key, first, jax.tree.map(lambda x: x[-1], losses)


def over_seeds(f, num_seeds: int, in_axes=0):
    """f vmapped over a leading seed axis (None: shared); one seed: f itself."""
    return jax.vmap(f, in_axes=in_axes) if num_seeds > 1 else f


def diagnostics(actor, critic, args, actor_params, critic_params, data, key, step) -> dict:
    """ofql.py's diagnostics, on a batch of its own (training's keys untouched)."""
    key_batch, key_pi, key_noise, key_actor = jax.random.split(jax.random.fold_in(key, step), 4)
    idx = jax.random.randint(key_batch, (args.batch_size,), 0, data["obs"].shape[0])
    obs, actions = data["obs"][idx], data["actions"][idx]
    policy_actions = sample_actions(actor, actor_params, obs, key_pi)
    ones, noise = jnp.ones(obs.shape[0]), jax.random.normal(key_noise, actions.shape)
    acting_bc_loss = mean_flow_loss(actor, actor_params, obs, actions, ones, 1 - ones, noise)
    q_policy = critic.apply(critic_params, obs, policy_actions)[0]
    q_gap = (q_policy - critic.apply(critic_params, obs, actions)[0]).mean()
    both = partial(actor_losses, actor, critic, args, critic_params=critic_params, obs=obs, actions=actions)
    grads = jax.jacrev(lambda p: jnp.stack(both(p, key=key_actor, swap=False)))(actor_params)
    squares = (jnp.sum(g.reshape(2, -1) ** 2, 1) for g in jax.tree.leaves(grads))
    bc_grad_norm, q_grad_norm = jnp.sqrt(sum(squares))
    action_mse = jnp.mean((policy_actions - actions) ** 2)
    losses = dict(q_gap=q_gap, action_mse=action_mse, q_grad_ratio=q_grad_norm / bc_grad_norm)
    return losses | dict(acting_bc_loss=acting_bc_loss)


def select_actions(actor, critic, actor_params, critic_params, eval_key, call, obs, num_candidates):
    """`num_candidates` actions per state, one drawn by softmax over min-Q."""
    n = obs.shape[0]
    key_actions, key_pick = jax.random.split(jax.random.fold_in(eval_key, call))
    obs_rep = jnp.repeat(obs, num_candidates, axis=0)  # (n * c, obs_dim)
    actions = sample_actions(actor, actor_params, obs_rep, key_actions)
    actions = actions.reshape(n, num_candidates, -1)
    q = critic.apply(critic_params, obs_rep, actions.reshape(n * num_candidates, -1), method=Critic.q_min)
    pick = jax.random.categorical(key_pick, q.reshape(n, num_candidates), axis=-1)
    return actions[jnp.arange(n), pick]


# EVALUATION: returns of the evaluation policy, and its decision frequency
def evaluate(policy, make_env, num_episodes: int, max_envs: int, seeds: list[int], done) -> np.ndarray:
    """Returns (seeds, episodes) of each seed's policy, one policy call per step for
    all; `active`: the seeds that still run episodes."""
    num_seeds, num_envs = len(seeds), min(num_episodes, max_envs)
    quota = np.full(num_envs, num_episodes // num_envs)
    quota = np.tile(quota + (np.arange(num_envs) < num_episodes % num_envs), num_seeds)
    autoreset = gym.vector.AutoresetMode.SAME_STEP
    envs = gym.vector.SyncVectorEnv([make_env] * len(quota), autoreset_mode=autoreset)
    obs, _ = envs.reset(seed=[seed + i for seed in seeds for i in range(num_envs)])
    returns, running = [[] for _ in seeds], np.zeros(len(quota))
    finished = np.zeros(len(quota), dtype=int)
    try:
        while (finished < quota).any():
            active = (finished < quota).reshape(num_seeds, num_envs).any(axis=1)
            actions = np.asarray(policy(flatten_obs(obs).astype(np.float32), active))
            obs, rewards, terminations, truncations, _ = envs.step(actions)
            running += rewards
            for i in np.flatnonzero(terminations | truncations):
                if finished[i] < quota[i]:
                    returns[i // num_envs].append(running[i])
                    done()
                finished[i] += 1
                running[i] = 0.0
    finally:  # also when a signal interrupts it
        envs.close()
    return np.array(returns)


def decision_frequency(policy, obs: np.ndarray, warmup=10, repeats=100) -> float:
    """Decisions per second for ONE state (per seed), candidates and pick included."""
    active = np.ones(len(obs), dtype=bool)
    for _ in range(warmup):
        np.asarray(policy(obs, active))
    start = time.perf_counter()
    for _ in range(repeats):
        np.asarray(policy(obs, active))  # np.asarray waits for the device
    return repeats / (time.perf_counter() - start)


# PLUMBING: ofql.py's names, data, checks, checkpoints, logging; files msgpack
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
# A task without a row borrows its domain's, else DEFAULT_TASK's, and says so.
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
# D4RL's files were recorded in gym's v3 envs; Gymnasium's v4 are their models (v5 differ)
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
RANGES |= dict.fromkeys(["updates_per_call", "num_seeds"], "[1, inf)")
MAX_EVAL_ENVS = 50  # evaluation envs that step together (per seed)
BATCH_KEYS = ("obs", "actions", "rewards", "next_obs", "terminals")
SCRIPT, CHECKPOINT, MODEL = os.path.basename(__file__), "checkpoint.msgpack", "model.msgpack"
OPTIMIZERS = ("actor_optimizer", "critic_optimizer")
LOSSES = ("critic_loss", "bc_loss", "q_loss", "actor_loss", "q_mean")
LOSSES += ("q_gap", "action_mse", "q_grad_ratio", "acting_bc_loss")  # diagnostics


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
    """Each None field from the task's row, and a line saying which row."""
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
    for flag, interval in RANGES.items():
        value, names = getattr(args, flag, None), vars(args) | {"inf": math.inf, "os": os}
        low, high = (eval(bound, names) for bound in interval[1:-1].split(", "))
        if value is not None and not (
            (value > low if interval[0] == "(" else value >= low)
            and (value < high if interval[-1] == ")" else value <= high)
        ):  # NaN is in no interval
            raise ValueError(f"--{flag.replace('_', '-')} {value}: must be in {interval}")
    # a row's bytes, about: in an update, in evaluation (ofql.py's, measured: 100k, 8k)
    need = args.num_seeds * max(args.batch_size * 2**17, MAX_EVAL_ENVS * args.num_candidates * 2**13)
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")  # a GPU's; None on CPU
    memory = limit or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > memory:
        flags = f"--batch-size {args.batch_size}, --num-candidates {args.num_candidates}, --num-seeds {args.num_seeds}"
        raise ValueError(f"{flags}: batches of about {need >> 30} GiB, more than the {memory >> 30} GiB here")


def start_backend(args: Args):
    """XLA's backend as the flags ask: it reads them once, as it starts."""
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    if not args.cuda:
        jax.config.update("jax_platforms", "cpu")  # no GPU started (or preallocated)
    try:
        jax.devices()
    except RuntimeError as error:  # JAX_PLATFORMS names no backend here
        problem = " ".join(str(error).split())[:200]
        raise ValueError(f"JAX did not start ({problem})") from None


def parse_args() -> tuple[Args, dict | None, str, str]:
    """The command line over a saved run's flags (--resume, --eval-only), checked; the
    saved state; the dataset id; the run folder. Whatever a user can fix ends here."""
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
        start_backend(args)
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
    """A checkpoint or model of this script; ValueError naming the flag otherwise."""
    try:
        with open(path, "rb") as f:
            saved = flax.serialization.msgpack_restore(f.read())
        Args(**saved["args"])  # every flag one of this script's
        if saved["script"] != SCRIPT:
            raise ValueError(f"written by {saved['script']}")
    except Exception as error:  # no such file, another format, truncated, another script's
        problem = " ".join(str(error).split())[:100]
        raise ValueError(f"{flag} {path}: not a file of {SCRIPT} ({problem})") from None
    return saved


def finished(run_dir: str) -> dict | None:
    """The summary.json of a finished run (a stopped run's says where it stopped)."""
    try:
        with open(f"{run_dir}/summary.json") as f:
            summary = json.load(f)
    except (OSError, ValueError):  # none, or unreadable: no finished result
        return None
    return None if "interrupted_at_step" in summary else summary


def check_writable(run_dir: str):
    """The run folder, or the nearest existing folder above it, must take files; its name must fit."""
    folder = run_dir
    while not os.path.exists(folder):
        folder = os.path.dirname(folder) or "."
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
        raise ValueError(f"{os.path.abspath(folder)} is not a writable folder: run elsewhere")
    name, longest = os.fsencode(os.path.basename(run_dir)), os.pathconf(folder, "PC_NAME_MAX")
    if len(name) + len(b"-99") > longest:  # room for a suffix
        raise ValueError(f"{run_dir}: a name of {len(name)} bytes, over {longest}: a shorter --exp-name")


def open_run(args: Args, run_dir: str, progress: dict) -> tuple[str, SummaryWriter]:
    """A new run's own folder (one started the same second under the same name takes -2,
    -3, ...), or the resumed one; wandb with --track; the tensorboard writer."""
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
            raise SystemExit(
                f"error: --track: wandb did not start ({problem}); `wandb login`, or WANDB_MODE=offline to log locally"
            ) from None
    if args.resume:
        print(f"resuming {folder} from update {progress['step']}")
    writer = SummaryWriter(folder, purge_step=progress["step"] + 1 if args.resume else None)
    table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    return folder, writer


def load_dataset(dataset_id: str) -> minari.MinariDataset:
    """The local copy; else medium-expert combined from its parts; else a download."""
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
    """Dict observations -> one array, keys in sorted order (AntMaze's goals)."""
    if isinstance(obs, dict):
        return np.concatenate([flatten_obs(obs[k]) for k in sorted(obs)], axis=-1)
    return np.asarray(obs)


def minari_transitions(dataset: minari.MinariDataset) -> dict[str, np.ndarray]:
    """The episodes as transitions; terminal = termination (a truncation is not)."""
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
    """A D4RL hdf5 file. Without next_observations, the next row: rows at `timeouts`
    and the last are dropped (their next row starts an episode). Terminal = `terminals`."""
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
    """The transitions on the device, checked once; the evaluation env's constructor;
    its action space; the reference returns. A problem is one ValueError."""
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
    except Exception as error:  # a missing package (robotics, mujoco<3.12 for kitchen)
        problem = " ".join(str(error).split())[:200]
        raise ValueError(f"{args.env_id}: its env did not start ({problem})") from None
    env_dims = (flatten_obs(env.reset(seed=args.seed)[0]).shape[-1], env.action_space.shape[0])
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
    data = {k: jax.device_put(np.asarray(v, dtype=np.float32), device) for k, v in data.items()}
    return data, make_env, env.action_space, ref_scores


class Interrupted(BaseException):
    """SIGINT or SIGTERM (a BaseException: no `except Exception` takes it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_requests() -> dict:
    """SIGINT and SIGTERM by stop["phase"]. start-up (compiling too: an exception
    inside XLA's compiler crashes it): exit at once, nothing written; training:
    the update ends, a checkpoint, then Interrupted (a second signal: at once);
    evaluation: Interrupted at once (a checkpoint precedes it)."""
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
    """charge(key) adds the seconds since the last charge to progress[key]."""
    last = [time.perf_counter()]

    def charge(key: str):
        now = time.perf_counter()
        progress[key] += now - last[0]
        last[0] = now

    return charge


def progress_bar(total: int, initial: int, unit: str, desc=None) -> tqdm:
    """A bar on a terminal; disabled in a log (a cluster's), which gets lines instead."""
    disable = not sys.stdout.isatty()
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, leave=False, disable=disable)


def episode_counter(num_episodes: int, step: int):
    """Called as each evaluation episode ends: the bar, or a line at each quarter."""
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


def log_losses(writer, losses: dict, first, progress: dict, args: Args, bar: tqdm):
    """Each seed's losses to tensorboard, their means to the bar (or a line); a
    non-finite loss ends the run before anything is saved."""
    seeds = [args.seed + k for k in range(args.num_seeds)]
    step, losses = progress["step"], {k: np.asarray(losses[k]).tolist() for k in LOSSES}
    first = np.reshape(first, -1)  # per seed: the first update with a non-finite loss
    if first.any():
        k = int(np.argmin(np.where(first > 0, first, np.iinfo(first.dtype).max)))
        which = f" of seed {seeds[k]}" if args.num_seeds > 1 else ""
        last_step, last = progress["last_losses"]
        raise SystemExit(
            f"error: non-finite loss at update {first[k]}{which} (at update {step}: "
            f"{format_losses(losses, k)}); at update {last_step}: "
            f"{format_losses(last, k)}; nothing saved since. Lower --lr or "
            "--critic-lr, or clip gradients with --grad-norm"
        )
    progress["last_losses"] = [step, losses]  # msgpack takes lists, not tuples
    for name, values in losses.items():
        add_seed_scalars(writer, f"losses/{name}", values, step, seeds)
    rate = step / max(progress["train_seconds"], 1e-9)
    writer.add_scalar("charts/updates_per_second", rate, step)
    keys = ("critic_loss", "bc_loss", "q_loss")
    values = " | ".join(f"{k[:-5]} {np.mean(losses[k]):.3f}" for k in keys)
    bar.update(step - bar.n)
    bar.set_postfix_str(values)
    if bar.disable:  # a log: a line
        eta = tqdm.format_interval((args.total_steps - step) / rate)
        print(f"update {step}/{args.total_steps} | {rate:.1f} updates/s | ETA {eta} | {values}")


def format_losses(losses: dict, k: int) -> str:
    """Seed k's losses (a list per seed, or one number)."""
    values = {name: np.reshape(value, -1)[k] for name, value in losses.items()}
    return ", ".join(f"{name} {value:.4g}" for name, value in values.items()) or "none yet"


def add_seed_scalars(writer, tag: str, values, step: int, seeds: list[int]):
    """The seeds' mean under `tag`; with several seeds, each under tag/seed_{seed}."""
    values = np.reshape(values, -1)
    writer.add_scalar(tag, values.mean(), step)
    for seed, value in zip(seeds, values, strict=True) if len(seeds) > 1 else ():
        writer.add_scalar(f"{tag}/seed_{seed}", value, step)


def seed_results(progress: dict, seeds: list[int], scores=None) -> dict:
    """Several seeds' part of summary.json: curves, best and final scores."""
    if len(seeds) == 1:
        return {}
    curves = [[(step, each[k]) for step, each in progress["seed_evaluations"]] for k in range(len(seeds))]
    results = {"num_seeds": len(seeds), "seeds": seeds}
    best = [max((score for _, score in curve), default=None) for curve in curves]
    results["seed_best_normalized_scores"] = best
    if scores is not None:
        seed_scores = scores.mean(axis=1)
        results["seed_normalized_scores"] = seed_scores.tolist()
        results["seed_normalized_score_mean"] = float(seed_scores.mean())
        results["seed_normalized_score_std"] = float(seed_scores.std())
    return results | {"seed_evaluations": curves}


def named_states(actor_state, critic_state) -> dict:
    """The train states by ofql.py's names: networks, then optimizers."""
    states = {"actor": actor_state.params, "critic": critic_state.params}
    states["critic_target"] = critic_state.target_params
    if actor_state.target_params is not None:
        states["actor_ema"] = actor_state.target_params
    return states | {"actor_optimizer": actor_state.opt_state, "critic_optimizer": critic_state.opt_state}


def save_checkpoint(run_dir: str, actor_state, critic_state, key, progress: dict, args):
    states = named_states(actor_state, critic_state)
    states = {name: flax.serialization.to_state_dict(s) for name, s in states.items()}
    progress["checkpoint_step"] = progress["step"]
    states |= {"key": key, "progress": progress}
    save_atomically(f"{run_dir}/{CHECKPOINT}", states | {"args": asdict(args), "script": SCRIPT})


def restore(saved: dict, actor_state, critic_state, key, resume: bool) -> tuple:
    """The networks; when resuming, also the optimizers, update count and PRNG key."""
    templates = named_states(actor_state, critic_state)
    names = [name for name in templates if resume or name not in OPTIMIZERS]
    try:
        state = {n: flax.serialization.from_state_dict(templates[n], saved[n]) for n in names}
        shapes = [[x.shape for x in jax.tree.leaves(tree[n])] for tree in (state, templates) for n in names]
        if shapes[: len(names)] != shapes[len(names) :]:
            raise ValueError("other shapes")
    except (KeyError, ValueError) as error:  # another dataset's shapes, a missing EMA
        problem = " ".join(str(error).split())[:200]
        raise SystemExit(f"error: the saved networks do not fit ({problem})") from None
    state = jax.device_put(state)
    actor_state = actor_state.replace(params=state["actor"], target_params=state.get("actor_ema"))
    critic_state = critic_state.replace(params=state["critic"], target_params=state["critic_target"])
    if resume:  # a step buffer per state and seed: both are donated
        step = partial(jnp.full_like, fill_value=saved["progress"]["step"])
        actor_state = actor_state.replace(step=step(actor_state.step), opt_state=state["actor_optimizer"])
        critic_state = critic_state.replace(step=step(critic_state.step), opt_state=state["critic_optimizer"])
        key = jax.device_put(saved["key"])
    return actor_state, critic_state, key


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
    summary |= {"device": device.platform, "threads": args.threads}
    summary["resumed_from_step"] = progress["start_step"] if args.resume else None
    summary |= {"evaluations": progress["evaluations"], "args": asdict(args)}
    save_atomically(f"{run_dir}/summary.json", summary)
    return summary


def result_line(summary: dict, run_dir: str) -> str:
    """The run's last line: final and best score, training speed, decisions/s; and
    with several seeds, their mean and spread."""
    line = f"{summary['dataset_id']}: normalized score {summary['normalized_score']:.1f} +- "
    line += f"{summary['normalized_score_std']:.1f} (best {summary['best_normalized_score']:.1f}) | "
    if summary["updates_per_second"]:
        line += f"training {summary['train_seconds']:.0f} s, "
        line += f"{summary['updates_per_second']:.1f} updates/s | "
    line += f"{summary['decision_hz']:.1f} decisions/s | {run_dir}/summary.json"
    if "seeds" not in summary:
        return line
    each = ", ".join(f"{score:.1f}" for score in summary["seed_normalized_scores"])
    mean, std = summary["seed_normalized_score_mean"], summary["seed_normalized_score_std"]
    line += f"\n{summary['dataset_id']}: {summary['num_seeds']} seeds, normalized score"
    return line + f" {mean:.1f} +- {std:.1f} across seeds ({each})"


def stopped_line(interrupted: Interrupted, progress: dict, args: Args, run_dir: str) -> str:
    """Where a stopped run stopped, and how to go on."""
    line = f"{interrupted}: stopped at update {progress['step']}"
    if args.eval_only or progress["checkpoint_step"] is None:
        return line + ": nothing to resume, run the same command again"
    step = progress["checkpoint_step"]
    return line + f"; continue from update {step}: python {SCRIPT} --resume {run_dir}"


def save_atomically(path: str, content: dict):
    """A temporary file renamed over the old one: a stop never leaves half a file."""
    try:
        if path.endswith(".json"):
            with open(path + ".tmp", "w") as f:
                json.dump(content, f, indent=2)
        else:
            with open(path + ".tmp", "wb") as f:
                f.write(flax.serialization.msgpack_serialize(jax.device_get(content)))
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as error:  # a full disk, a folder removed
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

    # TRY NOT TO MODIFY: seeding (the backend started as the flags were checked)
    device = jax.devices()[0]
    jax.config.update("jax_default_device", device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    # each seed's keys as its single run's, on a leading seed axis (none for one seed)
    seeds = [args.seed + k for k in range(args.num_seeds)]
    num_seeds = args.num_seeds
    seed_axis = (num_seeds,) if num_seeds > 1 else ()
    keys = [jax.random.split(jax.random.PRNGKey(seed), 4) for seed in seeds]
    key, actor_key, critic_key, eval_key = jnp.stack(keys, axis=1) if seed_axis else keys[0]

    try:  # the data, checked; the env it was recorded on, for evaluation
        data, make_env, action_space, (ref_min, ref_max) = load_task(args, dataset_id, device)
    except ValueError as error:
        raise SystemExit("error: " + " ".join(str(error).split())) from None  # one line
    obs_dim, action_dim = data["obs"].shape[1], data["actions"].shape[1]
    print(f"{dataset_id}: {len(data['obs']):,} transitions, {obs_dim=}, {action_dim=}, {device.platform}")

    bounds = tuple(action_space.low.tolist()), tuple(action_space.high.tolist())
    actor, critic = Actor(action_dim, *bounds), Critic()
    init = partial(train_states, actor, critic, args, data)
    actor_state, critic_state = over_seeds(init, num_seeds)(actor_key, critic_key)
    if saved:  # --resume: networks, optimizers, step, key; --eval-only: networks
        actor_state, critic_state, key = restore(saved, actor_state, critic_state, key, bool(args.resume))
    # committed to the device, as the update's outputs are: one compiled program each
    committed = jax.device_put((actor_state, critic_state, key, eval_key), device)
    actor_state, critic_state, key, eval_key = committed
    progress = {"step": 0, "evaluations": [], "checkpoint_step": None, "wandb_id": None}
    progress |= dict.fromkeys(["train_seconds", "eval_seconds", "compile_seconds"], 0.0)
    progress |= {"policy_calls": np.zeros(seed_axis, dtype=int).tolist(), "seed_evaluations": []}
    progress |= saved["progress"] if args.resume else {}
    progress |= {"start_step": progress["step"], "last_losses": [progress["step"], {}]}
    if args.eval_only:  # no training, nothing to save
        args = replace(args, total_steps=0, save_model=False)

    # updates per call: as many as divide every update at which the host acts
    host_steps = (args.log_freq, args.eval_freq, args.checkpoint_freq, args.total_steps, progress["step"])
    updates_per_call = math.gcd(args.updates_per_call, *host_steps)
    training = args.total_steps > progress["step"]
    if updates_per_call != args.updates_per_call and training:
        print(f"--updates-per-call lowered to {updates_per_call}, to divide the host's steps")
    many = partial(update_many, actor, critic, args, updates_per_call)
    train_step = jax.jit(over_seeds(many, num_seeds, (0, 0, 0, 0, None)), donate_argnums=(0, 1, 2, 3))
    diagnose = jax.jit(over_seeds(partial(diagnostics, actor, critic, args), num_seeds, (0, 0, None, 0, None)))
    diagnostics_key = jnp.stack([jax.random.PRNGKey(s) for s in seeds]).reshape(*seed_axis, 2)
    diagnostics_key = jax.device_put(diagnostics_key, device)
    acts = over_seeds(partial(select_actions, actor, critic), num_seeds, (0, 0, 0, 0, 0, None))

    @jax.jit
    def policy_step(actor_params, critic_params, eval_key, calls, obs) -> jax.Array:
        actions = acts(actor_params, critic_params, eval_key, calls, obs, args.num_candidates)
        return actions.reshape(-1, action_dim)  # (seeds x states, action_dim)

    def policy(obs: np.ndarray, active: np.ndarray, warmup=False) -> jax.Array:
        """Actions of every seed; an active seed counts its call (its key)."""
        calls = np.asarray(progress["policy_calls"])
        if not warmup:
            progress["policy_calls"] = (calls + active.reshape(seed_axis)).tolist()
        params = actor_state.target_params if args.eval_ema else actor_state.params
        obs = obs.reshape(*seed_axis, -1, obs.shape[-1])
        return policy_step(params, critic_state.target_params, eval_key, calls, obs)

    # everything compiled before the run folder: a signal in XLA's compiler exits at once
    charge = stopwatch(progress)
    first_nonfinite = jax.device_put(jnp.zeros(seed_axis, dtype=jnp.int32), device)
    if training:
        print(f"compiling {updates_per_call} updates per call (XLA: seconds to minutes)")
        states = (actor_state, critic_state, key, first_nonfinite, data)
        train_step = train_step.lower(*states).compile()
        diagnose(actor_state.params, critic_state.params, data, diagnostics_key, progress["step"])
    for n in {1, min(args.eval_episodes, MAX_EVAL_ENVS), min(args.final_eval_episodes, MAX_EVAL_ENVS)}:
        policy(np.zeros((num_seeds * n, obs_dim), np.float32), np.ones(num_seeds, bool), warmup=True)
    charge("compile_seconds" if training else "eval_seconds")

    # the run folder, only now that everything loaded: a failed start leaves none
    if stop["signals"]:  # a signal that a library swallowed
        exit_in_start_up(stop["signals"][0], None)
    run_dir, writer = open_run(args, run_dir, progress)

    def evaluate_and_log(step: int, num_episodes: int) -> np.ndarray:
        stop["phase"] = "evaluation"  # a signal stops it: the checkpoint precedes it
        if stop["signals"]:
            raise Interrupted(stop["signals"][0])
        done = episode_counter(num_episodes * num_seeds, step)
        env_seeds = [seed + step for seed in seeds]
        returns = evaluate(policy, make_env, num_episodes, MAX_EVAL_ENVS, env_seeds, done)
        stop["phase"] = "training"
        scores = 100 * (returns - ref_min) / (ref_max - ref_min)  # (seeds, episodes)
        seed_scores, pooled = scores.mean(axis=1), scores.reshape(-1)
        progress["evaluations"].append([step, float(pooled.mean())])
        add_seed_scalars(writer, "charts/normalized_score", seed_scores, step, seeds)
        line = f"update {step}: normalized score {pooled.mean():.1f} +- {pooled.std():.1f}"
        if seed_axis:
            progress["seed_evaluations"].append([step, seed_scores.tolist()])
            each = ", ".join(f"{score:.1f}" for score in seed_scores)
            line += f"; across seeds {seed_scores.mean():.1f} +- {seed_scores.std():.1f} ({each})"
        tqdm.write(line)
        charge("eval_seconds")
        return scores

    # TRY NOT TO MODIFY: the training loop; a checkpoint precedes each evaluation
    stop["phase"] = "training"
    bar = progress_bar(args.total_steps, progress["step"], "update")
    try:
        if 0 < progress["step"] < args.total_steps and progress["step"] % args.eval_freq == 0:
            evaluate_and_log(progress["step"], args.eval_episodes)  # resumed before it
        for step in range(progress["step"] + updates_per_call, args.total_steps + 1, updates_per_call):
            actor_state, critic_state, key, first_nonfinite, losses = train_step(
                actor_state, critic_state, key, first_nonfinite, data
            )
            progress["step"] = step

            stopping = bool(stop["signals"])  # read once
            evaluating = step % args.eval_freq == 0 and step < args.total_steps
            checkpointing = stopping or evaluating or step == args.total_steps
            checkpointing |= args.checkpoint_freq > 0 and step % args.checkpoint_freq == 0
            if step % args.log_freq == 0 or checkpointing:
                losses |= diagnose(actor_state.params, critic_state.params, data, diagnostics_key, step)
                host_losses, first = jax.device_get((losses, first_nonfinite))  # the one sync
                charge("train_seconds")
                log_losses(writer, host_losses, first, progress, args, bar)
            if checkpointing:
                save_checkpoint(run_dir, actor_state, critic_state, key, progress, args)
            if stopping:
                raise Interrupted(stop["signals"][0])
            if evaluating:
                evaluate_and_log(step, args.eval_episodes)
        bar.close()

        if args.save_model:
            states = named_states(actor_state, critic_state).items()
            model = {n: flax.serialization.to_state_dict(s) for n, s in states if n not in OPTIMIZERS}
            save_atomically(f"{run_dir}/{MODEL}", model | {"args": asdict(args), "script": SCRIPT})
            print(f"model saved to {run_dir}/{MODEL}")

        scores = evaluate_and_log(args.total_steps, args.final_eval_episodes)
        stop["phase"] = "evaluation"
        decision_hz = decision_frequency(policy, np.asarray(data["obs"][:1]).repeat(num_seeds, 0))
        stop["phase"] = "training"  # the summary is written whole
    except Interrupted as interrupted:
        stop["phase"] = "training"
        step, seed_part = progress["step"], seed_results(progress, seeds)
        write_summary(run_dir, progress, args, dataset_id, device, interrupted_at_step=step, **seed_part)
        writer.close()
        print(stopped_line(interrupted, progress, args, run_dir), file=sys.stderr)
        sys.exit(128 + interrupted.signum)
    writer.add_scalar("charts/decision_hz", decision_hz, args.total_steps)
    pooled = scores.reshape(-1)  # every episode of every seed
    final = dict(normalized_score=float(pooled.mean()), normalized_score_std=float(pooled.std()))
    final |= dict(episode_normalized_scores=pooled.tolist(), eval_episodes=len(scores[0]))
    final |= dict(return_mean=float(pooled.mean() / 100 * (ref_max - ref_min) + ref_min))
    final |= dict(decision_hz=decision_hz, updates_per_call=updates_per_call)
    summary = write_summary(
        run_dir, progress, args, dataset_id, device, **final, **seed_results(progress, seeds, scores)
    )
    print(result_line(summary, run_dir))
    writer.close()
    if args.track:
        import wandb

        wandb.finish()
    if stop["signals"]:  # one that came while the results were written
        print(f"{Interrupted(stop['signals'][0])}: stopped at the end, all saved", file=sys.stderr)
        sys.exit(128 + stop["signals"][0])
