"""The tiny Llama's forward outside the engine (tests/parallel/tp_forward.py: a two-prompt ragged
prefill, then a decode step) at tp 2, 4 and 8 (8 heads / 4 kv heads; tp=8 replicates kv heads): logits
within 1e-4 of tp=1 in both layer loops, the fused qkv / gate_up split adding no collective; Qwen2's
fused bias and Qwen3's q/k norm sharded; an fp8 KV cache at tp=2 (forward, and the served engine's
pages and calibrated scales), and prompt logprobs through that tp=2 engine. The serving engine at tp
1/4/8: test_tp_engine.py."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.llm import LLM
from jaxllm.sampling_params import SamplingParams
from pallas_kernels import KVCache
from tests.parallel.tiny_engine import engine_factory
from tests.parallel.tiny_llama import make_tiny_llama
from tests.parallel.tp_forward import BLOCK, PROMPTS, forward_logits


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tp")))


@pytest.fixture(scope="module")
def engines(path):
    return engine_factory(path)


def test_logits_match_tp1(path):
    ref_prefill, ref_decode = forward_logits(path, 1, "scan")
    assert np.ptp(ref_prefill) > 1.0  # real random weights, not near-constant logits
    # each tp once, both loops covered (scan vs unroll at tp=1 is the HF parity tests' job)
    for tp, loop in ((2, "unroll"), (4, "scan"), (8, "unroll")):
        prefill, decode = forward_logits(path, tp, loop)
        np.testing.assert_allclose(prefill, ref_prefill, atol=1e-4, rtol=0, err_msg=f"tp={tp} {loop}")
        np.testing.assert_allclose(decode, ref_decode, atol=1e-4, rtol=0, err_msg=f"tp={tp} {loop}")


COLLECTIVE = r"= (\S+?)\{[^}]*\} (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("


# the (tp, loop) pairs test_logits_match_tp1 compiled: the HLO comes from its programs, no compile of its own
@pytest.mark.parametrize("tp,layer_loop", [(4, "scan"), (2, "unroll")])
def test_fused_split_adds_no_collective(path, tp, layer_loop):
    """The decode forward at tp=4 (scan) and tp=2 (unroll) (kv heads sharded at both): splitting the
    fused qkv / gate_up outputs communicates nothing: one all-reduce for the embedding, two per layer
    body, one all-gather of the [S, V] logits; no weight or activation gathered, permuted or scattered."""
    import re

    _, _, hlo = forward_logits(path, tp, layer_loop, hlo=True)
    ops = sorted(m.groups() for m in re.finditer(COLLECTIVE, hlo))
    bodies = 1 if layer_loop == "scan" else 2  # the tiny model has 2 layers
    assert ops == [("f32[2,512]", "all-gather")] + [("f32[2,64]", "all-reduce")] * (1 + 2 * bodies), ops


@pytest.mark.parametrize("arch,tps", [("qwen2", (2, 4)), ("qwen3", (3, 6))])
def test_bias_and_qk_norm_archs_match_tp1(arch, tps, tmp_path_factory):
    """Qwen2 (q/k/v bias fused into bqkv, MQA: kv head repeated 2 and 4 times) and Qwen3 (q/k norm
    after the split; kv heads sharded at tp=3, repeated at tp=6): sharded logits match tp=1 in both
    layer loops."""
    from tests.models.hf_tiny import make_tiny_hf

    path = make_tiny_hf(arch, str(tmp_path_factory.mktemp("hf")))
    ref_prefill, ref_decode = forward_logits(path, 1, "scan")
    for tp, loop in ((tps[0], "scan"), (tps[1], "unroll")):
        prefill, decode = forward_logits(path, tp, loop)
        np.testing.assert_allclose(prefill, ref_prefill, atol=1e-4, rtol=0, err_msg=f"{arch} tp={tp} {loop}")
        np.testing.assert_allclose(decode, ref_decode, atol=1e-4, rtol=0, err_msg=f"{arch} tp={tp} {loop}")


def test_fp8_kv_cache_tp2_equals_tp1(engines, path):
    """kv_cache_dtype="fp8" (pallas_kernels/kv_quant.py) at tp=2: prefill and decode logits equal
    tp=1's over an fp8 cache (the scales are per kv head, so no device needs another's); the served
    runner holds each device's heads' pages and scales, the scales calibrated at start equal to
    tp=1's (jaxllm/runner/kv_calibration.py), and 8x the blocks of the tp=1 f32 cache in the same
    kv_cache_memory_bytes per device (x2 heads, x4 bytes)."""
    ref_prefill, ref_decode = forward_logits(path, 1, "scan", kv_dtype=jnp.float8_e4m3fn)
    prefill, decode = forward_logits(path, 2, "unroll", kv_dtype=jnp.float8_e4m3fn)
    np.testing.assert_allclose(prefill, ref_prefill, atol=1e-4, rtol=0)
    np.testing.assert_allclose(decode, ref_decode, atol=1e-4, rtol=0)
    e = engines(2, "fp8", warmup=False)  # compiles only the buckets it runs
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    out = LLM("tiny", engine=e).generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    kc = e.runner.kv_cache
    assert kc.quantized and kc.k.dtype == jnp.uint8
    L, _, _, K, D = kc.k.shape
    f32_tp1 = KVCache.bytes_per_block(L, BLOCK, K, D, jnp.float32)
    assert kc.num_blocks == 8 * (e.config.kv_cache_memory_bytes // f32_tp1)
    for name in ("k", "v"):
        pages, scale = getattr(kc, name), getattr(kc, f"{name}_scale")
        L, N, B, K, D = pages.shape
        assert [s.data.shape for s in pages.addressable_shards] == [(L, N, B, K // 2, D)] * 2
        assert [s.data.shape for s in scale.addressable_shards] == [(L, K // 2)] * 2
        assert (np.asarray(scale) > 0).all()
        tp1 = np.asarray(getattr(engines(1, "fp8", warmup=False).runner.kv_cache, f"{name}_scale"))  # [L, 4]
        np.testing.assert_allclose(np.asarray(scale), tp1, rtol=1e-5)
        # tp=8 repeats each kv head on two devices: each copy calibrates to its head's tp=1 scale
        tp8 = np.asarray(getattr(engines(8, "fp8", warmup=False).runner.kv_cache, f"{name}_scale"))  # [L, 8]
        np.testing.assert_allclose(tp8, np.repeat(tp1, 2, axis=1), rtol=1e-5)


def test_prompt_logprobs_tp2_equal_tp1(engines):
    """Prompt logprobs (the LM-head pass over every prompt position on vocab-parallel weights) and
    greedy tokens through the served tp=2 engine equal tp=1's: the fp8-cache engines the test above
    built (scales equal across tp), so no engine is built for this alone, and the prompt that test
    ran, one step (no decode bucket to compile at tp=1); tp 4 and 8 with an f32 cache and all four
    prompts: test_tp_engine.py."""
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=3)
    prompts = [{"prompt_token_ids": PROMPTS[0]}]  # 17 tokens: 16 prompt positions with logprobs
    ref, got = (LLM("tiny", engine=engines(tp, "fp8", warmup=False)).generate(prompts, params, use_tqdm=False)
                for tp in (1, 2))
    for r, g in zip(ref, got):
        assert g.outputs[0].token_ids == r.outputs[0].token_ids
        assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(r.prompt_token_ids)
        assert len(g.prompt_logprobs) == len(r.prompt_logprobs)
        for lr, lg in zip(r.prompt_logprobs[1:], g.prompt_logprobs[1:]):  # {id: Logprob}: the prompt token + top 3
            assert set(lg) == set(lr) and len(lr) >= 3
            np.testing.assert_allclose([lg[t].logprob for t in lr], [lr[t].logprob for t in lr], atol=1e-4, rtol=0)
            assert [lg[t].rank for t in lr] == [lr[t].rank for t in lr]
    spread = [v.logprob for lp in ref[0].prompt_logprobs[1:] for v in lp.values()]
    assert np.ptp(spread) > 0.5  # real distributions, not a flat vocabulary
