r"""The collectives a compiled (sharded) step runs, read from its optimized HLO.

Every all-gather, reduce-scatter, all-reduce, all-to-all and
collective-permute of ``compiled.as_text()``, with how many times one step
executes it: a collective inside a ``while`` body (the fused step's layer
scans) runs once per iteration, so its count is the product of the known
trip counts of the loops around it. From the shapes and the size :math:`n` of
each collective's device group, the bytes one device sends per step, for the
usual ring algorithms:

.. math::
    \text{all-gather: } \tfrac{n-1}{n} |out|, \quad
    \text{reduce-scatter: } (n-1) |out|, \quad
    \text{all-reduce: } 2\tfrac{n-1}{n} |x|, \quad
    \text{all-to-all: } \tfrac{n-1}{n} |x|, \quad
    \text{permute: } |x|.

:func:`host_transfers` lists the copies between device and pinned host
memory the same way (``fused_train_step(..., offload_saved_inputs=True)``
copies each saved layer input out once and back once per backward pass).

Together with ``compiled.cost_analysis()["flops"]`` this bounds a step's
time on a target's published bandwidths (``benchmarks/scaling.py``). With
FSDP, each layer's parameters are all-gathered once in every pass that runs
the layer (forward, and each backward recompute) and its gradient is reduced
once per backward pass; :func:`collectives` is how the tests check that
(``tests/jax/test_collectives.py``).

Pure text parsing (no JAX): it reads ``compiled.as_text()`` or HLO text.
Also importable as ``lomo_jax.hlo_cost`` (its old name). Example::

    from lomo_jax.aot import cost

    compiled = step.lower(params, opt_state, batch).compile()
    for c in cost.collectives(compiled):
        print(c.kind, c.shape, c.group_size, c.count)
    print(cost.bytes_sent(compiled) / 2**30, "GiB per device per step")
    print(cost.matmul_flops(compiled) / 1e12, "TFLOP per step")
"""

from __future__ import annotations

import math
import re
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

__all__ = ["Collective", "HostTransfer", "bytes_sent", "collectives", "host_bytes",
           "host_transfers", "matmul_flops"]

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
             "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
             "f8e4m3fn": 1, "f8e5m2": 1}
_HEADER = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*?)\s([a-z][a-z0-9-]*)\(([^)]*)\)(.*)$")
_CALLEE = re.compile(r"\b(?:body|calls|branch_computations|true_computation|"
                     r"false_computation)=\{?([^}]*?)\}?(?:,\s[a-z_]+=|$)")
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\](\{[^}]*\})?")
_HOST = ":S(5)"  # the layout suffix of an array in host memory
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


class Collective(NamedTuple):
    """One collective instruction of the HLO.

    Attributes:
      kind: one of :data:`KINDS`.
      shape: its result (``"f32[64,128]"``; several joined by ``", "``).
      nbytes: bytes of the result.
      group_size: devices in each of its replica groups (:math:`n`).
      count: times one execution of the program runs it.
      computation: the HLO computation it sits in.
      op_name: the JAX operation it comes from (its ``metadata``), or ``""``.
    """

    kind: str
    shape: str
    nbytes: int
    group_size: int
    count: int
    computation: str
    op_name: str = ""

    @property
    def bytes_sent(self) -> float:
        """Bytes one device sends for it per program execution (ring algorithms)."""
        n, b = self.group_size, self.nbytes
        per_call = {
            "all-gather": b * (n - 1) / n,
            "reduce-scatter": b * (n - 1),
            "all-reduce": 2 * b * (n - 1) / n,
            "all-to-all": b * (n - 1) / n,
            "collective-permute": b,
        }[self.kind]
        return per_call * self.count


def _text(compiled_or_text) -> str:
    if isinstance(compiled_or_text, str):
        return compiled_or_text
    return compiled_or_text.as_text()


