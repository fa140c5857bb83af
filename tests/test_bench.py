"""The benchmark harness keeps working: a CPU smoke run on a tiny model (no timing claims)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_cpu_benchmark_runs_and_checks_every_refit(tmp_path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "refit_bench.py"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = (tmp_path / "benchmarks.md").read_text()
    assert "refit: refit_module_weights, ExportedProgram (ms)" in report
    errors = [line for line in report.splitlines() if line.startswith("| check: rel. error")]
    assert errors
    for line in errors:
        value = float(line.rsplit("|", 2)[1])
        assert value < 1e-4, line


def test_refitter_overhead_bench_runs_every_refit_side_by_side() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "refitter_overhead.py"), "--device", "cpu", "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(run.stdout.splitlines()[0])
    for key in ("refitter_unchecked", "refitter_checked", "refitter_checked_double_buffer"):
        assert row[f"{key}_ms"] > 0 and row[f"err_{key}"] < 1e-4, key
    assert row["flat_copy_ms"] > 0
    assert "| Refitter, checked, double_buffer (checked as copied) |" in run.stdout


def test_lm_bench_eos_spread_runs_both_systems_over_the_same_row_lengths(tmp_path) -> None:
    """bench/lm_bench.py's eos section on CPU (tiny model, eager engines, short rows): both
    systems end every row at its drawn length, and tokens per second are reported."""
    out = tmp_path / "lm.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lm_bench.py"), "--tiny", "--skip",
         "decode,prefill,rl", "--backend", "eager", "--eos-batch", "6", "--eos-longest", "24",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a tiny model: threads only contend
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    row = json.loads(out.read_text())["eos_spread"]
    assert "error" not in row, row
    for system in ("torchrefit", "transformers_static"):
        for mode in ("greedy", "sampled"):
            assert row[f"{system}_{mode}_rows_end_as_drawn"], (system, mode)
            assert row[f"{system}_{mode}_tokens_per_s"] > 0
    assert 16 <= row["lengths"]["min"] <= row["lengths"]["max"] <= 24
