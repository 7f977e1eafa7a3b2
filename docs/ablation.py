"""The paper's ablation (Table 2) and an eta sweep, by command: train and evaluate every run, then rebuild the
figures and tables from the run folders alone.

`ablation` trains DQL (5 steps), FQL (5 steps), OFQL (1 step) and OFQL with --eta 0 (MeanFlow behaviour cloning
alone) with the same budget on every dataset and seed, then evaluates the paper's one-step variants of the trained
5-step models at inference only: DQL + DDIM (1) and FQL (1) (`--eval-only` on the run's model.pt). `eta-sweep` trains
OFQL (ofql_jax.py) over an eta grid. Both run --jobs scripts at a time, each through its own CLI in its own folder
(<runs-dir>/<grid>/<dataset>/<method>/seed<k>/), checkpointing every --eval-freq updates: run the same command again
after an interruption and it skips finished runs and resumes the others from their checkpoints. `report` reads the
run folders and writes, per dataset, a figure of learning curves (mean +- std across seeds) and a markdown table of
final (--final-eval-episodes, 150 by default) and best scores, mean +- std across seeds; for the sweep, one figure of
score against eta.

Usage (runs/paper by default; `pip install -e ".[plot]"` for report):
    MINARI_DATASETS_PATH=/path/to/datasets python docs/ablation.py ablation \\
        --datasets sac/hopper/medium-replay-v0 sac/halfcheetah/medium-v0 --seeds 1 2 3 --total-steps 50000 --jobs 2
    MINARI_DATASETS_PATH=/path/to/datasets python docs/ablation.py eta-sweep \\
        --datasets sac/hopper/medium-replay-v0 sac/halfcheetah/medium-v0 --seeds 1 2 --total-steps 30000 --jobs 2
    python docs/ablation.py report                  # runs/paper/report/ablation_<dataset>.png, eta_sweep.png, tables
    python docs/ablation.py report --out docs        # the committed figures in docs/, rebuilt
    # the paper's budget (each task's row in TASKS) on D4RL's data, on a GPU:
    python docs/ablation.py ablation --datasets hopper-medium-v2 walker2d-medium-v2 --seeds 1 2 3 --jobs 4 \\
        --eval-freq 50000 --flags="--cuda --compile --cudagraphs"
"""

import argparse
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Trained methods: script and flags. Table 2's one-step variants evaluate a trained method's model at inference only.
TRAINED = {
    "dql": ("dql.py", [], "DQL (5)"),
    "fql": ("fql.py", [], "FQL (5)"),
    "ofql": ("ofql.py", [], "OFQL (1)"),
    "ofql-eta0": ("ofql.py", ["--eta", "0"], "OFQL, eta 0 (BC only)"),
}
ONE_STEP = {
    "dql-ddim1": ("dql", ["--eval-sampler", "ddim", "--eval-steps", "1"], "DQL + DDIM (1)"),
    "fql-1": ("fql", ["--eval-steps", "1"], "FQL (1)"),
}
ETA_GRID = (0.001, 0.01, 0.1, 0.3, 0.5)  # the paper's grid
CHECKPOINTS = ("checkpoint.pt", "checkpoint.msgpack")  # the torch scripts', ofql_jax.py's
GRIDS = ("ablation", "eta_sweep")


@dataclass
class Job:
    folder: str  # the job's working directory; the script writes runs/<run name>/ under it
    command: list[str]
    total_steps: int | None  # the budget of the training run (None: the task's row)
    after: str | None = None  # a training job's folder whose model.pt this evaluation needs


def done(job: Job) -> bool:
    """Trained to the budget; an evaluation: made after its training run's final model."""
    if job.after is None:
        return finished(job.folder, job.total_steps)
    if not (finished(job.after, job.total_steps) and finished(job.folder)):
        return False
    model, summary = (
        os.path.join(run_dir(folder), name) for folder, name in ((job.after, "model.pt"), (job.folder, "summary.json"))
    )
    return os.path.getmtime(summary) > os.path.getmtime(model)


