"""The benchmark scripts run, at toy sizes, so the figures in the README can be
re-made by anyone. Nothing here asserts a speed (speed belongs in the benchmarks,
not in tests): each script runs and prints its comparison, every row is present,
and each printed ratio is the quotient of the quantities it claims to compare."""

import importlib.util
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.jax.gpu_target import COMPILES_FOR_GPU

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "torch_step": ["torch_step.py", "--blocks", "3", "--warmup", "1", "--repeats", "2"],
    "torch_step_llama": ["torch_step.py", "--model", "llama", "--layers", "1", "--hidden", "32",
                         "--intermediate", "64", "--heads", "2", "--vocab", "64", "--seq", "8",
                         "--batch", "2", "--warmup", "1", "--repeats", "2", "--threads", "1"],
    "memory": ["memory.py", "--settings", "tiny", "--unit", "MiB", "--microbatches", "1", "2"],
    # 1 pretraining step, then 4 fine-tuning steps of 2 x 32 bytes: enough for nearest
    # rounding to lose the update that stochastic rounding keeps (a step's time is mostly
    # the update of the 3M parameters, whatever the batch)
    "precision": ["precision.py", "--frameworks", "jax", "--steps", "4", "--pretrain-steps", "1",
                  "--batch", "2", "--seq", "32"],
    "speed": ["speed.py", "--layers", "2", "--d", "32", "--ffn", "64", "--heads", "2",
              "--vocab", "64", "--batch", "1", "--seq", "8", "--steps", "1", "--warmup", "1",
              "--rows", "1", "4",  # AdaLomo without and with clipping
              "--clip-rows", "2", "3",  # AdaLomo: global (its fused step shared) and adaptive
              # AdaLomo: its one-step-per-micro-batch side is the first table's fused step
              "--microbatches", "2", "--microbatch-transforms", "adalomo"],
    "stability": ["stability.py", "--steps", "6", "--seeds", "0", "--batch", "1", "--seq", "64",
                  "--adaptive-warmup", "2"],
    "scaling": ["scaling.py", "--target", "rtx4090", "--rows", "tiny-8",
                "--methods", "LOMO", "AdaLomo, clip 1.0, offload"],
}


