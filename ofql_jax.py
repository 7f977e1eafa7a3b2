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
- --save-model writes flax.serialization.to_bytes of the parameters to runs/{run_name}/model.msgpack.
- On a GPU, XLA may run float32 matmuls in TF32 (torch does not by default): set
  JAX_DEFAULT_MATMUL_PRECISION=highest for torch's arithmetic.
"""

import difflib
import itertools
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from functools import partial

import flax
import flax.linen as nn
import gymnasium as gym
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
    """a `model.msgpack` written by --save-model, for --eval-only"""

    # Data and evaluation
    env_id: str = "hopper-medium-v2"
    """a D4RL name (hopper-medium-v2) or a Minari dataset id (mujoco/hopper/medium-v0)"""
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
    """updates in one compiled call (a lax.scan); lowered to divide log-freq, eval-freq and total-steps"""

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

# D4RL names (version suffix dropped) -> Minari dataset ids.
LOCOMOTION = ("hopper", "halfcheetah", "walker2d", "ant", "humanoid")
ANTMAZE = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
D4RL_TO_MINARI = {
    **{f"{e}-{k}": f"mujoco/{e}/{k}-v0" for e in LOCOMOTION for k in ("medium", "expert", "simple")},
    **{f"antmaze-{k}": f"D4RL/antmaze/{k}-v1" for k in ANTMAZE},
    **{f"kitchen-{k}": f"D4RL/kitchen/{k}-v2" for k in ("complete", "partial", "mixed")},
    **{f"{e}-{k}": f"D4RL/{e}/{k}-v2" for e in ("pen", "door", "hammer", "relocate") for k in ("human", "cloned", "expert")},
}
# D4RL's normalization constants (min, max): random and expert returns of the original tasks.
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
    "antmaze": (0.0, 1.0),
    "kitchen": (0.0, 4.0),
}


def strip_version(name: str) -> str:
    return re.sub(r"-v\d+$", "", name)


def resolve_dataset_id(env_id: str) -> str:
    """A Minari id (it contains a slash) as given; a D4RL name mapped through D4RL_TO_MINARI."""
    if "/" in env_id:
        return env_id
    name = strip_version(env_id)
    if name in D4RL_TO_MINARI:
        return D4RL_TO_MINARI[name]
    if name.endswith("-medium-replay") or name.endswith("-medium-expert"):
        raise ValueError(f"{env_id!r}: Minari has no such dataset (its MuJoCo datasets are medium, expert and simple).")
    close = difflib.get_close_matches(name, D4RL_TO_MINARI, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown --env-id {env_id!r}.{hint} Known D4RL names: {', '.join(D4RL_TO_MINARI)}; or give a Minari id.")


def task_name(dataset_id: str) -> str:
    """`mujoco/hopper/medium-v0` -> `hopper-medium`: the key of TASKS and of its domain."""
    domain, kind = dataset_id.split("/")[-2:]
    return f"{domain}-{strip_version(kind)}"


def task_defaults(args: Args, dataset_id: str) -> Args:
    """Fill every None field of the algorithm block from the task table (command line wins)."""
    task = task_name(dataset_id)
    domain = task.split("-")[0]
    lr, eta, max_q_backup, reward_tune, updates, grad_norm = TASKS.get(task) or TASKS[DOMAIN_DEFAULTS.get(domain, DEFAULT_TASK)]
    defaults = dict(lr=lr, eta=eta, max_q_backup=max_q_backup, reward_tune=reward_tune, total_steps=updates, grad_norm=grad_norm)
    for field, value in defaults.items():
        if getattr(args, field) is None:
            setattr(args, field, value)
    return args


def load_dataset(dataset_id: str) -> minari.MinariDataset:
    """The local copy under MINARI_DATASETS_PATH, else a download from the Minari remote."""
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        local = minari.storage.get_dataset_path(dataset_id)
        print(f"{dataset_id} is not in {local}: downloading it")
    try:
        return minari.load_dataset(dataset_id, download=True)
    except Exception as error:  # no network, or no such dataset on the remote
        raise SystemExit(
            f"error: {dataset_id} is not local (looked in {local}, set by MINARI_DATASETS_PATH) and could not be downloaded "
            f"({type(error).__name__}: {error}). On a machine with internet run `minari download {dataset_id}`, copy the "
            "folder into MINARI_DATASETS_PATH here, or check the id with `minari list remote`."
        ) from None


def flatten_obs(obs) -> np.ndarray:
    """Dict observations -> one array, keys in sorted order (AntMaze: achieved_goal, desired_goal, observation)."""
    if isinstance(obs, dict):
        return np.concatenate([np.asarray(obs[k]) for k in sorted(obs)], axis=-1)
    return np.asarray(obs)


def dataset_to_tensors(dataset: minari.MinariDataset, reward_tune: str, device: jax.Device) -> dict[str, jax.Array]:
    """Flatten the episodes into transition arrays on `device`; done = termination only (a truncation is not terminal)."""
    obs, actions, rewards, next_obs, terminals = [], [], [], [], []
    for episode in dataset.iterate_episodes():
        episode_obs = flatten_obs(episode.observations)  # (N + 1, obs_dim)
        obs.append(episode_obs[:-1])
        next_obs.append(episode_obs[1:])
        actions.append(episode.actions)
        rewards.append(episode.rewards)
        terminals.append(episode.terminations)
    data = {
        "obs": np.concatenate(obs),
        "actions": np.concatenate(actions),
        "rewards": np.concatenate(rewards)[:, None],
        "next_obs": np.concatenate(next_obs),
        "terminals": np.concatenate(terminals)[:, None],
    }
    if reward_tune == "cql":
        data["rewards"] = (data["rewards"] - 0.5) * 4.0
    elif reward_tune == "normalize":
        data["rewards"] = (data["rewards"] - data["rewards"].mean()) / data["rewards"].std()
    elif reward_tune != "none":
        raise ValueError(f"unknown --reward-tune {reward_tune!r}: use none, cql or normalize")
    return {k: jax.device_put(np.asarray(v, dtype=np.float32), device) for k, v in data.items()}


def reference_scores(dataset: minari.MinariDataset, dataset_id: str) -> tuple[float, float]:
    """D4RL's (min, max) return for the domain, else the dataset's own reference scores."""
    domain = task_name(dataset_id).split("-")[0]
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


def write_json(path: str, content: dict):
    """Write atomically (temporary file, then rename): an interrupted run never leaves half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        dataset_id = resolve_dataset_id(args.env_id)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    args = task_defaults(args, dataset_id)
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"

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

    # data setup: transitions on the device, the env the dataset was recorded on for evaluation
    dataset = load_dataset(dataset_id)
    data = dataset_to_tensors(dataset, args.reward_tune, device)
    num_transitions = data["obs"].shape[0]
    ref_min, ref_max = reference_scores(dataset, dataset_id)

    def make_env() -> gym.Env:
        return dataset.recover_environment(eval_env=True)

    action_space = dataset.action_space
    obs_dim, action_dim = data["obs"].shape[1], data["actions"].shape[1]
    print(f"{dataset_id}: {num_transitions:,} transitions, obs_dim {obs_dim}, action_dim {action_dim}, device {device.platform}")

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    # logging: only now that the data loaded, so that a failed start leaves no run folder behind
    writer = SummaryWriter(f"runs/{run_name}")
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

    @jax.jit
    def policy_step(actor_params, critic_target_params, obs: jax.Array, call: int) -> jax.Array:
        return select_actions(
            actor, critic, actor_params, critic_target_params, obs, jax.random.fold_in(eval_key, call), args.num_candidates
        )

    policy_calls = itertools.count()  # folded into eval_key: a fresh key per call, no host-side split

    def policy(obs) -> jax.Array:
        return policy_step(actor_state.params, critic_state.target_params, obs, next(policy_calls))

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
    def update_many(actor_state: TrainState, critic_state: CriticTrainState, key: jax.Array, data: dict[str, jax.Array]):
        def body(carry, step_key):
            actor_state, critic_state, losses = update(*carry, data, step_key)
            return (actor_state, critic_state), losses

        key, *step_keys = jax.random.split(key, updates_per_call + 1)
        (actor_state, critic_state), losses = jax.lax.scan(body, (actor_state, critic_state), jnp.stack(step_keys))
        return actor_state, critic_state, key, jax.tree.map(lambda x: x[-1], losses)  # the losses of the last update

    if args.eval_only:
        if args.checkpoint is None:
            raise SystemExit("--eval-only needs --checkpoint PATH (a model.msgpack written by --save-model)")
        with open(args.checkpoint, "rb") as f:
            template = {"actor": actor_state.params, "critic": critic_state.params, "critic_target": critic_state.target_params}
            checkpoint = flax.serialization.from_bytes(template, f.read())
        actor_state = actor_state.replace(params=checkpoint["actor"])
        critic_state = critic_state.replace(params=checkpoint["critic"], target_params=checkpoint["critic_target"])
        args.total_steps = 0

    evaluations = []  # (update, normalized score)

    def evaluate_and_log(step: int, num_episodes: int) -> np.ndarray:
        scores = normalized(evaluate(policy, make_env, num_episodes, args.max_eval_envs, args.seed + step))
        evaluations.append((step, float(scores.mean())))
        writer.add_scalar("charts/normalized_score", scores.mean(), step)
        print(f"update {step}: normalized score {scores.mean():.1f} +- {scores.std():.1f} over {len(scores)} episodes")
        return scores

    # compile the training call ahead of the loop, timed apart from training
    updates_per_call = np.gcd.reduce([args.updates_per_call, args.log_freq, args.eval_freq, max(args.total_steps, 1)]).item()
    if updates_per_call != args.updates_per_call:
        print(f"--updates-per-call {args.updates_per_call} lowered to {updates_per_call} to divide log-freq, eval-freq and total-steps")
    compile_seconds = 0.0
    if args.total_steps > 0:
        start_time = time.perf_counter()
        train_call = jax.jit(update_many, donate_argnums=(0, 1, 2)).lower(actor_state, critic_state, key, data).compile()
        compile_seconds = time.perf_counter() - start_time
        print(f"compiled {updates_per_call} updates per call in {compile_seconds:.1f} s")

    # TRY NOT TO MODIFY: the training loop
    train_seconds, start_time = 0.0, time.perf_counter()
    for step in range(updates_per_call, args.total_steps + 1, updates_per_call):
        actor_state, critic_state, key, losses = train_call(actor_state, critic_state, key, data)

        if step % args.log_freq == 0 or step == args.total_steps:
            losses = {k: v.item() for k, v in jax.device_get(losses).items()}  # the only host synchronisation
            if not all(np.isfinite(v) for v in losses.values()):
                raise FloatingPointError(f"non-finite loss at update {step}: {losses}")
            train_seconds += time.perf_counter() - start_time
            start_time = time.perf_counter()
            for k, v in losses.items():
                writer.add_scalar(f"losses/{k}", v, step)
            updates_per_second = step / train_seconds
            writer.add_scalar("charts/updates_per_second", updates_per_second, step)
            eta_minutes = (args.total_steps - step) / updates_per_second / 60
            print(
                f"update {step}/{args.total_steps} | {updates_per_second:.1f} updates/s | ETA {eta_minutes:.1f} min | "
                f"critic {losses['critic_loss']:.3f} | bc {losses['bc_loss']:.3f} | q {losses['q_loss']:.3f}"
            )

        if step % args.eval_freq == 0 and step < args.total_steps:
            jax.block_until_ready(actor_state)
            train_seconds += time.perf_counter() - start_time
            evaluate_and_log(step, args.eval_episodes)
            start_time = time.perf_counter()

    # final evaluation, decision frequency and summary
    scores = evaluate_and_log(args.total_steps, args.final_eval_episodes)
    decision_hz = decision_frequency(policy, data["obs"])
    returns = scores / 100 * (ref_max - ref_min) + ref_min
    updates_per_second = args.total_steps / train_seconds if train_seconds > 0 else 0.0
    summary = {
        "algorithm": args.exp_name,
        "env_id": args.env_id,
        "dataset_id": dataset_id,
        "seed": args.seed,
        "total_steps": args.total_steps,
        "normalized_score": float(scores.mean()),
        "normalized_score_std": float(scores.std()),
        "best_normalized_score": max(score for _, score in evaluations),
        "return_mean": float(returns.mean()),
        "eval_episodes": len(scores),
        "num_candidates": args.num_candidates,
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "updates_per_second": updates_per_second,
        "hours_per_million_updates": 1e6 / updates_per_second / 3600 if updates_per_second > 0 else None,
        "decision_hz": decision_hz,
        "device": device.platform,
        "threads": args.threads,
        "updates_per_call": updates_per_call,
        "evaluations": evaluations,
        "args": asdict(args),
    }
    write_json(f"runs/{run_name}/summary.json", summary)
    writer.add_scalar("charts/decision_hz", decision_hz, args.total_steps)
    if args.save_model:
        model_path = f"runs/{run_name}/model.msgpack"
        params = {"actor": actor_state.params, "critic": critic_state.params, "critic_target": critic_state.target_params}
        with open(model_path + ".tmp", "wb") as f:
            f.write(flax.serialization.to_bytes(params))
        os.replace(model_path + ".tmp", model_path)
        print(f"model saved to {model_path}")
    print(
        f"{dataset_id}: normalized score {summary['normalized_score']:.1f} +- {summary['normalized_score_std']:.1f} "
        f"(best {summary['best_normalized_score']:.1f}) | training {train_seconds:.0f} s, {updates_per_second:.1f} updates/s, "
        f"compile {compile_seconds:.1f} s | {decision_hz:.1f} decisions/s | runs/{run_name}/summary.json"
    )
    writer.close()
    if args.track:
        wandb.finish()