def _computations(text: str) -> Tuple[Dict[str, List[str]], str]:
    """``{name: instruction lines}`` and the entry computation's name."""
    comps, entry, name = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            name = header.group(1)
            comps[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in this HLO text")
    return comps, entry


def _shapes(result: str) -> Tuple[str, int]:
    """The array shapes in an instruction's result type, and their total bytes."""
    arrays = _arrays(result)
    return ", ".join(a.shape for a in arrays), sum(a.nbytes for a in arrays)


def _op_name(line: str) -> str:
    """The ``op_name`` of an instruction's metadata (``""`` if none)."""
    m = re.search(r'op_name="([^"]*)"', line)
    return m.group(1) if m else ""


def _group_size(line: str) -> int:
    """:math:`n` from ``replica_groups=``: explicit ``{{0,1},{2,3}}``, iota
    ``[2,4]<=[8]``, or mesh ``mesh['a'=2,'b'=4] {'b'}`` (maybe with ``device_ids=``
    between); 1 if absent."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\S+)?\s*\{([^}]*)\}", line)
    if m:
        sizes = {k.strip("'"): int(v) for k, v in re.findall(r"('[^']*')=(\d+)", m.group(1))}
        return math.prod(sizes[a.strip().strip("'")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([^}]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"source_target_pairs=", line)
    return 2 if m else 1


def _kind(opcode: str):
    """The collective an opcode is (``-done`` of an async pair counts; ``-start`` not)."""
    base = opcode[: -len("-done")] if opcode.endswith("-done") else opcode
    return base if base in KINDS else None


def _callees(line: str) -> List[Tuple[str, int]]:
    """Computations an instruction runs, each with how many times per execution."""
    trip = _TRIP.search(line)
    out = []
    for group in _CALLEE.findall(line):
        for callee in re.findall(r"%([^\s,}]+)", group):
            out.append((callee, int(trip.group(1)) if trip and " while(" in line else 1))
    return out


class _Instr(NamedTuple):
    name: str
    result: str     # the result type, e.g. "f32[64,128]{1,0}" or a tuple
    opcode: str
    operands: List[str]
    line: str


def _executed(text: str) -> Iterator[Tuple[str, _Instr, int, Dict[str, _Instr]]]:
    """Every instruction reachable from the entry, as ``(computation, instr,
    count, earlier instrs of its computation by name)``: ``count`` is how many
    times one run executes it (loop trip counts multiplied; a loop without a
    known trip count counts once)."""
    comps, entry = _computations(text)

    def walk(name: str, count: int, seen: Tuple[str, ...]):
        by_name: Dict[str, _Instr] = {}
        for line in comps.get(name, ()):
            op = _OP.match(line)
            if op is None:
                continue
            operands = [o.strip().lstrip("%") for o in re.sub(r"/\*[^*]*\*/", "", op.group(4)).split(",")]
            instr = _Instr(op.group(1), op.group(2), op.group(3), operands, line)
            by_name[instr.name] = instr
            yield name, instr, count, by_name
            for callee, times in _callees(line):
                if callee in comps and callee not in seen:
                    yield from walk(callee, count * times, seen + (callee,))

    yield from walk(entry, 1, (entry,))


def collectives(compiled_or_text) -> List[Collective]:
    """Every collective of a compiled program (``jax.stages.Compiled`` or its
    ``as_text()``), with its execution count per run."""
    found: List[Collective] = []
    for comp, instr, count, by_name in _executed(_text(compiled_or_text)):
        kind = _kind(instr.opcode)
        if kind is None:
            continue
        shape, nbytes = _shapes(instr.result)
        # an async pair's groups are on its -start (the -done's operand)
        start = by_name.get(instr.operands[0]) if instr.opcode.endswith("-done") else None
        line = (start or instr).line
        found.append(Collective(kind, shape, nbytes, _group_size(line), count, comp,
                                _op_name(line)))
    return found


def _dims(result: str) -> List[int]:
    """The dimensions of the first array in a result type."""
    found = _ARRAY.search(result)
    return [int(d) for d in found.group(2).split(",") if d] if found else []


def _dot_flops(instr: _Instr, by_name: Dict[str, _Instr]) -> int:
    """2 x output elements x contracted size, for ``dot`` and cuBLAS gemm calls."""
    m = re.search(r"lhs_contracting_dim(?:ension)?s(?:=\{|\":\[)([^}\]]*)", instr.line)
    lhs = by_name.get(instr.operands[0])
    if m is None or lhs is None:
        return 0
    lhs_dims = _dims(lhs.result)
    contracted = math.prod(lhs_dims[int(d.strip('" '))] for d in m.group(1).split(",") if d.strip())
    return 2 * math.prod(_dims(instr.result)) * contracted


def _attention_flops(instr: _Instr) -> int:
    """cuDNN fused attention: ``4 B H Tq Tk D`` forward (scores and values), 2.5x
    that backward (both recomputed scores and four gradient matmuls)."""
    b, h, tq, d = _dims(instr.result)
    layouts = re.search(r"operand_layout_constraints=\{(.*?)\}\s*,\s*[a-z_]+=", instr.line)
    operands = _ARRAY.findall(layouts.group(1)) if layouts else []
    tk = int(operands[1][1].split(",")[1]) if len(operands) > 1 else tq  # K: [B, Tk, H, D]
    forward = 4 * b * h * tq * tk * d
    return forward * 5 // 2 if "Backward" in instr.line else forward


def matmul_flops(compiled_or_text) -> int:
    """Floating-point operations of the program's matrix products per run
    (``dot``, cuBLAS gemm and cuDNN attention calls, through loops): the
    compiled step's FLOPs, which XLA's own ``cost_analysis()`` counts once per
    loop body instead of once per iteration."""
    total = 0
    for _, instr, count, by_name in _executed(_text(compiled_or_text)):
        if instr.opcode == "dot" or (instr.opcode == "custom-call" and "$gemm" in instr.line):
            total += count * _dot_flops(instr, by_name)
        elif instr.opcode == "custom-call" and "$fmha" in instr.line:
            total += count * _attention_flops(instr)
    return total


def bytes_sent(compiled_or_text) -> float:
    """Bytes one device sends in one run of the program, over all its collectives."""
    return sum(c.bytes_sent for c in collectives(compiled_or_text))


class HostTransfer(NamedTuple):
    """One copy between device and host memory (``memory_kind="pinned_host"``).

    Attributes:
      direction: ``"to_host"`` or ``"to_device"``.
      shape: the array moved (``"bf16[1,1,4096,8192]"``).
      nbytes: its bytes.
      count: times one execution of the program runs it.
      op_name: the JAX operation it comes from, or ``""``.
    """

    direction: str
    shape: str
    nbytes: int
    count: int
    op_name: str = ""


class _Array(NamedTuple):
    shape: str      # "bf16[1,4096]"
    nbytes: int
    scalar: bool
    host: bool      # in host memory (layout ``{...:S(5)}``)


def _arrays(result: str) -> List[_Array]:
    """Every array in a result type, in order."""
    return [_Array(f"{dt}[{dims}]", _ITEMSIZE.get(dt, 4) * math.prod(
                int(d) for d in dims.split(",") if d), not dims, _HOST in (layout or ""))
            for dt, dims, layout in _ARRAY.findall(result)]


def _moved(start: _Instr, done: _Instr) -> Optional[Tuple[str, str, int]]:
    """``(direction, shape, bytes)`` of an async copy or slice between memories,
    from its ``-start`` and ``-done``, or ``None`` if it stays in one memory.

    A ``fusion-start``'s result is ``((operands...), output, context)``, a
    ``copy-start``'s ``(output, operand, context)``; the ``-done``'s is the output.
    """
    out = _arrays(done.result)[0]
    arrays = _arrays(start.result)
    operands = arrays[:-2] if start.opcode == "fusion-start" else arrays[1:2]
    if out.host:  # written into a host buffer: the device arrays written
        moved = [a for a in operands if not a.host and not a.scalar]
        if moved:
            return "to_host", ", ".join(a.shape for a in moved), sum(a.nbytes for a in moved)
    elif any(a.host for a in operands):
        return "to_device", out.shape, out.nbytes
    return None


def host_transfers(compiled_or_text) -> List[HostTransfer]:
    """Every copy between device and pinned host memory of a compiled program
    (XLA:GPU's asynchronous ``fusion``/``copy`` ``-start``/``-done`` pairs that
    read or write a host buffer), with its execution count per run."""
    found: List[HostTransfer] = []
    for _, instr, count, by_name in _executed(_text(compiled_or_text)):
        if instr.opcode not in ("fusion-done", "copy-done"):
            continue
        start = by_name.get(instr.operands[0])
        moved = start and _moved(start, instr)
        if moved:
            found.append(HostTransfer(*moved, count, _op_name(start.line)))
    return found


def host_bytes(compiled_or_text) -> int:
    """Bytes copied between device and host memory in one run, both directions."""
    return sum(t.nbytes * t.count for t in host_transfers(compiled_or_text))
