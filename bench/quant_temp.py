"""Temp bytes and full-precision weight copies of one SmolLM2-135M-shaped step with quantized weights (issue 17).

    PYTHONPATH=. python bench/quant_temp.py [--methods none,int8,int8-plain,fp8,fp8-plain,fp8-f8]

Dummy weights, fp32, scan loop (the CPU default). For each method ("-plain": the unchunked dot,
jaxllm/models/quant_dot.py off; "-f8": fp8 held as float8_e4m3fn, not as its uint8 bits) and T = 1
and 64 one-token sequences (decode steps), jits one forward and prints the compiled memory
analysis' temp bytes, every float array in the optimized HLO with a held projection weight's shape
(per layer, flattened [K, N], or stacked), every 8-bit array of a held weight's shape that an
instruction writes (a copy of quantized weights: not a parameter, bitcast or slice), and the
median of 5 calls (ms; noisy on a shared machine, bench/quant.py is the timing bench).
"""
import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from checkpoints import load_checkpoint  # noqa: E402
from jaxllm.models import quant_dot  # noqa: E402
from jaxllm.models.dense_batch import prefill_batch  # noqa: E402
from jaxllm.models.llama import build_model  # noqa: E402
from jaxllm.models.quant import QUANT_PARAMS  # noqa: E402
from pallas_kernels import KVCache  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--methods", default="none,int8,int8-plain,fp8,fp8-plain")
args = ap.parse_args()
ck = load_checkpoint("smollm2-135m", "dummy")
c = ck.config
for method in args.methods.split(","):
    base = method.removesuffix("-plain").removesuffix("-f8")
    quant_dot.ENABLED = not method.endswith("-plain")
    quant_dot.HOLD_FP8_BITS = not method.endswith("-f8")
    model = build_model(c, dict(ck.params), jnp.float32, layer_loop="scan",
                        quantization=None if base == "none" else base)
    shapes = set()
    for name, v in model.layers.arrays().items():
        if f"layers.{name}" in QUANT_PARAMS:
            s, nc = tuple(v.shape), QUANT_PARAMS[f"layers.{name}"]
            kk, nn = int(np.prod(s[1:1 + nc])), int(np.prod(s[1 + nc:]))
            shapes |= {s, s[1:], (kk, nn), (s[0], kk, nn)}
    gd, st = nnx.split(model)
    for ntok in (1, 64):
        tokens, positions, meta, nb = prefill_batch([[5]] * ntok, 16)
        cache = KVCache.zeros(c.num_layers, nb + 1, 16, c.num_kv_heads, c.head_dim, jnp.float32)
        comp = jax.jit(lambda st, t, p, cache, m: nnx.merge(gd, st)(t, p, cache, m)[0]).lower(
            st, tokens, positions, cache, meta).compile()
        floats = re.finditer(r"= (f32|f16|bf16)\[([\d,]+)\]\{[^}]*\} (\S+)\(", comp.as_text())
        copies = sorted({f"{m.group(1)}[{m.group(2)}]" for m in floats
                         if m.group(3) != "parameter" and tuple(int(d) for d in m.group(2).split(",")) in shapes})
        bytes8 = re.finditer(r"= (s8|u8|f8e4m3fn)\[([\d,]+)\]\{[^}]*\} (\S+)\(", comp.as_text())
        copies8 = sorted({f"{m.group(1)}[{m.group(2)}]" for m in bytes8
                          if m.group(3) not in ("parameter", "bitcast", "get-tuple-element", "tuple")
                          and tuple(int(d) for d in m.group(2).split(",")) in shapes})
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            comp(st, tokens, positions, cache, meta).block_until_ready()
            ts.append(time.perf_counter() - t0)
        print(f"{method:10s} T={ntok:3d} temp {comp.memory_analysis().temp_size_in_bytes / 2**20:7.2f} MiB  "
              f"weight-shaped float arrays: {copies or 'none'}  8-bit copies: {copies8 or 'none'}  "
              f"step {1e3 * np.median(ts):.1f} ms  "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    model = gd = st = None  # free this model before the next one is built
print("backend:", jax.default_backend())
