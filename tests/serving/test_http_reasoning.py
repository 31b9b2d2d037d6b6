"""Reasoning outputs (``--reasoning-parser``) on /v1/chat/completions with the official ``openai``
client (no jax).

Behind the server: the real host engine over the fake runner, scripted here to write a given text
for a given user message (then EOS), or only a think block and then its own tokens under the
request's constraint. References, independent of serving/openai_reasoning.py: the expected
reasoning / content written out by hand for each text, ``jsonschema`` for constrained answers,
the hermes parser's ``extract`` of the content part for tool calls, and the openai client's own
stream accumulation against the non-streamed answer.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from http_helpers import ThreadedServer, make_llm_engine
from serving.tool_parsers import get_parser
from tests.fakes.fake_runner import context_hash
from tests.fakes.fake_tokenizer import EOS, SEP, FakeTokenizer
from tests.fakes.grammar_tokenizers import fake_grammar_tokenizer
from test_http_tools import HERMES, TOOLS, WEATHER, calls_of

TOK = FakeTokenizer()
SCRIPTS: dict[str, tuple[str | list[int], bool]] = {}  # user message -> (text or ids the model writes, then EOS?)


def _engine():
    e = make_llm_engine(max_model_len=512, num_blocks=512, grammar_tokenizer=fake_grammar_tokenizer)

    def next_token(ctx, s):
        prompt = TOK.decode(ctx[:s.num_prompt_tokens], skip_special_tokens=False)
        k = len(ctx) - s.num_prompt_tokens
        for key, (text, eos) in SCRIPTS.items():
            if f"user: {key}<sep>" in prompt:
                ids = text if isinstance(text, list) else TOK.encode(text, add_special_tokens=False)
                if k < len(ids):
                    return ids[k]
                if eos:
                    return EOS
        return context_hash(ctx) % e.runner.vocab_size

    e.runner.next_token_fn = next_token
    return e


@pytest.fixture(scope="module")
def r1():
    s = ThreadedServer(_engine(), reasoning_parser="deepseek_r1", enable_auto_tool_choice=True,
                       tool_call_parser="hermes")
    yield s
    s.close()


@pytest.fixture(scope="module")
def q3():
    s = ThreadedServer(_engine(), reasoning_parser="qwen3")
    yield s
    s.close()


def _client(s):
    return openai.OpenAI(base_url=s.base_url + "/v1", api_key="unused", max_retries=0)


def ask(s, key: str, text: str | list[int], eos: bool = True, messages=None, **kw):
    """(non-streamed response, the stream's chunks, the client's accumulation of the stream)."""
    SCRIPTS[key] = (text, eos)
    msgs = messages or [{"role": "user", "content": key}]
    kw = dict(model="fake-llm", messages=msgs, max_tokens=300, temperature=0, **kw)
    with _client(s) as c:
        resp = c.chat.completions.create(**kw)
        chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        with c.chat.completions.stream(**kw) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
    return resp, chunks, final


def reasoning_of(message):
    return (message.model_extra or {}).get("reasoning")


def check_stream(resp, chunks, final):
    """Reasoning deltas all come before content deltas; the stream adds up to the answer."""
    seen_content = False
    reasoning = content = ""
    for ch in chunks[:-1]:
        for c in ch.choices:
            r = (c.delta.model_extra or {}).get("reasoning")
            assert not (r and seen_content), "reasoning after content"
            seen_content |= bool(c.delta.content)
            reasoning += r or ""
            content += c.delta.content or ""
    want = resp.choices[0].message
    assert reasoning == (reasoning_of(want) or "") and content == (want.content or "")
    assert chunks[-1].usage == resp.usage
    got = final.choices[0]
    assert (reasoning_of(got.message) or None, got.message.content or None) == (reasoning_of(want), want.content)
    assert got.finish_reason == resp.choices[0].finish_reason


R1_CASES = [
    ("<think>\nTwo and two.\n</think>\n\nIt is 4.", "\nTwo and two.\n", "\n\nIt is 4."),
    ("Two and two.</think>It is 4.", "Two and two.", "It is 4."),  # <think> was in the prompt
    ("Still thinking <thi", "Still thinking <thi", None),  # cut off: all reasoning, no content
]


@pytest.mark.parametrize("text, reasoning, content", R1_CASES)
def test_deepseek_r1_splits_reasoning_from_content_streamed_the_same(r1, text, reasoning, content):
    resp, chunks, final = ask(r1, f"r1 {len(text)}", text, logprobs=True)
    ch = resp.choices[0]
    assert (reasoning_of(ch.message), ch.message.content) == (reasoning, content)
    assert "reasoning_content" not in ch.message.model_extra  # the old name is gone from vLLM
    assert ch.finish_reason == "stop" and ch.message.tool_calls == []  # as vLLM's ChatMessage
    # logprobs and usage cover every generated token, the think block's too
    assert "".join(t.token for t in ch.logprobs.content) == text + "<eos>"
    assert resp.usage.completion_tokens == len(text) + 1
    # current vLLM: the think block's tokens (one per character here, tags and EOS not counted)
    assert resp.usage.completion_tokens_details.reasoning_tokens == len(reasoning)
    check_stream(resp, chunks, final)


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>\nhm\n</think>\n\nIt is 4.", "\nhm\n", "\n\nIt is 4."),
    ("hm</think>It is 4.", "hm", "It is 4."),  # current vLLM: <think> may sit in the prompt
])
def test_qwen3_splits_like_current_vllm(q3, text, reasoning, content):
    resp, chunks, final = ask(q3, f"q3 {len(text)}", text)
    assert (reasoning_of(resp.choices[0].message), resp.choices[0].message.content) == (reasoning, content)
    assert resp.usage.completion_tokens_details.reasoning_tokens == len(reasoning)
    check_stream(resp, chunks, final)


def test_qwen3_enable_thinking_false_is_all_content_and_unconstrained_reasoning_is_off(q3):
    text = "It is 4.</think> really"
    resp, chunks, final = ask(q3, "nothink", text, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert (reasoning_of(resp.choices[0].message), resp.choices[0].message.content) == (None, text)
    assert resp.usage.completion_tokens_details.reasoning_tokens == 0
    check_stream(resp, chunks, final)
    # and a constraint then holds from the first token (the script's "<think>" cannot get in)
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    resp, _, _ = ask(q3, "nothink json", THINK, eos=False, response_format=rf,
                     extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert reasoning_of(resp.choices[0].message) is None
    jsonschema.validate(json.loads(resp.choices[0].message.content), WEATHER)


def test_mistral_decodes_special_tokens_unless_the_body_says():
    """[THINK] is a special token in Mistral's vocabularies, so the server decodes special tokens
    for this parser (as the fake has no [THINK] token, its special <sep> written inside the block
    shows whether they were decoded); the body's skip_special_tokens wins."""
    s = ThreadedServer(_engine(), reasoning_parser="mistral")
    try:
        ids = TOK.encode("[THINK]a", add_special_tokens=False) + [SEP] + TOK.encode("[/THINK]b", add_special_tokens=False)
        resp, chunks, final = ask(s, "mi", ids)
        assert (reasoning_of(resp.choices[0].message), resp.choices[0].message.content) == ("a<sep>", "b")
        check_stream(resp, chunks, final)
        resp, chunks, final = ask(s, "mi", ids, extra_body={"skip_special_tokens": True})
        assert (reasoning_of(resp.choices[0].message), resp.choices[0].message.content) == ("a", "b")
        resp, _, _ = ask(s, "plain answer", "It is 4.")  # no [THINK]: all content
        assert (reasoning_of(resp.choices[0].message), resp.choices[0].message.content) == (None, "It is 4.")
    finally:
        s.close()


