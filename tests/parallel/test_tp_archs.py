"""Phi-3 and Granite at tensor_parallel_size=2: logits of a two-prompt prefill and a decode step
(tests/parallel/tp_forward.py) within 1e-4 of tp=1. phi3_longrope: the fused qkv_proj / gate_up_proj
split by the loader and re-fused shard-major, partial rotary, longrope's short set (17 tokens) and
long set (40 tokens) in one step; granite: its multipliers (the logits scaling after the vocab-parallel
LM head's gather). One build per tp and arch, tiny configs (tests/models/hf_tiny.py)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.models.hf_tiny import make_tiny_hf
from tests.parallel.tp_forward import forward_logits

ARCHS = ["phi3_longrope", "granite"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp_archs"))


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_logits_equal_tp1(arch, root):
    path = make_tiny_hf(arch, root)
    ref_prefill, ref_decode = forward_logits(path, 1)
    got_prefill, got_decode = forward_logits(path, 2)
    assert np.abs(ref_prefill).max() > 0.05, "reference logits are degenerate: the comparison would be weak"
    np.testing.assert_array_less(np.abs(got_prefill - ref_prefill).max(), 1e-4)
    np.testing.assert_array_less(np.abs(got_decode - ref_decode).max(), 1e-4)
