"""Device side of embedding steps: per-sequence sums and last hidden states of one flat batch.

An embed step runs the model over the scheduled prompt chunks (writing their KV, so a later chunk
of the same prompt attends to the earlier ones) and, instead of logits and sampling, reduces the
final hidden states per sequence: ``[S, E]`` f32 sums (MEAN pooling, summed over chunks by the
host, jaxllm/engine/pooling.py) and ``[S, E]`` f32 last-token states (LAST pooling). Both are
computed for every row; the host picks per request. A classify step (step_programs.classify_step)
returns instead the classifier head's ``[S, num_labels]`` f32 logits of each sequence's last token.
``PendingPool`` is the dispatched step.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxllm.core.scheduler_output import ScheduledSeq
from jaxllm.engine.pooling import PooledChunk
from jaxllm.runner.pending import start_copy


def pool_hidden(hidden: jax.Array, cu_q_lens: jax.Array, last_indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """hidden [T, E], cu_q_lens [S+1] i32 (padding sequences empty, padding tokens after cu[S]),
    last_indices [S] i32 → (sums [S, E] f32, last [S, E] f32)."""
    T, S = hidden.shape[0], last_indices.shape[0]
    seq_of_token = jnp.searchsorted(cu_q_lens[1:], jnp.arange(T, dtype=jnp.int32), side="right")  # [T] i32, S = padding
    h = hidden.astype(jnp.float32)  # [T, E] f32
    sums = jax.ops.segment_sum(h, seq_of_token, num_segments=S)  # [S, E] f32; padding tokens dropped
    return sums, h[last_indices]  # [S, E] f32 each


class PendingPool:
    """A dispatched embed step: ``result()`` waits, files ``{request_id: PooledChunk}`` into the
    runner's store (``take_pooled``) and returns ``{}`` (nothing is sampled)."""

    def __init__(self, seqs: list[ScheduledSeq], out, sink: Callable[[], dict]) -> None:
        self._seqs = seqs
        self._out = out  # (sums [S, E] f32, last [S, E] f32), or (logits [S, L] f32,), on device
        self._sink = sink
        self._marker = out[0] if out is not None else None
        if out is not None:
            start_copy(out)

    def wait_device(self) -> None:
        if self._marker is not None:
            self._marker.block_until_ready()

    def result(self) -> dict:
        if self._out is not None:
            outs = jax.device_get(self._out)
            store = self._sink()
            for i, s in enumerate(self._seqs):
                store[s.request_id] = (PooledChunk(outs[0][i], outs[1][i]) if len(outs) == 2
                                       else PooledChunk(None, None, logits=outs[0][i]))
            self._out = None
        return {}
