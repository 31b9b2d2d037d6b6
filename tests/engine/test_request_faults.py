"""A request whose host-side processing raises (detokenizer, stop checks) fails alone: its blocks
are freed, the error is reported once, and the other requests' outputs are unchanged."""

from __future__ import annotations

import pytest

from jaxllm.llm import LLM
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import assert_clean, make_engine, run_all
from tests.fakes.faults import PoisonDetokenizer, explode_on_boom_stop


PROMPTS = ["alpha beta", "gamma", "delta epsilon zeta"]


def reference():
    e = make_engine()
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0, n=1 + i % 2))
    return {k: [c.token_ids for c in v.outputs] for k, v in run_all(e).items()}


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_detokenizer_fault_fails_only_that_request(async_scheduling):
    want = reference()
    e = make_engine(async_scheduling=async_scheduling)
    e.detokenizer_factory = PoisonDetokenizer
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, SamplingParams(max_tokens=8, temperature=0, n=1 + i % 2))
        if i == 1:
            e.add_request("bad", "POISON pill", SamplingParams(max_tokens=8, n=2))
    errors: dict = {}
    finals = {}
    while e.has_unfinished_requests():
        for out in e.step():
            assert out.request_id != "bad" or not out.finished
            if out.finished:
                finals[out.request_id] = [c.token_ids for c in out.outputs]
        errors.update(e.take_request_errors())
    assert list(errors) == ["bad"] and isinstance(errors["bad"], UnicodeDecodeError)
    assert e.take_request_errors() == {}  # reported once
    assert finals == want
    assert_clean(e)  # every block back, nothing left in the scheduler


def test_stop_checker_fault_fails_only_that_request(monkeypatch):
    explode_on_boom_stop(monkeypatch)
    e = make_engine()
    e.add_request("ok", "hello", SamplingParams(max_tokens=4, stop="zz"))
    e.add_request("bad", "hello", SamplingParams(max_tokens=4, stop=["BOOM"]))
    finals = run_all(e)
    assert list(finals) == ["ok"] and len(finals["ok"].outputs[0].token_ids) == 4
    assert "stop checker exploded" in str(e.take_request_errors()["bad"])


def test_llm_generate_raises_naming_the_request_and_stays_usable():
    llm = LLM("fake", engine=make_engine())
    llm.engine.detokenizer_factory = PoisonDetokenizer
    with pytest.raises(RuntimeError, match=r"prompt 1\) failed: UnicodeDecodeError"):
        llm.generate(["fine", "POISON", "also fine"], SamplingParams(max_tokens=6), use_tqdm=False)
    assert_clean(llm.engine)
    out = llm.generate("fine", SamplingParams(max_tokens=3), use_tqdm=False)[0]
    assert out.finished and len(out.outputs[0].token_ids) == 3
