"""One-Step Flow Q-Learning (OFQL) in JAX (flax.linen + optax): ofql.py, translated.

Paper: "Revisiting Diffusion Q-Learning: From Iterative Denoising to One-Step Action Generation".
OFQL is Diffusion Q-Learning (DQL) with the multi-step DDPM policy replaced by an average-velocity
(MeanFlow) policy u(a_t, r, t; s) that acts in ONE network call: a = eps - u(eps, r=0, t=1; s) (Eq. 18).
Its behaviour-cloning loss regresses u onto the MeanFlow identity target (Eq. 16-17), computed with one
forward-mode Jacobian-vector product; the Q term backpropagates through a single network call (no BPTT),
and there is no target actor: the critic's next actions come from the current policy in one step.

Usage:
    python ofql_jax.py --env-id hopper-medium-v2                # D4RL name -> Minari dataset
    python ofql_jax.py --env-id mujoco/hopper/expert-v0         # a Minari id is used as given
    MINARI_DATASETS_PATH=../shared/datasets python ofql_jax.py --env-id sac/hopper/medium-replay-v0
    python ofql_jax.py --env-id hopper-medium-replay-v2 --dataset-path hopper_medium_replay-v2.hdf5   # a D4RL file
    python ofql_jax.py --resume runs/{run_name}                 # continue an interrupted run (Ctrl-C checkpoints)
    python ofql_jax.py --help                                   # every flag, with its meaning

The algorithm, the task table, the flags and summary.json are ofql.py's (see its docstring for the choices
the paper leaves open). What the translation changes, and why:
- The dataset lives on the device and each batch is sampled inside the compiled update; PRNG keys are
  threaded explicitly. --updates-per-call updates run in ONE compiled call (a `lax.scan`), with the train
  state donated, so the host only dispatches every that many updates. Scan vs a Python-unrolled loop, 10
  updates per call, 1000 updates on hopper medium-replay, --threads 1, a shared 2-core CPU (load ~7):
  scan 9.3 s to compile, 21.3 updates/s; unrolled 47.9 s to compile, 21.5 updates/s (the same losses).
  Same speed, 5x the compile time (growing with the count): scan.
- No `lax.cond` on the hot path: the max-Q backup is a static Python bool, the random critic choice of
  the Q term a `jnp.where`.
- Compilation is timed apart (`jit(...).lower(...).compile()` before the loop): summary.json's
  train_seconds excludes it and "compile_seconds" reports it.
- Layers are initialised as torch.nn.Linear's (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias),
  not flax's lecun-normal / zero bias, so both scripts start from the same distribution of networks.
- --threads 1 sets XLA_FLAGS=--xla_cpu_multi_thread_eigen=false before JAX starts its CPU backend.
- Files are msgpack (flax.serialization.msgpack_serialize of numpy pytrees, written to a temporary file, then
  renamed), not torch.save: --save-model writes the parameters ("actor", "critic", "critic_target") and "args"
  to runs/{run_name}/model.msgpack; a checkpoint (SIGINT/SIGTERM, every --checkpoint-freq updates) writes
  runs/{run_name}/checkpoint.msgpack: the same parameters, the optimizer states ("actor_optimizer",
  "critic_optimizer", as flax.serialization.to_state_dict), the PRNG key, the number of policy calls (the
  evaluation keys are folded from it), "step", "train_seconds", "evaluations", "wandb_id" and "args". --resume
  restores them all: on the CPU the resumed run's losses equal the uninterrupted run's, bit for bit.
- Signals, checkpoints and the non-finite loss check act between compiled calls (--checkpoint-freq too
  divides into calls). Calls are dispatched asynchronously, so a signal is seen when the host next waits for
  the device (a log, evaluation or checkpoint step): the run stops there, up to --log-freq updates later. The
  first update with a non-finite loss is tracked inside the scan and read on the host only at log and
  checkpoint steps.
- No --compile: every update and the policy are jitted already.
- On a GPU, XLA may run float32 matmuls in TF32 (torch does not by default): set
  JAX_DEFAULT_MATMUL_PRECISION=highest for torch's arithmetic.
"""

