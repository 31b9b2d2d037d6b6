"""A fake adapter loader and an engine with adapters over the fake runner (no jax, no files).

``FakeLoader`` stands in for ``jaxllm.lora.peft.load_adapter``: a path ``bad:<why>`` raises the
one-line ValueError a bad adapter raises; any other path loads a ``FakeAdapter`` named after the
request. It counts loads per adapter id.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.lora import LoRARequest
from tests.fakes.fake_runner import FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer


@dataclass(frozen=True)
class FakeAdapter:
    name: str
    rank: int = 8
    nbytes: int = 1024


class FakeLoader:
    def __init__(self) -> None:
        self.loads: Counter[int] = Counter()

    def __call__(self, lora: LoRARequest) -> FakeAdapter:
        if lora.lora_path.startswith("bad:"):
            raise ValueError(f"{lora.lora_path[4:]}/adapter_model.safetensors: tensor "
                             f"'base_model.model.layers.0.q_proj.lora_A.weight' is invalid: rank 99 > "
                             f"max_lora_rank=16\n(a second line the engine must not pass on)")
        self.loads[lora.lora_int_id] += 1
        return FakeAdapter(lora.lora_name)


def lora(i: int, path: str | None = None) -> LoRARequest:
    return LoRARequest(f"adapter{i}", i, path or f"/adapters/a{i}")


def make_lora_engine(num_blocks=64, block_size=4, max_loras=2, max_cpu_loras=None, loader=None, **cfg):
    cfg.setdefault("max_model_len", 128)
    cfg.setdefault("max_num_batched_tokens", 32)
    cfg.setdefault("max_num_seqs", 8)
    cfg.setdefault("enable_lora", True)
    cfg.setdefault("model", "fake")
    config = EngineConfig(block_size=block_size, max_loras=max_loras,
                          max_cpu_loras=max_cpu_loras, **cfg)
    tok = FakeTokenizer()
    runner = FakeRunner(num_blocks, block_size, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids)
    runner.max_loras = max_loras
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer,
                     lora_load_fn=loader if loader is not None else FakeLoader())
