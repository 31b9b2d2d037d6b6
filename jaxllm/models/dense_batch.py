"""Build a flat ragged batch for whole sequences with contiguous private blocks.

Used by the model parity tests and the no-engine forward; the engine's model runner builds its
batches from the scheduler's block tables instead.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from pallas_kernels import AttentionMetadata


def prefill_batch(seqs: list[list[int]], block_size: int):
    """seqs: token ids per sequence → (tokens [T], positions [T], metadata, num_blocks needed).

    Sequence i gets blocks [base_i, base_i + ceil(len_i / block_size)) so nothing is shared.
    """
    lens = [len(s) for s in seqs]
    nblocks = [-(-n // block_size) for n in lens]
    max_blocks = max(nblocks)
    bases = np.concatenate([[0], np.cumsum(nblocks)[:-1]]).astype(np.int64)
    block_tables = np.zeros((len(seqs), max_blocks), np.int32)  # [S, max_blocks]
    slots, positions = [], []
    for i, n in enumerate(lens):
        block_tables[i, :nblocks[i]] = bases[i] + np.arange(nblocks[i])
        pos = np.arange(n)
        positions.append(pos)
        slots.append(block_tables[i, pos // block_size] * block_size + pos % block_size)
    meta = AttentionMetadata(
        slot_mapping=jnp.asarray(np.concatenate(slots), jnp.int32),
        block_tables=jnp.asarray(block_tables),
        context_lens=jnp.asarray(lens, jnp.int32),
        cu_q_lens=jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32),
    )
    tokens = jnp.asarray(np.concatenate(seqs), jnp.int32)
    return tokens, jnp.asarray(np.concatenate(positions), jnp.int32), meta, int(sum(nblocks))
