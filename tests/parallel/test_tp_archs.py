"""Phi-3, Granite and a sequence classifier at tensor_parallel_size=2: logits of a two-prompt prefill and a decode step
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


def test_tp2_classifier_logits_equal_hf(root):
    """A sequence classifier (tiny LlamaForSequenceClassification, 3 labels) through LLM.classify at
    tp=2: the replicated `score` head on the last token of each prompt (one chunked past the 32-token
    budget) gives HF's logits within 1e-4."""
    from jaxllm.llm import LLM
    from jaxllm.pooling_params import PoolingParams
    from tests.models.hf_tiny import hf_classifier_logits, make_tiny_hf_classifier

    path = make_tiny_hf_classifier("llama", root, num_labels=3)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 256, n).tolist() for n in (3, 20, 70)]
    llm = LLM(path, tensor_parallel_size=2, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=128,
              kv_cache_memory_bytes=1 << 22)
    import jax
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(llm.engine.runner.state)} == {2}
    got = [o.outputs.probs for o in llm.classify(seqs, PoolingParams(activation=False), use_tqdm=False)]
    want = hf_classifier_logits(path, seqs)
    assert np.std([w[0] for w in want]) > 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=0)
    stats = llm.engine.get_stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]
