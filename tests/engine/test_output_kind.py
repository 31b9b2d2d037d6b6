"""SamplingParams.output_kind (vLLM's RequestOutputKind): DELTA outputs concatenate to the CUMULATIVE
run's, FINAL_ONLY gives one output per request equal to the CUMULATIVE run's final one, on the same
seeded workload (n > 1, stop strings held back, logprobs, prompt logprobs, preemption) run three
times with the fake runner; LLM.generate asks for FINAL_ONLY without touching the caller's params."""
from __future__ import annotations

import pytest

from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from tests.engine.conftest import assert_clean, make_engine, script_fn

K = RequestOutputKind
TEXT = "the quick brown fox jumps over the lazy dog. "


def workload(kind):
    return [
        ("a", "hello", SamplingParams(max_tokens=30, temperature=0.0, output_kind=kind)),
        ("b", "abc", SamplingParams(max_tokens=40, stop=["lazy"], output_kind=kind, logprobs=2)),
        ("c", "xyz", SamplingParams(n=3, max_tokens=25, temperature=0.9, seed=7, output_kind=kind,
                                    prompt_logprobs=1)),
        ("d", "a longer prompt that preempts", SamplingParams(max_tokens=60, stop=["over the"], output_kind=kind)),
    ]


def run(kind):
    engine = make_engine(num_blocks=24, next_token_fn=script_fn(TEXT), max_num_seqs=4, max_model_len=96)
    for rid, prompt, p in workload(kind):
        engine.add_request(rid, prompt, p)
    per_request: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            per_request.setdefault(out.request_id, []).append(out)
    assert_clean(engine)
    assert engine.get_stats().num_preemptions > 0  # the outputs survive a recompute
    return per_request


def test_delta_and_final_only_agree_with_cumulative():
    cum, delta, final = run(K.CUMULATIVE), run(K.DELTA), run(K.FINAL_ONLY)
    assert set(cum) == set(delta) == set(final) == {"a", "b", "c", "d"}
    for rid, outs in cum.items():
        last = outs[-1]
        assert last.finished and [o.finished for o in outs].count(True) == 1
        # FINAL_ONLY: exactly the cumulative run's final output
        assert len(final[rid]) == 1 and final[rid][0].finished
        assert final[rid][0].outputs == last.outputs and final[rid][0].prompt_logprobs == last.prompt_logprobs
        # DELTA: the same number of outputs, their pieces concatenate to the cumulative final
        ds = delta[rid]
        assert len(ds) == len(outs) and ds[-1].finished
        for i, c in enumerate(last.outputs):
            pieces = [d.outputs[i] for d in ds]
            assert "".join(p.text for p in pieces) == c.text
            assert sum((p.token_ids for p in pieces), []) == c.token_ids
            if c.logprobs is not None:
                assert sum((p.logprobs for p in pieces), []) == c.logprobs
            assert pieces[-1].cumulative_logprob == c.cumulative_logprob  # stays cumulative
            assert (pieces[-1].finish_reason, pieces[-1].stop_reason) == (c.finish_reason, c.stop_reason)
            # every intermediate delta is the difference of consecutive cumulative outputs
            for k in range(1, len(outs)):
                prev, cur = outs[k - 1].outputs[i], outs[k].outputs[i]
                assert ds[k].outputs[i].token_ids == cur.token_ids[len(prev.token_ids):]
                assert ds[k].outputs[i].text == cur.text[len(prev.text):]
        # prompt logprobs once, with the first delta
        assert [d.prompt_logprobs is not None for d in ds] == [last.prompt_logprobs is not None] + [False] * (len(ds) - 1)
    assert cum["b"][-1].outputs[0].stop_reason == "lazy" and "lazy" not in cum["b"][-1].outputs[0].text
    assert len(cum["a"]) > 5  # the comparison covers many steps


def test_abort_under_delta_returns_only_the_unsent_rest():
    engine = make_engine(next_token_fn=script_fn(TEXT))
    engine.add_request("r", "hi", SamplingParams(max_tokens=50, output_kind=K.DELTA))
    sent = ""
    for _ in range(5):
        for out in engine.step():
            sent += out.outputs[0].text
    final = engine.abort_request(["r"])
    assert len(final) == 1 and final[0].finished and final[0].outputs[0].finish_reason == "abort"
    assert sent + final[0].outputs[0].text == TEXT[:len(sent + final[0].outputs[0].text)]
    assert_clean(engine)


@pytest.mark.parametrize("bad", [3, -1, "delta", True])
def test_bad_output_kind_names_field_and_choices(bad):
    with pytest.raises(ValueError, match=rf"output_kind={bad!r} is invalid: must be one of 0 \(CUMULATIVE\), "
                                         r"1 \(DELTA\), 2 \(FINAL_ONLY\)"):
        SamplingParams(output_kind=bad)
    assert SamplingParams(output_kind=1).output_kind is K.DELTA


def test_llm_generate_reads_finals_only_and_leaves_the_callers_params(monkeypatch):
    from jaxllm.llm import LLM

    engine = make_engine(next_token_fn=script_fn(TEXT))
    seen = []
    add = engine.add_request
    monkeypatch.setattr(engine, "add_request", lambda rid, prompt, p, **kw: seen.append(p) or add(rid, prompt, p, **kw))
    llm = LLM.__new__(LLM)
    llm.engine = engine
    import itertools
    llm._ids, llm.stat_logger = itertools.count(), None
    mine = SamplingParams(max_tokens=12)
    outs = llm._run(["hi", "yo"], [mine, mine], use_tqdm=False)
    assert [o.outputs[0].text for o in outs] == [TEXT[:12]] * 2
    assert [p.output_kind for p in seen] == [K.FINAL_ONLY] * 2 and mine.output_kind is K.CUMULATIVE


def test_outputs_share_one_prompt_list_copied_from_the_callers():
    """Every RequestOutput of a request hands out the same prompt list (no O(prompt) copy per step, as
    vLLM's outputs share theirs), copied once at add_request: the caller's list is not aliased."""
    engine = make_engine(num_blocks=24, next_token_fn=script_fn(TEXT), max_num_seqs=4, max_model_len=96)
    ids = [5, 6, 7, 8]
    engine.add_request("p", {"prompt_token_ids": ids}, SamplingParams(max_tokens=5, temperature=0.0))
    ids.append(99)  # the caller reuses its list
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs) == 5 and all(o.prompt_token_ids == [5, 6, 7, 8] for o in outs)
    assert all(o.prompt_token_ids is outs[0].prompt_token_ids for o in outs)
    assert_clean(engine)