def test_include_reasoning_false_drops_it_and_a_prompt_that_closed_the_block_is_all_content(q3):
    text = "<think>\nhm\n</think>\n\nIt is 4."
    resp, chunks, final = ask(q3, "incl", text, extra_body={"include_reasoning": False})
    assert (reasoning_of(resp.choices[0].message), resp.choices[0].message.content) == (None, "\n\nIt is 4.")
    assert resp.usage.completion_tokens_details.reasoning_tokens == len("\nhm\n")  # generated all the same
    check_stream(resp, chunks, final)
    # a prompt whose template closed the block (what enable_thinking=false renders; here the
    # client continues such an assistant turn): the whole output is content, tags and all
    msgs = [{"role": "user", "content": "closed"}, {"role": "assistant", "content": "<think>\n\n</think>\n\n"}]
    resp, chunks, final = ask(q3, "closed", text, messages=msgs,
                              extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert (reasoning_of(resp.choices[0].message), resp.choices[0].message.content) == (None, text)
    check_stream(resp, chunks, final)
    # a block closed in an earlier turn of the history does not close this one
    msgs = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "<think>old</think>answer"},
            {"role": "user", "content": "again"}]
    resp, chunks, final = ask(q3, "again", text, messages=msgs)
    assert (reasoning_of(resp.choices[0].message), resp.choices[0].message.content) == ("\nhm\n", "\n\nIt is 4.")
    check_stream(resp, chunks, final)


