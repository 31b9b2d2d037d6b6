"""Gemma 2 and Gemma 3 text at tensor_parallel_size=2: logits of a two-prompt prefill (17 and 40 tokens,
past the 12-token window of the sliding layers) and a decode step (tests/parallel/tp_forward.py) within
1e-4 of tp=1. gemma2: sandwich norms, attention soft-cap inside the sharded attention, the final soft-cap
after the vocab-parallel LM head's gather; gemma3: q/k norms, the sliding layers' local rope table, one
kv head per device. One build per tp and arch, tiny configs (tests/models/hf_tiny.py GEMMA_CONFIGS)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.models.hf_tiny import make_tiny_hf
from tests.parallel.tp_forward import forward_logits


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp_gemma"))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_tp2_logits_equal_tp1(arch, root):
    path = make_tiny_hf(arch, root)
    ref_prefill, ref_decode = forward_logits(path, 1)
    got_prefill, got_decode = forward_logits(path, 2)
    assert np.abs(ref_prefill).max() > 0.05, "reference logits are degenerate: the comparison would be weak"
    np.testing.assert_array_less(np.abs(got_prefill - ref_prefill).max(), 1e-4)
    np.testing.assert_array_less(np.abs(got_decode - ref_decode).max(), 1e-4)
