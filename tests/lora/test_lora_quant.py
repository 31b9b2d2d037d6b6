"""LoRA on quantized base weights (int8/fp8, jaxllm/models/quant.py): a mixed batch (base tokens and
two adapters, all seven projections targeted) through the quantized model equals the same batch
through a full-precision model whose projections are the dequantized weights. In the scan loop the
quantized weights are read in place by the Projector (the layer gets IN_PLACE, wrapped in a
LoRAWeight), in the unroll loop each layer's own; fp8 is held as uint8 bits on CPU."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import load_checkpoint
from jaxllm.lora.config import LoRAConfig
from jaxllm.lora.delta import LoRABatch
from jaxllm.lora.peft import load_adapter
from jaxllm.lora.slots import LoRASlots
from jaxllm.models.dense_batch import prefill_batch
from jaxllm.models.llama import build_model
from jaxllm.models.quant import dequantize, quantize
from pallas_kernels import KVCache
from tests.engine_checks import jit_logits
from tests.lora.adapters import write_adapter
from tests.parallel.tiny_llama import CONFIG, make_tiny_llama

RANK = 4
SEQS = [np.random.default_rng(5).integers(0, 512, n).tolist() for n in (7, 1, 12, 3)]
SLOTS = [1, 0, 2, 1]
# checkpoint projection -> its contracted axes after the layer axis (quantized per output channel
# alone, they equal the fused weight's quantization: the scale is per output column)
PROJECTIONS = {"layers.wq": 1, "layers.wk": 1, "layers.wv": 1, "layers.wo": 2,
               "layers.w_gate": 1, "layers.w_up": 1, "layers.w_down": 1}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lora_quant"))
    return make_tiny_llama(root), [write_adapter(root, n, CONFIG, r=RANK, seed=s) for n, s in (("a", 1), ("b", 2))]


def forward(path, adapters, layer_loop, quantization=None, dequantized_from=None, slots_of_seq=SLOTS):
    """Logits [T, V] of SEQS in one LoRA forward, seq i on slot slots_of_seq[i]; `dequantized_from`:
    a method whose quantize-then-dequantize replaces the checkpoint's projections (a full-precision
    model of the quantized weights)."""
    model, lora = lora_model(path, tuple(adapters), layer_loop, quantization, dequantized_from)
    tokens, positions, meta, nblocks = prefill_batch(SEQS, 8)
    slots = jnp.asarray(np.repeat(slots_of_seq, [len(s) for s in SEQS]), jnp.int32)  # [T]
    c = model.config
    cache = KVCache.zeros(c.num_layers, nblocks + 1, 8, c.num_kv_heads, c.head_dim, jnp.float32)
    # shared: got and base (one quantized model, other slots), want and full (the fp32 model), and the
    # fp32 model across methods each run one compiled program (no trace-time switch changes here)
    return jit_logits(model, tokens, positions, cache, meta, LoRABatch(lora.weights, slots), share=True)  # [T, V]


_MODELS = {}  # lora_model's: tiny models (vocab 512, hidden 64), a dozen at most


def lora_model(path, adapters, layer_loop, quantization, dequantized_from):
    """(model, its LoRASlots with `adapters` on slots 1..), built once per argument tuple: the
    forwards of one model on other slots (got and base) reuse its weights and adapter slots."""
    key = (path, adapters, layer_loop, quantization, dequantized_from)
    if key not in _MODELS:
        ckpt = load_checkpoint(path)
        c, params = ckpt.config, dict(ckpt.params)
        if dequantized_from:
            for name, nc in PROJECTIONS.items():
                w = jnp.asarray(params[name], jnp.float32)
                params[name] = np.asarray(dequantize(quantize(w, dequantized_from, nc, stacked=True), nc, stacked=True))
        model = build_model(c, params, jnp.float32, layer_loop=layer_loop, quantization=quantization)
        lora = LoRASlots(LoRAConfig(max_loras=len(adapters), max_lora_rank=RANK), model)
        for slot, a in enumerate(adapters, start=1):
            lora.set(slot, load_adapter(a, c, RANK))
        _MODELS[key] = model, lora
    return _MODELS[key]


@pytest.mark.parametrize("method,layer_loop", [("int8", "scan"), ("fp8", "scan"), ("fp8", "unroll"),
                                               ("int4", "scan"), ("int4", "unroll")])  # int4: packed on CPU
def test_lora_on_quantized_weights_equals_dequantized_model(method, layer_loop, files):
    path, adapters = files
    got = forward(path, adapters, layer_loop, quantization=method)
    want = forward(path, adapters, layer_loop, dequantized_from=method)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)
    # the comparison has teeth: the adapters and the quantization both move the logits
    base = forward(path, adapters, layer_loop, quantization=method, slots_of_seq=[0] * len(SEQS))
    on_adapter = np.repeat(np.asarray(SLOTS) > 0, [len(s) for s in SEQS])  # [T]
    assert np.abs(got - base)[on_adapter].max() > 0.05 * scale, "the adapters barely change the logits"
    np.testing.assert_array_equal(got[~on_adapter], base[~on_adapter])  # base tokens: no delta
    full = forward(path, adapters, layer_loop)
    assert np.abs(full - want).max() > 1e-3 * scale, "quantization barely changes the logits"
