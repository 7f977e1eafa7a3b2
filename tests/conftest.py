"""Shared fixtures: small Minari datasets and D4RL-layout hdf5 files, made offline from real env rollouts."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # small MLPs: one thread is fastest and steadiest on a shared 2-core machine

HOPPER_DATASET_ID = "test/hopper/rollouts-v0"
ANTMAZE_DATASET_ID = "test/antmaze/umaze-v0"  # task antmaze-umaze: cql rewards, success-rate scores
PEN_DATASET_ID = "test/pen/human-v0"  # task pen-human: normalized rewards, the dataset's reference scores
PENDULUM_DATASET_ID = "test/pendulum/swing-up-v0"  # for learning tests: small, and Q-learning pays within minutes


def rollouts(env: gym.Env, num_episodes: int, seed: int, episode_policy) -> list[EpisodeBuffer]:
    """Episodes under `episode_policy(rng)`, which gives each episode's policy (obs -> action, clipped to the bounds).
    Dict observations are kept as dicts of arrays."""
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    episodes = []
    for episode in range(num_episodes):
        obs, _ = env.reset(seed=seed + episode)
        policy = episode_policy(rng)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        done = False
        while not done:
            action = np.clip(policy(obs), low, high).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs), actions.append(action), rewards.append(reward)
            terminations.append(terminated), truncations.append(truncated)
            done = terminated or truncated
        if isinstance(observations[0], dict):
            observations = {key: np.array([o[key] for o in observations]) for key in observations[0]}
        episodes.append(
            EpisodeBuffer(
                id=episode,
                observations=observations if isinstance(observations, dict) else np.array(observations),
                actions=np.array(actions),
                rewards=np.array(rewards),
                terminations=np.array(terminations),
                truncations=np.array(truncations),
            )
        )
    env.close()
    return episodes


def random_episodes(env: gym.Env, num_episodes: int, seed: int) -> list[EpisodeBuffer]:
    """Episodes under random actions of random scale: from near-still (long, truncated) to flailing (falls early)."""
    shape = env.action_space.shape

    def episode_policy(rng):
        scale = rng.uniform(0.05, 1.0)
        return lambda obs: scale * rng.standard_normal(shape)

    return rollouts(env, num_episodes, seed, episode_policy)


def swing_up_episodes(num_episodes: int, seed: int) -> list[EpisodeBuffer]:
    """Pendulum-v1 under one fixed, mediocre controller with Gaussian noise (std 0.3 of a torque of at most 2): full
    torque along the swing while the energy is short of upright's, a weak PD controller near the top. One policy's
    data, narrow as HalfCheetah medium's, scoring about 67 (random actions: about 0)."""

    def episode_policy(rng):
        def act(obs):
            cos, sin, speed = obs
            energy = 0.5 * speed**2 + 15 * cos  # theta'' = 15 sin(theta) + 3 u: 15 at rest upright
            if cos > 0.85:
                torque = -0.3 * (10 * np.arctan2(sin, cos) + 2 * speed)
            else:
                torque = 2.0 * np.sign(speed * (15 - energy) + 1e-6)
            return torque + 0.3 * rng.standard_normal(1)

        return act

    return rollouts(gym.make("Pendulum-v1"), num_episodes, seed, episode_policy)


def hopper_episodes(num_episodes: int, seed: int) -> list[EpisodeBuffer]:
    """Hopper-v5 episodes, a 50-step limit so that some end truncated."""
    return random_episodes(gym.make("Hopper-v5", max_episode_steps=50), num_episodes, seed)


def create_dataset(dataset_id: str, episodes: list[EpisodeBuffer], spec: gym.envs.registration.EnvSpec, **metadata):
    minari.create_dataset_from_buffers(
        dataset_id=dataset_id,
        buffer=episodes,
        env=spec,
        eval_env=spec,
        algorithm_name="random",
        author="tests",
        author_email="tests@localhost",
        code_permalink="tests/conftest.py",
        description=f"{spec.id} under random actions, for tests",
        **metadata,
    )


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(tmp_path_factory) -> Path:
    """The `ofql_jax.py` runs the tests start compile the same XLA programs again and again: a persistent compilation
    cache, inherited by them, saves most of each run's start-up. One per test process (each xdist worker its own: no
    run reads an entry another is writing); JAX keys an entry by the program, its flags and the versions, so a hit is
    the executable the compiler would make."""
    path = tmp_path_factory.mktemp("jax_cache")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(path)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the evaluation's small programs too
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"
    return path


@pytest.fixture(scope="session")
def minari_path(tmp_path_factory) -> Path:
    """A fresh MINARI_DATASETS_PATH (inherited by the scripts the tests start) holding a Hopper-v5 dataset."""
    path = tmp_path_factory.mktemp("minari_datasets")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    create_dataset(HOPPER_DATASET_ID, hopper_episodes(num_episodes=40, seed=0), gym.make("Hopper-v5").spec)
    return path


