"""serving/openai_tools.py without a server: the "required" array reader under any split of the
text (reference: ``json.loads`` of the whole array), the schemas handed to structured outputs
(reference: ``jsonschema`` accepting and refusing hand-written instances) and --chat-template."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.config import ServerConfig
from serving.openai_protocol import ChatCompletionRequest
from serving.openai_tools import ToolPlan, load_chat_template

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                       st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                     max_leaves=8)
_ws = st.sampled_from(["", " ", "\n", "  \n\t"])


@st.composite
def array_texts(draw):
    """A "required" array as a model might write it: keys in either order, any whitespace."""
    calls = draw(st.lists(st.tuples(st.sampled_from(["f", "get_x", "a-b"]),
                                    st.dictionaries(st.text(max_size=5), _json, max_size=3)), min_size=1, max_size=3))
    w = lambda: draw(_ws)  # noqa: E731
    items = []
    for name, params in calls:
        indent = draw(st.sampled_from([None, 1]))
        pairs = [f'{w()}"name"{w()}:{w()}{json.dumps(name)}{w()}',
                 f'{w()}"parameters"{w()}:{w()}{json.dumps(params, indent=indent)}{w()}']
        if draw(st.booleans()):
            pairs.reverse()
        items.append(w() + "{" + ",".join(pairs) + "}" + w())
    return "[" + ",".join(items) + "]", calls


def _plan(mode: str, **body) -> ToolPlan:
    tools = body.pop("tools", [{"type": "function", "function": {"name": "f"}}])
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=tools, **body)
    return ToolPlan.from_body(req, ServerConfig())


@settings(max_examples=150, deadline=None)
@given(array_texts(), st.data())
def test_required_reader_streams_the_same_calls_under_any_split(case, data):
    text, calls = case
    plan = _plan("required", tool_choice="required")
    whole, reason = plan.message(text, "stop")
    assert reason == "tool_calls" and whole["content"] == ""
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"]]
    assert got == [(n, p) for n, p in calls]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    acc: dict[int, dict] = {}
    for i, piece in enumerate(pieces):
        delta, _ = plan.delta(0, piece, "stop" if i == len(pieces) - 1 else None, first=i == 0)
        for tc in delta.get("tool_calls", ()):
            if "id" in tc:
                assert tc["index"] not in acc and tc["function"]["name"]
                acc[tc["index"]] = {"name": tc["function"]["name"], "arguments": tc["function"]["arguments"]}
            else:
                acc[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert [(acc[i]["name"], acc[i]["arguments"]) for i in sorted(acc)] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole["tool_calls"]]


@pytest.mark.parametrize("parser, text", [
    ("hermes", 'Let me check. <tool_call>\n{"name": "f", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"city": "Oslo", "days": 3}}'),
])
def test_auto_streams_a_call_name_first_then_its_arguments_token_by_token(parser, text):
    """The OpenAI deltas of "auto" fed a token (4 characters) at a time: the call's first delta
    (id, name) comes as soon as its arguments' "{" is read, its arguments follow fragment by
    fragment (not whole at the close), and they add up to the non-streamed answer."""
    cfg = ServerConfig(enable_auto_tool_choice=True, tool_call_parser=parser)
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}],
                                tools=[{"type": "function", "function": {"name": "f"}}])
    plan = ToolPlan.from_body(req, cfg)
    whole, reason = plan.message(text, "stop")
    assert reason == "tool_calls" and json.loads(whole["tool_calls"][0]["function"]["arguments"]) == {
        "city": "Oslo", "days": 3}
    pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
    opened_at, frags = None, []
    for i, piece in enumerate(pieces):
        delta, _ = plan.delta(0, piece, "stop" if i == len(pieces) - 1 else None, first=i == 0)
        for tc in delta.get("tool_calls", ()):
            if "id" in tc:
                assert opened_at is None and tc["function"]["name"] == "f"
                opened_at = i
            frags.append(tc["function"]["arguments"])
    assert opened_at == text.index('{"city"') // 4  # the name: with the piece holding the arguments' "{"
    assert len([f for f in frags if f]) >= 5  # the arguments in pieces
    assert "".join(frags) == whole["tool_calls"][0]["function"]["arguments"]


def test_required_reader_keeps_a_truncated_call_and_drops_a_nameless_one():
    plan = _plan("required", tool_choice="required")
    msg, reason = plan.message('[{"name": "f", "parameters": {"a": [1, 2', "length")
    assert reason == "length" and [c["function"]["arguments"] for c in msg["tool_calls"]] == ['{"a": [1, 2']
    msg, _ = plan.message('[{"name": "f", "parameters": {}}, {"parameters": {"b"', "length")
    assert [c["function"]["arguments"] for c in msg["tool_calls"]] == ["{}"]


def test_required_schema_accepts_only_calls_of_the_given_tools():
    p = {"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "required": ["x"], "$defs": {"X": {"type": "integer"}}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": p}},
             {"type": "function", "function": {"name": "g"}}]
    for parallel, ok_two in ((True, True), (False, False)):
        schema = json.loads(_plan("required", tools=tools, tool_choice="required",
                                  parallel_tool_calls=parallel).structured().spec_text())
        v = jsonschema.Draft202012Validator(schema)
        assert v.is_valid([{"name": "f", "parameters": {"x": 1}}])
        assert v.is_valid([{"name": "g", "parameters": {"anything": [1]}}])
        assert v.is_valid([{"name": "f", "parameters": {"x": 1}}, {"name": "g", "parameters": {}}]) == ok_two
        assert not v.is_valid([])
        assert not v.is_valid([{"name": "f", "parameters": {"x": "one"}}])  # the hoisted $defs still apply
        assert not v.is_valid([{"name": "h", "parameters": {}}])
        assert not v.is_valid([{"name": "f", "parameters": {"x": 1}, "extra": 1}])
    named = json.loads(_plan("named", tools=tools, tool_choice={"type": "function", "function": {"name": "f"}})
                       .structured().spec_text())
    assert named == json.loads(json.dumps(p, sort_keys=True))


def test_chat_template_flag_reads_a_file_or_takes_the_template(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0].content }}")
    assert load_chat_template(str(f)) == "{{ messages[0].content }}"
    assert load_chat_template("{% for m in messages %}{% endfor %}") == "{% for m in messages %}{% endfor %}"
    with pytest.raises(ValueError, match=r"--chat-template 'missing\.jinja' is invalid: no such file"):
        load_chat_template("missing.jinja")


def test_auto_decodes_special_tokens_unless_the_body_says_otherwise():
    from jaxllm.sampling_params import SamplingParams

    cfg = ServerConfig(enable_auto_tool_choice=True, tool_call_parser="hermes")
    tools = [{"type": "function", "function": {"name": "f"}}]
    for extra, want in (({}, False), ({"skip_special_tokens": True}, True)):
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=tools, **extra)
        plan = ToolPlan.from_body(req, cfg)
        params = SamplingParams(**req.sampling_kwargs())
        plan.adjust(params, req)
        assert plan.mode == "auto" and params.skip_special_tokens is want and params.structured_outputs is None
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], tools=tools, tool_choice="required")
    params = SamplingParams()
    ToolPlan.from_body(req, cfg).adjust(params, req)
    assert params.skip_special_tokens is True and params.structured_outputs.kind == "json"
