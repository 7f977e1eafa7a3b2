"""Shared fixtures: a small Minari dataset made offline from real Hopper-v5 rollouts."""

import os
import sys
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest
import torch
from minari.data_collector import EpisodeBuffer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # small MLPs: one thread is fastest and steadiest on a shared 2-core machine

HOPPER_DATASET_ID = "test/hopper/rollouts-v0"


def hopper_episodes(num_episodes: int, seed: int) -> list[EpisodeBuffer]:
    """Hopper-v5 episodes under small random actions, a 50-step limit so that some end truncated."""
    env = gym.make("Hopper-v5", max_episode_steps=50)
    rng = np.random.default_rng(seed)
    episodes = []
    for episode in range(num_episodes):
        obs, _ = env.reset(seed=seed + episode)
        observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
        scale = rng.uniform(0.05, 1.0)  # from near-still (long, truncated) to flailing (falls early)
        done = False
        while not done:
            action = np.clip(scale * rng.standard_normal(3), -1, 1).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs), actions.append(action), rewards.append(reward)
            terminations.append(terminated), truncations.append(truncated)
            done = terminated or truncated
        episodes.append(
            EpisodeBuffer(
                id=episode,
                observations=np.array(observations),
                actions=np.array(actions),
                rewards=np.array(rewards),
                terminations=np.array(terminations),
                truncations=np.array(truncations),
            )
        )
    env.close()
    return episodes


@pytest.fixture(scope="session")
def minari_path(tmp_path_factory) -> Path:
    """A fresh MINARI_DATASETS_PATH (inherited by the scripts the tests start) holding a Hopper-v5 dataset."""
    path = tmp_path_factory.mktemp("minari_datasets")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    minari.create_dataset_from_buffers(
        dataset_id=HOPPER_DATASET_ID,
        buffer=hopper_episodes(num_episodes=40, seed=0),
        env=gym.make("Hopper-v5").spec,
        eval_env=gym.make("Hopper-v5").spec,
        algorithm_name="random",
        author="tests",
        author_email="tests@localhost",
        code_permalink="tests/conftest.py",
        description="Hopper-v5 under small random actions, for tests",
    )
    return path
