"""``POST /v1/responses`` (OpenAI's Responses API) over the chat path (no jax).

The body becomes a chat body (serving/openai_responses_protocol.py) and one chat job
(serving/openai_generate.chat_job: chat template, tools, structured outputs, reasoning parser,
caps, admission); only the answer's shape is this module's. A chat answer's message maps to
output items in this order: ``reasoning`` (the reasoning parser's text, a ``reasoning_text``
part), ``message`` (the content, one ``output_text`` part; none when the content is empty, as a
forced tool call's), one ``function_call`` per tool call (``call_id`` = ``call_<hex>``).
With ``include: ["message.output_text.logprobs"]`` the output_text part carries the chat
logprobs entries of every generated token (vLLM's rule), each streamed text delta those of its own
tokens. ``status`` is ``"incomplete"`` with ``incomplete_details.reason = "max_output_tokens"`` when the
output ran out of tokens. ``usage``: input/output tokens, ``input_tokens_details.cached_tokens``
(prefix-cache hits) and ``output_tokens_details.reasoning_tokens`` (the think block's tokens).

Streamed (``stream: true``): server-sent events ``event: <type>`` / ``data: <json>``, numbered
by ``sequence_number`` from 0 as OpenAI's: ``response.created``, ``response.in_progress``; per
item ``response.output_item.added``, (reasoning and message) ``response.content_part.added``,
the deltas (``response.reasoning_text.delta``, ``response.output_text.delta``,
``response.function_call_arguments.delta``), then their ``.done`` events, ``content_part.done``
and ``output_item.done``; last ``response.completed`` (also for an incomplete answer: the openai
client's ``get_final_response`` reads only that one) carrying the same body as the non-streamed
answer. The text goes through the chat door's own per-choice readers, so the openai client's
accumulation equals the non-streamed response. A failure after the first byte is one ``error``
event, and the stream ends. No ``data: [DONE]`` (OpenAI sends none here).
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from typing import Any, AsyncIterator

from pydantic import ValidationError

from serving.frontdoor import FrontDoor, FrontDoorError, ModelInfo, invalid
from serving.openai_choices import chat_choice, final_delta
from serving.openai_generate import chat_job, merged_outputs, respond
from serving.openai_protocol import ChatCompletionRequest
from serving.openai_responses_protocol import ResponsesRequest

# chat field names in messages -> the Responses body's (an error names what the client sent)
_RENAMES = [(re.compile(r"\bmax_tokens\b"), "max_output_tokens"), (re.compile(r"\bmessages\b"), "input"),
            (re.compile(r"\bresponse_format\.json_schema\b"), "text.format"),
            (re.compile(r"\bresponse_format\b"), "text.format"),
            (re.compile(r"\bstructured_outputs\.json\b"), "text.format.schema"),
            (re.compile(r"\bstructured_outputs\b"), "text.format"),
            (re.compile(r"\btools\[(\d+)\]\.function\."), r"tools[\1]."),
            (re.compile(r"\btool_choice\.function\.name\b"), "tool_choice.name"),
            (re.compile(r"\{'function': \{'name': ('[^']*')\}\}"), r"{'type': 'function', 'name': \1}"),
            (re.compile(r"text\.format/text\.format"), "text.format")]


def _renamed(exc: FrontDoorError) -> FrontDoorError:
    msg, param = exc.message, exc.param
    for pat, new in _RENAMES:
        msg = pat.sub(new, msg)
        param = pat.sub(new, param) if param else param
    return FrontDoorError(exc.code, msg, param)


class _Answer:
    """One response's id, time and echoed request fields."""

    def __init__(self, body: ResponsesRequest, info: ModelInfo, request_id: str | None = None):
        self.body = body
        self.model = info.name
        self.id = "resp_" + (request_id or uuid.uuid4().hex)
        self.created = int(time.time())

    def envelope(self, job: Any, status: str, output: list, *, final: bool) -> dict:
        b = self.body
        fmt = b.text.format if b.text is not None and b.text.format is not None else None
        choice = b.tool_choice
        if choice is None:
            choice = "auto" if b.tools else "none"
        elif not isinstance(choice, str):
            choice = choice.model_dump(exclude_none=True)
        incomplete = None
        if final and status == "incomplete":
            incomplete = {"reason": "max_output_tokens"}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "background": False, "error": None, "incomplete_details": incomplete,
                "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
                "max_tool_calls": None, "metadata": b.metadata or {}, "model": self.model, "output": output,
                "parallel_tool_calls": b.parallel_tool_calls is not False, "previous_response_id": None,
                "reasoning": b.reasoning.model_dump() if b.reasoning is not None else None,
                "service_tier": "auto", "store": False, "temperature": b.temperature,
                "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
                "tool_choice": choice, "tools": [t.model_dump(exclude_none=True) for t in b.tools or ()],
                "top_p": b.top_p, "truncation": "disabled", "usage": usage(job) if final else None,
                "user": b.user}


