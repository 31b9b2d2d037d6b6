"""Qwen2-MoE (`qwen2_moe`: routed experts plus a shared expert gated by sigmoid, qkv bias) against HF
transformers on a tiny random checkpoint: prefill logits (each layer loop, each expert path), greedy
tokens through the engine against HF generate, int8 quantization (the shared expert through the
projection hook), the config fields and refusals."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models.config import ModelConfig, ModelConfigError
from jaxllm.models.llama import param_shapes
from tests.models.hf_tiny import hf_logits, make_tiny_hf
from tests.models.test_parity_hf import run_model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny_qwen2_moe"))


@pytest.mark.parametrize("layer_loop,impl", [("scan", "grouped"), ("unroll", "dense"), ("unroll", "gather")])
def test_prefill_logits_match_transformers(layer_loop, impl, root, monkeypatch):
    monkeypatch.setenv("JAXLLM_LAYER_LOOP", layer_loop)
    monkeypatch.setenv("JAXLLM_MOE", impl)
    path = make_tiny_hf("qwen2_moe", root)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, n).tolist() for n in (1, 9, 40)]
    ckpt, ours = run_model(path, seqs)
    c = ckpt.config
    assert (c.architecture, c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size) == (
        "qwen2_moe", 8, 48, 80)
    assert c.attention_bias and not c.norm_topk_prob and c.sliding_window is None
    shapes = param_shapes(c)
    assert shapes["layers.w_gate"] == (2, 64, 80) and shapes["layers.shared_gate"] == (2, 64)
    for got, want in zip(ours, hf_logits(path, seqs)):
        assert np.abs(want).max() > 0.05
        np.testing.assert_array_less(np.abs(got - want).max(), 1e-4)


def test_shared_expert_is_used(root):
    """The shared expert's weights change the logits (a test that cannot pass without them): zeroing
    its gate's weights (sigmoid(0) = 1/2 on every token) moves the output."""
    from checkpoints import load_checkpoint
    from jaxllm.models.llama import build_model
    from tests.engine_checks import logits_of

    path = make_tiny_hf("qwen2_moe", root)
    seqs = [[3, 1, 4, 1, 5, 9, 2, 6]]
    ck = load_checkpoint(path)
    base = logits_of(build_model(ck.config, ck.params, jnp.float32), ck.config, seqs)
    ck = load_checkpoint(path)
    ck.params["layers.shared_gate"] = np.zeros_like(ck.params["layers.shared_gate"])
    moved = logits_of(build_model(ck.config, ck.params, jnp.float32), ck.config, seqs)
    assert np.abs(moved - base).max() > 1e-3


def test_engine_greedy_equals_hf_generate(root, monkeypatch):
    from tests.models.test_moe_parity_hf import assert_engine_greedy_equals_hf, sharpened

    monkeypatch.setenv("JAXLLM_MOE", "grouped")
    assert_engine_greedy_equals_hf(sharpened("qwen2_moe", root), [[5, 17, 33, 2, 99, 140, 7], list(range(30, 43))],
                                   10, max_num_batched_tokens=16)


def test_int8_quantizes_experts_and_shared_expert(root):
    """--quantization int8: the routed experts and the shared expert's w_gate_up / w_down are int8, the
    router and the shared gate stay fp32; greedy next tokens mostly agree with fp32's."""
    from checkpoints import load_checkpoint
    from jaxllm.models.llama import build_model
    from jaxllm.models.quant import QuantWeight
    from tests.engine_checks import logits_of

    path = make_tiny_hf("qwen2_moe", root)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 256, n).tolist() for n in (5, 40, 90)]
    ck = load_checkpoint(path)
    q = build_model(ck.config, ck.params, jnp.float32, quantization="int8")
    ck = load_checkpoint(path)
    f = build_model(ck.config, ck.params, jnp.float32)
    w = q.layers[0].arrays()
    for n in ("we_gate_up", "we_down", "w_gate_up", "w_down", "wqkv", "wo"):
        assert isinstance(w[n], QuantWeight) and w[n].q.dtype == jnp.int8, n
    assert not isinstance(w["router"], QuantWeight) and not isinstance(w["shared_gate"], QuantWeight)
    got, ref = logits_of(q, ck.config, seqs), logits_of(f, ck.config, seqs)
    err, agree = np.abs(got - ref).mean(), (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"qwen2_moe int8: mean logit err {err:.4f}, greedy agree {agree:.3f}")
    assert 0 < err < 0.08 and agree >= 0.85


_BASE = dict(model_type="qwen2_moe", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=8, shared_expert_intermediate_size=24)


def test_config_fields_and_refusals():
    c = ModelConfig.from_hf(dict(_BASE))
    assert (c.shared_expert_intermediate_size, c.attention_bias, c.norm_topk_prob) == (24, True, False)
    assert not ModelConfig.from_hf(dict(_BASE, qkv_bias=False)).attention_bias
    # params: the routed experts, the router, the shared expert and its gate; active: 2 of 4 experts + shared
    assert c.num_params - c.num_active_params == 2 * 3 * 16 * 8
    none = ModelConfig.from_hf(dict(_BASE, shared_expert_intermediate_size=0))
    assert c.num_params - none.num_params == 3 * 16 * 24 + 16
    for extra, field in ((dict(decoder_sparse_step=2), "decoder_sparse_step=2"),
                         (dict(mlp_only_layers=[0]), r"mlp_only_layers=\[0\]"),
                         (dict(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size=-1")):
        with pytest.raises(ModelConfigError, match=field) as e:
            ModelConfig.from_hf({**_BASE, **extra})
        assert "\n" not in str(e.value)