def test_auto_tools_read_only_the_content(r1):
    think = "<think>I could write <tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call> here.</think>"
    text = think + "\n" + HERMES
    resp, chunks, final = ask(r1, "tools", text, tools=TOOLS)
    ch = resp.choices[0]
    want = get_parser("hermes")(TOOLS).extract("\n" + HERMES)
    assert reasoning_of(ch.message) == think[len("<think>"):-len("</think>")]
    assert calls_of(ch.message) == [(t.name, t.arguments) for t in want.calls] and len(want.calls) == 1
    assert ch.message.content == want.content is None and ch.finish_reason == "tool_calls"
    fc = final.choices[0]
    assert calls_of(fc.message) == calls_of(ch.message) and reasoning_of(fc.message) == reasoning_of(ch.message)
    assert fc.finish_reason == "tool_calls"


THINK = "<think>\nJSON wanted: {not json yet}\n</think>"


def test_a_constraint_holds_only_after_the_reasoning(r1):
    """The runner writes the think block (the grammar must let it), then its own tokens, which
    the grammar must bend into the schema."""
    rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    resp, chunks, final = ask(r1, "json", THINK, eos=False, response_format=rf)
    ch = resp.choices[0]
    assert reasoning_of(ch.message) == "\nJSON wanted: {not json yet}\n" and ch.finish_reason == "stop"
    jsonschema.validate(json.loads(ch.message.content), WEATHER)
    assert resp.usage.completion_tokens_details.reasoning_tokens == len("\nJSON wanted: {not json yet}\n")
    check_stream(resp, chunks, final)
    # named tool choice: the call's arguments are the constrained text after the reasoning
    named = {"type": "function", "function": {"name": "get_weather"}}
    resp, chunks, final = ask(r1, "named", THINK, eos=False, tools=TOOLS, tool_choice=named)
    ch = resp.choices[0]
    [(name, args)] = calls_of(ch.message)
    assert name == "get_weather" and reasoning_of(ch.message) == "\nJSON wanted: {not json yet}\n"
    jsonschema.validate(json.loads(args), WEATHER)
    assert calls_of(final.choices[0].message) == [(name, args)]


def test_without_a_reasoning_parser_the_think_block_is_content_and_the_constraint_starts_at_once():
    s = ThreadedServer(_engine())
    try:
        resp, chunks, final = ask(s, "plain", "<think>x</think>y")
        assert resp.choices[0].message.content == "<think>x</think>y" and reasoning_of(resp.choices[0].message) is None
        assert resp.usage.completion_tokens_details is None
        rf = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
        resp, _, _ = ask(s, "json0", THINK, eos=False, response_format=rf)
        jsonschema.validate(json.loads(resp.choices[0].message.content), WEATHER)  # the script never got in
    finally:
        s.close()


def test_the_flag_reaches_the_config_and_an_unknown_name_is_a_one_line_error():
    import os
    import subprocess
    import sys

    from serving import __main__ as server_main
    from serving.config import ServerConfig

    p = server_main.build_parser()
    assert "deepseek_r1, mistral, qwen3" in " ".join(p.format_help().split())  # the choices in --help
    args = p.parse_args(["--model", "fake", "--reasoning-parser", "qwen3"])
    assert server_main.server_config(args).reasoning_parser == "qwen3"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "serving", "--model", "fake", "--reasoning-parser", "nope"],
                       cwd=root, env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: reasoning_parser='nope' is invalid: must be one of deepseek_r1, mistral, qwen3\n"
    with pytest.raises(ValueError, match=r"^reasoning_parser='nope' is invalid: must be one of deepseek_r1, "
                                         r"mistral, qwen3$"):
        ServerConfig(reasoning_parser="nope").validate()


def test_n2_choices_are_split_each_by_its_own_parser(r1):
    text = "<think>ab</think>cd"
    resp, chunks, final = ask(r1, "two", text, n=2)
    got = {c.index: (reasoning_of(c.message), c.message.content) for c in resp.choices}
    assert got == {0: ("ab", "cd"), 1: ("ab", "cd")}
    streamed = {c.index: (reasoning_of(c.message), c.message.content) for c in final.choices}
    assert streamed == got
    assert resp.usage.completion_tokens_details.reasoning_tokens == 2 * len("ab")
    assert chunks[-1].usage == resp.usage
