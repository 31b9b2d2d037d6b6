"""Helpers for the HTTP API tests: a real ServingServer (gRPC + HTTP on loopback, port 0) on
its own event-loop thread, so module-scoped fixtures can share it and the sync ``openai``
client can call it from the test thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from serving.config import ServerConfig
from serving.server import ServingServer
from tests.fakes.fake_runner import FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer

# a loaded 2-core CI box can starve the engine thread for seconds: a tight watchdog would turn
# that into 503s the tests do not ask about
FAST = dict(watchdog_timeout=15.0, health_probe_interval=0.2)


class SlowRunner(FakeRunner):
    """The fake runner at 3 ms a step: a long request runs for seconds (aborts, disconnects, admin
    calls and beam forks land while it streams)."""

    def dispatch(self, out):
        time.sleep(0.003)
        return super().dispatch(out)


def make_llm_engine(max_model_len: int = 128, num_blocks: int = 256, max_num_seqs: int = 8,
                    runner_cls=FakeRunner, grammar_tokenizer=None, task: str = "generate") -> LLMEngine:
    """The real host engine (scheduler, KV cache manager, output processor) over the fake
    runner and tokenizer: no jax, real block accounting. ``grammar_tokenizer``: structured
    outputs (tests/fakes/grammar_tokenizers.py's fake_grammar_tokenizer). ``task="embed"``: an
    embedding server (the fake runner pools)."""
    tok = FakeTokenizer()
    config = EngineConfig(model="fake-llm", block_size=4, max_model_len=max_model_len,
                          max_num_batched_tokens=64, max_num_seqs=max_num_seqs, task=task)
    runner = runner_cls(num_blocks, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids, task=task)
    return LLMEngine(config, runner, tok, detokenizer_factory=FakeIncrementalDetokenizer,
                     grammar_tokenizer=grammar_tokenizer)


def record_fork_hints(engine: LLMEngine) -> list[tuple[str, str]]:
    """(request id, fork_of) of every add_request that carries a beam-search fork hint, recorded as
    the engine thread adds them (the door passes the hints; ``offline_beam_work`` checks the engine
    honours them: the door's requests are step-gated, so a parent never runs ahead of its fork)."""
    hints: list[tuple[str, str]] = []
    add = engine.add_request

    def recording_add(request_id, *args, fork_of=None, **kw):
        if fork_of is not None:
            hints.append((request_id, fork_of))
        return add(request_id, *args, fork_of=fork_of, **kw)

    engine.add_request = recording_add
    return hints


def offline_beam_work(prompts: list, n: int, max_tokens: int) -> tuple[list, int, int]:
    """``LLM.beam_search`` (greedy) of ``prompts`` over a fresh engine built like the servers':
    (its BeamSearchOutputs, the tokens its engine generated, the partial blocks its forks copied).
    The offline driver steps the engine itself, so those are the work the search needs: a server
    whose beams ran ahead of its driver generates more and copies fewer (forks prefill)."""
    from jaxllm import LLM, BeamSearchParams

    eng = make_llm_engine(max_model_len=512, num_blocks=1024, max_num_seqs=32)
    outs = LLM("fake-llm", engine=eng).beam_search(prompts, BeamSearchParams(beam_width=n, max_tokens=max_tokens))
    return outs, eng.get_stats().num_generated_tokens, eng.runner.num_block_copies


class ThreadedServer:
    def __init__(self, engine, **cfg):
        cfg.setdefault("port", 0)
        cfg.setdefault("http_port", 0)
        for k, v in FAST.items():
            cfg.setdefault(k, v)
        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="http-test-loop", daemon=True)
        self._thread.start()
        self.server: ServingServer = self.call(self._make(ServerConfig(**cfg), engine))
        self.call(self.server.start())
        self.call(self.server.wait_serving(10))
        self.base_url = f"http://127.0.0.1:{self.server.http_port}"

    @staticmethod
    async def _make(cfg, engine):
        return ServingServer(cfg, engine=engine, idle_tick=0.02)

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self):
        return self.server.async_engine.stats

    def wait_idle(self, timeout: float = 10.0):
        """Poll the engine's stats until no request is left and every KV block is free."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s.num_free_blocks == s.num_blocks and s.num_running == 0 and s.num_waiting == 0 \
                    and not self.server.door.active:
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"not idle after {timeout}s: {s}, in flight: {list(self.server.door.active)}")
            time.sleep(0.02)

    def close(self):
        if self.server.exit_code is None:
            self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def sse_events(r) -> list[dict]:
    """An OpenAI stream's chunks (an httpx response's ``data:`` events), checking it ends ``data: [DONE]``."""
    lines = [ln for ln in r.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]", r.text[-200:]
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
