"""Hypothesis strategies built from the jaxllm.v1 proto descriptors, the fuzz property, and a
server on its own event-loop thread (hypothesis drives sync tests; grpc is never mocked).

Every field of a message is drawn from its descriptor: ints mix small values, token ids around
the vocabulary and the int64 extremes; doubles include NaN, +-inf, -0.0, subnormals and +-1e308;
strings include "", NUL, unicode and long runs; repeated fields are empty, short or just past the
limits (300 ids/bias entries, 16 stop strings); real oneofs pick one member or none; proto3
``optional`` fields are set or not; chat roles come from the known ones, "" or random text.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import threading

import grpc
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from serving.proto.jaxllm.v1 import generation_pb2 as pb

I64 = (-(2**63), 2**63 - 1)
U32 = (0, 2**32 - 1)
ROLES = ["system", "user", "assistant", "tool", "", "USER", "user\x00", "🙂", "a" * 300]
TOKEN_ID_FIELDS = {"ids", "token_ids", "stop_token_ids", "allowed_token_ids"}


def fuzz_settings(default_examples: int, env: str | None = "JAXLLM_FUZZ_EXAMPLES") -> settings:
    """Fixed seed (derandomize), no example database, the budget from ``env`` when set (None:
    ``default_examples`` as given)."""
    n = default_examples if env is None else int(os.environ.get(env, default_examples))
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def ints(lo: int, hi: int, vocab: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2, 16, 20, 21, 255, 256, 300, 301, vocab - 1, vocab, 2**31 - 1,
                         -(2**31), 2**32, 2**53, lo, hi, lo + 1, hi - 1) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -3), min(hi, 40)),
                     st.integers(max(lo, 0), min(hi, vocab + 8)), st.integers(lo, hi))


def token_ids(vocab: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, vocab - 1), ints(*I64, vocab))


DOUBLES = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -2.0, 2.0000001, 100.0, 100.5, 1e-9, 5e-324,
                     1e308, -1e308, math.inf, -math.inf, math.nan]),
    st.floats(-3, 3), st.floats(allow_nan=True, allow_infinity=True))

TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "\x00", "Hello", "🙂🙃", "\u202e\u200b", "ß" * 40, "x" * 300, "\n\t "]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40))


def _lists(elem, hi: int, ramp: bool = False):
    """Short lists of random elements, or (``ramp``: ints) one just around the limit ``hi``, drawn
    as a start and a length (drawing 300 elements one by one is slow)."""
    short = st.lists(elem, max_size=4)
    if not ramp:
        return st.one_of(short, st.lists(elem, min_size=hi - 1, max_size=hi + 1)) if hi <= 16 else short
    long = st.builds(lambda first, k: [min(first, I64[1] - k) + i for i in range(k)], elem,
                     st.integers(hi - 2, hi + 3))
    return st.one_of(short, short, long)


def scalar(field, vocab: int) -> st.SearchStrategy:
    t = field.type
    if field.name in TOKEN_ID_FIELDS:
        return token_ids(vocab)
    if field.name == "role":
        return st.one_of(st.sampled_from(ROLES), TEXT)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return ints(*I64, vocab)
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return ints(-(2**31), 2**31 - 1, vocab)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return ints(*U32, vocab)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return ints(0, 2**64 - 1, vocab)
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return DOUBLES if t == F.TYPE_DOUBLE else st.floats(width=32, allow_nan=True)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return TEXT
    if t == F.TYPE_BYTES:
        return st.binary(max_size=16)
    if t == F.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    raise TypeError(f"no strategy for {field.full_name}")


def _real_oneofs(desc):
    return [o for o in desc.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]


@st.composite
def message(draw, desc, vocab: int, depth: int = 0):
    """A message of type ``desc`` with random fields, oneof choices and presence."""
    msg_cls = pb.__dict__.get(desc.name) or _message_class(desc)
    kw: dict = {}
    chosen = {o.name: draw(st.sampled_from([None, *o.fields])) for o in _real_oneofs(desc)}
    for f in desc.fields:
        o = f.containing_oneof
        if o is not None and o.name in chosen:
            if chosen[o.name] is not f:
                continue
        elif not draw(st.booleans()):  # optional / plain / repeated fields: present or not
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            k = scalar(f.message_type.fields_by_name["key"], vocab)
            v = scalar(f.message_type.fields_by_name["value"], vocab)
            many = st.builds(lambda first, n, b: {first + i: b for i in range(n)},  # first <= vocab
                             st.integers(0, vocab), st.integers(298, 302), v)
            kw[f.name] = draw(st.one_of(st.dictionaries(k, v, max_size=4), many))
        elif f.message_type is not None:
            sub = message(f.message_type, vocab, depth + 1)
            kw[f.name] = draw(_lists(sub, 3) if f.is_repeated else sub)
        elif f.is_repeated:
            hi = 300 if f.name in TOKEN_ID_FIELDS else 16
            kw[f.name] = draw(_lists(scalar(f, vocab), hi, ramp=f.name in TOKEN_ID_FIELDS))
        else:
            kw[f.name] = draw(scalar(f, vocab))
    return msg_cls(**kw)


def _message_class(desc):
    from google.protobuf import message_factory
    return message_factory.GetMessageClass(desc)


def generate_requests(vocab: int) -> st.SearchStrategy[pb.GenerateRequest]:
    """Half wild (every field from its descriptor), half plausible (fields in their valid
    ranges, now and then one wild value): the plausible half reaches the engine and streams."""
    return st.one_of(message(pb.GenerateRequest.DESCRIPTOR, vocab), plausible_requests(vocab))


def _valid_sampling(vocab: int) -> dict[str, st.SearchStrategy]:
    tid = st.integers(0, vocab - 1)
    unit = st.floats(0, 1)
    return dict(
        n=st.integers(1, 3), temperature=st.floats(0, 2), top_p=st.floats(0.01, 1),
        top_k=st.integers(-1, 50), min_p=unit, presence_penalty=st.floats(-2, 2),
        frequency_penalty=st.floats(-2, 2), repetition_penalty=st.floats(0.1, 2),
        seed=ints(*I64, vocab), stop=st.lists(st.text(min_size=1, max_size=3), max_size=3),
        stop_token_ids=st.lists(tid, max_size=3), ignore_eos=st.booleans(),
        max_tokens=st.integers(1, 48), min_tokens=st.integers(0, 3), logprobs=st.integers(0, 5),
        prompt_logprobs=st.integers(0, 3), skip_special_tokens=st.booleans(),
        include_stop_str_in_output=st.booleans(),
        logit_bias=st.dictionaries(tid, st.floats(-100, 100), max_size=3),
        allowed_token_ids=st.lists(tid, min_size=1, max_size=5),
        truncate_prompt_tokens=st.integers(1, 64), detokenize=st.booleans())


@st.composite
def plausible_requests(draw, vocab: int):
    fields = pb.SamplingParams.DESCRIPTOR.fields_by_name
    kw = {}
    for name, strat in _valid_sampling(vocab).items():
        if draw(st.integers(0, 3)) == 0:  # a quarter of the fields set
            wild = draw(st.integers(0, 19)) == 0  # now and then one wild value
            f = fields[name]
            kw[name] = draw((_lists(scalar(f, vocab), 300 if name in TOKEN_ID_FIELDS else 16,
                                    ramp=name in TOKEN_ID_FIELDS) if f.is_repeated
                             else scalar(f, vocab)) if wild and f.message_type is None else strat)
    req = pb.GenerateRequest(request_id=draw(st.one_of(st.just(""), st.text(max_size=8))),
                             sampling=pb.SamplingParams(**kw))
    kind = draw(st.sampled_from(["text", "token_ids", "chat"]))
    if kind == "text":
        req.text = draw(st.text(min_size=1, max_size=40))
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40)))
    else:
        for _ in range(draw(st.integers(1, 3))):
            req.chat.messages.add(role=draw(st.sampled_from(ROLES[:3] if draw(st.booleans()) else ROLES)),
                                  content=draw(st.text(max_size=20)))
    return req


# ----- the property --------------------------------------------------------------------
def _field_names() -> set[str]:
    names, seen, todo = set(), set(), [pb.DESCRIPTOR.message_types_by_name[m]
                                      for m in pb.DESCRIPTOR.message_types_by_name]
    while todo:
        d = todo.pop()
        if d.full_name in seen:
            continue
        seen.add(d.full_name)
        for f in d.fields:
            names.add(f.name)
            if f.message_type is not None:
                todo.append(f.message_type)
    return names


# what an INVALID_ARGUMENT message may start with: a proto field, or the engine's name for one
FIELD_NAMES = _field_names() | {"prompt", "prompt_token_ids", "input"}
_LEAD = re.compile(r"[A-Za-z_]+")


def named_field(details: str) -> str | None:
    m = _LEAD.match(details)
    return m.group(0) if m and m.group(0) in FIELD_NAMES else None


# ----- a server on its own loop thread ----------------------------------------------------
@contextlib.contextmanager
def threaded_server(**kw):
    """``serving_helpers.running_server`` on a background event loop; yields (ctx, call) where
    ``call(coro)`` runs a coroutine on that loop and returns its result."""
    from serving_helpers import running_server

    loop = asyncio.new_event_loop()
    ready, stop = threading.Event(), None
    box: dict = {}

    async def serve():
        nonlocal stop
        stop = asyncio.Event()
        try:
            async with running_server(**kw) as ctx:
                box["ctx"] = ctx
                ready.set()
                await stop.wait()
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test thread
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    ready.wait(120)
    if "error" in box:
        raise box["error"]

    def call(coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    try:
        yield box["ctx"], call
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def sync_channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}")
