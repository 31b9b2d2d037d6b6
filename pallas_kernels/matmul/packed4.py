"""4-bit values packed two a byte in uint8 (jaxllm/models/quant_pack4.py lays them out): the nibbles
as values. Plain jnp ops, so the same function unpacks a tile inside a Triton kernel
(pallas_kernels/matmul/stacked.py) and a jnp array (jaxllm's chunked and MoE dots)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def nibbles(b: jax.Array, packed: str) -> tuple[jax.Array, jax.Array]:
    """uint8 bytes → (low, high) values, int8 for "int4" (two's complement nibbles, arithmetic shifts)
    or uint8 for "uint4"."""
    if packed == "uint4":
        return b & 0x0F, b >> 4
    return (jax.lax.bitcast_convert_type(b << 4, jnp.int8) >> 4), (jax.lax.bitcast_convert_type(b, jnp.int8) >> 4)
