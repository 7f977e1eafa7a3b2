"""The paper's Fig. 4: training hours per 1M updates and decision frequency per method, from tests/benchmark.py's
output. One row of two panels per machine (one input file each); one bar per script and mode.

An input file holds the benchmark's stdout, each table under the command line that made it (`$ python tests/...`),
as docs/benchmarks/*.md do; the mode of a table is its --extra-flags (eager without). Progress lines are ignored.

Usage:
    MINARI_DATASETS_PATH=/path/to/datasets python tests/benchmark.py --updates 1000 --repeats 2 --threads 1 \\
        > docs/benchmarks/cpu.md        # then put the command line, "$ python tests/benchmark.py ...", above the table
    python docs/fig4_speed.py docs/benchmarks/cpu.md docs/benchmarks/h200.md --out docs/fig4_speed.png
Needs matplotlib: pip install -e ".[plot]".
"""

import argparse
import os
import re
import shlex
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"dql.py": "tab:blue", "fql.py": "tab:orange", "ofql.py": "tab:green", "ofql_jax.py": "tab:olive"}


def read_benchmark(path: str) -> tuple[str, list[tuple[str, float, float]]]:
    """The machine (the first heading or machine line) and (script and mode, updates/s, decisions/s) of every row."""
    title, mode, rows = None, "", []
    try:
        lines = open(path).read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        sys.exit(f"error: {path}: cannot be read as a benchmark output ({type(error).__name__}: {error})")
    for line in lines:
        if line.startswith("# ") and title is None:
            title = line[2:].strip()
        elif line.startswith("$ "):
            words = shlex.split(line[2:])
            flags = [w.split("=", 1)[1] for w in words if w.startswith("--extra-flags=")]
            mode = f" {flags[0]}" if flags and flags[0] else ""
        elif re.match(r"\| \S+\.py \| [\d.]+ \|", line):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows.append((cells[0] + mode, float(cells[1]), float(cells[3])))
        elif " | " in line and "nproc" in line and title is None:
            title = line.split(" | ")[0]
    return title or path, rows


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="benchmark outputs, one machine each")
    parser.add_argument("--out", default="fig4_speed.png", help="the figure; its suffix names the format")
    args = parser.parse_args()
    try:  # before the inputs are read
        check_out(args.out)
    except ValueError as error:
        sys.exit(f"error: {error}")

    machines = [read_benchmark(path) for path in args.inputs]
    for path, (_, rows) in zip(args.inputs, machines, strict=True):
        if not rows:
            sys.exit(f"error: {path}: no table of tests/benchmark.py in it (rows `| dql.py | 16.4 | ... |`)")
    height = sum(max(len(rows), 1) for _, rows in machines)
    fig, axes = plt.subplots(
        len(machines), 2, figsize=(10, 1.2 + 0.42 * height), squeeze=False,
        gridspec_kw={"height_ratios": [max(len(rows), 1) for _, rows in machines]},
    )  # fmt: skip
    for (title, rows), (hours_ax, hz_ax) in zip(machines, axes, strict=True):
        labels = [label for label, _, _ in rows]
        colors = [COLORS.get(label.split()[0], "gray") for label in labels]
        hours = [1e6 / updates_per_second / 3600 for _, updates_per_second, _ in rows]
        decisions = [hz for _, _, hz in rows]
        print(f"{title}\n| script | hours per 1M updates | decisions/s |\n|---|---|---|")
        for label, h, hz in zip(labels, hours, decisions, strict=True):
            print(f"| {label} | {h:.2f} | {hz:.0f} |")
        for ax, values, name in ((hours_ax, hours, "training hours per 1M updates (lower is better)"),
                                 (hz_ax, decisions, "decisions per second (higher is better)")):  # fmt: skip
            ax.barh(range(len(rows)), values, color=colors)
            ax.set_yticks(range(len(rows)), labels if ax is hours_ax else [""] * len(rows))
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: no overlapping labels
            ax.set_title(f"{title}\n{name}" if ax is hours_ax else name, fontsize=9, loc="left")
            for i, value in enumerate(values):
                ax.annotate(f"{value:.2g}" if value < 10 else f"{value:,.0f}", (value, i), xytext=(3, 0),
                            textcoords="offset points", va="center", fontsize=8)  # fmt: skip
            ax.margins(x=0.25)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
