"""jaxllm.v1.Generation: proto <-> AsyncEngine, statuses per the error contract (no jax).

Status codes
------------
INVALID_ARGUMENT   any invalid field (the engine's own validation message), prompt too long,
                   a server cap exceeded (--max-n, --max-tokens-cap, --max-logprobs, ...)
ALREADY_EXISTS     a client request_id that is already in flight
RESOURCE_EXHAUSTED waiting requests >= --max-queued-requests (at once, nothing queued);
                   a request larger than --max-message-bytes (grpc itself)
UNAVAILABLE        starting, draining, engine wedged/dead before the request was accepted,
                   or aborted by the drain after --shutdown-timeout
INTERNAL           the engine step raised while the request was in flight (message has the cause),
                   or this request's host-side processing raised (detokenizer, stop checks:
                   "request failed: <type>: <cause>"; only this request fails, blocks freed)
UNAUTHENTICATED    missing/wrong API key (interceptor)
DEADLINE_EXCEEDED  the client did not read its stream for --stream-timeout seconds (serving/streams.py)
Client cancel, disconnect or deadline: the handler is cancelled and the request aborted.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

import grpc

from jaxllm.engine.async_engine import (DuplicateRequestError, EngineDeadError,
                                        RequestAbortedError, RequestFailedError)

from serving import convert
from serving.embed import check_request_id, embed_request_to_engine, embed_response
from serving.health import PROBE_PREFIX
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
from serving.streams import WriteTimeout

if TYPE_CHECKING:
    from serving.server import ServingServer

log = logging.getLogger(__name__)


def stat(stats: dict, *names: str, default: int = 0) -> int:
    for n in names:
        if n in stats and stats[n] is not None:
            return int(stats[n])
    return default


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, server: "ServingServer"):
        self.server = server
        self.active: dict[str, Any] = {}  # request_id -> RequestStream of running Generate calls

    # ----- helpers --------------------------------------------------------------------
    @property
    def cfg(self):
        return self.server.config

    async def _gate(self, context) -> Any:
        """The AsyncEngine if new work is accepted, else abort UNAVAILABLE with the reason."""
        reason = self.server.refusal_reason()
        if reason is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
        return self.server.async_engine

    def _engine_info(self):
        eng = self.server.async_engine.engine
        tok = eng.tokenizer
        vocab = getattr(eng, "vocab_size", None) or getattr(tok, "vocab_size", None)
        return eng, tok, vocab, _config_get(eng, "max_model_len")

    # ----- RPCs -----------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):
        ae = await self._gate(context)
        eng, tok, vocab, max_len = self._engine_info()
        try:
            params = convert.sampling_params_from_proto(request.sampling, self.cfg,
                                                        vocab_size=vocab, max_model_len=max_len)
            prompt = convert.prompt_from_request(request, tok, vocab)
            rid = request.request_id
            if len(rid) > self.cfg.max_request_id_len:
                raise ValueError(f"request_id of length {len(rid)} is invalid: must be at most "
                                 f"{self.cfg.max_request_id_len} characters")
            if rid.startswith(PROBE_PREFIX):
                raise ValueError(f"request_id={rid!r} is invalid: the prefix {PROBE_PREFIX!r} "
                                 "is reserved")
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        rid = rid or uuid.uuid4().hex
        if rid in self.active or ae.has_request(rid):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"request_id={rid!r} is invalid: already in flight")
        waiting = stat(ae.stats, "num_waiting", "waiting") + ae.num_pending_adds
        if waiting >= self.cfg.max_queued_requests:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server overloaded: {waiting} requests waiting "
                                f"(--max-queued-requests={self.cfg.max_queued_requests}); retry later")
        # registered before the first await, so a drain that starts now waits for (or aborts) it
        self.active[rid] = None
        tracker = convert.DeltaTracker(rid, params)
        finished = False
        owned = True
        stuck = WriteTimeout(context, self.cfg.stream_timeout, lambda: self._drop(rid),
                             what=f"request {rid!r}")
        try:
            try:
                stream = await ae.add_request(rid, prompt, params)
            except DuplicateRequestError as exc:  # another call's request: not ours to abort
                owned = False
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except EngineDeadError as exc:
                await context.abort(grpc.StatusCode.INTERNAL, _dead_message(exc))
            except RuntimeError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            self.active[rid] = stream
            while True:
                try:
                    batch = await stream.get_batch()
                except EngineDeadError as exc:
                    await context.abort(grpc.StatusCode.INTERNAL, _dead_message(exc))
                except RequestAbortedError as exc:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                except RequestFailedError as exc:  # this request only; the engine goes on
                    await context.abort(grpc.StatusCode.INTERNAL, str(exc))
                if not batch:
                    break
                resp = tracker.update(batch)
                if resp is not None:
                    stuck.writing()
                    yield resp
                    stuck.written()
                if tracker.finished:
                    finished = True
                    break
        finally:
            # reached on completion, error, client cancel, disconnect, deadline and stream timeout
            stuck.close()
            self.active.pop(rid, None)
            if owned:
                if finished:
                    ae.release(rid)
                else:
                    ae.abort(rid)
            self.server.notify_request_done()

    async def Embed(self, request: pb.EmbedRequest, context):
        """Unary: admitted like Generate; the engine's ValueError (empty or too long a prompt, a
        generate engine: "task='generate' is invalid ...") is INVALID_ARGUMENT."""
        ae = await self._gate(context)
        eng, tok, vocab, max_len = self._engine_info()
        try:
            prompt, params = embed_request_to_engine(request, vocab)
            rid = request.request_id
            check_request_id(rid, self.cfg.max_request_id_len)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        rid = rid or uuid.uuid4().hex
        if rid in self.active or ae.has_request(rid):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id={rid!r} is invalid: already in flight")
        waiting = stat(ae.stats, "num_waiting", "waiting") + ae.num_pending_adds
        if waiting >= self.cfg.max_queued_requests:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server overloaded: {waiting} requests waiting "
                                f"(--max-queued-requests={self.cfg.max_queued_requests}); retry later")
        self.active[rid] = None  # before the first await: a drain waits for (or aborts) it
        try:
            try:
                out = await ae.embed(rid, prompt, params)  # aborts the request if cancelled
            except DuplicateRequestError as exc:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except EngineDeadError as exc:
                await context.abort(grpc.StatusCode.INTERNAL, _dead_message(exc))
            except (RequestAbortedError, RuntimeError) as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            self.active.pop(rid, None)
            self.server.notify_request_done()
        return embed_response(rid, out)

    def _drop(self, rid: str) -> None:
        """A stream timed out: abort its request now (the handler's finally may run later)."""
        self.active.pop(rid, None)
        self.server.async_engine.abort(rid)
        self.server.notify_request_done()

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        await self._gate(context)
        eng, tok, vocab, max_len = self._engine_info()
        kind = request.WhichOneof("input")
        try:
            if kind is None:
                raise ValueError("input is invalid: set one of text or chat")
            ids = (convert.render_chat(tok, request.chat) if kind == "chat"
                   else [int(t) for t in tok.encode(request.text)])
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=max_len or 0)

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        await self._gate(context)
        eng, tok, vocab, _ = self._engine_info()
        try:
            ids = list(request.token_ids)
            if ids:
                ids = convert.check_token_ids("token_ids", ids, vocab)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return pb.DetokenizeResponse(text=tok.decode(ids, skip_special_tokens=skip))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context):
        await self._gate(context)
        ae = self.server.async_engine
        eng, tok, vocab, max_len = self._engine_info()
        s = ae.stats
        cfg = self.cfg
        info = pb.ModelInfo(
            model=str(_config_get(eng, "model") or ""),
            max_model_len=max_len or 0,
            vocab_size=vocab or 0,
            dtype=str(_config_get(eng, "dtype") or ""),
            tensor_parallel_size=int(_config_get(eng, "tensor_parallel_size") or 1),
            block_size=int(_config_get(eng, "block_size") or 0),
            token_buckets=_buckets(eng, s, "mixed", "token_buckets"),
            # an embed engine compiles no decode-only step (prefill only)
            request_buckets=[] if getattr(eng, "task", None) == "embed" else _buckets(eng, s, "decode", "request_buckets"),
            free_kv_blocks=stat(s, "free_blocks", "num_free_blocks", "free_kv_blocks"),
            total_kv_blocks=stat(s, "total_blocks", "num_total_blocks", "num_blocks", "total_kv_blocks"),
            num_running=stat(s, "num_running", "running"),
            num_waiting=stat(s, "num_waiting", "waiting"),
            max_num_seqs=int(_config_get(eng, "max_num_seqs") or 0),
            eos_token_ids=[int(t) for t in (getattr(tok, "eos_token_ids", None) or [])],
            task=str(getattr(eng, "task", None) or "generate"),
            hidden_size=int(getattr(getattr(getattr(eng, "runner", None), "model_config", None), "hidden_size", 0) or 0),
            limits=pb.ServerLimits(
                max_n=cfg.max_n, max_tokens=cfg.max_tokens_cap or max_len or 0,
                max_logprobs=cfg.max_logprobs, max_stop_strings=cfg.max_stop_strings,
                max_message_bytes=cfg.max_message_bytes,
                max_queued_requests=cfg.max_queued_requests),
        )
        return info


def _dead_message(exc: EngineDeadError) -> str:
    cause = exc.cause
    return f"engine step failed: {type(cause).__name__}: {cause}" if cause is not None else str(exc)


def _config_get(engine: Any, name: str):
    for holder in (getattr(engine, "config", None), getattr(engine, "engine_config", None), engine):
        if holder is not None and getattr(holder, name, None) is not None:
            return getattr(holder, name)
    return None


def _buckets(engine: Any, stats: dict, runner_field: str, name: str) -> list[int]:
    """Compiled buckets: the real runner's ``runner.buckets`` (``mixed`` = token counts of
    prefill/mixed steps, ``decode`` = sequence counts of decode-only steps), else a
    ``token_buckets``/``request_buckets`` list on the stats, the config or the engine."""
    runner = getattr(engine, "runner", None)
    b = getattr(runner, "buckets", None)
    v = getattr(b, runner_field, None) if b is not None else None
    if v is None:
        v = stats.get(name) or _config_get(engine, name)
    try:
        return [int(x) for x in v or ()]
    except (TypeError, ValueError):
        return []
