"""Expert parallelism (`enable_expert_parallel`, vLLM's --enable-expert-parallel) on the tiny random
Mixtral (4 experts, top-2) and Qwen3-MoE (8 experts, top-2): the expert axis is sharded over "tp"
(device d holds experts [d*X/tp, (d+1)*X/tp) whole, gate/up plainly concatenated), attention and the
router as under TP; each device runs its experts on the tokens routed to them and one psum adds the
partial outputs. Logits at EP tp=2/4 equal tp=1's through each expert path (dense / gather / grouped /
loop, EP's CPU default for small batches),
quantized experts included, and an engine at EP tp=2 decodes HF generate's greedy tokens."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.models.llama import build_model
from jaxllm.parallel import TPLayout, check_fits, make_mesh
from tests.models.hf_tiny import make_tiny_hf
from tests.parallel.tp_forward import forward_logits, prefill_logits

SEQS = [[5, 9, 200, 7, 1], list(range(3, 30))]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ep_moe"))


@pytest.fixture(scope="module")
def ref(root):
    """tp=1 logits (prefill of two prompts, then one decode step) per arch, the dense experts."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXLLM_MOE", "dense")
    out = {arch: forward_logits(make_tiny_hf(arch, root), 1) for arch in ("mixtral", "qwen3_moe")}
    mp.undo()
    return out


# each EP size through another expert path (the tp=1 reference runs the dense one), each path at least
# once; Mixtral at tp=4 holds one expert a device. (Gather relies on the zeroed weight of other devices'
# assignments; dense, grouped and loop drop them by their out-of-range id.)
@pytest.mark.parametrize("arch,tp,impl", [("mixtral", 2, "grouped"), ("mixtral", 4, "gather"),
                                          ("qwen3_moe", 2, "loop"), ("qwen3_moe", 4, "dense")])
def test_ep_logits_equal_tp1(root, ref, arch, tp, impl, monkeypatch):
    """... and the decode step communicates what TP's does: one all-reduce of [T, E] for the embedding, two
    per layer (o_proj; the experts' partial sums, as TP's row-parallel down projection), one all-gather
    of the [T, V] logits: no expert weight or token moves between devices."""
    import re

    from tests.parallel.test_tp_logits import COLLECTIVE

    monkeypatch.setenv("JAXLLM_MOE", impl)
    pre1, dec1 = ref[arch]
    pre, dec, hlo = forward_logits(make_tiny_hf(arch, root), tp, hlo=True, expert_parallel=True)
    np.testing.assert_allclose(pre, pre1, atol=2e-5, rtol=0)
    np.testing.assert_allclose(dec, dec1, atol=2e-5, rtol=0)
    assert np.abs(pre1).max() > 0.5 and np.abs(dec1).max() > 0.5
    ops = sorted(m.groups() for m in re.finditer(COLLECTIVE, hlo))
    assert ops == [("f32[2,256]", "all-gather")] + [("f32[2,64]", "all-reduce")] * (1 + 2 * 2), ops  # 2 layers


@pytest.mark.parametrize("arch,tp", [("qwen3_moe", 4), ("mixtral", 2)])
def test_each_device_holds_whole_experts(root, arch, tp):
    """Device d's shards are experts [d*X/tp, (d+1)*X/tp) with the full F (gate then up, unsplit);
    wqkv is still split on heads, the router replicated."""
    ck = load_checkpoint(make_tiny_hf(arch, root))
    c = ck.config
    X, F, H, K = c.num_experts, c.moe_intermediate_size, c.num_heads, c.num_kv_heads
    n = X // tp
    gate, up, down = (np.asarray(ck.params[k]) for k in ("layers.we_gate", "layers.we_up", "layers.we_down"))
    layout = TPLayout.plan(c, tp, make_mesh(tp), expert_parallel=True)
    w = build_model(c, dict(ck.params), jnp.float32, layout=layout, layer_loop="scan").layers.arrays()
    gu = sorted(w["we_gate_up"].addressable_shards, key=lambda s: s.device.id)[:tp]
    dn = sorted(w["we_down"].addressable_shards, key=lambda s: s.device.id)[:tp]
    for d in range(tp):
        experts = slice(d * n, (d + 1) * n)
        local = np.asarray(gu[d].data)  # [L, X/tp, E, 2F]
        assert local.shape == (c.num_layers, n, c.hidden_size, 2 * F)
        np.testing.assert_array_equal(local, np.concatenate([gate[:, experts], up[:, experts]], axis=-1))
        np.testing.assert_array_equal(np.asarray(dn[d].data), down[:, experts])  # [L, X/tp, F, E]
    assert w["wqkv"].addressable_shards[0].data.shape[-2] == (H + 2 * max(K, tp)) // tp
    assert w["router"].sharding.is_fully_replicated