# ----- the route --------------------------------------------------------------------------------
async def create_response(door: FrontDoor, info: ModelInfo, body: ResponsesRequest, receive=None,
                          request_id: str | None = None):
    """``request_id``: the client's (serving/request_ids.py), None = a fresh uuid."""
    refused = body.refused()
    if refused is not None:
        raise invalid(*refused)
    try:
        chat = ChatCompletionRequest.model_validate(body.chat_body())
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err.get("loc", ()))
        raise invalid(f"{loc} is invalid: {err.get('msg')}") from None
    except ValueError as exc:
        raise invalid(str(exc)) from None
    ans = _Answer(body, info, request_id)
    try:
        job = chat_job(door, info, chat, request_id)
        return await respond(door, job, receive, final=lambda j: response_body(j, ans),
                             sse=lambda j, reqs: _events(j, ans, reqs))
    except FrontDoorError as exc:
        raise _renamed(exc) from None


# ----- items --------------------------------------------------------------------------------------
def _hex() -> str:
    return uuid.uuid4().hex


def reasoning_item(item_id: str, text: str) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "encrypted_content": None, "status": None}


def message_item(item_id: str, text: str, status: str, logprobs: list | None = None) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [_text_part(text, logprobs)]}


def _text_part(text: str, logprobs: list | None = None) -> dict:
    """An output_text part; ``logprobs``: the chat logprobs object's ``content`` entries (token,
    logprob, bytes, top_logprobs of token/logprob/bytes: OpenAI's output_text logprob shape)."""
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs or ())}


def delta_logprobs(entries: list) -> list:
    """Chat logprobs entries in the ``response.output_text.delta`` event's shape (OpenAI's and
    vLLM's: token, logprob, top_logprobs of token/logprob; no bytes)."""
    return [{"token": e["token"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e["top_logprobs"]]}
            for e in entries]


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _status(job: Any) -> str:
    c = job.trackers[0].latest.get(0)
    return "incomplete" if c is not None and c.finish_reason == "length" else "completed"


