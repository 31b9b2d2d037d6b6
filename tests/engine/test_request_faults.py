"""A request whose host-side processing raises (detokenizer, stop checks) fails alone: its blocks
are freed, the error is reported once, and the other requests' outputs are unchanged."""

from __future__ import annotations

import pytest

from jaxllm.engine import output_processor
from jaxllm.llm import LLM
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import assert_clean, make_engine, run_all
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer


class PoisonDetokenizer(FakeIncrementalDetokenizer):
    """Raises on the 3rd generated token of a prompt starting with "POISON"."""

    def add(self, new_ids):
        if self.tokenizer.decode(self.prompt_ids).startswith("POISON") and len(self.text) >= 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return super().add(new_ids)

    def __init__(self, tokenizer, prompt_ids, skip_special_tokens):
        super().__init__(tokenizer, prompt_ids, skip_special_tokens)
        self.prompt_ids = prompt_ids


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
    real = output_processor.find_stop_string

    def flaky(text, n_new, stops, include):
        if "BOOM" in stops:
            raise RuntimeError("stop checker exploded")
        return real(text, n_new, stops, include)

    monkeypatch.setattr(output_processor, "find_stop_string", flaky)
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
