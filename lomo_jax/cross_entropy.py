r"""Cross-entropy of a linear head without the ``[N, V]`` logits.

For hidden states :math:`x \in \mathbb{R}^{N \times D}`, a head matrix
:math:`W \in \mathbb{R}^{D \times V}` (or :math:`V \times D`, ``transposed``:
a tied input embedding) and integer labels :math:`y`:

.. math::
    z_n = x_n W, \qquad \ell_n = \log\sum_v e^{z_{nv}} - z_{n y_n}, \qquad
    \mathrm{loss} = \sum_n c_n \ell_n

with :math:`c_n = [y_n \ne \text{ignore}] / |\{n: y_n \ne \text{ignore}\}|`
(``reduction="mean"``) or :math:`[y_n \ne \text{ignore}]` (``"sum"``).

The vocabulary is processed in chunks of ``C`` columns (``C`` chosen so that
one chunk's logits, their cotangent, the head's slice and its gradient fit
``chunk_bytes``):

* **forward**: a scan over the chunks keeps a running maximum and sum of
  exponentials per token (online log-sum-exp) and picks the label's logit out
  of the chunk that holds it. Nothing of size ``N x V`` is stored: the
  residuals are ``x``, ``W`` (inputs anyway) and :math:`\mathrm{lse} \in
  \mathbb{R}^N`.
* **backward**: a second scan recomputes each chunk's logits and forms
  :math:`\partial z = g\,c_n(\mathrm{softmax}(z_n) - e_{y_n})` for that chunk
  only, then :math:`\partial W_{:,\text{chunk}} = x^\top \partial z` (each
  column block by one matmul, written in place into the gradient) and
  :math:`\partial x \mathrel{+}= \partial z\, W_{:,\text{chunk}}^\top` (an fp32
  ``[N, D]`` accumulator). The label term is a comparison with an ``iota``:
  there is no dense one-hot or scatter.

Logits are rounded to ``x``'s dtype before the softmax and their cotangent is
cast to it before the matmuls, exactly as for ``(x @ W).astype(f32)`` under
autodiff, so the values (and in bf16 the roundings) are those of the plain
computation; only the order of fp32 summations differs.

Example::

    from lomo_jax.cross_entropy import linear_cross_entropy

    h = rms_norm(hidden, scale)                         # [B, T, D], bf16
    loss = linear_cross_entropy(h, params["lm_head"], labels)      # W [D, V]
    loss = linear_cross_entropy(h, embedding, labels, transposed=True)  # tied, E [V, D]
"""

from __future__ import annotations

import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp
from jax import lax

from lomo_jax.embedding import IndexRange, check_indices, index_ranges

__all__ = ["linear_cross_entropy", "vocab_chunk_size"]

MAX_CHUNK_BYTES = 32 * 2**20


