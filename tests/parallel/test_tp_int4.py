"""4-bit weights under tensor parallelism: a GPTQ (asymmetric, group 32: uint4 + offsets), a
symmetric GPTQ (int4, no offsets), an AWQ and a GGUF Q4_1 checkpoint stay 4-bit, q sharded like the
weight and the group scales and offsets like the weight (jaxllm/parallel/layout.py), w_down's 3
groups of 32 along its sharded F = 96 split finer so none straddles two devices; the logits at tp=2
and tp=4 (2 kv heads repeated) equal tp=1's and the fp32 checkpoint of the same weights; greedy
tokens at tp=2 equal tp=1's. All on the einsum path (the chunked dot is one-device only)."""
from __future__ import annotations

import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.models.llama import MODEL_AXES
from jaxllm.models.quant import QuantWeight
from tests.checkpoints.gguf_tiny import tiny_llama_hd32, write_gguf_from_hf
from tests.checkpoints.int4_tiny import write_int4
from tests.parallel.tp_forward import prefill_logits

SEQS = [list(range(3, 20)), list(range(100, 140))]  # 17 tokens: blockwise dot; 40: dequantized dot
SHORT = ("wqkv", "wo", "w_gate_up", "w_down")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tp_int4"))
    hf = tiny_llama_hd32(root)
    out = {"gptq": write_int4(hf, f"{root}/gptq", "gptq", 32, False),
           "gptq-sym": write_int4(hf, f"{root}/gptq-sym", "gptq", 32, True),
           "awq": write_int4(hf, f"{root}/awq", "awq", 32, False)}
    q4 = write_gguf_from_hf(hf, f"{root}/q4_1.gguf", "Q4_1")
    out["q4_1"] = (q4, None)
    return out


def _logits(path, tp, layer_loop):
    return prefill_logits(load_checkpoint(path), tp, layer_loop, SEQS)


@pytest.mark.parametrize("kind", ["gptq", "gptq-sym", "awq", "q4_1"])
def test_int4_sharded_matches_tp1_and_fp32(ckpts, kind, monkeypatch):
    monkeypatch.setenv("JAXLLM_GGUF_Q4", "keep")
    path, ref = ckpts[kind]
    m1, _, tp1 = _logits(path, 1, "scan")
    assert m1.quantization == "int4"
    if ref is not None:
        _, _, want = _logits(ref, 1, "scan")
        np.testing.assert_allclose(tp1, want, atol=2e-4 * np.abs(want).max(), rtol=0)
    for tp, loop in ((2, "unroll"), (4, "scan")):
        model, layout, got = _logits(path, tp, loop)
        assert model.quantization == "int4"
        np.testing.assert_allclose(got, tp1, atol=2e-5 * np.abs(tp1).max(), rtol=0, err_msg=f"tp={tp} {loop}")
        held = model.layers.arrays() if loop == "scan" else model.layers[0].arrays()
        lead = 0 if loop == "scan" else 1
        for short in SHORT:
            w = held[short]
            assert isinstance(w, QuantWeight) and w.method == "int4" and w.scale.ndim == w.q.ndim, short
            assert (w.offset is None) == (kind == "gptq-sym"), short
            axes = MODEL_AXES[f"layers.{short}"][lead:]
            for a in (w.q, w.scale) + (() if w.offset is None else (w.offset,)):
                spec = tuple(layout.spec(axes)) + (None,) * 8
                assert "tp" in spec, short
                expected = tuple(d // tp if sp == "tp" else d for d, sp in zip(a.shape, spec))
                assert all(s.data.shape == expected for s in a.addressable_shards), (short, a.shape, expected)
        assert held["w_down"].scale.shape[-2] == (6 if tp == 2 else 12)  # 3 groups along F=96, split finer
        if held["w_down"].offset is not None:
            assert held["w_down"].offset.shape == held["w_down"].scale.shape


def test_greedy_under_tp2_equals_tp1(ckpts):
    from jaxllm import LLM, SamplingParams
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    path, _ = ckpts["gptq"]
    prompts = [{"prompt_token_ids": p} for p in ([5, 6, 7], list(range(30, 52)))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for tp in (1, 2):
        e = build_engine(EngineConfig(model=path, tensor_parallel_size=tp, max_model_len=64, block_size=16,
                                      max_num_seqs=2, max_num_batched_tokens=32, kv_cache_memory_bytes=1 << 20),
                         compile_cache=False, warmup=False)
        assert e.config.quantization == "int4", tp
        outs[tp] = [o.outputs[0].token_ids for o in LLM("tiny", engine=e).generate(prompts, params, use_tqdm=False)]
    assert outs[2] == outs[1]


def test_int4_at_load_tp2_equals_tp1(tmp_path_factory):
    """`--quantization int4` on a full-precision checkpoint: at tp=2 (einsum path, group scales sharded
    like the weight; w_down's one group of 96 along its sharded F split into two of 48) the logits
    equal tp=1's (the chunked dot on uint8 pairs) and the int4 weights are the same."""
    hf = tiny_llama_hd32(str(tmp_path_factory.mktemp("tp_int4_rtn")))
    got, w_down = {}, {}
    for tp in (1, 2):
        model, _, got[tp] = prefill_logits(load_checkpoint(hf), tp, "scan", SEQS, quantization="int4")
        assert model.quantization == "int4"
        wd = w_down[tp] = model.layers.arrays()["w_down"]
        assert wd.method == "int4" and wd.scale.shape[-2] == tp  # F = 96: one group, split in two at tp=2
    assert all(s.data.shape[-2] == 1 for s in w_down[2].scale.addressable_shards)
    np.testing.assert_array_equal(np.asarray(w_down[2].unpacked().q), np.asarray(w_down[1].unpacked().q))
    assert np.abs(got[1]).max() > 0.5
    np.testing.assert_allclose(got[2], got[1], atol=2e-5 * np.abs(got[1]).max(), rtol=0)
