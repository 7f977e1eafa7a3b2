"""The paper's Fig. 3: marginal velocity (flow matching) at 1, 2, 5 and 10 Euler steps vs average velocity (MeanFlow)
at one step, on a 2D toy target with eight modes. Writes one PNG and prints each sampler's distance to the target.

The target is eight Gaussians on a ring (radius 0.7, std 0.05, inside the action box [-1, 1]^2), conditioned on a
constant dummy observation. Both policies are the scripts' own networks and losses, imported, not copied:
fql.Actor trained by fql.flow_matching_loss (t ~ Uniform(0, 1), as fql.py does), sampled by fql.sample_actions;
ofql.Actor trained by ofql.mean_flow_loss on ofql.sample_time_pairs (the paper's pairs: flow ratio 0.5, logit-normal
mu -0.4, sigma 1.0, no acting pairs), sampled by ofql.sample_actions. Same hidden size, Adam 1e-3, batch and number
of updates for both. Distance: sliced Wasserstein-1 (fixed, seeded projections) to a fresh target sample; the distance
between two independent target samples is printed as the floor of what a perfect sampler would score.

Usage:
    python docs/fig3_toy.py --out docs/fig3_toy.png          # the committed figure (10000 updates, ~2.5 min)
    python docs/fig3_toy.py --quick                          # a small budget, for the test (seconds): ./fig3_toy.png
    python docs/fig3_toy.py --steps 10000 --samples 8000 --seed 1 --out /tmp/fig.png
Needs matplotlib: pip install -e ".[plot]".
"""

import os
import sys
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import tyro  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fql  # noqa: E402
import ofql  # noqa: E402


@dataclass
class Args:
    steps: int = 10000
    """gradient updates for each policy"""
    samples: int = 4000
    """samples per panel, and in the target sample each is compared with"""
    seed: int = 0
    """seed for the networks, the training data, the samples and the projections"""
    out: str = "fig3_toy.png"
    """where the figure goes (its suffix: the format); the committed one: --out docs/fig3_toy.png"""
    quick: bool = False
    """a small budget (300 updates, 1000 samples) that runs in seconds; for the test"""
    hidden_dim: int = 256
    """hidden width of both actors (the scripts' default)"""
    batch_size: int = 256
    """target samples per update"""
    threads: int = 1
    """torch CPU threads"""


INF = float("inf")
RANGES = {"steps": (1, INF), "samples": (1, INF), "seed": (0, 2**32 - 1), "hidden_dim": (1, INF)}
RANGES |= {"batch_size": (1, INF), "threads": (1, INF)}  # torch takes no 0 threads
EULER_STEPS = (1, 2, 5, 10)
OBS_DIM, ACTION_DIM = 1, 2
LOW, HIGH = -np.ones(ACTION_DIM), np.ones(ACTION_DIM)


def check_args(args: Args):
    """Every numeric flag in range and --out writable as an image, before the run: ValueError naming the flag."""
    for flag, (low, high) in RANGES.items():
        value = getattr(args, flag)
        if not low <= value <= high:
            bound = f">= {low}" if high == INF else f"in [{low}, {high}]"
            raise ValueError(f"--{flag.replace('_', '-')} {value}: out of range, must be {bound}")
    check_out(args.out)


def check_out(path: str):
    """--out: a format matplotlib writes, in a folder that is one or can be made, and writable."""
    formats = matplotlib.figure.Figure().canvas.get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lower()
    if suffix[1:] not in formats:
        what = f"{suffix} is not an image format matplotlib writes" if suffix else "no suffix to name its format"
        raise ValueError(f"--out {path}: {what}; use one of {', '.join('.' + name for name in formats)}")
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # the missing folders are made at the end
        folder = os.path.dirname(folder)
    problem = (
        "a folder" if os.path.isdir(path)
        else f"{folder} is a file" if not os.path.isdir(folder)
        else f"cannot write in {folder}" if not os.access(folder, os.W_OK | os.X_OK)
        else None
    )  # fmt: skip
    if problem:
        raise ValueError(f"--out {path}: {problem}; name an image file in a folder you can write to")


