"""lomo_torch.checkpoint: bit-exact resume (Lomo, AdaLomo, fp16 loss scaler,
tied weights, LR scheduler, dropout RNG), atomicity under SIGKILL, errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import lomo_torch
from lomo_torch import checkpoint
from tests.torch.helpers import MLP, TiedLM, mlp_batches, snapshot

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DropTiedLM(TiedLM):
    """TiedLM (embedding tied to the head) with dropout: the run draws from
    torch's global RNG, so an exact resume needs the RNG state too."""

    def forward(self, ids, targets):
        h = F.dropout(torch.tanh(self.mix(self.embed(ids))), p=0.2, training=True)
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lm_batches(n, seed=5, vocab=13):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (4, 6), generator=g),
             torch.randint(0, vocab, (4, 6), generator=g)) for _ in range(n)]


CONFIGS = {
    "Lomo": dict(weight_decay=0.01, clip_grad_norm=0.5, clip_grad_value=0.05),
    "AdaLomo": dict(weight_decay=0.01, clip_grad_norm=0.5),
}


def make(opt_name, seed):
    torch.manual_seed(seed)
    model = DropTiedLM()
    opt = getattr(lomo_torch, opt_name)(model, lr=0.05, **CONFIGS[opt_name])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)
    return model, opt, sched


def run(model, opt, sched, batches, lo, hi):
    for i in range(lo, hi):
        loss = model(*batches[i])
        opt.grad_norm(loss)
        opt.fused_backward(loss)  # lr from the scheduler
        sched.step()


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_resume_is_bit_exact(tmp_path, opt_name):
    n, k = 6, 3
    batches = lm_batches(n)

    model, opt, sched = make(opt_name, 0)
    torch.manual_seed(42)
    run(model, opt, sched, batches, 0, n)
    straight, straight_opt = snapshot(model), opt.state_dict()

    model, opt, sched = make(opt_name, 0)
    torch.manual_seed(42)
    run(model, opt, sched, batches, 0, k)
    path = checkpoint.save_checkpoint(tmp_path, k, model, opt, scheduler=sched,
                                      metadata={"data_position": k})
    assert os.path.basename(path) == f"step_{k:08d}"
    del model, opt, sched

    # a fresh process: other weights, other RNG state, all overwritten
    model, opt, sched = make(opt_name, 7)
    torch.manual_seed(0)
    meta = checkpoint.load_checkpoint(tmp_path, model, opt, scheduler=sched)
    assert meta == {"data_position": k, "step": k}
    assert model.head.weight is model.embed.weight  # still tied, hooks intact
    assert opt.step_num == k
    run(model, opt, sched, batches, meta["data_position"], n)

    assert_same(snapshot(model), straight)
    resumed_opt = opt.state_dict()
    assert resumed_opt["step"] == straight_opt["step"] and resumed_opt["lr"] == straight_opt["lr"]
    for name, entry in straight_opt["state"].items():
        for key, value in entry.items():
            assert torch.equal(resumed_opt["state"][name][key], value), (name, key)


@pytest.mark.parametrize("opt_name", ["Lomo", "AdaLomo"])
def test_fp16_resume_keeps_loss_scaler_bit_exact(tmp_path, opt_name):
    """fp16 parameters: dynamic loss scaling with a short window; the scale
    grows to 2**16, where the fp16 loss times the scale overflows, so steps are
    skipped and the scale halves again - and the run is saved mid-window. (The
    loss leaves the fp16 graph through a cast, whose gradient is the scale in fp16;
    an fp16 loss itself is seeded with at most 2**15 and would never overflow.)"""
    n, k = 8, 4
    batches = mlp_batches(n, dtype=torch.float16)
    kw = dict(lr=0.05, loss_scale_args={"init_scale": 2.0**15, "scale_window": 3},
              clip_grad_norm=1.0)
    if opt_name == "AdaLomo":
        kw["loss_scale"] = 2.0**15
        kw["loss_scale_args"] = {"scale_window": 3}

    def make16(seed):
        torch.manual_seed(seed)
        model = MLP().half()
        return model, getattr(lomo_torch, opt_name)(model, **kw)

    def go(model, opt, lo, hi, updated):
        for i in range(lo, hi):
            loss = model(*batches[i]).float()
            opt.grad_norm(loss)
            updated.append(opt.fused_backward(loss, 0.05))

    model, opt = make16(0)
    straight_updates = []
    go(model, opt, 0, n, straight_updates)
    assert not all(straight_updates[:k]) and any(straight_updates[:k]), straight_updates
    straight, straight_scaler = snapshot(model), opt.loss_scaler.state_dict()

    model, opt = make16(0)
    go(model, opt, 0, k, [])
    saved_scaler = opt.loss_scaler.state_dict()
    checkpoint.save_checkpoint(tmp_path, k, model, opt, metadata={"data_position": k})

    model, opt = make16(1)
    meta = checkpoint.load_checkpoint(tmp_path, model, opt)
    assert opt.loss_scaler.state_dict() == saved_scaler
    resumed_updates = []
    go(model, opt, meta["data_position"], n, resumed_updates)
    assert resumed_updates == straight_updates[k:]
    assert_same(snapshot(model), straight)
    assert opt.loss_scaler.state_dict() == straight_scaler


