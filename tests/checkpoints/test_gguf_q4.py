"""GGUF Q4_0 / Q4_1 kept 4-bit (checkpoints/gguf_quant.py): a tiny file written by the gguf package
loads its seven projections as int4 (Q4_0: q - 8) or uint4 + f16 offsets (Q4_1: w = d*q + m), checked
against the same file dequantized by the gguf package (JAXLLM_GGUF_Q4=fp32, the loader's path of
before: an independent parse of the bytes): weights exact, logits close on both matmul paths (the
CPU chunked dot, and the einsum path with its per-block dots and offset term), greedy equal; the
flag rules (int8 re-quantizes the dequantized weights) and the env switch back to fp32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from checkpoints.errors import CheckpointError
from jaxllm.models import quant_dot
from jaxllm.models.llama import build_model
from jaxllm.models.quant import QuantWeight, dequantize, weight_bytes
from tests.checkpoints.gguf_tiny import tiny_llama_hd32, write_gguf_from_hf
from tests.engine_checks import logits_of

PROJ = ("layers.wq", "layers.wk", "layers.wv", "layers.wo", "layers.w_gate", "layers.w_up", "layers.w_down")
SEQS = [[3, 9, 27], list(range(40, 57)), list(range(100, 140))]  # 60 tokens in all


@pytest.fixture(autouse=True)
def keep_q4(monkeypatch):
    """4-bit on every backend (what the default, "auto", does too)."""
    monkeypatch.setenv("JAXLLM_GGUF_Q4", "keep")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gguf_q4"))
    hf = tiny_llama_hd32(root)
    return {t: write_gguf_from_hf(hf, f"{root}/{t}.gguf", t) for t in ("Q4_0", "Q4_1")}


def load_both(path):
    """(kept 4-bit checkpoint, the same file dequantized to fp32 by the gguf package)."""
    kept = load_checkpoint(path)
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXLLM_GGUF_Q4", "fp32")
    try:
        ref = load_checkpoint(path)
    finally:
        mp.undo()
    return kept, ref


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_loads_4bit_and_matches_dequantized(files, qtype, monkeypatch):
    kept, ref = load_both(files[qtype])
    c = kept.config
    for name in PROJ:
        w = kept.params[name]
        assert isinstance(w, QuantWeight) and w.method == "int4", name
        assert w.q.dtype == (jnp.int4 if qtype == "Q4_0" else jnp.uint4), name
        assert (w.offset is None) == (qtype == "Q4_0") and w.scale.dtype == np.float16, name
        blocked = 2 if name == "layers.wo" else 1
        assert w.scale.ndim == w.q.ndim and w.scale.shape[blocked] * 32 == w.q.shape[blocked]
        # the file's nibbles, scales (and mins) reproduce the gguf package's d*(q-8) / d*q + m exactly
        np.testing.assert_array_equal(dequantize(w, blocked, stacked=True, dtype=np.float32, xp=np),
                                      ref.params[name], err_msg=name)
        assert weight_bytes(w) <= (0.5 + 4 / 32) * w.q.size  # 4 bits + f16 d (+ f16 m) per 32
        assert not isinstance(ref.params[name], QuantWeight)
    mf = build_model(c, dict(ref.params), jnp.float32, layer_loop="scan")
    want = logits_of(mf, c, SEQS)
    assert np.abs(want).max() > 0.5
    for loop, chunked in (("scan", True), ("unroll", True), ("scan", False)):
        monkeypatch.setattr(quant_dot, "ENABLED", chunked)  # False: the einsum path (GPU's / TP's)
        mq = build_model(c, dict(kept.params), jnp.float32, layer_loop=loop)
        assert mq.quantization == "int4"
        held = mq.layers.arrays() if loop == "scan" else mq.layers[0].arrays()
        kind = "int4" if qtype == "Q4_0" else "uint4"
        if chunked:  # the CPU chunked dot's form: uint8, two values a byte (quant_pack4.py)
            assert held["wqkv"].packed == kind and held["wqkv"].q.dtype == jnp.uint8
        else:
            assert held["wqkv"].packed is None and held["wqkv"].q.dtype == jnp.dtype(kind)
        got = logits_of(mq, c, SEQS)
        np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0, err_msg=f"{loop} {chunked}")
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_q4_flag_rules_and_fp32_switch(files, monkeypatch):
    """--quantization int8 on a Q4_1 file: its weights dequantized, then int8 per channel (as before);
    JAXLLM_GGUF_Q4=fp32: no 4-bit weights at all; auto (the default): 4-bit, CPU included; another value: one line;
    quantization='int4' names the file's own 4-bit weights."""
    path = files["Q4_1"]
    ck = load_checkpoint(path)
    m8 = build_model(ck.config, ck.params, jnp.float32, quantization="int8")
    assert m8.quantization == "int8" and m8.layers.arrays()["wqkv"].scale.ndim == 3  # per output channel
    m4 = build_model(ck.config, dict(load_checkpoint(path).params), jnp.float32, quantization="int4")
    w4 = m4.layers.arrays()["wqkv"]  # CPU: held packed two a byte (quant_pack4.py)
    assert m4.quantization == "int4" and w4.method == "int4" and w4.bits == 4
    assert (w4.packed, w4.q.dtype) == (("uint4", jnp.uint8) if quant_dot.packs_int4(None) else (None, jnp.uint4))
    for mode in ("fp32", "auto"):
        monkeypatch.setenv("JAXLLM_GGUF_Q4", mode)
        held = [isinstance(v, QuantWeight) for v in load_checkpoint(path).params.values()]
        assert not any(held) if mode == "fp32" else any(held), mode
    monkeypatch.setenv("JAXLLM_GGUF_Q4", "int4")
    with pytest.raises(CheckpointError, match=r"^JAXLLM_GGUF_Q4='int4' is invalid: must be 'auto' \(= 'keep'\), "
                                              r"'keep' \(4-bit weights\) or 'fp32'$"):
        load_checkpoint(path)


def test_engine_q4_1_greedy_equals_dequantized(files):
    """Served with no flag: 4-bit weights held on the device (packed), the engine reports int4, and
    greedy tokens equal the fp32-dequantized load's."""
    from jaxllm import LLM, SamplingParams
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    prompts = [{"prompt_token_ids": p} for p in SEQS[:2]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for mode in ("keep", "fp32"):
        mp = pytest.MonkeyPatch()
        mp.setenv("JAXLLM_GGUF_Q4", mode)
        try:
            e = build_engine(EngineConfig(model=files["Q4_1"], max_model_len=64, block_size=16, max_num_seqs=2,
                                          max_num_batched_tokens=32, kv_cache_memory_bytes=1 << 20),
                             compile_cache=False, warmup=False)
        finally:
            mp.undo()
        assert e.config.quantization == ("int4" if mode == "keep" else None)
        if mode == "keep":
            held = jnp.uint8 if quant_dot.packs_int4(None) else jnp.uint4  # CPU: packed two a byte
            assert sum(x.dtype == held for x in jax.tree.leaves(e.runner.state)) == 4
        outs[mode] = [o.outputs[0].token_ids for o in LLM("tiny", engine=e).generate(prompts, params, use_tqdm=False)]
    assert outs["keep"] == outs["fp32"]
