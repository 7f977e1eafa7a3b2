"""FQL: DQL with its DDPM policy replaced by a K-step flow matching policy (the OFQL paper's ablation).

This is "FQL" of Table 2 in "Revisiting Diffusion Q-Learning": "DQL but using a Flow Matching policy, trained
with 5-step sampling but evaluated with one-step". It is NOT Park, Li, Levine (2025) "Flow Q-Learning" (a BC flow
distilled into a one-step policy). It is dql.py with a marginal velocity v(a_t, t; s) trained by conditional flow
matching (Eq. 11) on the path a_t = (1 - t) a + t eps, t ~ Uniform(0, 1); Euler steps from t = 1 to 0 (Eq. 12).
Actions are sampled with gradients kept, so the Q term backpropagates through every sampling step (BPTT,
Eq. 8), and the critic's next actions come from an EMA target actor (Eq. 7). Equation numbers are those of
"Revisiting Diffusion Q-Learning" (OFQL, ofql.py), whose Eq. 2-8 restate DQL.

Usage:
    python fql.py --env-id hopper-medium-v2                # D4RL name -> Minari dataset
    MINARI_DATASETS_PATH=../shared/datasets python fql.py --env-id sac/hopper/medium-replay-v0
    python fql.py --eval-steps 1                           # the paper's ablation "FQL (1)": trained with 5 steps
    python fql.py --help                                   # every flag, with its meaning

Choices the sources leave open (see README, "Implementation details"):
- TASKS holds DQL's per-task hyperparameters (its main.py), eta 1.0 on locomotion.
- t ~ Uniform(0, 1) in the flow matching loss (the paper does not say which; ofql.py's logit-normal is MeanFlow's).
- Only the final action is clipped to the action bounds (a flow has no x0 prediction to clip along the way).
- Raw t in [0, 1] goes into the sinusoidal embedding, as in ofql.py.
"""

import difflib
import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass

import gymnasium as gym
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
    """a `model.pt` written by --save-model, for --eval-only"""

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

    # Algorithm specific arguments (None: the task table's value)
    lr: float | None = None
    """learning rate of the actor (the critic's is 3e-4, as in DQL)"""
    eta: float | None = None
    """weight of the normalized Q term in the actor loss (Eq. 8)"""
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
    flow_steps: int = 5
    """K: Euler steps of the flow, in training (the Q term) and for the critic's next actions"""
    eval_steps: int | None = None
    """Euler steps at evaluation (default K; 1 is the paper's "FQL (1)")"""
    ema_decay: float = 0.995
    """decay of the EMA target actor that gives the critic's next actions"""
    ema_start: int = 1000
    """the target actor keeps its initial weights until this update"""
    ema_every: int = 5
    """update the EMA target actor every this many updates"""


# Per-task defaults: (lr, eta, max_q_backup, reward_tune, updates, grad_norm), all DQL's (its main.py; epochs x 1000).
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