@pytest.fixture(scope="session")
def medium_and_expert(minari_path) -> tuple[int, int]:
    """Stand-ins for Minari's mujoco/hopper/{medium,expert}-v0 (what medium-expert is combined from): their step counts."""
    sizes = []
    for kind, seed in (("medium", 100), ("expert", 200)):
        episodes = hopper_episodes(num_episodes=6, seed=seed)
        create_dataset(f"mujoco/hopper/{kind}-v0", episodes, gym.make("Hopper-v5").spec)
        sizes.append(sum(len(e.rewards) for e in episodes))
    return sizes[0], sizes[1]


def write_d4rl_file(
    path: Path, episodes: list[EpisodeBuffer], with_next_observations: bool = False, drop: str = ""
) -> Path:
    """D4RL's hdf5 layout: one row per step, episodes back to back, each episode's last observation not stored."""
    columns = {
        "observations": np.concatenate([e.observations[:-1] for e in episodes]),
        "actions": np.concatenate([e.actions for e in episodes]),
        "rewards": np.concatenate([e.rewards for e in episodes]),
        "terminals": np.concatenate([e.terminations for e in episodes]),
        "timeouts": np.concatenate([e.truncations for e in episodes]),
    }
    if with_next_observations:
        columns["next_observations"] = np.concatenate([e.observations[1:] for e in episodes])
    with h5py.File(path, "w") as f:
        for key, value in columns.items():
            if key != drop:
                f[key] = value
    return path


@pytest.fixture(scope="session")
def d4rl_file(tmp_path_factory) -> Path:
    """A hopper file in D4RL's layout (no next_observations, as in D4RL's v2 MuJoCo files)."""
    return write_d4rl_file(
        tmp_path_factory.mktemp("d4rl") / "hopper_medium_replay-v2.hdf5", hopper_episodes(30, seed=1)
    )


@pytest.fixture(scope="session")
def antmaze_dataset(minari_path) -> str:
    """A dict-observation AntMaze dataset (gymnasium-robotics), recorded like D4RL's: continuing task, fixed goal."""
    gymnasium_robotics = pytest.importorskip("gymnasium_robotics")  # a guard only: CI installs the `robotics` extra
    gym.register_envs(gymnasium_robotics)
    env = gym.make("AntMaze_UMaze-v4", continuing_task=True, reset_target=False, max_episode_steps=30)
    create_dataset(ANTMAZE_DATASET_ID, random_episodes(env, num_episodes=4, seed=0), env.spec)
    return ANTMAZE_DATASET_ID


@pytest.fixture(scope="session")
def pen_dataset(minari_path) -> str:
    """An Adroit pen dataset with its own reference scores (D4RL has none for pen in our table)."""
    gymnasium_robotics = pytest.importorskip("gymnasium_robotics")
    gym.register_envs(gymnasium_robotics)
    env = gym.make("AdroitHandPen-v1", max_episode_steps=20)
    create_dataset(
        PEN_DATASET_ID,
        random_episodes(env, num_episodes=4, seed=0),
        env.spec,
        ref_min_score=-10.0,
        ref_max_score=3000.0,
    )
    return PEN_DATASET_ID


@pytest.fixture(scope="session")
def pendulum_dataset(minari_path) -> str:
    """Pendulum-v1 under a noisy swing-up controller (40 episodes of 200 steps), scored from about 0 (random actions)
    to 100 (upright)."""
    create_dataset(
        PENDULUM_DATASET_ID,
        swing_up_episodes(40, seed=0),
        gym.make("Pendulum-v1").spec,
        ref_min_score=-1200.0,
        ref_max_score=-150.0,
    )
    return PENDULUM_DATASET_ID


def run_script(
    script: str, cwd, *flags: str, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """`python {script}.py *flags` in cwd (made if missing), its output captured."""
    Path(cwd).mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(ROOT / f"{script}.py"), *flags]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def no_run_folder(cwd) -> bool:
    """Nothing under cwd/runs: no run folder was made (or the one made was removed)."""
    return not (Path(cwd) / "runs").exists() or not any((Path(cwd) / "runs").iterdir())


def stop_with_sigterm(script: str, cwd, flags: tuple[str, ...], after_update: int) -> tuple:
    """Start a run in cwd, send SIGTERM once it logged `after_update`; its run folder and output once it exited 128 + 15."""
    cwd.mkdir()
    command = [sys.executable, str(ROOT / f"{script}.py"), *flags]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in process.stdout:
        if line.startswith(f"update {after_update}/"):
            process.send_signal(signal.SIGTERM)
            break
    output = process.stdout.read()
    assert process.wait(timeout=300) == 128 + signal.SIGTERM, output[-2000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir, output
