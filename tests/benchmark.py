"""Speed benchmark: updates/s, decisions/s and peak memory of dql.py, fql.py, ofql.py and ofql_jax.py (not a pytest test).

Every script runs through its own CLI in a subprocess, in a fresh temporary folder, for --updates updates on the same
data, with periodic evaluation off and a one-episode final evaluation (which measures decision_hz: decisions per second
for one state, 50 candidates and the Q pick). The whole set repeats --repeats times, the scripts interleaved, so that
machine noise hits all alike. Peak host memory is each child's ru_maxrss from os.wait4. Prints one markdown table.

With --reference-dir (a checkout of github.com/Zhendong-Wang/Diffusion-Policies-for-Offline-RL) the reference DQL agent's
train() is timed too, on the same data with its hopper-medium-replay hyperparameters, in its own subprocess.

Usage:
    MINARI_DATASETS_PATH=/path/to/datasets python tests/benchmark.py
    python tests/benchmark.py --scripts dql ofql --updates 5000 --repeats 3 --threads 2
    python tests/benchmark.py --cuda --extra-flags=--compile       # --extra-flags goes to the torch scripts only
    python tests/benchmark.py --scripts ofql_jax --jax-num-seeds 1 5  # ofql_jax.py once per --num-seeds: seed-updates/s
    python tests/benchmark.py --reference-dir ~/Diffusion-Policies-for-Offline-RL
"""

import argparse
import glob
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE = "DQL reference code"