def usage(job: Any) -> dict:
    u = job.usage()
    reasoning = (u.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    return {"input_tokens": u["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": job.trackers[0].num_cached_tokens},
            "output_tokens": u["completion_tokens"], "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": u["total_tokens"]}


def response_body(job: Any, ans: _Answer) -> dict:
    """The non-streamed answer: the chat message of the one choice, as output items."""
    choice = chat_choice(job, 0, final_delta(0, job.trackers[0].latest[0]), final=True, first=True)
    msg = choice["message"]
    logprobs = (choice["logprobs"] or {}).get("content")  # every generated token's, as vLLM's
    status = _status(job)
    output = []
    if msg.get("reasoning"):
        output.append(reasoning_item("rs_" + _hex(), msg["reasoning"]))
    if msg.get("content"):
        output.append(message_item("msg_" + _hex(), msg["content"], status, logprobs))
    for tc in msg.get("tool_calls") or ():
        output.append(call_item("fc_" + _hex(), "call_" + _hex(), tc["function"]["name"],
                                tc["function"]["arguments"], "completed"))
    return ans.envelope(job, status, output, final=True)


# ----- streaming ---------------------------------------------------------------------------------
class _EventWriter:
    """Chat deltas -> Responses events: the output items as they open, grow and close."""

    def __init__(self):
        self.seq = 0
        self.items: list[dict] = []  # the output, in output_index order
        self.reasoning: int | None = None  # output_index of the open reasoning item
        self.message: int | None = None  # ... of the message item
        self.calls: dict[int, int] = {}  # chat tool call index -> output_index
        self.closed: set[int] = set()
        self.pending: list = []  # logprobs entries of tokens whose text has not gone out as output_text

    def event(self, kind: str, **fields) -> bytes:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()

    def _open(self, item: dict) -> tuple[int, list[bytes]]:
        k = len(self.items)
        self.items.append(item)
        shown = dict(item, status="in_progress") if item["type"] != "reasoning" else item
        out = [self.event("response.output_item.added", output_index=k, item=_copy(shown))]
        if item["type"] == "reasoning":
            out.append(self.event("response.content_part.added", item_id=item["id"], output_index=k,
                                  content_index=0, part={"type": "reasoning_text", "text": ""}))
        elif item["type"] == "message":
            out.append(self.event("response.content_part.added", item_id=item["id"], output_index=k,
                                  content_index=0, part=_text_part("")))
        return k, out

    def feed(self, delta: dict, logprobs: list | None = None) -> list[bytes]:
        """Events for one chat delta; ``logprobs``: its tokens' chat logprobs entries (with
        ``include`` logprobs), carried by the next output_text delta."""
        self.pending += logprobs or ()
        out: list[bytes] = []
        r = delta.get("reasoning")
        if r:
            if self.reasoning is None:
                self.reasoning, evs = self._open(reasoning_item("rs_" + _hex(), ""))
                out += evs
            k = self.reasoning
            self.items[k]["content"][0]["text"] += r
            out.append(self.event("response.reasoning_text.delta", item_id=self.items[k]["id"], output_index=k,
                                  content_index=0, delta=r))
        text = delta.get("content")
        if text:
            out += self._close_reasoning()
            if self.message is None:
                self.message, evs = self._open(message_item("msg_" + _hex(), "", "completed"))
                out += evs
            out.append(self._text_delta(text))
        for tc in delta.get("tool_calls") or ():
            fn = tc.get("function") or {}
            if "id" in tc:
                out += self._close_reasoning()
                self.calls[tc["index"]], evs = self._open(call_item("fc_" + _hex(), "call_" + _hex(), fn["name"],
                                                                    "", "completed"))
                out += evs
            args = fn.get("arguments") or ""
            k = self.calls.get(tc["index"])
            if args and k is not None:
                self.items[k]["arguments"] += args
                out.append(self.event("response.function_call_arguments.delta", item_id=self.items[k]["id"],
                                      output_index=k, delta=args))
        return out

    def _text_delta(self, text: str) -> bytes:
        """The message's output_text delta: ``text`` and the logprobs of every token since the last one."""
        k = self.message
        part = self.items[k]["content"][0]
        part["text"] += text
        lps, self.pending = self.pending, []
        part["logprobs"] += lps
        return self.event("response.output_text.delta", item_id=self.items[k]["id"], output_index=k,
                          content_index=0, delta=text, logprobs=delta_logprobs(lps))

    def _close_reasoning(self) -> list[bytes]:
        return self._close(self.reasoning) if self.reasoning is not None else []

    def _close(self, k: int) -> list[bytes]:
        if k in self.closed:
            return []
        self.closed.add(k)
        item = self.items[k]
        ids = dict(item_id=item["id"], output_index=k)
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            out = [self.event("response.reasoning_text.done", **ids, content_index=0, text=text),
                   self.event("response.content_part.done", **ids, content_index=0,
                              part={"type": "reasoning_text", "text": text})]
        elif item["type"] == "message":
            part = item["content"][0]
            out = [self.event("response.output_text.done", **ids, content_index=0, text=part["text"],
                              logprobs=delta_logprobs(part["logprobs"])),
                   self.event("response.content_part.done", **ids, content_index=0, part=_copy(part))]
        else:
            out = [self.event("response.function_call_arguments.done", **ids, arguments=item["arguments"])]
        out.append(self.event("response.output_item.done", output_index=k, item=_copy(item)))
        return out

    def close_all(self, status: str) -> list[bytes]:
        out: list[bytes] = []
        if self.message is not None:
            self.items[self.message]["status"] = status
            if self.pending:  # tokens after the last text (an EOS, text held back): the non-streamed part has them
                out.append(self._text_delta(""))
        for k in range(len(self.items)):
            out += self._close(k)
        return out


def _copy(obj: dict) -> dict:
    return json.loads(json.dumps(obj))


async def _events(job: Any, ans: _Answer, reqs: list) -> AsyncIterator[bytes]:
    w = _EventWriter()
    yield w.event("response.created", response=ans.envelope(job, "in_progress", [], final=False))
    yield w.event("response.in_progress", response=ans.envelope(job, "in_progress", [], final=False))
    first = True
    try:
        async with contextlib.aclosing(merged_outputs(reqs)) as outputs:
            async for k, batch in outputs:
                for d in job.trackers[k].update(batch):
                    choice = chat_choice(job, d.index, d, final=False, first=first)
                    if choice is None:
                        continue
                    first = False
                    for ev in w.feed(choice["delta"], (choice["logprobs"] or {}).get("content")):
                        yield ev
        status = _status(job)
        for ev in w.close_all(status):
            yield ev
        yield w.event("response.completed", response=ans.envelope(job, status, w.items, final=True))
    except FrontDoorError as exc:
        yield w.event("error", code=exc.code.value, message=exc.message, param=exc.param)
