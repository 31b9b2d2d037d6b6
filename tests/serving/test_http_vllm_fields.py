"""vLLM's extra request fields through the HTTP door (serving/openai_compat.py, openai_structured.py;
the table in serving/README.md): the ones implemented do what vLLM's do, the ones accepted change
nothing, the ones refused are a 400 naming the field.

Behind the server: the real host engine over the fake runner/tokenizer (one token per ASCII
character, no BOS). References: the offline ``LLM`` over a second engine built the same way (the
fake runner's tokens depend only on the context), the prompt's own length, ``jsonschema``, and the
engine's prefix-cache counters.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from http_helpers import ThreadedServer, make_llm_engine, sse_events
from jaxllm import LLM, SamplingParams
from tests.fakes.fake_tokenizer import OFFSET
from tests.fakes.grammar_tokenizers import fake_grammar_tokenizer

PROMPT = "The three primary colors are"
CHAT = [{"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def srv():
    s = ThreadedServer(make_llm_engine(max_model_len=256, grammar_tokenizer=fake_grammar_tokenizer))
    yield s
    s.close()


@pytest.fixture(scope="module")
def llm():
    return LLM("fake-llm", engine=make_llm_engine(max_model_len=256))


def post(srv, path: str, **body) -> httpx.Response:
    return httpx.post(srv.base_url + path, json={"model": "fake-llm", **body}, timeout=30)


# ----- stream_options.continuous_usage_stats -----------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_counts_the_tokens_so_far_in_every_chunk(srv, path):
    body = dict(max_tokens=9, temperature=0, ignore_eos=True, logprobs=True if "chat" in path else 0)
    body.update(messages=CHAT) if "chat" in path else body.update(prompt=PROMPT)
    whole = post(srv, path, **body).json()["usage"]
    chunks = sse_events(post(srv, path, stream=True, stream_options={"include_usage": True,
                                                                  "continuous_usage_stats": True}, **body))
    seen = 0
    for c in chunks[:-1]:
        [choice] = c["choices"]
        lp = choice["logprobs"]
        seen += len(lp["content"] if "chat" in path else lp["tokens"])  # this chunk's tokens
        assert c["usage"] == {"prompt_tokens": whole["prompt_tokens"], "completion_tokens": seen,
                              "total_tokens": whole["prompt_tokens"] + seen}
    assert seen == 9 and chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole
    # include_usage unset: vLLM's default with stream_options is true; explicitly false: no usage at all
    unset = sse_events(post(srv, path, stream=True, stream_options={"continuous_usage_stats": True}, **body))
    assert [c["usage"]["completion_tokens"] for c in unset][-1] == 9
    off = sse_events(post(srv, path, stream=True, stream_options={"include_usage": False,
                                                               "continuous_usage_stats": True}, **body))
    assert all("usage" not in c for c in off)
    plain = sse_events(post(srv, path, stream=True, stream_options={"include_usage": True}, **body))
    assert all(c["usage"] is None for c in plain[:-1]) and plain[-1]["usage"] == whole


# ----- return_tokens_as_token_ids ----------------------------------------------------------------
def test_tokens_as_token_ids_parse_back_to_the_sampled_ids(srv, llm):
    ref = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, logprobs=2), use_tqdm=False)[0]
    want = list(ref.outputs[0].token_ids)
    r = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
             return_tokens_as_token_ids=True).json()
    lp = r["choices"][0]["logprobs"]
    assert [int(t.removeprefix("token_id:")) for t in lp["tokens"]] == want
    for tid, top, entry in zip(want, lp["top_logprobs"], ref.outputs[0].logprobs):
        assert {int(k.removeprefix("token_id:")) for k in top} == {tid} | {t for t, e in entry.items() if e.rank <= 2}
    chat = post(srv, "/v1/chat/completions", messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                top_logprobs=1, return_tokens_as_token_ids=True).json()
    content = chat["choices"][0]["logprobs"]["content"]
    ref = llm.chat(CHAT, SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0]
    assert [int(c["token"].removeprefix("token_id:")) for c in content] == list(ref.outputs[0].token_ids)
    assert all(c["bytes"] == list(c["token"].encode()) and c["top_logprobs"][0]["token"].startswith("token_id:")
               for c in content)
    # without the field: the tokens' text (one character each here)
    text = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0).json()
    assert "".join(text["choices"][0]["logprobs"]["tokens"]) == ref_text(want)


def ref_text(ids) -> str:
    return "".join(chr(t - OFFSET) for t in ids if t >= OFFSET)  # EOS (a special id) has no text


# ----- guided_* (vLLM's older structured-output names) -------------------------------------------
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
          "additionalProperties": False}


def test_guided_json_regex_choice_constrain_the_answer(srv):
    for path, body in (("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": CHAT})):
        r = post(srv, path, max_tokens=40, temperature=0, guided_json=SCHEMA, **body)
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        jsonschema.validate(json.loads(c["text"] if "text" in c else c["message"]["content"]), SCHEMA)
    r = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=12, temperature=0, guided_regex="[ab]{3}c")
    assert r.json()["choices"][0]["text"] in {f"{x}{y}{z}c" for x in "ab" for y in "ab" for z in "ab"}
    r = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=12, seed=3, guided_choice=["yes", "no"])
    assert r.json()["choices"][0]["text"] in ("yes", "no")
    # a guided_json text schema, as vLLM takes it, too
    r = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=40, temperature=0, guided_json=json.dumps(SCHEMA))
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), SCHEMA)


@pytest.mark.parametrize("extra,named", [
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_regex and guided_choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs sets regex and choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "response_format type 'json_object' and structured_outputs.regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
      "structured_outputs": {"choice": ["a"]}}, "response_format type 'json_schema' and structured_outputs.choice"),
])
def test_two_kinds_of_constraint_are_a_400_naming_both(srv, extra, named):
    """vLLM's: two guided_* kinds (its StructuredOutputsParams refuses them), two kinds in structured_outputs,
    or a response_format of another kind than structured_outputs' (replace() leaves both set)."""
    r = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=4, **extra)
    assert r.status_code == 400 and named in r.json()["error"]["message"], r.text


