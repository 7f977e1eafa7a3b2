"""The paper's ablation (Table 2), an eta sweep and Table 1, by command: train and evaluate every run, then rebuild the
figures and tables from the run folders alone.

`ablation` trains DQL (5 steps), FQL (5 steps), OFQL (1 step: ours, and the paper's variant with --paper-variant), and
OFQL and DQL with --eta 0 (each one's behaviour cloning alone) with the same budget on every dataset and seed, then
evaluates the paper's one-step variants of the trained 5-step models at inference only: DQL + DDIM (1) and FQL (1)
(`--eval-only` on the run's model.pt). `eta-sweep` trains the paper's variant of OFQL (ofql_jax.py --paper-variant)
over the paper's eta grid; `table1` OFQL on every row of the paper's Table 1 (TASKS), printing its
plan, its estimated GPU-hours and the D4RL files missing before anything starts. Each job is a script run through its
own CLI in its own folder (<runs-dir>/<grid>/<dataset>/<method>/seed<k>/, or seeds<a>-<b>/ for one ofql_jax.py
--num-seeds run of them all with --batch-seeds), submitted through submitit: --executor local runs --jobs at a time
here, --executor slurm submits them with sbatch. Runs checkpoint every --eval-freq updates: run the same command again
after an interruption and it skips finished runs and resumes the others from their checkpoints (a Ctrl-C or SIGTERM
to the runner stops each run once, at a checkpoint; the runner exits 128 + the signal). `report` reads the run
folders and writes, per dataset, a figure of learning curves (mean +- std across seeds) and a markdown table of final
(--final-eval-episodes, 150 by default) and best scores, mean +- std across seeds; for the sweep, one figure of score
against eta; for table1, table1.md.

Usage (runs/paper by default; `pip install -e ".[grid]"` for the engine, `".[plot]"` for report):
    MINARI_DATASETS_PATH=/path/to/datasets python docs/ablation.py ablation \\
        --datasets sac/hopper/medium-replay-v0 sac/halfcheetah/medium-v0 --seeds 1 2 3 --total-steps 50000 --jobs 2
    MINARI_DATASETS_PATH=/path/to/datasets python docs/ablation.py eta-sweep \\
        --datasets sac/hopper/medium-replay-v0 sac/halfcheetah/medium-v0 --seeds 1 2 --total-steps 30000 --jobs 2
    python docs/ablation.py report                  # runs/paper/report/ablation_<dataset>.png, eta_sweep.png, tables
    python docs/ablation.py report --out docs        # the committed figures in docs/, rebuilt
    python docs/ablation.py table1 --d4rl-dir /path/to/d4rl --batch-seeds --dry-run   # plan, GPU-hours, missing files
    python docs/ablation.py table1 --d4rl-dir /path/to/d4rl --batch-seeds --executor slurm --partition gpu \\
        --gpus-per-job 1 --jobs 20 --flags="--cuda"
    # the paper's budget (each task's row in TASKS) on D4RL's data, on a GPU:
    python docs/ablation.py ablation --datasets hopper-medium-v2 walker2d-medium-v2 --seeds 1 2 3 --jobs 4 \\
        --eval-freq 50000 --flags="--cuda --compile --cudagraphs"
"""

