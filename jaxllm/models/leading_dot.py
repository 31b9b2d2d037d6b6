"""`leading_dot(x, w)`: the projections' contraction, x [T, in...] · w [in..., out...] over x's axes after
the tokens axis against w's leading axes, in order — the contract of every Projector spec
("te,ehd->thd", "thd,hde->te", ...).

Why not `jnp.einsum(spec, x, w)`: for "thd,hde->te" (the attention output projection, wo) einsum
emits the contracting dimensions as (d, h) on both sides. A backend that does not re-sort them
(XLA CPU; seen in the compiled step's HLO as a transposing copy of wo, `bench/step_memory.py`'s fifth
weight copy at T=256) copies the whole weight into a (d, h, e) layout every step before its gemm.
Here the contracting dimensions are in increasing order on both sides, which is the row-major
layout both operands already have: a plain [T, H*d] x [H*d, E] gemm, no copy on any backend.
"""
from __future__ import annotations

import jax
from jax import lax


def leading_dot(x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """x [T, in...] · w [in..., out...] → [T, out...] (x's axes 1.. contracted with w's leading
    x.ndim - 1 axes, in order)."""
    n = x.ndim - 1
    if tuple(w.shape[:n]) != tuple(x.shape[1:]):
        raise ValueError(f"leading_dot: x {tuple(x.shape)} does not match the leading axes of w {tuple(w.shape)}")
    dims = ((tuple(range(1, n + 1)), tuple(range(n))), ((), ()))
    return lax.dot_general(x, w, dims, preferred_element_type=preferred_element_type)  # [T, out...]