def dataset_to_tensors(dataset: minari.MinariDataset, reward_tune: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Flatten the episodes into transition tensors on `device`; done = termination only (a truncation is not terminal)."""
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
    return {k: torch.as_tensor(v, dtype=torch.float32, device=device) for k, v in data.items()}


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
class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(torch.arange(half) * -(np.log(10000) / (half - 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        x = x[:, None] * self.freqs[None, :]
        return torch.cat((x.sin(), x.cos()), dim=-1)


def time_mlp(t_dim: int = 16) -> nn.Sequential:
    return nn.Sequential(SinusoidalPosEmb(t_dim), nn.Linear(t_dim, t_dim * 2), nn.Mish(), nn.Linear(t_dim * 2, t_dim))


class Actor(nn.Module):
    """Marginal velocity v(a_t, t; s): DQL's MLP, with continuous t in [0, 1]."""

    def __init__(
        self, obs_dim: int, action_dim: int, action_low: np.ndarray, action_high: np.ndarray, hidden_dim: int = 256, t_dim: int = 16
    ):
        super().__init__()
        self.t_mlp = time_mlp(t_dim)
        self.mid_layer = nn.Sequential(
            nn.Linear(action_dim + t_dim + obs_dim, hidden_dim), nn.Mish(),
            nn.Linear(hidden_dim, hidden_dim), nn.Mish(),
            nn.Linear(hidden_dim, hidden_dim), nn.Mish(),
        )  # fmt: skip
        self.final_layer = nn.Linear(hidden_dim, action_dim)
        self.register_buffer("action_low", torch.as_tensor(action_low, dtype=torch.float32))
        self.register_buffer("action_high", torch.as_tensor(action_high, dtype=torch.float32))

    def forward(self, a_t: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        x = torch.cat([a_t, self.t_mlp(t), obs], dim=-1)
        return self.final_layer(self.mid_layer(x))


class Critic(nn.Module):
    """Twin Q networks, as in DQL."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int = 256):
        super().__init__()

        def q_net() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(obs_dim + action_dim, hidden_dim), nn.Mish(),
                nn.Linear(hidden_dim, hidden_dim), nn.Mish(),
                nn.Linear(hidden_dim, hidden_dim), nn.Mish(),
                nn.Linear(hidden_dim, 1),
            )  # fmt: skip

        self.q1_model, self.q2_model = q_net(), q_net()

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, action], dim=-1)
        return self.q1_model(x), self.q2_model(x)

    def q_min(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.min(*self(obs, action))


def sample_actions(actor: Actor, obs: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler integration of da/dt = v(a, t; s) (Eq. 12) from a_1 ~ N(0, I) at t = 1 to t = 0 in `steps` equal steps,
    the final action clipped to the action bounds; differentiable through every network call (BPTT)."""
    x = torch.randn(obs.shape[0], actor.action_low.shape[0], device=obs.device)
    for k in range(steps, 0, -1):
        x = x - actor(x, torch.full((obs.shape[0],), k / steps, device=obs.device), obs) / steps
    return x.clamp(actor.action_low, actor.action_high)


def flow_matching_loss(actor: Actor, obs: torch.Tensor, actions: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Conditional flow matching (Eq. 11) on the path a_t = (1 - t) a + t eps: MSE between v(a_t, t; s) and eps - a."""
    a_t = (1 - t[:, None]) * actions + t[:, None] * noise
    return F.mse_loss(actor(a_t, t, obs), noise - actions)


@torch.no_grad()
def select_actions(actor: Actor, critic_target: Critic, obs: torch.Tensor, num_candidates: int, steps: int) -> torch.Tensor:
    """Evaluation policy: `num_candidates` actions per state, one drawn from softmax over the target critic's min-Q."""
    n = obs.shape[0]
    obs_rep = obs.repeat_interleave(num_candidates, dim=0)  # (n * c, obs_dim)
    actions = sample_actions(actor, obs_rep, steps).view(n, num_candidates, -1)
    q = critic_target.q_min(obs_rep, actions.flatten(0, 1)).view(n, num_candidates)
    pick = torch.multinomial(F.softmax(q, dim=-1), 1)  # (n, 1)
    return actions[torch.arange(n, device=obs.device), pick[:, 0]]


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
    args.eval_steps = args.eval_steps or args.flow_steps
    if args.eval_steps < 1:
        raise SystemExit(f"error: --eval-steps {args.eval_steps}: at least 1")
    run_name = f"{args.env_id.replace('/', '_')}__{args.exp_name}__{args.seed}__{int(time.time())}"

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # data setup: transitions on the device, the env the dataset was recorded on for evaluation
    dataset = load_dataset(dataset_id)
    data = dataset_to_tensors(dataset, args.reward_tune, device)
    num_transitions = data["obs"].shape[0]
    ref_min, ref_max = reference_scores(dataset, dataset_id)

    def make_env() -> gym.Env:
        return dataset.recover_environment(eval_env=True)

    action_space = dataset.action_space
    obs_dim, action_dim = data["obs"].shape[1], data["actions"].shape[1]
    print(f"{dataset_id}: {num_transitions:,} transitions, obs_dim {obs_dim}, action_dim {action_dim}, device {device}")

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

    actor = Actor(obs_dim, action_dim, action_space.low, action_space.high).to(device)
    actor_target = Actor(obs_dim, action_dim, action_space.low, action_space.high).to(device)
    actor_target.load_state_dict(actor.state_dict())
    critic = Critic(obs_dim, action_dim).to(device)
    critic_target = Critic(obs_dim, action_dim).to(device)
    critic_target.load_state_dict(critic.state_dict())
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.lr)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)

    def policy(obs: torch.Tensor) -> torch.Tensor:
        return select_actions(actor, critic_target, obs, args.num_candidates, args.eval_steps)

    def normalized(returns: np.ndarray) -> np.ndarray:
        return 100 * (returns - ref_min) / (ref_max - ref_min)

    # ALGO LOGIC: one training update, a function of tensors with static shapes and no host synchronisation
    def update(obs, actions, rewards, next_obs, terminals, step: int) -> dict[str, torch.Tensor]:
        # critic: clipped double-Q target (Eq. 7) with next actions from the EMA target actor
        with torch.no_grad():
            if args.max_q_backup:  # 10 next actions per s': max per critic, then min over critics
                next_obs_rep = next_obs.repeat_interleave(10, dim=0)
                next_q1, next_q2 = critic_target(next_obs_rep, sample_actions(actor_target, next_obs_rep, args.flow_steps))
                next_q = torch.min(next_q1.view(-1, 10).amax(1, keepdim=True), next_q2.view(-1, 10).amax(1, keepdim=True))
            else:
                next_q = critic_target.q_min(next_obs, sample_actions(actor_target, next_obs, args.flow_steps))
            target_q = rewards + (1 - terminals) * args.gamma * next_q
        current_q1, current_q2 = critic(obs, actions)
        critic_loss = F.mse_loss(current_q1, target_q) + F.mse_loss(current_q2, target_q)
        critic_optimizer.zero_grad()
        critic_loss.backward()
        if args.grad_norm > 0:
            nn.utils.clip_grad_norm_(critic.parameters(), max_norm=args.grad_norm)
        critic_optimizer.step()

        # actor: flow matching BC (Eq. 11) - eta * Q / |Q| (Eq. 8), the Q term through all K Euler steps (BPTT)
        t = torch.rand(obs.shape[0], device=obs.device)  # Uniform(0, 1)
        bc_loss = flow_matching_loss(actor, obs, actions, t, torch.randn_like(actions))
        q1, q2 = critic(obs, sample_actions(actor, obs, args.flow_steps))
        swap = torch.rand((), device=obs.device) < 0.5  # a random critic for Q, the other for its scale
        q_loss = -torch.where(swap, q1.mean() / q2.abs().mean().detach(), q2.mean() / q1.abs().mean().detach())
        actor_loss = bc_loss + args.eta * q_loss
        actor_optimizer.zero_grad()
        actor_loss.backward()
        if args.grad_norm > 0:
            nn.utils.clip_grad_norm_(actor.parameters(), max_norm=args.grad_norm)
        actor_optimizer.step()

        # target critic: Polyak averaging, fused; EMA target actor every `ema_every` updates from `ema_start` (host ints)
        with torch.no_grad():
            torch._foreach_lerp_(list(critic_target.parameters()), list(critic.parameters()), args.tau)
            if step >= args.ema_start and step % args.ema_every == 0:
                torch._foreach_lerp_(list(actor_target.parameters()), list(actor.parameters()), 1 - args.ema_decay)
        return {"critic_loss": critic_loss, "bc_loss": bc_loss, "q_loss": q_loss, "actor_loss": actor_loss, "q_mean": current_q1.mean()}

    if args.eval_only:
        if args.checkpoint is None:
            raise SystemExit("--eval-only needs --checkpoint PATH (a model.pt written by --save-model)")
        checkpoint = torch.load(args.checkpoint, map_location=device)
        actor.load_state_dict(checkpoint["actor"])
        actor_target.load_state_dict(checkpoint["actor_target"])
        critic.load_state_dict(checkpoint["critic"])
        critic_target.load_state_dict(checkpoint["critic_target"])
        args.total_steps = 0

    evaluations = []  # (update, normalized score)

    def evaluate_and_log(step: int, num_episodes: int) -> np.ndarray:
        scores = normalized(evaluate(policy, make_env, num_episodes, args.max_eval_envs, args.seed + step, device))
        evaluations.append((step, float(scores.mean())))
        writer.add_scalar("charts/normalized_score", scores.mean(), step)
        print(f"update {step}: normalized score {scores.mean():.1f} +- {scores.std():.1f} over {len(scores)} episodes")
        return scores

    # TRY NOT TO MODIFY: the training loop
    train_seconds, start_time = 0.0, time.perf_counter()
    for step in range(1, args.total_steps + 1):
        idx = torch.randint(num_transitions, (args.batch_size,), device=device)
        losses = update(*(data[k][idx] for k in ("obs", "actions", "rewards", "next_obs", "terminals")), step)

        if step % args.log_freq == 0 or step == args.total_steps:
            losses = {k: v.item() for k, v in losses.items()}  # the only host synchronisation
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
            train_seconds += time.perf_counter() - start_time
            evaluate_and_log(step, args.eval_episodes)
            start_time = time.perf_counter()

    if args.save_model:
        model_path = f"runs/{run_name}/model.pt"
        torch.save(
            {"actor": actor.state_dict(), "critic": critic.state_dict(), "critic_target": critic_target.state_dict(), "args": asdict(args)}
            | {"actor_target": actor_target.state_dict()},
            model_path + ".tmp",
        )
        os.replace(model_path + ".tmp", model_path)
        print(f"model saved to {model_path}")

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
        "eval_steps": args.eval_steps,
        "train_seconds": train_seconds,
        "updates_per_second": updates_per_second,
        "hours_per_million_updates": 1e6 / updates_per_second / 3600 if updates_per_second > 0 else None,
        "decision_hz": decision_hz,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "evaluations": evaluations,
        "args": asdict(args),
    }
    write_json(f"runs/{run_name}/summary.json", summary)
    writer.add_scalar("charts/decision_hz", decision_hz, args.total_steps)
    print(
        f"{dataset_id}: normalized score {summary['normalized_score']:.1f} +- {summary['normalized_score_std']:.1f} "
        f"(best {summary['best_normalized_score']:.1f}) | training {train_seconds:.0f} s, {updates_per_second:.1f} updates/s, "
        f"{summary['hours_per_million_updates'] or 0:.2f} h per 1M updates | {decision_hz:.1f} decisions/s | runs/{run_name}/summary.json"
    )
    writer.close()
    if args.track:
        wandb.finish()
