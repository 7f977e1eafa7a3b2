"""One-Step Flow Q-Learning (OFQL): offline RL with a one-step MeanFlow policy.

Paper: "Revisiting Diffusion Q-Learning: From Iterative Denoising to One-Step Action Generation".
OFQL is Diffusion Q-Learning (DQL) with the multi-step DDPM policy replaced by an average-velocity
(MeanFlow) policy u(a_t, r, t; s) that acts in ONE network call: a = eps - u(eps, r=0, t=1; s) (Eq. 18).
Its behaviour-cloning loss regresses u onto the MeanFlow identity target (Eq. 16-17), computed with one
forward-mode Jacobian-vector product; the Q term backpropagates through a single network call (no BPTT),
and there is no target actor: the critic's next actions come from the current policy in one step.

Usage:
    python ofql.py --env-id hopper-medium-v2                # D4RL name -> Minari dataset
    python ofql.py --env-id mujoco/hopper/expert-v0         # a Minari id is used as given
    MINARI_DATASETS_PATH=../shared/datasets python ofql.py --env-id sac/hopper/medium-replay-v0
    python ofql.py --env-id hopper-medium-replay-v2 --dataset-path hopper_medium_replay-v2.hdf5   # a D4RL file
    python ofql.py --resume runs/{run_name}                 # continue an interrupted run (Ctrl-C checkpoints)
    python ofql.py --help                                   # every flag, with its meaning

Choices the paper leaves open (see README, "Implementation details"):
- Per-task eta is not published. The defaults in TASKS are ours: 0.1 on locomotion, chosen from the
  paper's grid {0.001, 0.01, 0.1, 0.3, 0.5} with a sweep on hopper medium-replay (DQL's eta 1.0 collapses
  there), more Q on AntMaze and more BC on Kitchen, as the paper advises. Override with --eta.
- Time embedding: raw t, r in [0, 1] go into DQL's sinusoidal embedding (as the MeanFlow references do);
  scaling t by 1000 makes d_t u dominate the target.
- The BC loss is the mean squared error over batch and action dimensions, like DQL's, so eta keeps DQL's
  meaning; no adaptive loss weighting (the paper adds none).
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

import gymnasium as gym
import h5py
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


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
    """write the training state to `runs/{run_name}/checkpoint.pt` every this many updates (0: only on SIGINT/SIGTERM)"""
    resume: str | None = None
    """a run folder `runs/{run_name}`: continue its `checkpoint.pt` to the same --total-steps, with the run's own arguments"""
    compile: bool = False
    """torch.compile the update and the policy call"""
    cudagraphs: bool = False
    """capture the update and the policy call in CUDA graphs, replayed at every call (GPU only; with --compile, of the compiled code)"""

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


