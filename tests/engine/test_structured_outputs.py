"""Structured outputs through the host engine with the fake runner (which honours the bitmask): spec
validation at admission, compiles that wait without blocking others, async scheduling, n > 1, the
grammar cache. References: Python's re / json, and the specs themselves."""
from __future__ import annotations

import json
import re
import threading

import pytest

from jaxllm.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.sampling_params import SamplingParams
from jaxllm.structured_outputs import StructuredOutputsParams as SO
from tests.engine.conftest import assert_clean, run_all
from tests.fakes.fake_runner import FakeRunner
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer, FakeTokenizer
from tests.fakes.grammar_tokenizers import fake_grammar_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "n"], "additionalProperties": False}


def make(async_scheduling=False, grammar_tokenizer=fake_grammar_tokenizer, **cfg):
    cfg = dict(model="fake", block_size=4, max_model_len=128, max_num_batched_tokens=32, max_num_seqs=8,
               async_scheduling=async_scheduling, **cfg)
    tok = FakeTokenizer()
    runner = FakeRunner(64, 4, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids)
    return LLMEngine(EngineConfig(**cfg), runner, tok, detokenizer_factory=FakeIncrementalDetokenizer,
                     grammar_tokenizer=grammar_tokenizer)


def check(spec: SO, text: str) -> None:
    if spec.regex is not None:
        assert re.fullmatch(spec.regex, text), (spec.regex, text)
    elif spec.choice is not None:
        assert text in spec.choice
    elif spec.json is not None:
        obj = json.loads(text)
        assert set(obj) == {"name", "n"} and len(obj["name"]) <= 5 and 0 <= obj["n"] <= 99, obj
    elif spec.json_object:
        assert isinstance(json.loads(text), dict)
    else:
        assert re.fullmatch(r"\d+(\+\d+)*", text), text


SPECS = [SO(regex=r"[a-z]{2,6}@[a-z]{2,4}\.(com|org)"), SO(choice=["red", "green", "blue"]), SO(json=SCHEMA),
         SO(json=json.dumps(SCHEMA)), SO(json_object=True),
         SO(grammar='start: num ("+" num)*\nnum: /[0-9]{1,3}/')]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_every_kind_matches_alone_and_beside_free_requests(async_scheduling):
    e = make(async_scheduling)
    for i, spec in enumerate(SPECS):
        e.add_request(f"g{i}", f"prompt {i}", SamplingParams(max_tokens=60, structured_outputs=spec, n=2))
        e.add_request(f"f{i}", f"free {i}", SamplingParams(max_tokens=7))
    finals = run_all(e)
    for i, spec in enumerate(SPECS):
        for c in finals[f"g{i}"].outputs:
            assert c.finish_reason == "stop" and c.token_ids[-1] == 1, (spec, c.text)
            check(spec, c.text)
        assert len(finals[f"f{i}"].outputs[0].token_ids) == 7
    if async_scheduling:  # constrained requests run on their tokens still in flight, masks given late
        assert [s for o in e.runner.steps for s in o.seqs if s.placeholder and s.request_id.startswith("g")]
        assert e.runner.num_late_steps > 0
    assert e.grammar.num_compiles == len(SPECS) - 1  # the schema as a dict and as text: one cache entry


@pytest.mark.parametrize("late", [True, False], ids=["late-mask", "waits-for-token"])
def test_async_gives_the_sync_tokens(late):
    """Async scheduling with masks written after dispatch (a runner with supports_late_bitmask), and
    with a runner without it (constrained requests wait for their token): the sync engine's tokens."""
    outs = []
    for on in (False, True):
        e = make(on)
        e.runner.supports_late_bitmask = late
        e.scheduler.late_grammar_mask = on and late
        for i, spec in enumerate(SPECS):
            e.add_request(f"g{i}", "p", SamplingParams(max_tokens=60, structured_outputs=spec, seed=i))
            e.add_request(f"f{i}", "p", SamplingParams(max_tokens=9, seed=i))
        outs.append({k: v.outputs[0].token_ids for k, v in run_all(e).items()})
        assert (e.runner.num_late_steps > 0) == (on and late)
    assert outs[0] == outs[1]


BAD = [
    (SO(json={"type": "foo"}), "structured_outputs.json"),
    (SO(json="{not json"), "structured_outputs.json"),
    (SO(json=[1, 2]), "structured_outputs.json"),
    (SO(regex="(ab"), "structured_outputs.regex"),
    (SO(regex=""), "structured_outputs.regex"),
    (SO(choice=[]), "structured_outputs.choice"),
    (SO(choice=["a", ""]), "structured_outputs.choice"),
    (SO(grammar="start: undefined_rule"), "structured_outputs.grammar"),
    (SO(regex="a", choice=["a"]), "structured_outputs (regex='a', choice=['a'])"),
    (SO(), "structured_outputs (nothing)"),
    (SO(json_object=False), "structured_outputs (nothing)"),
]


