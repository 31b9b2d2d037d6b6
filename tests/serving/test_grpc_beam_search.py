"""Beam search on the gRPC door (``SamplingParams.use_beam_search`` / ``length_penalty``; no jax).

References: the offline ``LLM.beam_search`` over a second engine built the same way, and the HTTP
door of the same server (``use_beam_search`` on /v1/completions and /v1/chat/completions). The
engine is the real host engine over the fake runner/tokenizer (tokens and logprobs depend only on
the context), so the beams must match exactly; every KV block must be free afterwards."""

from __future__ import annotations


import grpc
import httpx
import pytest

from http_helpers import SlowRunner, ThreadedServer, make_llm_engine, offline_beam_work, record_fork_hints
from jaxllm import LLM, BeamSearchParams
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc

PROMPT = "The three primary colors are"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
EOS = 1  # FakeTokenizer's


@pytest.fixture(scope="module")
def srv():
    eng = make_llm_engine()
    hints = record_fork_hints(eng)
    s = ThreadedServer(eng)
    s.fork_hints = hints
    with grpc.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
        s.stub = pb_grpc.GenerationStub(ch)
        yield s
    s.close()


@pytest.fixture(scope="module")
def llm():
    return LLM("fake-llm", engine=make_llm_engine())


def offline(llm, prompt, n, max_tokens, lp=1.0, **kw) -> list[tuple]:
    """(generated ids, text without a final EOS, finish_reason, cum_logprob) per beam, best first."""
    tok = llm.get_tokenizer()
    ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else tok.encode(prompt)
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=n, max_tokens=max_tokens,
                                                     length_penalty=lp, **kw))[0]
    want = []
    for s in out.sequences:
        gen = s.tokens[len(ids):]
        shown = gen[:-1] if gen and gen[-1] == EOS else gen
        want.append((gen, tok.decode(shown, skip_special_tokens=False), s.finish_reason, s.cum_logprob))
    return want


def grpc_beams(srv, timeout=30, **req) -> tuple[list[pb.GenerateResponse], list[tuple]]:
    resps = list(srv.stub.Generate(pb.GenerateRequest(**req), timeout=timeout))
    got = [(list(d.token_ids), d.text, pb.FinishReason.Name(d.finish_reason), d.cumulative_logprob)
           for d in resps[-1].outputs]
    return resps, got


REASONS = {"stop": "FINISH_REASON_STOP", "length": "FINISH_REASON_LENGTH"}


def test_grpc_beams_equal_offline_and_http(srv, llm):
    sp = pb.SamplingParams(n=3, max_tokens=10, temperature=0, length_penalty=0.5, use_beam_search=True, logprobs=2)
    resps, got = grpc_beams(srv, request_id="beams-1", text=PROMPT, sampling=sp)
    want = offline(llm, PROMPT, 3, 10, 0.5)
    assert got == [(g, t, REASONS[f], pytest.approx(c)) for g, t, f, c in want]
    assert {f for _, _, f, _ in want} == {"stop", "length"}  # both ways of ending are exercised
    # one final response: the whole beams, its usage, the prompt ids, the EOS id as the stop reason
    assert len(resps) == 1 and resps[0].finished and resps[0].request_id == "beams-1"
    last = resps[0]
    assert list(last.prompt_token_ids) == llm.get_tokenizer().encode(PROMPT)
    assert last.usage.completion_tokens == sum(len(g) for g, _, _, _ in want)
    assert [d.index for d in last.outputs] == [0, 1, 2]
    assert all(d.stop_token_id == EOS for d in last.outputs if d.finish_reason == pb.FINISH_REASON_STOP)
    assert all(len(d.logprobs) == len(d.token_ids) and [x.token_id for x in d.logprobs] == list(d.token_ids)
               for d in last.outputs)
    # the HTTP door of the same server answers the same beams
    body = {"model": "fake-llm", "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "n": 3,
            "use_beam_search": True, "length_penalty": 0.5}
    http = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=30).json()
    assert [(c["text"], c["finish_reason"]) for c in http["choices"]] == [(t, f) for _, t, f, _ in want]
    assert len(srv.fork_hints) > 0  # the door asked the engine to fork the parents' KV
    assert srv.engine.runner.num_block_copies > 0  # and it honoured them (gated parents wait for their forks)
    srv.wait_idle()


def test_grpc_chat_and_token_id_prompts(srv, llm):
    tok = llm.get_tokenizer()
    chat = pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in CHAT])
    sp = pb.SamplingParams(n=2, max_tokens=8, temperature=0, use_beam_search=True, include_stop_str_in_output=True)
    _, got = grpc_beams(srv, chat=chat, sampling=sp)
    want = offline(llm, tok.chat_prompt(CHAT), 2, 8, include_stop_str_in_output=True)
    assert got == [(g, t, REASONS[f], pytest.approx(c)) for g, t, f, c in want]
    http = httpx.post(srv.base_url + "/v1/chat/completions", timeout=30, json={
        "model": "fake-llm", "messages": CHAT, "max_tokens": 8, "temperature": 0, "n": 2,
        "use_beam_search": True, "include_stop_str_in_output": True}).json()
    assert [c["message"]["content"] for c in http["choices"]] == [t for _, t, _, _ in want]
    ids = tok.encode("Once upon a time")
    sp = pb.SamplingParams(n=4, max_tokens=6, temperature=0, use_beam_search=True, ignore_eos=True)
    _, got = grpc_beams(srv, token_ids=pb.TokenIds(ids=ids), sampling=sp)
    want = offline(llm, {"prompt_token_ids": ids}, 4, 6, ignore_eos=True)
    assert got == [(g, t, REASONS[f], pytest.approx(c)) for g, t, f, c in want]
    srv.wait_idle()


