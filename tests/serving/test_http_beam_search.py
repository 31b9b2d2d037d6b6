"""vLLM's ``use_beam_search`` / ``length_penalty`` on /v1/completions and /v1/chat/completions,
through the official ``openai`` client (``extra_body``), against the offline ``LLM.beam_search``
over a second engine built the same way (real host engine, fake runner/tokenizer: the fake's
tokens and logprobs depend only on the context, so beams must match exactly)."""

from __future__ import annotations

import openai
import pytest

from http_helpers import SlowRunner, ThreadedServer, make_llm_engine, offline_beam_work, record_fork_hints
from jaxllm import LLM, BeamSearchParams

PROMPTS = ["The three primary colors are", "Once upon a time"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
EOS = 1  # FakeTokenizer's


@pytest.fixture(scope="module")
def srv():
    eng = make_llm_engine()
    hints = record_fork_hints(eng)
    s = ThreadedServer(eng)
    s.fork_hints = hints
    yield s
    s.close()


@pytest.fixture(scope="module")
def llm():
    return LLM("fake-llm", engine=make_llm_engine())


@pytest.fixture(scope="module")
def client(srv):
    with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def offline(llm, prompt, n, max_tokens, lp=1.0, **kw):
    """vLLM's serving answer from the offline beams: text = generated tokens without a final EOS."""
    tok = llm.get_tokenizer()
    ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else tok.encode(prompt)
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=n, max_tokens=max_tokens,
                                                     length_penalty=lp, **kw))[0]
    want = []
    for s in out.sequences:
        gen = s.tokens[len(ids):]
        shown = gen[:-1] if gen and gen[-1] == EOS else gen
        want.append((tok.decode(shown, skip_special_tokens=False), s.finish_reason, len(gen)))
    return want


def test_completions_beams_equal_offline_stream_too(client, llm, srv):
    kw = dict(model="fake-llm", prompt=PROMPTS, max_tokens=10, temperature=0, n=3,
              extra_body={"use_beam_search": True, "length_penalty": 0.5})
    resp = client.completions.create(**kw)
    want = [w for p in PROMPTS for w in offline(llm, p, 3, 10, 0.5)]
    assert [c.index for c in resp.choices] == list(range(6))
    assert [(c.text, c.finish_reason) for c in resp.choices] == [(t, f) for t, f, _ in want]
    assert resp.usage.completion_tokens == sum(n for _, _, n in want)
    assert any(f == "stop" for _, f, _ in want) and any(f == "length" for _, f, _ in want)
    # streamed: vLLM's beam search stream is the finished beams, one chunk per prompt, then [DONE]
    texts, reasons = {}, {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    assert [(texts[i], reasons[i]) for i in range(6)] == [(t, f) for t, f, _ in want]
    assert len(srv.fork_hints) > 0  # the door asked the engine to fork the parents' KV, too
    assert srv.engine.runner.num_block_copies > 0  # and it honoured them (gated parents wait for their forks)
    srv.wait_idle()


def test_chat_beams_and_include_stop(client, llm, srv):
    prompt = llm.get_tokenizer().chat_prompt(CHAT)
    resp = client.chat.completions.create(model="fake-llm", messages=CHAT, max_tokens=8, temperature=0, n=2,
                                          extra_body={"use_beam_search": True})
    want = offline(llm, prompt, 2, 8)
    assert [(c.message.content, c.finish_reason) for c in resp.choices] == [(t, f) for t, f, _ in want]
    # include_stop_str_in_output: the EOS id stays in the token count (its text is still not shown)
    resp = client.completions.create(model="fake-llm", prompt=PROMPTS[0], max_tokens=10, temperature=0, n=3,
                                     extra_body={"use_beam_search": True, "include_stop_str_in_output": True})
    want = offline(llm, PROMPTS[0], 3, 10, include_stop_str_in_output=True)
    assert [(c.text, c.finish_reason) for c in resp.choices] == [(t, f) for t, f, _ in want]
    assert resp.usage.completion_tokens == sum(n for _, _, n in want)
    srv.wait_idle()


@pytest.mark.parametrize("extra,field", [
    ({"stop": ["x"]}, "stop is invalid with use_beam_search=true"),
    ({"n": 11}, "n=11 is invalid"),
    ({"length_penalty": "high"}, "length_penalty"),
    ({"echo": True}, "echo=true is invalid with use_beam_search=true"),
])
def test_refusals_are_one_line_400s(client, srv, extra, field):
    body = {"use_beam_search": True, **{k: v for k, v in extra.items() if k not in ("n", "stop", "echo")}}
    top = {k: v for k, v in extra.items() if k in ("n", "stop", "echo")}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="fake-llm", prompt="Hi", max_tokens=4, temperature=0,
                                  extra_body=body, **top)
    msg = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
    assert field in msg and "\n" not in msg
    srv.wait_idle()


