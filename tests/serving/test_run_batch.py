"""``python -m serving.run_batch``: the OpenAI Batch API file run through one engine (no jax).

Reference: the HTTP server itself. The same request bodies are POSTed over a socket to a
ThreadedServer whose engine is built the same way (the real host engine with structured outputs
over the fake runner and byte tokenizer: deterministic at temperature 0), and every batch output
line must carry that answer (200: ``response.body``; else ``response.status_code`` and ``error``)
with only the random ids and timestamps differing. The fake runner records each step's batch, so
the test also sees the lines run together, not one at a time.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import subprocess
import sys

import httpx
import numpy as np
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from serving.config import ServerConfig
from serving.run_batch import BatchRunner
from tests.fakes.grammar_tokenizers import fake_grammar_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}}]
MSGS = [{"role": "user", "content": "Weather in Paris?"}]
HERMES = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'
CFG = dict(enable_auto_tool_choice=True, tool_call_parser="hermes")

# (url, body): each answered by the HTTP server and by the batch runner
REQUESTS = [
    ("/v1/completions", {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}),
    ("/v1/completions", {"prompt": ["one", "two two"], "max_tokens": 6, "temperature": 0, "logprobs": 2}),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 10, "temperature": 0}),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 10, "temperature": 0, "n": 2, "seed": 3,
                              "logprobs": True, "top_logprobs": 1}),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 200, "temperature": 0,  # structured output
                              "response_format": {"type": "json_schema",
                                                  "json_schema": {"name": "w", "schema": WEATHER}}}),
    ("/v1/chat/completions", {"messages": MSGS, "tools": TOOLS, "max_tokens": 200, "temperature": 0,
                              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ("/v1/chat/completions", {"messages": MSGS, "tools": TOOLS, "max_tokens": 300, "temperature": 0,
                              "structured_outputs": {"regex": re.escape(HERMES)}}),  # auto: the hermes parser
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 5, "temperature": -1}),  # 400 from the server
    ("/v1/completions", {"prompt": "x", "max_tokens": 5, "bogus": 1}),  # 400: unknown field
    ("/v1/chat/completions", {"messages": MSGS, "model": "nope"}),  # 404: unknown model
    ("/v1/embeddings", {"input": "hello"}),  # 400: this server generates
    ("/v1/responses", {"input": "Weather?", "instructions": "Be brief.", "max_output_tokens": 10, "temperature": 0}),
    ("/v1/responses", {"input": "Weather?", "max_output_tokens": 200, "temperature": 0,
                       "tools": [{"type": "function", "name": "get_weather", "parameters": WEATHER}],
                       "tool_choice": {"type": "function", "name": "get_weather"}}),
    ("/v1/responses", {"input": "x", "previous_response_id": "resp_1"}),  # 400: no stored responses
]


def _engine():
    return make_llm_engine(max_model_len=512, num_blocks=512, grammar_tokenizer=fake_grammar_tokenizer)


@pytest.fixture(scope="module")
def http_answers():
    srv = ThreadedServer(_engine(), **CFG)
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as c:
            yield [(r.status_code, r.json()) for r in (c.post(url, json=body) for url, body in REQUESTS)]
    finally:
        srv.close()


def _line(cid: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})


def run_lines(lines: list[str], engine=None, **cfg) -> list[dict]:
    out: list[dict] = []

    async def go():
        config = ServerConfig(max_queued_requests=1 << 20, **{**CFG, **cfg})
        runner = BatchRunner(config, engine=engine if engine is not None else _engine())
        await runner.start()
        try:
            await runner.run(iter(lines), out.append)
        finally:
            await runner.stop()
    asyncio.run(go())
    return out


def _jobs(step) -> set[str]:
    """The engine requests in ``step`` (a sample ``#k`` counted with its request)."""
    return {s.request_id.split("#")[0] for s in step.seqs}


def _strip(obj):
    """The answer without what is random per request: ids and creation times."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("id", "created", "request_id", "created_at", "call_id")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def test_every_line_answers_what_the_http_server_answers_in_input_order(http_answers):
    engine = _engine()
    lines = [_line(f"req-{i}", url, body) for i, (url, body) in enumerate(REQUESTS)]
    lines.insert(3, "{not json")
    lines.insert(5, "")  # blank: skipped, no output line
    out = run_lines(lines, engine)
    bad = out.pop(3)
    assert bad["custom_id"] is None and bad["response"]["status_code"] == 400 and bad["response"]["body"] is None
    assert bad["error"]["error"]["message"].startswith("line 4 is not valid JSON")
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(len(REQUESTS))]
    for o, (status, answer), (url, body) in zip(out, http_answers, REQUESTS):
        assert o["response"]["status_code"] == status, (url, body, o)
        if status == 200:
            assert o["error"] is None and _strip(o["response"]["body"]) == _strip(answer), (url, body)
        else:
            assert o["response"]["body"] is None and o["error"] == answer, (url, body)
    # what the lines are about really happened: a tool call, a schema-valid answer, a refusal
    statuses = [s for s, _ in http_answers]
    assert statuses[:7] == [200] * 7 and statuses[7:] == [400, 400, 404, 400, 200, 200, 400]
    call = out[12]["response"]["body"]["output"][0]
    assert call["type"] == "function_call" and json.loads(call["arguments"])["city"] in WEATHER[
        "properties"]["city"]["enum"]
    auto = out[6]["response"]["body"]["choices"][0]
    assert auto["message"]["content"] == "Sure. " and auto["finish_reason"] == "tool_calls"
    assert json.loads(auto["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo", "days": 3}
    assert json.loads(out[4]["response"]["body"]["choices"][0]["message"]["content"])["city"] in WEATHER[
        "properties"]["city"]["enum"]
    # one engine, the lines together: some step ran requests of several bodies at once (one body
    # here makes at most 2 requests: the 2-prompt completion)
    assert max(len(_jobs(step)) for step in engine.runner.steps) > 2
    assert len({o["id"] for o in out}) == len(out) and all(o["id"].startswith("batch-") for o in out)


def test_embedding_lines_on_an_embed_engine_equal_the_offline_engine():
    from jaxllm.pooling_params import PoolingParams
    from test_serving_embed import make_engine as embed_engine, offline

    texts = ["embed me", "and me too " * 3, "a third"]
    lines = [_line("e", "/v1/embeddings", {"input": texts}),
             _line("c", "/v1/chat/completions", {"messages": MSGS}),
             _line("s", "/v1/score", {"text_1": texts[0], "text_2": texts[1:]}),
             _line("r", "/v1/rerank", {"query": texts[0], "documents": texts[1:]}),
             _line("k", "/v1/classify", {"input": texts[0]}),
             # vLLM's run-batch takes any url ending in /score or /rerank: the app's other paths
             _line("s2", "/score", {"text_1": texts[0], "text_2": texts[1:]}),
             _line("r2", "/v2/rerank", {"query": texts[0], "documents": texts[1:]})]
    emb, chat, score, rerank, classify, score2, rerank2 = run_lines(lines, embed_engine())
    data = emb["response"]["body"]["data"]
    assert [d["index"] for d in data] == [0, 1, 2] and emb["error"] is None
    vecs = [np.asarray(offline(t, PoolingParams()), np.float64) for t in texts]
    for d, v in zip(data, vecs):
        assert d["embedding"] == pytest.approx(v, rel=1e-6)
    assert chat["response"]["status_code"] == 400 and "--task generate" in chat["error"]["error"]["message"]
    # vLLM's run-batch takes /v1/score and /v1/rerank: cosines of the texts' embeddings
    cos = [float(vecs[0] @ v / (np.linalg.norm(vecs[0]) * np.linalg.norm(v))) for v in vecs[1:]]
    assert [d["score"] for d in score["response"]["body"]["data"]] == pytest.approx(cos, abs=1e-6)
    ranked = rerank["response"]["body"]["results"]
    assert [r["index"] for r in ranked] == list(np.argsort(cos)[::-1])
    assert [r["relevance_score"] for r in ranked] == pytest.approx(sorted(cos, reverse=True), abs=1e-6)
    assert classify["response"]["status_code"] == 400 and classify["error"]["error"]["param"] == "model"
    assert [d["score"] for d in score2["response"]["body"]["data"]] == pytest.approx(cos, abs=1e-6)
    assert [r["index"] for r in rerank2["response"]["body"]["results"]] == [r["index"] for r in ranked]


@pytest.mark.parametrize("line, field, message", [
    ('{"custom_id": 7, "method": "POST", "url": "/v1/completions", "body": {}}', "custom_id",
     "custom_id=7 on line 1 is invalid: expected a string"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}', "method",
     "method='GET' on line 1 is invalid: must be 'POST'"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/moderations", "body": {}}', "url",
     "url='/v1/moderations' on line 1 is invalid: must be one of /v1/chat/completions, /v1/completions, "
     "/v1/embeddings, /v1/responses, /v1/score, /v1/rerank, /v1/classify, /score, /rerank, /v2/rerank, /classify"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": [1]}', "body",
     "body=[1] on line 1 is invalid: expected a JSON object"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "stream": true}}',
     "stream", "stream=True on line 1 is invalid: a batch line is answered whole (leave stream unset or false)"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}, "extra": 1}', "extra",
     "extra on line 1 is not a supported field (custom_id, method, url, body)"),
])
def test_a_bad_envelope_gets_a_400_line_and_the_next_line_still_runs(line, field, message):
    good = _line("ok", "/v1/completions", {"prompt": "hi", "max_tokens": 3, "temperature": 0})
    bad, ok = run_lines([line, good])
    assert bad["response"]["status_code"] == 400 and bad["response"]["body"] is None
    assert bad["error"] == {"error": {"message": message, "type": "invalid_request_error", "param": field,
                                      "code": "invalid_argument"}}
    assert ok["custom_id"] == "ok" and ok["error"] is None
    assert ok["response"]["body"]["usage"]["completion_tokens"] == 3


def test_cli_reads_stdin_writes_stdout_and_exit_codes(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    lines = [_line("a", "/v1/completions", {"prompt": "abc", "max_tokens": 4}),
             "[]",
             _line("b", "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4})]
    cmd = [sys.executable, "-m", "serving.run_batch", "--model", "fake:max_num_seqs=2", "--log-level", "warning"]
    p = subprocess.run(cmd + ["-i", "-", "-o", "-"], input="\n".join(lines) + "\n", capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    out = [json.loads(x) for x in io.StringIO(p.stdout)]
    assert [(o["custom_id"], o["response"]["status_code"]) for o in out] == [("a", 200), (None, 400), ("b", 200)]
    assert out[0]["response"]["body"]["object"] == "text_completion"
    assert out[2]["response"]["body"]["object"] == "chat.completion"
    assert out[1]["error"]["error"]["message"] == "line 2=[] is invalid: expected a JSON object"
    # the same file from disk to disk gives the same bodies (the fake engine is deterministic)
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    p2 = subprocess.run(cmd + ["-i", str(src), "-o", str(dst)], capture_output=True, text=True, cwd=ROOT,
                        env=env, timeout=120)
    assert p2.returncode == 0 and p2.stdout == ""
    assert [_strip(json.loads(x)) for x in dst.read_text().splitlines()] == [_strip(o) for o in out]
    missing = subprocess.run(cmd + ["-i", str(tmp_path / "nope.jsonl"), "-o", "-"], capture_output=True,
                             text=True, cwd=ROOT, env=env, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "nope.jsonl" in missing.stderr


def test_cli_engine_death_answers_error_lines_and_exits_1():
    env = dict(os.environ, PYTHONPATH=ROOT)
    lines = "".join(_line(c, "/v1/completions", {"prompt": "abc" + c, "max_tokens": 8}) + "\n" for c in "ab")
    base = [sys.executable, "-m", "serving.run_batch", "-i", "-", "-o", "-", "--log-level", "critical"]
    p = subprocess.run(base + ["--model", "fake:fail_at_step=3"], input=lines, capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    out = [json.loads(x) for x in p.stdout.splitlines()]
    assert p.returncode == 1 and [o["custom_id"] for o in out] == ["a", "b"]
    assert all(o["response"]["status_code"] >= 500 and "injected fault at step 3" in o["error"]["error"]["message"]
               for o in out)
    p = subprocess.run(base + ["--model", "fake:nope=1"], input=lines, capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines()[-1] == ("error: engine failed to start: ValueError: fake engine option "
                                                 "'nope' is invalid: unknown")


@pytest.mark.slow
def test_real_model_batch_lines_equal_the_http_answers():
    """SmolLM2-135M: one engine, driven first by the batch runner (the lines together), then by a
    loopback server (one request at a time): same texts, calls and errors; logprobs to rounding."""
    from jaxllm.config import EngineConfig
    from jaxllm.engine.factory import build_engine

    engine = build_engine(EngineConfig(model="smollm2-135m", max_model_len=512, max_num_seqs=4,
                                       max_num_batched_tokens=256))
    reqs = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Capital of France?"}],
                                      "max_tokens": 12, "temperature": 0}),
            ("/v1/completions", {"prompt": "The three primary colors are", "max_tokens": 12, "temperature": 0,
                                 "logprobs": 1}),
            ("/v1/chat/completions", {"messages": MSGS, "tools": TOOLS, "max_tokens": 40, "temperature": 0,
                                      "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
            ("/v1/completions", {"prompt": "x", "max_tokens": 0})]
    out = run_lines([_line(str(i), u, b) for i, (u, b) in enumerate(reqs)], engine)
    srv = ThreadedServer(engine)
    try:
        with httpx.Client(base_url=srv.base_url, timeout=300) as c:
            answers = [c.post(u, json=b) for u, b in reqs]
    finally:
        srv.close()
    for o, r in zip(out, answers):
        assert o["response"]["status_code"] == r.status_code
        got = o["response"]["body"] if r.status_code == 200 else o["error"]
        _same(_strip(got), _strip(r.json()))  # logprobs: to f32 rounding (other batch shapes)
    assert [r.status_code for r in answers] == [200, 200, 200, 400]
    assert out[2]["response"]["body"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def _same(a, b, path="") -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4), (path, a, b)
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)
