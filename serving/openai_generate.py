"""/v1/completions and /v1/chat/completions over the front door (no jax).

A body becomes one front-door request per prompt (a completions ``prompt`` list is several
prompts; ``n`` samples ride in one request). Admission happens before any byte of the answer is
sent, so every refusal is an HTTP status + OpenAI error object; once a stream has started, a
failure (engine death, drain abort) is one ``data: {"error": ...}`` event before ``[DONE]``.
Choice ``index`` = prompt position * n + sample index, as OpenAI and vLLM number them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator

from starlette.responses import JSONResponse, Response, StreamingResponse

from jaxllm.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams

from serving.deltas import DeltaTracker
from serving.frontdoor import FrontDoor, FrontDoorError, ModelInfo, check_token_ids, invalid
from serving.openai_beam import beam_params, beam_request
from serving.openai_choices import final_body, stream_chunks
from serving.openai_echo import Echo, answer_role, chat_echo, check_stream, echo_text
from serving.openai_protocol import ChatCompletionRequest, CompletionRequest
from serving.openai_reasoning import ReasoningPlan
from serving.openai_tools import ToolPlan, render_body
from serving.request_ids import engine_prefix


class _Job:
    """One body: its prompts, params and the bookkeeping to answer it."""

    def __init__(self, kind: str, info: ModelInfo, prompts: list[Any], params: SamplingParams,
                 stream: bool, include_usage: bool, request_id: str | None = None):
        self.kind = kind  # "completion" | "chat"
        self.info = info
        self.prompts = prompts
        self.params = params
        self.stream = stream
        self.include_usage = include_usage
        # the answer's id: the client's request id (serving/request_ids.py) or a fresh uuid; the
        # engine's requests are f"{self.engine_id}-{k}" (unique even when two clients send one id)
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + (request_id or uuid.uuid4().hex)
        self.engine_id = engine_prefix(self.id, request_id is not None)
        self.created = int(time.time())
        self.trackers = [DeltaTracker(f"{self.id}-{k}", params) for k in range(len(prompts))]
        self.echo: Echo | None = None  # completions with echo=true
        self.prompt_logprobs: int | None = None  # the k of the prompt_logprobs answer; None = none
        self.offsets: dict[int, int] = {}  # choice index -> text_offset of its next token
        self.tools: ToolPlan | None = None  # chat with tool_choice named/required/auto (serving/openai_tools.py)
        self.reasoning: ReasoningPlan | None = None  # chat under --reasoning-parser (serving/openai_reasoning.py)
        self.priority = 0  # the body's priority (--scheduling-policy priority)
        self.beam = None  # use_beam_search: its BeamSearchParams (serving/openai_beam.py)
        self.beam_prompt_ids: list[list[int]] = []
        self.continuous_usage = False  # stream_options.continuous_usage_stats: usage in every chunk
        self.tokens_as_ids = False  # return_tokens_as_token_ids: logprob tokens as "token_id:<id>"
        self.return_token_ids = False  # vLLM's return_token_ids: prompt and generated ids in the answer
        self.prompt_details = False  # --enable-prompt-tokens-details: usage.prompt_tokens_details
        self.role = "assistant"  # chat: the answer's role (--response-role, or the last message's)

    def usage(self, only: tuple[int, int] | None = None) -> dict:
        """The answer's usage, or with ``only=(prompt position, sample index)`` that one choice's (its
        prompt's tokens and its own completion tokens so far: vLLM's continuous usage with n > 1)."""
        if only is None:
            p = sum(t.num_prompt_tokens for t in self.trackers)
            outs = [o for t in self.trackers for o in t.latest.values()]
        else:
            tracker = self.trackers[only[0]]
            p = tracker.num_prompt_tokens
            outs = [tracker.latest[only[1]]] if only[1] in tracker.latest else []
        prompt_only = self.echo is not None and self.echo.prompt_only  # its one token is dropped
        c = 0 if prompt_only else sum(len(o.token_ids) for o in outs)
        out = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        if self.prompt_details:  # the prompt tokens the prefix cache served (vLLM's, OpenAI's shape)
            trackers = self.trackers if only is None else [self.trackers[only[0]]]
            out["prompt_tokens_details"] = {"cached_tokens": sum(t.num_cached_tokens for t in trackers)}
        if self.reasoning is not None:  # current vLLM: with a reasoning parser, the think blocks' tokens
            r = sum(self.reasoning.reasoning_tokens(o.text, o.token_ids, o.finish_reason == "stop") for o in outs)
            out["completion_tokens_details"] = {"reasoning_tokens": r}
        return out

    def logprob_token(self, tid: int, lp: Any) -> str:
        """A logprobs entry's token: its text, or "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
        return f"token_id:{tid}" if self.tokens_as_ids else self.token_text(tid, lp)

    def token_text(self, tid: int, lp: Any) -> str:
        text = getattr(lp, "decoded_token", None)
        return text if text is not None else self.info.tokenizer.decode([tid], skip_special_tokens=False)


