"""docs/fig3_toy.py, the paper's Fig. 3 by command, on its small budget: it runs, writes a PNG and prints 5 distances."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_fig3_toy_quick_writes_a_png_and_a_table_of_finite_distances(tmp_path):
    pytest.importorskip("matplotlib")  # a guard only: CI installs the plot extra
    out = tmp_path / "fig.png"
    command = [sys.executable, str(ROOT / "docs" / "fig3_toy.py"), "--quick", "--out", str(out)]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = re.findall(r"^(flow matching|MeanFlow)\s+(\d+)\s+(\S+)$", run.stdout, re.MULTILINE)
    assert [(method, int(steps)) for method, steps, _ in rows] == [
        ("flow matching", 1),
        ("flow matching", 2),
        ("flow matching", 5),
        ("flow matching", 10),
        ("MeanFlow", 1),
    ], run.stdout
    assert all(math.isfinite(float(distance)) for _, _, distance in rows), run.stdout