OTHER = {"type": "object", "properties": {"b": {"type": "string", "maxLength": 3}}, "required": ["b"],
         "additionalProperties": False}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("winner,loser", [
    # structured_outputs over guided_* (vLLM forwarded guided_* only without it)
    ({"structured_outputs": {"choice": ["yes", "no"]}}, {"guided_regex": "[ab]{3}c"}),
    ({"structured_outputs": {"regex": "[ab]{3}c"}}, {"guided_json": SCHEMA, "guided_choice": ["x"]}),
    # response_format over guided_* and over structured_outputs' same kind (vLLM's replace())
    ({"response_format": {"type": "json_object"}}, {"guided_regex": "[ab]{3}c"}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
     {"structured_outputs": {"json": OTHER}}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}},
     {"guided_json": OTHER}),
])
def test_the_winning_constraint_answers_as_if_sent_alone(srv, path, winner, loser):
    """Reference: the same body with the winner alone (greedy, so the answers must be equal)."""
    body = dict(max_tokens=30, temperature=0, **({"messages": CHAT} if "chat" in path else {"prompt": PROMPT}))
    alone = post(srv, path, **body, **winner)
    both = post(srv, path, **body, **winner, **loser)
    assert alone.status_code == both.status_code == 200, both.text

    def text(r):
        c = r.json()["choices"][0]
        return c["text"] if "text" in c else c["message"]["content"]

    assert text(both) == text(alone)
    if "response_format" in winner and "json_schema" in json.dumps(winner):
        jsonschema.validate(json.loads(text(both)), SCHEMA)


# ----- cache_salt ----------------------------------------------------------------------------------
def test_cache_salt_shares_prefix_blocks_only_with_the_same_salt(srv):
    prompt = "salted prompt: " + "0123456789" * 4  # 55 tokens, 13 full blocks of 4

    def hits(path="/v1/completions", **extra) -> int:
        before = srv.wait_idle().prefix_cache_hits
        body = {"input": prompt} if path == "/v1/responses" else {"prompt": prompt, "temperature": 0}
        r = post(srv, path, max_tokens=2, **body, **extra) if path != "/v1/responses" else \
            post(srv, path, max_output_tokens=2, **body, **extra)
        assert r.status_code == 200, r.text
        return srv.wait_idle().prefix_cache_hits - before

    hits(cache_salt="alpha")  # fills the cache under salt alpha
    assert hits(cache_salt="alpha") == 52  # every full block but the one holding the last prompt token
    assert hits(cache_salt="beta") == 0  # another salt sees none of them
    assert hits() == 0  # nor does an unsalted request
    assert hits() == 52 and hits(cache_salt="beta") == 52  # each namespace caches its own
    # the Responses API passes it to its chat request
    hits("/v1/responses", cache_salt="gamma")
    assert hits("/v1/responses", cache_salt="gamma") > 40 and hits("/v1/responses", cache_salt="delta") == 0
    r = post(srv, "/v1/completions", prompt=prompt, max_tokens=2, cache_salt="")
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text