@pytest.mark.parametrize("sampling,extra,message", [
    ({"stop": ["x"]}, {}, "stop is invalid with use_beam_search=true"),
    ({"stop_token_ids": [5]}, {}, "stop_token_ids is invalid with use_beam_search=true"),
    ({"logit_bias": {5: 1.0}}, {}, "logit_bias is invalid with use_beam_search=true"),
    ({"min_tokens": 2}, {}, "min_tokens is invalid with use_beam_search=true"),
    ({"prompt_logprobs": 1}, {}, "prompt_logprobs is invalid with use_beam_search=true"),
    ({"structured_outputs": pb.StructuredOutputs(regex="a+")}, {},
     "structured_outputs is invalid with use_beam_search=true"),
    ({"n": 11}, {}, "n=11 is invalid: must be an integer in [1, 10]"),
    ({"temperature": -1.0}, {}, "temperature=-1.0 is invalid"),
    ({}, {"chat": pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")], tools_json="[]")},
     "chat.tools_json is invalid with use_beam_search=true"),
    ({}, {"token_ids": pb.TokenIds(ids=[5] * 128)}, "prompt length=128 tokens is invalid"),
])
def test_bad_fields_are_invalid_argument_naming_the_field(srv, sampling, extra, message):
    sp = pb.SamplingParams(**{"max_tokens": 4, "n": 2, "use_beam_search": True, **sampling})
    req = {"text": "Hi", **extra}
    with pytest.raises(grpc.RpcError) as e:
        list(srv.stub.Generate(pb.GenerateRequest(sampling=sp, **req), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details() and "\n" not in e.value.details(), e.value.details()
    srv.wait_idle()


def test_length_penalty_without_beam_search_is_ignored_by_both_doors(srv, llm):
    """vLLM's rule on both doors: length_penalty is accepted and used only by beam search; a
    sampled request answers what it answers without it (the offline LLM's greedy output)."""
    from jaxllm import SamplingParams

    want = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    want_ids = list(want.outputs[0].token_ids)
    for lp in (0.5, 2.0):
        sp = pb.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, length_penalty=lp)
        resps = list(srv.stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=sp), timeout=30))
        assert [t for r in resps for d in r.outputs for t in d.token_ids] == want_ids
        for path, body in (("/v1/completions", {"prompt": PROMPT}),
                           ("/v1/chat/completions", {"messages": CHAT})):
            r = httpx.post(srv.base_url + path, timeout=30, json={
                "model": "fake-llm", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "length_penalty": lp,
                "use_beam_search": False, **body})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
    r = httpx.post(srv.base_url + "/v1/completions", timeout=30, json={
        "model": "fake-llm", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
        "length_penalty": 0.5})
    assert r.json()["choices"][0]["text"] == want.outputs[0].text
    srv.wait_idle()


def test_beams_wait_for_the_driver_at_a_real_step_pace():
    """At 3 ms a step, two concurrent gRPC searches do exactly the offline searches' work (step-gated
    requests: no beam decodes past the driver, every fork copies its parent's partial block)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["The three primary colors are", "Once upon a time"]
    outs, generated, copies = offline_beam_work(prompts, 4, 24)
    assert copies > 0
    srv = ThreadedServer(make_llm_engine(max_model_len=512, num_blocks=1024, max_num_seqs=32, runner_cls=SlowRunner))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.server.port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            sp = pb.SamplingParams(n=4, max_tokens=24, temperature=0, use_beam_search=True)
            with ThreadPoolExecutor(2) as pool:
                got = list(pool.map(lambda p: list(stub.Generate(pb.GenerateRequest(text=p, sampling=sp),
                                                                 timeout=60))[-1], prompts))
        tok = srv.engine.tokenizer
        for p, o, resp in zip(prompts, outs, got):
            n0 = len(tok.encode(p))
            assert [list(d.token_ids) for d in resp.outputs] == [s.tokens[n0:] for s in o.sequences]
            assert [d.cumulative_logprob for d in resp.outputs] == pytest.approx([s.cum_logprob for s in o.sequences])
        stats = srv.wait_idle()
        assert (stats.num_generated_tokens, srv.engine.runner.num_block_copies) == (generated, copies)
    finally:
        srv.close()


def test_client_leaving_mid_search_frees_every_block():
    """gRPC deadlines that expire mid-search: every fork the searches opened is aborted, every KV
    block is free, the server keeps answering."""
    srv = ThreadedServer(make_llm_engine(max_model_len=512, num_blocks=1024, max_num_seqs=32, runner_cls=SlowRunner))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.server.port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            sp = pb.SamplingParams(n=4, max_tokens=400, temperature=0, ignore_eos=True, use_beam_search=True)
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(text="impatient", sampling=sp), timeout=0.5))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            stats = srv.wait_idle(timeout=20)
            assert stats.num_free_blocks == stats.num_blocks == 1024
            assert 0 < stats.num_generated_tokens < 4 * 400  # the search ran and was cut short
            sp.max_tokens = 3
            resps = list(stub.Generate(pb.GenerateRequest(text="after", sampling=sp), timeout=20))
            assert resps[-1].finished and len(resps[-1].outputs) == 4
        srv.wait_idle()
    finally:
        srv.close()
