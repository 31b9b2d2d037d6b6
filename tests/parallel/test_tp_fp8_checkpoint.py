"""An fp8 HF checkpoint (checkpoints/hf_fp8.py) under tensor parallelism: its float8 projections are
placed as stored, sharded like `--quantization fp8`'s (q like the weight, per-channel scales like
the weight's output axes, block scales like the weight, a row-parallel weight's blocks split finer
where they would straddle shards), and the logits equal the same checkpoint's at tp=1 and the
numpy-dequantized fp32 reference's; tp=4 repeats the 2 kv heads (and their scales)."""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.models.llama import MODEL_AXES
from jaxllm.models.quant import QuantWeight, scale_axes
from tests.checkpoints.fp8_tiny import ct_config, make_fp8
from tests.parallel.tp_forward import prefill_logits

SEQS = [list(range(3, 20)), list(range(100, 140))]
FP8_BLOCK = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _logits(path, tp, layer_loop):
    return prefill_logits(load_checkpoint(path), tp, layer_loop, SEQS)


@pytest.mark.parametrize("name,qc,strategy", [("ct-channel", ct_config("channel", True), "channel"),
                                               ("fp8-block", FP8_BLOCK, "block")])
def test_fp8_checkpoint_tp_matches_tp1_and_reference(name, qc, strategy, tmp_path):
    fp8_dir, ref_dir = make_fp8(str(tmp_path), name, qc, strategy)
    _, _, want = _logits(ref_dir, 1, "scan")
    _, _, tp1 = _logits(fp8_dir, 1, "scan")
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(tp1, want, atol=2e-5 * np.abs(want).max(), rtol=0)
    for tp, loop in ((2, "unroll"), (4, "scan")):
        model, layout, got = _logits(fp8_dir, tp, loop)
        np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0, err_msg=f"tp={tp} {loop}")
        held = model.layers.arrays() if loop == "scan" else model.layers[0].arrays()
        lead = 0 if loop == "scan" else 1
        for short in ("wqkv", "wo", "w_gate_up", "w_down"):
            w = held[short]
            assert isinstance(w, QuantWeight) and w.q.dtype == jnp.dtype(ml_dtypes.float8_e4m3fn), short
            axes = MODEL_AXES[f"layers.{short}"]
            n = 2 if short == "wo" else 1
            s_axes = axes if strategy == "block" else scale_axes(axes, n)
            for a, ax in ((w.q, axes[lead:]), (w.scale, s_axes[lead:])):
                spec = tuple(layout.spec(ax)) + (None,) * 8
                expected = tuple(d // tp if sp == "tp" else d for d, sp in zip(a.shape, spec))
                assert all(s.data.shape == expected for s in a.addressable_shards), (short, a.shape, expected)
            if strategy == "block" and short == "w_down":  # 320 / 64 = 5 blocks: split finer to shard over tp
                assert w.scale.shape[-2] % tp == 0 and w.scale.shape[-2] > 5


def test_checkpoint_kv_scales_under_tp4_follow_repeated_heads(tmp_path):
    """tp=4 > 2 kv heads: each kv head is repeated twice, and so is its stored per-head KV scale;
    the scales are sharded with their heads (one per device) and one request decodes."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    k = [[0.02, 0.03], [0.04, 0.05]]  # [L, K]
    v = [[0.01, 0.02], [0.03, 0.06]]
    fp8_dir, _ = make_fp8(str(tmp_path), "kv", ct_config("channel", True), "channel",
                          kv_scales={"self_attn.k_scale": k, "self_attn.v_scale": v})
    e = build_engine(EngineConfig(model=fp8_dir, tensor_parallel_size=4, max_model_len=64, block_size=16,
                                  max_num_seqs=2, max_num_batched_tokens=32, kv_cache_dtype="fp8",
                                  kv_cache_memory_bytes=1 << 20), compile_cache=False, warmup=False)
    ks, vs = e.runner.kv_cache.k_scale, e.runner.kv_cache.v_scale  # [L, 4]
    np.testing.assert_array_equal(np.asarray(ks), np.repeat(np.asarray(k, np.float32), 2, axis=1))
    np.testing.assert_array_equal(np.asarray(vs), np.repeat(np.asarray(v, np.float32), 2, axis=1))
    assert all(s.data.shape == (2, 1) for s in ks.addressable_shards)
    out = LLM("tiny", engine=e).generate([{"prompt_token_ids": [5, 6, 7]}],
                                         SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
