"""lomo_torch under DistributedDataParallel and FSDP2 (fully_shard): 2 ranks on gloo/CPU.

Two processes (tests/torch/dist_worker.py) train on half of every batch; the
tests compare what they saved with a single-process run on the full batch (mean
losses over equal halves average to the full-batch mean).
"""

import filelock
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lomo_torch
from tests.torch import dist_worker
from tests.torch.helpers import MLP, assert_close_rel, mlp_batches

WORLD = 2
RTOL = 1e-6

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="session")
def ranks(request, tmp_path_factory):
    """What each rank saved; spawned once per test session, even under pytest-xdist."""
    base = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: share with the others
        base = base.parent
    out = base / "lomo_torch_dist"
    out.mkdir(exist_ok=True)
    files = [out / f"{r}.pt" for r in range(WORLD)]
    with filelock.FileLock(str(out / "lock")):
        if not all(f.exists() for f in files):
            mp.spawn(dist_worker.main, args=(WORLD, str(out / "init"), str(out)),
                     nprocs=WORLD, join=True)
    return [torch.load(f, weights_only=True) for f in files]


def check_run(ranks, ref, what, rtol=RTOL):
    """Same grad norms, taken/skipped steps and loss scale on every rank and as the reference."""
    for r in ranks:  # exactly the same on every rank: all ranks clip and skip alike
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(ranks[0]["norms"]),
                                   rtol=0, atol=0, equal_nan=True, msg=what)
        assert (r["taken"], r["step"], r["scaler"]) == (ref["taken"], ref["step"], ref["scaler"]), what
    torch.testing.assert_close(torch.tensor(ranks[0]["norms"]), torch.tensor(ref["norms"]),
                               rtol=rtol, atol=0, equal_nan=True, msg=what)


def test_ddp_matches_single_process(ranks):
    """DDP, each rank half of every batch == one process on the full batch, after 3 steps.

    Lomo and AdaLomo with norm clipping (two passes: the norm is that of the
    rank-averaged gradient), AdaLomo in one pass, and fp16 Lomo with dynamic
    loss scaling (an overflow skips step 1 on every rank). Replicas stay bitwise equal.
    """
    ranks = [r["ddp"] for r in ranks]
    for case, (_, kw, two_pass) in dist_worker.DDP_CASES.items():
        ref = dist_worker.single_process("ddp", case)
        rtol = 2e-3 if case.endswith("fp16") else RTOL  # fp16 parameters: fp16 rounding
        check_run([r[case] for r in ranks], ref, case, rtol)
        if two_pass:
            assert len(ref["norms"]) == dist_worker.STEPS
        if case.endswith("fp16"):
            assert ref["taken"] == [False, True, True], ref["taken"]
        elif "clip_grad_norm" in kw:  # the clip coefficient is < 1 on every step
            assert min(ref["norms"]) > 2 * kw["clip_grad_norm"], case
        for name, expected in ref["params"].items():
            for rank, r in enumerate(ranks):
                got = r[case]["params"][name]
                assert torch.equal(got, ranks[0][case]["params"][name]), (case, name, rank)
                assert_close_rel(got, expected, rtol, msg=f"{case} {name} rank {rank}")
        assert len(ranks[0][case]["state"]) == len(ref["state"])
        for name, state in ref["state"].items():
            for key, expected in state.items():
                assert_close_rel(ranks[0][case]["state"][name][key], expected, RTOL,
                                 msg=f"{case} {name} {key}")
    # Control: the bare module (no averaging) under the same data split drifts away.
    ref = dist_worker.single_process("ddp", "lomo_clip")["params"]
    bare = [r["unaveraged"]["params"] for r in ranks]
    assert not torch.equal(bare[0]["fc1.weight"], bare[1]["fc1.weight"])
    with pytest.raises(AssertionError):
        assert_close_rel(bare[0]["fc1.weight"], ref["fc1.weight"], RTOL)
    # BatchNorm running stats (which differ per rank after a forward) are
    # broadcast from rank 0 before every forward, as DDP does by default.
    seen = [r["buffers_seen"] for r in ranks]
    assert len(seen[0]) == dist_worker.STEPS and seen[0][-1].abs().max() > 0
    for a, b in zip(*seen):
        assert torch.equal(a, b)
    for r in ranks:
        assert "static_graph=True" in r["static_graph_error"]


