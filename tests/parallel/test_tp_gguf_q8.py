"""A Q8_0 GGUF under tensor parallelism: its projections stay int8 with the file's f16 block-32
scales, sharded like an fp8 checkpoint's block-scaled ones (jaxllm/parallel/layout.py: q like the
weight, block scales like the weight, w_down's 96 / 32 = 3 blocks split finer so they shard over
tp; only that axis: wo's blocks run along head_dim, wqkv's along the hidden axis, unsplit), each
device holding 1/tp of them; the logits at tp=2, tp=4 (2 kv heads repeated) and tp=3 (a 6-head model:
32 has no divisor r making one head_dim block 3-way splittable, so only a sharded axis may be split)
equal tp=1's and those of the same file dequantized by the gguf package; greedy outputs and logprobs
in the engine at tp=4 (kv heads repeated; tp=2's sharding is the logits test's) equal tp=1's."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints.gguf_loader as gguf_loader
from checkpoints import load_checkpoint
from jaxllm.models.llama import MODEL_AXES
from jaxllm.models.quant import QuantWeight
from tests.checkpoints.gguf_tiny import tiny_llama_hd32, write_gguf_from_hf
from tests.parallel.tp_forward import prefill_logits

SEQS = [list(range(3, 20)), list(range(100, 140))]  # 17 tokens: blockwise dot; 40: dequantized dot
SHORT = ("wqkv", "wo", "w_gate_up", "w_down")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp_q8"))


@pytest.fixture(scope="module")
def q8(root):
    return write_gguf_from_hf(tiny_llama_hd32(root), f"{root}/q8.gguf", "Q8_0")


def _logits(path, tp, layer_loop, dequantized=False):
    if dequantized:  # the gguf package's dequantization of the same file (the loader's fp32 path)
        mp = pytest.MonkeyPatch()
        mp.setattr(gguf_loader, "kept_projections", lambda tensors, config: {})
        try:
            ck = load_checkpoint(path)
        finally:
            mp.undo()
    else:
        ck = load_checkpoint(path)
    return prefill_logits(ck, tp, layer_loop, SEQS)


# model (heads, kv heads, hidden) -> [(tp, layer loop, w_down's blocks along its sharded F = 96)]
CASES = {(4, 2, 64): [(2, "unroll", 6), (4, "scan", 12)], (6, 3, 96): [(3, "scan", 3)]}


@pytest.mark.parametrize("shape", list(CASES), ids=["4h2kv", "6h3kv"])
def test_q8_0_stays_int8_under_tp_and_matches_tp1(root, shape):
    h, k, e = shape
    q8 = write_gguf_from_hf(tiny_llama_hd32(root, h, k, e), f"{root}/q8-{h}h{k}kv.gguf", "Q8_0")
    _, _, want = _logits(q8, 1, "scan", dequantized=True)
    m1, _, tp1 = _logits(q8, 1, "scan")
    assert m1.quantization == "int8" and np.abs(want).max() > 0.5
    np.testing.assert_allclose(tp1, want, atol=2e-4 * np.abs(want).max(), rtol=0)
    for tp, loop, down_blocks in CASES[shape]:
        model, layout, got = _logits(q8, tp, loop)
        assert model.quantization == "int8"
        np.testing.assert_allclose(got, tp1, atol=2e-5 * np.abs(tp1).max(), rtol=0, err_msg=f"tp={tp} {loop}")
        held = model.layers.arrays() if loop == "scan" else model.layers[0].arrays()
        lead = 0 if loop == "scan" else 1
        for short in SHORT:
            w = held[short]
            assert isinstance(w, QuantWeight) and w.q.dtype == jnp.int8 and w.scale.dtype == jnp.float16, short
            assert w.scale.ndim == w.q.ndim, short  # block scales, not per channel
            axes = MODEL_AXES[f"layers.{short}"][lead:]
            for a in (w.q, w.scale):
                spec = tuple(layout.spec(axes)) + (None,) * 8
                assert "tp" in spec, short
                expected = tuple(d // tp if sp == "tp" else d for d, sp in zip(a.shape, spec))
                assert all(s.data.shape == expected for s in a.addressable_shards), (short, a.shape, expected)
        # w_down [.., F=96, E]: 3 blocks of 32 along the sharded input, split finer where tp needs it;
        # wo [.., H, D=32, E] and wqkv [.., E, qkv, D]: their blocked axes are not sharded, not split
        assert held["w_down"].scale.shape[-2] == down_blocks
        assert held["wo"].scale.shape[-2] == 1 and held["wqkv"].scale.shape[-3] == e // 32


def test_greedy_under_tp_equals_tp1(q8):
    from jaxllm import LLM, SamplingParams
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    prompts = [{"prompt_token_ids": p} for p in ([5, 6, 7], list(range(30, 52)))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    outs = {}
    for tp in (1, 4):
        e = build_engine(EngineConfig(model=q8, tensor_parallel_size=tp, max_model_len=64, block_size=16,
                                      max_num_seqs=2, max_num_batched_tokens=32, kv_cache_memory_bytes=1 << 20),
                         compile_cache=False, warmup=False)
        assert e.config.quantization == "int8", tp
        outs[tp] = [o.outputs[0] for o in LLM("tiny", engine=e).generate(prompts, params, use_tqdm=False)]
    for tp in (4,):
        for r, g in zip(outs[1], outs[tp]):
            assert g.token_ids == r.token_ids, tp
            for lr, lg in zip(r.logprobs, g.logprobs):
                assert set(lg) == set(lr), tp
                np.testing.assert_allclose([lg[t].logprob for t in lr], [lr[t].logprob for t in lr], atol=1e-4)