def test_beams_wait_for_the_driver_at_a_real_step_pace():
    """At 3 ms a step the engine thread would decode beams past the driver's decisions (tokens the
    search drops; forks whose parent ran ahead prefill): with step-gated requests the server does the
    offline search's work exactly: the same beams, tokens generated and fork block copies (> 0)."""
    prompts = ["The three primary colors are", "Once upon a time", "A good breakfast"]
    outs, generated, copies = offline_beam_work(prompts, 4, 24)
    assert copies > 0
    srv = ThreadedServer(make_llm_engine(max_model_len=512, num_blocks=1024, max_num_seqs=32, runner_cls=SlowRunner))
    try:
        r = httpx_post(srv, {"model": "fake-llm", "prompt": prompts, "n": 4, "max_tokens": 24, "temperature": 0,
                             "use_beam_search": True})
        tok = srv.engine.tokenizer
        want = []
        for p, o in zip(prompts, outs):
            for s in o.sequences:
                gen = s.tokens[len(tok.encode(p)):]
                want.append(tok.decode(gen[:-1] if gen and gen[-1] == EOS else gen, skip_special_tokens=False))
        assert [c["text"] for c in r["choices"]] == want
        stats = srv.wait_idle()
        assert (stats.num_generated_tokens, srv.engine.runner.num_block_copies) == (generated, copies)
    finally:
        srv.close()


def test_gated_beams_in_a_kv_pool_far_too_small():
    """12 blocks of 4 tokens for 3 prompts x 4 beams: held beams are preempted for the lagging ones
    (no deadlock), forks whose parent was preempted prefill; the beams equal offline on the same pool,
    every block free after."""
    prompts = [[3 + ord(c) for c in s] for s in ("hello", "beam search!", "x")]
    llm = LLM("fake-llm", engine=make_llm_engine(max_model_len=40, num_blocks=12, max_num_seqs=32))
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(beam_width=4, max_tokens=14))
    srv = ThreadedServer(make_llm_engine(max_model_len=40, num_blocks=12, max_num_seqs=32, runner_cls=SlowRunner))
    try:
        r = httpx_post(srv, {"model": "fake-llm", "prompt": prompts, "n": 4, "max_tokens": 14, "temperature": 0,
                             "use_beam_search": True, "ignore_eos": False})
        tok = srv.engine.tokenizer
        want = [tok.decode(s.tokens[len(p):], skip_special_tokens=False) for p, o in zip(prompts, outs)
                for s in o.sequences]
        assert [c["text"] for c in r["choices"]] == want
        assert srv.engine.scheduler.num_preemptions > 0
        stats = srv.wait_idle()
        assert stats.num_free_blocks == stats.num_blocks == 12
    finally:
        srv.close()


def test_beam_width_above_max_num_seqs():
    """n=3 beams on a server running 2 requests at a time: the gated beams holding both slots are
    preempted for the third (no hang: the request's timeout fails the test), same beams as offline
    with room for every beam; plain n=3 sampling on the same server queues its third child."""
    prompts = [[3 + ord(c) for c in s] for s in ("hello", "x")]
    llm = LLM("fake-llm", engine=make_llm_engine(max_model_len=40, num_blocks=64, max_num_seqs=32))
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(beam_width=3, max_tokens=8))
    srv = ThreadedServer(make_llm_engine(max_model_len=40, num_blocks=64, max_num_seqs=2))
    try:
        body = {"model": "fake-llm", "prompt": prompts, "n": 3, "max_tokens": 8, "temperature": 0}
        r = httpx_post(srv, dict(body, use_beam_search=True, ignore_eos=False), timeout=20)
        tok = srv.engine.tokenizer
        want = [tok.decode(s.tokens[len(p):], skip_special_tokens=False) for p, o in zip(prompts, outs)
                for s in o.sequences]
        assert [c["text"] for c in r["choices"]] == want
        assert srv.engine.scheduler.num_preemptions > 0
        r = httpx_post(srv, dict(body, ignore_eos=True), timeout=20)
        assert [c["finish_reason"] for c in r["choices"]] == ["length"] * 6
        stats = srv.wait_idle()
        assert stats.num_free_blocks == stats.num_blocks == 64
    finally:
        srv.close()


def httpx_post(srv, body, timeout: float = 60):
    import httpx

    r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def test_clients_giving_up_mid_search_free_every_block():
    """Non-streamed and streamed beam searches whose clients leave before the search ends: every
    fork the searches opened is aborted, every KV block is free, the server keeps answering."""
    import asyncio

    import httpx

    srv = ThreadedServer(make_llm_engine(max_model_len=512, num_blocks=1024, max_num_seqs=32,
                                         runner_cls=SlowRunner))
    try:
        body = {"max_tokens": 400, "n": 4, "use_beam_search": True, "temperature": 0, "ignore_eos": True}

        async def gives_up(i: int, stream: bool) -> str:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=httpx.Timeout(10, read=0.4)) as c:
                try:
                    r = await c.post("/v1/completions", json=dict(body, prompt=f"impatient {i}", stream=stream))
                    return f"answered {r.status_code}"
                except httpx.ReadTimeout:
                    return "gave up"

        async def main():
            return await asyncio.gather(*(gives_up(i, i % 2 == 1) for i in range(4)))

        assert asyncio.run(main()) == ["gave up"] * 4
        stats = srv.wait_idle(timeout=20)
        assert stats.num_free_blocks == stats.num_blocks == 1024
        # the searches really ran, and were cut short: 4 full searches decode >= 4 x 4 beams x 400 tokens
        assert 0 < stats.num_generated_tokens < 4 * 4 * 400
        r = httpx.post(srv.base_url + "/v1/completions", timeout=20,
                       json=dict(body, prompt="after", max_tokens=3))
        assert r.status_code == 200 and len(r.json()["choices"]) == 4
        srv.wait_idle()
    finally:
        srv.close()
