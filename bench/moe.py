"""MoE decode step time: the grouped experts (ragged_dot over the T*k routed rows) vs the same MoE computed
densely (every expert on every token, masked) vs a dense model with the same ACTIVE parameters.

    JAX_PLATFORMS=cpu python bench/moe.py                      # small Mixtral-shaped dummy, batch 1 and 16
    JAX_PLATFORMS=cpu python bench/moe.py --models moe-auto moe-int8 moe-fp8   # 8-bit experts vs the model dtype
    JAX_PLATFORMS=cpu python bench/moe.py --models moe-auto moe-int4           # 4-bit experts (group scales)
    python bench/moe.py --preset mixtral-8x7b --layers 2 --dtype bfloat16 --batches 1 16 64 --json out.json

The layer loop is the default's (JAXLLM_LAYER_LOOP=auto: an MoE unrolls, a dense model scans on CPU).
The model forward + logits of one decode step (every sequence one new token over a 64-token context,
paged KV) is jitted and timed in a loop (best of --rounds medians of --iters steps). Three models of one
shape: "moe-grouped" (JAXLLM_MOE=grouped, the GPU default), "moe-dense" (JAXLLM_MOE=dense, the CPU
default from T*k >= X rows), "moe-gather" (JAXLLM_MOE=gather, the CPU default below) and "dense-active", a
dense model of the same shape whose MLP has intermediate_size = k * moe_intermediate_size (the same
active parameters, minus the router's X*E per layer). Quantized rows (the same MoE shape and weights,
`--quantization` at load, the experts' path the default's, JAXLLM_MOE=auto): "moe-auto" (the model
dtype, the baseline of the quantized rows), "moe-int8", "moe-fp8" (attention projections and experts
in 8 bits, router / embeddings / LM head in the model dtype), "moe-int4" (in 4 bits, group scales: RTN). `weight_mib_read` is what a step must read: the
active experts' bytes for the routed models (at most min(T*k, X) experts a layer), all of them for
moe-dense; `roofline` (GPU): that over the step time, as a fraction of --peak-gbs.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMALL = dict(model_type="mixtral", vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2)
CONTEXT, BLOCK = 64, 16


def configs(args):
    from checkpoints.dummy import PRESETS
    from jaxllm.models.config import ModelConfig

    raw = dict(PRESETS[args.preset]) if args.preset else dict(SMALL)
    if args.layers:
        raw["num_hidden_layers"] = args.layers
    moe = ModelConfig.from_hf(raw, source=args.preset or "bench small mixtral")
    dense = dataclasses.replace(moe, architecture="llama" if moe.architecture == "mixtral" else "qwen3",
                                intermediate_size=moe.num_experts_per_tok * moe.moe_intermediate_size,
                                num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0)
    return moe, dense


def decode_inputs(c, batch: int):
    """One decode step of `batch` sequences, each at position CONTEXT over its own blocks."""
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import AttentionMetadata

    nb = CONTEXT // BLOCK + 1
    tables = np.arange(batch * nb, dtype=np.int32).reshape(batch, nb)  # [S, nb]
    meta = AttentionMetadata(jnp.asarray(tables[:, -1] * BLOCK, jnp.int32), jnp.asarray(tables),
                             jnp.full((batch,), CONTEXT + 1, jnp.int32), jnp.arange(batch + 1, dtype=jnp.int32),
                             decode_only=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, c.vocab_size, batch), jnp.int32)  # [S]
    positions = jnp.full((batch,), CONTEXT, jnp.int32)  # [S]
    return tokens, positions, meta, batch * nb


def time_step(c, params: dict, dtype, batch: int, impl: str | None, iters: int, rounds: int,
              quantization: str | None = None) -> tuple[float, str]:
    """(ms per decode step (median of `iters`, best of `rounds`), the layer loop it ran)."""
    from jaxllm.models.llama import build_model
    from pallas_kernels import KVCache

    if impl:
        os.environ["JAXLLM_MOE"] = impl  # read when the step is traced (jaxllm/models/moe.py)
    model = build_model(c, dict(params), dtype, quantization=quantization)  # a copy: build_model empties its dict
    tokens, positions, meta, nblocks = decode_inputs(c, batch)
    cache = KVCache.zeros(c.num_layers, nblocks, BLOCK, c.num_kv_heads, c.head_dim, dtype)
    ms = time_decode(model, cache, (tokens, positions, meta), iters, rounds)
    return ms, model.layer_loop


def time_decode(model, cache, inputs: tuple, iters: int, rounds: int) -> float:
    """ms per jitted decode step (forward + logits) of `model` over `inputs` = (tokens, positions,
    metadata): the median of `iters` steps, best of `rounds` (also bench/moe_ep.py's)."""
    import jax
    import numpy as np
    from flax import nnx

    gd, st = nnx.split(model)

    @jax.jit
    def step(st, cache, tokens, positions, meta):
        m = nnx.merge(gd, st)
        hidden, cache = m(tokens, positions, cache, meta)
        return m.compute_logits(hidden), cache

    jax.block_until_ready(step(st, cache, *inputs))
    best = float("inf")
    for _ in range(rounds):
        ts = []
        for _ in range(iters):
            t = time.perf_counter()
            jax.block_until_ready(step(st, cache, *inputs))
            ts.append(time.perf_counter() - t)
        best = min(best, float(np.median(ts)))
    return 1000 * best


def weight_bytes(c, batch: int, dense_experts: bool, itemsize: int, gather: bool = False,
                 layer_itemsize: float | None = None) -> int:
    """Bytes one decode step must read: embeddings rows aside, every layer's attention and norms,
    the experts it routes to (all of them computed densely), and the LM head. `layer_itemsize`: the
    layers' weights' (1 when quantized; scales not counted), else `itemsize`."""
    E, D, H, K, V, L = c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads, c.vocab_size, c.num_layers
    attn = E * D * (2 * H + 2 * K)
    if c.is_moe:
        X, k, F = c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size
        experts = X if dense_experts else batch * k if gather else min(batch * k, X)  # gather: one per row
        mlp = experts * 3 * E * F + E * X
    else:
        mlp = 3 * E * c.intermediate_size
    return int((layer_itemsize or itemsize) * L * (attn + mlp) + itemsize * E * V)


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """The model / dtype / batch flags of bench/moe.py and bench/moe_ep.py (read by configs(args))."""
    ap.add_argument("--preset", default=None, help="a dummy preset (mixtral-8x7b, qwen3-30b-a3b); default: small")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--models", nargs="+", default=["moe-grouped", "moe-dense", "moe-gather", "dense-active"],
                    choices=["moe-grouped", "moe-dense", "moe-gather", "dense-active", "moe-auto", "moe-int8",
                             "moe-fp8", "moe-int4"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peak-gbs", type=float, default=4800.0, help="HBM bandwidth for the roofline (H200: 4800)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--json-key", default=None, help="merge the result into --json under this key (device_check.sh)")
    args = ap.parse_args(argv)
    import jax.numpy as jnp

    from bench.common import log_machine

    machine = log_machine()
    dtype = jnp.dtype(args.dtype)
    moe, dense = configs(args)
    print(f"MoE: {moe.architecture}, {moe.num_layers} layers, E={moe.hidden_size}, {moe.num_experts} experts "
          f"top-{moe.num_experts_per_tok}, F={moe.moe_intermediate_size}: {moe.num_params / 1e6:.1f}M params, "
          f"{moe.num_active_params / 1e6:.1f}M active; dense-active: F={dense.intermediate_size}, "
          f"{dense.num_params / 1e6:.1f}M params; {args.dtype}", flush=True)
    from checkpoints.dummy import dummy_params
    from jaxllm.models.moe import moe_impl

    rows, params = [], {}  # dummy weights drawn once per config (each draw compiles: ~1 s a tensor on CPU)
    for name in args.models:
        c, impl = {"moe-grouped": (moe, "grouped"), "moe-dense": (moe, "dense"), "moe-gather": (moe, "gather"),
                   "dense-active": (dense, None), "moe-auto": (moe, "auto"), "moe-int8": (moe, "auto"),
                   "moe-fp8": (moe, "auto"), "moe-int4": (moe, "auto")}[name]
        quant = {"moe-int8": "int8", "moe-fp8": "fp8", "moe-int4": "int4"}.get(name)
        for b in args.batches:
            if c.is_moe not in params:
                params[c.is_moe] = dummy_params(c, dtype)
            ms, loop = time_step(c, params[c.is_moe], dtype, b, impl, args.iters, args.rounds, quant)
            auto = moe_impl(impl, b * c.num_experts_per_tok, c.num_experts) if c.is_moe else None
            read = weight_bytes(c, b, auto == "dense", dtype.itemsize, gather=auto == "gather",
                                layer_itemsize=(0.5 if quant == "int4" else 1) if quant else None)
            row = dict(model=name, batch=b, layer_loop=loop, experts=auto, step_ms=round(ms, 3), tok_s=round(1000 * b / ms, 1),
                       weight_mib_read=round(read / 2**20, 1),
                       roofline=round(read / (ms / 1000) / (args.peak_gbs * 1e9), 3))
            rows.append(row)
            print(f"{name:13s} batch {b:3d} ({loop}): {ms:8.2f} ms/step  {row['tok_s']:9.1f} tok/s  "
                  f"reads {row['weight_mib_read']:8.1f} MiB  roofline {row['roofline']:.3f}", flush=True)
    by = {(r["model"], r["batch"]): r["step_ms"] for r in rows}
    for b in args.batches:
        for a, z in (("moe-grouped", "moe-dense"), ("moe-grouped", "dense-active"), ("moe-dense", "dense-active"),
                     ("moe-gather", "moe-dense"), ("moe-gather", "dense-active"), ("moe-int8", "moe-auto"),
                     ("moe-fp8", "moe-auto"), ("moe-int4", "moe-auto"), ("moe-int4", "moe-int8")):
            if (a, b) in by and (z, b) in by:
                print(f"batch {b}: {a} / {z} = {by[(a, b)] / by[(z, b)]:.2f}x")
    if args.json:
        from bench.common import merge_json, write_json

        doc = dict(machine=machine, config=dataclasses.asdict(moe), dtype=args.dtype, rows=rows)
        merge_json(args.json, args.json_key, doc) if args.json_key else write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