def vocab_chunk_size(
    n_tokens: int, vocab_size: int, d_model: int, chunk_bytes: Optional[int] = None,
    itemsize: int = 2,
) -> int:
    """Columns per chunk, so that what one chunk holds -- fp32 logits and their
    cotangent ``[N, C]``, the head's slice and its gradient ``[D, C]`` -- fits
    ``chunk_bytes``; by default the smaller of 32 MiB and an eighth of the head
    (``D x V x itemsize``), so the chunks stay small next to the head's own
    gradient at every model size. Prefers a multiple of 8 that divides
    ``vocab_size`` (no tail chunk) down to a quarter of that size; at least 128
    columns, at most ``vocab_size``."""
    if chunk_bytes is None:
        chunk_bytes = min(MAX_CHUNK_BYTES, d_model * vocab_size * itemsize // 8)
    per_column = 6 * max(int(n_tokens), 1) + 2 * itemsize * int(d_model)
    cap = min(max(128, int(chunk_bytes) // per_column), int(vocab_size))
    for cols in range(cap - cap % 8, max(cap // 4, 8) - 1, -8):
        if vocab_size % cols == 0:
            return cols
    return cap


def linear_cross_entropy(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    transposed: bool = False,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum"] = "mean",
    chunk_bytes: Optional[int] = None,
    logit_softcap: Optional[float] = None,
) -> jax.Array:
    r"""Softmax cross-entropy of ``x @ W`` against ``labels``, chunked over the vocabulary.

    With ``logit_softcap`` :math:`c` the logits are :math:`c \tanh(z / c)`
    (Gemma 2's final soft-capping), applied chunk by chunk; its derivative
    :math:`1 - \tanh^2(z / c)` scales each chunk's cotangent.

    Args:
      x: hidden states ``[..., D]`` (the matmul runs in this dtype).
      w: the head, ``[D, V]``; with ``transposed=True`` ``[V, D]`` (logits
        ``x @ w.T``, e.g. a tied embedding). Cast to ``x.dtype`` chunk by chunk;
        its gradient has ``w``'s dtype.
      labels: integer ``[...]`` (the shape of ``x`` without its last axis);
        entries equal to ``ignore_index`` contribute nothing. Any other entry
        outside ``[0, V)`` is an error: concrete labels raise ``ValueError``
        naming the value; traced ones (under ``jit``) make the loss, and so
        every gradient, NaN (never the finite wrong loss of a label logit
        taken as 0).
      reduction: ``"mean"`` over the non-ignored labels (0 if there are none)
        or ``"sum"``.
      chunk_bytes: the working set of one chunk (see :func:`vocab_chunk_size`).
      logit_softcap: :math:`c > 0`, or ``None`` for plain logits.

    Returns:
      The fp32 scalar loss.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    if x.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels {labels.shape} must have the shape of x {x.shape} without its last axis."
        )
    d = x.shape[-1]
    if w.ndim != 2 or w.shape[1 if transposed else 0] != d:
        want = "[V, D]" if transposed else "[D, V]"
        raise ValueError(f"w must be {want} with D = {d} (x's last axis); got {w.shape}.")
    if logit_softcap is not None and not float(logit_softcap) > 0:
        raise ValueError(f"logit_softcap must be a positive number or None, got {logit_softcap!r}.")
    x2 = x.reshape(-1, d)
    y = labels.reshape(-1).astype(jnp.int32)
    valid = y != ignore_index
    vocab = w.shape[0 if transposed else 1]
    coef = _coefficients(labels, y, valid, vocab, ignore_index, reduction)
    chunk = vocab_chunk_size(x2.shape[0], vocab, d, chunk_bytes, jnp.dtype(w.dtype).itemsize)
    cap = None if logit_softcap is None else float(logit_softcap)
    return _cross_entropy(x2, w, jnp.where(valid, y, -1), coef, transposed, chunk, cap)


def _coefficients(labels, y, valid, vocab: int, ignore_index: int, reduction: str):
    """Each token's weight in the loss: ``valid / count`` (mean) or ``valid``
    (sum). A label outside ``[0, V)`` that is not ``ignore_index`` raises if
    concrete; traced, its weight is NaN, so the loss and every gradient are
    NaN (an elementwise pass over the labels, nothing of the logits' size)."""
    ranges = index_ranges({"labels": IndexRange(vocab, ignore=ignore_index)})
    traced = check_indices({"labels": labels}, ranges, "linear_cross_entropy", prefix="")
    coef = valid.astype(jnp.float32)
    if reduction == "mean":
        coef = coef / jnp.maximum(jnp.sum(coef), 1.0)
    if traced is not None:  # not checked on the host (a tracer)
        coef = jnp.where(valid & ((y < 0) | (y >= vocab)), jnp.float32(jnp.nan), coef)
    return coef


# --------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------


def _w_chunk(w, start, size, transposed, dtype):
    return lax.dynamic_slice_in_dim(w, start, size, axis=0 if transposed else 1).astype(dtype)


def _logits(x, w_c, transposed, cap):
    """fp32 logits of one chunk, rounded to ``x.dtype`` as ``x @ w`` would be,
    then soft-capped (:math:`c \tanh(z / c)`) if ``cap`` is set."""
    dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
    z = lax.dot_general(x, w_c, dims, preferred_element_type=jnp.float32)
    z = z.astype(x.dtype).astype(jnp.float32)
    return z if cap is None else cap * jnp.tanh(z / cap)


def _scan_chunks(body, carry, vocab, chunk):
    """Run ``body(carry, start, size) -> carry`` over the chunks (a scan over the
    full ones, then the tail, if any)."""
    n_full, tail = divmod(vocab, chunk)  # n_full chunks of chunk columns, then the tail
    if n_full == 1:
        carry = body(carry, 0, chunk)
    elif n_full > 1:
        carry, _ = lax.scan(
            lambda c, j: (body(c, j * chunk, chunk), None), carry, jnp.arange(n_full)
        )
    if tail:
        carry = body(carry, n_full * chunk, tail)
    return carry


def _late_zeros(after, *shapes_dtypes):
    """``(after, zeros...)``: zero arrays made only once ``after`` exists, so XLA
    cannot allocate them early. Use the returned ``after`` (XLA drops a barrier
    operand whose output is unused, and with it the ordering)."""
    after, zeros = lax.optimization_barrier((after, [jnp.zeros((), d) for _, d in shapes_dtypes]))
    return after, [jnp.broadcast_to(z, s) for z, (s, _) in zip(zeros, shapes_dtypes)]


# --------------------------------------------------------------------------
# Forward / backward
# --------------------------------------------------------------------------


def _lse_and_label_logit(x, w, y, transposed, chunk, cap):
    vocab = w.shape[0 if transposed else 1]
    n = x.shape[0]

    def body(carry, start, size):
        m, s, picked = carry
        z = _logits(x, _w_chunk(w, start, size, transposed, x.dtype), transposed, cap)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        local = y - start
        hit = (local >= 0) & (local < size)
        z_y = jnp.take_along_axis(z, jnp.clip(local, 0, size - 1)[:, None], axis=1)[:, 0]
        return m_new, s, picked + jnp.where(hit, z_y, 0.0)

    f32 = jnp.float32
    init = (jnp.full((n,), -jnp.inf, f32), jnp.zeros((n,), f32), jnp.zeros((n,), f32))
    m, s, picked = _scan_chunks(body, init, vocab, chunk)
    return m + jnp.log(s), picked


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _cross_entropy(x, w, y, coef, transposed, chunk, cap):
    return _cross_entropy_fwd(x, w, y, coef, transposed, chunk, cap)[0]


def _cross_entropy_fwd(x, w, y, coef, transposed, chunk, cap):
    lse, picked = _lse_and_label_logit(x, w, y, transposed, chunk, cap)
    return jnp.sum(coef * (lse - picked)), (x, w, y, coef, lse)


def _cross_entropy_bwd(transposed, chunk, cap, res, g):
    x, w, y, coef, lse = res
    vocab = w.shape[0 if transposed else 1]
    # lse exists only after the forward: the buffers cannot be allocated earlier.
    lse, (dx0, dw0) = _late_zeros(lse, (x.shape, jnp.float32), (w.shape, w.dtype))
    scale = (g * coef)[:, None]

    def body(carry, start, size):
        dx, dw = carry
        w_c = _w_chunk(w, start, size, transposed, x.dtype)
        z = _logits(x, w_c, transposed, cap)
        onehot = (y[:, None] - start) == lax.broadcasted_iota(jnp.int32, z.shape, 1)
        dz = (jnp.exp(z - lse[:, None]) - onehot) * scale
        if cap is not None:  # through c tanh(z / c): times 1 - tanh^2
            dz = dz * (1.0 - jnp.square(z / cap))
        dz = dz.astype(x.dtype)
        if transposed:  # z = x w_c^T: dx += dz w_c, dw_c = dz^T x  [C, D]
            dx = dx + jnp.dot(dz, w_c, preferred_element_type=jnp.float32)
            dw_c = lax.dot_general(dz, x, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        else:  # z = x w_c: dx += dz w_c^T, dw_c = x^T dz  [D, C]
            dx = dx + lax.dot_general(dz, w_c, (((1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.float32)
            dw_c = lax.dot_general(x, dz, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        dw = lax.dynamic_update_slice_in_dim(
            dw, dw_c.astype(w.dtype), start, axis=0 if transposed else 1
        )
        return dx, dw

    dx, dw = _scan_chunks(body, (dx0, dw0), vocab, chunk)
    return dx.astype(x.dtype), dw, None, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
