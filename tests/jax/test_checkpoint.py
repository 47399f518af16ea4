"""Checkpoint/resume with lomo_jax.checkpoint (orbax): bit-exact resumption of
the fused and the unfused path, atomicity under SIGKILL, clear errors.

"Bit-exact" compares the raw bytes of every parameter and state leaf of a run
stopped after k steps, saved, restored into freshly initialised (different)
arrays and continued to n steps, with those of an uninterrupted n-step run.
"""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lomo_jax
from lomo_jax import checkpoint
from lomo_jax.fused import fused_init, fused_train_step
from tests.jax.builders import make_batch, make_model, make_params, reference_step

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bits(tree):
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append((jax.tree_util.keystr(path), str(x.dtype), x.shape, np.asarray(x).tobytes()))
    return out


def committed(tree):
    """On device 0, committed: what restore returns, so the jitted steps see the
    same input signature before and after a restore (no recompilation)."""
    return jax.device_put(tree, jax.devices()[0])


def assert_bit_equal(a, b):
    ba, bb = bits(a), bits(b)
    assert [x[:3] for x in ba] == [x[:3] for x in bb]
    for x, y in zip(ba, bb):
        assert x[3] == y[3], f"leaf {x[0]} differs"


# --------------------------------------------------------------------------
# The fused path
# --------------------------------------------------------------------------

FUSED_CASES = {
    # fp32, AdaLomo (zero-size state leaves), clipping, a schedule, the guard's counter
    "fp32-adalomo": dict(
        dtype=jnp.float32,
        tx=lambda: lomo_jax.adalomo(optax.linear_schedule(5e-2, 1e-2, 6), weight_decay=0.01),
        init=dict(skip_nonfinite=True),
        step=dict(clip_grad_norm=0.5, skip_nonfinite=True),
    ),
    # fp16 with dynamic loss scaling: starts too high (skipped steps), window 2
    # (the scale grows again), so the saved loss-scale state is mid-window.
    "fp16-lomo-loss-scale": dict(
        dtype=jnp.float16,
        tx=lambda: lomo_jax.lomo(optax.linear_schedule(5e-2, 1e-2, 6)),
        init=dict(loss_scale=2.0**18),
        step=dict(clip_grad_norm=1.0, loss_scale_window=2),
    ),
    "tied-adamw": dict(
        dtype=jnp.float32, tied=True,
        tx=lambda: optax.adamw(optax.cosine_decay_schedule(1e-2, 8), weight_decay=0.01),
        init={}, step={},
    ),
}


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_fused_resume_is_bit_exact(tmp_path, case):
    cfg = FUSED_CASES[case]
    n, k = 7, 3
    tied = cfg.get("tied", False)
    model, tx = make_model(tied), cfg["tx"]()
    step = fused_train_step(model, tx, **cfg["step"])

    def start(seed):
        params = make_params(seed, dtype=cfg["dtype"], tied=tied)
        return committed((params, fused_init(tx, params, **cfg["init"])))

    # uninterrupted
    params, state = start(0)
    history = []
    for i in range(n):
        params, state, m = step(params, state, make_batch(i))
        history.append(m)
    straight = (params, state)
    if cfg["dtype"] == jnp.float16:
        skipped = [bool(m["skipped"]) for m in history]
        assert any(skipped[:k]) and not all(skipped[:k]), skipped

    # stopped after k steps
    params, state = start(0)
    for i in range(k):
        params, state, _ = step(params, state, make_batch(i))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(k, {"params": params, "opt_state": state},
                         metadata={"data_position": k})
    if cfg["dtype"] == jnp.float16:
        assert int(state.loss_scale.good_steps) > 0  # saved mid-window
    del params, state

    # a fresh process: different initial values, overwritten by the checkpoint
    params, state = start(1)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == k
        restored, meta = ckpt.restore({"params": params, "opt_state": state})
    params, state = restored["params"], restored["opt_state"]
    for i in range(meta["data_position"], n):
        params, state, _ = step(params, state, make_batch(i))

    assert_bit_equal((params, state), straight)


def test_restore_from_abstract_target(tmp_path):
    """jax.eval_shape of the initialisation is enough as a target."""
    tx = lomo_jax.adalomo(1e-2)
    params = make_params(0, dtype=jnp.bfloat16)
    state = fused_init(tx, params)
    checkpoint.save(tmp_path, 3, {"params": params, "opt_state": state}, metadata={"epoch": 1})
    target = jax.eval_shape(
        lambda: (lambda p: {"params": p, "opt_state": fused_init(tx, p)})(make_params(0, jnp.bfloat16))
    )
    restored, meta = checkpoint.restore(tmp_path, target)
    assert meta == {"epoch": 1}
    assert_bit_equal(restored, {"params": params, "opt_state": state})
    assert checkpoint.latest_step(tmp_path) == 3 and checkpoint.all_steps(tmp_path) == [3]


# --------------------------------------------------------------------------
# The unfused optax path (jax.value_and_grad), with a PRNG key in the state
# --------------------------------------------------------------------------


