"""tests/benchmark.py runs every script through its CLI and prints one table (a smoke test: no timing asserted)."""

import subprocess
import sys

from conftest import HOPPER_DATASET_ID, ROOT


def test_benchmark_prints_a_row_per_script(minari_path):
    command = [sys.executable, str(ROOT / "tests" / "benchmark.py"), "--env-id", HOPPER_DATASET_ID]
    command += ["--scripts", "dql", "ofql", "--updates", "20", "--repeats", "1", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| script")]
    assert [row.split(" | ")[0] for row in rows] == ["| dql.py", "| ofql.py"]
    assert "failed" not in result.stdout and "1.00x" in rows[0]
