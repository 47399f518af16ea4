"""The benchmark scripts run, at toy sizes, so the figures in the README can be
re-made by anyone. Nothing here looks at a time: only that each script runs and
prints its comparison (speed belongs in the benchmarks, not in tests)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "torch_step": ["torch_step.py", "--blocks", "3", "--warmup", "1", "--repeats", "1"],
    "memory": ["memory.py", "--settings", "tiny", "--unit", "MiB", "--microbatches", "1", "2"],
    "precision": ["precision.py", "--frameworks", "jax", "--steps", "4", "--pretrain-steps", "6",
                  "--seq", "64"],
    "speed": ["speed.py", "--layers", "2", "--d", "32", "--ffn", "64", "--heads", "2",
              "--vocab", "64", "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "1",
              "--rows", "1", "4",  # AdaLomo without and with clipping
              "--microbatches", "2"],
}


def run(args):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_torch_step_benchmark_runs():
    out = run(RUNS["torch_step"])
    rows = re.findall(r"^(Lomo|AdaLomo)\s+fwd.*?([\d.]+)x\s+([\d.e+-]+)$", out, re.M)
    assert len(rows) == 4, out
    assert all(float(diff) < 1e-5 for _, _, diff in rows), out  # same parameters as lomo-optim


def table_rows(text):
    """The cells of every Markdown table row of ``text`` but headers and rules."""
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| ") and "ms" not in line and "---" not in line]


def assert_ratio_of_printed_times(a, b, ratio, line):
    """The printed ratio is the two printed times' (each rounded to 0.1 ms)."""
    assert a > 0 and b > 0, line
    lo, hi = (a - 0.05) / (b + 0.05), (a + 0.05) / (b - 0.05)
    assert lo - 1e-3 <= ratio <= hi + 1e-3, line


def test_speed_benchmark_runs():
    out = run(RUNS["speed"])
    fused_vs_unfused, _, accumulation = out.partition("Gradient accumulation")
    rows = table_rows(fused_vs_unfused)
    assert len(rows) == 2, out
    for cells in rows:
        assert_ratio_of_printed_times(float(cells[3]), float(cells[4]),
                                      float(cells[5].split()[0]), cells)
    rows = table_rows(accumulation)
    assert [cells[0] for cells in rows] == ["lomo", "adalomo"], out
    for cells in rows:
        assert_ratio_of_printed_times(float(cells[1]), float(cells[2]), float(cells[3]), cells)


@pytest.mark.parametrize("target", ["rtx4090", "cpu"])
def test_memory_benchmark_runs(target):
    """The shipped model on a GPU target (deviceless) and on this CPU: one row per
    method (the fused ones also with 2 micro-batches), and the fused steps hold less
    than value_and_grad + AdamW."""
    out = run(RUNS["memory"] + ["--target", target])
    assert f"target {target}" in out, out
    rows = {(cells[3], int(cells[2])): float(cells[6]) for cells in table_rows(out)
            if cells[0] == "tiny"}
    fused = ("fused LOMO", "fused AdaLomo", "fused AdaLomo, clip 1.0")
    assert set(rows) == ({("inference", 1), ("value_and_grad + AdamW", 1)}
                         | {(m, mb) for m in fused for mb in (1, 2)}), out
    adamw = rows["value_and_grad + AdamW", 1]
    assert rows["inference", 1] < rows["fused LOMO", 1] < adamw, rows
    assert all(rows[m, mb] < adamw for m in fused for mb in (1, 2)), rows


def test_precision_benchmark_runs():
    """fp32, bf16 nearest, bf16 stochastic from one checkpoint: the columns are the
    ratios they claim, and even 4 steps show nearest losing the update that
    stochastic rounding keeps."""
    out = run(RUNS["precision"])
    rows = {cells[3]: cells for cells in table_rows(out) if cells[0] == "jax"}
    assert set(rows) == {"fp32", "bf16 nearest", "bf16 stochastic"}, out
    red = {k: float(v[5]) for k, v in rows.items()}
    for k, v in rows.items():
        assert abs(float(v[6]) - red[k] / red["fp32"]) < 0.006, v  # printed to 2 decimals
    assert float(rows["fp32"][7].rstrip("%")) > 99  # fp32: every weight moves every step
    assert red["fp32"] > 0 and red["bf16 stochastic"] > 0.5 * red["fp32"], red
    assert red["bf16 stochastic"] > 2 * max(red["bf16 nearest"], 0.0), red


def test_packages_import_without_the_other_framework():
    """A PyTorch-only user needs no JAX, a JAX-only user no torch: importing one package
    imports nothing of the other framework."""
    code = "import sys, {pkg}; assert '{other}' not in sys.modules"
    for pkg, other in (("lomo_torch", "jax"), ("lomo_jax", "torch"),
                       ("lomo_jax.models.llama", "torch")):
        proc = subprocess.run([sys.executable, "-c", code.format(pkg=pkg, other=other)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"importing {pkg} imported {other}:\n{proc.stderr[-2000:]}"