def run_child(cmd: list[str], cwd: str) -> tuple[int, float]:
    """Run cmd in cwd (output to cwd/log.txt); return its exit code and peak resident memory in MiB."""
    with open(os.path.join(cwd, "log.txt"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    return proc.returncode, usage.ru_maxrss / 1024  # KiB on Linux


def run_once(name: str, args) -> dict | None:
    """One run of a script (or of the reference code) in a temporary folder; its summary.json plus peak memory."""
    common = ["--env-id", args.env_id, "--threads", str(args.threads), "--cuda" if args.cuda else "--no-cuda"]
    if name == REFERENCE:
        cmd = [
            sys.executable,
            __file__,
            "--run-reference",
            "--reference-dir",
            args.reference_dir,
            "--updates",
            str(args.updates),
        ]
    else:
        script, *seed_flags = name.split()  # "ofql_jax --num-seeds 5": a script and its flags
        cmd = [
            sys.executable,
            str(REPO / f"{script}.py"),
            *seed_flags,
            "--total-steps",
            str(args.updates),
            "--log-freq",
            str(args.updates),
        ]
        # a multiple of --updates: no periodic evaluation, and ofql_jax.py keeps its updates per call (a gcd with it)
        cmd += ["--eval-freq", str(2 * args.updates), "--final-eval-episodes", "1"]
        cmd += shlex.split(args.extra_flags) if script != "ofql_jax" else []
    with tempfile.TemporaryDirectory(prefix=f"benchmark_{name.replace(' ', '_')}_") as cwd:
        code, rss_mib = run_child(cmd + common, cwd)
        summaries = glob.glob(os.path.join(cwd, "runs", "*", "summary.json"))
        if code != 0 or not summaries:
            log = Path(cwd, "log.txt").read_text().splitlines()
            print(f"{name} FAILED (exit code {code}):\n" + "\n".join(log[-20:]), file=sys.stderr)
            return None
        with open(summaries[0]) as f:
            return json.load(f) | {"rss_mib": rss_mib}


def run_reference(args):
    """Child process: time the reference DQL agent's train() on the Minari data, write runs/reference/summary.json."""
    import minari
    import numpy as np
    import torch

    sys.path.insert(0, args.reference_dir)
    from agents.ql_diffusion import Diffusion_QL

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.cuda and torch.cuda.is_available() else "cpu")
    dataset = minari.load_dataset(args.env_id)
    parts = {"obs": [], "actions": [], "next_obs": [], "rewards": [], "terminals": []}
    for episode in dataset.iterate_episodes():  # flatten the episodes; done = termination only
        parts["obs"].append(episode.observations[:-1])
        parts["actions"].append(episode.actions)
        parts["next_obs"].append(episode.observations[1:])
        parts["rewards"].append(episode.rewards)
        parts["terminals"].append(episode.terminations)
    data = {key: torch.as_tensor(np.concatenate(value), dtype=torch.float32) for key, value in parts.items()}

    class ReplayBuffer:
        """The interface of the reference's utils/data_sampler.py Data_Sampler: data on the host, batches to the device."""

        def sample(self, batch_size):
            ind = torch.randint(0, len(data["obs"]), (batch_size,))
            batch = (
                data["obs"],
                data["actions"],
                data["next_obs"],
                data["rewards"][:, None],
                1.0 - data["terminals"][:, None],
            )
            return tuple(x[ind].to(device) for x in batch)

    obs_dim, action_dim = data["obs"].shape[1], data["actions"].shape[1]
    max_action = float(dataset.action_space.high[0])
    agent = Diffusion_QL(  # main.py's hopper-medium-replay-v2 settings
        obs_dim, action_dim, max_action, device, discount=0.99, tau=0.005, max_q_backup=False, eta=1.0, beta_schedule="vp",
        n_timesteps=5, ema_decay=0.995, step_start_ema=1000, update_ema_every=5, lr=3e-4, lr_decay=False, grad_norm=4.0,
    )  # fmt: skip
    buffer = ReplayBuffer()
    agent.train(buffer, iterations=20, batch_size=256, log_writer=None)  # warm-up
    start = time.perf_counter()
    agent.train(buffer, iterations=args.updates, batch_size=256, log_writer=None)  # .item() per update synchronizes
    train_seconds = time.perf_counter() - start
    state = data["obs"][0].numpy()
    for _ in range(10):
        agent.sample_action(state)
    start = time.perf_counter()
    for _ in range(100):
        agent.sample_action(state)  # 50 candidates, softmax pick over min-Q, result on the host
    decision_hz = 100 / (time.perf_counter() - start)
    summary = {
        "updates_per_second": args.updates / train_seconds,
        "decision_hz": decision_hz,
        "train_seconds": train_seconds,
    }
    os.makedirs("runs/reference")
    with open("runs/reference/summary.json", "w") as f:
        json.dump(summary | {"device": str(device), "threads": torch.get_num_threads()}, f, indent=2)


def machine_info(args, results: dict) -> str:
    import torch

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    devices = sorted({run["device"] for runs in results.values() for run in runs})
    return (
        f"{cpu}, nproc {len(os.sched_getaffinity(0))}, torch {torch.__version__}, threads {args.threads}, "
        f"device {'/'.join(devices) or '?'} | {args.env_id}, {args.updates} updates, {args.repeats} repeats"
    )


def table(results: dict, baseline: str = "dql") -> str:
    def median(name, key):
        values = [run[key] for run in results.get(name, []) if run.get(key)]
        return statistics.median(values) if values else None

    def spread(name, key):
        values = [run[key] for run in results[name] if run.get(key)]
        return f"{min(values):.1f}-{max(values):.1f}" if values else "-"

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "-"

    base_ups, base_hz = median(baseline, "updates_per_second"), median(baseline, "decision_hz")
    ref_ups = median(REFERENCE, "updates_per_second")

    def seed_updates(name):  # updates/s x the seeds each update trains (ofql_jax.py --num-seeds); the last column
        ups = median(name, "updates_per_second")
        seeds = results[name][0].get("args", {}).get("num_seeds", 1)
        return f" {ups * seeds:.1f} |" if ups else " - |"

    seeds_column = any("--num-seeds" in name for name in results)
    head = "| script | updates/s | min-max | decision Hz | min-max | peak RSS MiB | updates/s vs dql.py | decision time dql.py / script | compile s |"
    head += " seed-updates/s |" if seeds_column else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, runs in results.items():
        if not runs:
            lines.append(f"| {name} | failed |" + " |" * (head.count("|") - 3))
            continue
        ups, hz, compile_s = (
            median(name, "updates_per_second"),
            median(name, "decision_hz"),
            median(name, "compile_seconds"),
        )
        label = name if name == REFERENCE else name.replace(" ", ".py ", 1) if " " in name else f"{name}.py"
        lines.append(
            f"| {label} | {ups:.1f} | {spread(name, 'updates_per_second')} | {hz:.1f} | {spread(name, 'decision_hz')} | "
            f"{max(run['rss_mib'] for run in runs):.0f} | {ratio(ups, base_ups)} | {ratio(hz, base_hz)} | "
            f"{f'{compile_s:.1f}' if compile_s else '-'} |" + (seed_updates(name) if seeds_column else "")
        )
    if ref_ups and base_ups:
        lines.append(f"\ndql.py runs {ratio(base_ups, ref_ups)} the updates/s of the {REFERENCE}.")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scripts", nargs="+", default=["dql", "fql", "ofql", "ofql_jax"], help="script names, without .py"
    )
    parser.add_argument("--updates", type=int, default=2000, help="gradient updates per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each script, interleaved")
    parser.add_argument(
        "--env-id",
        default="sac/hopper/medium-replay-v0",
        help="Minari dataset id (MINARI_DATASETS_PATH from the environment)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads, passed through as --threads")
    parser.add_argument(
        "--cuda", action=argparse.BooleanOptionalAction, default=False, help="--cuda or --no-cuda to every script"
    )
    parser.add_argument("--extra-flags", default="", help='flags for the torch scripts, e.g. --extra-flags="--compile"')
    parser.add_argument(
        "--reference-dir", help="a checkout of Diffusion-Policies-for-Offline-RL: also time its DQL agent"
    )
    parser.add_argument(
        "--jax-num-seeds", nargs="+", type=int, help="run ofql_jax.py once per N with --num-seeds N (seed-updates/s)"
    )
    parser.add_argument("--run-reference", action="store_true", help=argparse.SUPPRESS)  # internal: the reference child
    args = parser.parse_args()
    if args.run_reference:
        return run_reference(args)

    names = [
        f"{name} --num-seeds {n}" if n else name
        for name in args.scripts
        for n in (args.jax_num_seeds if name == "ofql_jax" and args.jax_num_seeds else [None])
    ] + ([REFERENCE] if args.reference_dir else [])
    results = {name: [] for name in names}
    start = time.perf_counter()
    for repeat in range(args.repeats):
        for name in names:
            run = run_once(name, args)
            if run:
                results[name].append(run)
                print(
                    f"[{repeat + 1}/{args.repeats}] {name}: {run['updates_per_second']:.1f} updates/s, "
                    f"{run['decision_hz']:.1f} decisions/s, {run['rss_mib']:.0f} MiB",
                    file=sys.stderr,
                )
    print(f"benchmark took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(machine_info(args, results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