def test_dummy_weights_are_born_sharded_by_expert():
    """The dummy loader (like Orbax) draws each device's experts into their shards (`load_shardings`)."""
    from checkpoints.dummy import dummy_config

    c = dummy_config("tiny-qwen3-moe")
    layout = TPLayout.plan(c, 4, make_mesh(4), expert_parallel=True)
    ck = load_checkpoint("tiny-qwen3-moe", "dummy", shardings=layout.load_shardings(c))
    for k in ("layers.we_gate", "layers.we_up", "layers.we_down"):
        shard = ck.params[k].addressable_shards[0].data
        assert shard.shape == (c.num_layers, c.num_experts // 4) + ck.params[k].shape[2:], k
    assert ck.params["layers.router"].sharding.is_fully_replicated


# int4's group scales under EP: the AWQ case below (uint4 groups with offsets, the same split rule)
@pytest.mark.parametrize("quantization", ["int8"])
def test_quantized_experts_ep2_equal_tp1(root, quantization):
    """--quantization int8 (per expert and output channel) on Mixtral at EP tp=2: q and scales split on
    the expert axis, each device's whole; logits equal tp=1's quantized ones."""
    from jaxllm.models.quant import QuantWeight

    path = make_tiny_hf("mixtral", root)
    _, _, one = prefill_logits(load_checkpoint(path), 1, "unroll", SEQS, quantization=quantization)
    model, _, two = prefill_logits(load_checkpoint(path), 2, "unroll", SEQS, expert_parallel=True,
                                   quantization=quantization)
    c = model.config
    X, F, E = c.num_experts, c.moe_intermediate_size, c.hidden_size
    gu, down = (model.layers[0].arrays()[k] for k in ("we_gate_up", "we_down"))
    assert isinstance(gu, QuantWeight) and gu.q.dtype == jnp.dtype(quantization)
    assert gu.q.addressable_shards[0].data.shape == (X // 2, E, 2 * F)
    assert down.q.addressable_shards[0].data.shape == (X // 2, F, E)
    assert gu.scale.addressable_shards[0].data.shape == (X // 2, 2 * F)
    assert down.scale.addressable_shards[0].data.shape == (X // 2, E)
    np.testing.assert_allclose(two, one, atol=1e-4 * np.abs(one).max(), rtol=0)
    assert np.abs(one).max() > 0.5


def test_fp8_block_checkpoint_ep2_equal_tp1(root):
    """A Qwen3-MoE fp8 checkpoint with [32, 32] block scales kept float8: under EP tp=2 each device holds
    4 whole experts with their blocks as stored (none split finer); logits equal tp=1's."""
    from tests.checkpoints.test_hf_fp8_moe import make_moe_fp8

    fp8_dir, _ = make_moe_fp8(root, "qwen3-fp8-block")
    _, _, one = prefill_logits(load_checkpoint(fp8_dir), 1, "unroll", SEQS)
    model, _, two = prefill_logits(load_checkpoint(fp8_dir), 2, "unroll", SEQS, expert_parallel=True)
    down = model.layers[0].arrays()["we_down"]
    assert down.q.dtype == jnp.float8_e4m3fn and down.scale.shape == (8, 3, 64)  # [X, F/16, E] as stored
    assert down.scale.addressable_shards[0].data.shape == (4, 3, 64)
    np.testing.assert_allclose(two, one, atol=1e-4 * np.abs(one).max(), rtol=0)
    assert np.abs(one).max() > 0.5


def test_awq_experts_ep2_equal_tp1(root):
    """An AWQ Mixtral checkpoint (uint4 experts, group scales and offsets, groups of 32): under EP tp=2
    each device holds 2 whole experts with their groups as stored (w_down's 3 along F, none split)."""
    import os

    from tests.checkpoints.int4_tiny import write_int4

    ck_dir, _ = write_int4(make_tiny_hf("mixtral", root), os.path.join(root, "awq"), "awq", 32)
    _, _, one = prefill_logits(load_checkpoint(ck_dir), 1, "unroll", SEQS)
    model, _, two = prefill_logits(load_checkpoint(ck_dir), 2, "unroll", SEQS, expert_parallel=True)
    down = model.layers[0].arrays()["we_down"]  # [X, F, E]: F = 96
    assert down.q.dtype == jnp.uint4 and down.offset is not None and down.scale.shape == (4, 3, 64)
    assert down.q.addressable_shards[0].data.shape == (2, 96, 64)
    assert down.offset.addressable_shards[0].data.shape == down.scale.addressable_shards[0].data.shape == (2, 3, 64)
    np.testing.assert_allclose(two, one, atol=1e-4 * np.abs(one).max(), rtol=0)
    assert np.abs(one).max() > 0.5


def test_refusals_name_the_value_and_limit(root):
    c = load_checkpoint(make_tiny_hf("qwen3_moe", root)).config  # 8 experts, 4 heads, 2 kv heads
    with pytest.raises(ValueError, match=r"num_experts=6 is not divisible by 4 .*valid sizes for this model: \[1, 2\]"):
        check_fits(dataclasses.replace(c, num_experts=6), 4, expert_parallel=True)
    check_fits(dataclasses.replace(c, moe_intermediate_size=45), 4, expert_parallel=True)  # F need not divide
    with pytest.raises(ValueError, match="moe_intermediate_size=45 is not divisible by 4"):
        check_fits(dataclasses.replace(c, moe_intermediate_size=45), 4)  # ... under TP of experts it must
    with pytest.raises(ValueError, match=r"enable_expert_parallel=True is invalid .*no experts \(num_experts=0\)"):
        check_fits(dataclasses.replace(c, num_experts=0, num_experts_per_tok=0), 2, expert_parallel=True)


def test_engine_ep2_greedy_equals_hf_generate(root, capfd):
    """Through LLM at EP tp=2 (the CPU defaults: dense experts for prefill, loop for decode): greedy
    tokens equal HF generate's, which the tp=1 engine matches (tests/models/test_moe_parity_hf.py)."""
    from tests.models.test_moe_parity_hf import assert_engine_greedy_equals_hf, sharpened

    assert_engine_greedy_equals_hf(sharpened("qwen3_moe", root), [[5, 17, 33, 2, 99, 140, 7], list(range(30, 43))], 8,
                                   tensor_parallel_size=2, enable_expert_parallel=True, max_num_batched_tokens=32)
    assert "expert parallelism: 8 experts, 4 whole experts per device over 2 devices" in capfd.readouterr().err
