"""Multi-host: one mesh over every process's devices, the scheduler on process 0.

JAX is multi-controller: every process must launch the same jitted step, in the same order, with
the same host inputs. Process 0 runs the whole engine (scheduler, tokenizer, API); the others
build the same model and runner and then sit in `ModelRunner.follow()`. Before each step process
0 broadcasts a 3-int header (bucket T, S, decode_only; T = -1 means stop) and then the step's
numpy inputs (`multihost_utils.broadcast_one_to_all`); a follower builds an empty input of that
bucket's shapes to receive into, then runs the step. Sampled tokens are replicated, so process 0
reads them from its own devices.
"""
from __future__ import annotations

import jax
import numpy as np

STOP = -1


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def _broadcast(tree):
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dtypes = [np.asarray(x).dtype for x in leaves]
    wire = [np.asarray(x).astype(np.uint8) if d == np.bool_ else np.asarray(x) for x, d in zip(leaves, dtypes)]
    out = multihost_utils.broadcast_one_to_all(wire)
    return jax.tree_util.tree_unflatten(treedef, [np.asarray(x).astype(d) for x, d in zip(out, dtypes)])


class StepChannel:
    """Process 0 → all processes: which bucket runs next, and its inputs."""

    def __init__(self, empty_inputs):
        self.empty_inputs = empty_inputs  # (T, S, decode_only) -> StepInputs of that bucket's shapes

    def send(self, inp):
        """Process 0: announce and broadcast `inp`; returns what every process will run."""
        header = np.array([inp.tokens.shape[0], inp.seq_rows.shape[0], int(inp.metadata.decode_only)], np.int32)
        _broadcast(header)
        return _broadcast(inp)

    def stop(self) -> None:
        _broadcast(np.array([STOP, 0, 0], np.int32))

    def receive(self):
        """Followers: the next step's inputs, or None when process 0 stops."""
        T, S, decode_only = (int(v) for v in _broadcast(np.zeros(3, np.int32)))
        if T == STOP:
            return None
        return _broadcast(self.empty_inputs(T, S, bool(decode_only)))