def test_grpc_generate_cache_salt_shares_blocks_only_with_the_same_salt(srv):
    """GenerateRequest.cache_salt: the same namespaces as HTTP's field (the engine keys the blocks), and
    the HTTP requests of the same salt share them; a bad salt is INVALID_ARGUMENT naming it."""
    import grpc

    from serving.proto.jaxllm.v1 import generation_pb2 as pb
    from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc

    prompt = "grpc salted prompt: " + "9876543210" * 4

    async def generate(salt: str, **kw) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.server.port}") as channel:
            req = pb.GenerateRequest(text=prompt, cache_salt=salt,
                                     sampling=pb.SamplingParams(max_tokens=2, temperature=0, **kw))
            [r async for r in pb_grpc.GenerationStub(channel).Generate(req, timeout=30)]

    def hits(salt: str, http: bool = False) -> int:
        before = srv.wait_idle().prefix_cache_hits
        if http:
            assert post(srv, "/v1/completions", prompt=prompt, max_tokens=2, temperature=0,
                        cache_salt=salt).status_code == 200
        else:
            srv.call(generate(salt))
        return srv.wait_idle().prefix_cache_hits - before

    hits("alpha")
    assert hits("alpha") > 40 and hits("beta") == 0 and hits("") == 0
    assert hits("alpha", http=True) > 40  # one namespace whatever the door
    for salt, extra, field in (("x" * 1025, {}, "cache_salt"), ("alpha", {"use_beam_search": True}, "cache_salt")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            srv.call(generate(salt, **extra))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    srv.wait_idle()


# ----- truncate_prompt_tokens, allowed_token_ids, add_special_tokens ------------------------------
def test_truncate_prompt_tokens_keeps_the_last_tokens(srv, llm):
    r = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=5, temperature=0, truncate_prompt_tokens=7).json()
    ref = llm.generate([PROMPT[-7:]], SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0]
    assert r["usage"]["prompt_tokens"] == 7 and r["choices"][0]["text"] == ref.outputs[0].text
    whole = post(srv, "/v1/chat/completions", messages=CHAT, max_tokens=1, truncate_prompt_tokens=-1).json()
    cut = post(srv, "/v1/chat/completions", messages=CHAT, max_tokens=1, truncate_prompt_tokens=4).json()
    assert whole["usage"]["prompt_tokens"] > 4 and cut["usage"]["prompt_tokens"] == 4


def test_allowed_token_ids_reach_the_engine_params(srv, monkeypatch):
    """The fake runner samples without masks; the real sampler's honouring of allowed_token_ids is
    tests/runner/test_sampler.py's. Here: the body's ids become the request's SamplingParams."""
    seen = []
    add = srv.engine.add_request

    def recording_add(request_id, prompt, params, *args, **kw):
        if prompt == PROMPT:  # not the health probes'
            seen.append(params)
        return add(request_id, prompt, params, *args, **kw)

    monkeypatch.setattr(srv.engine, "add_request", recording_add)
    allowed = [OFFSET + ord("a"), OFFSET + ord("b")]
    r = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=3, allowed_token_ids=allowed)
    assert r.status_code == 200 and [p.allowed_token_ids for p in seen] == [allowed]
    r = post(srv, "/v1/chat/completions", messages=CHAT, max_tokens=3, allowed_token_ids=[OFFSET + 1000])
    assert r.status_code == 400 and r.json()["error"]["param"] == "allowed_token_ids", r.text


def test_add_special_tokens_false_leaves_out_the_bos(srv):
    tok = srv.engine.tokenizer
    tok.add_bos = True  # the fake tokenizer's BOS on encode (restored below)
    try:
        with_bos = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=1).json()["usage"]["prompt_tokens"]
        without = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=1, add_special_tokens=False).json()
    finally:
        tok.add_bos = False
    assert (with_bos, without["usage"]["prompt_tokens"]) == (len(PROMPT) + 1, len(PROMPT))


# ----- accepted and ignored; refused ----------------------------------------------------------------
IGNORED = dict(service_tier="auto", store=False, metadata={"k": "v"}, prediction={"type": "content", "content": "x"},
               session_id="s1", kv_transfer_params={"do_remote_decode": False}, ec_transfer_params={},
               vllm_xargs={"k": 1}, mm_processor_kwargs={}, media_io_kwargs={}, stream_interval=4,
               return_token_offsets=True, return_mm_kwargs=False, routed_experts_prompt_start=0,
               guided_decoding_backend="xgrammar", spaces_between_special_tokens=True, truncation_side="left",
               user="u", n=None, stream=None)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_ignored_fields_change_nothing(srv, path):
    body = dict(max_tokens=6, temperature=0)
    body.update(messages=CHAT) if "chat" in path else body.update(prompt=PROMPT)
    plain = post(srv, path, **body).json()["choices"]
    extra = dict(IGNORED, **({"modalities": ["text"], "top_logprobs": 0, "logprobs": None} if "chat" in path else {}))
    r = post(srv, path, **body, **extra)
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == plain


