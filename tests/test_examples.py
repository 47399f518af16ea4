"""Every example runs, on its tiny configuration, so none can rot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The main job, finetune_llama.py, runs as a user runs it in tests/test_main_job.py.
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py") if p.name != "finetune_llama.py")
# each example as is, and the variants a user switches to with a flag
RUNS = [(name, []) for name in EXAMPLES] + [("torch_finetune.py", ["--trainer"])]


@pytest.mark.parametrize("name,args", RUNS, ids=[" ".join([n, *a]) for n, a in RUNS])
def test_example_runs_tiny(name, args, tmp_path):
    env = dict(os.environ, LOMO_EXAMPLES_TINY="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
