"""The GPU check (issue 31): do the compiled figures hold on a real card?

On a machine with a CUDA GPU, one command measures:

1. **memory**: the fused LOMO step's real peak (``jax.devices()[0].memory_stats()
   ['peak_bytes_in_use']``) beside its compiled ``memory_analysis()`` total, at LLaMA-7B
   8 x 512 and Llama-3-8B 1 x 1024 / 2 x 2048 with random bf16 weights
   (``benchmarks/memory.py``'s models and step builders), and
2. **speed**: tokens/s of the fused step with no clipping, global clipping (two backward
   passes) and adaptive clipping (``lomo_jax.adaptive_clip``, one pass), and of
   ``value_and_grad`` + AdamW, each where it fits: a case whose compiled total (plus
   ``--margin-gib``) exceeds the card's free memory is reported as
   ``skipped: needs X GiB, card has Y``. Each case runs in its own process, so each peak
   is that case's (JAX cannot reset a peak); the weights are drawn one slice at a time,
   so drawing them adds at most one slice's temporaries to the peak;
3. **torch**: lomo_torch against lomo-optim (tokens/s and ``torch.cuda.max_memory_allocated``)
   on a transformers ``LlamaForCausalLM`` built from a config
   (``benchmarks/torch_step.py``'s model and steps);
4. **tests**: the CUDA-only torch tests (every test file that asks
   ``torch.cuda.is_available()``), with pytest's pass/skip counts;
5. a Markdown table of all of it in ``--out`` (default ``benchmarks/results/gpu.md``).

Without a CUDA GPU it checks its arguments, says that no CUDA GPU was found (for JAX and
for torch, each) and exits 0; with one framework's GPU only, it runs that framework's parts.

Run:  python benchmarks/gpu.py                 (all parts)
      python benchmarks/gpu.py --parts memory --settings 7b-8x512 --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
USER_JAX_PLATFORMS = os.environ.get("JAX_PLATFORMS")  # memory.py sets cpu for its own use
# (model in benchmarks/memory.py's MODELS, batch, sequence)
SETTINGS = {"7b-8x512": ("LLaMA-7B", 8, 512), "8b-1x1024": ("Llama-3-8B", 1, 1024),
            "8b-2x2048": ("Llama-3-8B", 2, 2048), "tiny": ("tiny", 2, 64)}
DEFAULT_SETTINGS = ["7b-8x512", "8b-1x1024", "8b-2x2048"]
METHODS = ("fused LOMO", "fused LOMO, clip global", "fused LOMO, clip adaptive",
           "value_and_grad + AdamW")
PARTS = ("memory", "torch", "tests")
# benchmarks/torch_step.py's flags for the torch part: a ~0.5B transformers Llama in fp32
TORCH_ARGV = ["--model", "llama", "--layers", "8", "--hidden", "2048", "--intermediate", "5504",
              "--heads", "16", "--seq", "512", "--batch", "4", "--device", "cuda"]
RESULT = "RESULT "  # a case's process prints its figures as this prefix + JSON


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="memory: the fused step's peak, compiled total and tokens/s (JAX); "
                    "torch: lomo_torch vs lomo-optim; tests: the CUDA-only torch tests")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=DEFAULT_SETTINGS)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--steps", type=int, default=5, help="timed steps a case (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--margin-gib", type=float, default=1.0,
                    help="free memory a case must leave beyond its compiled total")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"),
                    help="the Markdown report")
    ap.add_argument("--case", nargs=2, metavar=("SETTING", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    problem = args_problem(args)
    if problem:
        ap.error(problem)
    return args


def args_problem(args):
    """What is wrong with ``args``, or None."""
    if args.steps < 1:
        return f"--steps must be >= 1, got {args.steps}"
    if args.warmup < 0:
        return f"--warmup must be >= 0, got {args.warmup}"
    if not args.margin_gib >= 0:
        return f"--margin-gib must be >= 0, got {args.margin_gib}"
    if Path(args.out).is_dir():
        return f"--out {args.out} is a directory; give the report's file name"
    if args.case and (args.case[0] not in SETTINGS or args.case[1] not in METHODS):
        return f"--case {' '.join(args.case)}: unknown setting or method"
    return None


# ------------------------------------------------------------ arithmetic -----

def fit_problem(needed, free, margin):
    """``skipped: needs X GiB, card has Y`` when ``needed + margin`` bytes exceed ``free``
    bytes, else None."""
    if needed + margin <= free:
        return None
    return (f"skipped: needs {(needed + margin) / GIB:.1f} GiB "
            f"({needed / GIB:.1f} + {margin / GIB:.1f} margin), card has {free / GIB:.1f} free")


def tokens_per_s(batch, seq, seconds):
    """Trained tokens a second of a ``batch x seq`` step taking ``seconds``."""
    return batch * seq / seconds


def fill_rows(shape, itemsize, cap=64 * 2**20):
    """Rows of axis 0 drawn at a time: the largest divisor of ``shape[0]`` whose block
    (in fp32, ``itemsize`` 4) stays under ``cap`` bytes, at least 1."""
    row = itemsize
    for d in shape[1:]:
        row *= d
    best = 1
    for k in range(1, shape[0] + 1):
        if shape[0] % k == 0 and k * row <= cap:
            best = k
    return best


# ------------------------------------------------------------- markdown -----

def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path, title, sections):
    """``sections``: ``(heading, header, rows, note)`` each; writes and returns the text."""
    text = [f"# {title}", ""]
    for heading, header, rows, note in sections:
        text += [f"## {heading}", "", markdown_table(header, rows), ""]
        if note:
            text += [note, ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(text))
    return "\n".join(text)


def gib(x):
    return "-" if x is None else f"{x / GIB:.2f}"


def memory_rows(results):
    """Rows of the memory/speed table from the case results."""
    rows = []
    for r in results:
        if "skipped" in r or "error" in r:
            rows.append([r["setting"], r["method"], gib(r.get("compiled")), "-", "-", "-",
                         r.get("skipped") or r["error"]])
            continue
        ratio = r["peak"] / r["compiled"] if r["peak"] else None
        note = "peak set while drawing the weights" if r["peak"] == r["init_peak"] else ""
        rows.append([r["setting"], r["method"], gib(r["compiled"]), gib(r["peak"]),
                     "-" if ratio is None else f"{ratio:.3f}", f"{r['tokens_per_s']:,.0f}", note])
    return rows


# ---------------------------------------------------------------- status -----

def gpu_status():
    """``(jax_gpu, torch_gpu)``: each a description of the first CUDA device, or None."""
    import jax

    try:
        jax_gpu = str(jax.devices("gpu")[0])
    except RuntimeError:
        jax_gpu = None
    try:
        import torch
    except ImportError:
        torch_gpu = None
    else:
        torch_gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return jax_gpu, torch_gpu


@contextlib.contextmanager
def benchmark_import_env():
    """benchmarks/ on ``sys.path`` and the environment restored after the import
    (benchmarks/memory.py sets ``JAX_PLATFORMS`` and ``TF_CPP_MIN_LOG_LEVEL`` for its own
    compile-only use; the case processes must see the user's)."""
    saved = dict(os.environ)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        os.environ.clear()
        os.environ.update(saved)


def import_benchmark(name):
    """``benchmarks/<name>.py`` as a module (``memory``, ``torch_step``)."""
    with benchmark_import_env():
        return importlib.import_module(name)


def child_env():
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get(
        "XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95"))
    env.pop("JAX_PLATFORMS", None)
    if USER_JAX_PLATFORMS is not None:
        env["JAX_PLATFORMS"] = USER_JAX_PLATFORMS
    return env