import argparse
import glob
import json
import os
import runpy
import shlex
import shutil
import signal
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
    "ofql-paper": ("ofql.py", ["--paper-variant"], "OFQL (1), the paper's variant"),
    "ofql-eta0": ("ofql.py", ["--eta", "0"], "OFQL, eta 0 (BC only)"),
    "dql-eta0": ("dql.py", ["--eta", "0"], "DQL, eta 0 (BC only)"),
}
ONE_STEP = {
    "dql-ddim1": ("dql", ["--eval-sampler", "ddim", "--eval-steps", "1"], "DQL + DDIM (1)"),
    "fql-1": ("fql", ["--eval-steps", "1"], "FQL (1)"),
}
# --batch-seeds: these methods' seeds train as one ofql_jax.py --num-seeds job per dataset (the eta sweep's too)
BATCHED = {
    "ofql": ("ofql_jax.py", []),
    "ofql-paper": ("ofql_jax.py", ["--paper-variant"]),
    "ofql-eta0": ("ofql_jax.py", ["--eta", "0"]),
}
ETA_GRID = (0.001, 0.01, 0.1, 0.3, 0.5)  # the paper's grid, swept with the paper's variant (--paper-variant)
CHECKPOINTS = ("checkpoint.pt", "checkpoint.msgpack")  # the torch scripts', ofql_jax.py's
GRIDS = ("ablation", "eta_sweep", "table1")
NO_EXIT_CODE = -1
ARGUMENT_ERROR = 2  # the exit code of argparse's and tyro's errors: a flag a script does not take
INF = float("inf")
# the grids' numeric flags: (lowest, highest); seeds in the scripts' range
RANGES = {"jobs": (1, INF), "total_steps": (1, INF), "eval_freq": (1, INF), "timeout_min": (1, INF)}
RANGES |= {"gpus_per_job": (0, INF), "cpus_per_job": (1, INF), "seeds": (0, 2**32 - 1), "etas": (0, INF)}


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


def seeds_folder(seeds: list[int]) -> str:
    """seed<k> for one seed's run, seeds<a>-<b> for one run of ofql_jax.py --num-seeds training them all."""
    return f"seed{seeds[0]}" if len(seeds) == 1 else f"seeds{seeds[0]}-{seeds[-1]}"


def training_command(folder: str, script: str, flags: list[str], env_id: str, seeds: list[int], args) -> list[str]:
    """A fresh run (several seeds: ofql_jax.py --num-seeds), or --resume of the folder's run from its checkpoint (with a
    larger --total-steps: a finished run goes on). A run killed before its first checkpoint starts over; its folder
    moves to stale/."""
    last, total_steps = run_dir(folder), ["--total-steps", str(args.total_steps)] if args.total_steps else []
    if last and any(os.path.isfile(os.path.join(last, name)) for name in CHECKPOINTS):
        return [sys.executable, os.path.join(ROOT, script), "--resume", os.path.relpath(last, folder), *total_steps]
    for stale in glob.glob(os.path.join(folder, "runs", "*")):
        os.makedirs(os.path.join(folder, "stale"), exist_ok=True)
        os.rename(stale, os.path.join(folder, "stale", os.path.basename(stale)))
    command = [sys.executable, os.path.join(ROOT, script), "--env-id", env_id, "--seed", str(seeds[0]), *total_steps]
    command += ["--num-seeds", str(len(seeds))] if len(seeds) > 1 else []
    command += ["--eval-freq", str(args.eval_freq), "--checkpoint-freq", str(args.eval_freq), "--save-model"]
    return command + flags + shlex.split(args.flags)


def seed_groups(args) -> list[list[int]]:
    """The seeds of each job: all in one with --batch-seeds (ofql_jax.py --num-seeds), else one each."""
    return [args.seeds] if args.batch_seeds else [[seed] for seed in args.seeds]


def ablation_jobs(args) -> list[Job]:
    jobs = []
    for seed in args.seeds:  # seed by seed: an interrupted grid holds complete comparisons for the first seeds
        for dataset in args.datasets:
            base = os.path.join(args.runs_dir, "ablation", slug(dataset))
            for method in args.methods:
                batched = args.batch_seeds and method in BATCHED
                if batched and seed != args.seeds[0]:  # one job trains every seed, made with the first
                    continue
                seeds = args.seeds if batched else [seed]
                folder = os.path.join(base, method, seeds_folder(seeds))
                if method in TRAINED:
                    script, flags = BATCHED[method] if batched else TRAINED[method][:2]
                    command = training_command(folder, script, flags, dataset, seeds, args)
                    jobs.append(Job(folder, command, args.total_steps))
                    continue
                trained, flags, _ = ONE_STEP[method]
                command = [sys.executable, os.path.join(ROOT, f"{trained}.py"), "--env-id", dataset]
                command += ["--seed", str(seed), *flags, *shlex.split(args.flags)]  # --eval-only once trained
                jobs.append(Job(folder, command, args.total_steps, after=os.path.join(base, trained, f"seed{seed}")))
    return jobs