def dataset_to_tensors(transitions: dict[str, np.ndarray], reward_tune: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Reward shaping per task, then float32 tensors on `device`: rewards and terminals as (N, 1)."""
    data = transitions | {"rewards": transitions["rewards"][:, None], "terminals": transitions["terminals"][:, None]}
    if reward_tune == "cql":
        data["rewards"] = (data["rewards"] - 0.5) * 4.0
    elif reward_tune == "normalize":
        data["rewards"] = (data["rewards"] - data["rewards"].mean()) / data["rewards"].std()
    elif reward_tune != "none":
        raise ValueError(f"unknown --reward-tune {reward_tune!r}: use none, cql or normalize")
    return {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in data.items()}


def reference_scores(dataset: minari.MinariDataset, dataset_id: str, domain: str) -> tuple[float, float]:
    """D4RL's (min, max) return for the domain, else the dataset's own reference scores."""
    if domain in D4RL_REF_SCORES:
        return D4RL_REF_SCORES[domain]
    metadata = dataset.storage.metadata
    if metadata.get("ref_min_score") is None or metadata.get("ref_max_score") is None:
        raise ValueError(f"{dataset_id}: no D4RL reference returns for {domain!r} and none in the dataset's metadata")
    return metadata["ref_min_score"], metadata["ref_max_score"]


# ALGO LOGIC: initialize agent here:
def mish_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e^x and n = e^x (e^x + 2), from which tanh(softplus(x)) = n / (n + 2): Mish from one exp."""
    e = torch.exp(x.clamp(max=20.0))  # past 20, n / (n + 2) is 1 in float32
    return e, e * (e + 2)


def mish_derivative(x: torch.Tensor, e: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """mish'(x) = n / (n + 2) + 4 x e^x (e^x + 1) / (n + 2)^2."""
    return (n + 4 * x * e * (e + 1) / (n + 2)) / (n + 2)


class MishFunction(torch.autograd.Function):
    """Mish with its closed-form backward: a few kernels where autograd would chain a dozen through the forward's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        e, n = mish_parts(x)
        ctx.save_for_backward(x, e, n)
        return x * n / (n + 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * mish_derivative(*ctx.saved_tensors)


class Mish(nn.Module):
    """nn.Mish, x tanh(softplus(x)), in closed form on CPU, where torch's tanh and log1p are slow: the same function up
    to float rounding, forward and backward over 2x faster than nn.Mish there. On GPU, torch's fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return MishFunction.apply(x) if x.is_cpu else F.mish(x)


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
    """The layers applied in turn to x (with gradient) and their derivatives to x_dot (without): a JVP written out by
    hand, since torch's forward AD also multiplies by the weights' zero tangents (twice the matmuls, pytorch#69687)."""
    for layer in layers:
        x, x_dot = layer(x), tangent(layer, x, x_dot)
    return x, x_dot


class Actor(nn.Module):
    """Average velocity u(a_t, r, t; s): DQL's MLP with a second time embedding, for r."""

    def __init__(
        self, obs_dim: int, action_dim: int, action_low: np.ndarray, action_high: np.ndarray, hidden_dim: int = 256, t_dim: int = 16
    ):
        super().__init__()
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
        x = torch.cat([a_t, self.t_mlp(t), self.r_mlp(r), obs], dim=-1)
        return self.final_layer(self.mid_layer(x))

    def jvp(
        self, a_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, obs: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """u(a_t, r, t; s) and du/dt = v . d_a u + d_t u, its derivative along (v, 0, 1), from one pass (Eq. 16)."""
        t_emb, t_emb_dot = forward_and_tangent(self.t_mlp, t, torch.ones_like(t))
        r_emb = self.r_mlp(r)
        x = torch.cat([a_t, t_emb, r_emb, obs], dim=-1)
        x_dot = torch.cat([v, t_emb_dot, torch.zeros_like(r_emb), torch.zeros_like(obs)], dim=-1)
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


def sample_actions(actor: Actor, obs: torch.Tensor) -> torch.Tensor:
    """One-step action a = eps - u(eps, r=0, t=1; s) (Eq. 18), clipped to the action bounds; differentiable."""
    noise = torch.randn(obs.shape[0], actor.action_low.shape[0], device=obs.device)
    zeros, ones = torch.zeros(obs.shape[0], device=obs.device), torch.ones(obs.shape[0], device=obs.device)
    return (noise - actor(noise, zeros, ones, obs)).clamp(actor.action_low, actor.action_high)


def sample_time_pairs(
    batch_size: int, flow_ratio: float, mu: float, sigma: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) from a logit-normal, ordered so that r <= t; r = t for the first `flow_ratio` of the batch."""
    t, r = torch.sigmoid(torch.randn(2, batch_size, device=device) * sigma + mu).sort(dim=0, descending=True).values
    equal = torch.arange(batch_size, device=device) < round(flow_ratio * batch_size)
    return t, torch.where(equal, t, r)


def mean_flow_loss(
    actor: Actor, obs: torch.Tensor, actions: torch.Tensor, t: torch.Tensor, r: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """MeanFlow behaviour cloning (Eq. 17) on the path a_t = (1 - t) a + t eps, conditional velocity v = eps - a: u regressed
    onto u_tgt = v - (t - r) du/dt (Eq. 16), with no gradient through the target; u and du/dt come from one pass."""
    a_t = (1 - t[:, None]) * actions + t[:, None] * noise
    v = noise - actions
    u, du_dt = actor.jvp(a_t, r, t, obs, v)
    return F.mse_loss(u, v - (t - r)[:, None] * du_dt)


@torch.no_grad()
def select_actions(actor: Actor, critic_target: Critic, obs: torch.Tensor, num_candidates: int) -> torch.Tensor:
    """Evaluation policy: `num_candidates` actions per state, one drawn from softmax over the target critic's min-Q."""
    n = obs.shape[0]
    obs_rep = obs.repeat_interleave(num_candidates, dim=0)  # (n * c, obs_dim)
    actions = sample_actions(actor, obs_rep).view(n, num_candidates, -1)
    q = critic_target.q_min(obs_rep, actions.flatten(0, 1)).view(n, num_candidates)
    probs = F.softmax(q, dim=-1)
    pick = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1)  # torch.multinomial's own draw, minus its host sync
    return actions[torch.arange(n, device=obs.device), pick]


def evaluate(policy, make_env, num_episodes: int, max_envs: int, seed: int, device: torch.device) -> np.ndarray:
    """Returns of `num_episodes` episodes, run in a vectorized env with one policy call per step for all envs."""
    num_envs = min(num_episodes, max_envs)
    quota = np.full(num_envs, num_episodes // num_envs) + (np.arange(num_envs) < num_episodes % num_envs)
    envs = gym.vector.SyncVectorEnv([make_env] * num_envs, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=seed)
    returns, running, finished = [], np.zeros(num_envs), np.zeros(num_envs, dtype=int)
    while (finished < quota).any():
        actions = policy(torch.as_tensor(flatten_obs(obs), dtype=torch.float32, device=device)).cpu().numpy()
        obs, rewards, terminations, truncations, _ = envs.step(actions)
        running += rewards
        for i in np.flatnonzero(terminations | truncations):
            if finished[i] < quota[i]:
                returns.append(running[i])
            finished[i] += 1
            running[i] = 0.0
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


def cuda_graphed(fn: Callable, warmup: int = 3) -> Callable:
    """fn, replayed from a CUDA graph: per input shapes (and values of non-tensor inputs), `warmup` eager calls on a side
    stream, then one capture; later calls copy their tensors into the graph's static inputs and replay it. fn must have
    static shapes and no host synchronisation; its outputs are the graph's static outputs, overwritten by the next call."""
    graphs, calls = {}, {}  # key -> (graph, static inputs, static outputs); key -> eager calls so far

    def graphed(*inputs):
        key = tuple(x.shape if torch.is_tensor(x) else x for x in inputs)
        if key in graphs:
            graph, static_inputs, static_outputs = graphs[key]
            for static, x in zip(static_inputs, inputs, strict=True):
                if torch.is_tensor(x):
                    static.copy_(x)
            graph.replay()
            return static_outputs
        if calls.get(key, 0) < warmup:  # warm up on a side stream, as capture requires (real calls, run once)
            calls[key] = calls.get(key, 0) + 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                outputs = fn(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            return outputs
        graph, static_inputs = torch.cuda.CUDAGraph(), [x.clone() if torch.is_tensor(x) else x for x in inputs]
        with torch.cuda.graph(graph):  # records the kernels without running them: the replay below runs this call
            static_outputs = fn(*static_inputs)
        graphs[key] = (graph, static_inputs, static_outputs)
        graph.replay()
        return static_outputs

    return graphed


def format_losses(losses: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in losses.items()) or "none yet"


def save_atomically(path: str, content: dict):
    """Write to a temporary file, then rename: an interrupted run never leaves half a file. JSON or torch.save."""
    if path.endswith(".json"):
        with open(path + ".tmp", "w") as f:
            json.dump(content, f, indent=2)
    else:
        torch.save(content, path + ".tmp")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    saved = None  # a checkpoint to resume, or a model to evaluate
    if args.resume:  # the run's own arguments, except where and how to run
        checkpoint_path = os.path.join(args.resume, "checkpoint.pt")
        if not os.path.isfile(checkpoint_path):
            raise SystemExit(
                f"error: --resume {args.resume}: no checkpoint.pt there (written on SIGINT/SIGTERM and every --checkpoint-freq updates)"
            )
        saved = torch.load(checkpoint_path, map_location="cpu")
        args = Args(**saved["args"] | {k: getattr(args, k) for k in ("resume", "cuda", "threads", "track", "compile", "cudagraphs")})
    if args.eval_only and not (args.checkpoint and os.path.isfile(args.checkpoint)):
        raise SystemExit(
            f"error: --eval-only needs --checkpoint PATH, a model.pt written by --save-model (or a checkpoint.pt); got {args.checkpoint}"
        )
    try:
        dataset_id = args.dataset_path or resolve_dataset_id(args.env_id)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    args = task_defaults(args)
    run_dir = args.resume or f"runs/{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_name = os.path.basename(os.path.normpath(run_dir))

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.cudagraphs and device.type != "cuda":
        raise SystemExit("error: --cudagraphs needs a CUDA GPU (and --cuda); on CPU, use --compile")

    # data setup: transitions on the device, the env the data was recorded on for evaluation
    try:
        transitions, make_env, action_space, (ref_min, ref_max) = load_task(args, dataset_id)
        data = dataset_to_tensors(transitions, args.reward_tune, device)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    num_transitions = data["obs"].shape[0]
    obs_dim, action_dim = data["obs"].shape[1], data["actions"].shape[1]
    print(f"{dataset_id}: {num_transitions:,} transitions, obs_dim {obs_dim}, action_dim {action_dim}, device {device}")

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

    actor = Actor(obs_dim, action_dim, action_space.low, action_space.high).to(device)
    critic = Critic(obs_dim, action_dim).to(device)
    critic_target = Critic(obs_dim, action_dim).to(device)
    critic_target.load_state_dict(critic.state_dict())
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.lr, fused=True)  # one kernel per step (CPU and GPU), no host sync
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr, fused=True)
    networks = {"actor": actor, "critic": critic, "critic_target": critic_target}
    optimizers = {"actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer}

    def policy(obs: torch.Tensor) -> torch.Tensor:
        return select_actions(actor, critic_target, obs, args.num_candidates)

    def normalized(returns: np.ndarray) -> np.ndarray:
        return 100 * (returns - ref_min) / (ref_max - ref_min)

    # ALGO LOGIC: one training update, a function of tensors with static shapes and no host synchronisation
    def update(obs, actions, rewards, next_obs, terminals, swap: bool) -> dict[str, torch.Tensor]:
        # critic: clipped double-Q target with next actions from the CURRENT policy in one step (no target actor)
        with torch.no_grad():
            if args.max_q_backup:  # 10 next actions per s': max per critic, then min over critics
                next_obs_rep = next_obs.repeat_interleave(10, dim=0)
                next_q1, next_q2 = critic_target(next_obs_rep, sample_actions(actor, next_obs_rep))
                next_q = torch.min(next_q1.view(-1, 10).amax(1, keepdim=True), next_q2.view(-1, 10).amax(1, keepdim=True))
            else:
                next_q = critic_target.q_min(next_obs, sample_actions(actor, next_obs))
            target_q = rewards + (1 - terminals) * args.gamma * next_q
        current_q1, current_q2 = critic(obs, actions)
        critic_loss = F.mse_loss(current_q1, target_q) + F.mse_loss(current_q2, target_q)
        critic_optimizer.zero_grad()
        critic_loss.backward()
        if args.grad_norm > 0:
            nn.utils.clip_grad_norm_(critic.parameters(), max_norm=args.grad_norm)
        critic_optimizer.step()

        # actor: MeanFlow BC (Eq. 17) - eta * Q / |Q| (Eq. 19), the Q term through ONE network call
        t, r = sample_time_pairs(obs.shape[0], args.flow_ratio, args.time_mu, args.time_sigma, obs.device)
        bc_loss = mean_flow_loss(actor, obs, actions, t, r, torch.randn_like(actions))
        q1, q2 = critic(obs, sample_actions(actor, obs))
        q, q_scale = (q2, q1) if swap else (q1, q2)  # a random critic for Q, the other for its scale
        q_loss = -q.mean() / q_scale.abs().mean().detach()
        actor_loss = bc_loss + args.eta * q_loss
        actor_optimizer.zero_grad()
        actor_loss.backward(inputs=list(actor.parameters()))  # the critic only passes the Q gradient on: no weight gradients
        if args.grad_norm > 0:
            nn.utils.clip_grad_norm_(actor.parameters(), max_norm=args.grad_norm)
        actor_optimizer.step()

        # target critic: Polyak averaging, fused
        with torch.no_grad():
            torch._foreach_lerp_(list(critic_target.parameters()), list(critic.parameters()), args.tau)
        return {"critic_loss": critic_loss, "bc_loss": bc_loss, "q_loss": q_loss, "actor_loss": actor_loss, "q_mean": current_q1.mean()}

    if args.compile:
        import torch._inductor.config

        torch._inductor.config.fallback_random = True  # draw from torch's generator as eager mode does: same stream, resumable
        update, policy = torch.compile(update), torch.compile(policy)
    if args.cudagraphs:
        update, policy = cuda_graphed(update), cuda_graphed(policy)

    if args.eval_only:
        saved = torch.load(args.checkpoint, map_location=device)
        args.total_steps = 0
    if saved:  # the networks; when resuming also the optimizers and the RNG
        for name, module in networks.items():
            module.load_state_dict(saved[name])
    if args.resume:
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(saved[name])
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        print(f"resuming {run_dir} from update {start_step}")

    evaluations = saved["evaluations"] if args.resume else []  # (update, normalized score)
    train_seconds = saved["train_seconds"] if args.resume else 0.0

    def evaluate_and_log(step: int, num_episodes: int) -> np.ndarray:
        scores = normalized(evaluate(policy, make_env, num_episodes, args.max_eval_envs, args.seed + step, device))
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
            "updates_per_second": updates_per_second,
            "hours_per_million_updates": 1e6 / updates_per_second / 3600 if updates_per_second > 0 else None,
            "compile_seconds": compile_seconds,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "resumed_from_step": start_step if args.resume else None,
            "evaluations": evaluations,
            "args": asdict(args),
        }
        save_atomically(f"{run_dir}/summary.json", summary)
        return summary

    def save_checkpoint(step: int):
        state = {name: module.state_dict() for name, module in (networks | optimizers).items()}
        rng = {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        progress = {"step": step, "train_seconds": train_seconds, "evaluations": evaluations, "wandb_id": wandb_id, "args": asdict(args)}
        save_atomically(f"{run_dir}/checkpoint.pt", state | rng | progress)

    # SIGINT (Ctrl-C) or SIGTERM: finish the current update, checkpoint, write the summary so far, exit
    stop_signals = []

    def request_stop(signum, frame):
        if stop_signals:  # a second signal: stop at once
            raise KeyboardInterrupt
        stop_signals.append(signum)
        print(f"{signal.Signals(signum).name}: checkpointing after this update (again to stop at once)", flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # TRY NOT TO MODIFY: the training loop
    compile_seconds, compiled = 0.0, set()  # compile time, coins compiled for
    first_nonfinite = torch.zeros((), dtype=torch.long, device=device)  # first update with a non-finite loss (0: none yet)
    last_finite = (start_step, {})  # the last losses read on the host, all finite
    start_time = time.perf_counter()
    for step in range(start_step + 1, args.total_steps + 1):
        idx = torch.randint(num_transitions, (args.batch_size,), device=device)
        swap = bool(torch.rand(()) < 0.5)  # the critics' order, a host coin (CPU generator, no sync): backward through one critic
        losses = update(*(data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "terminals")), swap)
        finite = torch.stack(list(losses.values())).isfinite().all()
        first_nonfinite = torch.where(finite | (first_nonfinite > 0), first_nonfinite, step)  # on the device: no sync
        if args.compile and swap not in compiled:  # the first call for each coin compiles: timed apart from training
            compiled.add(swap)
            compile_seconds, start_time = compile_seconds + time.perf_counter() - start_time, time.perf_counter()

        if step % args.eval_freq == 0 and step < args.total_steps:
            train_seconds += time.perf_counter() - start_time
            evaluate_and_log(step, args.eval_episodes)
            start_time = time.perf_counter()

        stopping = bool(stop_signals)  # read once: a signal that comes later in this block is handled after the next update
        checkpoint_now = stopping or (args.checkpoint_freq > 0 and step % args.checkpoint_freq == 0)
        if step % args.log_freq == 0 or step == args.total_steps or checkpoint_now:
            losses = {k: v.item() for k, v in losses.items()}  # the only host synchronisation
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
            if checkpoint_now:  # after this update's evaluation, which draws from the same RNG
                save_checkpoint(step)
            if stopping:
                write_summary(step, interrupted_at_step=step)
                writer.close()
                print(f"stopped at update {step}; continue with: python {sys.argv[0]} --resume {run_dir}")
                sys.exit(128 + stop_signals[0])

    if args.save_model:
        save_atomically(f"{run_dir}/model.pt", {name: module.state_dict() for name, module in networks.items()} | {"args": asdict(args)})
        print(f"model saved to {run_dir}/model.pt")

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
        f"{summary['hours_per_million_updates'] or 0:.2f} h per 1M updates | {decision_hz:.1f} decisions/s | {run_dir}/summary.json"
    )
    writer.close()
    if args.track:
        wandb.finish()
