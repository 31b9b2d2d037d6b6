"""Where the int8 weights are converted in the optimized HLO of one model step (issue 17).

    python bench/quant_hlo.py

Builds the tiny random HF llama of tests/models/hf_tiny.py with int8 weights, in both layer loops,
compiles one forward on the default backend and lists every `convert` of an s8 array to f32: the
fusion it sits in, the shapes, and whether a dot shares that fusion (the dequantize fused into the
matmul) or not (a full-precision copy of the weight materialised before the dot). Then the same for
a Q8_0 GGUF of that model, kept int8 with its block-32 scales (scan loop), at 3 tokens (the
per-block partial dots) and at 64 (the weight dequantized into the dot), listing also every f32
array as large as a weight that a block-scale multiply produces.

On CPU the quantized dot now runs in output-column chunks (jaxllm/models/quant_dot.py): the converts
listed are chunk-shaped (the tiny wqkv [64,128] as [64,64], w_gate_up [64,192] as [64,96]), except
weights under 128 columns, converted whole by design (the tiny wo and w_down). bench/quant_temp.py
checks SmolLM2-135M's shapes and the temp bytes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bench.common import hlo_instructions  # noqa: E402
from jaxllm.models.dense_batch import prefill_batch  # noqa: E402
from pallas_kernels import KVCache  # noqa: E402
from tests.models.hf_tiny import make_tiny_hf  # noqa: E402
from tests.models.test_quant import build  # noqa: E402
from checkpoints import load_checkpoint  # noqa: E402
from jaxllm.models.llama import build_model  # noqa: E402
from tests.checkpoints.gguf_tiny import write_gguf_from_hf  # noqa: E402

path = make_tiny_hf("llama", os.environ.get("TINY_ROOT", "/tmp/jaxllm_tiny_hf"))
q8 = write_gguf_from_hf(path, os.path.join(os.path.dirname(path), "llama-q8_0.gguf"), "Q8_0")
for loop, ntok in (("scan", 3), ("unroll", 3), ("q8_0 scan", 3), ("q8_0 scan", 64)):
    if loop.startswith("q8_0"):
        ck = load_checkpoint(q8)
        model, c = build_model(ck.config, ck.params, jnp.float32, layer_loop="scan"), ck.config
    else:
        model, c = build(path, "int8", loop)
    loop = f"{loop} T={ntok}"
    gd, st = nnx.split(model)
    tokens, positions, meta, nb = prefill_batch([list(range(1, ntok + 1))], 16)
    cache = KVCache.zeros(c.num_layers, nb + 1, 16, c.num_kv_heads, c.head_dim, jnp.float32)
    f = jax.jit(lambda st, t, p, cache, m: nnx.merge(gd, st)(t, p, cache, m)[0])
    txt = f.lower(st, tokens, positions, cache, meta).compile().as_text()
    # converts of s8 weights to f32, and whether the convert sits in the same fusion as a dot
    comps = {}
    for comp, ln in hlo_instructions(txt):
        comps.setdefault(comp, []).append(ln)
    for comp, lines in comps.items():
        body = "\n".join(lines)
        for m in re.finditer(r"= (f32\[[\d,]*\])[^=]*convert\((%[\w.\-]+)\)", body):
            src = re.search(re.escape(m.group(2)) + r" = (s8\[[\d,]*\])", body)
            if src:
                print(loop, comp[:40], "converts", src.group(1), "->", m.group(1), "| dot in same computation:", " dot(" in body)
        for m in re.finditer(r"= (f32\[[\d,]*\])[^=]*multiply\(", body):  # block scales applied to a weight
            if re.search(r"f16\[|convert\(", body) and "s8[" in body:
                print(loop, comp[:40], "multiplies", m.group(1), "in a computation with s8 and scales")
print("backend:", jax.default_backend())
