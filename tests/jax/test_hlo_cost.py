"""lomo_jax.aot.cost (formerly lomo_jax.hlo_cost, still importable) on
hand-written HLO: counts through loops, group sizes in every replica-group
form, async pairs, and the bytes formula."""

import re

import pytest

import lomo_jax
from lomo_jax.aot import cost as C

HLO = """\
HloModule m

%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %s = f32[] add(%x, %y)
}

%inner (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %w = f32[1,8]{1,0} get-tuple-element(%p), index=1
  %ag = f32[4,8]{1,0} all-gather(%w), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %ag)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%outer (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %q = (s32[], f32[4,8]) parameter(0)
  %loop = (s32[], f32[4,8]) while(%q), condition=%cond, body=%inner, backend_config={"known_trip_count":{"n":"3"}}
  %g = bf16[16]{0} get-tuple-element(%q), index=1
  %ar = (bf16[16]{0}, f32[]) all-reduce(%g, %z), channel_id=2, replica_groups={{0,1},{2,3}}, to_apply=%add
  ROOT %r = (s32[], f32[4,8]) tuple(%i, %ar)
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8] parameter(0)
  %l2 = (s32[], f32[4,8]) while(%t0), condition=%cond, body=%outer, backend_config={"known_trip_count":{"n":"5"}}
  %ags = ((f32[2,8]), f32[16,8]) all-gather-start(%a), channel_id=3, replica_groups=mesh['x'=2,'y'=4] {'x','y'}, dimensions={0}
  %agd = f32[16,8]{1,0} all-gather-done(%ags)
  %rs = f32[1,8]{1,0} reduce-scatter(%a), channel_id=4, replica_groups=mesh['x'=2,'y'=4], device_ids=([2,4]T(1,0)) {'y'}, dimensions={0}, to_apply=%add
  %cp = f32[4,8]{1,0} collective-permute(%a), channel_id=5, source_target_pairs={{0,1},{1,0}}
  %lhs = bf16[32,64]{1,0} parameter(1)
  %rhs = bf16[64,16]{1,0} parameter(2)
  %gemm = (bf16[32,16]{1,0}, s8[0]{0}) custom-call(%lhs, %rhs), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %att = (bf16[2,4,64,32]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", operand_layout_constraints={bf16[2,64,4,32]{3,2,1,0}, bf16[2,128,2,32]{3,2,1,0}, bf16[2,128,2,32]{3,2,1,0}}, api_version=API_VERSION_STATUS_RETURNING
  %attb = (bf16[2,4,64,32]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmaxBackward", operand_layout_constraints={bf16[2,64,4,32]{3,2,1,0}, bf16[2,128,2,32]{3,2,1,0}, bf16[2,128,2,32]{3,2,1,0}}, api_version=API_VERSION_STATUS_RETURNING
  ROOT %o = f32[4,8] copy(%a)
}
"""


def by_kind(found):
    return {c.kind: c for c in found}


def test_counts_groups_and_shapes():
    found = C.collectives(HLO)
    assert len(found) == 5  # the async pair counts once (its -done)
    c = by_kind(found)
    # nested loops multiply: 5 outer x 3 inner iterations
    gathers = sorted((g.count, g.group_size, g.shape) for g in found if g.kind == "all-gather")
    assert gathers == [(1, 8, "f32[16,8]"), (15, 4, "f32[4,8]")]
    assert (c["all-reduce"].count, c["all-reduce"].group_size) == (5, 2)
    assert c["all-reduce"].shape == "bf16[16], f32[]" and c["all-reduce"].nbytes == 36
    assert (c["reduce-scatter"].count, c["reduce-scatter"].group_size) == (1, 4)
    assert c["collective-permute"].count == 1


def test_bytes_sent_ring_formulas():
    c = {(g.kind, g.shape): g for g in C.collectives(HLO)}
    ag = c[("all-gather", "f32[4,8]")]
    assert ag.bytes_sent == pytest.approx(15 * 128 * 3 / 4)
    assert c[("all-gather", "f32[16,8]")].bytes_sent == pytest.approx(512 * 7 / 8)
    assert c[("all-reduce", "bf16[16], f32[]")].bytes_sent == pytest.approx(5 * 2 * 36 / 2)
    assert c[("reduce-scatter", "f32[1,8]")].bytes_sent == pytest.approx(32 * 3)
    assert c[("collective-permute", "f32[4,8]")].bytes_sent == pytest.approx(128)
    assert C.bytes_sent(HLO) == pytest.approx(sum(g.bytes_sent for g in c.values()))


def test_matmul_flops_of_gemm_and_attention_calls():
    """cuBLAS gemm: 2 x 32 x 16 x 64; cuDNN attention (K/V with 128 positions,
    not the queries' 64): 4 B H Tq Tk D forward, 2.5x that backward; the
    all-reduce's ``to_apply`` adds nothing."""
    attention = 4 * 2 * 4 * 64 * 128 * 32
    assert C.matmul_flops(HLO) == 2 * 32 * 16 * 64 + attention + attention * 5 // 2