REFUSED = [("logits_processors", ["my.Proc"]), ("watermarking", True), ("thinking_token_budget", 10),
           ("repetition_detection", {"max_pattern_size": 4}), ("logprob_token_ids", [5]),
           ("return_prompt_text", True), ("truncation_side", "right"), ("spaces_between_special_tokens", False),
           ("early_stopping", True), ("guided_whitespace_pattern", " *"), ("structural_tag", "{}"),
           ("response_format", {"type": "structural_tag", "structures": [], "triggers": []}),
           ("structured_outputs", {"regex": "a", "whitespace_pattern": " "})]
CHAT_REFUSED = [("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
                ("web_search_options", {}), ("functions", [{"name": "f"}]), ("function_call", "auto")]


@pytest.mark.parametrize("path,field,value", [("/v1/completions", f, v) for f, v in REFUSED]
                         + [("/v1/completions", "prompt_embeds", "AAAA")]
                         + [("/v1/chat/completions", f, v) for f, v in REFUSED + CHAT_REFUSED])
def test_refused_fields_are_a_400_naming_them(srv, path, field, value):
    body = dict(max_tokens=2, **{field: value})
    body.update(messages=CHAT) if "chat" in path else body.update(prompt=PROMPT)
    r = post(srv, path, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"] and "not supported" in err["message"], err


# ----- the official client -------------------------------------------------------------------------------
def test_openai_client_sends_vllm_fields_through_extra_body(srv):
    with openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0) as client:
        r = client.chat.completions.create(
            model="fake-llm", messages=CHAT, max_completion_tokens=8, logprobs=True, seed=5,
            extra_body={"guided_choice": ["Paris", "Lyon"], "cache_salt": "tenant-1", "return_tokens_as_token_ids": True,
                        "top_k": 3, "stream_options": None, "service_tier": None})
        answer = r.choices[0].message.content
        assert answer in ("Paris", "Lyon")
        ids = [int(c.token.removeprefix("token_id:")) for c in r.choices[0].logprobs.content]
        assert ref_text(ids) == answer
        stream = client.completions.create(model="fake-llm", prompt=PROMPT, max_tokens=4, stream=True,
                                           extra_body={"stream_options": {"include_usage": True,
                                                                          "continuous_usage_stats": True}})
        usage = [c.usage.completion_tokens for c in stream if c.usage is not None]
        assert usage == sorted(usage) and usage[-1] == 4
        with pytest.raises(openai.BadRequestError, match="prompt_embeds"):
            client.completions.create(model="fake-llm", prompt="", max_tokens=1, extra_body={"prompt_embeds": "AA=="})


def test_chat_add_special_tokens_encodes_the_rendering_with_them():
    """Chat's add_special_tokens (vLLM's, default false): the template's text tokenized with the
    tokenizer's specials. The fake tokenizer's rendering is not re-encodable, so a stub stands in."""
    from serving.config import ServerConfig
    from serving.openai_protocol import ChatCompletionRequest
    from serving.openai_tools import render_body

    class Stub:
        def chat_prompt(self, messages, add_generation_prompt=True, **kw):
            return {"prompt": "hi", "prompt_token_ids": [7, 8]}

        def encode(self, text, add_special_tokens=True):
            return ([0] if add_special_tokens else []) + [7, 8]

    body = ChatCompletionRequest.model_validate({"messages": CHAT})
    assert render_body(Stub(), body, ServerConfig())["prompt_token_ids"] == [7, 8]
    body = ChatCompletionRequest.model_validate({"messages": CHAT, "add_special_tokens": True})
    assert render_body(Stub(), body, ServerConfig())["prompt_token_ids"] == [0, 7, 8]


def test_json_answers_ask_the_engine_for_final_outputs_only(srv, monkeypatch):
    """A non-streamed answer reads only the final outputs: its engine requests carry output_kind
    FINAL_ONLY (no per-step outputs built); a stream's stay CUMULATIVE (serving/deltas.py); both
    answers are the same text."""
    from jaxllm.sampling_params import RequestOutputKind

    seen = []
    add = srv.engine.add_request

    def recording_add(request_id, prompt, params, *args, **kw):
        if prompt == PROMPT:  # not the health probes'
            seen.append(params.output_kind)
        return add(request_id, prompt, params, *args, **kw)

    monkeypatch.setattr(srv.engine, "add_request", recording_add)
    whole = post(srv, "/v1/completions", prompt=PROMPT, max_tokens=9, temperature=0, n=2).json()
    events = sse_events(post(srv, "/v1/completions", prompt=PROMPT, max_tokens=9, temperature=0, stream=True))
    streamed = "".join(c["text"] for e in events for c in e["choices"] if c["index"] == 0)
    assert seen == [RequestOutputKind.FINAL_ONLY, RequestOutputKind.CUMULATIVE]
    assert whole["choices"][0]["text"] == whole["choices"][1]["text"] == streamed and len(streamed) > 0
