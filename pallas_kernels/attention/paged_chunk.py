"""The inner step both Triton kernels share: one flash-attention update over a chunk of cached
positions of one sequence, read through its block-table row."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention.common import LOG2E, MASK_VALUE
from pallas_kernels.kv_quant import from_storage_as

DOT_NT = (((1,), (1,)), ((), ()))  # a @ b.T
DOT_NN = (((1,), (0,)), ((), ()))  # a @ b


def attend_chunk(carry, q, k_ref, v_ref, bt_ref, *, seq, layer, head, dcol, k_pos, k_ok, mask,
                 block_size, max_blocks, num_blocks, sm_scale, soft_cap):
    """carry = (acc [rows, d] f32, m [rows] f32, l [rows] f32), q [rows, d]; k_pos/k_ok [bk] (the
    cached position each K/V column reads); `head` the kv head, a scalar or [bk, 1] per column
    (decode_mha.py's columns are (token, head) pairs); mask [rows, bk] (which (row, column) pairs
    attend; must imply k_ok). Base-2 online softmax. An fp8 cache: K/V rows are converted to q's
    dtype in registers for the dots; `sm_scale` then carries the K scale (a traced scalar, or
    [rows, 1] per row) and the caller multiplies the output by the V scale."""
    acc, m_i, l_i = carry
    page = plgpu.load(bt_ref.at[seq, jnp.minimum(k_pos // block_size, max_blocks - 1)], mask=k_ok, other=0)
    blk = jnp.clip(page, 0, num_blocks - 1)[:, None]  # [bk, 1] i32
    off = (k_pos % block_size)[:, None]
    k = plgpu.load(k_ref.at[layer, blk, off, head, dcol], mask=k_ok[:, None], other=0)  # [bk, d]
    k = from_storage_as(k, q.dtype)  # [bk, d] q.dtype (an fp8 cache's bits converted in registers)
    logits = lax.dot_general(q, k, DOT_NT, preferred_element_type=jnp.float32)  # [rows, bk]
    if soft_cap is not None:
        logits = jnp.tanh(logits * (sm_scale / soft_cap)) * (soft_cap * LOG2E)
    else:
        logits = logits * (sm_scale * LOG2E)
    logits = jnp.where(mask, logits, MASK_VALUE)  # base-2 logits
    m_new = jnp.maximum(m_i, logits.max(axis=1))
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(logits - m_new[:, None])  # [rows, bk] f32
    v = plgpu.load(v_ref.at[layer, blk, off, head, dcol], mask=k_ok[:, None], other=0)  # [bk, d]
    v = from_storage_as(v, q.dtype)
    pv = lax.dot_general(p.astype(v.dtype), v, DOT_NN, preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_new, l_i * alpha + p.sum(axis=1)