def slug(dataset: str) -> str:
    return dataset.replace("/", "_")


def run_dir(folder: str) -> str | None:
    """The folder's newest run directory, if any."""
    runs = sorted(glob.glob(os.path.join(folder, "runs", "*")), key=os.path.getmtime)
    return runs[-1] if runs else None


def finished(folder: str, total_steps: int | None = None) -> bool:
    """A run whose summary.json is final (not written by an interruption), with at least total_steps updates."""
    last = run_dir(folder)
    if not last or not os.path.isfile(os.path.join(last, "summary.json")):
        return False
    with open(os.path.join(last, "summary.json")) as f:
        summary = json.load(f)
    return "interrupted_at_step" not in summary and summary["total_steps"] >= (total_steps or 0)


def training_command(folder: str, script: str, flags: list[str], dataset: str, seed: int, args) -> list[str]:
    """A fresh run, or --resume of the folder's run from its checkpoint (with a larger --total-steps: a finished run
    goes on). A run killed before its first checkpoint starts over; its folder moves to stale/."""
    last, total_steps = run_dir(folder), ["--total-steps", str(args.total_steps)] if args.total_steps else []
    if last and any(os.path.isfile(os.path.join(last, name)) for name in CHECKPOINTS):
        return [sys.executable, os.path.join(ROOT, script), "--resume", os.path.relpath(last, folder), *total_steps]
    for stale in glob.glob(os.path.join(folder, "runs", "*")):
        os.makedirs(os.path.join(folder, "stale"), exist_ok=True)
        os.rename(stale, os.path.join(folder, "stale", os.path.basename(stale)))
    command = [sys.executable, os.path.join(ROOT, script), "--env-id", dataset, "--seed", str(seed), *total_steps]
    command += ["--eval-freq", str(args.eval_freq), "--checkpoint-freq", str(args.eval_freq), "--save-model"]
    return command + flags + shlex.split(args.flags)


def ablation_jobs(args) -> list[Job]:
    jobs = []
    for seed in args.seeds:  # seed by seed: an interrupted grid holds complete comparisons for the first seeds
        for dataset in args.datasets:
            base = os.path.join(args.runs_dir, "ablation", slug(dataset))
            for method in args.methods:
                folder = os.path.join(base, method, f"seed{seed}")
                if method in TRAINED:
                    script, flags, _ = TRAINED[method]
                    jobs.append(
                        Job(folder, training_command(folder, script, flags, dataset, seed, args), args.total_steps)
                    )
                    continue
                trained, flags, _ = ONE_STEP[method]
                command = [sys.executable, os.path.join(ROOT, f"{trained}.py"), "--eval-only", "--env-id", dataset]
                command += ["--seed", str(seed), *flags, *shlex.split(args.flags)]  # --checkpoint once trained
                jobs.append(Job(folder, command, args.total_steps, after=os.path.join(base, trained, f"seed{seed}")))
    return jobs


def eta_sweep_jobs(args) -> list[Job]:
    jobs = []
    for seed in args.seeds:
        for dataset in args.datasets:
            for eta in args.etas:
                folder = os.path.join(args.runs_dir, "eta_sweep", slug(dataset), f"eta{eta:g}", f"seed{seed}")
                flags = ["--eta", f"{eta:g}"]
                jobs.append(
                    Job(folder, training_command(folder, args.script, flags, dataset, seed, args), args.total_steps)
                )
    return jobs


def dataset_reference(dataset: str, path: str):
    """The dataset's mean episode return, normalized as the scripts normalize scores: a reference level in the
    report, written once beside the runs (the report reads folders only)."""
    if os.path.isfile(path):
        return
    sys.path.insert(0, ROOT)
    import ofql

    dataset_id = ofql.resolve_dataset_id(dataset)
    data = ofql.load_dataset(dataset_id)
    returns = np.array([episode.rewards.sum() for episode in data.iterate_episodes()])
    ref_min, ref_max = ofql.reference_scores(data, dataset_id, ofql.task_name(dataset).split("-")[0])
    scores = 100 * (returns - ref_min) / (ref_max - ref_min)
    info = {"dataset_id": dataset_id, "episodes": len(returns), "normalized_score": float(scores.mean())}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ofql.save_atomically(path, info | {"normalized_score_std": float(scores.std())})


