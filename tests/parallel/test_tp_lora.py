"""LoRA slots under tensor parallelism on the tiny Llama (tests/parallel/tp_forward.py's forward):
mixed-adapter logits at tp=2 and tp=8 equal tp=1's and add no collective of their own; a slot write
pads on the device, stays sharded and is donated in place."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from checkpoints import load_checkpoint
from jaxllm.models.llama import build_model
from jaxllm.parallel import TPLayout, make_mesh
from pallas_kernels import KVCache
from tests.parallel.tiny_llama import make_tiny_llama
from tests.parallel.tp_forward import BLOCK, PROMPTS, forward_logits, two_prompt_steps


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tp")))


def _lora_forward_logits(path, tp, layer_loop, adapters, hlo=False):
    # -> (prefill logits, decode logits, the decode step's optimized HLO if `hlo` else None)
    """`forward_logits`'s two steps with LoRA slots 1..3 holding `adapters`: prompt a runs slot 2,
    prompt b slot 0 (base) in the prefill; the decode step runs them on slots 1 and 3."""
    from jaxllm.lora.config import LoRAConfig
    from jaxllm.lora.delta import LoRABatch
    from jaxllm.lora.peft import load_adapter
    from jaxllm.lora.slots import LoRASlots

    ckpt = load_checkpoint(path)
    c = ckpt.config
    layout = TPLayout.plan(c, tp, make_mesh(tp)) if tp > 1 else None
    model = build_model(c, ckpt.params, jnp.float32, layout=layout, layer_loop=layer_loop)
    lora = LoRASlots(LoRAConfig(3, 8), model)
    for slot, p in enumerate(adapters, start=1):
        lora.set(slot, load_adapter(p, c, 8))
    mc = model.config
    cache = KVCache.zeros(mc.num_layers, 16, BLOCK, mc.num_kv_heads, mc.head_dim, jnp.float32,
                          sharding=layout.cache_sharding() if layout else None)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, cache, tokens, positions, meta, weights, slots):
        m = nnx.merge(graphdef, state)
        hidden, cache = m(tokens, positions, cache, meta, LoRABatch(weights, slots))
        return m.compute_logits(hidden), cache

    a, b = PROMPTS[0], PROMPTS[2]
    prefill_step, decode_step = two_prompt_steps(a, b)
    slots = np.zeros(len(prefill_step[0]), np.int32)  # [T] LoRA slot of each token: a on 2, b on the base
    slots[:len(a)] = 2
    prefill, cache = fwd(state, cache, *prefill_step, lora.weights, slots)
    dec_args = (state, cache, *decode_step, lora.weights, np.array([1, 3], np.int32))
    decode, _ = fwd(*dec_args)
    out = np.asarray(prefill)[:len(a) + len(b)], np.asarray(decode)
    return out + (fwd.lower(*dec_args).compile().as_text() if hlo else None,)


@pytest.fixture(scope="module")
def lora_adapters(tmp_path_factory):
    from tests.lora.adapters import write_adapter
    from tests.parallel.tiny_llama import CONFIG

    root = str(tmp_path_factory.mktemp("lora"))
    return [write_adapter(root, "qkvo", CONFIG, r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1),
            write_adapter(root, "mixed", CONFIG, r=4, targets=("v_proj", "gate_proj", "up_proj", "down_proj"), seed=2,
                          extra_config=dict(use_rslora=True)),
            write_adapter(root, "all", CONFIG, r=8, alpha=4, seed=3)]


def test_lora_mixed_slots_match_tp1_and_add_no_collective(path, lora_adapters):
    """LoRA A/B sharded like their base weights (tp=8 also repeats the kv heads of B_k/B_v): logits
    of a prefill mixing slot 2 and the base, and of a decode on slots 1 and 3, equal tp=1's.

    And at tp=2 the deltas ride on the base projections' communication: the decode forward has the
    collectives it has without LoRA (test_fused_split_adds_no_collective), o_proj's and down_proj's
    all-reduce carrying the row-parallel delta's partial x·A ([T, S·R], summed before its replicated
    B) in the same op; the column-parallel deltas are computed where their outputs live."""
    import re

    ref_prefill, ref_decode, _ = _lora_forward_logits(path, 1, "scan", lora_adapters)
    base_prefill, base_decode = forward_logits(path, 1, "scan")
    n = len(PROMPTS[0])
    assert np.abs(ref_prefill[:n] - base_prefill[:n]).max() > 0.1  # the adapter is really there
    np.testing.assert_allclose(ref_prefill[n:], base_prefill[n:], atol=1e-4, rtol=0)  # slot 0 is the base
    assert (np.abs(ref_decode - base_decode).max(-1) > 0.1).all()
    for tp, loop in ((2, "scan"), (8, "unroll")):
        prefill, decode, hlo = _lora_forward_logits(path, tp, loop, lora_adapters, hlo=tp == 2)
        np.testing.assert_allclose(prefill, ref_prefill, atol=1e-4, rtol=0, err_msg=f"tp={tp} {loop}")
        np.testing.assert_allclose(decode, ref_decode, atol=1e-4, rtol=0, err_msg=f"tp={tp} {loop}")
        if tp == 2:
            ops = sorted(re.findall(r"= (\(?[^=]*?\)?) (all-reduce|all-gather|reduce-scatter|all-to-all|"
                                    r"collective-permute)(?:-start)?\(", hlo))
            ops = [(re.sub(r"\{[\d,]*\}", "", shape), op) for shape, op in ops]  # drop layouts
            body = ("(f32[2,64], f32[2,24])", "all-reduce")  # [T, E] and u [T, S·R] in one op
            assert ops == [body, body, ("f32[2,512]", "all-gather"), ("f32[2,64]", "all-reduce")], ops


@pytest.mark.parametrize("tp,layer_loop", [(2, "scan"), (8, "scan"), (8, "unroll")])
def test_lora_slot_write_pads_on_device_sharded_in_place(path, tp, layer_loop):
    """A slot write sends the adapter at its rank bucket, B_k/B_v with the checkpoint's kv heads (tp=8
    repeats them twice on the device): each slot's contents equal the numpy padding with repeated kv
    heads (tests/lora/slot_ref.py), the slots keep their shardings, the write is donated (aliased in
    place) and its program moves nothing between devices."""
    import re

    from jaxllm.lora.config import LoRAConfig
    from jaxllm.lora.slots import LoRASlots
    from tests.lora.slot_ref import assert_slot_equal, padded_slot, random_adapter, read_slot

    ckpt = load_checkpoint(path)
    c = ckpt.config
    layout = TPLayout.plan(c, tp, make_mesh(tp))
    slots = LoRASlots(LoRAConfig(2, 16), build_model(c, ckpt.params, jnp.float32, layout=layout, layer_loop=layer_loop))
    assert slots.kv_repeat == (2 if tp == 8 else 1) and slots.rank_buckets == (8, 16)
    shardings = jax.tree.map(lambda x: x.sharding, slots.weights)
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
    for rb in slots.rank_buckets:
        hlo = slots.lower(rb).compile().as_text()
        assert "input_output_alias" in hlo, f"rank {rb}: the slot update is not in place"
        assert not re.search(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute", hlo), rb
    want = {s: padded_slot(None, c, 16, slots.kv_repeat, jnp.float32, tp) for s in (1, 2)}
    writes = ((1, 8, None), (2, 5, ("layers.wk", "layers.wv", "layers.wo")), (1, 16, None), (2, None, None))
    for seed, (slot, rank, params) in enumerate(writes):
        ad = None if rank is None else random_adapter(c, rank, seed, params=params)
        old = jax.tree.leaves(slots.weights)
        slots.set(slot, ad)
        assert all(x.is_deleted() for x in old), "the slot write is not donated"
        assert jax.tree.map(lambda x: x.sharding, slots.weights) == shardings
        want[slot] = padded_slot(ad, c, 16, slots.kv_repeat, jnp.float32, tp)
        for s in want:
            assert_slot_equal(read_slot(slots, s), want[s], f"tp={tp} {layer_loop} slot {s} after writing slot {slot}")
