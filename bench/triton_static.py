"""The Pallas Triton kernels compiled for an NVIDIA GPU on this CPU-only machine: registers, spills,
shared memory, resident programs per SM and the width of every global load, per kernel.

    pip download --no-deps -d /tmp/triwhl triton && pip install --no-deps --target /tmp/tri /tmp/triwhl/triton-*.whl
    JAX_PLATFORMS=cpu python bench/triton_static.py --triton-path /tmp/tri [--arch 90] [--kernels a,b] [--output-json F]

Each case lowers one of jaxllm's kernels for CUDA under an abstract H100 (jax.export, as the lowering tests
do) at the Llama-2-13B / Llama-3-8B shapes; the Triton module jax builds (TTIR) is compiled by the pip
`triton` package's own pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with its bundled ptxas) for
`sm_<arch>` with the kernel's num_warps / num_stages, and `cuobjdump` (bundled too) reads the cubin's
resources and SASS. No GPU and no CUDA driver are needed. Caveat: XLA compiles the same TTIR with the
Triton fork it bundles, not this one, so the figures are those of a close relative of the real binary.
They catch what costs bandwidth without a profile: register spills (LOCAL > 0), narrow or unvectorized
loads of the K/V pages or weights, and occupancy (programs resident per SM, from registers, shared memory
and warps). No timings: bench/attention_kernels.py and bench/device_check.sh measure on a GPU.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# H100 / H200 (sm_90): per SM
SM_REGS, SM_SMEM, SM_MAX_WARPS, SM_MAX_PROGRAMS, SM_COUNT = 65536, 228 * 1024, 64, 32, 132
SMEM_RESERVED = 1024  # the driver's per-block reservation on sm_80+
REG_UNIT = 256  # registers are allocated per warp in units of 256


def occupancy(regs: int, smem: int, num_warps: int) -> dict:
    """Programs (thread blocks) resident per SM, and what limits them."""
    per_warp = math.ceil(regs * 32 / REG_UNIT) * REG_UNIT
    limits = {"registers": SM_REGS // (per_warp * num_warps) if regs else SM_MAX_PROGRAMS,
              "shared": SM_SMEM // (smem + SMEM_RESERVED),
              "warps": SM_MAX_WARPS // num_warps, "blocks": SM_MAX_PROGRAMS}
    n = min(limits.values())
    return {"programs_per_sm": n, "warps_per_sm": n * num_warps, "limited_by": min(limits, key=limits.get)}


LOAD = re.compile(r"\b(LDGSTS|LDG)((?:\.[A-Z0-9_]+)*)(?![A-Z0-9_])")  # not LDGDEPBAR
MMA = re.compile(r"\b(HMMA|HGMMA|IMMA|QGMMA)\b")


def sass_counts(sass: str) -> dict:
    """Global loads by width (bits) and kind (LDG: to registers; LDGSTS: async copy to shared memory), and
    the tensor-core instructions, from cuobjdump -sass text. A load without a width suffix is 32-bit;
    .U8/.S8/.U16/.S16 are narrower."""
    loads: dict[str, int] = {}
    for kind, suffix in LOAD.findall(sass):
        mods = suffix.split(".")
        width = next((m for m in mods if m in ("64", "128")), None)
        width = width or next(({"U8": "8", "S8": "8", "U16": "16", "S16": "16"}[m] for m in mods
                               if m in ("U8", "S8", "U16", "S16")), "32")
        key = f"{kind}.{width}"
        loads[key] = loads.get(key, 0) + 1
    return {"loads": dict(sorted(loads.items())), "mma": len(MMA.findall(sass))}


def resources(text: str) -> dict:
    """REG / LOCAL (spill bytes per thread) / STACK from cuobjdump -res-usage."""
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|LOCAL|STACK):(\d+)", text)}


def capture(fn, *args) -> list[dict]:
    """Exports `fn(*args)` for CUDA and returns, per Triton kernel it lowers: its TTIR, grid, and the
    num_warps / num_stages of its custom call (in lowering order)."""
    import jax
    from jax._src.pallas.triton import pallas_call_registration as reg
    from jax.experimental.pallas import triton as plgpu
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    h100 = AbstractMesh((1,), ("x",), (AxisType.Explicit,),
                        abstract_device=AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu"))
    built = []
    original = reg.lowering.lower_jaxpr_to_triton_module

    def keep(*a, **kw):
        result = original(*a, **kw)
        built.append({"ttir": result.module.operation.get_asm(enable_debug_info=False),
                      "grid": [int(g) for g in result.grid]})
        return result

    reg.lowering.lower_jaxpr_to_triton_module = keep
    try:
        with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(h100):
            warnings.simplefilter("ignore", DeprecationWarning)  # "Pallas Triton backend is deprecated"
            text = jax.export.export(
                jax.jit(fn), platforms=["cuda"],
                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(plgpu.CUSTOM_CALL_TARGET_NAME)],
            )(*args).mlir_module()
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = original
    calls = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", text)
    if len(calls) != len(built):
        raise RuntimeError(f"{len(built)} Triton modules lowered but {len(calls)} custom calls found")
    for b, (stages, warps) in zip(built, calls):
        b.update(num_stages=int(stages), num_warps=int(warps),
                 name=re.search(r"tt\.func public @([\w$]+)", b["ttir"]).group(1))
    return built


def attention_case(heads: int, kv_heads: int, head_dim: int, decode: bool, fp8: bool = False, mha_group=None):
    """One attention call at the e2e run's batch: 64 decode rows, or a mixed 512-token step of 16 sequences
    (decode: False), over a 4-layer paged cache of 16-token blocks, bf16 (fp8: uint8 pages + scales)."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import AttentionMetadata, KVCache, ragged_paged_attention

    T, S = (64, 64) if decode else (512, 16)
    L, NB, bs, MB = 4, 256, 16, 128
    page = jnp.uint8 if fp8 else jnp.bfloat16
    sds = jax.ShapeDtypeStruct

    def step(q, k, v, layer, slots, tables, ctx, cu, *scales):
        md = AttentionMetadata(slots, tables, ctx, cu, decode_only=decode)
        return ragged_paged_attention(q, KVCache(k, v, *scales), layer, md, mha_group=mha_group,
                                      impl="pallas_decode" if decode else "pallas_prefill")

    args = (sds((T, heads, head_dim), jnp.bfloat16), sds((L, NB, bs, kv_heads, head_dim), page),
            sds((L, NB, bs, kv_heads, head_dim), page), sds((), jnp.int32), sds((T,), jnp.int32),
            sds((S, MB), jnp.int32), sds((S,), jnp.int32), sds((S + 1,), jnp.int32))
    args += (sds((L, kv_heads), jnp.float32),) * 2 if fp8 else ()
    return step, args


