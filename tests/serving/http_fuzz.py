"""Hypothesis strategies for the OpenAI-compatible HTTP API, built from its Pydantic request
models, and the property every response must satisfy (tests/serving/test_http_fuzz.py).

Every field of a body model is drawn from its annotation (``model_fields``, walked recursively
through unions, lists, dicts, literals and nested models), so a field added to a model is fuzzed
without touching this file. A field is absent, plausible (a value in its useful range, so the
request reaches the engine and streams) or wild (any JSON value: wrong types, NaN / Infinity
tokens, int64 and beyond, huge / empty / unicode strings). Bodies also come as malformed JSON
bytes, with unknown fields, with wrong content types, with the API key right, wrong or missing,
with a wrong method or to an unknown path.
"""

from __future__ import annotations

import functools
import json
import math
import types
import typing
from typing import Any, Literal

from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from serving.openai_embed import EmbeddingRequest
from serving.openai_protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                     TokenizeRequest)
from serving.openai_responses_protocol import ResponsesRequest
from serving.openai_score import RerankRequest, ScoreRequest

# path -> body model (None: a GET without a body)
POST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest, "/v1/embeddings": EmbeddingRequest,
    "/v1/responses": ResponsesRequest, "/v1/score": ScoreRequest, "/v1/rerank": RerankRequest}
GETS = ("/v1/models", "/health", "/metrics", "/ping", "/version")
STATUSES = {200, 400, 401, 404, 405, 413, 429, 503}
NO_KEY_PATHS = ("/health", "/metrics", "/ping", "/version")  # serving/openai_api.py's OPEN_PATHS

EDGE_INTS = [0, 1, -1, 2, 3, 5, 20, 21, 127, 128, 130, 131, 2**31 - 1, -(2**31), 2**53, 2**63 - 1,
             -(2**63), 2**64, 10**30]
FLOATS = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-9, 5e-324, 1e308, -1e308,
                                    math.inf, -math.inf, math.nan]),
                   st.floats(-3, 3), st.floats(allow_nan=True, allow_infinity=True))
INTS = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-3, 40), st.integers(-(2**70), 2**70))
TEXT = st.one_of(st.text(max_size=12),
                 st.sampled_from(["", "\x00", "Hello", "🙂🙃", "\u202e\u200b", "ß" * 40, "x" * 300,
                                  "\n\t ", "\ud800", "a\udfffb", "null", "{}"]),
                 st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
WILD = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(TEXT, inner, max_size=4)),
                    max_leaves=8)


def _known_fields() -> set[str]:
    names: set[str] = set()
    todo: list = list(POST_BODIES.values())
    while todo:
        m = todo.pop()
        for name, f in m.model_fields.items():
            names.update({name, f.alias or name})
            todo.extend(_models_in(f.annotation))
    return names


def _models_in(ann) -> list:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in typing.get_args(ann) for m in _models_in(a)]


FIELDS = _known_fields()  # what a 400's ``param`` may be rooted in


