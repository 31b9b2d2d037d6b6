"""One jitted model step per weight format, timed in interleaved rounds (SmolLM2-135M shapes, issue 17).

    PYTHONPATH=. python bench/quant_step.py [--methods none,int8,fp8,fp8-f8] [--rounds 7]

Dummy weights, fp32, scan loop (the CPU default), T = 1 and 64 one-token sequences (decode steps).
Every (method, T) step is compiled first; then each round calls every one 5 times in turn (so a load
change on the shared machine hits all alike) and keeps the median; printed: the median over rounds,
with min and max. Methods as in bench/quant_temp.py ("-f8": fp8 held as float8_e4m3fn, not its
uint8 bits; "-plain": the unchunked dot; "-bits" / "-lut" / "-astype": the held fp8 bits converted per
chunk by integer ops (the default) / a 256-entry table / a float8 bitcast and convert,
quant_dot.FP8_CONVERT; a last "-copy" / "-nocopy": each u8 chunk copied out of the weight before
its convert (the default) or not, quant_dot.FP8_CHUNK_COPY; e.g. "fp8-astype-nocopy", the
convert before). "gguf-q4" / "gguf-fp32": the packaged SmolLM2 Q4_1 GGUF (real weights) with its
projections kept 4-bit (the default) / dequantized to fp32 (JAXLLM_GGUF_Q4=fp32); "gguf-q4-twodot": 4-bit
with each packed chunk's halves in two dots at every T (quant_dot.PACK4_ONE_DOT_FROM_T = None, the path before
2026-12-05's one dot from 32 tokens). `--shapes`: besides
T1 and T64 (one-token sequences), T256 (one 256-token prompt) and T2048 (eight), the prefill steps of a
batched workload. No engine, sampling or host work: bench/quant.py has those.

    PYTHONPATH=. python bench/quant_step.py --methods gguf-fp32,gguf-q4 --shapes T1,T64,T256,T2048
"""
import argparse
import os
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
from pallas_kernels import KVCache  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--methods", default="none,int8,fp8,fp8-f8")
ap.add_argument("--rounds", type=int, default=7)
ap.add_argument("--shapes", default="T1,T64")
args = ap.parse_args()
SHAPES = {"T1": [[5]], "T64": [[5]] * 64, "T256": [[5] * 256], "T2048": [[5] * 256] * 8}  # token lists per sequence
shapes = args.shapes.split(",")
if any(sh not in SHAPES for sh in shapes):
    sys.exit(f"--shapes {args.shapes!r}: expected names from {list(SHAPES)}")
steps = {}
fp8_convert, fp8_copy = quant_dot.FP8_CONVERT, quant_dot.FP8_CHUNK_COPY  # the defaults
pack4_one_dot = quant_dot.PACK4_ONE_DOT_FROM_T
for method in args.methods.split(","):
    base, *opts = method.split("-")
    quant_dot.FP8_CONVERT = next((o for o in opts if o in ("bits", "lut", "astype")), fp8_convert)  # read at trace time
    quant_dot.FP8_CHUNK_COPY = {"copy": True, "nocopy": False}.get(opts[-1] if opts else "", fp8_copy)
    quant_dot.ENABLED = "plain" not in opts  # read at trace time (below)
    quant_dot.HOLD_FP8_BITS = "f8" not in opts  # read at load
    quant_dot.PACK4_ONE_DOT_FROM_T = None if "twodot" in opts else pack4_one_dot  # read at trace time
    if base == "gguf":  # the packaged GGUF, its Q4_1 projections kept 4-bit or dequantized (read at load)
        os.environ["JAXLLM_GGUF_Q4"] = {"q4": "keep", "fp32": "fp32"}[opts[0]]  # gguf-q4-twodot: the two-dot 4-bit path
        ck = load_checkpoint("smollm2-135m")
    else:
        ck = load_checkpoint("smollm2-135m", "dummy")
    c = ck.config
    model = build_model(c, dict(ck.params), jnp.float32, layer_loop="scan",
                        quantization=None if base in ("none", "gguf") else base)
    gd, st = nnx.split(model)
    for ntok in shapes:
        tokens, positions, meta, nb = prefill_batch(SHAPES[ntok], 16)
        cache = KVCache.zeros(c.num_layers, nb + 1, 16, c.num_kv_heads, c.head_dim, jnp.float32)
        inputs = (st, tokens, positions, cache, meta)
        comp = jax.jit(lambda st, t, p, cache, m, gd=gd: nnx.merge(gd, st)(t, p, cache, m)[0]).lower(*inputs).compile()
        comp(*inputs).block_until_ready()
        steps[(method, ntok)] = (comp, inputs)
quant_dot.ENABLED = quant_dot.HOLD_FP8_BITS = True
quant_dot.FP8_CONVERT, quant_dot.FP8_CHUNK_COPY = fp8_convert, fp8_copy
quant_dot.PACK4_ONE_DOT_FROM_T = pack4_one_dot
samples = {k: [] for k in steps}
loads = []
for r in range(args.rounds):
    for key, (comp, inputs) in steps.items():
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            comp(*inputs).block_until_ready()
            ts.append(time.perf_counter() - t0)
        samples[key].append(1e3 * float(np.median(ts)))
    loads.append(os.getloadavg()[0])
    print(f"round {r}", {f"{m} {t}": round(v[-1], 1) for (m, t), v in samples.items()},
          f"load {loads[-1]:.2f}", flush=True)
print("step ms, median over rounds (min, max):")
for (method, ntok), v in samples.items():
    print(f"  {method:10s} {ntok:5s} {np.median(v):8.1f}  ({min(v):.1f}, {max(v):.1f})")
print(f"load {min(loads):.2f}-{max(loads):.2f}, backend {jax.default_backend()}")
