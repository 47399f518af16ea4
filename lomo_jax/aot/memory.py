r"""Compiled memory of a step, on this machine's backend or on a GPU it does not have.

XLA compiles for an NVIDIA GPU without one ("deviceless" ahead-of-time
compilation): with the CUDA plugin installed (``pip install "lomo-jax[gpu-aot]"``,
i.e. ``jax[cuda12]``) and ``JAX_PLATFORMS=cpu`` set before JAX starts, a
topology built from a ``GpuTargetConfig`` text proto stands in for the card,
and ``compiled.memory_analysis()`` reports the buffers XLA:GPU would allocate.
That is the figure a GPU user gets, without XLA:CPU's bf16 artefacts (f32
copies of bf16 weights around every matmul).

.. math::
    \text{total} = \text{arguments} + \text{outputs} + \text{temporaries} - \text{aliased}

Not included: the CUDA context, cuBLAS/cuDNN workspaces, allocator
fragmentation and JAX's default preallocation (75% of the card).

Targets shipped (``lomo_jax/gpu_targets/``): ``"rtx4090"`` (sm_89, 24 GiB,
written from public specifications) and ``"h100"`` (H100 SXM 80 GB, values
as published in jax-ml/jax#28376). ``"cpu"`` compiles for this machine.

Example::

    import os; os.environ.setdefault("JAX_PLATFORMS", "cpu")   # before JAX starts
    import jax, lomo_jax
    from lomo_jax import aot

    mesh = aot.target_mesh("rtx4090")                 # one RTX 4090
    p = aot.abstract(param_shapes, mesh)              # ShapeDtypeStructs on it
    s = aot.abstract(jax.eval_shape(lambda q: lomo_jax.fused_init(tx, q), p), mesh)
    b = aot.abstract(batch_shapes, mesh)
    mem = aot.compiled_memory(lomo_jax.fused_train_step(model, tx), p, s, b)
    print(mem.total / 2**30, "GiB")
"""

from __future__ import annotations

import functools
import importlib.resources
from typing import NamedTuple, Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lomo_jax import _layout
from lomo_jax.sharding import abstract_like

__all__ = [
    "GPU_TARGETS",
    "MemoryFigures",
    "abstract",
    "compiled_memory",
    "gpu_target_available",
    "target_config",
    "target_mesh",
]

GPU_TARGETS = ("rtx4090", "h100")


class MemoryFigures(NamedTuple):
    """XLA's ``memory_analysis()`` of one compiled executable, in bytes (per device)."""

    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    host_temporaries: int = 0  # in pinned host memory (e.g. offloaded saved inputs)

    @property
    def total(self) -> int:
        """Arguments + outputs + temporaries - aliased: the executable's
        footprint in device memory (host temporaries not included)."""
        return self.arguments + self.outputs + self.temporaries - self.aliased

    @classmethod
    def of(cls, compiled) -> "MemoryFigures":
        m = compiled.memory_analysis()
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes,
                   m.temp_size_in_bytes, m.alias_size_in_bytes,
                   getattr(m, "host_temp_size_in_bytes", 0))


def target_config(target: str) -> str:
    """The ``GpuTargetConfig`` text proto of a shipped GPU target."""
    if target not in GPU_TARGETS:
        raise ValueError(f"unknown GPU target {target!r}; shipped: {GPU_TARGETS}.")
    return importlib.resources.files("lomo_jax").joinpath(f"gpu_targets/{target}.txtpb").read_text()


@functools.lru_cache(maxsize=None)
def _topology(target: str, n_devices: int):
    from jax.experimental import topologies

    return topologies.get_topology_desc(
        platform="cuda", target_config=target_config(target), topology=f"1x1x{n_devices}"
    )


def gpu_target_available(target: str = "rtx4090") -> bool:
    """Whether this process can compile for ``target`` (CUDA plugin installed and
    ``JAX_PLATFORMS=cpu`` set before JAX started)."""
    try:
        _topology(target, 1)
    except Exception:  # noqa: BLE001 - no plugin, or the plugin wants a driver
        return False
    return True


def target_mesh(
    target: str,
    mesh_shape: Sequence[int] = (1,),
    axis_names: Sequence[str] = ("x",),
) -> Optional[Mesh]:
    """A mesh of ``prod(mesh_shape)`` devices of ``target``, all ``Auto`` axes.

    ``"cpu"`` gives ``None`` (compile for this machine's default device; meshes
    of host devices are made with ``jax.make_mesh`` as usual).

    Raises:
      RuntimeError: a GPU target this process cannot compile for, with what to do.
    """
    if target == "cpu":
        return None
    if not gpu_target_available(target):
        raise RuntimeError(
            f"cannot compile for the GPU target {target!r} here: install the CUDA plugin "
            '(pip install "lomo-jax[gpu-aot]", i.e. jax[cuda12] at your jax version) and set '
            "JAX_PLATFORMS=cpu in the environment before JAX starts."
        )
    from jax.experimental import topologies

    n = 1
    for k in mesh_shape:
        n *= int(k)
    return topologies.make_mesh(_topology(target, n), tuple(mesh_shape), tuple(axis_names))


def abstract(tree, mesh: Optional[Mesh], spec: PartitionSpec = PartitionSpec()):
    """``jax.ShapeDtypeStruct`` of every leaf of ``tree``, placed with ``spec`` on
    ``mesh`` (replicated by default); ``mesh=None`` leaves the placement to ``jit``."""
    if mesh is None:
        return _layout.abstract(tree)
    return abstract_like(NamedSharding(mesh, spec), tree)


def compiled_memory(fn, *abstract_args, **abstract_kwargs) -> MemoryFigures:
    """Lower and compile ``fn`` (a ``jax.jit`` function or anything with
    ``.lower``, such as the fused step) on abstract arguments; its memory figures."""
    lower = getattr(fn, "lower", None)
    if lower is None:
        lower = jax.jit(fn).lower
    return MemoryFigures.of(lower(*abstract_args, **abstract_kwargs).compile())