def test_tied_weight_is_stored_once(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = TiedLM()
    path = checkpoint.save_checkpoint(tmp_path, 1, model)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len({"embed.weight", "head.weight"} & keys) == 1
    torch.manual_seed(1)
    other = TiedLM()
    checkpoint.load_checkpoint(tmp_path, other)
    assert other.head.weight is other.embed.weight
    assert_same(snapshot(other), snapshot(model))


# --------------------------------------------------------------------------
# Atomicity
# --------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import lomo_torch
    from lomo_torch import checkpoint
    from tests.torch.helpers import MLP, mlp_batches

    directory = sys.argv[1]
    torch.manual_seed(0)
    model = MLP()
    opt = lomo_torch.AdaLomo(model, lr=0.01)
    for x, y in mlp_batches(2):
        opt.fused_backward(model(x, y))
    checkpoint.save_checkpoint(directory, 1, model, opt, metadata={"data_position": 1})
    torch.save({k: v.clone() for k, v in model.state_dict().items()},
               os.path.join(directory, "expected_1.pt"))
    print("committed 1", flush=True)
    for x, y in mlp_batches(1, seed=9):
        opt.fused_backward(model(x, y))

    def killed_replace(src, dst):  # every file is written; die before the commit
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.os.replace = killed_replace
    checkpoint.save_checkpoint(directory, 2, model, opt, metadata={"data_position": 2})
    print("not reached", flush=True)
    """
)


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.strip() == "committed 1"
    tmp_dirs = [d for d in os.listdir(tmp_path) if d.startswith(".tmp-step_00000002")]
    assert tmp_dirs and set(os.listdir(tmp_path / tmp_dirs[0])) == {
        "model.safetensors", "train_state.pt", "meta.json"}
    assert checkpoint.all_steps(tmp_path) == [1] and checkpoint.latest_step(tmp_path) == 1

    torch.manual_seed(5)
    model = MLP()
    opt = lomo_torch.AdaLomo(model, lr=0.01)
    assert checkpoint.load_checkpoint(tmp_path, model, opt) == {"data_position": 1, "step": 1}
    assert opt.step_num == 2
    assert_same(model.state_dict(), torch.load(tmp_path / "expected_1.pt", weights_only=True))
    # the next save removes the leftover and commits
    checkpoint.save_checkpoint(tmp_path, 2, model, opt)
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".tmp")]
    assert checkpoint.all_steps(tmp_path) == [1, 2]


_PRUNE_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from lomo_torch import checkpoint
    from tests.torch.helpers import MLP

    directory, last_file = sys.argv[1], sys.argv[2]
    model = MLP()

    def save(step):
        with torch.no_grad():
            model.fc1.bias.fill_(step)
        checkpoint.save_checkpoint(directory, step, model, metadata={"s": step}, max_to_keep=2)

    for step in (1, 2):
        save(step)
        print("committed", step, flush=True)
    unlink = os.unlink

    def killing_unlink(path, *a, **k):  # die half-way through deleting a step
        if 1 in checkpoint.all_steps(directory):
            print("step 1 listed while its files are deleted", flush=True)
        unlink(path, *a, **k)
        if os.path.basename(os.fsdecode(path)) == last_file:
            os.kill(os.getpid(), signal.SIGKILL)

    os.unlink = killing_unlink
    save(3)  # prunes step 1
    print("not reached", flush=True)
    """
)