def eta_sweep_jobs(args) -> list[Job]:
    jobs = []
    for seeds in seed_groups(args):
        for dataset in args.datasets:
            for eta in args.etas:
                folder = os.path.join(args.runs_dir, "eta_sweep", slug(dataset), f"eta{eta:g}", seeds_folder(seeds))
                flags = ["--paper-variant", "--eta", f"{eta:g}"]
                command = training_command(folder, args.script, flags, dataset, seeds, args)
                jobs.append(Job(folder, command, args.total_steps))
    return jobs


# TABLE 1: every task of the paper's Table 1 (the rows of ofql.py's TASKS), OFQL at its row's budget
D4RL_VERSIONS = {"antmaze": "v2", "kitchen": "v0", "pen": "v1"}  # D4RL's names of the tasks; locomotion's: v2
MUJOCO = ("halfcheetah", "hopper", "walker2d")  # trained on D4RL's own hdf5 files; the rest on Minari's D4RL data
# updates/s of one job on one H200, by the seeds it trains (docs/benchmarks/h200.md and h200_num_seeds.txt);
# ofql.py's with --compile --cudagraphs
H200_UPDATES_PER_SECOND = {"ofql_jax.py": {1: 3269.2, 5: 1911.7}, "ofql.py": {1: 929.6}}


def ofql_module():
    sys.path.insert(0, ROOT)
    import ofql

    return ofql


def h200_hours(script: str, num_seeds: int, updates: int) -> float:
    """Estimated hours of one job's updates on one H200: the time per update measured for that many seeds, linear in
    the seeds between (and beyond) the measured counts; evaluation not included."""
    rates = H200_UPDATES_PER_SECOND[script]
    counts = sorted(rates)
    low, high = (counts[0], counts[-1]) if num_seeds not in rates else (num_seeds, num_seeds)
    per_update = (
        1 / rates[low]
        if low == high
        else 1 / rates[low] + (1 / rates[high] - 1 / rates[low]) * (num_seeds - low) / (high - low)
    )
    return updates * per_update / 3600


def table1_jobs(args) -> tuple[list[Job], list[str], list[str]]:
    """One job per task (and seed, without --batch-seeds); the plan's table lines; the D4RL files missing."""
    ofql = ofql_module()
    unknown = [task for task in args.tasks if task not in ofql.TASKS]
    if unknown:
        raise ValueError(f"--tasks {' '.join(unknown)}: not a row of Table 1; the rows: {', '.join(ofql.TASKS)}")
    seed_sets = seed_groups(args)
    plan = ["| task | data | eta | updates | jobs | H200 hours (est.) |", "|---|---|---|---|---|---|"]
    jobs, missing, total = [], [], 0.0
    for task in args.tasks:
        domain = task.split("-")[0]
        env_id, flags, data = f"{task}-{D4RL_VERSIONS.get(domain, 'v2')}", [], "Minari"
        if domain in MUJOCO:
            if args.d4rl_dir is None:
                raise ValueError(f"--tasks {task}: the MuJoCo rows train on D4RL's hdf5 files: name their folder with "
                                 "--d4rl-dir (the missing files are listed with their URLs)")  # fmt: skip
            name = task.replace("-", "_")
            path = os.path.abspath(os.path.join(args.d4rl_dir, f"{name}-v2.hdf5"))
            flags, data = ["--dataset-path", path], os.path.basename(path)
            if not os.path.isfile(path):
                missing.append(f"{os.path.basename(path)}  {ofql.D4RL_FILE_URL.format(name=name)}")
        updates = args.total_steps or ofql.TASKS[task][ofql.TASK_FIELDS.index("total_steps")]
        hours = len(seed_sets) * h200_hours(args.script, len(seed_sets[0]), updates)
        total += hours
        eta = ofql.TASKS[task][ofql.TASK_FIELDS.index("eta")]
        plan.append(f"| {env_id} | {data} | {eta:g} | {updates:,} | {len(seed_sets)} | {hours:.2f} |")
        for seeds in seed_sets:
            folder = os.path.join(args.runs_dir, "table1", task, "ofql", seeds_folder(seeds))
            jobs.append(
                Job(folder, training_command(folder, args.script, flags, env_id, seeds, args), args.total_steps)
            )
    seeds = f"--num-seeds {len(args.seeds)}, one job per task" if args.batch_seeds else "one job per task and seed"
    plan.insert(0, f"Table 1: {len(args.tasks)} tasks, seeds {' '.join(map(str, args.seeds))}, {args.script} ({seeds})")
    wall = f"{total / args.jobs:.1f} h on --jobs {args.jobs} GPUs"
    plan.append(f"estimate: {total:.1f} GPU-hours of updates on one H200 ({wall}), from the updates/s measured in "
                "docs/benchmarks/; evaluation adds to it")  # fmt: skip
    return jobs, plan, missing


