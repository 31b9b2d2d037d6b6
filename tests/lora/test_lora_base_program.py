"""A LoRA engine's steps without any adapter run the plain engine's program (no LoRA deltas): the
runner picks, per step on the host, the base-only executable when every scheduled seq has lora_slot 0
and the LoRA one otherwise; warm-up compiles both for every bucket, and nothing compiles afterwards.
On by default on GPUs only ($JAXLLM_LORA_BASE_PROGRAM, jaxllm/lora/config.py); these tests turn it on.

References: a plain engine (no enable_lora) for the base-only outputs, greedy tokens and logprobs; HF
transformers + peft (each request alone, full recomputation) for a batch mixing base and adapter
requests. The LoRA engine runs with async scheduling (steps dispatched before the previous one is
read back), the plain one synchronously; it goes through a sleep / wake-up round trip too."""
from __future__ import annotations

import re

import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.factory import build_engine
from jaxllm.llm import LLM
from jaxllm.lora import LoRARequest
from jaxllm.lora.config import BASE_PROGRAM_ENV, base_program_enabled
from jaxllm.sampling_params import SamplingParams
from tests.lora.adapters import ALL, make_peft_adapter, peft_greedy, peft_model
from tests.models.hf_tiny import make_tiny_hf

PROMPTS = [[5, 6, 7, 8, 9], list(range(10, 27)), [40, 41, 42]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base path, adapter path, plain engine, LoRA engine (async, adapter 1 loaded), compiled at warm-up)."""
    root = str(tmp_path_factory.mktemp("lora_base"))
    base = make_tiny_hf("llama", root)
    adapter = make_peft_adapter(base, root, "ad", r=8, alpha=16, targets=list(ALL), seed=3)
    cfg = dict(model=base, max_model_len=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=32,
               kv_cache_memory_bytes=1 << 20)
    plain = build_engine(EngineConfig(**cfg), compile_cache=False, warmup=False)  # compiles what it runs only
    with pytest.MonkeyPatch.context() as mp:  # the CPU's default is off (jaxllm/lora/config.py): the GPUs' path
        mp.setenv(BASE_PROGRAM_ENV, "on")
        lora = build_engine(EngineConfig(**cfg, enable_lora=True, max_loras=2, max_lora_rank=8,
                                         async_scheduling=True, enable_sleep_mode=True), compile_cache=False)
    assert lora.runner.lora_base_program
    warm = (lora.runner.compile_count, lora.runner.num_traces)
    ad = LoRARequest("ad", 1, adapter)
    assert lora.add_lora(ad)  # loaded in a slot: the base-only steps must not pick it up
    return base, ad, plain, lora, warm


def _hlo(exe) -> str:
    """A compiled program's HLO computations without source locations (the file / stack-frame tables
    and each op's metadata: the Python lines that traced it)."""
    text = exe.as_text()
    body = text[text.index("\n%") if "\n%" in text else text.index("\nENTRY"):]
    return re.sub(r",? metadata=\{[^}]*\}", "", body)


def _ops(exe) -> int:
    """Instructions in a compiled program (lines `%name = type op(...)` of its HLO)."""
    return len(re.findall(r"^\s*(?:ROOT )?%[\w.\-]+ = ", _hlo(exe), re.M))


def _tokens_and_logprobs(outs):
    return [(list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs])
            for o in outs]


def test_base_program_setting(monkeypatch):
    monkeypatch.delenv(BASE_PROGRAM_ENV, raising=False)
    assert base_program_enabled("gpu") and not base_program_enabled("cpu") and not base_program_enabled("tpu")
    monkeypatch.setenv(BASE_PROGRAM_ENV, "on")
    assert base_program_enabled("cpu")
    monkeypatch.setenv(BASE_PROGRAM_ENV, "sometimes")
    with pytest.raises(ValueError, match="JAXLLM_LORA_BASE_PROGRAM='sometimes' is invalid: must be one of auto, on, off"):
        base_program_enabled("gpu")


def test_lora_engine_without_adapters_runs_the_plain_program(setup):
    _, _, plain, lora, _ = setup
    p, r = plain.runner, lora.runner
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    prompts = [{"prompt_token_ids": q} for q in PROMPTS]
    runs = dict(r.step_runs)
    got = LLM("tiny", engine=lora).generate(prompts, params, use_tqdm=False)
    assert r.step_runs["lora"] == runs["lora"], "a step without adapters ran the LoRA program"
    assert r.step_runs["base"] > runs["base"]
    want = LLM("tiny", engine=plain).generate(prompts, params, use_tqdm=False)
    assert _tokens_and_logprobs(got) == _tokens_and_logprobs(want)  # same program, same numbers
    # warm-up compiled both variants of every bucket; the base-only one is the plain runner's program
    assert p.num_blocks == r.num_blocks
    for T, S, dec in r.buckets.all():
        base_exe, lora_exe = r._executables[("step", T, S, dec)], r._executables[("step_lora", T, S, dec)]
        assert _hlo(base_exe) == _hlo(p._executables[("step", T, S, dec)])  # both buckets ran on the plain engine
        assert _ops(lora_exe) > _ops(base_exe) + 4 * r.model_config.num_layers  # the deltas: ops per projection
    assert not any(k[0] == "step_lora" for k in p._executables)


def test_mixed_then_base_only_steps_match_peft_and_compile_nothing(setup):
    base, ad, _, lora, warm = setup
    r = lora.runner
    llm = LLM("tiny", engine=lora)
    # the adapter request stops early: its steps run the LoRA program, the base requests' last ones do not
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (8, 3, 8)]
    which = [None, ad, None]
    runs = dict(r.step_runs)
    outs = llm.generate([{"prompt_token_ids": q} for q in PROMPTS], params, use_tqdm=False, lora_request=which)
    assert r.step_runs["lora"] > runs["lora"] and r.step_runs["base"] > runs["base"]
    models = {None: peft_model(base, None), ad: peft_model(base, ad.lora_path)}
    want = [peft_greedy(models[a], q, sp.max_tokens) for q, a, sp in zip(PROMPTS, which, params)]
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    assert want[1] != peft_greedy(models[None], PROMPTS[1], 3), "the adapter does not change greedy tokens"
    # an adapter request alone, then base alone again: each switch looks its program up, nothing compiles
    alone = llm.generate({"prompt_token_ids": PROMPTS[1]}, params[1], use_tqdm=False, lora_request=ad)
    assert list(alone[0].outputs[0].token_ids) == want[1]
    assert list(llm.generate({"prompt_token_ids": PROMPTS[0]}, params[0], use_tqdm=False)[0].outputs[0].token_ids) \
        == want[0]
    # sleep mode holds the LoRA slots with the weights: after a level-1 round trip both variants still
    # run with the adapter in place, and nothing compiles
    llm.sleep(level=1)
    llm.wake_up()
    runs = dict(r.step_runs)
    again = llm.generate([{"prompt_token_ids": q} for q in PROMPTS], params, use_tqdm=False, lora_request=which)
    assert [list(o.outputs[0].token_ids) for o in again] == want
    assert r.step_runs["lora"] > runs["lora"] and r.step_runs["base"] > runs["base"]
    assert (r.compile_count, r.num_traces) == warm, "switching between the step variants compiled something"