@pytest.mark.parametrize("spec,field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_specs_are_rejected_at_admission_naming_the_field(spec, field):
    e = make()
    e.add_request("ok", "hi", SamplingParams(max_tokens=3))
    with pytest.raises(ValueError) as info:
        e.add_request("bad", "hi", SamplingParams(max_tokens=3, structured_outputs=spec))
    msg = str(info.value)
    assert msg.startswith(field) and "is invalid" in msg and "\n" not in msg, msg
    assert set(run_all(e)) == {"ok"}  # the engine goes on; run_all checks 0 leaked blocks
    with pytest.raises(ValueError, match="must be None or a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"regex": "a"}).validate()


def test_a_model_without_a_text_tokenizer_rejects_grammars():
    e = make(grammar_tokenizer=None)  # FakeTokenizer has no HF tokenizer to build llguidance's from
    with pytest.raises(ValueError, match="structured_outputs is invalid for this model"):
        e.add_request("g", "hi", SamplingParams(structured_outputs=SO(regex="a")))
    assert_clean(e)


def test_a_compiling_grammar_waits_without_blocking_others_and_abort_frees_it():
    gate = threading.Event()

    def slow_tokenizer():
        assert gate.wait(30)
        return fake_grammar_tokenizer()

    e = make(grammar_tokenizer=slow_tokenizer)
    e.add_request("g", "hi", SamplingParams(max_tokens=30, structured_outputs=SO(choice=["yes", "no"])))
    e.add_request("h", "hi", SamplingParams(max_tokens=30, structured_outputs=SO(regex="[0-9]{3}")))
    e.add_request("f", "hi", SamplingParams(max_tokens=4))
    done = {}
    for _ in range(50):
        done.update({o.request_id: o for o in e.step() if o.finished})
        if "f" in done:
            break
    assert "f" in done and e.scheduler.num_waiting == 2 and e.scheduler.num_running == 0
    assert not [s for o in e.runner.steps for s in o.seqs if s.request_id in ("g", "h")]
    e.abort_request("h")
    gate.set()
    finals = run_all(e)  # checks 0 leaked blocks
    assert finals["g"].outputs[0].text in ("yes", "no")
    assert "h" not in finals


def test_bitmask_never_allows_ids_past_the_tokenizer_and_a_finished_grammar_allows_only_eos():
    """Logits wider than the tokenizer (padded vocab): those ids are never allowed; a vocab that is not
    a multiple of 32 clears the last word's unused bits; after the grammar ends only EOS is allowed."""
    import numpy as np

    from jaxllm.engine.grammar import GrammarCompiler

    tok = FakeTokenizer()
    for logits_width in (tok.vocab_size, 200, 256):
        c = GrammarCompiler(fake_grammar_tokenizer, logits_width, tok.eos_token_ids)
        state = c.new_state(c.check(SO(regex="[a-z]{1,3}")))
        state.wait(30)
        W = -(-logits_width // 32)
        bits = np.unpackbits(c.fill_bitmask([state], W).view(np.uint8), bitorder="little")  # [32 W]
        assert bits.shape == (32 * W,)
        allowed = set(np.flatnonzero(bits).tolist())
        assert allowed == {tok.encode(ch)[0] for ch in "abcdefghijklmnopqrstuvwxyz"}, logits_width
        for ch in "abc":
            state.accept(tok.encode(ch)[0])
        assert state.finished
        bits = np.unpackbits(c.fill_bitmask([state], W).view(np.uint8), bitorder="little")
        assert set(np.flatnonzero(bits).tolist()) == set(tok.eos_token_ids)
        c.close()


def test_a_spec_evicted_between_check_and_submit_is_checked_again():
    from jaxllm.engine.grammar import GrammarCompiler

    c = GrammarCompiler(fake_grammar_tokenizer, FakeTokenizer.vocab_size, [1], cache_size=1)
    keys = [c.check(SO(choice=["a", "b"])), c.check(SO(json_object=True))]  # the first is evicted
    for k in keys:
        c.new_state(k).wait(30)
    assert c.num_compiles == 2
    c.close()


def test_a_grammar_that_fails_to_build_ends_its_request_not_the_engine():
    def broken_tokenizer():
        raise RuntimeError("no fast tokenizer")

    e = make(grammar_tokenizer=broken_tokenizer)
    e.add_request("g", "hi", SamplingParams(max_tokens=10, structured_outputs=SO(regex="[a-z]+")))
    e.add_request("f", "hi", SamplingParams(max_tokens=3))
    finals = run_all(e)
    assert finals["g"].outputs[0].token_ids == [1] and finals["g"].outputs[0].finish_reason == "stop"
    assert len(finals["f"].outputs[0].token_ids) == 3