import difflib
import json
import logging
import os
import random
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

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


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
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
    """write the training state to `runs/{run_name}/checkpoint.msgpack` every this many updates (0: only on SIGINT/SIGTERM)"""
    resume: str | None = None
    """a run folder `runs/{run_name}`: continue its `checkpoint.msgpack` to the same --total-steps, with the run's own arguments"""

    # Data and evaluation
    env_id: str = "hopper-medium-v2"
    """a D4RL name (hopper-medium-v2) or a Minari dataset id (mujoco/hopper/medium-v0)"""
    dataset_path: str | None = None
    """an original D4RL hdf5 file to train on instead of Minari's data; --env-id names its task (hopper-medium-replay-v2)"""
    total_steps: int | None = None
    """number of gradient updates (default: the task table's)"""
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
    max_eval_envs: int = 50
    """at most this many evaluation envs step together"""
    log_freq: int = 1000
    """log losses and the progress line every this many updates"""
    updates_per_call: int = 10
    """updates in one compiled call (a lax.scan); lowered to divide log-freq, eval-freq, checkpoint-freq and total-steps"""

    # Algorithm specific arguments (None: the task table's value)
    lr: float | None = None
    """learning rate of the actor (the critic's is 3e-4, as in DQL)"""
    eta: float | None = None
    """weight of the normalized Q term in the actor loss (Eq. 19)"""
    max_q_backup: bool | None = None
    """critic target: max over 10 next actions per critic, then min over critics"""
    reward_tune: str | None = None
    """reward shaping: none | cql ((r - 0.5) * 4) | normalize ((r - mean) / std)"""
    grad_norm: float | None = None
    """clip the gradient norm of actor and critic at this value (0: no clipping)"""
    critic_lr: float = 3e-4
    """learning rate of the critic"""
    gamma: float = 0.99
    """the discount factor"""
    tau: float = 0.005
    """target critic smoothing coefficient"""
    flow_ratio: float = 0.5
    """fraction of each batch with r = t (plain flow matching pairs)"""
    time_mu: float = -0.4
    """mean of the logit-normal that t and r are drawn from"""
    time_sigma: float = 1.0
    """std of the logit-normal that t and r are drawn from"""


