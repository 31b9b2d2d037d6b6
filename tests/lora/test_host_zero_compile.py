"""Zero compiles after warm-up while adapters are loaded, unloaded and mixed: the real engine on a tiny
random HF Llama with random PEFT adapters (bench/lora.py's writer).

Needs the device side of multi-LoRA (branch lorad: ``jaxllm.lora.peft``, ``ModelRunner.set_lora``,
and ``build_engine`` giving the runner its LoRA slots): skipped until both sides are merged.
The reference for the mixed batch is each request run alone on the same engine."""

from __future__ import annotations

import pytest

pytest.importorskip("jaxllm.lora.peft", reason="the device side of multi-LoRA (branch lorad) is not merged")

from bench.lora import write_random_adapter  # noqa: E402
from checkpoints.hf import read_config  # noqa: E402
from jaxllm.config import EngineConfig  # noqa: E402
from jaxllm.engine.factory import build_engine  # noqa: E402
from jaxllm.llm import LLM  # noqa: E402
from jaxllm.lora import LoRARequest  # noqa: E402
from jaxllm.sampling_params import SamplingParams  # noqa: E402
from tests.engine_checks import assert_clean  # noqa: E402
from tests.models.hf_tiny import make_tiny_hf  # noqa: E402


def test_adapters_loaded_unloaded_and_mixed_compile_nothing(tmp_path):
    from jaxllm.runner.model_runner import ModelRunner

    if not hasattr(ModelRunner, "set_lora"):
        pytest.skip("ModelRunner.set_lora (branch lorad) is not merged")
    path = make_tiny_hf("llama", str(tmp_path))
    mc = read_config(path)
    ads = [LoRARequest(f"a{i}", i, write_random_adapter(str(tmp_path / f"a{i}"), mc, rank=(4, 8, 2)[i - 1],
                                                        seed=i, scale=0.2)) for i in (1, 2, 3)]
    engine = build_engine(EngineConfig(model=path, max_model_len=64, block_size=16, max_num_seqs=4,
                                       max_num_batched_tokens=32, enable_lora=True, max_loras=2,
                                       max_lora_rank=8, max_cpu_loras=3), compile_cache=False)
    r = engine.runner
    compiled, traces = r.compile_count, r.num_traces
    llm = LLM("tiny", engine=engine)
    g = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16], [17, 18], [19, 20, 21]]
    which = [None, ads[0], ads[1], ads[2], ads[0]]  # 3 adapters over 2 slots, the base among them
    mixed = llm.generate([{"prompt_token_ids": p} for p in prompts], g, use_tqdm=False, lora_request=which)
    alone = [llm.generate({"prompt_token_ids": p}, g, use_tqdm=False, lora_request=a)[0]
             for p, a in zip(prompts, which)]
    assert [o.outputs[0].token_ids for o in mixed] == [o.outputs[0].token_ids for o in alone]
    assert len({tuple(o.outputs[0].token_ids) for o in mixed[:4]}) > 1  # the adapters change something
    assert engine.remove_lora(2) and engine.add_lora(ads[1])  # unload and load again: same shapes
    llm.generate([{"prompt_token_ids": p} for p in prompts], g, use_tqdm=False, lora_request=which[::-1])
    assert_clean(engine)
    assert (r.compile_count, r.num_traces) == (compiled, traces), "adapters compiled something after warm-up"
