"""The step programs a GPU runs carry no host-synchronising control flow: exported for CUDA on this
CPU-only machine (jax.export under an abstract H100), with the GPU's defaults forced (unrolled layers,
branchless sampling, the LoRA base-only program, the Pallas attention kernels), the forward pass of
every bucket (LoRA and base-only) and every sampling plan hold no stablehlo.case / stablehlo.if. On a
GPU each XLA conditional copies its predicate to the host and blocks until the device reaches it
(runner/sampler.py), which would hold the next step's launch behind the current one. The decode
forward is straight-line (no while either); the mixed one's loops are the prefill kernel wrapper's
cumsum / searchsorted scans, of static trip count."""
from __future__ import annotations

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as plgpu

from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from jaxllm.runner.sampler import SAMPLE_PLANS
from jaxllm.runner.step_programs import step_programs
from tests.models.hf_tiny import make_tiny_hf
from tests.pallas_kernels.test_pk_lowering import H100

GPU_DEFAULTS = {"JAXLLM_LAYER_LOOP": "unroll", "JAXLLM_SAMPLER_BRANCHES": "select", "JAXLLM_LORA_BASE_PROGRAM": "on"}
TRITON = [jax.export.DisabledSafetyCheck.custom_call(plgpu.CUSTOM_CALL_TARGET_NAME)]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = make_tiny_hf("llama", str(tmp_path_factory.mktemp("gpu_steps")))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in GPU_DEFAULTS.items():
            mp.setenv(k, v)
        engine = build_engine(EngineConfig(model=path, max_model_len=64, block_size=16, max_num_seqs=4,
                                           max_num_batched_tokens=32, enable_lora=True, max_loras=2,
                                           max_lora_rank=8, kv_cache_memory_bytes=1 << 20),
                              compile_cache=False, warmup=False)  # exported, never compiled here
    r = engine.runner
    assert r.branchless_sampling and r.lora_base_program
    return r


def _spec(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


def _export(fn, *args, **kw) -> str:
    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(H100):
        warnings.simplefilter("ignore", DeprecationWarning)  # "Pallas Triton backend is deprecated"
        return jax.export.export(fn, platforms=["cuda"], disabled_checks=TRITON)(*args, **kw).mlir_module()


def _branches(text: str) -> int:
    return len(re.findall(r"stablehlo\.(?:case|if)\b", text))


def test_gpu_forward_and_sampling_programs_have_no_conditionals(runner, monkeypatch):
    r = runner
    monkeypatch.setenv("JAXLLM_ATTENTION_IMPL", "pallas")  # read at trace time: the GPU's kernels
    for T, S, decode_only in r.buckets.all():
        for lora in (True, False):  # the LoRA program and the base-only one
            inp = r._padding_inputs(T, S, decode_only, lora)
            args = _spec((r.state, r.kv_cache, r.counts, r.prompt_mask, r.last_tokens, inp))
            text = _export(r._forward, *args, _spec(r._step_lora_arg(inp)))
            where = (T, S, decode_only, lora)
            assert text.count(plgpu.CUSTOM_CALL_TARGET_NAME) >= r.model_config.num_layers, where  # Pallas kernels
            assert _branches(text) == 0, where
            if decode_only:
                assert "stablehlo.while" not in text, where  # a decode step is straight-line
        inp = r._padding_inputs(T, S, decode_only)
        logits = jax.ShapeDtypeStruct((S, r.vocab_size), jnp.float32)
        rest = _spec((r.counts, r.prompt_mask, r.last_tokens, inp.sampling, inp.want_top_logprobs, inp.seq_rows))
        for plan in SAMPLE_PLANS:
            assert _branches(_export(r._sample, logits, *rest, plan=plan)) == 0, (S, plan)
    # the check can fail: the CPU's branching sampler, exported the same way, has conditionals
    cond = jax.jit(step_programs(None, lambda: None, branchless_sampling=False).sample_step)
    assert _branches(_export(cond, logits, *rest)) > 0


def test_gpu_lora_decode_adds_two_matmuls_per_projection(runner, monkeypatch):
    """On a GPU every matmul is a kernel launch of a few microseconds whatever its size, so the LoRA
    decode forward may add at most two dot_generals per targeted projection and layer (x·A and one
    expand into the fused output), whatever the number of fused parts (wqkv: 3, w_gate_up: 2). The
    reference is the base-only program of the same bucket, exported the same way. (With one B per
    part, as before, this model's decode forward had 11 extra per layer: 31 dots vs 9 for 2 layers.)"""
    from jaxllm.lora.slots import LORA_TARGETS

    r = runner
    monkeypatch.setenv("JAXLLM_ATTENTION_IMPL", "pallas")
    L = r.model_config.num_layers
    decode = [b for b in r.buckets.all() if b[2]]
    assert decode
    for T, S, decode_only in decode:
        dots = {}
        for lora in (True, False):
            inp = r._padding_inputs(T, S, decode_only, lora)
            args = _spec((r.state, r.kv_cache, r.counts, r.prompt_mask, r.last_tokens, inp))
            dots[lora] = len(re.findall(r"stablehlo\.dot_general\b", _export(r._forward, *args,
                                                                                _spec(r._step_lora_arg(inp)))))
        extra = dots[True] - dots[False]
        assert dots[False] >= 4 * L, dots  # the base projections are there to count
        assert 0 < extra <= 2 * len(LORA_TARGETS) * L, (T, S, dots)
