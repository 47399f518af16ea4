"""Measurement tools, apart from the training API: what a compiled step costs.

* :mod:`lomo_jax.aot.memory` (its names are this package's): the compiled
  memory of a step, on this machine's backend or ahead of time for a GPU it
  does not have (:func:`target_mesh`, :func:`abstract`, :func:`compiled_memory`,
  :class:`MemoryFigures`), ``total = arguments + outputs + temporaries - aliased``;
* :mod:`lomo_jax.aot.cost` (formerly ``lomo_jax.hlo_cost``, still importable
  under that name): the collectives, host transfers and matmul FLOPs a compiled
  step runs, read from its optimized HLO, with loop trip counts.

Example::

    from lomo_jax import aot

    mesh = aot.target_mesh("rtx4090")                  # compile for one RTX 4090
    compiled = step.lower(*(aot.abstract(x, mesh) for x in (params, state, batch))).compile()
    print(aot.MemoryFigures.of(compiled).total / 2**30, "GiB")
    print(aot.cost.matmul_flops(compiled) / 1e12, "TFLOP per step")
"""

from lomo_jax.aot import cost as cost
from lomo_jax.aot.memory import (
    GPU_TARGETS,
    MemoryFigures,
    abstract,
    compiled_memory,
    gpu_target_available,
    target_config,
    target_mesh,
)

__all__ = [
    "GPU_TARGETS",
    "MemoryFigures",
    "abstract",
    "compiled_memory",
    "cost",
    "gpu_target_available",
    "target_config",
    "target_mesh",
]