# ------------------------------------------------- one case (own process) -----

def random_params(cfg, seed=0):
    """bf16 (``cfg.param_dtype``) random weights shaped like ``llama.param_shapes(cfg)``:
    normal x 0.02, norm scales 1; each leaf drawn :func:`fill_rows` rows at a time into its
    buffer, so the device holds the weights plus one block's temporaries at most."""
    import jax
    import jax.numpy as jnp
    from lomo_jax.models import llama

    fill = _filler()
    flat, treedef = jax.tree_util.tree_flatten_with_path(llama.param_shapes(cfg))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    leaves = []
    for key, (path, s) in zip(keys, flat):
        if "norm" in jax.tree_util.keystr(path):
            leaves.append(jnp.ones(s.shape, s.dtype))
        else:
            leaves.append(fill(key, tuple(s.shape), s.dtype, fill_rows(s.shape, 4)))
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.lru_cache(maxsize=None)
def _filler():
    """``fill(key, shape, dtype, rows)``: a ``shape`` array of normal x 0.02 drawn ``rows``
    rows at a time into its buffer (jitted once a process, JAX imported on first use)."""
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def fill(key, shape, dtype, rows):
        def body(i, out):
            block = 0.02 * jax.random.normal(jax.random.fold_in(key, i), (rows, *shape[1:]))
            return jax.lax.dynamic_update_slice_in_dim(out, block.astype(dtype), i * rows, 0)

        return jax.lax.fori_loop(0, shape[0] // rows, body, jnp.zeros(shape, dtype))

    return fill


def lowered_case(method, cfg, b, t):
    """``(lowered step, init)`` of ``method`` on abstract bf16 weights and a ``b x t`` batch,
    built by benchmarks/memory.py (``fused``, ``value_and_grad_adamw``)."""
    import jax
    import jax.numpy as jnp
    import optax
    import lomo_jax
    from lomo_jax import aot
    from lomo_jax.models import llama

    memory = import_benchmark("memory")
    model = llama.llama_layered_model(cfg)
    params = aot.abstract(llama.param_shapes(cfg), None)
    batch = aot.abstract({"input_ids": jax.ShapeDtypeStruct((b, t), jnp.int32)}, None)
    if method == "value_and_grad + AdamW":
        return memory.value_and_grad_adamw(model, params, batch, None), optax.adamw(1e-5).init
    tx = lomo_jax.lomo(1e-5)
    if method.endswith("adaptive"):
        tx = optax.chain(lomo_jax.adaptive_clip(), tx)
    kw = {"clip_grad_norm": 1.0} if method.endswith("global") else {}
    return (memory.fused(tx, **kw)(model, params, batch, None),
            lambda p: lomo_jax.fused_init(tx, p))


def run_case(setting, method, steps, warmup, margin_gib):
    """One case's figures: compiled total, then (if it fits the device's free memory) the
    real peak and tokens/s of ``steps`` timed steps on random weights."""
    import jax
    import numpy as np

    from lomo_jax import aot

    memory = import_benchmark("memory")
    name, b, t = SETTINGS[setting]
    lowered, init = lowered_case(method, memory.MODELS[name], b, t)
    compiled = lowered.compile()
    total = aot.MemoryFigures.of(compiled).total
    result = {"setting": setting, "method": method, "compiled": total}
    stats = jax.devices()[0].memory_stats()
    if stats is not None:
        free = stats["bytes_limit"] - stats["bytes_in_use"]
        skipped = fit_problem(total, free, margin_gib * GIB)
        if skipped:
            return {**result, "skipped": skipped}
    params = random_params(memory.MODELS[name])
    state = init(params)
    ids = np.random.default_rng(0).integers(0, memory.MODELS[name].vocab_size, (b, t))
    batch = {"input_ids": jax.numpy.asarray(ids, np.int32)}
    jax.block_until_ready((params, state))
    init_peak = peak_bytes()
    seconds = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        params, state, out = compiled(params, state, batch)
        jax.block_until_ready((params, state, out))
        if i >= warmup:
            seconds.append(time.perf_counter() - t0)
    return {**result, "peak": peak_bytes(), "init_peak": init_peak,
            "tokens_per_s": tokens_per_s(b, t, statistics.median(seconds))}


def peak_bytes():
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats["peak_bytes_in_use"]


def run_case_main(argv=None):
    """``--case SETTING METHOD``: print the case's figures as one ``RESULT {json}`` line."""
    args = parse_args(argv)
    result = run_case(*args.case, args.steps, args.warmup, args.margin_gib)
    print(RESULT + json.dumps(result), flush=True)
    return 0


def isolated_case(setting, method, args):
    """:func:`run_case` in a process of its own (its peak is its own)."""
    cmd = [sys.executable, __file__, "--case", setting, method, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--margin-gib", str(args.margin_gib)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"setting": setting, "method": method, "error": f"failed (rc {proc.returncode}): {tail}"}


# ----------------------------------------------------------------- parts -----

def memory_section(args):
    results = []
    for setting in args.settings:
        for method in args.methods:
            results.append(isolated_case(setting, method, args))
            print(json.dumps(results[-1]), flush=True)
    return ("fused step: real peak vs compiled total, and tokens/s (JAX, random bf16 weights)",
            ["setting", "method", "compiled GiB", "peak GiB", "peak / compiled", "tokens/s",
             "note"], memory_rows(results),
            f"median of {args.steps} steps after {args.warmup}; compiled = XLA memory_analysis "
            "(args + out + temp - aliased); peak = memory_stats()['peak_bytes_in_use'] of the "
            "case's own process.")


def torch_section(args):
    """lomo_torch vs lomo-optim, Lomo and AdaLomo, one model on the card at a time."""
    import copy

    import torch

    import lomo_torch

    ts = import_benchmark("torch_step")
    targs = ts.parse_args([*TORCH_ARGV, "--repeats", str(args.steps), "--warmup",
                           str(args.warmup)])
    device = torch.device("cuda")
    libraries = {"lomo_torch": lomo_torch, "lomo-optim": ts.import_lomo_optim(device)}
    base, batches, description = ts.build(targs)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    rows = []
    for opt_name in ("Lomo", "AdaLomo"):
        for lib_name, lib in libraries.items():
            model = copy.deepcopy(base).to(device)
            opt = getattr(lib, opt_name)(model, lr=ts.LR)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ms = ts.median_ms({"step": ts.fused_step(model, opt, False)}, batches,
                              targs.warmup, device)["step"]
            peak = torch.cuda.max_memory_allocated()
            rows.append([opt_name, lib_name, f"{ms:.1f}",
                         f"{tokens_per_s(targs.batch, targs.seq, ms / 1e3):,.0f}", gib(peak)])
            del model, opt
            torch.cuda.empty_cache()
    return (f"torch: lomo_torch vs lomo-optim ({torch.cuda.get_device_name(0)})",
            ["optimizer", "library", "ms / step", "tokens/s", "peak GiB"], rows, description)


def cuda_test_files(root=ROOT):
    """The test files that ask ``torch.cuda.is_available()`` (their CUDA cases skip
    without a GPU), relative to ``root``."""
    files = [p for d in ("tests", "parity_tests") for p in sorted((root / d).rglob("test_*.py"))
             if "cuda.is_available" in p.read_text()]
    return [str(p.relative_to(root)) for p in files]


def pytest_counts(output):
    """``{"passed": n, "skipped": n, ...}`` from pytest's summary line."""
    lines = [s for s in output.splitlines() if re.search(r"\d+ (passed|failed|error)", s)]
    if not lines:
        return {}
    return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", lines[-1])}


def tests_section(args):
    files = cuda_test_files()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-q", "-rs", *files],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True)
    counts = pytest_counts(proc.stdout)
    rows = [[" ".join(files), counts.get("passed", 0), counts.get("failed", 0)
             + counts.get("error", 0) + counts.get("errors", 0), counts.get("skipped", 0),
             proc.returncode]]
    return ("the CUDA-only torch tests", ["files", "passed", "failed", "skipped", "rc"], rows,
            "a skipped case here is a CUDA case that did not run: read `pytest -rs`'s reasons.")


def main(argv=None):
    args = parse_args(argv)
    jax_gpu, torch_gpu = gpu_status()
    print("JAX: " + (jax_gpu or "no CUDA GPU found (jax.devices('gpu') has none)"))
    print("torch: " + (torch_gpu or "no CUDA GPU found (torch.cuda.is_available() is False)"))
    parts = {"memory": (jax_gpu, memory_section), "torch": (torch_gpu, torch_section),
             "tests": (torch_gpu, tests_section)}
    sections = [run(args) for name, (gpu, run) in parts.items() if gpu and name in args.parts]
    if not sections:
        print("nothing to measure without a CUDA GPU; exiting.")
        return 0
    title = f"GPU check: {jax_gpu or torch_gpu}, {time.strftime('%Y-%m-%d')}"
    print(write_report(args.out, title, sections))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_case_main() if "--case" in sys.argv else main())