def dataset_reference(dataset: str, path: str):
    """The dataset's mean episode return, normalized as the scripts normalize scores: a reference level in the
    report, written once beside the runs (the report reads folders only)."""
    if os.path.isfile(path):
        return
    ofql = ofql_module()
    dataset_id = ofql.resolve_dataset_id(dataset)
    data = ofql.load_dataset(dataset_id)
    returns = np.array([episode.rewards.sum() for episode in data.iterate_episodes()])
    meta = data.storage.metadata  # D4RL's returns for its domains, else the dataset's own: as the scripts score
    domain = ofql.task_name(dataset).split("-")[0]
    ref_min, ref_max = ofql.D4RL_REF_SCORES.get(domain) or (meta.get("ref_min_score"), meta.get("ref_max_score"))
    if ref_min is None or ref_max is None:
        raise ValueError(f"{dataset_id}: no D4RL reference returns for {domain!r} and none in its metadata")
    scores = 100 * (returns - ref_min) / (ref_max - ref_min)
    info = {"dataset_id": dataset_id, "episodes": len(returns), "normalized_score": float(scores.mean())}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ofql.save_atomically(path, info | {"normalized_score_std": float(scores.std())})


def run_script(folder: str, command: list[str], group: str) -> int:
    """One job, as the engine's worker runs it: the script executed in this process (runpy), in its folder, its output
    appended to log.txt; its exit code returned. In-process, the engine's signals reach the script's own handlers
    (SIGTERM on a stop or a cancel; SIGUSR2 before a time limit, turned into SIGTERM): it checkpoints and stops."""
    os.chdir(folder)
    try:  # out of the terminal's process group: a Ctrl-C reaches the runner alone, which stops each job once
        os.setsid()
    except OSError:  # already a session leader (a SLURM task may be)
        pass
    signal.signal(signal.SIGUSR2, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
    os.environ["WANDB_RUN_GROUP"] = group  # --track: the runs of one grid in one wandb group
    saved_fds = os.dup(1), os.dup(2)
    with open("log.txt", "a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        sys.stdout.reconfigure(line_buffering=True), sys.stderr.reconfigure(line_buffering=True)
        sys.argv = command[1:]
        try:
            runpy.run_path(command[1], run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            if isinstance(exit.code, str):
                print(exit.code, file=sys.stderr)
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved_fds[0], 1), os.dup2(saved_fds[1], 2)
    return code


def check_engine(args):
    """submitit installed, and sbatch here for --executor slurm: one line otherwise, before anything is written."""
    try:
        import submitit  # noqa: F401
    except ModuleNotFoundError:
        sys.exit('error: docs/ablation.py runs its jobs through submitit: pip install -e ".[grid]"')
    if args.executor == "slurm" and shutil.which("sbatch") is None:
        sys.exit("error: --executor slurm: no sbatch here; run on the cluster's login node (or --executor local)")


def make_executor(args):
    """submitit's executor: `local` runs each job as a process on this machine, `slurm` submits it with sbatch."""
    import submitit

    executor = submitit.AutoExecutor(folder=os.path.join(args.runs_dir, "submitit"), cluster=args.executor)
    executor.update_parameters(
        name=f"ofql-{args.command}",
        timeout_min=args.timeout_min,
        gpus_per_node=args.gpus_per_job,
        cpus_per_task=args.cpus_per_job,
        slurm_partition=args.partition,
        **({"slurm_account": args.account} if args.account else {}),
    )
    return executor


def submit(executor, job: Job, group: str):
    """The job submitted; the runner ignores SIGINT meanwhile, so that the local engine's controller process, which
    inherits that, is not stopped by a Ctrl-C meant for the runner (it would kill the script before it checkpoints)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return executor.submit(run_script, os.path.abspath(job.folder), job.command, group)
    finally:
        signal.signal(signal.SIGINT, previous)


def exit_code(engine_job) -> int:
    """The script's exit code; NO_EXIT_CODE if the engine's job ended without one (killed, or failed to start)."""
    try:
        return engine_job.result()
    except Exception:  # submitit's UncompletedJobError, FailedJobError
        return NO_EXIT_CODE


def run_jobs(jobs: list[Job], num_parallel: int, executor, group: str):
    """Submit the unfinished jobs to the engine, num_parallel at a time, an evaluation once its training run finished.
    SIGINT or SIGTERM is passed on to each running job once (local: SIGTERM; SLURM: scancel), and the scripts
    checkpoint and stop; the next call resumes them. The exit code: 128 + the signal, else 1 if any run is not done."""
    pending = [job for job in jobs if not done(job)]
    print(f"{len(jobs) - len(pending)} of {len(jobs)} runs done; {len(pending)} to go, {num_parallel} at a time")
    running: dict = {}  # submitit job -> Job
    codes = {}  # folder -> the script's exit code, for the summary
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
                job.command += ["--eval-only", os.path.abspath(os.path.join(run_dir(job.after), "model.pt"))]
            os.makedirs(job.folder, exist_ok=True)
            running[submit(executor, job, group)] = job
            print(f"[{time.time() - start:6.0f} s] start {job.folder}", flush=True)
        if stopping and not forwarded:  # once: a second signal would stop a script before it checkpoints
            forwarded = True
            for engine_job in running:
                if executor.cluster == "local":  # its job id is the controller's pid, which passes SIGTERM on
                    os.kill(int(engine_job.job_id), signal.SIGTERM)
                else:
                    engine_job.cancel(check=False)  # scancel: SIGTERM to the script
        for engine_job in [engine_job for engine_job in running if engine_job.done()]:
            job = running.pop(engine_job)
            codes[job.folder] = exit_code(engine_job)
            status = job_status(job, codes[job.folder])
            print(f"[{time.time() - start:6.0f} s] {status}: {job.folder}", flush=True)
        if pending and not ready and not running:
            print(
                "these wait for training runs that failed or were not asked for:",
                *[job.folder for job in pending],
                sep="\n  ",
            )
            break
        time.sleep(1)
    left = [job for job in jobs if not done(job)]
    failed = [job for job in left if job_status(job, codes.get(job.folder)).startswith("FAILED")]
    line = f"{len(jobs) - len(left)} of {len(jobs)} runs done"
    if failed:
        line += f"; {len(failed)} failed (their error above, and in their log.txt): fix that, then run the same command"
    if len(left) > len(failed):
        line += f"; {len(left) - len(failed)} to go: run the same command to resume them"
    print(line)
    if stopping:  # as a process killed by it: a caller's loop or shell sees the stop
        return 128 + stopping[0]
    return 1 if failed or left else 0


def job_status(job: Job, returncode: int | None = None) -> str:
    """done; FAILED with the script's own error line (a bad flag is no run to resume); interrupted (stopped by a
    signal, resumable from its checkpoint); not started."""
    if done(job):
        return "done"
    log = os.path.join(job.folder, "log.txt")
    error = error_line(log)
    if error:
        return f"FAILED: {error}"
    if returncode == ARGUMENT_ERROR:
        return f"FAILED (exit code {returncode}: a flag the script does not take, see {log})"
    last = run_dir(job.folder)
    summary = os.path.join(last, "summary.json") if last else ""
    if os.path.isfile(summary):
        with open(summary) as f:
            stopped_at = json.load(f).get("interrupted_at_step")
        if stopped_at is not None and (returncode is None or returncode > 128):
            return f"interrupted at update {stopped_at}, resumable (run the same command)"
    if returncode is not None and returncode > 128:  # stopped in start-up, before anything was saved
        return f"interrupted before its first update ({signal.Signals(returncode - 128).name}): run the same command"
    if returncode == NO_EXIT_CODE:
        return (
            f"FAILED (killed, or the engine could not run it: see {log} and the engine's logs in <runs-dir>/submitit)"
        )
    if returncode is not None:
        return f"FAILED (exit code {returncode}, see {log})"
    return "not run yet"


def error_line(log: str) -> str | None:
    """The error of the log's last run: the script's `error: ...` line, or the first line of tyro's box around a
    flag it cannot parse (`Unrecognized options: --x`)."""
    if not os.path.isfile(log):
        return None
    with open(log, errors="replace") as f:
        lines = f.read().rsplit("\n$ ", 1)[-1].splitlines()[1:]  # after the last command line
    errors = [line.strip() for line in lines if line.startswith("error:")]
    boxed = [line.strip("│ \t") for line in lines if line.startswith("│")]
    return errors[-1] if errors else f"error: {boxed[0]}" if boxed and boxed[0] else None


# REPORT: from the run folders alone
def read_runs(folder: str) -> list[dict]:
    """The final summaries of a method's seeds: folder/seed<k>/runs/*/summary.json, and one per seed of a run of
    several (folder/seeds<a>-<b>/, ofql_jax.py --num-seeds)."""
    summaries = []
    for seed_folder in sorted(glob.glob(os.path.join(folder, "seed*"))):
        if finished(seed_folder):
            with open(os.path.join(run_dir(seed_folder), "summary.json")) as f:
                summaries += each_seed(json.load(f))
    return summaries


def each_seed(summary: dict) -> list[dict]:
    """A run of several seeds split into one summary per seed, with the keys a one-seed run has."""
    if summary.get("num_seeds", 1) == 1:
        return [summary]
    per_seed = zip(
        summary["seeds"],
        summary["seed_normalized_scores"],
        summary["seed_best_normalized_scores"],
        summary["seed_evaluations"],
        strict=True,
    )
    episodes, n = summary.get("episode_normalized_scores"), summary["eval_episodes"]  # seed by seed (older runs: none)
    return [
        summary
        | {"seed": seed, "normalized_score": final, "best_normalized_score": best, "evaluations": curve}
        | ({"episode_normalized_scores": episodes[k * n : (k + 1) * n]} if episodes else {})
        for k, (seed, final, best, curve) in enumerate(per_seed)
    ]


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


def report_table1(base: str, out: str):
    """Table 1's rows: each task's final and best score, mean +- std across seeds, into table1.md."""
    rows = ["| task | final score | best score | seeds | updates |", "|---|---|---|---|---|"]
    for task_folder in sorted(glob.glob(os.path.join(base, "*"))):
        summaries = read_runs(os.path.join(task_folder, "ofql"))
        if summaries:
            finals = [s["normalized_score"] for s in summaries]
            best = [max(s["best_normalized_score"] or -np.inf, s["normalized_score"]) for s in summaries]
            steps = "/".join(str(n) for n in sorted({s["total_steps"] for s in summaries}))
            name = os.path.basename(task_folder)
            rows.append(f"| {name} | {mean_std(finals)} | {mean_std(best)} | {len(summaries)} | {steps} |")
    with open(os.path.join(out, "table1.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    print(f"\nTable 1, OFQL ({os.path.join(out, 'table1.md')}); mean +- std across seeds:\n" + "\n".join(rows))


class Parser(argparse.ArgumentParser):
    """argparse's, its errors in one line (its usage block is long; -h shows it)."""

    def error(self, message: str):
        self.exit(ARGUMENT_ERROR, f"error: {message}\n")


def check_args(args):
    """Every numeric flag in range, the flags that go together, and the folder the command writes in; ValueError
    naming the flag. All before anything is read or written."""
    if args.command == "report":
        check_folder("--out", args.out or os.path.join(args.runs_dir, "report"))
        return
    for flag, (low, high) in RANGES.items():
        values = getattr(args, flag, None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not low <= value <= high:  # NaN is in no range
                bound = f">= {low}" if high == INF else f"in [{low}, {high}]"
                raise ValueError(f"--{flag.replace('_', '-')} {value}: out of range, must be {bound}")
    if args.batch_seeds and args.seeds != list(range(args.seeds[0], args.seeds[0] + len(args.seeds))):
        raise ValueError(f"--batch-seeds trains seeds s, s + 1, ... in one run: --seeds "
                         f"{' '.join(map(str, args.seeds))} are not consecutive")  # fmt: skip
    if args.batch_seeds and getattr(args, "script", "ofql_jax.py") != "ofql_jax.py":
        raise ValueError("--batch-seeds trains the seeds in one ofql_jax.py --num-seeds run: use --script ofql_jax.py")
    check_folder("--runs-dir", args.runs_dir)


def check_folder(flag: str, path: str):
    """A folder to write in: one, or one that can be made there, and writable."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    problem = (
        f"a file; {flag} takes a folder" if os.path.isfile(path)
        else f"{folder} is a file" if not os.path.isdir(folder)
        else f"cannot write in {folder}" if not os.access(folder, os.W_OK | os.X_OK)
        else None
    )  # fmt: skip
    if problem:
        raise ValueError(f"{flag} {path}: {problem}")


def add_engine_flags(grid: argparse.ArgumentParser):
    engine = grid.add_argument_group("engine (submitit)")
    engine.add_argument("--executor", choices=["local", "slurm"], default="local",
                        help="local: processes on this machine; slurm: sbatch jobs (submitit's executors)")  # fmt: skip
    engine.add_argument("--jobs", type=int, default=2, help="jobs at a time (local: processes; slurm: submitted)")
    engine.add_argument("--timeout-min", type=int, default=3 * 24 * 60, help="each job's time limit, in minutes "
                        "(near it the script checkpoints and stops; the same command resumes it)")  # fmt: skip
    engine.add_argument("--gpus-per-job", type=int, default=0)
    engine.add_argument("--cpus-per-job", type=int, default=1)
    engine.add_argument("--partition", help="SLURM partition")
    engine.add_argument("--account", help="SLURM account")


def main():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("ablation", "eta-sweep", "table1"):
        grid = commands.add_parser(name, help=f"train and evaluate the {name} grid (skips finished runs)")
        if name == "table1":
            grid.add_argument(
                "--tasks", nargs="+", help="rows of Table 1 (default: all; their names: TASKS in ofql.py)"
            )
            grid.add_argument("--d4rl-dir", help="the folder of D4RL's MuJoCo hdf5 files (hopper_medium-v2.hdf5, ...)")
            grid.add_argument("--dry-run", action="store_true", help="print the plan and its estimate, start nothing")
        else:
            grid.add_argument("--datasets", nargs="+", required=True, help="D4RL names or Minari ids")
        grid.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
        grid.add_argument("--batch-seeds", action="store_true",
                          help="the OFQL runs' seeds in one ofql_jax.py --num-seeds job per dataset")  # fmt: skip
        grid.add_argument("--total-steps", type=int, help="updates per run (default: each task's row in TASKS)")
        grid.add_argument("--eval-freq", type=int, default=50_000 if name == "table1" else 5000,
                          help="evaluate (10 episodes) and checkpoint every")  # fmt: skip
        grid.add_argument("--flags", default="--threads 1 --no-cuda", help="more flags for every script")
        grid.add_argument("--runs-dir", default="runs/paper")
        if name == "ablation":
            grid.add_argument("--methods", nargs="+", choices=[*TRAINED, *ONE_STEP], default=[*TRAINED, *ONE_STEP])
        else:
            grid.add_argument("--script", default="ofql_jax.py", choices=["ofql.py", "ofql_jax.py"])
        if name == "eta-sweep":
            grid.add_argument("--etas", nargs="+", type=float, default=list(ETA_GRID))
        add_engine_flags(grid)
    report = commands.add_parser("report", help="figures and tables from the run folders")
    report.add_argument("--runs-dir", default="runs/paper")
    report.add_argument("--out", help="folder for the figures (default: <runs-dir>/report; docs: the committed ones)")
    args = parser.parse_args()
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))

    if args.command == "report":
        found = found_runs(args.runs_dir)
        if not found:
            sys.exit(f"error: --runs-dir {args.runs_dir}: no finished runs in its {', '.join(GRIDS)} folders; "
                     "train them with `ablation`, `eta-sweep` or `table1` first, or name their folder")  # fmt: skip
        print("found finished runs:", *found, sep="\n  ")
        out = args.out or os.path.join(args.runs_dir, "report")
        os.makedirs(out, exist_ok=True)
        reports = (("ablation", report_ablation), ("eta_sweep", report_eta_sweep), ("table1", report_table1))
        for grid, make_report in reports:
            if os.path.isdir(os.path.join(args.runs_dir, grid)):
                make_report(os.path.join(args.runs_dir, grid), out)
        return 0
    grid = {"ablation": "ablation", "eta-sweep": "eta_sweep", "table1": "table1"}[args.command]
    check_engine(args)
    try:  # every dataset checked (and its reference level written) before any job starts
        if args.command == "table1":
            args.tasks = args.tasks or list(ofql_module().TASKS)
            jobs, plan, missing = table1_jobs(args)
            print("\n".join(plan))
            if missing:
                print(f"{len(missing)} D4RL files are not in --d4rl-dir {args.d4rl_dir}; download them there:",
                      *missing, sep="\n  ")  # fmt: skip
                if not args.dry_run:
                    sys.exit(f"error: --d4rl-dir {args.d4rl_dir}: {len(missing)} files missing (listed above)")
            if args.dry_run:
                return 0
        else:
            for dataset in args.datasets:
                dataset_reference(dataset, os.path.join(args.runs_dir, grid, slug(dataset), "dataset.json"))
            jobs = ablation_jobs(args) if args.command == "ablation" else eta_sweep_jobs(args)
    except ValueError as error:
        sys.exit(f"error: {error}" if str(error).startswith("--") else f"error: --datasets: {error}")
    group = f"{grid}-{os.path.basename(os.path.abspath(args.runs_dir))}"  # e.g. ablation-paper
    return run_jobs(jobs, args.jobs, make_executor(args), group)


def found_runs(runs_dir: str) -> list[str]:
    """`grid/dataset/method: N seeds` for every method folder with finished runs."""
    found = []
    for folder in sorted(glob.glob(os.path.join(runs_dir, "*", "*", "*"))):
        seeds = len(read_runs(folder)) if os.path.basename(os.path.dirname(os.path.dirname(folder))) in GRIDS else 0
        if seeds:
            found.append(f"{os.path.relpath(folder, runs_dir)}: {seeds} seed{'s' * (seeds > 1)}")
    return found


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before run_jobs takes the signals over: no job started
        print("stopped by SIGINT", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
