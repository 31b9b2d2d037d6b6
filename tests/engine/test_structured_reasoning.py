"""Structured outputs after a reasoning block (``StructuredOutputsParams.reasoning_end``): the
grammar stays idle (every token allowed, none fed to the matcher) until the end-of-reasoning ids
appear in the output, then constrains the rest. The fake runner is scripted to write a think block
first; references: ``json`` / ``re`` on the text after ``</think>``, and the same request without
``reasoning_end`` (the constraint from the first token: the script cannot get through)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jaxllm.sampling_params import SamplingParams
from jaxllm.structured_outputs import StructuredOutputsParams as SO
from tests.engine.conftest import run_all
from tests.engine.test_structured_outputs import SCHEMA, check, make
from tests.fakes.fake_runner import context_hash
from tests.fakes.fake_tokenizer import FakeTokenizer
from tests.fakes.grammar_tokenizers import fake_grammar_tokenizer

TOK = FakeTokenizer()
END = TOK.encode("</think>", add_special_tokens=False)
THINK = "<think>\nThe user wants JSON. {not json} </thin </think>"


def scripted(engine, script: str):
    """The runner writes ``script`` first (when the mask lets it), then its usual hash tokens."""
    ids = TOK.encode(script, add_special_tokens=False)

    def next_token(ctx, s):
        k = len(ctx) - s.num_prompt_tokens
        return ids[k] if k < len(ids) else context_hash(ctx) % engine.runner.vocab_size

    engine.runner.next_token_fn = next_token


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("spec", [SO(json=SCHEMA), SO(regex=r"[a-z]{2,6}@[a-z]{2,4}\.(com|org)"),
                                  SO(choice=["red", "green", "blue"])], ids=["json", "regex", "choice"])
def test_the_grammar_constrains_only_after_the_reasoning_end(async_scheduling, spec):
    e = make(async_scheduling)
    scripted(e, THINK)
    deferred = SO(**{spec.kind: getattr(spec, spec.kind)}, reasoning_end=END)
    e.add_request("r", "p", SamplingParams(max_tokens=110, structured_outputs=deferred, n=2))
    e.add_request("g", "p", SamplingParams(max_tokens=110, structured_outputs=spec))  # from the start
    e.add_request("f", "p", SamplingParams(max_tokens=5))  # free, beside them
    finals = run_all(e)
    for c in finals["r"].outputs:
        assert c.text.startswith(THINK) and c.finish_reason == "stop", c.text
        check(spec, c.text[len(THINK):])  # the rest matches, and only the rest
    g = finals["g"].outputs[0].text
    assert not g.startswith("<")  # the script could not get through
    check(spec, g)
    assert len(finals["f"].outputs[0].token_ids) == 5


def test_a_reasoning_that_never_ends_leaves_the_output_unconstrained():
    e = make()
    scripted(e, "<think>" + "x" * 40)  # never closes: the whole output is unconstrained
    e.add_request("r", "p", SamplingParams(max_tokens=60, structured_outputs=SO(json=SCHEMA, reasoning_end=END)))
    text = run_all(e)["r"].outputs[0]
    assert text.finish_reason == "length" and text.text.startswith("<think>" + "x" * 40)
    with pytest.raises(ValueError):
        json.loads(text.text)


def test_the_bitmask_of_a_thinking_state_allows_every_id_then_follows_the_grammar():
    from jaxllm.engine.grammar import GrammarCompiler

    c = GrammarCompiler(fake_grammar_tokenizer, 200, TOK.eos_token_ids)
    key = c.check(SO(regex="[a-z]{1,3}"))
    state, plain = c.new_state(key, END), c.new_state(key)
    state.wait(30)
    W = -(-200 // 32)

    def allowed(s):
        bits = np.unpackbits(c.fill_bitmask([s], W).view(np.uint8), bitorder="little")
        return set(np.flatnonzero(bits).tolist())

    assert state.thinking and allowed(state) == set(range(200))
    for t in TOK.encode("ab</think", add_special_tokens=False):  # "a", "b" go nowhere: still thinking
        state.accept(t)
    assert state.thinking and not state.finished
    state.accept(END[-1])
    assert not state.thinking and allowed(state) == allowed(plain) == {TOK.encode(ch)[0] for ch in
                                                                    "abcdefghijklmnopqrstuvwxyz"}
    c.close()


@pytest.mark.parametrize("end, why", [([], "non-empty list"), ([-1], "integers >= 0"), (["a"], "integers"),
                                      ([10**6], "past the vocabulary")])
def test_a_bad_reasoning_end_is_refused_naming_the_field(end, why):
    e = make()
    with pytest.raises(ValueError, match=r"^structured_outputs\.reasoning_end=.* is invalid: .*" + re.escape(why)):
        e.add_request("x", "p", SamplingParams(max_tokens=5, structured_outputs=SO(regex="a", reasoning_end=end)))
