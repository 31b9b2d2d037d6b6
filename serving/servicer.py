"""jaxllm.v1.Generation: proto <-> AsyncEngine, statuses per the error contract (no jax).

Status codes
------------
INVALID_ARGUMENT   any invalid field (the engine's own validation message), prompt too long,
                   a server cap exceeded (--max-n, --max-tokens-cap, --max-logprobs, ...),
                   adapters on a server without --enable-lora, a bad adapter at LoadAdapter,
                   Embed / Score / Classify on a server of another task (naming task or model)
NOT_FOUND          a lora_name this server does not serve (Generate, UnloadAdapter)
ALREADY_EXISTS     a client request_id that is already in flight; LoadAdapter of a served name
RESOURCE_EXHAUSTED waiting requests >= --max-queued-requests (at once, nothing queued);
                   a new adapter while --max-cpu-loras others are in use by unfinished requests;
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

from serving import beam, convert, proto_tools
from serving.embed import classify, embed_request_to_engine, embed_response, score
from serving.frontdoor import Code, FrontDoor, FrontDoorError, ModelInfo, config_get, invalid
from serving.proto.jaxllm.v1 import generation_pb2 as pb
from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
from serving.streams import WriteTimeout

if TYPE_CHECKING:
    from serving.server import ServingServer

log = logging.getLogger(__name__)


_STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}


async def _abort(context, exc: FrontDoorError):
    await context.abort(_STATUS[exc.code], exc.message)


class GenerationServicer(pb_grpc.GenerationServicer):
    """A thin adapter: proto -> (prompt, SamplingParams) -> ``FrontDoor`` -> proto deltas."""

    def __init__(self, server: "ServingServer"):
        self.server = server

    @property
    def door(self) -> FrontDoor:
        return self.server.door

    async def _model(self, context) -> ModelInfo:
        try:
            return self.door.model()
        except FrontDoorError as exc:
            await _abort(context, exc)

    def _chat_renderer(self, info: ModelInfo):
        """chat -> prompt token ids, as the HTTP chat renders them (serving/proto_tools.py)."""
        return lambda chat: proto_tools.render_ids(chat, self.door.config, info.tokenizer)

    # ----- RPCs -----------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context):
        info = await self._model(context)
        if request.sampling.use_beam_search:
            async for resp in self._beam_search(request, info, context):
                yield resp
            return
        plan = None
        try:
            try:
                # length_penalty without use_beam_search: accepted and unused, as vLLM (and HTTP)
                params = convert.sampling_params_from_proto(request.sampling, self.door.config,
                                                            vocab_size=info.vocab_size,
                                                            max_model_len=info.max_model_len,
                                                            defaults=info.generation)
                plan, prompt = proto_tools.plan_request(request, self.door.config, info.tokenizer, params)
                if prompt is None:
                    prompt = convert.prompt_from_request(request, info.vocab_size, self._chat_renderer(info))
                prompt = convert.salted(prompt, request.cache_salt)
            except ValueError as exc:
                raise invalid(str(exc)) from None
            if plan is not None:  # its constraint: checked as the request's own would be
                params = self.door.check_params(params, info, max_tokens_set=request.sampling.HasField("max_tokens"))
            rid = self.door.check_request_id(request.request_id)
            lora = self.door.adapters.resolve(request.lora_name)
            tracker = convert.ProtoDeltaTracker(rid, params)
            started: set[int] = set()  # with a chat plan: the choices whose first delta went out
            async with self.door.request(rid, prompt, params, lora, request.priority) as req:
                tracker.request_id = req.request_id
                stuck = WriteTimeout(context, self.door.config.stream_timeout,
                                     lambda: self.door.drop(req.request_id), what=f"request {req.request_id!r}")
                try:
                    while True:
                        batch = await req.next_batch()
                        if not batch:
                            break
                        resp = tracker.update(batch)
                        if resp is not None and plan is not None:
                            proto_tools.split(plan, resp, started, tracker.latest)
                        if resp is not None:
                            stuck.writing()
                            yield resp
                            stuck.written()
                        if tracker.finished:
                            break
                finally:
                    stuck.close()
        except FrontDoorError as exc:
            await _abort(context, plan.explain(exc) if plan is not None else exc)

    async def _beam_search(self, request: pb.GenerateRequest, info: ModelInfo, context):
        """``SamplingParams.use_beam_search``: serving/beam.py's search through the front door (as
        HTTP's), answered in one final response with the ``n`` best beams; leaving early (client
        cancel, deadline, error) aborts the search's engine requests."""
        sp = request.sampling
        try:
            try:
                params = convert.sampling_params_from_proto(sp, self.door.config, vocab_size=info.vocab_size,
                                                            max_model_len=info.max_model_len, defaults=info.generation)
                prompt = convert.prompt_from_request(request, info.vocab_size, self._chat_renderer(info))
            except ValueError as exc:
                raise invalid(str(exc)) from None
            if request.WhichOneof("prompt") == "chat" and (request.chat.tools_json or request.chat.tool_choice):
                raise beam.refused("chat.tools_json" if request.chat.tools_json else "chat.tool_choice")
            if request.cache_salt:  # as HTTP: the beams share their prompt's blocks
                raise beam.refused("cache_salt")
            if request.WhichOneof("prompt") == "chat" and self.door.config.reasoning_parser:
                raise invalid("use_beam_search=true is invalid under --reasoning-parser: the reasoning split "
                              "applies to sampled outputs only", "use_beam_search")
            beam.refuse_params(params)
            search = beam.search_params(params, sp.temperature if sp.HasField("temperature") else None,
                                        sp.length_penalty if sp.HasField("length_penalty") else 1.0)
            ids = beam.prompt_ids([prompt], info, "prompt")[0]
            rid = self.door.check_request_id(request.request_id) or f"beam-{uuid.uuid4().hex}"
            info.lora = self.door.adapters.resolve(request.lora_name)
            search_req = beam.BeamRequest(self.door, info, rid, rid, prompt, ids, search, request.priority,
                                          logprobs=params.logprobs is not None)
            try:
                tracker = convert.ProtoDeltaTracker(rid, params)
                resp = tracker.update(await search_req.next_batch())
            finally:
                await search_req.aclose()
            yield resp
        except FrontDoorError as exc:
            await _abort(context, exc)

    async def Embed(self, request: pb.EmbedRequest, context):
        """Unary: admitted by the front door like Generate; the engine's ValueError (empty or too
        long a prompt, a generate engine: "task='generate' is invalid ...") is INVALID_ARGUMENT."""
        info = await self._model(context)
        try:
            if getattr(info.engine, "task", None) == "classify":  # its outputs are probs, not a vector
                raise invalid("task='classify' is invalid for Embed: this server classifies (HTTP /classify; a "
                              "cross-encoder also answers Score)", "task")
            try:
                prompt, params = embed_request_to_engine(request, info.vocab_size)
            except ValueError as exc:
                raise invalid(str(exc)) from None
            rid = self.door.check_request_id(request.request_id)
            rid, out = await self.door.embed(rid, prompt, params)
        except FrontDoorError as exc:
            await _abort(context, exc)
        return embed_response(rid, out)

    async def Score(self, request: pb.ScoreRequest, context):
        """Unary: vLLM's score for an embedding model (serving/embed.py ``score``), every text one
        embedding request admitted together through the front door."""
        info = await self._model(context)
        try:
            return await score(self.door, info, request)
        except FrontDoorError as exc:
            await _abort(context, exc)

    async def Classify(self, request: pb.ClassifyRequest, context):
        """Unary: vLLM's classify on a --task classify server (serving/embed.py ``classify``: HTTP
        /classify's code), every input one engine request admitted together through the front door."""
        info = await self._model(context)
        try:
            return await classify(self.door, info, request)
        except FrontDoorError as exc:
            await _abort(context, exc)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context):
        info = await self._model(context)
        return pb.ListAdaptersResponse(
            base_model=self.door.config.model_names(info.name)[0],
            adapters=[_adapter(a) for a in self.door.adapters.list()])

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context):
        info = await self._model(context)
        try:
            lora = await self.door.adapters.load(request.name, request.path,
                                                 self.door.config.model_names(info.name))
        except FrontDoorError as exc:
            await _abort(context, exc)
        return _adapter(lora)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context):
        await self._model(context)
        try:
            lora = await self.door.adapters.unload(request.name)
        except FrontDoorError as exc:
            await _abort(context, exc)
        return _adapter(lora)

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        info = await self._model(context)
        kind = request.WhichOneof("input")
        try:
            if kind is None:
                raise ValueError("input is invalid: set one of text or chat")
            ids = (proto_tools.render_ids(request.chat, self.door.config, info.tokenizer) if kind == "chat"
                   else [int(t) for t in info.tokenizer.encode(request.text)])
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=info.max_model_len or 0)

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        info = await self._model(context)
        try:
            ids = list(request.token_ids)
            if ids:
                ids = convert.check_token_ids("token_ids", ids, info.vocab_size)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        return pb.DetokenizeResponse(text=info.tokenizer.decode(ids, skip_special_tokens=skip))

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context):
        info = await self._model(context)
        eng, tok, max_len = info.engine, info.tokenizer, info.max_model_len
        s = self.server.async_engine.stats
        cfg = self.door.config
        info = pb.ModelInfo(
            model=str(config_get(eng, "model") or ""),
            max_model_len=max_len or 0,
            vocab_size=info.vocab_size or 0,
            dtype=str(config_get(eng, "dtype") or ""),
            tensor_parallel_size=int(config_get(eng, "tensor_parallel_size") or 1),
            block_size=int(config_get(eng, "block_size") or 0),
            token_buckets=_buckets(eng, s, "mixed", "token_buckets"),
            # an embed or classify engine compiles no decode-only step (prefill only)
            request_buckets=([] if getattr(eng, "task", None) in ("embed", "classify")
                             else _buckets(eng, s, "decode", "request_buckets")),
            free_kv_blocks=s.num_free_blocks,
            total_kv_blocks=s.num_blocks,
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            max_num_seqs=int(config_get(eng, "max_num_seqs") or 0),
            eos_token_ids=[int(t) for t in (getattr(tok, "eos_token_ids", None) or [])],
            task=str(getattr(eng, "task", None) or "generate"),
            hidden_size=int(getattr(getattr(getattr(eng, "runner", None), "model_config", None),
                                    "hidden_size", 0) or 0),
            limits=pb.ServerLimits(
                max_n=cfg.max_n, max_tokens=cfg.max_tokens_cap or max_len or 0,
                max_logprobs=cfg.max_logprobs, max_stop_strings=cfg.max_stop_strings,
                max_message_bytes=cfg.max_message_bytes,
                max_queued_requests=cfg.max_queued_requests),
        )
        return info


def _adapter(lora) -> pb.Adapter:
    return pb.Adapter(name=lora.lora_name, id=lora.lora_int_id, path=lora.lora_path)


def _buckets(engine: Any, stats: Any, runner_field: str, name: str) -> list[int]:
    """Compiled buckets: the real runner's ``runner.buckets`` (``mixed`` = token counts of
    prefill/mixed steps, ``decode`` = sequence counts of decode-only steps), else a
    ``token_buckets``/``request_buckets`` list on the stats, the config or the engine."""
    runner = getattr(engine, "runner", None)
    b = getattr(runner, "buckets", None)
    v = getattr(b, runner_field, None) if b is not None else None
    if v is None:
        v = config_get(engine, name)
    try:
        return [int(x) for x in v or ()]
    except (TypeError, ValueError):
        return []
