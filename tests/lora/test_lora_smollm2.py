"""SmolLM2-135M (the packaged GGUF, dequantized to f32) with two generated adapters: through the
ModelRunner, a batch mixing both adapters and the base gives each request the greedy tokens it gets
run alone, and the adapters really change them."""
from __future__ import annotations

import jax.numpy as jnp
import pytest

from checkpoints import load_checkpoint
from jaxllm.lora.config import LoRAConfig
from jaxllm.lora.peft import load_adapter
from jaxllm.models.llama import build_model
from jaxllm.runner.model_runner import ModelRunner
from tests.lora.adapters import drive, write_adapter

pytestmark = pytest.mark.slow
HF = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)


def test_smollm2_mixed_batch_equals_each_alone(tmp_path):
    ckpt = load_checkpoint("smollm2-135m")
    c = ckpt.config
    runner = ModelRunner(build_model(c, ckpt.params, jnp.float32), block_size=16, num_blocks=16, max_model_len=64,
                         max_num_seqs=4, max_num_batched_tokens=64, lora_config=LoRAConfig(2, 8))
    for slot, (r, targets) in enumerate(((8, ("q_proj", "v_proj", "o_proj", "down_proj")),
                                         (4, ("k_proj", "gate_proj", "up_proj"))), start=1):
        path = write_adapter(str(tmp_path), f"a{slot}", HF, r=r, targets=targets, seed=slot, std=0.1)
        runner.set_lora(slot, load_adapter(path, runner.lora_model_config, 8))
    prompts = [[1, 504, 3458, 314, 260, 1345, 282], [1, 6121, 28, 634, 314], [1, 2364, 16, 5453, 28, 6616, 30, 4]]
    slots = [1, 2, 0]
    n = 8
    mixed = drive(runner, prompts, slots, n, "mixed")
    alone = [drive(runner, [p], [s], n, f"alone{i}")[0] for i, (p, s) in enumerate(zip(prompts, slots))]
    assert mixed == alone
    base = [drive(runner, [p], [0], n, f"base{i}")[0] for i, p in enumerate(prompts[:2])]
    assert base[0] != alone[0] and base[1] != alone[1], "the adapters do not change greedy tokens"
