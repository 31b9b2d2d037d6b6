"""A LoRA slot write sends the adapter at its rank bucket and pads it on the device: the slots'
contents after each write equal the old host-side numpy padding exactly (tests/lora/slot_ref.py),
for ranks at, below and between the buckets, partial adapters, overwrites and unloads, both layer
loops, f32 and bf16; the bytes sent are the bucket's, the write is donated, and a runner compiles one
update per bucket at warm-up and nothing after, whatever the ranks. (Kv-head repetition and sharded
slots: tests/parallel/test_tp_lora.py.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.lora.config import LoRAConfig
from jaxllm.lora.peft import module_shapes
from jaxllm.lora.slots import LoRASlots, SlotAdapter, rank_buckets
from jaxllm.models.llama import build_model
from tests.lora.slot_ref import assert_slot_equal, padded_slot, random_adapter, read_slot
from tests.parallel.tiny_llama import make_tiny_llama

MAX_RANK = 32  # buckets 8, 16, 32


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("slotw")))


def sent_bytes(config, rank: int, itemsize: int) -> int:
    """Bytes of every projection's A and B at `rank` (what a full-rank-bucket write sends)."""
    L = config.num_layers
    return sum(L * rank * (int(np.prod(ins)) + int(np.prod(outs))) * itemsize
               for ins, outs in module_shapes(config).values())


def test_rank_buckets():
    assert rank_buckets(1) == (1,) and rank_buckets(8) == (8,)
    assert rank_buckets(16) == (8, 16) and rank_buckets(64) == (8, 16, 32, 64)
    assert rank_buckets(48) == (8, 16, 32, 48) and rank_buckets(320) == (8, 16, 32, 64, 128, 256, 320)


@pytest.mark.parametrize("layer_loop,dtype", [("scan", jnp.float32), ("unroll", jnp.float32),
                                              ("scan", jnp.bfloat16)])
def test_slot_contents_equal_numpy_padding(path, layer_loop, dtype):
    ckpt = load_checkpoint(path)
    c = ckpt.config
    slots = LoRASlots(LoRAConfig(3, MAX_RANK), build_model(c, ckpt.params, dtype, layer_loop=layer_loop))
    assert slots.rank_buckets == (8, 16, 32) and [slots.bucket(r) for r in (0, 1, 8, 9, 16, 17, 32)] == \
        [8, 8, 8, 16, 16, 32, 32]
    item = np.dtype(dtype).itemsize
    want = {s: padded_slot(None, c, MAX_RANK, 1, dtype) for s in (1, 2, 3)}

    def write(slot, adapter, sent_rank, prepared=False):
        old = jax.tree.leaves(slots.weights)
        slots.set(slot, slots.prepare(adapter) if prepared else adapter)
        assert all(x.is_deleted() for x in old), "the slot write is not donated"
        want[slot] = padded_slot(adapter, c, MAX_RANK, 1, dtype)
        for s in want:
            assert_slot_equal(read_slot(slots, s), want[s], f"{layer_loop} slot {s} after writing slot {slot}")
        assert slots.last_write_nbytes == sent_bytes(c, sent_rank, item), (slot, sent_rank)

    write(1, random_adapter(c, 8, seed=1), 8)  # a bucket: sent as it is
    write(2, random_adapter(c, 12, seed=2, params=("layers.wq", "layers.wv")), 16)  # padded to 16, zeros for the rest
    write(3, random_adapter(c, 32, seed=3), 32, prepared=True)  # max_lora_rank
    write(1, random_adapter(c, 1, seed=4, params=("layers.wk", "layers.w_down")), 8)  # rank 1 over rank 8
    write(3, random_adapter(c, 20, seed=5), 32, prepared=True)  # 32 over 32
    old = jax.tree.leaves(slots.weights)
    slots.set(2, None)  # unload: zeros at the smallest bucket
    assert all(x.is_deleted() for x in old)
    want[2] = padded_slot(None, c, MAX_RANK, 1, dtype)
    for s in want:
        assert_slot_equal(read_slot(slots, s), want[s], f"slot {s} after unloading slot 2")
    assert slots.last_write_nbytes == sent_bytes(c, 8, item)


def test_bucket_rank_adapter_is_sent_without_a_host_copy(path):
    ckpt = load_checkpoint(path)
    c = ckpt.config
    slots = LoRASlots(LoRAConfig(2, MAX_RANK), build_model(c, ckpt.params, jnp.float32))
    prepared = slots.prepare(random_adapter(c, 16, seed=1))
    assert isinstance(prepared, SlotAdapter)
    rb, sent = slots.write_arrays(prepared)
    assert rb == 16
    sent_a = [a for n in sent for a in sent[n][0]]
    sent_b = [b for n in sent for b in sent[n][1]]
    assert all(any(x is a for x in sent_a) for a, _ in prepared.modules.values())
    assert all(any(x is b for x in sent_b) for _, b in prepared.modules.values())
    with pytest.raises(ValueError, match=r"rank=12 is not a slot-write rank bucket: must be one of \(8, 16, 32\)"):
        slots.lower(12)


def test_runner_compiles_one_write_per_bucket_at_warmup_only(path):
    from jaxllm.runner.model_runner import ModelRunner

    ckpt = load_checkpoint(path)
    c = ckpt.config
    r = ModelRunner(build_model(c, ckpt.params, jnp.float32), block_size=16, num_blocks=8, max_model_len=64,
                    max_num_seqs=2, max_num_batched_tokens=32, lora_config=LoRAConfig(2, MAX_RANK))
    r.warmup()
    assert r.compile_count == r.warmup_compile_count  # forward + prompt-lp per bucket, sampling per S, slot writes, block copy
    assert {k for k in r._executables if k[0] == "set_lora"} == {("set_lora", 8), ("set_lora", 16), ("set_lora", 32)}
    compiled = (r.compile_count, r.num_traces)
    want = None
    for i, rank in enumerate((1, 8, 12, 16, 24, 32)):
        ad = random_adapter(c, rank, seed=i)
        r.set_lora(1 + i % 2, r.prepare_lora(ad) if i % 2 else ad)
        want = padded_slot(ad, c, MAX_RANK, 1, jnp.float32)
        assert_slot_equal(read_slot(r.lora, 1 + i % 2), want, f"rank {rank}")
    r.set_lora(1, None)
    assert_slot_equal(read_slot(r.lora, 1), padded_slot(None, c, MAX_RANK, 1, jnp.float32), "unloaded")
    assert (r.compile_count, r.num_traces) == compiled, "a slot write compiled after warm-up"
