"""ModelRunner.warmup_compile_count (runner/executables.py), which the tests' compile-count asserts
use, against a count by hand of what warm-up must compile, per program, in the CPU's default modes
and in the GPUs' (branchless sampling: every SamplePlan per S; a LoRA runner's base-only forward beside
the LoRA one), forced here on CPU. The runner has drafts (draft buckets: no prompt-logprobs pass, a
T shared with a decode bucket) and two LoRA rank buckets, so every term of the count is exercised."""
from __future__ import annotations

from collections import Counter

import jax.numpy as jnp
import pytest

from checkpoints import load_checkpoint
from jaxllm.lora.config import BASE_PROGRAM_ENV, LoRAConfig
from jaxllm.models.llama import build_model
from jaxllm.runner.model_runner import ModelRunner
from jaxllm.runner.sampler import BRANCHES_ENV, SAMPLE_PLANS
from tests.parallel.tiny_llama import make_tiny_llama


@pytest.mark.parametrize("gpu_modes", [False, True], ids=["cpu-defaults", "gpu-modes"])
def test_warmup_compiles_what_warmup_compile_count_says(tmp_path, monkeypatch, gpu_modes):
    monkeypatch.setenv(BRANCHES_ENV, "select" if gpu_modes else "cond")
    monkeypatch.setenv(BASE_PROGRAM_ENV, "on" if gpu_modes else "off")
    ckpt = load_checkpoint(make_tiny_llama(str(tmp_path)))
    r = ModelRunner(build_model(ckpt.config, ckpt.params, jnp.float32), block_size=16, num_blocks=8,
                    max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, num_speculative_tokens=1,
                    lora_config=LoRAConfig(2, 16))
    assert (r.branchless_sampling, r.lora_base_program) == (gpu_modes, gpu_modes)
    # decode T=S=4; draft T=S in (4, 8); mixed T=32 with S=8 (rows: 4 seqs x (1 + 1 draft))
    assert r.buckets.all() == [(4, 4, True), (4, 4, False), (8, 8, False), (32, 8, False)]
    assert r.lora.rank_buckets == (8, 16)
    plans = len(SAMPLE_PLANS) if gpu_modes else 1
    want = {"step_lora": 4,  # the LoRA forward of each bucket
            "sample": 2 * plans,  # S in {4, 8}
            "prompt_lp": 2,  # T=4 (decode; the draft bucket T=4 has no prompt tokens) and T=32 (mixed)
            "copy_blocks": 1, "set_lora": 2}
    if gpu_modes:
        want["step"] = 4  # the base-only forward of each bucket
    assert r.warmup_compile_count == sum(want.values())
    r.warmup()
    assert Counter(k[0] for k in r._executables) == want
    assert r.compile_count == r.warmup_compile_count
    want_sample = {(S, plan) for S in (4, 8) for plan in SAMPLE_PLANS} if gpu_modes else {(4,), (8,)}
    assert {k[1:] for k in r._executables if k[0] == "sample"} == want_sample