def quant_case(m: int, k: int, n: int, packed: str | None = None):
    """The Pallas quant_matmul at a 13B projection: int8 per-channel scales, or 4-bit pairs with 32-row block scales."""
    import functools

    import jax
    import jax.numpy as jnp

    from pallas_kernels.matmul import quant_matmul

    sds = jax.ShapeDtypeStruct
    if packed:
        args = (sds((m, k), jnp.bfloat16), sds((k // 2, n), jnp.uint8), sds((k // 32, n), jnp.float16), None)
    else:
        args = (sds((m, k), jnp.bfloat16), sds((k, n), jnp.int8), sds((n,), jnp.float32), None)
    return functools.partial(quant_matmul, packed=packed), args


def stacked_case(m: int, k: int, n: int):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.matmul import stacked_matmul

    sds = jax.ShapeDtypeStruct
    return (lambda x, w, layer: stacked_matmul(x, w, layer)), (
        sds((m, k), jnp.bfloat16), sds((40, k, n), jnp.bfloat16), sds((), jnp.int32))


CASES = {
    "decode_13b": lambda: attention_case(40, 40, 128, True),
    "decode_13b_mha16": lambda: attention_case(40, 40, 128, True, mha_group=16),
    "decode_13b_fp8": lambda: attention_case(40, 40, 128, True, fp8=True),
    "decode_8b": lambda: attention_case(32, 8, 128, True),
    "mixed_13b": lambda: attention_case(40, 40, 128, False),
    "mixed_8b": lambda: attention_case(32, 8, 128, False),
    "quant_int8_m1": lambda: quant_case(1, 5120, 15360),
    "quant_int8_m64": lambda: quant_case(64, 5120, 15360),
    "quant_int4_m1": lambda: quant_case(1, 5120, 15360, packed="int4"),
    "stacked_m64": lambda: stacked_case(64, 5120, 15360),
}


def compile_cubin(ttir: str, arch: int, num_warps: int, num_stages: int, workdir: str) -> tuple[bytes, int]:
    """TTIR text -> (cubin, dynamic shared memory bytes) through the pip triton package."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(workdir, "kernel.ttir")
    with open(path, "w") as f:
        f.write(ttir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
    return k.asm["cubin"], int(k.metadata.shared)


def cuobjdump(cubin: bytes, flag: str, workdir: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = os.path.join(workdir, "kernel.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    return subprocess.run([tool, flag, path], check=True, capture_output=True, text=True).stdout


def report(name: str, arch: int) -> list[dict]:
    fn, args = CASES[name]()
    rows = []
    for i, kern in enumerate(capture(fn, *args)):
        with tempfile.TemporaryDirectory() as d:
            cubin, smem = compile_cubin(kern["ttir"], arch, kern["num_warps"], kern["num_stages"], d)
            res = resources(cuobjdump(cubin, "-res-usage", d))
            sass = sass_counts(cuobjdump(cubin, "-sass", d))
        occ = occupancy(res.get("reg", 0), smem, kern["num_warps"])
        programs = math.prod(kern["grid"])
        rows.append({"case": name, "kernel": kern["name"], "index": i, "grid": kern["grid"], "programs": programs,
                     "num_warps": kern["num_warps"], "num_stages": kern["num_stages"], "regs": res.get("reg"),
                     "spill_bytes": res.get("local", 0), "shared_bytes": smem, **occ,
                     "waves": round(programs / (occ["programs_per_sm"] * SM_COUNT), 2), **sass})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--triton-path", help="a directory holding the pip `triton` package (pip install --target)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--kernels", default="all", help=f"comma-separated, from: {', '.join(CASES)}")
    ap.add_argument("--output-json")
    a = ap.parse_args()
    if a.triton_path:
        sys.path.insert(0, a.triton_path)
    try:
        import triton
    except ImportError:
        sys.exit("bench/triton_static.py needs the pip `triton` package (not a jaxllm dependency): "
                 "pip install --no-deps --target DIR triton, then --triton-path DIR")
    names = list(CASES) if a.kernels == "all" else a.kernels.split(",")
    bad = [n for n in names if n not in CASES]
    if bad:
        sys.exit(f"--kernels: unknown {bad}; expected names from {list(CASES)}")
    rows = [r for n in names for r in report(n, a.arch)]
    print(f"{'case':18s} {'kernel':28s} {'grid':>14s} {'w/s':>4s} {'regs':>4s} {'spill':>5s} {'smem KiB':>8s} "
          f"{'prog/SM':>7s} {'limit':>9s} {'waves':>6s}  loads (kind.width: count)")
    for r in rows:
        print(f"{r['case']:18s} {r['kernel']:28s} {str(r['grid']):>14s} {r['num_warps']}/{r['num_stages']:<2d} "
              f"{r['regs']:>4d} {r['spill_bytes']:>5d} {r['shared_bytes'] / 1024:>8.1f} {r['programs_per_sm']:>7d} "
              f"{r['limited_by']:>9s} {r['waves']:>6.2f}  {r['loads']} mma {r['mma']}")
    if a.output_json:
        from bench.common import machine_info, write_json
        write_json(a.output_json, {"triton": triton.__version__, "arch": a.arch, "machine": machine_info(), "rows": rows})


if __name__ == "__main__":
    main()