# ----- bodies -> jobs ------------------------------------------------------------------------
def completion_job(door: FrontDoor, info: ModelInfo, body: CompletionRequest,
                   request_id: str | None = None) -> _Job:
    if body.prompt_embeds is not None:
        raise invalid("prompt_embeds is not supported by this server: send the prompt as text or token ids",
                      "prompt_embeds")
    if body.suffix is not None:
        raise invalid("suffix is not supported: this server has no insertion models", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise invalid(f"best_of={body.best_of} is not supported: only best_of == n ({body.n})", "best_of")
    try:
        params, max_set = body.to_params(info.generation)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    params = door.check_params(params, info, max_tokens_set=max_set)
    p = body.prompt
    if isinstance(p, str):
        texts: list = [p]
    elif p and all(isinstance(x, int) for x in p):
        texts = [p]
    else:
        texts = list(p)
    if not texts:
        raise invalid("prompt=[] is invalid: must hold at least one prompt", "prompt")
    prompts = []
    for i, x in enumerate(texts):
        field = "prompt" if len(texts) == 1 else f"prompt[{i}]"
        if isinstance(x, str):
            if not x:
                raise invalid(f"{field}='' is invalid: the prompt must be non-empty", "prompt")
            # vLLM's add_special_tokens=false: the text tokenized without BOS etc. (the engine's adds them)
            prompts.append(x if body.add_special_tokens else
                           {"prompt": x, "prompt_token_ids": list(info.tokenizer.encode(x, add_special_tokens=False))})
        else:
            try:
                prompts.append({"prompt_token_ids": check_token_ids(field, x, info.vocab_size)})
            except ValueError as exc:
                raise invalid(str(exc), "prompt") from None
    if (msg := check_stream(body.prompt_logprobs, body.stream)) is not None:
        raise invalid(msg, "prompt_logprobs")
    job = _new_job("completion", door, info, prompts, params, body, request_id)
    if body.echo:  # vLLM: echo with logprobs answers the prompt logprobs too
        if job.prompt_logprobs is None and body.logprobs is not None:
            job.prompt_logprobs = params.logprobs
        # vLLM: with return_token_ids the prompt comes back as prompt_token_ids, not as text
        texts = ["" if body.return_token_ids else echo_text(x, info.tokenizer) for x in prompts]
        job.echo = Echo(texts, prompt_only=body.max_tokens == 0)
    if body.use_beam_search:
        beam_params(job, body)
    return salted(job, body.cache_salt)


def chat_job(door: FrontDoor, info: ModelInfo, body: ChatCompletionRequest,
             request_id: str | None = None) -> _Job:
    top = body.top_logprobs
    if top is not None and not 0 <= top <= min(MAX_LOGPROBS, door.config.max_logprobs):
        limit = (f"must be in [0, {MAX_LOGPROBS}]" if top < 0 or door.config.max_logprobs >= MAX_LOGPROBS
                 else f"exceeds the server limit --max-logprobs={door.config.max_logprobs}")
        raise invalid(f"top_logprobs={top} is invalid: {limit}", "top_logprobs")
    try:
        tools = ToolPlan.from_body(body, door.config)
        prompt = render_body(info.tokenizer, body, door.config)
        params, max_set = body.to_params(info.max_model_len, info.generation)
        if tools is not None:
            tools.adjust(params, body)  # named/required: the tool schema constrains the output
        reasoning = ReasoningPlan.from_body(body, door.config, prompt, info.tokenizer)
        if reasoning is not None:
            reasoning.adjust(params, body, info.tokenizer)  # a constraint starts after the reasoning
    except ValueError as exc:
        raise invalid(str(exc)) from None
    params = door.check_params(params, info, max_tokens_set=max_set)
    if prompt.get("prompt") is None:
        prompt = {"prompt_token_ids": prompt["prompt_token_ids"]}
    if (msg := check_stream(body.prompt_logprobs, body.stream)) is not None:
        raise invalid(msg, "prompt_logprobs")
    job = _new_job("chat", door, info, [prompt], params, body, request_id)
    job.role = answer_role(body, door.config.response_role)
    job.echo = chat_echo(body, door.config.response_role)
    job.tools = tools
    job.reasoning = reasoning
    if body.use_beam_search:
        beam_params(job, body)
    return salted(job, body.cache_salt)


def _new_job(kind: str, door: FrontDoor, info: ModelInfo, prompts: list, params: SamplingParams, body: Any,
             request_id: str | None) -> _Job:
    """The job of a checked body: its stream options, the fields every generation body shares."""
    if (refusal := body.refused()) is not None:
        raise invalid(*refusal)
    so = body.stream_options
    cfg = door.config
    continuous = bool(so and so.continuous_usage_stats and so.include_usage is not False)  # vLLM's rule
    usage = bool(so and so.include_usage) or continuous or cfg.enable_force_include_usage
    job = _Job(kind, info, prompts, params, body.stream, usage, request_id)
    job.continuous_usage = continuous
    job.prompt_details = cfg.enable_prompt_tokens_details
    job.tokens_as_ids = bool(cfg.return_tokens_as_token_ids if body.return_tokens_as_token_ids is None
                             else body.return_tokens_as_token_ids)
    job.return_token_ids = bool(body.return_token_ids)
    job.prompt_logprobs = body.prompt_logprobs
    job.priority = body.priority
    if body.truncate_prompt_tokens == -1:  # vLLM's: truncate to the model's length
        params.truncate_prompt_tokens = info.max_model_len
    return job


def salted(job: _Job, salt: str | None) -> _Job:
    """Every prompt of ``job`` with vLLM's ``cache_salt`` (the engine keys its prefix-cache blocks on it)."""
    if salt is not None:
        if job.beam is not None:
            raise invalid("cache_salt is invalid with use_beam_search=true: the beams share their prompt's "
                          "blocks", "cache_salt")
        job.prompts = [dict({"prompt": p} if isinstance(p, str) else p, cache_salt=salt) for p in job.prompts]
    return job


# ----- running ---------------------------------------------------------------------------------
async def respond(door: FrontDoor, job: _Job, receive=None, final=None, sse=None):
    """Admit every prompt of ``job`` (all or nothing), then answer: JSON or an SSE stream.
    ``receive`` (the ASGI receive, body already read) tells when a non-streamed request's client
    hangs up: its requests are aborted then rather than run to the end. ``final(job)`` (the JSON
    body) and ``sse(job, reqs)`` (the event bytes) default to the completions/chat shapes; the
    Responses door (serving/openai_responses.py) passes its own."""
    stack = contextlib.AsyncExitStack()
    try:
        if job.beam is not None:  # each prompt's search opens and closes its own engine requests
            door.model()  # refused now (draining, dead engine) rather than mid-answer
            reqs = [beam_request(door, job, k) for k in range(len(job.prompts))]
            for r in reqs:
                stack.push_async_callback(r.aclose)
        else:  # a JSON answer reads only the final outputs: the engine then builds no per-step ones
            params = job.params if job.stream else job.params.clone(output_kind=RequestOutputKind.FINAL_ONLY)
            reqs = [await stack.enter_async_context(door.request(f"{job.engine_id}-{k}", p, params,
                                                                 job.info.lora, job.priority))
                    for k, p in enumerate(job.prompts)]
    except BaseException as exc:
        await stack.aclose()  # the ones already admitted are aborted
        if job.tools is not None and isinstance(exc, FrontDoorError):
            raise job.tools.explain(exc) from None  # a tool schema the grammar compiler refused
        raise
    if not job.stream:
        async with stack:
            work = asyncio.ensure_future(_run_to_end(job, reqs))
            watch = asyncio.ensure_future(_disconnected(receive)) if receive is not None else None
            try:
                await asyncio.wait({work, watch} - {None}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (work, watch):
                    if fut is not None and not fut.done():
                        fut.cancel()
            if not work.done() or work.cancelled():  # client gone: leaving the stack aborts them
                return Response(status_code=499)
            work.result()
        return JSONResponse((final or final_body)(job))
    return _SSEResponse((sse or _sse)(job, reqs), stack.aclose)


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def merged_outputs(reqs: list) -> AsyncIterator[tuple[int, list]]:
    """(request position, new outputs) from every request as they come; FrontDoorError passes."""
    if len(reqs) == 1:  # the common case: no task per read
        req = reqs[0]
        while not req.finished:
            batch = await req.next_batch()
            if not batch:
                return
            yield 0, batch
        return
    pending = {asyncio.ensure_future(r.next_batch()): k for k, r in enumerate(reqs)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                k = pending.pop(fut)
                batch = fut.result()
                if not batch:
                    continue
                yield k, batch
                if not reqs[k].finished:
                    pending[asyncio.ensure_future(reqs[k].next_batch())] = k
    finally:
        for fut in pending:
            fut.cancel()


async def _run_to_end(job: _Job, reqs: list) -> None:
    async with contextlib.aclosing(merged_outputs(reqs)) as outputs:
        async for k, batch in outputs:
            job.trackers[k].update(batch)


# ----- streaming --------------------------------------------------------------------------------
def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _sse(job: _Job, reqs: list) -> AsyncIterator[bytes]:
    obj = "text_completion" if job.kind == "completion" else "chat.completion.chunk"
    head = {"id": job.id, "object": obj, "created": job.created, "model": job.info.name}
    started: set[int] = set()
    try:
        async with contextlib.aclosing(merged_outputs(reqs)) as outputs:  # its pending reads end with us
            async for k, batch in outputs:
                for chunk in stream_chunks(job, head, k, batch, started):
                    yield _event(chunk)
        if job.include_usage:
            yield _event(dict(head, choices=[], usage=job.usage()))
    except FrontDoorError as exc:
        from serving.openai_errors import error_body

        yield _event(error_body(exc)[1])
    yield b"data: [DONE]\n\n"


class _SSEResponse(StreamingResponse):
    """Server-sent events whose requests are released however the response ends: finished,
    client gone (Starlette cancels the stream on http.disconnect) or never started."""

    def __init__(self, content: AsyncIterator[bytes], cleanup):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()
            await self._cleanup()
