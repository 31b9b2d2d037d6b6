"""SmolLM2-135M (9 heads / 3 kv heads, fp32 on CPU) at tensor_parallel_size=3: the same greedy
output as tp=1 for 4 prompts, and no compile after warm-up."""
from __future__ import annotations

import pytest

from jaxllm.llm import LLM
from jaxllm.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers.", "Explain what a GPU is in one sentence."]
KW = dict(max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64,
          kv_cache_memory_bytes=64 * 2 * 30 * 16 * 3 * 64 * 4)  # 64 blocks at tp=1 (192 at tp=3)


def generate(tp):
    llm = LLM(model="smollm2-135m", tensor_parallel_size=tp, **KW)
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": p}])} for p in PROMPTS]
    runner = llm.engine.runner
    compiled = (runner.num_traces, runner.compile_count)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert (runner.num_traces, runner.compile_count) == compiled, "compiled after warm-up"
    return [(o.outputs[0].token_ids, o.outputs[0].text) for o in outs], runner


def test_smollm2_tp3_matches_tp1(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_COMPILE_CACHE", str(tmp_path))  # LLM() caches compiles: keep it private
    ref, _ = generate(1)
    got, runner = generate(3)
    assert runner.tensor_parallel_size == 3
    assert runner.kv_cache.k.addressable_shards[0].data.shape[3] == 1  # one kv head per device
    for (r_ids, r_text), (g_ids, g_text) in zip(ref, got):
        assert g_ids == r_ids, (r_text, g_text)
    assert any(text.strip() for _, text in ref)
