"""The old name of :mod:`lomo_jax.aot.cost` (collectives, host transfers and matmul
FLOPs of a compiled step, read from its HLO): every name is re-exported from there.

Example::

    from lomo_jax.aot import cost         # new code
    from lomo_jax import hlo_cost         # old code: the same functions
    assert hlo_cost.collectives is cost.collectives
"""

from lomo_jax.aot.cost import (  # noqa: F401  (re-exported)
    KINDS,
    Collective,
    HostTransfer,
    bytes_sent,
    collectives,
    host_bytes,
    host_transfers,
    matmul_flops,
)

__all__ = ["Collective", "HostTransfer", "bytes_sent", "collectives", "host_bytes",
           "host_transfers", "matmul_flops"]
