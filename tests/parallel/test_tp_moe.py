"""Mixture of experts under tensor parallelism (tiny random Mixtral / Qwen3-MoE, 4 heads / 2 kv heads):
each expert's intermediate axis is split over "tp" (w_gate_up column-parallel shard-major, w_down
row-parallel), the router replicated; logits at tp=2/4 equal tp=1's, and one engine at tp=2 decodes
HF generate's greedy tokens."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.models.fusion import unfuse_numpy
from jaxllm.models.llama import build_model
from jaxllm.parallel import TPLayout, make_mesh
from tests.models.hf_tiny import make_tiny_hf
from tests.parallel.tp_forward import forward_logits


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tp_moe"))


def test_tp_logits_equal_tp1(root, monkeypatch):
    """Mixtral here (tp=1 with the dense experts, tp=2/4 grouped: ragged_dot under shard_map); Qwen3-MoE's
    experts shard the same way and run at tp=2 in the engine test below (the CPU default: dense)."""
    path = make_tiny_hf("mixtral", root)
    monkeypatch.setenv("JAXLLM_MOE", "dense")
    pre1, dec1 = forward_logits(path, 1)
    monkeypatch.setenv("JAXLLM_MOE", "grouped")
    for tp in (2, 4):
        pre, dec = forward_logits(path, tp)
        np.testing.assert_allclose(pre, pre1, atol=1e-4, rtol=0)
        np.testing.assert_allclose(dec, dec1, atol=1e-4, rtol=0)
    assert np.abs(pre1).max() > 0.05


def test_each_device_holds_its_slice_of_every_expert(root):
    ck = load_checkpoint(make_tiny_hf("mixtral", root))
    c, tp = ck.config, 2
    gate, up, down = (np.asarray(ck.params[n]) for n in ("layers.we_gate", "layers.we_up", "layers.we_down"))
    router = np.asarray(ck.params["layers.router"])
    model = build_model(c, dict(ck.params), jnp.float32, layout=TPLayout.plan(c, tp, make_mesh(tp)), layer_loop="scan")
    w = model.layers.arrays()
    F = c.moe_intermediate_size
    gu_shards = sorted(w["we_gate_up"].addressable_shards, key=lambda s: s.device.id)
    for d, s in enumerate(gu_shards[:tp]):
        local = np.asarray(s.data)  # [L, X, E, 2F/tp]: this device's gate columns, then its up columns
        assert local.shape == gate.shape[:3] + (2 * F // tp,)
        g, u = unfuse_numpy(local, (F // tp, F // tp), -1, 1)
        np.testing.assert_array_equal(g, gate[..., d * F // tp:(d + 1) * F // tp])
        np.testing.assert_array_equal(u, up[..., d * F // tp:(d + 1) * F // tp])
    for d, s in enumerate(sorted(w["we_down"].addressable_shards, key=lambda s: s.device.id)[:tp]):
        np.testing.assert_array_equal(np.asarray(s.data), down[:, :, d * F // tp:(d + 1) * F // tp])
    assert w["router"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(w["router"]), router)


def test_engine_tp2_greedy_equals_hf_generate(root):
    from tests.models.test_moe_parity_hf import assert_engine_greedy_equals_hf, sharpened

    assert_engine_greedy_equals_hf(sharpened("qwen3_moe", root), [[5, 17, 33, 2, 99, 140, 7], list(range(30, 43))], 8,
                                   tensor_parallel_size=2, max_num_batched_tokens=32)


def test_int8_experts_tp2_equal_tp1(root):
    """--quantization int8 on Mixtral (experts per expert and output channel, jaxllm/models/moe_quant.py):
    at tp=2 each device holds its F/tp slice of every expert's q, the gate_up scale split like its
    columns and the down scale (output axis "embed") replicated; logits equal tp=1's quantized ones."""
    from jaxllm.models.quant import QuantWeight
    from tests.parallel.tp_forward import prefill_logits

    ck = load_checkpoint(make_tiny_hf("mixtral", root))
    seqs = [[5, 9, 200, 7, 1], list(range(3, 30))]
    _, _, one = prefill_logits(load_checkpoint(ck.path), 1, "unroll", seqs, quantization="int8")
    model, _, two = prefill_logits(ck, 2, "unroll", seqs, quantization="int8")
    w = model.layers[0].arrays()
    gu, down = w["we_gate_up"], w["we_down"]
    assert isinstance(gu, QuantWeight) and gu.q.dtype == jnp.int8 and down.q.dtype == jnp.int8
    F, X = ck.config.moe_intermediate_size, ck.config.num_experts
    assert gu.q.addressable_shards[0].data.shape[-1] == 2 * F // 2 and gu.scale.addressable_shards[0].data.shape == (X, F)
    assert down.q.addressable_shards[0].data.shape[1] == F // 2 and down.scale.sharding.is_fully_replicated
    np.testing.assert_allclose(two, one, atol=1e-4 * np.abs(one).max(), rtol=0)
    assert np.abs(one).max() > 0.5


def test_fp8_block_checkpoint_tp2_equal_tp1(root):
    """A Qwen3-MoE fp8 checkpoint with [32, 32] block scales (experts kept float8, checkpoints/hf_fp8_experts.py):
    at tp=2 the experts' F axis is split, we_down's blocks along F (3 of 16) made finer so none straddles
    the two devices; logits equal tp=1's."""
    from tests.checkpoints.test_hf_fp8_moe import make_moe_fp8
    from tests.parallel.tp_forward import prefill_logits

    fp8_dir, _ = make_moe_fp8(root, "qwen3-fp8-block")
    seqs = [[5, 9, 200, 7, 1], list(range(3, 30))]
    _, _, one = prefill_logits(load_checkpoint(fp8_dir), 1, "unroll", seqs)
    model, _, two = prefill_logits(load_checkpoint(fp8_dir), 2, "unroll", seqs)
    down = model.layers[0].arrays()["we_down"]
    assert down.q.dtype == jnp.float8_e4m3fn and down.scale.ndim == down.q.ndim
    assert down.scale.shape == (8, 6, 64)  # [X, F/8, E]: 3 blocks of 16 split in two, 3 per device
    np.testing.assert_allclose(two, one, atol=1e-4 * np.abs(one).max(), rtol=0)
    assert np.abs(one).max() > 0.5


def test_qwen2_moe_shared_expert_tp2_equal_tp1(root):
    """Qwen2-MoE at tp=2: the shared expert splits like a dense MLP (w_gate_up column-, w_down
    row-parallel), the routed experts as above, the shared gate replicated; logits equal tp=1's."""
    from tests.parallel.tp_forward import prefill_logits

    path = make_tiny_hf("qwen2_moe", root)
    seqs = [[5, 9, 200, 7, 1], list(range(3, 30))]
    _, _, one = prefill_logits(load_checkpoint(path), 1, "unroll", seqs)
    model, _, two = prefill_logits(load_checkpoint(path), 2, "unroll", seqs)
    w = model.layers[0].arrays()
    assert w["w_gate_up"].addressable_shards[0].data.shape == (64, 80) and w["shared_gate"].sharding.is_fully_replicated
    np.testing.assert_allclose(two, one, atol=1e-4 * np.abs(one).max(), rtol=0)
    assert np.abs(one).max() > 0.05
