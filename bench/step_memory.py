"""Does the compiled engine step update the KV cache in place? Device memory per bucket vs the cache.

    python bench/step_memory.py                          # small Llama-shaped model, 1 GiB K + 1 GiB V
    python bench/step_memory.py --impl reference --hlo-dir /tmp/hlo
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python bench/step_memory.py --tp 2 --kv-heads 2

Builds a ModelRunner (dummy bf16 weights) with a cache of --cache-mib per K and V, compiles every
bucket (nothing runs) and prints XLA's memory analysis of each executable: arguments, outputs,
aliased (donated) bytes and temp bytes. The step donates the cache, so the aliased bytes should
cover K and V and the temp bytes should be far below one K: a temp of a cache's size means XLA
copies the cache somewhere in the step (a 13B model's cache then no longer fits next to its copy).
--hlo-dir writes each step's optimized HLO and lists its copy instructions of a cache's size.
--steps-only compiles each bucket's step alone (the programs the verdict reads; what tests use).
Exit status 1 when some bucket's temp reaches half of one cache array or its HLO copies a whole one.

--kv-cache-dtype fp8 builds the cache the engine runs (``build_engine``: ``kv_scales_fixed=True``,
``KVCache.scales_fixed``: scales set at start, so the step's writes quantize with them and compute
no per-write absmax), not a raw runner's first-write-derives-the-scales cache (``scale_init=0``,
kv_quant.py): the memory figures are those of the engine's fp8 step.

--tp N shards the model and the cache over N devices; the memory analysis is then per device and
is compared with one device's shard of the cache. One kv head per device (here --kv-heads equal to
--tp, or --kv-heads 1 at tp 1) is the case that once copied the whole cache after every layer's
write (issue 18: XLA gave the reshaped cache a layout of its own around its size-1 head axis).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import HLO_DTYPE_BYTES, hlo_elements, hlo_instructions  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+)\[([\d,]*)\]\S* (fusion|copy|dynamic-slice|slice|copy-start)\(")
_WEIGHT_DTYPES = ("f32", "bf16", "f16", "s8", "u8", "f8e4m3fn")


_COMP = re.compile(r"^(%\S+) \((.*)\) -> ")
_SHAPE = re.compile(r"\b(\w+)\[([\d,]*)\]")
_DEF = re.compile(r"^\s*(?:ROOT )?(%\S+) = (\w+)\[([\d,]*)\]")


def weight_copies(text: str, weight_shapes: list[tuple[int, ...]], num_layers: int, scan: bool) -> tuple[list, int]:
    """Instructions of the optimized HLO that materialise a slice of a layer weight: a fusion, copy,
    dynamic-slice or slice (outside fused computations) whose element count is one layer's weight
    and, in the scan, which reads (an operand, or a parameter of the computation it calls) a stacked
    array of num_layers such slices; in the unrolled loop, whose op_name says slice.
    A row block of a larger weight (jaxllm/models/stacked_dot.py reads blocks of half a weight or
    less) may have another weight's element count, but its source holds more than L of them.
    Returns (those lines, bytes copied per step: x num_layers when the layer loop is a scan, whose
    body runs once per layer)."""
    sizes = {int(np.prod(s)) for s in weight_shapes}
    params, defs = {}, {}  # computation -> its parameters' element counts; instruction -> its element count
    for ln in text.splitlines():
        m = _COMP.match(ln)
        if m:
            params[m.group(1)] = [hlo_elements(d) for _, d in _SHAPE.findall(m.group(2))]
        m = _DEF.match(ln)
        if m:
            defs[m.group(1)] = hlo_elements(m.group(3))
    lines, per_step = [], 0
    for comp, ln in hlo_instructions(text):
        # the op_name filter only without the source check (the scan's transposing copy of wo is
        # named after dynamic_index_in_dim, not its slice)
        if comp.startswith(("%fused", "%wrapped")) or (not scan and "slice" not in ln.split("op_name=")[-1][:200]):
            continue
        if "kind=kCustom" in ln:  # a gemm fusion (XLA CPU's ynn/onednn): its output is an activation, which
            continue  # can have a weight's element count ([256, 4F] = wo's at T=256) and read a weight's slice
        m = _INSTR.match(ln)
        if not m or m.group(1) not in _WEIGHT_DTYPES:
            continue
        n = hlo_elements(m.group(2))
        if n not in sizes:
            continue
        if scan:  # the source: the operands', or the called computation's parameters' element counts
            call = re.search(r"calls=(%[\w.-]+)", ln)
            args = ln.split("(", 1)[1].split(")", 1)[0]
            sources = params.get(call.group(1), []) if call else [defs.get(a.strip(), 0) for a in args.split(",")]
            if num_layers * n not in sources:
                continue
        lines.append(ln.strip()[:200])
        per_step += n * HLO_DTYPE_BYTES[m.group(1)] * (num_layers if scan else 1)
    return lines, per_step


def scan_probes(args, runner) -> dict:
    """Bare `lax.scan`s over the layers carrying the runner's (donated) cache, 64 decode tokens:
    write_kv alone, then write_kv + attention (each impl).
    Returns {probe: temp bytes / cache.k bytes}."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import ragged_paged_attention, write_kv

    cache = runner.kv_cache
    L, _, _, kvh, d = cache.k.shape
    inp = runner._padding_inputs(*runner.buckets.all()[0])
    md = inp.metadata
    T = md.slot_mapping.shape[0]
    act = jnp.bfloat16 if cache.quantized else cache.k.dtype  # an fp8 cache's pages are uint8
    q = jnp.zeros((T, args.heads, d), act)  # [T, H, D]
    kv = jnp.zeros((T, kvh, d), act)  # [T, K, D]
    impls = ["reference"] + (["pallas"] if jax.default_backend() == "gpu" else [])

    def make(attn):
        def f(cache, q, kv, md):
            def body(carry, _):
                cache, i, acc = carry
                cache = write_kv(cache, i, kv, kv, md.slot_mapping)
                if attn is not None:
                    out = ragged_paged_attention(q, cache, i, md, impl=attn)
                    acc = acc + out.astype(jnp.float32).sum()
                return (cache, i + 1, acc), None
            (cache, _, acc), _ = jax.lax.scan(body, (cache, jnp.int32(0), jnp.float32(0)), None, length=L)
            return cache, acc
        return jax.jit(f, donate_argnums=0)

    out = {}
    variants = [("write_kv only", None)] + [(f"write_kv + {i}", i) for i in impls]
    for name, attn in variants:
        try:
            exe = make(attn).lower(cache, q, kv, md).compile()
            ma = exe.memory_analysis()
            out[name] = int(ma.temp_size_in_bytes) / cache.k.nbytes
            print(f"probe {name:38s} temp {ma.temp_size_in_bytes / 2**20:9.1f} MiB = "
                  f"{100 * out[name]:.0f}% of cache.k; alias {ma.alias_size_in_bytes / 2**20:.0f} MiB")
        except Exception as e:  # noqa: BLE001 - report and go on
            out[name] = f"error: {str(e)[:200]}"
            print(f"probe {name}: FAILED {str(e)[:200]}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--cache-mib", type=int, default=1024, help="size of cache.k (and of cache.v)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                    help="fp8: uint8 pages of e4m3fn bits (pallas_kernels/kv_quant.py); --cache-mib stays the bytes")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (needs that many devices)")
    ap.add_argument("--layer-loop", choices=["auto", "scan", "unroll"], default=None,
                    help="sets JAXLLM_LAYER_LOOP (default: the environment's, else auto)")
    ap.add_argument("--stacked-dot", choices=["auto", "rows", "xla"], default=None,
                    help="sets JAXLLM_CPU_STACKED_DOT (xla: the scan copies each layer's fp32/bf16 projections "
                         "before their dots, the path before jaxllm/models/stacked_dot.py)")
    ap.add_argument("--impl", default=None, help="attention impl (sets JAXLLM_ATTENTION_IMPL)")
    ap.add_argument("--probes", action="store_true",
                    help="also compile bare layer scans (write_kv only; write_kv + each attention impl) and report their temp")
    ap.add_argument("--steps-only", action="store_true",
                    help="compile only each bucket's step (forward pass), the programs the in-place verdict reads: "
                         "no sampling, prompt-logprobs or block-copy program (their rows are left out)")
    ap.add_argument("--hlo-dir", default=None)
    ap.add_argument("--json", default=None, help="merge results into this JSON file under --json-key")
    ap.add_argument("--json-key", default="step_memory")
    args = ap.parse_args(argv)
    if args.impl:
        os.environ["JAXLLM_ATTENTION_IMPL"] = args.impl
    if args.layer_loop:
        os.environ["JAXLLM_LAYER_LOOP"] = args.layer_loop
    if args.stacked_dot:
        os.environ["JAXLLM_CPU_STACKED_DOT"] = args.stacked_dot

    import jax
    import jax.numpy as jnp

    from checkpoints.dummy import dummy_params
    from jaxllm.models.config import ModelConfig
    from jaxllm.models.llama import build_model
    from jaxllm.runner.model_runner import ModelRunner
    from pallas_kernels.attention.dispatch import resolve_impl

    head_dim = args.hidden // args.heads
    mc = ModelConfig.from_hf(dict(model_type="llama", vocab_size=4096, hidden_size=args.hidden,
                                  intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                  max_position_embeddings=2048), source="step_memory")
    dtype = jnp.bfloat16
    item = 1 if args.kv_cache_dtype == "fp8" else 2  # bytes per element (bf16 or fp8)
    per_block = args.layers * args.block_size * args.kv_heads * head_dim * item  # bytes of one K block
    num_blocks = max(8, (args.cache_mib << 20) // per_block)
    cache_bytes = num_blocks * per_block
    layout = None
    if args.tp > 1:
        from jaxllm.parallel.layout import TPLayout

        layout = TPLayout.plan(mc, args.tp)
        mc_run = layout.model_config(mc)
        per_block = args.layers * args.block_size * (mc_run.num_kv_heads // args.tp) * head_dim * item
        num_blocks = max(8, (args.cache_mib << 20) // per_block)
        cache_bytes = num_blocks * per_block  # one device's shard of cache.k
    model = build_model(mc, dummy_params(mc, dtype), dtype, layout=layout)
    runner = ModelRunner(model, block_size=args.block_size, num_blocks=num_blocks, max_model_len=1024,
                         max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                         kv_cache_dtype=args.kv_cache_dtype,
                         kv_scales_fixed=args.kv_cache_dtype == "fp8")  # as build_engine: the engine's cache
    if args.steps_only:  # the forward pass of every bucket, as warm-up compiles it
        for T, S, decode_only in runner.buckets.all():
            runner._step_executable(runner._padding_inputs(T, S, decode_only))
    else:
        runner.warmup()
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}); tp {args.tp}; cache.k = cache.v = "
          f"{cache_bytes / 2**20:.0f} MiB per device ({num_blocks} blocks); attention impl (env) "
          f"{os.environ.get('JAXLLM_ATTENTION_IMPL') or 'by backend'}")
    from jaxllm.models.llama import model_param_shapes

    # One layer's weights as the model holds them (wqkv, wo, w_gate_up, w_down: fused, kv heads repeated).
    weight_shapes = [shape[1:] for name, shape in model_param_shapes(model.config).items()
                     if name.startswith("layers.") and len(shape) > 2]
    layer_weight_bytes = sum(int(np.prod(s)) for s in weight_shapes) * 2  # bf16
    print(f"layer loop {model.layer_loop}; one layer's weights {layer_weight_bytes / 2**20:.1f} MiB")
    rows, bad = [], False
    for key, exe in sorted(runner._executables.items(), key=lambda kv: str(kv[0])):
        ma = exe.memory_analysis()
        row = {"bucket": str(key)}
        for f in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes"):
            row[f] = int(getattr(ma, f, 0) or 0)
        if key[0] == "step":
            row["temp_over_cache"] = row["temp_size_in_bytes"] / cache_bytes
            bad |= row["temp_over_cache"] >= 0.5
            text = exe.as_text()
            if args.hlo_dir:
                os.makedirs(args.hlo_dir, exist_ok=True)
                name = "step_" + "_".join(str(k) for k in key[1:]) + ".hlo.txt"
                with open(os.path.join(args.hlo_dir, name), "w") as f:
                    f.write(text)
            shape = r"\[{},{},".format(args.layers, num_blocks)  # [L, N, ...]: a whole cache array
            # a copy, or a convert (XLA's CPU fp8 scatter converted the whole cache: kv_quant.py)
            row["cache_sized_copies"] = [ln.strip()[:200] for ln in text.splitlines()
                                         if re.search(r"\b(copy(-start)?|convert)\(", ln) and re.search(shape, ln)]
            bad |= bool(row["cache_sized_copies"])
            row["weight_copies"], row["weight_bytes_copied_per_step"] = weight_copies(
                text, weight_shapes, args.layers, model.layer_loop == "scan")
        rows.append(row)
        print(f"{row['bucket']:28s} args {row['argument_size_in_bytes'] / 2**20:9.0f} MiB  "
              f"out {row['output_size_in_bytes'] / 2**20:9.0f} MiB  alias {row['alias_size_in_bytes'] / 2**20:9.0f} MiB  "
              f"temp {row['temp_size_in_bytes'] / 2**20:9.1f} MiB"
              + (f"  ({100 * row['temp_over_cache']:.0f}% of cache.k)" if "temp_over_cache" in row else ""))
        for c in row.get("cache_sized_copies", []):
            print("    copy:", c)
        if "weight_bytes_copied_per_step" in row:
            print(f"    weight bytes copied per step: {row['weight_bytes_copied_per_step']} "
                  f"({len(row['weight_copies'])} slice instructions)")
    if args.probes and args.tp > 1:
        print("--probes: single-device only; skipped at tp > 1")
        args.probes = False
    if args.probes:
        result_probes = scan_probes(args, runner)
    md_impl = resolve_impl(None, runner._padding_inputs(*runner.buckets.all()[0]).metadata)
    result = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "impl": md_impl, "tp": args.tp,
              "layer_loop": model.layer_loop, "layer_weight_bytes": layer_weight_bytes,
              "cache_bytes": cache_bytes, "kv_cache_dtype": args.kv_cache_dtype,
              "kv_scales_fixed": runner.kv_cache.scales_fixed, "rows": rows, "copies_cache": bad,
              "probes": result_probes if args.probes else None}
    print("RESULT:", "the step COPIES the cache" if bad else "the cache is updated in place", f"(impl {md_impl})")
    if args.json:
        from bench.common import merge_json

        merge_json(args.json, args.json_key, result)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
