"""Gemma at tensor_parallel_size=2: logits of a two-prompt prefill (17 and 40 tokens, past the 12-token
window of the sliding layers) and a decode step (tests/parallel/tp_forward.py) within 1e-4 of tp=1.
One tiny Gemma 3 text model that also carries Gemma 2's soft-caps (HF's Gemma3TextConfig reads both), so
one build per tp covers every sharded Gemma piece: sandwich norms, the attention soft-cap inside the
sharded attention and the final soft-cap after the vocab-parallel LM head's gather (Gemma 2's), q/k
norms, the sliding layers' local rope table and one kv head per device (Gemma 3's). (No HF reference
here: transformers' Gemma3Attention reads attn_logit_softcapping but does not apply it; jaxllm does.)"""
from __future__ import annotations

import os

import numpy as np

from tests.models.hf_tiny import GEMMA_CONFIGS, randomize_norms
from tests.parallel.tp_forward import forward_logits

# tests/models/hf_tiny.py's gemma3 (3 layers: sliding, sliding, full; head_dim 256; 2 kv heads) with gemma2's caps
CAPPED_GEMMA3 = dict(GEMMA_CONFIGS["gemma3"][1], attn_logit_softcapping=1.0, final_logit_softcapping=3.0)


def make_capped_gemma3(root: str) -> str:
    """The tiny random checkpoint (norm weights drawn: hf_tiny.randomize_norms)."""
    import torch
    import transformers

    path = os.path.join(root, "gemma3-capped")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Gemma3TextConfig(**CAPPED_GEMMA3),
                                                          dtype=torch.float32)
    randomize_norms(model)
    model.save_pretrained(path)
    return path


def test_tp2_logits_equal_tp1(tmp_path):
    from checkpoints import load_checkpoint

    path = make_capped_gemma3(str(tmp_path))
    c = load_checkpoint(path).config
    assert (c.attn_logit_softcap, c.final_logit_softcap, c.qk_norm, c.sandwich_norms) == (1.0, 3.0, True, True)
    assert c.layer_types == ("sliding_attention", "sliding_attention", "full_attention") and c.rope_local_theta
    assert c.num_kv_heads == 2
    ref_prefill, ref_decode = forward_logits(path, 1)
    got_prefill, got_decode = forward_logits(path, 2)
    assert np.abs(ref_prefill).max() > 0.05, "reference logits are degenerate: the comparison would be weak"
    np.testing.assert_array_less(np.abs(got_prefill - ref_prefill).max(), 1e-4)
    np.testing.assert_array_less(np.abs(got_decode - ref_decode).max(), 1e-4)


def test_tp2_hybrid_kv_cache_equals_classic(tmp_path):
    """The hybrid KV cache layout (3 groups of one layer slot: full, sliding, sliding; in the decode step a
    sliding group's blocks before its window are null, pointing at another group's block) at tp=2: the
    tp=1 classic cache's logits (f32), and the tp=2 classic cache's with an fp8 cache (per-layer scales,
    pages per slot; tp=1 and tp=2 fp8 differ by their rounding alone)."""
    import jax.numpy as jnp

    path = make_capped_gemma3(str(tmp_path))
    for kv_dtype, ref_tp in ((jnp.float32, 1), (jnp.float8_e4m3fn, 2)):
        ref_prefill, ref_decode = forward_logits(path, ref_tp, kv_dtype=kv_dtype)
        got_prefill, got_decode = forward_logits(path, 2, kv_dtype=kv_dtype, hybrid=True)
        np.testing.assert_array_less(np.abs(got_prefill - ref_prefill).max(), 1e-4)
        np.testing.assert_array_less(np.abs(got_decode - ref_decode).max(), 1e-4)


def test_tp2_engine_hybrid_kv_cache_greedy_equals_tp1(tmp_path):
    """The serving engine on tests/models/hf_tiny.py's gemma3 with the hybrid KV cache (3 groups of one slot:
    full, sliding, sliding; window 12, block_size 4, steps of 16 tokens) at tp=2: the tp=1 engine's greedy
    tokens and top logprobs. Prompts of 30 and 37 tokens (chunked prefill) run past the window, so the sliding
    groups free blocks; the second shares the first's 24-token prefix, a prefix-cache hit in every group."""
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    from jaxllm.llm import LLM
    from jaxllm.sampling_params import SamplingParams

    from tests.models.hf_tiny import make_tiny_hf

    path = make_tiny_hf("gemma3", str(tmp_path))  # no soft-caps: greedy tokens vary on the tiny weights
    rng = np.random.default_rng(0)
    first = rng.integers(0, 250, 30).tolist()
    prompts = [first, first[:24] + rng.integers(0, 250, 13).tolist()]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    outs, freed = {}, {}
    for tp in (1, 2):
        e = build_engine(EngineConfig(model=path, tensor_parallel_size=tp, max_model_len=64, block_size=4,
                                      max_num_seqs=2, max_num_batched_tokens=16, dtype="float32",
                                      kv_cache_memory_bytes=96 * 2 * 4 * 2 * 256 * 4), compile_cache=False,
                         warmup=False)
        assert e.kv_groups.hybrid and [g.window for g in e.kv_groups.groups] == [None, 12, 12]
        nulls = []
        real = e.kv.group_block_tables  # what the scheduler reads each step
        e.kv.group_block_tables = lambda rid: (t := real(rid), nulls.append(int((t[1] < 0).sum())))[0]
        llm = LLM("gemma", engine=e)
        outs[tp] = [llm.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0] for p in prompts]
        assert e.kv.prefix_hits >= 24 and e.kv.num_free_blocks == e.kv.num_blocks
        freed[tp] = max(nulls)
    for r, g in zip(*outs.values()):
        assert g.token_ids == r.token_ids
        for lr, lg in zip(r.logprobs, g.logprobs):
            assert set(lg) == set(lr)
            np.testing.assert_allclose([lg[t].logprob for t in lr], [lr[t].logprob for t in lr], atol=1e-4, rtol=0)
    assert freed[1] == freed[2] > 0  # the sliding groups freed out-of-window blocks
    assert len({t for o in outs[1] for t in o.token_ids}) > 3  # not one repeated token (the first prompt's is)
