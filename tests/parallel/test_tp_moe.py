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
    import torch
    import transformers

    from jaxllm import LLM, SamplingParams
    from tests.models.test_moe_parity_hf import sharpened

    d = sharpened("qwen3_moe", root)
    prompts = [[5, 17, 33, 2, 99, 140, 7], list(range(30, 43))]
    n = 8
    llm = LLM(d, tensor_parallel_size=2, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, block_size=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            want = hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist()
        assert list(out.outputs[0].token_ids) == want