def test_ddp_with_excluded_parameters(ranks):
    """Lomo with exclude= on DDP: the excluded head's gradients are rank-averaged (as
    DDP's own reducer, switched off by lomo_torch, would) before AdamW steps them, the
    hooked parameters update as before: both == one process on the full batch, and
    the replicas stay bitwise equal."""
    ref = dist_worker.exclude_run(dist_worker.make_model("ddp"))
    runs = [r["ddp"]["exclude"] for r in ranks]
    for step, expected in enumerate(ref["head_grads"]):
        for rank, r in enumerate(runs):
            assert_close_rel(r["head_grads"][step], expected, RTOL, msg=f"step {step} rank {rank}")
    for name, expected in ref["params"].items():
        for rank, r in enumerate(runs):
            assert torch.equal(r["params"][name], runs[0]["params"][name]), (name, rank)
            assert_close_rel(r["params"][name], expected, 1e-5, msg=f"{name} rank {rank}")
    for r in runs:  # one all-reduce a hooked parameter, one bucket for the head's two
        assert r["all_reduces"] == [r["hooked"] + 1] * len(dist_worker.LRS), r["all_reduces"]


def test_fsdp2_with_excluded_parameters(ranks):
    """AdaLomo with exclude= under FSDP2: the excluded o and down projections' gradients
    (FSDP2's reduce-scatter averages them) are added, as copies that own their storage,
    to the .grad each step starts from (BASE); grad_norm leaves that .grad as it was (the
    same tensor); a NaN loss's step is skipped with it unchanged; AdamW steps them:
    every rank == one process on the full batch. A plain tensor excluded beside
    FSDP2's DTensors, or a DTensor beside plain hooked parameters, is refused."""
    ref = dist_worker.fsdp_exclude_run(dist_worker.make_model("fsdp"))
    runs = [r["fsdp"]["exclude"] for r in ranks]
    steps = dist_worker.STEPS
    assert ref["taken"] == [True] * steps + [False] and ref["kept_by_norm"] == [True] * (steps + 1)
    for rank, r in enumerate(runs):
        assert (r["taken"], r["kept_by_norm"], r["own_storage"]) == (ref["taken"],
                                                                      ref["kept_by_norm"], True)
        for step, expected in enumerate(ref["grads"]):
            for name, g in expected.items():
                if step == steps:  # skipped: the .grad exactly as it was
                    assert torch.equal(r["grads"][step][name], torch.zeros_like(g)), (name, rank)
                else:
                    assert_close_rel(r["grads"][step][name], g, RTOL,
                                     msg=f"{name} step {step} rank {rank}")
        for name, expected in ref["params"].items():
            assert torch.equal(r["params"][name], runs[0]["params"][name]), (name, rank)
            assert_close_rel(r["params"][name], expected, 1e-5, msg=f"{name} rank {rank}")
    for rank, r in enumerate(runs):  # the user's own backward, and one that raises
        for name, g in ref["plain"].items():
            assert r["plain"][name] is not None, (name, rank)
            assert_close_rel(r["plain"][name], g, RTOL, msg=f"plain backward {name} rank {rank}")
        assert r["raised"] == "injected backward failure" and r["kept_after_raise"], r
    for r in ranks:
        plain, mixed = r["fsdp"]["exclude_errors"]
        assert "exclude= picks 'extra', a plain tensor, while the parameters AdaLomo trains " \
               "are DTensors (FSDP2)" in plain
        assert "exclude= picks the DTensor parameter 'o.weight' while the parameters AdaLomo " \
               "trains are plain tensors" in mixed