# Per-task defaults: (lr, eta, max_q_backup, reward_tune, updates, grad_norm). lr, max-Q, rewards, updates
# (epochs x 1000) and grad norms are DQL's; eta is OURS (the paper does not publish OFQL's), see docstring.
TASKS = {
    "halfcheetah-medium": (3e-4, 0.1, False, "none", 2_000_000, 9.0),
    "hopper-medium": (3e-4, 0.1, False, "none", 2_000_000, 9.0),
    "walker2d-medium": (3e-4, 0.1, False, "none", 2_000_000, 1.0),
    "halfcheetah-medium-replay": (3e-4, 0.1, False, "none", 2_000_000, 2.0),
    "hopper-medium-replay": (3e-4, 0.1, False, "none", 2_000_000, 4.0),
    "walker2d-medium-replay": (3e-4, 0.1, False, "none", 2_000_000, 4.0),
    "halfcheetah-medium-expert": (3e-4, 0.1, False, "none", 2_000_000, 7.0),
    "hopper-medium-expert": (3e-4, 0.1, False, "none", 2_000_000, 5.0),
    "walker2d-medium-expert": (3e-4, 0.1, False, "none", 2_000_000, 5.0),
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
# A task missing from the table (walker2d-expert, ant-medium, ...) takes its domain's row.
DOMAIN_DEFAULTS = {
    **{domain: f"{domain}-medium" for domain in ("halfcheetah", "hopper", "walker2d")},
    **{"antmaze": "antmaze-medium-play", "kitchen": "kitchen-partial", "pen": "pen-human"},
}
DEFAULT_TASK = "hopper-medium"

# D4RL names (version suffix dropped) -> Minari dataset ids. Minari has no medium-expert: it is combined from
# medium and expert the first time it is asked for (see load_dataset), then kept in the local Minari store.
LOCOMOTION = ("hopper", "halfcheetah", "walker2d", "ant", "humanoid")
ANTMAZE = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
D4RL_TO_MINARI = {
    **{f"{e}-{k}": f"mujoco/{e}/{k}-v0" for e in LOCOMOTION for k in ("medium", "expert", "simple", "medium-expert")},
    **{f"antmaze-{k}": f"D4RL/antmaze/{k}-v1" for k in ANTMAZE},
    **{f"kitchen-{k}": f"D4RL/kitchen/{k}-v2" for k in ("complete", "partial", "mixed")},
    **{f"{e}-{k}": f"D4RL/{e}/{k}-v2" for e in ("pen", "door", "hammer", "relocate") for k in ("human", "cloned", "expert")},
}
COMBINED_DATASETS = {f"mujoco/{e}/medium-expert-v0": (f"mujoco/{e}/medium-v0", f"mujoco/{e}/expert-v0") for e in LOCOMOTION}
# D4RL's normalization constants (min, max): random and expert returns of the original tasks.
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "antmaze": (0.0, 1.0),
    "kitchen": (0.0, 4.0),
}
# --dataset-path: the Gymnasium env that evaluates a D4RL file (D4RL's own -v2 envs need mujoco-py). Same observations.
D4RL_FILE_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
D4RL_FILE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{name}-v2.hdf5"  # name: hopper_medium_replay
KITCHEN_MUJOCO = (3, 12)  # FrankaKitchen-v1 fails on mujoco >= 3.12 (a joint-type assertion); the `kitchen` extra pins it


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
        file_url = D4RL_FILE_URL.format(name=name.replace("-", "_"))
        raise ValueError(
            f"{env_id!r}: Minari has no medium-replay datasets. Train on D4RL's file instead: download {file_url} "
            f"and run with --env-id {env_id} --dataset-path {os.path.basename(file_url)}"
        )
    close = difflib.get_close_matches(name, D4RL_TO_MINARI, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown --env-id {env_id!r}.{hint} Known D4RL names: {', '.join(D4RL_TO_MINARI)}; or give a Minari id.")


def task_name(env_id: str) -> str:
    """`hopper-medium-v2` or `mujoco/hopper/medium-v0` -> `hopper-medium`: the key of TASKS and of its domain."""
    if "/" in env_id:
        domain, kind = env_id.split("/")[-2:]
        return f"{domain}-{strip_version(kind)}"
    return strip_version(env_id)


def task_defaults(args: Args) -> Args:
    """Fill every None field of the algorithm block from the task table (command line wins)."""
    task = task_name(args.env_id)
    domain = task.split("-")[0]
    lr, eta, max_q_backup, reward_tune, updates, grad_norm = TASKS.get(task) or TASKS[DOMAIN_DEFAULTS.get(domain, DEFAULT_TASK)]
    defaults = dict(lr=lr, eta=eta, max_q_backup=max_q_backup, reward_tune=reward_tune, total_steps=updates, grad_norm=grad_norm)
    for field, value in defaults.items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    return args


def load_dataset(dataset_id: str) -> minari.MinariDataset:
    """The local copy under MINARI_DATASETS_PATH; else, for medium-expert, medium and expert combined (and kept
    locally); else a download from the Minari remote."""
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        local = minari.storage.get_dataset_path(dataset_id)
    if dataset_id in COMBINED_DATASETS:
        parts = [load_dataset(part) for part in COMBINED_DATASETS[dataset_id]]
        print(f"{dataset_id}: combining {' and '.join(COMBINED_DATASETS[dataset_id])} into {local}")
        try:
            return minari.combine_datasets(parts, new_dataset_id=dataset_id)
        except BaseException:  # interrupted or failed: no half-written dataset left in the store
            minari.delete_dataset(dataset_id)
            raise
    print(f"{dataset_id} is not in {local}: downloading it")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # one message below, not one per retry
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as error:  # no network, or no such dataset on the remote
        raise ValueError(
            f"{dataset_id} is not local (looked in {local}, set by MINARI_DATASETS_PATH) and could not be downloaded "
            f"({type(error).__name__}: {error}). On a machine with internet run `minari download {dataset_id}`, copy the "
            "folder into MINARI_DATASETS_PATH here, or check the id with `minari list remote`."
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
    return {
        "obs": np.concatenate(obs),
        "actions": np.concatenate(actions),
        "rewards": np.concatenate(rewards),
        "next_obs": np.concatenate(next_obs),
        "terminals": np.concatenate(terminals),
    }


def d4rl_transitions(path: str) -> dict[str, np.ndarray]:
    """An original D4RL hdf5 file, read with h5py (no d4rl, no mujoco-py). Without `next_observations`, the next
    observation is the next row, and rows marked `timeouts` (and the file's last) are dropped: their successor is
    the next episode's start. Done = `terminals` only."""
    if not os.path.isfile(path):
        raise ValueError(f"--dataset-path {path}: no such file")
    keys = ("observations", "actions", "rewards", "terminals", "timeouts")
    try:
        with h5py.File(path, "r") as f:
            missing = [key for key in keys if key not in f]
            if missing:
                raise ValueError(f"--dataset-path {path}: no {', '.join(missing)} in the file; a D4RL file holds {', '.join(keys)}")
            raw = {key: f[key][()] for key in (*keys, "next_observations") if key in f}
    except OSError as error:  # not hdf5, truncated, unreadable
        raise ValueError(f"--dataset-path {path}: not a readable hdf5 file ({error}); download it again") from None
    lengths = {key: len(value) for key, value in raw.items()}
    if len(set(lengths.values())) != 1 or raw["observations"].ndim != 2 or raw["actions"].ndim != 2:
        shapes = ", ".join(f"{key} {value.shape}" for key, value in raw.items())
        raise ValueError(f"--dataset-path {path}: inconsistent arrays ({shapes}); expected (N, obs_dim), (N, action_dim) and (N,)")
    if "next_observations" in raw:
        keep, next_obs = np.ones(len(raw["observations"]), dtype=bool), raw["next_observations"]
    else:
        keep, next_obs = ~raw["timeouts"].astype(bool), np.roll(raw["observations"], -1, axis=0)
        keep[-1] = False
    transitions = dict(
        obs=raw["observations"], actions=raw["actions"], rewards=raw["rewards"], next_obs=next_obs, terminals=raw["terminals"]
    )
    return {key: value[keep] for key, value in transitions.items()}


def load_task(args: Args, dataset_id: str) -> tuple[dict[str, np.ndarray], Callable[[], gym.Env], gym.spaces.Box, tuple[float, float]]:
    """Transitions, the evaluation env's constructor, its action space and the (min, max) reference returns.
    Every problem a user can fix raises ValueError with the fix."""
    domain = task_name(args.env_id).split("-")[0]
    if args.dataset_path:
        if domain not in D4RL_FILE_ENVS:
            raise ValueError(
                f"--dataset-path takes {', '.join(D4RL_FILE_ENVS)} files (--env-id hopper-medium-replay-v2, ...), not {domain!r}"
            )
        print(f"warning: {args.dataset_path} holds D4RL's data; evaluation runs on Gymnasium's {D4RL_FILE_ENVS[domain]}, not D4RL's env")
        transitions, ref_scores = d4rl_transitions(args.dataset_path), D4RL_REF_SCORES[domain]
        make_env = partial(gym.make, D4RL_FILE_ENVS[domain])
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
        make_env = partial(dataset.recover_environment, eval_env=True, **({"continuing_task": False} if domain == "antmaze" else {}))
    try:
        env = make_env()
    except ImportError as error:
        raise ValueError(f"{args.env_id}: its env needs the module {error.name!r}: pip install -e '.[robotics]'") from None
    obs_dim, action_space = flatten_obs(env.reset(seed=args.seed)[0]).shape[-1], env.action_space
    env.close()
    data_dims = (transitions["obs"].shape[1], transitions["actions"].shape[1])
    if data_dims != (obs_dim, action_space.shape[0]):
        raise ValueError(
            f"{args.dataset_path or dataset_id}: observations and actions of size {data_dims} do not match "
            f"the env {env.spec.id}'s {(obs_dim, action_space.shape[0])}; check --env-id"
        )
    return transitions, make_env, action_space, ref_scores


def dataset_to_tensors(transitions: dict[str, np.ndarray], reward_tune: str, device: jax.Device) -> dict[str, jax.Array]:
    """Reward shaping per task, then float32 arrays on `device`: rewards and terminals as (N, 1)."""
    data = transitions | {"rewards": transitions["rewards"][:, None], "terminals": transitions["terminals"][:, None]}
    if reward_tune == "cql":
        data["rewards"] = (data["rewards"] - 0.5) * 4.0
    elif reward_tune == "normalize":
        data["rewards"] = (data["rewards"] - data["rewards"].mean()) / data["rewards"].std()
    elif reward_tune != "none":
        raise ValueError(f"unknown --reward-tune {reward_tune!r}: use none, cql or normalize")
    return {k: jax.device_put(np.asarray(v, dtype=np.float32), device) for k, v in data.items()}


def reference_scores(dataset: minari.MinariDataset, dataset_id: str, domain: str) -> tuple[float, float]:
    """D4RL's (min, max) return for the domain, else the dataset's own reference scores."""
    if domain in D4RL_REF_SCORES:
        return D4RL_REF_SCORES[domain]
    metadata = dataset.storage.metadata
    if metadata.get("ref_min_score") is None or metadata.get("ref_max_score") is None:
        raise ValueError(f"{dataset_id}: no D4RL reference returns for {domain!r} and none in the dataset's metadata")
    return metadata["ref_min_score"], metadata["ref_max_score"]


# ALGO LOGIC: initialize agent here:
class Linear(nn.Module):
    """nn.Dense with torch.nn.Linear's initialisation: weight and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""

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
    """Average velocity u(a_t, r, t; s): DQL's MLP with a second time embedding, for r."""

    action_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
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
        x = jnp.concatenate([a_t, self.t_mlp(t), self.r_mlp(r), obs], axis=-1)
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


class CriticTrainState(TrainState):
    target_params: flax.core.FrozenDict


def sample_actions(actor: Actor, params, obs: jax.Array, key: jax.Array) -> jax.Array:
    """One-step action a = eps - u(eps, r=0, t=1; s) (Eq. 18), clipped to the action bounds; differentiable."""
    noise = jax.random.normal(key, (obs.shape[0], actor.action_dim))
    zeros, ones = jnp.zeros(obs.shape[0]), jnp.ones(obs.shape[0])
    return jnp.clip(noise - actor.apply(params, noise, zeros, ones, obs), jnp.array(actor.action_low), jnp.array(actor.action_high))


def sample_time_pairs(key: jax.Array, batch_size: int, flow_ratio: float, mu: float, sigma: float) -> tuple[jax.Array, jax.Array]:
    """(t, r) from a logit-normal, ordered so that r <= t; r = t for the first `flow_ratio` of the batch."""
    pair = jax.nn.sigmoid(jax.random.normal(key, (2, batch_size)) * sigma + mu)
    t, r = pair.max(axis=0), pair.min(axis=0)
    equal = jnp.arange(batch_size) < round(flow_ratio * batch_size)
    return t, jnp.where(equal, t, r)


def mean_flow_target(actor: Actor, params, a_t: jax.Array, r: jax.Array, t: jax.Array, obs: jax.Array, v: jax.Array) -> jax.Array:
    """u_tgt = v - (t - r) (v . d_a u + d_t u) (Eq. 16): one JVP along the tangent (v, 0, 1), no gradient."""
    params = jax.lax.stop_gradient(params)
    _, du_dt = jax.jvp(lambda a_t, r, t: actor.apply(params, a_t, r, t, obs), (a_t, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    return jax.lax.stop_gradient(v - (t - r)[:, None] * du_dt)


def mean_flow_loss(actor: Actor, params, obs: jax.Array, actions: jax.Array, t: jax.Array, r: jax.Array, noise: jax.Array) -> jax.Array:
    """MeanFlow behaviour cloning (Eq. 17) on the path a_t = (1 - t) a + t eps, conditional velocity v = eps - a."""
    a_t = (1 - t[:, None]) * actions + t[:, None] * noise
    u_tgt = mean_flow_target(actor, params, a_t, r, t, obs, noise - actions)
    return jnp.mean((actor.apply(params, a_t, r, t, obs) - u_tgt) ** 2)


def td_loss(critic: Critic, params, obs: jax.Array, actions: jax.Array, target_q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Both critics regressed onto the same (clipped double-Q) target; also Q1's mean, for logging."""
    current_q1, current_q2 = critic.apply(params, obs, actions)
    return jnp.mean((current_q1 - target_q) ** 2) + jnp.mean((current_q2 - target_q) ** 2), current_q1.mean()


def select_actions(
    actor: Actor, critic: Critic, actor_params, critic_target_params, obs: jax.Array, key: jax.Array, num_candidates: int
) -> jax.Array:
    """Evaluation policy: `num_candidates` actions per state, one drawn from softmax over the target critic's min-Q."""
    n = obs.shape[0]
    key_actions, key_pick = jax.random.split(key)
    obs_rep = jnp.repeat(obs, num_candidates, axis=0)  # (n * c, obs_dim)
    actions = sample_actions(actor, actor_params, obs_rep, key_actions).reshape(n, num_candidates, -1)
    q = critic.apply(critic_target_params, obs_rep, actions.reshape(n * num_candidates, -1), method=Critic.q_min).reshape(n, num_candidates)
    pick = jax.random.categorical(key_pick, q, axis=-1)  # (n,): a sample from softmax(q)
    return actions[jnp.arange(n), pick]


def evaluate(policy, make_env, num_episodes: int, max_envs: int, seed: int) -> np.ndarray:
    """Returns of `num_episodes` episodes, run in a vectorized env with one policy call per step for all envs."""
    num_envs = min(num_episodes, max_envs)
    quota = np.full(num_envs, num_episodes // num_envs) + (np.arange(num_envs) < num_episodes % num_envs)
    envs = gym.vector.SyncVectorEnv([make_env] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=seed)
    returns, running, finished = [], np.zeros(num_envs), np.zeros(num_envs, dtype=int)
    while (finished < quota).any():
        actions = np.asarray(policy(flatten_obs(obs).astype(np.float32)))
        obs, rewards, terminations, truncations, _ = envs.step(actions)
        running += rewards
        for i in np.flatnonzero(terminations | truncations):
            if finished[i] < quota[i]:
                returns.append(running[i])
            finished[i] += 1
            running[i] = 0.0
    envs.close()
    return np.array(returns)


def decision_frequency(policy, obs: jax.Array, warmup: int = 10, repeats: int = 100) -> float:
    """Decisions per second for ONE state, candidate sampling and selection included, result on the host."""
    for _ in range(warmup):  # the first call compiles the policy for one state
        np.asarray(policy(obs[:1]))
    start = time.perf_counter()
    for _ in range(repeats):
        np.asarray(policy(obs[:1]))  # np.asarray waits for the device
    return repeats / (time.perf_counter() - start)


def format_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in losses.items()) or "none yet"


def save_atomically(path: str, content: dict):
    """Write to a temporary file, then rename: an interrupted run never leaves half a file. JSON or msgpack."""
    if path.endswith(".json"):
        with open(path + ".tmp", "w") as f:
            json.dump(content, f, indent=2)
    else:
        with open(path + ".tmp", "wb") as f:
            f.write(flax.serialization.msgpack_serialize(jax.device_get(content)))
    os.replace(path + ".tmp", path)


def load_msgpack(path: str) -> dict:
    """A file that save_atomically wrote (model.msgpack, checkpoint.msgpack): nested dicts of numpy arrays and plain values."""
    with open(path, "rb") as f:
        return flax.serialization.msgpack_restore(f.read())


if __name__ == "__main__":
    args = tyro.cli(Args)
    saved = None  # a checkpoint to resume, or a model to evaluate
    if args.resume:  # the run's own arguments, except where and how to run
        checkpoint_path = os.path.join(args.resume, "checkpoint.msgpack")
        if not os.path.isfile(checkpoint_path):
            raise SystemExit(
                f"error: --resume {args.resume}: no checkpoint.msgpack there (written on SIGINT/SIGTERM and every --checkpoint-freq updates)"
            )
        saved = load_msgpack(checkpoint_path)
        args = Args(**saved["args"] | {k: getattr(args, k) for k in ("resume", "cuda", "threads", "track")})
    if args.eval_only and not (args.checkpoint and os.path.isfile(args.checkpoint)):
        raise SystemExit(
            f"error: --eval-only needs --checkpoint PATH, a model.msgpack written by --save-model (or a checkpoint.msgpack); got {args.checkpoint}"
        )
    try:
        dataset_id = args.dataset_path or resolve_dataset_id(args.env_id)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    args = task_defaults(args)
    run_dir = args.resume or f"runs/{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = os.path.basename(os.path.normpath(run_dir))

    # TRY NOT TO MODIFY: seeding (the backend is chosen first: the first JAX computation starts it)
    if args.threads == 1:  # read when the CPU backend starts
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    if not args.cuda:
        jax.config.update("jax_platforms", "cpu")  # do not even start (and preallocate on) a GPU
    device = jax.devices()[0]
    jax.config.update("jax_default_device", device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    key = jax.random.PRNGKey(args.seed)
    key, actor_key, critic_key, eval_key = jax.random.split(key, 4)

    # data setup: transitions on the device, the env the data was recorded on for evaluation
    try:
        transitions, make_env, action_space, (ref_min, ref_max) = load_task(args, dataset_id)
        data = dataset_to_tensors(transitions, args.reward_tune, device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    num_transitions = data["obs"].shape[0]
    obs_dim, action_dim = data["obs"].shape[1], data["actions"].shape[1]
    print(f"{dataset_id}: {num_transitions:,} transitions, obs_dim {obs_dim}, action_dim {action_dim}, device {device.platform}")

    wandb_id = saved["wandb_id"] if saved else None
    if args.track:
        import wandb

        wandb_id = wandb_id or wandb.util.generate_id()
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
            id=wandb_id,
            resume="allow",
        )
    # logging: only now that the data loaded, so that a failed start leaves no run folder behind
    start_step = saved["step"] if saved else 0
    writer = SummaryWriter(run_dir, purge_step=start_step + 1 if saved else None)  # drop what was logged after the checkpoint
    table = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")

    actor = Actor(action_dim, tuple(action_space.low.tolist()), tuple(action_space.high.tolist()))
    critic = Critic()
    obs0, actions0, times0 = data["obs"][:1], data["actions"][:1], jnp.zeros(1)

    def optimizer(lr: float) -> optax.GradientTransformation:
        return optax.chain(optax.clip_by_global_norm(args.grad_norm), optax.adam(lr)) if args.grad_norm > 0 else optax.adam(lr)

    actor_state = TrainState.create(
        apply_fn=actor.apply, params=actor.init(actor_key, actions0, times0, times0, obs0), tx=optimizer(args.lr)
    )
    critic_params = critic.init(critic_key, obs0, actions0)
    critic_state = CriticTrainState.create(
        apply_fn=critic.apply, params=critic_params, target_params=jax.tree.map(jnp.copy, critic_params), tx=optimizer(args.critic_lr)
    )

    def networks() -> dict:
        return {"actor": actor_state.params, "critic": critic_state.params, "critic_target": critic_state.target_params}

    def optimizers() -> dict:
        return {"actor_optimizer": actor_state.opt_state, "critic_optimizer": critic_state.opt_state}

    @jax.jit
    def policy_step(actor_params, critic_target_params, obs: jax.Array, call: int) -> jax.Array:
        return select_actions(
            actor, critic, actor_params, critic_target_params, obs, jax.random.fold_in(eval_key, call), args.num_candidates
        )

    policy_calls = 0  # folded into eval_key: a fresh key per call, no host-side split (checkpointed)

    def policy(obs) -> jax.Array:
        global policy_calls
        policy_calls += 1
        return policy_step(actor_state.params, critic_state.target_params, obs, policy_calls - 1)

    def normalized(returns: np.ndarray) -> np.ndarray:
        return 100 * (returns - ref_min) / (ref_max - ref_min)

    # ALGO LOGIC: one training update, a pure function of the train state, the dataset and a key
    def update(actor_state: TrainState, critic_state: CriticTrainState, data: dict[str, jax.Array], key: jax.Array):
        key_batch, key_next, key_time, key_noise, key_pi, key_swap = jax.random.split(key, 6)
        idx = jax.random.randint(key_batch, (args.batch_size,), 0, num_transitions)
        obs, actions, rewards, next_obs, terminals = (data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "terminals"))

        # critic: clipped double-Q target with next actions from the CURRENT policy in one step (no target actor)
        if args.max_q_backup:  # 10 next actions per s': max per critic, then min over critics
            next_obs_rep = jnp.repeat(next_obs, 10, axis=0)
            next_actions = sample_actions(actor, actor_state.params, next_obs_rep, key_next)
            next_q1, next_q2 = critic.apply(critic_state.target_params, next_obs_rep, next_actions)
            next_q = jnp.minimum(next_q1.reshape(-1, 10).max(1, keepdims=True), next_q2.reshape(-1, 10).max(1, keepdims=True))
        else:
            next_actions = sample_actions(actor, actor_state.params, next_obs, key_next)
            next_q = critic.apply(critic_state.target_params, next_obs, next_actions, method=Critic.q_min)
        target_q = jax.lax.stop_gradient(rewards + (1 - terminals) * args.gamma * next_q)
        (critic_loss, q_mean), grads = jax.value_and_grad(partial(td_loss, critic), has_aux=True)(
            critic_state.params, obs, actions, target_q
        )
        critic_state = critic_state.apply_gradients(grads=grads)

        # actor: MeanFlow BC (Eq. 17) - eta * Q / |Q| (Eq. 19), the Q term through ONE network call
        t, r = sample_time_pairs(key_time, args.batch_size, args.flow_ratio, args.time_mu, args.time_sigma)
        noise = jax.random.normal(key_noise, actions.shape)
        swap = jax.random.uniform(key_swap) < 0.5  # a random critic for Q, the other for its scale

        def actor_loss_fn(params):
            bc_loss = mean_flow_loss(actor, params, obs, actions, t, r, noise)
            q1, q2 = critic.apply(critic_state.params, obs, sample_actions(actor, params, obs, key_pi))
            sg = jax.lax.stop_gradient
            q_loss = -jnp.where(swap, q1.mean() / sg(jnp.abs(q2).mean()), q2.mean() / sg(jnp.abs(q1).mean()))
            return bc_loss + args.eta * q_loss, (bc_loss, q_loss)

        (actor_loss, (bc_loss, q_loss)), grads = jax.value_and_grad(actor_loss_fn, has_aux=True)(actor_state.params)
        actor_state = actor_state.apply_gradients(grads=grads)

        # target critic: Polyak averaging
        critic_state = critic_state.replace(
            target_params=optax.incremental_update(critic_state.params, critic_state.target_params, args.tau)
        )
        losses = {"critic_loss": critic_loss, "bc_loss": bc_loss, "q_loss": q_loss, "actor_loss": actor_loss, "q_mean": q_mean}
        return actor_state, critic_state, losses

    # several updates per host call: a lax.scan (as fast as a Python-unrolled loop, far quicker to compile)
    def update_many(actor_state: TrainState, critic_state: CriticTrainState, key: jax.Array, first_nonfinite, data: dict[str, jax.Array]):
        def body(carry, step_key):
            actor_state, critic_state, first_nonfinite = carry
            actor_state, critic_state, losses = update(actor_state, critic_state, data, step_key)
            finite = jnp.isfinite(jnp.stack(list(losses.values()))).all()
            first_nonfinite = jnp.where(finite | (first_nonfinite > 0), first_nonfinite, actor_state.step)  # step: this update's number
            return (actor_state, critic_state, first_nonfinite), losses

        key, *step_keys = jax.random.split(key, updates_per_call + 1)
        (actor_state, critic_state, first_nonfinite), losses = jax.lax.scan(
            body, (actor_state, critic_state, first_nonfinite), jnp.stack(step_keys)
        )
        return actor_state, critic_state, key, first_nonfinite, jax.tree.map(lambda x: x[-1], losses)  # the losses of the last update

    if args.eval_only:
        saved = load_msgpack(args.checkpoint)
        args.total_steps = 0
    if saved:  # the networks; when resuming also the optimizers, the PRNG key and the count of policy calls
        params = {name: jax.device_put(flax.serialization.from_state_dict(value, saved[name])) for name, value in networks().items()}
        actor_state = actor_state.replace(params=params["actor"])
        critic_state = critic_state.replace(params=params["critic"], target_params=params["critic_target"])
    if args.resume:
        opt_states = {name: jax.device_put(flax.serialization.from_state_dict(value, saved[name])) for name, value in optimizers().items()}
        actor_state = actor_state.replace(step=start_step, opt_state=opt_states["actor_optimizer"])
        critic_state = critic_state.replace(step=start_step, opt_state=opt_states["critic_optimizer"])
        key, policy_calls = jax.device_put(saved["key"]), saved["policy_calls"]
        print(f"resuming {run_dir} from update {start_step}")

    evaluations = saved["evaluations"] if args.resume else []  # (update, normalized score)
    train_seconds = saved["train_seconds"] if args.resume else 0.0

    def evaluate_and_log(step: int, num_episodes: int) -> np.ndarray:
        scores = normalized(evaluate(policy, make_env, num_episodes, args.max_eval_envs, args.seed + step))
        evaluations.append((step, float(scores.mean())))
        writer.add_scalar("charts/normalized_score", scores.mean(), step)
        print(f"update {step}: normalized score {scores.mean():.1f} +- {scores.std():.1f} over {len(scores)} episodes")
        return scores

    def write_summary(step: int, **results) -> dict:
        updates_per_second = step / train_seconds if train_seconds > 0 else 0.0
        summary = {
            "algorithm": args.exp_name,
            "env_id": args.env_id,
            "dataset_id": dataset_id,
            "seed": args.seed,
            "total_steps": step,
            **results,
            "best_normalized_score": max((score for _, score in evaluations), default=None),
            "train_seconds": train_seconds,
            "compile_seconds": compile_seconds,
            "updates_per_second": updates_per_second,
            "hours_per_million_updates": 1e6 / updates_per_second / 3600 if updates_per_second > 0 else None,
            "device": device.platform,
            "threads": args.threads,
            "updates_per_call": updates_per_call,
            "resumed_from_step": start_step if args.resume else None,
            "evaluations": evaluations,
            "args": asdict(args),
        }
        save_atomically(f"{run_dir}/summary.json", summary)
        return summary

    def save_checkpoint(step: int):
        state = {name: flax.serialization.to_state_dict(value) for name, value in (networks() | optimizers()).items()}
        rng = {"key": key, "policy_calls": policy_calls}
        progress = {
            "step": step,
            "train_seconds": train_seconds,
            "evaluations": [list(evaluation) for evaluation in evaluations],  # msgpack takes lists, not tuples
            "wandb_id": wandb_id,
            "args": asdict(args),
        }
        save_atomically(f"{run_dir}/checkpoint.msgpack", state | rng | progress)

    # compile the training call ahead of the loop, timed apart from training
    updates_per_call = np.gcd.reduce(
        [args.updates_per_call, args.log_freq, args.eval_freq, args.checkpoint_freq, max(args.total_steps, 1)]
    ).item()
    if updates_per_call != args.updates_per_call:
        print(
            f"--updates-per-call {args.updates_per_call} lowered to {updates_per_call} "
            "to divide log-freq, eval-freq, checkpoint-freq and total-steps"
        )
    first_nonfinite = jnp.zeros((), dtype=jnp.int32)  # first update with a non-finite loss (0: none yet)
    compile_seconds = 0.0
    if args.total_steps > start_step:
        start_time = time.perf_counter()
        train_call = (
            jax.jit(update_many, donate_argnums=(0, 1, 2, 3)).lower(actor_state, critic_state, key, first_nonfinite, data).compile()
        )
        compile_seconds = time.perf_counter() - start_time
        print(f"compiled {updates_per_call} updates per call in {compile_seconds:.1f} s")

    # SIGINT (Ctrl-C) or SIGTERM: finish the current call of updates, checkpoint, write the summary so far, exit
    stop_signals = []

    def request_stop(signum, frame):
        if stop_signals:  # a second signal: stop at once
            raise KeyboardInterrupt
        stop_signals.append(signum)
        print(f"{signal.Signals(signum).name}: checkpointing after the updates dispatched so far (again to stop at once)", flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # TRY NOT TO MODIFY: the training loop
    last_finite = (start_step, {})  # the last losses read on the host, all finite
    start_time = time.perf_counter()
    for step in range(start_step + updates_per_call, args.total_steps + 1, updates_per_call):
        actor_state, critic_state, key, first_nonfinite, losses = train_call(actor_state, critic_state, key, first_nonfinite, data)

        if step % args.eval_freq == 0 and step < args.total_steps:
            jax.block_until_ready(actor_state)
            train_seconds += time.perf_counter() - start_time
            evaluate_and_log(step, args.eval_episodes)
            start_time = time.perf_counter()

        checkpoint_now = bool(stop_signals) or (args.checkpoint_freq > 0 and step % args.checkpoint_freq == 0)
        if step % args.log_freq == 0 or step == args.total_steps or checkpoint_now:
            losses = jax.device_get(losses)  # the only host synchronisation; jit returns dicts sorted by key: update's order back
            losses = {k: losses[k].item() for k in ("critic_loss", "bc_loss", "q_loss", "actor_loss", "q_mean")}
            train_seconds += time.perf_counter() - start_time
            start_time = time.perf_counter()
            if first_nonfinite.item() > 0:  # stop before anything is saved: the last checkpoint stays intact
                writer.close()
                raise SystemExit(
                    f"error: non-finite loss at update {first_nonfinite.item()} (at update {step}: {format_losses(losses)}); the last "
                    f"finite losses, at update {last_finite[0]}: {format_losses(last_finite[1])}. Nothing was saved after them. "
                    "Lower --lr or --critic-lr, or clip gradients with --grad-norm."
                )
            last_finite = (step, losses)
            for k, v in losses.items():
                writer.add_scalar(f"losses/{k}", v, step)
            updates_per_second = step / train_seconds
            writer.add_scalar("charts/updates_per_second", updates_per_second, step)
            eta_minutes = (args.total_steps - step) / updates_per_second / 60
            print(
                f"update {step}/{args.total_steps} | {updates_per_second:.1f} updates/s | ETA {eta_minutes:.1f} min | "
                f"critic {losses['critic_loss']:.3f} | bc {losses['bc_loss']:.3f} | q {losses['q_loss']:.3f}"
            )
            if checkpoint_now or stop_signals:  # after this step's evaluation, which draws policy keys; a signal may come
                save_checkpoint(step)  # while the host waits for the losses above, after checkpoint_now was decided
            if stop_signals:
                write_summary(step, interrupted_at_step=step)
                writer.close()
                print(f"stopped at update {step}; continue with: python {sys.argv[0]} --resume {run_dir}")
                sys.exit(128 + stop_signals[0])

    if args.save_model:
        save_atomically(f"{run_dir}/model.msgpack", networks() | {"args": asdict(args)})
        print(f"model saved to {run_dir}/model.msgpack")

    # final evaluation, decision frequency and summary
    scores = evaluate_and_log(args.total_steps, args.final_eval_episodes)
    decision_hz = decision_frequency(policy, data["obs"])
    returns = scores / 100 * (ref_max - ref_min) + ref_min
    summary = write_summary(
        args.total_steps,
        normalized_score=float(scores.mean()),
        normalized_score_std=float(scores.std()),
        return_mean=float(returns.mean()),
        eval_episodes=len(scores),
        num_candidates=args.num_candidates,
        decision_hz=decision_hz,
    )
    writer.add_scalar("charts/decision_hz", decision_hz, args.total_steps)
    print(
        f"{dataset_id}: normalized score {summary['normalized_score']:.1f} +- {summary['normalized_score_std']:.1f} "
        f"(best {summary['best_normalized_score']:.1f}) | training {train_seconds:.0f} s, {summary['updates_per_second']:.1f} updates/s, "
        f"compile {compile_seconds:.1f} s | {decision_hz:.1f} decisions/s | {run_dir}/summary.json"
    )
    writer.close()
    if args.track:
        wandb.finish()
