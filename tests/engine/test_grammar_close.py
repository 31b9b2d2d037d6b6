"""The grammar compiler at shutdown (host engine, fake runner): ``GrammarCompiler.close`` cancels
queued compiles and returns without waiting for one in flight; its workers are daemon threads, so a
compile that never ends does not hold up interpreter exit; ``LLMEngine.close`` closes it, and
AsyncEngine's loop calls that when it stops. (The same lifecycle as the LoRA loader's:
tests/lora/test_host_loader_close.py; both run on ``jaxllm/daemon_pool.py``.)"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading

from jaxllm.engine.async_engine import AsyncEngine
from jaxllm.engine.grammar import GrammarCompiler
from jaxllm.sampling_params import SamplingParams
from jaxllm.structured_outputs import StructuredOutputsParams as SO
from tests.engine.test_structured_outputs import make
from tests.engine_checks import returns_within, threads_named
from tests.fakes.fake_tokenizer import FakeTokenizer
from tests.fakes.grammar_tokenizers import fake_grammar_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class GatedCompile:
    """Stands in for ``GrammarCompiler._compile``: the compiles of the grammars in ``held`` (None:
    every one) wait until ``let_go()`` (30 s at most, so a test cannot hang); lists those that ran."""

    def __init__(self, compile_fn, held: set[str] | None = None) -> None:
        self.compile_fn, self.held = compile_fn, held
        self.started, self.gate = threading.Event(), threading.Event()
        self.ran: list[str] = []

    def let_go(self) -> None:
        self.gate.set()

    def __call__(self, grammar: str):
        self.ran.append(grammar)
        if self.held is None or grammar in self.held:
            self.started.set()
            self.gate.wait(30)
        return self.compile_fn(grammar)


def test_close_cancels_queued_compiles_without_waiting_for_the_one_in_flight():
    c = GrammarCompiler(fake_grammar_tokenizer, FakeTokenizer.vocab_size, FakeTokenizer.eos_token_ids, workers=1)
    first, second = c.check(SO(regex="[a-c]{2}")), c.check(SO(choice=["yes", "no"]))
    gated = GatedCompile(c._compile, held={c._cache[first][0]})
    c._compile = gated
    running = c.submit(first)
    assert gated.started.wait(10)
    queued = c.submit(second)  # behind the held compile on the one worker
    assert threads_named("jaxllm-grammar") and all(t.daemon for t in threads_named("jaxllm-grammar"))
    assert returns_within(c.close)  # the first compile is still held
    assert queued.cancelled() and not running.done()
    gated.let_go()  # the compile in flight ends on its own thread
    running.result(10)
    assert gated.ran == [c._cache[first][0]]  # the queued one never ran
    again = c.new_state(second)  # the cancelled spec compiles again, on a new worker
    again.wait(30)
    assert again.matcher is not None and again.error is None
    assert gated.ran == [c._cache[first][0], c._cache[second][0]]
    c.close()


def _engine_with_a_held_compile():
    e = make()
    e.grammar = GrammarCompiler(fake_grammar_tokenizer, e.vocab_size, e.eos_token_ids, workers=1)  # 1: the next queues
    gated = GatedCompile(e.grammar._compile)
    e.grammar._compile = gated
    e.add_request("g", "prompt", SamplingParams(max_tokens=4, structured_outputs=SO(regex="[a-z]{3}")))
    assert gated.started.wait(10)
    return e, gated


def test_engine_close_closes_the_grammar_pool_with_a_compile_in_flight():
    e, gated = _engine_with_a_held_compile()
    e.add_request("h", "other", SamplingParams(max_tokens=4, structured_outputs=SO(choice=["x", "y"])))
    queued = e.grammar._cache[SO(choice=["x", "y"]).key()][1]
    assert returns_within(e.close)
    assert queued.cancelled() and not e.grammar._pool.started
    gated.let_go()


def test_async_engine_stop_closes_the_grammar_pool():
    e, gated = _engine_with_a_held_compile()
    closed = threading.Event()
    close = e.close
    e.close = lambda: (close(), closed.set())

    async def main():
        ae = AsyncEngine(e, idle_tick=0.01)
        await ae.start()
        await ae.stop(timeout=10)

    asyncio.run(main())
    assert closed.is_set() and not e.grammar._pool.started
    gated.let_go()


def test_a_compile_in_flight_does_not_hold_up_interpreter_exit():
    """A process whose engine has a grammar compile that never finishes, exiting without any close:
    it exits (a ThreadPoolExecutor's worker is joined at exit: this process hung until the compile
    ended, here never; the timeout below turns that into a failure)."""
    script = textwrap.dedent("""
        import threading
        from jaxllm.engine.grammar import GrammarCompiler
        from jaxllm.sampling_params import SamplingParams
        from jaxllm.structured_outputs import StructuredOutputsParams as SO
        from tests.engine.test_structured_outputs import make

        started, never = threading.Event(), threading.Event()
        def compile_forever(self, grammar):
            started.set()
            never.wait()
        GrammarCompiler._compile = compile_forever
        e = make()
        e.add_request("g", "prompt", SamplingParams(max_tokens=4, structured_outputs=SO(regex="[a-z]{3}")))
        assert started.wait(30)
        print("compiling")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "compiling"