@pytest.mark.parametrize("last_file", ["model.safetensors", "meta.json"])
def test_sigkill_while_pruning_never_lists_a_half_deleted_step(tmp_path, last_file):
    """max_to_keep=2: the save of step 3 prunes step 1 and is killed right
    after one of step 1's files is unlinked (the weights: a listed step that
    could not load; the metadata: an orphan directory). Step 1 is not listed
    (it was unlisted before its first file went), 2 and 3 load, and the next
    save removes what is left of step 1."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _PRUNE_CHILD, str(tmp_path), last_file], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.split() == ["committed", "1", "committed", "2"]
    assert checkpoint.all_steps(tmp_path) == [2, 3]
    for s in (2, 3):
        model = MLP()
        assert checkpoint.load_checkpoint(tmp_path, model, step=s) == {"s": s, "step": s}
        assert torch.all(model.fc1.bias == s)
    checkpoint.save_checkpoint(tmp_path, 4, MLP(), max_to_keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step_00000003", "step_00000004"]


def test_incomplete_step_directory_is_no_checkpoint(tmp_path):
    """A step_<n> missing a file (left by a deletion killed before pruning
    renamed first, or damaged) is not listed, not loadable by number, and the
    next save removes it, also when it has the number being saved."""
    model = MLP()
    for s in (1, 2):
        checkpoint.save_checkpoint(tmp_path, s, model)
    os.remove(tmp_path / "step_00000001" / "model.safetensors")
    os.remove(tmp_path / "step_00000002" / "meta.json")
    assert checkpoint.all_steps(tmp_path) == [] and checkpoint.latest_step(tmp_path) is None
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 1 .*available: \[\]"):
        checkpoint.load_checkpoint(tmp_path, MLP(), step=1)
    checkpoint.save_checkpoint(tmp_path, 2, model)
    assert sorted(os.listdir(tmp_path)) == ["step_00000002"]
    assert checkpoint.all_steps(tmp_path) == [2]


def test_pruning_that_fails_warns_and_keeps_the_step(tmp_path, monkeypatch):
    model = MLP()
    checkpoint.save_checkpoint(tmp_path, 1, model)

    def no_rename(src, dst):
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr(checkpoint.os, "rename", no_rename)
    with pytest.warns(UserWarning, match=r"could not delete .*step_00000001.*Permission denied"):
        checkpoint.save_checkpoint(tmp_path, 2, model, max_to_keep=1)
    monkeypatch.undo()
    assert checkpoint.all_steps(tmp_path) == [1, 2]
    assert checkpoint.load_checkpoint(tmp_path, MLP(), step=1) == {"step": 1}


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = MLP()
    opt = lomo_torch.Lomo(model, lr=0.01)
    checkpoint.save_checkpoint(tmp_path, 1, model, opt)

    def broken_save(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path, 2, model, opt)
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]


def test_max_to_keep(tmp_path):
    model = MLP()
    for s in range(1, 6):
        checkpoint.save_checkpoint(tmp_path, s, model, max_to_keep=2)
    assert checkpoint.all_steps(tmp_path) == [4, 5]
    with open(tmp_path / "step_00000005" / "meta.json") as f:
        assert json.load(f)["step"] == 5


def test_errors_name_the_problem(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    opt = lomo_torch.AdaLomo(model, lr=0.01)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.load_checkpoint(tmp_path, model)
    checkpoint.save_checkpoint(tmp_path, 3, model, opt)
    with pytest.raises(FileExistsError, match="never overwritten"):
        checkpoint.save_checkpoint(tmp_path, 3, model, opt)
    with pytest.raises(FileNotFoundError, match=r"step 4.*available: \[3\]"):
        checkpoint.load_checkpoint(tmp_path, model, step=4)
    with pytest.raises(RuntimeError, match="size mismatch for fc1.weight"):
        checkpoint.load_checkpoint(tmp_path, MLP(d_hidden=32))
    with pytest.raises(ValueError, match="from AdaLomo, cannot load it into Lomo"):
        checkpoint.load_checkpoint(tmp_path, MLP(), lomo_torch.Lomo(MLP()))
    with pytest.raises(TypeError, match="JSON"):
        checkpoint.save_checkpoint(tmp_path, 4, model, metadata={"x": object()})
    with pytest.raises(TypeError, match="nn.Module"):
        checkpoint.save_checkpoint(tmp_path, 4, {"w": torch.zeros(2)})
    checkpoint.save_checkpoint(tmp_path, 5, model)  # no optimizer state
    with pytest.raises(ValueError, match="without optimizer state"):
        checkpoint.load_checkpoint(tmp_path, model, opt)
