"""4-bit experts under tensor parallelism: an AWQ Mixtral checkpoint (uint4 experts with group scales and
offsets, tests/checkpoints/test_hf_int4_moe.py) at tp=2 holds each device's F/tp slice of every expert,
w_down's groups along F made finer where a group would straddle the two devices, and its logits equal
tp=1's; so do `--quantization int4`'s experts, whose groups are split the same way."""
from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from tests.models.hf_tiny import make_tiny_hf


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp_moe_int4"))


def test_awq_experts_tp2_equal_tp1(root):
    from tests.checkpoints.int4_tiny import write_int4
    from tests.parallel.tp_forward import prefill_logits

    ck_dir, _ = write_int4(make_tiny_hf("mixtral", root), os.path.join(root, "awq"), "awq", 32)
    seqs = [[5, 9, 200, 7, 1], list(range(3, 30))]
    _, _, one = prefill_logits(load_checkpoint(ck_dir), 1, "unroll", seqs)
    model, _, two = prefill_logits(load_checkpoint(ck_dir), 2, "unroll", seqs)
    down = model.layers[0].arrays()["we_down"]  # [X, F, E]: F = 96, 3 groups of 32
    assert down.q.dtype == jnp.uint4 and down.offset is not None
    assert down.scale.shape == (4, 6, 64) and down.offset.shape == (4, 6, 64)  # groups split in two: 3 a device
    assert down.q.addressable_shards[0].data.shape == (4, 48, 64)
    np.testing.assert_allclose(two, one, atol=1e-4 * np.abs(one).max(), rtol=0)
    assert np.abs(one).max() > 0.5


def test_int4_flag_tp2_equal_tp1(root):
    """--quantization int4 on Mixtral at tp=2: q int4 (unpacked under TP) split on F, w_down's one group
    of 96 per expert row split in two (48 a device, each half with the group's scale): the same weights,
    so logits equal tp=1's int4 ones."""
    from tests.parallel.tp_forward import prefill_logits

    ck = load_checkpoint(make_tiny_hf("mixtral", root))
    seqs = [[5, 9, 200, 7, 1], list(range(3, 30))]
    _, _, one = prefill_logits(load_checkpoint(ck.path), 1, "unroll", seqs, quantization="int4")
    model, _, two = prefill_logits(ck, 2, "unroll", seqs, quantization="int4")
    down = model.layers[0].arrays()["we_down"]
    assert down.q.dtype == jnp.int4 and down.scale.shape == (4, 2, 64)
    assert down.q.addressable_shards[0].data.shape == (4, 48, 64) and down.scale.addressable_shards[0].data.shape == (4, 1, 64)
    np.testing.assert_allclose(two, one, atol=1e-4 * np.abs(one).max(), rtol=0)
    assert np.abs(one).max() > 0.5