def run_jobs(jobs: list[Job], num_parallel: int):
    """Run the unfinished jobs, num_parallel at a time, an evaluation once its training run finished. SIGINT or
    SIGTERM is passed on to the scripts, which checkpoint and stop; the next call resumes them."""
    pending = [job for job in jobs if not done(job)]
    print(f"{len(jobs) - len(pending)} of {len(jobs)} runs done; {len(pending)} to go, {num_parallel} at a time")
    running: dict[subprocess.Popen, Job] = {}
    stopping, forwarded = [], False
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    start = time.time()
    while (pending and not stopping) or running:
        ready = [job for job in pending if job.after is None or finished(job.after, job.total_steps)]
        while ready and len(running) < num_parallel and not stopping:
            job = ready.pop(0)
            pending.remove(job)
            if job.after:
                job.command += ["--checkpoint", os.path.abspath(os.path.join(run_dir(job.after), "model.pt"))]
            os.makedirs(job.folder, exist_ok=True)
            with open(os.path.join(job.folder, "log.txt"), "a") as log:
                log.write(f"\n$ {shlex.join(job.command)}\n")
                log.flush()
                env = os.environ | {"PYTHONUNBUFFERED": "1"}  # progress lines reach log.txt as they are printed
                proc = subprocess.Popen(  # its own session: a Ctrl-C reaches the scripts once, through this loop
                    job.command, cwd=job.folder, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            running[proc] = job
            print(f"[{time.time() - start:6.0f} s] start {job.folder}", flush=True)
        if stopping and not forwarded:  # once: a second signal would stop a script before it checkpoints
            forwarded = True
            for proc in running:
                proc.send_signal(signal.SIGTERM)
        for proc in [proc for proc in running if proc.poll() is not None]:
            job = running.pop(proc)
            print(f"[{time.time() - start:6.0f} s] {job_status(job, proc.returncode)}: {job.folder}", flush=True)
        if pending and not ready and not running:
            print(
                "these wait for training runs that failed or were not asked for:",
                *[job.folder for job in pending],
                sep="\n  ",
            )
            break
        time.sleep(2)
    left = [job for job in jobs if not done(job)]
    failed = [job for job in left if job_status(job).startswith("FAILED")]
    line = f"{len(jobs) - len(left)} of {len(jobs)} runs done"
    if failed:
        line += f"; {len(failed)} failed (their error above, and in their log.txt): fix that, then run the same command"
    if len(left) > len(failed):
        line += f"; {len(left) - len(failed)} to go: run the same command to resume them"
    print(line)
    return 1 if failed or (left and not stopping) else 0


def job_status(job: Job, returncode: int | None = None) -> str:
    """done; interrupted (stopped by a signal, resumable from its checkpoint); not started; or FAILED with the
    script's own error line."""
    if done(job):
        return "done"
    last = run_dir(job.folder)
    summary = os.path.join(last, "summary.json") if last else ""
    if os.path.isfile(summary):
        with open(summary) as f:
            stopped_at = json.load(f).get("interrupted_at_step")
        if stopped_at is not None and (returncode is None or returncode > 128):
            return f"interrupted at update {stopped_at}, resumable (run the same command)"
    log = os.path.join(job.folder, "log.txt")
    errors = [line.strip() for line in open(log) if line.startswith("error:")] if os.path.isfile(log) else []
    if errors:
        return f"FAILED: {errors[-1]}"
    if returncode is not None and returncode > 128:  # stopped in start-up, before anything was saved
        return f"interrupted before its first update ({signal.Signals(returncode - 128).name}): run the same command"
    if returncode is not None:
        return f"FAILED (exit code {returncode}, see {log})"
    return "not run yet"


# REPORT: from the run folders alone
def read_runs(folder: str) -> list[dict]:
    """The final summaries of a method's seeds (folder/seed*/runs/*/summary.json)."""
    summaries = []
    for seed_folder in sorted(glob.glob(os.path.join(folder, "seed*"))):
        if finished(seed_folder):
            with open(os.path.join(run_dir(seed_folder), "summary.json")) as f:
                summaries.append(json.load(f))
    return summaries


def mean_std(values) -> str:
    """mean +- std across seeds; one seed has no spread to show."""
    if len(values) < 2:
        return f"{values[0]:.1f}" if len(values) else "-"
    return f"{np.mean(values):.1f} +- {np.std(values):.1f}"


def curves(summaries: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps and mean, std across seeds of the evaluation curve (the final evaluation last), on the steps all share."""
    series = [dict(s["evaluations"]) | {s["total_steps"]: s["normalized_score"]} for s in summaries]
    steps = sorted(set.intersection(*(set(s) for s in series)))
    scores = np.array([[s[step] for step in steps] for s in series])
    return np.array(steps), scores.mean(0), scores.std(0)


def report_ablation(base: str, out: str):
    import matplotlib.pyplot as plt

    for data_folder in sorted(glob.glob(os.path.join(base, "*"))):
        name = os.path.basename(data_folder)
        reference = os.path.join(data_folder, "dataset.json")
        rows = ["| method | final score | best score | seeds | updates |", "|---|---|---|---|---|"]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for method, (_, _, label) in (TRAINED | ONE_STEP).items():
            summaries = read_runs(os.path.join(data_folder, method))
            if not summaries:
                continue
            finals = [s["normalized_score"] for s in summaries]
            steps = {s["total_steps"] for s in summaries}
            if method in TRAINED:
                best = [max(s["best_normalized_score"] or -np.inf, s["normalized_score"]) for s in summaries]
                x, mean, std = curves(summaries)
                (line,) = ax.plot(x, mean, label=label)
                ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
            else:  # evaluated once, on the trained run's final model
                best = finals
                x = max(steps_of(data_folder, method))
                ax.errorbar([x], [np.mean(finals)], [np.std(finals)], fmt="D", capsize=4, label=label)
            budget = (
                "/".join(str(s) for s in sorted(steps))
                if method in TRAINED
                else f"{TRAINED[ONE_STEP[method][0]][2]}'s models"
            )
            rows.append(f"| {label} | {mean_std(finals)} | {mean_std(best)} | {len(summaries)} | {budget} |")
        if os.path.isfile(reference):
            with open(reference) as f:
                level = json.load(f)["normalized_score"]
            ax.axhline(level, color="gray", linestyle="--", label="dataset mean")
            rows.append(f"| dataset mean return | {level:.1f} | | | |")
        ax.set(xlabel="gradient updates", ylabel="normalized score", title=name.replace("_", "/"))
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out, f"ablation_{name}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        print(f"\n{name.replace('_', '/')} ({path}); mean +- std across seeds:\n" + "\n".join(rows))


def steps_of(data_folder: str, one_step_method: str) -> list[int]:
    trained = ONE_STEP[one_step_method][0]
    return [s["total_steps"] for s in read_runs(os.path.join(data_folder, trained))] or [0]


def eta_of(eta_folder: str) -> float:
    return float(os.path.basename(eta_folder).removeprefix("eta"))


def report_eta_sweep(base: str, out: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for data_folder in sorted(glob.glob(os.path.join(base, "*"))):
        name = os.path.basename(data_folder).replace("_", "/")
        rows = ["| eta | final score | best score | seeds | updates |", "|---|---|---|---|---|"]
        etas, means, stds = [], [], []
        for eta_folder in sorted(glob.glob(os.path.join(data_folder, "eta*")), key=eta_of):
            summaries = read_runs(eta_folder)
            if not summaries:
                continue
            eta = eta_of(eta_folder)
            finals = [s["normalized_score"] for s in summaries]
            best = [max(s["best_normalized_score"] or -np.inf, s["normalized_score"]) for s in summaries]
            steps = "/".join(str(n) for n in sorted({s["total_steps"] for s in summaries}))
            rows.append(f"| {eta:g} | {mean_std(finals)} | {mean_std(best)} | {len(summaries)} | {steps} |")
            etas.append(eta), means.append(np.mean(finals)), stds.append(np.std(finals))
        if etas:  # a dataset whose runs are not in yet stays out of the legend
            ax.errorbar(etas, means, stds, marker="o", capsize=4, label=name)
        print(f"\neta sweep, {name}; mean +- std across seeds:\n" + "\n".join(rows))
    ax.set(xscale="log", xlabel="eta", ylabel="final normalized score", title="OFQL: eta sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "eta_sweep.png"), dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("ablation", "eta-sweep"):
        grid = commands.add_parser(name, help=f"train and evaluate the {name} grid (skips finished runs)")
        grid.add_argument("--datasets", nargs="+", required=True, help="D4RL names or Minari ids")
        grid.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
        grid.add_argument("--total-steps", type=int, help="updates per run (default: each task's row in TASKS)")
        grid.add_argument("--eval-freq", type=int, default=5000, help="evaluate (10 episodes) and checkpoint every")
        grid.add_argument("--jobs", type=int, default=2, help="runs at a time")
        grid.add_argument("--flags", default="--threads 1 --no-cuda", help="more flags for every script")
        grid.add_argument("--runs-dir", default="runs/paper")
        if name == "ablation":
            grid.add_argument("--methods", nargs="+", choices=[*TRAINED, *ONE_STEP], default=[*TRAINED, *ONE_STEP])
        else:
            grid.add_argument("--etas", nargs="+", type=float, default=list(ETA_GRID))
            grid.add_argument("--script", default="ofql_jax.py", choices=["ofql.py", "ofql_jax.py"])
    report = commands.add_parser("report", help="figures and tables from the run folders")
    report.add_argument("--runs-dir", default="runs/paper")
    report.add_argument("--out", help="folder for the figures (default: <runs-dir>/report; docs: the committed ones)")
    args = parser.parse_args()

    if args.command == "report":
        found = found_runs(args.runs_dir)
        if not found:
            sys.exit(f"error: --runs-dir {args.runs_dir}: no finished runs in its ablation/ or eta_sweep/ folders; "
                     "train them with `ablation` or `eta-sweep` first, or name the folder they are in")  # fmt: skip
        print("found finished runs:", *found, sep="\n  ")
        out = args.out or os.path.join(args.runs_dir, "report")
        os.makedirs(out, exist_ok=True)
        for grid, make_report in (("ablation", report_ablation), ("eta_sweep", report_eta_sweep)):
            if os.path.isdir(os.path.join(args.runs_dir, grid)):
                make_report(os.path.join(args.runs_dir, grid), out)
        return 0
    if args.jobs < 1 or (args.total_steps is not None and args.total_steps < 1) or args.eval_freq < 1:
        parser.error("--jobs, --total-steps and --eval-freq must be >= 1")
    grid = "ablation" if args.command == "ablation" else "eta_sweep"
    try:  # every dataset checked (and its reference level written) before any job starts
        for dataset in args.datasets:
            dataset_reference(dataset, os.path.join(args.runs_dir, grid, slug(dataset), "dataset.json"))
    except ValueError as error:
        sys.exit(f"error: --datasets: {error}")
    jobs = ablation_jobs(args) if args.command == "ablation" else eta_sweep_jobs(args)
    return run_jobs(jobs, args.jobs)


def found_runs(runs_dir: str) -> list[str]:
    """`grid/dataset/method: N seeds` for every method folder with finished runs."""
    found = []
    for folder in sorted(glob.glob(os.path.join(runs_dir, "*", "*", "*"))):
        seeds = len(read_runs(folder)) if os.path.basename(os.path.dirname(os.path.dirname(folder))) in GRIDS else 0
        if seeds:
            found.append(f"{os.path.relpath(folder, runs_dir)}: {seeds} seed{'s' * (seeds > 1)}")
    return found


if __name__ == "__main__":
    sys.exit(main())
