"""Ops the LoRA delta adds to a decode step: the tiny Llama (2 layers, tests/models/hf_tiny.py), LoRA
with 2 slots of rank 8, its decode bucket's forward pass with the LoRA program vs the base-only one.

    python bench/lora_ops.py

1. "cuda": the forward exported for CUDA on this CPU-only machine (jax.export under an abstract H100,
   the GPU's defaults: unrolled layers, Pallas attention), StableHLO dot_general and concatenate ops.
   On a GPU each is a kernel launch (or part of one) of a few microseconds whatever its size.
2. "cpu": the same forward compiled for this CPU (unrolled layers): the entry computation's
   instructions (fusions, copies, concatenates: roughly the kernels run) and the transpose/copy
   instructions in all computations (operands XLA copies into another layout for a dot).
"""
from __future__ import annotations

import collections
import os
import re
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import log_machine  # noqa: E402

GPU_DEFAULTS = {"JAXLLM_LAYER_LOOP": "unroll", "JAXLLM_SAMPLER_BRANCHES": "select", "JAXLLM_LORA_BASE_PROGRAM": "on",
                "JAXLLM_ATTENTION_IMPL": "pallas"}


def main(argv=None) -> int:
    os.environ.update(GPU_DEFAULTS)
    log_machine()
    import jax
    import numpy as np
    from jax.experimental.pallas import triton as plgpu

    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine
    from tests.models.hf_tiny import make_tiny_hf
    from tests.pallas_kernels.test_pk_lowering import H100

    path = make_tiny_hf("llama", tempfile.mkdtemp())
    engine = build_engine(EngineConfig(model=path, max_model_len=64, block_size=16, max_num_seqs=4,
                                       max_num_batched_tokens=32, kv_cache_memory_bytes=1 << 20, enable_lora=True,
                                       max_loras=2, max_lora_rank=8), compile_cache=False, warmup=False)
    r = engine.runner
    T, S, d = next(b for b in r.buckets.all() if b[2])
    spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), t)  # noqa: E731
    print(f"tiny llama, {r.model_config.num_layers} layers, decode bucket T={T}; LoRA 2 slots x rank 8")
    for lora in (True, False):
        inp = r._padding_inputs(T, S, d, lora)
        args = (r.state, r.kv_cache, r.counts, r.prompt_mask, r.last_tokens, inp, r._step_lora_arg(inp))
        with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(H100):
            warnings.simplefilter("ignore", DeprecationWarning)
            text = jax.export.export(r._forward, platforms=["cuda"], disabled_checks=[
                jax.export.DisabledSafetyCheck.custom_call(plgpu.CUSTOM_CALL_TARGET_NAME)])(*spec(args)).mlir_module()
        os.environ["JAXLLM_ATTENTION_IMPL"] = "reference"  # the CPU's own attention for the CPU compile
        hlo = jax.jit(r._forward).lower(*args).compile().as_text()
        os.environ["JAXLLM_ATTENTION_IMPL"] = "pallas"
        entry = hlo[hlo.index("ENTRY"):]
        kinds = collections.Counter(re.findall(r"= \S+ ([\w-]+)\(", entry))
        kernels = sum(v for k, v in kinds.items() if k not in ("parameter", "get-tuple-element", "tuple", "constant",
                                                                   "bitcast"))
        print(f"  {'LoRA program' if lora else 'base-only   '}: cuda dot_general "
              f"{len(re.findall(r'stablehlo.dot_general', text))}, concatenate {len(re.findall(r'stablehlo.concatenate', text))}"
              f" | cpu entry instructions {kernels}, transpose/copy {len(re.findall(r'(?:transpose|copy)[(]', hlo))}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
