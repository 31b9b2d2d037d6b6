"""A fake adapter loader and an engine with adapters over the fake runner (no jax, no files).

``FakeLoader`` stands in for ``jaxllm.lora.peft.load_adapter``: a path ``bad:<why>`` raises the
one-line ValueError a bad adapter raises; any other path loads a ``FakeAdapter`` named after the
request. It counts loads per adapter id. ``GatedLoader`` holds the loads of chosen ids until a
test lets them go: "this adapter is still loading" for as many steps as the test needs.

The engine loads a request's adapter on its loader thread; ``settle_loads(engine)`` waits until
every load in flight is done, so the next ``step()`` takes them all (a test about scheduling, not
about loading, calls it after adding its requests: the same steps every run).
"""

from __future__ import annotations

import concurrent.futures
import threading
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


class GatedLoader(FakeLoader):
    """A FakeLoader whose loads of the ids in ``held`` wait until ``let_go(id)`` (``started[id]`` is
    set once such a load began; a load still held after 30 s fails, so a test cannot hang)."""

    def __init__(self, held=()) -> None:
        super().__init__()
        self._gates = {i: threading.Event() for i in held}
        self.started = {i: threading.Event() for i in held}

    def let_go(self, i: int) -> None:
        self._gates[i].set()

    def __call__(self, lora: LoRARequest) -> FakeAdapter:
        gate = self._gates.get(lora.lora_int_id)
        if gate is not None:
            self.started[lora.lora_int_id].set()
            if not gate.wait(30):
                raise TimeoutError(f"GatedLoader: load of {lora.lora_int_id} never let go")
        return super().__call__(lora)


def settle_loads(engine, timeout: float = 30) -> None:
    """Wait until every adapter load in flight is done (the next step takes them)."""
    futures = [job.future for job in engine.lora.loading.values()]
    done, pending = concurrent.futures.wait(futures, timeout)
    assert not pending, f"{len(pending)} adapter load(s) still running after {timeout}s"


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
