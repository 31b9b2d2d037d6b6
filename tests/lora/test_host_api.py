"""LLM(..., enable_lora=True).generate/chat(lora_request=...) like vLLM, the engine's add_lora /
remove_lora / list_loras, and the CLI flags (fake runner and loader, no jax). References: the
engine run with one request alone per (prompt, adapter)."""

from __future__ import annotations

import pytest

from jaxllm import LLM, SamplingParams
from jaxllm.lora import LoRARequest
from tests.engine.conftest import run_all
from tests.lora.host_fakes import FakeLoader, lora, make_lora_engine

G = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
KW = dict(enable_lora=True, max_loras=2, max_cpu_loras=3)


def alone(prompt, adapter: LoRARequest | None) -> list[int]:
    e = make_lora_engine(**{k: v for k, v in KW.items() if k != "enable_lora"})
    e.add_request("x", prompt, G, lora_request=adapter)
    return run_all(e)["x"].outputs[0].token_ids


def test_llm_generate_and_chat_with_adapters():
    loader = FakeLoader()
    llm = LLM("fake", engine=make_lora_engine(max_loras=2, max_cpu_loras=3, loader=loader), **KW)
    prompts = ["alpha", "beta", "gamma", "delta"]
    # one LoRARequest for all
    outs = llm.generate(prompts, G, use_tqdm=False, lora_request=lora(1))
    assert [o.outputs[0].token_ids for o in outs] == [alone(p, lora(1)) for p in prompts]
    # one per prompt, the base model among them, 3 adapters over 2 slots in one call
    per = [lora(1), None, lora(2), lora(3)]
    outs = llm.generate(prompts, G, use_tqdm=False, lora_request=per)
    assert [o.outputs[0].token_ids for o in outs] == [alone(p, a) for p, a in zip(prompts, per)]
    assert loader.loads[1] == 1  # loaded once, kept on the host
    with pytest.raises(ValueError, match=r"^lora_request has 2 entries, which is invalid: must be one "
                                         r"LoRARequest or exactly one per prompt \(4\)"):
        llm.generate(prompts, G, use_tqdm=False, lora_request=per[:2])
    conv = [{"role": "user", "content": "hi"}]
    chat = llm.chat(conv, G, use_tqdm=False, lora_request=lora(2))[0]
    assert chat.outputs[0].token_ids == alone(chat.prompt_token_ids, lora(2))
    assert llm.list_loras() == {1, 2, 3}
    assert llm.remove_lora(3) and llm.list_loras() == {1, 2}
    assert llm.add_lora(lora(5)) and llm.list_loras() == {1, 2, 5}
    # a bad adapter in the middle of a call: nothing of that call keeps running
    with pytest.raises(ValueError, match="failed to load"):
        llm.generate(prompts[:2], G, use_tqdm=False, lora_request=[lora(1), lora(9, "bad:/a9")])
    eng = llm.engine
    assert not eng.has_unfinished_requests() and eng.lora.num_pinned() == 0
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_llm_without_enable_lora_refuses_one_line():
    llm = LLM("fake", engine=make_lora_engine(enable_lora=False, loader=FakeLoader()))
    with pytest.raises(ValueError) as ei:
        llm.generate("hi", G, use_tqdm=False, lora_request=lora(1))
    assert str(ei.value).startswith("lora_request='adapter1' is invalid: this engine runs without adapters")
    assert llm.generate("hi", G, use_tqdm=False)[0].outputs[0].token_ids == alone("hi", None)


def test_cli_flags():
    from jaxllm.cli_args import engine_config_from_args
    from jaxllm.generate import build_parser
    from serving.__main__ import build_parser as server_parser
    from serving.__main__ import server_config

    args = build_parser().parse_args(["--lora", "ad=/adapters/ad", "--max-lora-rank", "32"])
    cfg = engine_config_from_args(args).validate()
    assert args.lora == ("ad", "/adapters/ad") and cfg.enable_lora and cfg.max_lora_rank == 32
    assert not engine_config_from_args(build_parser().parse_args([])).enable_lora
    args = server_parser().parse_args(["--lora-modules", "a=/p/a", "b=/p/b", "--max-loras", "2",
                                       "--max-cpu-loras", "4"])
    cfg = engine_config_from_args(args).validate()
    assert cfg.enable_lora and (cfg.max_loras, cfg.max_cpu_loras) == (2, 4)
    assert server_config(args).lora_modules == (("a", "/p/a"), ("b", "/p/b"))
    with pytest.raises(SystemExit):
        server_parser().parse_args(["--lora-modules", "no-equals-sign"])
    with pytest.raises(ValueError, match="adapter names must be unique"):
        server_config(server_parser().parse_args(["--lora-modules", "a=/p", "a=/q"]))