def test_unfused_resume_is_bit_exact(tmp_path):
    """value_and_grad + global-norm clipping + AdaLomo per layer (the unfused
    reference of the fused step), plus a plain optax.adamw run whose loss
    uses dropout driven by a PRNG key carried in the checkpoint."""
    n, k = 6, 3
    model = make_model()
    tx = lomo_jax.adalomo(optax.linear_schedule(5e-2, 1e-2, 6))
    ref = reference_step(model, tx, clip_grad_norm=0.5)
    adam = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.linear_schedule(1e-2, 1e-3, 6)))

    @jax.jit
    def adam_step(params, opt_state, key, batch):
        key, sub = jax.random.split(key)

        def loss(p):
            keep = jax.random.bernoulli(sub, 0.9, p["embed"]["tok"].shape)
            p = {**p, "embed": {"tok": jnp.where(keep, p["embed"]["tok"] / 0.9, 0.0)}}
            return model.loss(p, batch)

        g = jax.grad(loss)(params)
        u, opt_state = adam.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state, key

    def start(seed):
        p = make_params(seed)
        q = make_params(seed + 10)
        return committed({"ref": (p, fused_init(tx, p)),
                          "adam": (q, adam.init(q), jax.random.key(seed))})

    def run(s, lo, hi):
        (p, st), (q, ast, key) = s["ref"], s["adam"]
        for i in range(lo, hi):
            p, st, _ = ref(p, st, make_batch(i))
            q, ast, key = adam_step(q, ast, key, make_batch(i))
        return {"ref": (p, st), "adam": (q, ast, key)}

    straight = run(start(0), 0, n)
    first = run(start(0), 0, k)
    checkpoint.save(tmp_path, k, first, metadata={"data_position": k})
    restored, meta = checkpoint.restore(tmp_path, start(1))
    resumed = run(restored, meta["data_position"], n)
    assert_bit_equal(resumed, straight)