def load_benchmark(name):
    """``benchmarks/NAME.py`` imported into this process (as ``benchmarks_NAME``, with
    ``benchmarks/`` on the path for its own helpers): a run in-process shares this
    process's Python and JAX start instead of paying its own."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}",
                                                  ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def run_in_process(capsys, args, module=None):
    """``main(args[1:])`` of benchmark ``args[0]`` (or of ``module``, that benchmark
    already loaded), in this process: its stdout."""
    (module or load_benchmark(args[0].removesuffix(".py"))).main(args[1:])
    return capsys.readouterr().out


@pytest.fixture
def gpu_compile_env(monkeypatch):
    """memory.py and scaling.py set these (if unset) when imported: put back after the test."""
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))


TORCH_STEP_ROW = re.compile(r"^(Lomo|AdaLomo)\s+(fwd \+ (?:grad_norm \+ )?fused_backward)\s+"
                            r"([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.e+-]+|nan)$", re.M)
TORCH_STEP_PLAIN = re.compile(r"SGD\.step ([\d.]+) ms; lomo_torch Lomo ([\d.]+) ms = ([\d.]+)x "
                              r"the plain step; lomo-optim Lomo ([\d.]+) ms = ([\d.]+)x")


@pytest.mark.parametrize("model", ["stack", "llama"])
def test_torch_step_benchmark_runs(model, lomo_optim, capsys):
    """Every row is there, each ratio is the quotient of the two times it claims to
    compare (the plain-step line repeats the Lomo row's own measurements), the lomo-optim
    and lomo_torch models end equal, the model is the one asked for, and no step took
    longer than the whole run (steps x their time fit in the run's wall time). In this
    process (torch and lomo-optim imported once); what the script changes in it is put
    back: the ``Tensor.cuda`` no-op it installs on the CPU (the ``lomo_optim`` fixture's
    monkeypatch restores it), torch's thread count and random state."""
    import torch

    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            out = run_in_process(capsys, RUNS["torch_step" if model == "stack"
                                              else "torch_step_llama"])
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    if model == "llama":  # 1 layer, d=32, ffn 64, vocab 64, untied: 14,432 parameters
        assert "transformers LlamaForCausalLM" in out and " 14,432 parameters" in out, out
    else:
        assert "12 parameter tensors, 12,864 parameters" in out, out
    rows = {(m[0], m[1]): [float(v) for v in m[2:]] for m in TORCH_STEP_ROW.findall(out)}
    assert set(rows) == {(o, s) for o in ("Lomo", "AdaLomo")
                         for s in ("fwd + fused_backward", "fwd + grad_norm + fused_backward")}, out
    steps_per_row = 3 * (1 + 2)  # warm-up + repeats, the row's steps and its alternates
    for (opt, step), (ref_ms, ours_ms, speedup, diff) in rows.items():
        assert_ratio_of_printed_times(ref_ms, ours_ms, speedup, (opt, step), ratio_digits=2)
        assert (ref_ms + ours_ms) * steps_per_row / 3 < 1e3 * seconds, (opt, step, seconds)
        # same parameters as lomo-optim: their difference over the update (bit-identical
        # here; a different lr or a skipped step gives 0.3 or more, an unmoved model NaN)
        assert diff < 1e-3, (opt, step, diff)
    sgd, ours, ratio, ref, ref_ratio = (float(v) for v in TORCH_STEP_PLAIN.search(out).groups())
    lomo_ref, lomo_ours = rows["Lomo", "fwd + fused_backward"][:2]
    assert (ours, ref) == (lomo_ours, lomo_ref), out
    assert sgd * steps_per_row / 3 < 1e3 * seconds, (sgd, seconds)
    assert_ratio_of_printed_times(ours, sgd, ratio, "lomo_torch / plain", ratio_digits=2)
    assert_ratio_of_printed_times(ref, sgd, ref_ratio, "lomo-optim / plain", ratio_digits=2)


def table_rows(text):
    """The cells of every Markdown table row of ``text`` but headers and rules."""
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| ") and "ms" not in line and "---" not in line]


def assert_ratio_of_printed_times(a, b, ratio, line, ratio_digits=None):
    """The printed ratio is the two printed times' (each rounded to 0.1 ms; the ratio
    itself to ``ratio_digits`` decimals, or not rounded)."""
    assert a > 0 and b > 0, line
    slack = 1e-3 if ratio_digits is None else 0.5 * 10.0**-ratio_digits + 1e-9
    lo, hi = (a - 0.05) / (b + 0.05), (a + 0.05) / (b - 0.05)
    assert lo - slack <= ratio <= hi + slack, line


def test_speed_benchmark_runs(capsys):
    """In-process, one compile a step: the fused vs unfused rows asked for (AdaLomo
    without and with global clipping), the clipping table's AdaLomo rows (global: 2
    passes, its fused step the first table's; adaptive: 1 pass) and the accumulation
    row (AdaLomo: its steps on the micro-batches one by one are the first table's fused
    step), each ratio the quotient of the times it claims to compare."""
    out = run_in_process(capsys, RUNS["speed"])
    fused_vs_unfused, _, rest = out.partition("Clipping's cost")
    clipping, _, accumulation = rest.partition("Gradient accumulation")
    rows = table_rows(fused_vs_unfused)
    assert [(cells[0], cells[2]) for cells in rows] == [("adalomo", "-"), ("adalomo", "1.0")], out
    for cells in rows:
        assert_ratio_of_printed_times(float(cells[3]), float(cells[4]),
                                      float(cells[5].split()[0]), cells)
    rows = table_rows(clipping)
    assert [cells[:3] for cells in rows] == [["adalomo", "global", "2"],
                                             ["adalomo", "adaptive", "1"]], out
    for cells in rows:
        assert_ratio_of_printed_times(float(cells[3]), float(cells[4]), float(cells[5]), cells)
    rows = table_rows(accumulation)
    assert [cells[0] for cells in rows] == ["adalomo"], out
    for cells in rows:
        assert_ratio_of_printed_times(float(cells[1]), float(cells[2]), float(cells[3]), cells)


@pytest.mark.parametrize("target", [pytest.param("rtx4090", marks=COMPILES_FOR_GPU), "cpu"])
def test_memory_benchmark_runs(target, capsys, gpu_compile_env):
    """The shipped model on a GPU target (deviceless) and on this CPU: one row per
    method asked for (the fused one also with 2 micro-batches; offloading on the
    GPU target, a no-op on XLA:CPU), and the fused steps hold less than
    value_and_grad + AdamW (LoRA + LOMO too, on the GPU target, at M = 1 only). Both
    compile in this process (the CPU target's switched-off pass is a compile option)."""
    # the GPU target: the offloading step only (its plain twin is the CPU run's and
    # tests/jax/test_fused_memory.py's; every GPU-target program costs ~7 s to compile)
    fused = (("fused AdaLomo, clip 1.0, offload",) if target == "rtx4090"
             else ("fused AdaLomo, clip 1.0",))
    lora = ("fused LoRA + LOMO",) if target == "rtx4090" else ()
    methods = ["--methods", "inference", "value_and_grad + AdamW", *fused, *lora]
    memory = load_benchmark("memory")
    out = run_in_process(capsys, RUNS["memory"] + ["--target", target] + methods, memory)
    assert f"target {target}" in out, out
    table = {(cells[3], int(cells[2])): cells for cells in table_rows(out) if cells[0] == "tiny"}
    rows = {k: float(cells[6]) for k, cells in table.items()}
    assert set(rows) == ({("inference", 1), ("value_and_grad + AdamW", 1)}
                         | {(m, mb) for m in fused for mb in (1, 2)}
                         | {(m, 1) for m in lora}), out
    adamw = rows["value_and_grad + AdamW", 1]
    assert all(rows["inference", 1] < rows[m, 1] < adamw for m in fused), rows
    # LoRA (rank 16 on a 64-wide toy: adapters bigger than AdamW's state here): its
    # arguments are the inference's plus exactly the adapters and their AdamW state
    args = {k: float(cells[4]) for k, cells in table.items()}
    own = memory.adapter_bytes(memory.model_config("tiny", "fused LoRA + LOMO")) / 2**20
    assert all(abs(args[m, 1] - args["inference", 1] - own) <= 0.02 for m in lora), (args, own)
    assert all(rows["inference", 1] < rows[m, 1] for m in lora), rows
    assert all(rows[m, mb] < adamw for m in fused for mb in (1, 2)), rows
    # host memory: only the offloading step has any: the saved inputs, 2 x 64 x 64
    # bf16 per layer, 2 layers = 32 KiB (the table is in MiB)
    host = {k: float(cells[7]) for k, cells in table.items()}
    if target == "rtx4090":
        assert [host.pop(("fused AdaLomo, clip 1.0, offload", mb)) for mb in (1, 2)] == [0.03] * 2
    assert set(host.values()) == {0.0}, table


def adapters_per_layer(cfg):
    """Rank-16 adapter parameters of one layer of ``cfg``: ``A`` and ``B`` of q, o; k, v;
    gate, up, down."""
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    return 16 * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)


def test_memory_benchmark_lora_table(capsys, gpu_compile_env):
    """The LoRA table (no compile here): the adapters' own bytes, from shapes, are rank 16
    on the tiny model's seven projections, parameters and AdamW's two moments in bf16 plus
    its int32 count; "measured - LOMO" and "difference" are the differences of the
    figures given; no fused LOMO row of the same setting, no table."""
    memory = load_benchmark("memory")
    cfg = memory.model_config("tiny", "fused LoRA")
    assert memory.model_config("tiny", "fused LOMO").lora is None
    # fp32 adapters (PEFT's autocast), mu, nu
    own = cfg.num_hidden_layers * adapters_per_layer(cfg) * 4 * 3 + 4
    assert memory.adapter_bytes(cfg) == own
    mib, figures = 2**20, memory.aot.MemoryFigures
    memory.print_lora_costs({("tiny", "fused LoRA"): figures(3 * mib, 0, 2 * mib, 0)})
    assert capsys.readouterr().out == ""
    memory.print_lora_costs({("tiny", "fused LOMO"): figures(10 * mib, mib, 5 * mib, mib),
                             ("tiny", "fused LoRA"): figures(11 * mib, mib, 5 * mib, mib)})
    (row,) = [cells for cells in table_rows(capsys.readouterr().out) if cells[0] == "tiny"]
    assert row == ["tiny", "2 x 64", "fused LoRA", "16.00", "15.00", "1.00", f"{own / mib:.2f}",
                   f"{(mib - own) / mib:+.2f}"]


def test_memory_benchmark_layers(capsys, gpu_compile_env):
    """``--layers N`` gives every model N decoder layers: the tiny inference on this
    CPU holds one layer's parameters less with 1 layer than with its own 2 (the
    arguments: parameters and batch), the header says so, and the adapters' bytes
    scale with it; fewer than one layer is refused."""
    base = ["memory.py", "--settings", "tiny", "--methods", "inference", "--unit", "MiB",
            "--target", "cpu"]
    args = {}
    for layers in (None, 1):
        memory = load_benchmark("memory")  # a fresh module: MODELS as shipped
        out = run_in_process(capsys, base + ([] if layers is None else ["--layers", "1"]),
                             memory)
        assert ("Every model with 1 layers." in out) == (layers == 1), out
        (row,) = [cells for cells in table_rows(out) if cells[0] == "tiny"]
        args[layers] = float(row[4])
    cfg = memory.MODELS["tiny"]
    assert cfg.num_hidden_layers == 1
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    layer = (d * (d + kv + kv + d) + 3 * d * f + 2 * d) * 2  # bf16 projections and norms
    assert args[None] - args[1] == pytest.approx(layer / 2**20, abs=0.01), (args, layer)
    per_layer = adapters_per_layer(cfg) * 4 * 3  # fp32, mu, nu
    assert memory.adapter_bytes(memory.model_config("tiny", "fused LoRA")) == per_layer + 4
    with pytest.raises(ValueError, match="--layers must be at least 1, got 0"):
        memory.with_layers(0)


SCALING_ROW = re.compile(r"^\| tiny \| 8 \| 64 \| (LOMO|AdaLomo, clip 1\.0(?:, offload)?) "
                         r"\| ([\d.]+) \| – \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| – \|$",
                         re.M)


@COMPILES_FOR_GPU
def test_scaling_benchmark_runs(capsys, monkeypatch, gpu_compile_env):
    """The paper-table script on a toy row, compiled for 8 RTX 4090s (in this process:
    only its cpu target needs flags set before JAX starts): both methods'
    rows, the bound printed is tokens / max(FLOPs / peak, sent / link, host /
    host link) of the figures it prints (to their rounding), and clipping's
    second backward pass costs FLOPs and bytes."""
    scaling = load_benchmark("scaling")
    out = run_in_process(capsys, RUNS["scaling"], scaling)
    rows = {m[0]: [float(v) for v in m[1:]] for m in SCALING_ROW.findall(out)}
    assert set(rows) == {"LOMO", "AdaLomo, clip 1.0, offload"}, out
    peak, link = 165.2e12, 32e9
    for memory, tflop, sent, host, bound in rows.values():
        assert memory >= 0 and tflop >= 0 and sent >= 0 and host >= 0
    lomo, ada = rows["LOMO"], rows["AdaLomo, clip 1.0, offload"]
    assert ada[1] >= lomo[1] and ada[2] >= lomo[2]
    # the printed figures are rounded to 0.1 (0.0 at this size): the bound's formula,
    # on figures given to scaling.figures directly
    fake = type("Compiled", (), {})()
    monkeypatch.setattr(scaling.hlo_cost, "matmul_flops", lambda c: 3.3e15)
    monkeypatch.setattr(scaling.hlo_cost, "bytes_sent", lambda c: 2.0 * 2**30)
    monkeypatch.setattr(scaling.hlo_cost, "host_bytes", lambda c: 3 * 2**30)
    monkeypatch.setattr(scaling.aot.MemoryFigures, "of", lambda c: scaling.aot.MemoryFigures(
        2**30, 2**30, 2**30, 2**30))
    fig = scaling.figures(fake, 1024, "rtx4090")
    assert fig["memory"] == 2 and fig["tflop"] == pytest.approx(3300) and fig["sent"] == 2
    assert fig["host"] == 3
    assert fig["bound"] == pytest.approx(1024 / max(3.3e15 / peak, 2 * 2**30 / link))
    monkeypatch.setattr(scaling.hlo_cost, "host_bytes", lambda c: 400 * 2**30)  # host-bound
    h100 = scaling.figures(fake, 1024, "h100")
    assert h100["bound"] == pytest.approx(1024 / (400 * 2**30 / 64e9))
    assert scaling.figures(fake, 1024, "cpu")["bound"] is None


def test_precision_benchmark_runs(capsys):
    """fp32, bf16 nearest, bf16 stochastic from one checkpoint: the columns are the
    ratios they claim, and even 4 steps show nearest losing the update that
    stochastic rounding keeps."""
    out = run_in_process(capsys, RUNS["precision"])
    rows = {cells[3]: cells for cells in table_rows(out) if cells[0] == "jax"}
    assert set(rows) == {"fp32", "bf16 nearest", "bf16 stochastic"}, out
    red = {k: float(v[5]) for k, v in rows.items()}
    for k, v in rows.items():
        assert abs(float(v[6]) - red[k] / red["fp32"]) < 0.006, v  # printed to 2 decimals
    assert float(rows["fp32"][7].rstrip("%")) > 99  # fp32: every weight moves every step
    assert red["fp32"] > 0 and red["bf16 stochastic"] > 0.5 * red["fp32"], red
    assert red["bf16 stochastic"] > 2 * max(red["bf16 nearest"], 0.0), red


def test_stability_benchmark_runs(capsys, tmp_path):
    """Plain LOMO with gradient spikes, tiny: the table has a row per arm (none, global
    with its 2 passes, adaptive) and every column, its numbers are finite but for the
    unclipped spiked run's (a x1000 spike may wreck it), the plot is written, and at the
    x1000 spike the unclipped step moves the weights far more than the adaptive one."""
    results = load_benchmark("stability").main(RUNS["stability"][1:] + ["--out", str(tmp_path)])
    capsys.readouterr()
    text = (tmp_path / "stability.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| clipping"))
    columns = [c.strip() for c in header.split("|")[1:-1]]
    assert len(columns) == 11 and "max rel. Δw, loss x1000" in columns, header
    rows = {cells[0]: cells for cells in table_rows(text) if cells[0] != "clipping"}
    assert set(rows) == {"none", "global", "adaptive"}, text
    assert [rows[a][1] for a in ("none", "global", "adaptive")] == ["1", "2", "1"]
    for arm, cells in rows.items():
        assert len(cells) == len(columns), cells
        numbers = [float(c.split(" ± ")[0]) for c in cells[2:]]
        wrecked = (4, 5, 8, 9) if arm == "none" else ()  # spiked held-out figures, x100, x1000
        assert all(math.isfinite(x) for i, x in enumerate(numbers, 2) if i not in wrecked), cells
    assert (tmp_path / "stability.png").stat().st_size > 0
    spike = {arm: results[arm]["at_spike"]["loss x1000"][0] for arm in results}
    assert spike["none"] > 10 * spike["adaptive"], spike


def test_stability_refuses_a_warmup_past_the_first_spike():
    """The adaptive arm's warm-up must end by the first spike (else the spike meets the
    warm-up's absolute bound, not the adaptive rule the benchmark claims to test)."""
    stability = load_benchmark("stability")
    with pytest.raises(SystemExit):
        stability.parse_args(["--steps", "12", "--adaptive-warmup", "5"])
    assert stability.parse_args(["--steps", "12", "--adaptive-warmup", "4"]).adaptive_warmup == 4


def test_packages_import_without_the_other_framework():
    """A PyTorch-only user needs no JAX, a JAX-only user no torch: importing one package
    imports nothing of the other framework."""
    code = "import sys, {pkgs}; assert '{other}' not in sys.modules"
    # one process for lomo_jax and its LLaMA (the latter imports the former first)
    for pkgs, other in (("lomo_torch", "jax"), ("lomo_jax, lomo_jax.models.llama", "torch")):
        proc = subprocess.run([sys.executable, "-c", code.format(pkgs=pkgs, other=other)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"importing {pkgs} imported {other}:\n{proc.stderr[-2000:]}"