def ring(n: int, generator: torch.Generator) -> torch.Tensor:
    """Eight Gaussians (std 0.05) evenly spaced on a circle of radius 0.7."""
    angles = torch.randint(8, (n,), generator=generator) * (2 * np.pi / 8)
    return 0.7 * torch.stack([angles.cos(), angles.sin()], 1) + 0.05 * torch.randn(n, 2, generator=generator)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_projections: int = 200, seed: int = 0) -> float:
    """Mean over fixed random directions of the 1D Wasserstein-1 distance of the projected samples (equal sizes)."""
    directions = torch.randn(2, num_projections, generator=torch.Generator().manual_seed(seed))
    directions = directions / directions.norm(dim=0, keepdim=True)
    return ((x @ directions).sort(0).values - (y @ directions).sort(0).values).abs().mean().item()


def train(actor: torch.nn.Module, loss_fn, args: Args, seed: int) -> tuple[torch.nn.Module, float]:
    """Adam 1e-3 on loss_fn(actor, obs, actions, noise) with fresh target batches; returns the actor and the seconds."""
    data = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(actor.parameters(), lr=1e-3)
    obs = torch.zeros(args.batch_size, OBS_DIM)
    start = time.perf_counter()
    for _ in range(args.steps):
        actions = ring(args.batch_size, data)
        loss = loss_fn(actor, obs, actions, torch.randn_like(actions))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return actor, time.perf_counter() - start


def flow_matching(actor, obs, actions, noise):
    t = torch.rand(obs.shape[0])  # Uniform(0, 1), as fql.py's update
    return fql.flow_matching_loss(actor, obs, actions, t, noise)


def mean_flow(actor, obs, actions, noise):
    t, r = ofql.sample_time_pairs(obs.shape[0], flow_ratio=0.5, acting_ratio=0.0, device="cpu")  # the paper's
    return ofql.mean_flow_loss(actor, obs, actions, t, r, noise)


def plot(panels: list[tuple[str, torch.Tensor]], path: str):
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.6))
    for ax, (title, points) in zip(axes, panels, strict=True):
        ax.scatter(points[:, 0], points[:, 1], s=1.5, alpha=0.35, color="C0" if ax is not axes[0] else "k", lw=0)
        ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xticks=[], yticks=[], aspect="equal")
        ax.set_title(title, fontsize=10)
    fig.suptitle("Marginal velocity (flow matching, Euler steps) vs average velocity (MeanFlow, one step)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    args = tyro.cli(Args)
    try:
        check_args(args)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.quick:
        args.steps, args.samples = 300, 1000
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    fm_actor = fql.Actor(OBS_DIM, ACTION_DIM, LOW, HIGH, hidden_dim=args.hidden_dim)
    fm_actor, fm_seconds = train(fm_actor, flow_matching, args, seed=args.seed + 1)
    torch.manual_seed(args.seed)
    mf_actor = ofql.Actor(OBS_DIM, ACTION_DIM, LOW, HIGH, hidden_dim=args.hidden_dim)
    mf_actor, mf_seconds = train(mf_actor, mean_flow, args, seed=args.seed + 1)

    evaluation = torch.Generator().manual_seed(args.seed + 2)
    target, reference = ring(args.samples, evaluation), ring(args.samples, evaluation)
    obs = torch.zeros(args.samples, OBS_DIM)
    torch.manual_seed(args.seed + 3)
    rows = []  # (method, steps, samples)
    with torch.no_grad():
        for steps in EULER_STEPS:
            rows.append(("flow matching", steps, fql.sample_actions(fm_actor, obs, steps)))
        rows.append(("MeanFlow", 1, ofql.sample_actions(mf_actor, obs)))
    distances = [sliced_wasserstein(samples, target, seed=args.seed) for _, _, samples in rows]
    floor = sliced_wasserstein(reference, target, seed=args.seed)

    print(f"{args.steps} updates each (flow matching {fm_seconds:.1f} s, MeanFlow {mf_seconds:.1f} s), "
          f"{args.samples} samples, seed {args.seed}")  # fmt: skip
    print(f"{'method':<15}{'steps':>6}  sliced_wasserstein")
    for (method, steps, _), distance in zip(rows, distances, strict=True):
        print(f"{method:<15}{steps:>6}  {distance:.4f}")
    print(f"(two independent target samples: {floor:.4f})")

    panels = [(f"target (8 modes)\nSW between samples {floor:.3f}", reference)]
    for (method, steps, samples), distance in zip(rows, distances, strict=True):
        name = "FM (marginal v)" if method == "flow matching" else "MeanFlow (avg u)"
        panels.append((f"{name}, {steps} step{'s' * (steps > 1)}\nSW {distance:.3f}", samples))
    plot(panels, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