# --------------------------------------------------------------------------
# Atomicity: a save killed half-way leaves the previous checkpoint intact
# --------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from lomo_jax import checkpoint

    directory, mode = sys.argv[1], sys.argv[2]

    def state(step):
        return {"w": jnp.full((256, 1024), float(step), jnp.float32),
                "b": jnp.arange(7, dtype=jnp.int32) + step}

    keep = None if mode == "before-rename" else 2
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=keep)
    ckpt.save(1, state(1), metadata={"data_position": 1})
    print("committed 1", flush=True)
    if mode == "while-pruning":
        # step 3 prunes step 1: SIGKILL right after one of step 1's files
        # (its metadata) is unlinked, with the others still there.
        ckpt.save(2, state(2), metadata={"data_position": 2})
        print("committed 2", flush=True)
        unlink = os.unlink

        def killing_unlink(path, *a, **k):
            unlink(path, *a, **k)
            if os.path.basename(os.fsdecode(path)) == "metadata":
                os.kill(os.getpid(), signal.SIGKILL)

        os.unlink = killing_unlink
        ckpt.save(3, state(3), metadata={"data_position": 3})
        print("not reached", flush=True)
    elif mode == "before-rename":
        # SIGKILL after the arrays are written, right before orbax's commit
        # (the rename of the temporary directory).
        cls = ocp.path.atomicity.AtomicRenameTemporaryPath

        async def killed_finalize(self, *a, **k):
            os.kill(os.getpid(), signal.SIGKILL)

        cls.finalize = killed_finalize
        ckpt.save(2, state(2), metadata={"data_position": 2})
        print("not reached", flush=True)
    else:  # keep saving until killed from outside
        step = 2
        while True:
            ckpt.save(step, state(step), metadata={"data_position": step})
            print(f"committed {step}", flush=True)
            step += 1
    """
)


def _spawn(directory, mode):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(directory), mode],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )


def _check_all_restore(directory):
    target = {"w": jax.ShapeDtypeStruct((256, 1024), jnp.float32),
              "b": jax.ShapeDtypeStruct((7,), jnp.int32)}
    steps = checkpoint.all_steps(directory)
    assert steps and steps == list(range(steps[0], steps[0] + len(steps))), steps
    for s in steps:
        restored, meta = checkpoint.restore(directory, target, step=s)
        assert meta == {"data_position": s}
        assert np.all(np.asarray(restored["w"]) == s)
        np.testing.assert_array_equal(restored["b"], np.arange(7) + s)
    return steps


def test_sigkill_before_commit_keeps_previous_checkpoint(tmp_path):
    proc = _spawn(tmp_path, "before-rename")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out)
    assert out.split("\n")[0] == "committed 1" and "not reached" not in out
    # the half-written step 2 is there, but only as orbax's temporary directory
    leftovers = [d for d in os.listdir(tmp_path) if d.startswith("2.") and "tmp" in d]
    assert leftovers, os.listdir(tmp_path)
    assert _check_all_restore(tmp_path) == [1]
    # a new writer cleans the leftovers up and can write step 2 for real
    with checkpoint.Checkpointer(tmp_path, max_to_keep=None) as ckpt:
        ckpt.save(2, {"w": jnp.full((256, 1024), 2.0), "b": jnp.arange(7, dtype=jnp.int32) + 2},
                  metadata={"data_position": 2})
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]
    assert _check_all_restore(tmp_path) == [1, 2]


def test_sigkill_while_pruning_never_lists_a_half_deleted_step(tmp_path):
    """max_to_keep=2: the save of step 3 prunes step 1 and is killed half-way
    through deleting its files. Step 1 is no longer listed (it was unlisted
    before any file went); 2 and 3 restore; the next writer removes the rest."""
    proc = _spawn(tmp_path, "while-pruning")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out)
    assert out.split() == ["committed", "1", "committed", "2"], out
    assert _check_all_restore(tmp_path) == [2, 3]
    assert os.listdir(tmp_path / ".deleting") == ["1"]  # what the kill left
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert sorted(os.listdir(tmp_path)) == ["2", "3"]  # a writer removes it
        ckpt.save(4, {"w": jnp.full((256, 1024), 4.0), "b": jnp.arange(7, dtype=jnp.int32) + 4},
                  metadata={"data_position": 4})
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]  # no leftover of step 1
    assert _check_all_restore(tmp_path) == [3, 4]


def test_sigkill_at_an_arbitrary_moment(tmp_path):
    """An external SIGKILL while the child saves 1 MiB checkpoints in a loop
    with max_to_keep=2 (so also while pruning): every checkpoint that is
    listed restores exactly; nothing else shows; the next save leaves only
    checkpoints behind."""
    proc = _spawn(tmp_path, "loop")
    committed = []
    try:
        while len(committed) < 3:
            line = proc.stdout.readline()
            assert line, "child exited early"
            committed.append(int(line.split()[1]))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = _check_all_restore(tmp_path)
    # the kill may land after a commit but before its "committed" line
    assert steps[-1] in (committed[-1], committed[-1] + 1), (steps, committed)
    nxt = steps[-1] + 1
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        ckpt.save(nxt, {"w": jnp.full((256, 1024), float(nxt)),
                        "b": jnp.arange(7, dtype=jnp.int32) + nxt},
                  metadata={"data_position": nxt})
    assert sorted(os.listdir(tmp_path)) == sorted([str(nxt - 1), str(nxt)])


# --------------------------------------------------------------------------
# Options and errors
# --------------------------------------------------------------------------


def test_max_to_keep_and_async_save_before_donation(tmp_path):
    donate = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    x = jnp.zeros((1000,), jnp.float32)
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2, async_save=True) as ckpt:
        for s in range(1, 6):
            ckpt.save(s, {"x": x}, metadata={"s": s})
            x = donate(x)  # may donate the buffer while orbax writes in background
            # save s waited for save s-1, which pruned step s-3, then deleted it
            assert not (tmp_path / ".deleting" / str(s - 3)).exists()
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 5]
        assert sorted(os.listdir(tmp_path)) == ["4", "5"]  # pruned steps deleted
        for s in (4, 5):
            restored, meta = ckpt.restore({"x": x}, step=s)
            assert meta == {"s": s} and np.all(np.asarray(restored["x"]) == s - 1)


def test_errors_name_the_problem(tmp_path):
    tx = lomo_jax.lomo(1e-2)
    params = make_params()
    state = {"params": params, "opt_state": fused_init(tx, params)}
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.restore(tmp_path, state)
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state)
    with pytest.raises(ValueError, match="step 1 already exists"):
        ckpt.save(1, state)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7.*available: \[1\]"):
        ckpt.restore(state, step=7)
    # wrong shapes / dtypes / structure are named
    bad = make_params(n_layers=4)
    with pytest.raises(ValueError, match=r"state\['params'\]\['layers'\]\['b1'\]: saved float32\[3, 24\], target float32\[4, 24\]"):
        ckpt.restore({"params": bad, "opt_state": fused_init(tx, bad)})
    with pytest.raises(ValueError, match="bfloat16"):
        p16 = make_params(dtype=jnp.bfloat16)
        ckpt.restore({"params": p16, "opt_state": fused_init(tx, p16)})
    with pytest.raises(ValueError, match="tree structure differs.*nonfinite"):
        ckpt.restore({"params": params, "opt_state": fused_init(tx, params, skip_nonfinite=True)})
    # plain values belong in metadata
    with pytest.raises(TypeError, match="metadata="):
        ckpt.save(2, {"params": params, "epoch": 3})
    # a donated state cannot be saved; the message says why
    step = fused_train_step(make_model(), tx)
    new_params, new_state, _ = step(state["params"], state["opt_state"], make_batch(0))
    with pytest.raises(ValueError, match=r"state\['params'\].*deleted.*donated"):
        ckpt.save(2, state)
    ckpt.save(2, {"params": new_params, "opt_state": new_state})
    ckpt.close()