def test_fsdp2_shards_match_single_process(ranks):
    """FSDP2 (fully_shard, Shard(0) DTensors, uneven shards for the 17-row embed/head):
    each rank's shard == its slice of the single-process result after 3 steps.

    AdaLomo with and without norm clipping (the column means / row-mean
    normaliser / RMS values are global: its state equals the single-process
    state, col replicated and row sharded), and Lomo with norm and value clipping.
    """
    ranks = [r["fsdp"] for r in ranks]
    for case, (opt_name, kw, two_pass) in dist_worker.FSDP_CASES.items():
        ref = dist_worker.single_process("fsdp", case)
        check_run([r[case] for r in ranks], ref, case)
        if two_pass:
            assert len(ref["norms"]) == dist_worker.STEPS
            assert min(ref["norms"]) > 2 * kw["clip_grad_norm"], case
        uneven = 0
        for name, expected in ref["params"].items():
            shards = expected.chunk(WORLD, dim=0)
            uneven += shards[0].shape != shards[-1].shape
            for rank, r in enumerate(ranks):
                assert r[case]["placements"][name] == [("Shard", 0)], name
                got = r[case]["local"][name]
                assert got.shape == shards[rank].shape, (case, name, rank)
                assert_close_rel(got, shards[rank], RTOL, msg=f"{case} {name} rank {rank}")
        assert uneven >= 3, "embed.weight, head.weight and head.bias have 17 rows"
        if opt_name == "AdaLomo":
            assert set(ref["state"]) == set(ranks[0][case]["state_full"])
            for name, state in ref["state"].items():
                for key, expected in state.items():
                    for rank, r in enumerate(ranks):
                        assert_close_rel(r[case]["state_full"][name][key], expected, RTOL,
                                         msg=f"{case} {name} {key} rank {rank}")
                        local = r[case]["state_local"][name][key]
                        if key == "exp_avg_sq_col":  # replicated over the sharded row dim
                            assert local.shape == expected.shape
                        else:  # exp_avg_sq_row / exp_avg_sq: sharded like the parameter
                            assert local.shape == expected.chunk(WORLD, dim=0)[rank].shape
            for r in ranks:
                assert r[case]["reload_dtensor"] and r[case]["reload_full"], case
    for r in ranks:  # fully_shard after creating the optimizer is caught on the first pass
        assert "were replaced after the optimizer was created" in r["sharded_after_error"]


def test_stochastic_rounding_keeps_replicas_identical(ranks):
    """Stochastic rounding draws the same bits on every replica: DDP (fp16, above in
    test_ddp_matches_single_process: ``lomo_sr_fp16`` replicas are bitwise equal) and
    HSDP (bf16 parameters replicated over the two ranks). The ranks' default
    generators were seeded differently; the optimizer agrees on rank 0's seed."""
    runs = [r["fsdp"]["hsdp_sr"] for r in ranks]
    assert runs[0]["seed"] == runs[1]["seed"]
    changed = 0
    for name, local in runs[0]["local"].items():
        assert runs[0]["placements"][name] == ["Replicate", "Shard"], name
        assert local.dtype == torch.bfloat16
        assert torch.equal(local, runs[1]["local"][name]), name  # identical replicas
        changed += int((local != runs[0]["before"][name]).sum())
    assert changed > 0
    ddp = [r["ddp"]["lomo_sr_fp16"]["params"] for r in ranks]
    for name in ddp[0]:
        assert torch.equal(ddp[0][name], ddp[1][name]), name


def test_replaced_parameters_are_detected():
    """No process group needed: a parameter swapped out after the optimizer was built."""
    model = MLP()
    opt = lomo_torch.Lomo(model, lr=0.1)
    model.fc1.weight = torch.nn.Parameter(model.fc1.weight.detach().clone())
    with pytest.raises(RuntimeError, match=r"\['fc1.weight'\] were replaced"):
        opt.fused_backward(model(*mlp_batches(1)[0]), 0.1)


def test_fsdp2_gradient_accumulation_is_refused(ranks):
    """FSDP2 with gradient sync off (micro-batches accumulated in FSDP2): the fused
    optimizer never sees those gradients, so a pass with sync off, and a pass while
    FSDP2 still holds an unreduced gradient, are refused by name; nothing changes."""
    for r in ranks:
        off, held = r["fsdp"]["sync_off"]["errors"]
        assert "FSDP2 gradient sync is off for module " in off, off
        assert "set_requires_gradient_sync(True)" in off and "nothing has been updated" in off
        assert "FSDP2 holds an unreduced gradient of " in held, held
        assert "from a backward run with gradient sync off" in held
        assert r["fsdp"]["sync_off"]["unchanged"]