def plausible(vocab: int, served: str = "fake-llm") -> dict[str, st.SearchStrategy]:
    """Values in a field's useful range, by field name: these reach the engine (``served``: the
    server's model name)."""
    tid = st.integers(0, vocab - 1)
    # lengths uniform in [1, 12]: hypothesis's lists start short, and a fixed-seed short budget
    # would otherwise rarely send more than a few ids
    ids = st.integers(1, 12).flatmap(lambda k: st.lists(tid, min_size=k, max_size=k))
    words = st.text(alphabet=st.characters(codec="ascii", categories=["L", "N", "Zs"]), min_size=1, max_size=30)
    msg = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                 "content": st.one_of(words, st.lists(st.fixed_dictionaries(
                                     {"type": st.just("text"), "text": words}), max_size=2))})
    return dict(
        model=st.just(served), max_tokens=st.integers(0, 8), max_completion_tokens=st.integers(1, 8),
        max_output_tokens=st.integers(1, 8),
        temperature=st.floats(0, 2), top_p=st.floats(0.01, 1), n=st.integers(1, 3),
        stop=st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
        presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2),
        logit_bias=st.dictionaries(tid.map(str), st.floats(-100, 100), max_size=3),
        seed=st.integers(0, 2**32), top_k=st.integers(-1, 50), min_p=st.floats(0, 1),
        repetition_penalty=st.floats(0.1, 2), min_tokens=st.integers(0, 3),
        stop_token_ids=st.lists(tid, max_size=3), top_logprobs=st.integers(0, 5),
        logprobs=st.one_of(st.booleans(), st.integers(0, 5)),
        prompt=st.one_of(words, ids, st.lists(words, min_size=1, max_size=3),
                         st.lists(ids, min_size=1, max_size=2)),
        messages=st.lists(msg, min_size=1, max_size=3), tokens=ids,
        input=st.one_of(words, ids, st.lists(words, min_size=1, max_size=3),
                        st.lists(ids, min_size=1, max_size=3)),
        truncate_prompt_tokens=st.integers(1, 16), echo=st.booleans(), prompt_logprobs=st.integers(0, 5),
        suffix=st.none(),
        best_of=st.none(), encoding_format=st.sampled_from(["float", "base64"]),
        pooling_type=st.sampled_from(["MEAN", "LAST", "CLS", "mean", ""]),
        response_format=st.one_of(
            st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
            st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
                {"name": st.just("x"), "schema": st.sampled_from([{"type": "object"}, {"type": "string"}])})})),
        structured_outputs=st.one_of(
            st.fixed_dictionaries({"choice": st.lists(words, min_size=1, max_size=3)}),
            st.fixed_dictionaries({"regex": st.sampled_from(["[a-z]+", "(", "\\d{3}"])}),
            st.fixed_dictionaries({"json": st.sampled_from([{"type": "object"}, "{", {"type": 5}])}),
            st.fixed_dictionaries({"grammar": st.sampled_from(["start: \"a\"", "%%%"])}),
            st.fixed_dictionaries({"json_object": st.booleans()})),
        stream_options=st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        request_id=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=12),
        text_1=st.one_of(words, st.lists(words, min_size=1, max_size=3)),
        text_2=st.one_of(words, st.lists(words, min_size=1, max_size=3)),
        query=words, documents=st.lists(words, min_size=1, max_size=4), top_n=st.integers(-1, 5),
        return_documents=st.booleans(),
        # a field another body shares the name of, by "Model.field": the Responses input is text
        # or message items, not the token ids /v1/embeddings' input also takes
        **{"ResponsesRequest.input": st.one_of(words, st.lists(msg.map(lambda m: {**m, "type": "message"}),
                                                               min_size=1, max_size=2))},
    )