def test_no_entry_is_an_error():
    with pytest.raises(ValueError, match="ENTRY"):
        C.collectives("%f (x: f32[]) -> f32[] {\n}\n")


def test_flops_and_collectives_of_a_compiled_scan():
    """On XLA's own compiled HLO: a scan of 3 matmuls [4, 8] @ [8, 16] is
    3 x 2 x 4 x 8 x 16 FLOPs (XLA's cost_analysis counts the loop body once),
    and a program without collectives has none."""
    import jax
    import jax.numpy as jnp

    def f(x, ws):
        def body(h, w):
            return jnp.tanh(h @ w) @ jnp.ones((16, 8), h.dtype), None
        return jax.lax.scan(body, x, ws)[0]

    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    ws = jax.ShapeDtypeStruct((3, 8, 16), jnp.float32)
    compiled = jax.jit(f).lower(x, ws).compile()
    assert C.matmul_flops(compiled) == 3 * 2 * (2 * 4 * 8 * 16)
    assert C.collectives(compiled) == [] and C.bytes_sent(compiled) == 0


HOST_HLO = """\
HloModule h

%body (p: (s32[], bf16[3,4,8])) -> (s32[], bf16[3,4,8]) {
  %p = (s32[], bf16[3,4,8]{2,1,0:S(5)}) parameter(0)
  %buf = bf16[3,4,8]{2,1,0:S(5)} get-tuple-element(%p), index=1
  %x = bf16[1,4,8]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %dus = ((bf16[3,4,8]{2,1,0:S(5)}, bf16[1,4,8]{2,1,0}, s32[], s32[], s32[]), bf16[3,4,8]{2,1,0:S(5)}, u32[]) fusion-start(%buf, %x, %i, %i, %i), kind=kCustom, calls=%w_dus, metadata={op_name="jit(step)/while/body/dynamic_update_slice"}
  %dusd = bf16[3,4,8]{2,1,0:S(5)} fusion-done(%dus)
  %ds = ((bf16[3,4,8]{2,1,0:S(5)}, s32[], s32[], s32[]), bf16[1,4,8]{2,1,0}, u32[]) fusion-start(%buf, %i, %i, %i), kind=kCustom, calls=%w_ds
  %dsd = bf16[1,4,8]{2,1,0} fusion-done(%ds)
  %dev = ((f32[2,2]{1,0}, f32[2,2]{1,0}), f32[2,2]{1,0}, u32[]) fusion-start(%y, %y), kind=kCustom, calls=%w_add
  %devd = f32[2,2]{1,0} fusion-done(%dev)
  ROOT %t = (s32[], bf16[3,4,8]) tuple(%i, %dusd)
}

%cond (p: (s32[], bf16[3,4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %a = f32[16]{0} parameter(0)
  %l = (s32[], bf16[3,4,8]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %cs = (f32[16]{0:S(5)}, f32[16]{0}, u32[]) copy-start(%a)
  %cd = f32[16]{0:S(5)} copy-done(%cs)
  %cs2 = (f32[16]{0}, f32[16]{0:S(5)}, u32[]) copy-start(%cd)
  %cd2 = f32[16]{0} copy-done(%cs2)
  ROOT %o = f32[16]{0} copy(%cd2)
}
"""


def test_host_transfers_directions_bytes_and_loop_counts():
    """Writes into a host buffer count the device array written (not the
    buffer), reads the slice read; loop bodies count per iteration; a fusion
    between device arrays and scalar indices are not transfers."""
    found = sorted(C.host_transfers(HOST_HLO))
    assert [t[:4] for t in found] == [
        ("to_device", "bf16[1,4,8]", 64, 3),
        ("to_device", "f32[16]", 64, 1),
        ("to_host", "bf16[1,4,8]", 64, 3),
        ("to_host", "f32[16]", 64, 1),
    ]
    assert found[2].op_name == "jit(step)/while/body/dynamic_update_slice"
    assert C.host_bytes(HOST_HLO) == 64 * 3 * 2 + 64 * 2


def test_the_old_name_and_the_package_give_the_same_functions():
    from lomo_jax import aot, hlo_cost

    assert aot.cost is C and lomo_jax.aot.cost is C
    for name in hlo_cost.__all__:
        assert getattr(hlo_cost, name) is getattr(C, name)
    assert aot.MemoryFigures.__module__ == "lomo_jax.aot.memory"


def test_the_docstring_examples_call_names_that_exist():
    from lomo_jax import aot

    for module in (C, aot):
        example = module.__doc__.split("Example::")[1]
        calls = re.findall(r"\b((?:cost|aot|lomo_jax)(?:\.\w+)+)\(", example)
        assert calls, module.__name__
        for dotted in calls:
            head, *rest = dotted.split(".")
            obj = {"cost": C, "aot": aot, "lomo_jax": lomo_jax}[head]
            for part in rest:
                obj = getattr(obj, part)  # AttributeError names a stale example