def from_annotation(ann, vocab: int, depth: int = 0) -> st.SearchStrategy:
    """A value of type ``ann`` (the right type, any value: extremes included)."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if ann is type(None):
        return st.none()
    if ann is Any:
        return WILD
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(from_annotation(a, vocab, depth) for a in args))
    if origin is Literal:
        return st.one_of(st.sampled_from(args), TEXT)
    if origin is list:
        return st.lists(from_annotation(args[0], vocab, depth + 1), max_size=4 if depth < 2 else 1)
    if origin is dict or ann is dict:
        k, v = args or (str, Any)
        return st.dictionaries(from_annotation(k, vocab, depth + 1), from_annotation(v, vocab, depth + 1),
                               max_size=3)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return body(ann, vocab, depth + 1)
    return {bool: st.booleans(), int: INTS, float: FLOATS, str: TEXT}.get(ann, WILD)


# optional fields a tame body may hold: each valid alone with any plausible value of the others;
# and the ones it always holds (/tokenize's prompt: it takes "prompt" or "messages")
TAME = frozenset({"model", "max_tokens", "max_output_tokens", "temperature", "top_p", "n", "seed", "top_k", "min_p", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "stop", "min_tokens", "encoding_format",
                  "request_id"})
# optional only beside another form (/tokenize's prompt or messages, the pooling bodies' input or messages,
# score's text_1 + text_2 or vLLM's other pair names): a tame body takes the plain form
TAME_ALWAYS = frozenset({"prompt", "input", "text_1", "text_2"})
# ...but not where the field means something else: the Responses API's `prompt` (a stored prompt
# template) is refused by this server
TAME_NEVER = {"ResponsesRequest": frozenset({"prompt"})}


@functools.lru_cache(maxsize=None)
def _adapter(model: type[BaseModel], name: str) -> TypeAdapter:
    return TypeAdapter(model.model_fields[name].annotation)


def _fits(model: type[BaseModel], name: str, value: Any) -> bool:
    """Whether ``value`` is of the field's type (a plausible value may be another endpoint's form:
    /tokenize's prompt is a string, /v1/completions' also token ids)."""
    try:
        _adapter(model, name).validate_python(value)
        return True
    except ValidationError:
        return False


@st.composite
def body(draw, model: type[BaseModel], vocab: int, depth: int = 0, served: str = "fake-llm") -> dict:
    """A JSON object for ``model``: required fields mostly present, each optional one a third of
    the time; a value plausible (top level) or typed, one in ten wild; now and then an unknown field.
    One top-level body in two is tame: required fields present, optional ones only from TAME,
    all plausible (with ~40 fields, and fields that only go together, a body the server accepts is
    otherwise too rare for every endpoint's success side to be exercised)."""
    easy = plausible(vocab, served) if depth == 0 else {}
    easy.update({k.split(".", 1)[1]: v for k, v in easy.items() if k.startswith(model.__name__ + ".")})
    tame = depth == 0 and draw(st.booleans())
    out: dict = {}
    for name, f in model.model_fields.items():
        key = f.alias or name
        if tame:
            wanted = f.is_required() or key in TAME_ALWAYS or (key in TAME and draw(st.integers(0, 2)) == 0)
            wanted = wanted and key not in TAME_NEVER.get(model.__name__, ())
            if key in easy and wanted:
                out[key] = draw(easy[key].filter(lambda v, m=model, n=name: _fits(m, n, v)))  # its type's value
            elif f.is_required():
                out[key] = draw(from_annotation(f.annotation, vocab, depth))
            continue
        if f.is_required():
            if draw(st.integers(0, 19)) == 0:  # a required field missing
                continue
        elif draw(st.integers(0, 2)) != 0:
            continue
        roll = draw(st.integers(0, 9))
        if roll == 0:
            out[key] = draw(WILD)
        elif key in easy and roll > 2:
            out[key] = draw(easy[key])
        else:
            out[key] = draw(from_annotation(f.annotation, vocab, depth))
    if not tame and draw(st.integers(0, 14)) == 0:
        out[draw(st.sampled_from(["max_tokenz", "extra", "", "🙂", "Model"]))] = draw(WILD)
    return out


def dumps(obj: Any, ascii: bool = False) -> bytes:
    """JSON as Python writes it: NaN / Infinity / -Infinity tokens included; non-ASCII as ``\\u``
    escapes (``ascii``: a lone surrogate arrives as one) or raw UTF-8 (a lone surrogate as its
    CESU bytes: invalid UTF-8)."""
    return json.dumps(obj, allow_nan=True, ensure_ascii=ascii).encode("utf-8", "surrogatepass")


MALFORMED = st.one_of(
    st.sampled_from([b"", b"{", b"[", b"null", b"1", b'"x"', b"[]", b'{"prompt": "x",', b"\xff\xfe",
                     b'{"prompt": NaN}', b'{"prompt": "x"}{}', b"{'prompt': 'x'}", b"\x00" * 8]),
    st.binary(max_size=40))
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data", "", "application/xml"]


@st.composite
def http_requests(draw, vocab: int, key: str, paths: list[str], max_body: int, served: str = "fake-llm") -> dict:
    """One HTTP request: method, path, headers and raw body bytes."""
    path = draw(st.sampled_from(paths + ["/v1/nothing", "/v1/completions/", "/"]) if draw(st.integers(0, 24)) == 0
                else st.sampled_from(paths))
    model = POST_BODIES.get(path)
    method = "POST" if model is not None else "GET"
    if draw(st.integers(0, 24)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
    headers: dict[str, str] = {}
    auth = draw(st.integers(0, 19))
    if auth >= 3:
        headers["Authorization"] = f"Bearer {key}"
    elif auth == 1:
        headers["Authorization"] = draw(st.sampled_from([f"Bearer {key}x", key, f"bearer {key}", f"bEaRer {key.upper()}", "Bearer",
                                                         f"Bearer  {key}", "Basic eDp5"]))
    content = b""
    if method != "GET":
        kind = draw(st.integers(0, 19))
        if kind == 0 or model is None:
            content = draw(MALFORMED)
        elif kind == 1:
            content = dumps(draw(WILD))
        elif kind == 2:  # just past the size limit: 413 before any parsing
            content = dumps({"prompt": "x" * max_body})
        else:
            b = draw(body(model, vocab, served=served))
            if path in ("/v1/completions", "/v1/chat/completions", "/v1/responses") and draw(st.booleans()):
                b["stream"] = True
            content = dumps(b, ascii=draw(st.booleans()))
        ct = draw(st.integers(0, 14))
        headers["Content-Type"] = ("application/json" if ct > 1 else draw(st.sampled_from(CONTENT_TYPES)))
    if draw(st.integers(0, 9)) == 0:  # random extra headers
        headers.update(draw(st.dictionaries(st.sampled_from(["X-Request-Id", "Accept", "User-Agent", "X-Foo",
                                                             "Accept-Encoding"]),
                                            st.text(alphabet=st.characters(codec="ascii", min_codepoint=32,
                                                                           max_codepoint=126), max_size=20).map(str.strip),  # h11 refuses edge spaces
                                            max_size=3)))
    return dict(method=method, path=path, headers=headers, content=content)
