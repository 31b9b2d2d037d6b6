"""FrontDoor: the one admission layer both transports call (no jax, no grpc, no HTTP).

gRPC (``serving/servicer.py``) and the OpenAI HTTP API (``serving/openai_api.py``) are thin
adapters: they turn their wire format into a prompt + ``SamplingParams``, then ask the front door.
It owns what must be the same behind either door (vLLM's ``EngineClient`` is the model):

* **gate**: new work only while the engine is built, warm, alive, not wedged and not draining;
* **request checks** that are not about a wire format: server caps (``--max-n``,
  ``--max-tokens-cap``, ``--max-logprobs``, ``--max-stop-strings``), token ids in range, chat
  rendering, request ids;
* **queue limit**: waiting requests >= ``--max-queued-requests`` is refused at once;
* **in-flight registry** (``active``), which drain waits for and aborts after the timeout;
* **request lifetime**: ``async with door.request(...) as req`` aborts the engine request when the
  caller leaves early (client cancel, disconnect, deadline, error), so its KV blocks are freed
  before the engine's next step.

Every refusal is a :class:`FrontDoorError` with a transport-neutral :class:`Code` and a one-line
message naming the field, the value and the limit; each transport maps the code (gRPC status,
HTTP status + OpenAI error object).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from typing import Any, AsyncIterator

from jaxllm.engine.async_engine import (AsyncEngine, DuplicateRequestError, EngineDeadError,
                                        RequestAbortedError, RequestFailedError, RequestStream)
from jaxllm.generation_config import NONE as NO_GENERATION_DEFAULTS
from jaxllm.lora.loader import LoRALoadError
from jaxllm.sampling_params import SamplingParams

from serving.adapters import Adapters
from serving.config import ServerConfig

log = logging.getLogger(__name__)

PROBE_PREFIX = "__health-probe-"  # request ids of the health monitor's synthetic requests


class Code(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAUTHENTICATED = "unauthenticated"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class FrontDoorError(Exception):
    """A refusal or failure every transport can report: ``code``, one-line ``message`` and the
    request field at fault (``param``, None when it is not about one field)."""

    def __init__(self, code: Code, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def invalid(message: str, param: str | None = None) -> FrontDoorError:
    """INVALID_ARGUMENT; ``param`` defaults to the field the message names first."""
    return FrontDoorError(Code.INVALID_ARGUMENT, message, param or _field_of(message))


# ----- checks that do not depend on the wire format ----------------------------------------
def apply_caps(params: SamplingParams, cfg: ServerConfig, *, vocab_size: int | None,
               max_model_len: int | None, max_tokens_set: bool = True) -> SamplingParams:
    """The engine's own validation, then the server caps; ValueError('<field>=<v> is invalid: ...')."""
    params.validate(vocab_size=vocab_size)
    if params.n > cfg.max_n:
        raise ValueError(f"n={params.n} is invalid: exceeds the server limit --max-n={cfg.max_n}")
    cap = cfg.max_tokens_cap or max_model_len
    if cap is not None and max_tokens_set and params.max_tokens > cap:
        flag = "--max-tokens-cap" if cfg.max_tokens_cap else "max_model_len"
        raise ValueError(f"max_tokens={params.max_tokens} is invalid: exceeds the server limit "
                         f"{flag}={cap}")
    for name in ("logprobs", "prompt_logprobs"):
        v = getattr(params, name)
        if v is not None and v > cfg.max_logprobs:
            raise ValueError(f"{name}={v} is invalid: exceeds the server limit "
                             f"--max-logprobs={cfg.max_logprobs}")
    if len(params.stop_strings) > cfg.max_stop_strings:
        raise ValueError(f"stop has {len(params.stop_strings)} strings, which is invalid: exceeds "
                         f"the server limit --max-stop-strings={cfg.max_stop_strings}")
    return params


def check_token_ids(field: str, ids, vocab_size: int | None) -> list[int]:
    ids = [int(t) for t in ids]
    if not ids:
        raise ValueError(f"{field}=[] is invalid: must contain at least 1 token")
    hi = vocab_size
    for t in ids:
        if t < 0 or (hi is not None and t >= hi):
            raise ValueError(f"{field} contains {t}, which is invalid: token ids must be in "
                             f"[0, {hi if hi is not None else 'vocab_size'})")
    return ids


def render_chat(tokenizer: Any, messages: list[dict], field: str = "messages", *,
                add_generation_prompt: bool = True, **template: Any) -> dict:
    """``{"prompt": text or None, "prompt_token_ids": ids}`` through the model's chat template,
    as ``LLM.chat`` renders it (``tokenizer.chat_prompt`` where the tokenizer has it).
    ``template``: ``chat_prompt``'s keywords (chat_template, tools, chat_template_kwargs,
    continue_final_message), passed only when set."""
    if not messages:
        raise ValueError(f"{field}=[] is invalid: must hold at least one message")
    for i, m in enumerate(messages):
        if not m.get("role"):
            raise ValueError(f"{field}[{i}].role='' is invalid: must be non-empty")
    try:
        if hasattr(tokenizer, "chat_prompt"):
            out = tokenizer.chat_prompt(messages, add_generation_prompt=add_generation_prompt, **template)
            return {"prompt": out.get("prompt"), "prompt_token_ids": [int(t) for t in out["prompt_token_ids"]]}
        if template:
            raise ValueError(f"{field} is invalid with {', '.join(sorted(template))}: this model's tokenizer "
                             f"renders only its own template")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except ValueError:
        raise
    except Exception as exc:  # jinja raise_exception etc.
        raise ValueError(f"{field} is invalid: the chat template failed: {exc}") from exc
    return {"prompt": None, "prompt_token_ids": [int(t) for t in ids]}


class ModelInfo:
    """What an adapter needs to know about the served model (read once the engine is built)."""

    __slots__ = ("engine", "tokenizer", "vocab_size", "max_model_len", "name", "lora", "generation")

    def __init__(self, engine: Any):
        self.lora = None  # the LoRA adapter the request chose (HTTP: by its model name)
        self.engine = engine
        # the model's generation config: defaults of the sampling fields a request leaves unset
        self.generation = getattr(engine, "generation_defaults", None) or NO_GENERATION_DEFAULTS
        self.tokenizer = getattr(engine, "tokenizer", None)
        self.vocab_size = getattr(engine, "vocab_size", None) or getattr(self.tokenizer, "vocab_size", None)
        self.max_model_len = config_get(engine, "max_model_len")
        self.name = str(config_get(engine, "model") or "")


def config_get(engine: Any, name: str):
    for holder in (getattr(engine, "config", None), getattr(engine, "engine_config", None), engine):
        if holder is not None and getattr(holder, name, None) is not None:
            return getattr(holder, name)
    return None


# ----- the door --------------------------------------------------------------------------
class Request:
    """One admitted request: ``await next_batch()`` returns the engine's new cumulative outputs
    ([] after the last), or raises FrontDoorError (engine died: INTERNAL; aborted by the
    drain: UNAVAILABLE)."""

    __slots__ = ("request_id", "params", "_stream", "finished", "arrival")

    def __init__(self, request_id: str, params: SamplingParams, stream: RequestStream):
        self.request_id = request_id
        self.params = params
        self._stream = stream
        self.finished = False
        self.arrival = time.monotonic()

    async def next_batch(self) -> list:
        try:
            batch = await self._stream.get_batch()
        except EngineDeadError as exc:
            raise FrontDoorError(Code.INTERNAL, dead_message(exc)) from exc
        except RequestAbortedError as exc:
            raise FrontDoorError(Code.UNAVAILABLE, str(exc)) from exc
        except RequestFailedError as exc:  # this request's host-side processing raised; the engine goes on
            if isinstance(exc.cause, LoRALoadError):  # its adapter failed to load (off-thread): bad input,
                raise invalid(str(exc.cause)) from exc  # as when add_request loaded it inline
            raise FrontDoorError(Code.INTERNAL, str(exc)) from exc
        if any(getattr(o, "finished", False) for o in batch):
            self.finished = True
        return batch


class FrontDoor:
    def __init__(self, config: ServerConfig, async_engine: AsyncEngine):
        self.config = config
        self.async_engine = async_engine
        self.active: dict[str, RequestStream | None] = {}  # request_id -> stream of admitted requests
        self.draining = False
        self.stopping = False
        self._idle = asyncio.Event()
        self.adapters = Adapters(async_engine)  # LoRA adapters by name (serving/adapters.py)

    # ----- gate --------------------------------------------------------------------------
    def refusal_reason(self) -> str | None:
        if self.draining or self.stopping:
            return "server is draining (shutting down): not accepting new requests"
        ae = self.async_engine
        if ae.dead is not None:
            return f"engine is not running: {type(ae.dead).__name__}: {ae.dead}"
        if not ae.ready:
            return "server is starting: the model is loading / compiling"
        age = ae.heartbeat_age()
        if age > self.config.watchdog_timeout:
            return (f"engine loop wedged: no progress for {age:.1f}s "
                    f"(watchdog {self.config.watchdog_timeout:g}s)")
        return None

    def model(self) -> ModelInfo:
        """The served model, if new work is accepted; else FrontDoorError(UNAVAILABLE)."""
        reason = self.refusal_reason()
        if reason is not None:
            raise FrontDoorError(Code.UNAVAILABLE, reason)
        return ModelInfo(self.async_engine.engine)

    def check_params(self, params: SamplingParams, info: ModelInfo, *,
                     max_tokens_set: bool = True) -> SamplingParams:
        try:
            return apply_caps(params, self.config, vocab_size=info.vocab_size,
                              max_model_len=info.max_model_len, max_tokens_set=max_tokens_set)
        except ValueError as exc:
            raise invalid(str(exc), _field_of(str(exc))) from None

    def check_request_id(self, rid: str) -> str:
        if len(rid) > self.config.max_request_id_len:
            raise invalid(f"request_id of length {len(rid)} is invalid: must be at most "
                          f"{self.config.max_request_id_len} characters", "request_id")
        if rid.startswith(PROBE_PREFIX):
            raise invalid(f"request_id={rid!r} is invalid: the prefix {PROBE_PREFIX!r} is reserved",
                          "request_id")
        return rid

    # ----- one request -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def request(self, request_id: str, prompt: Any, params: SamplingParams,
                      lora_request: Any = None, priority: int = 0,
                      fork_of: str | None = None, step_gate: bool = False) -> AsyncIterator[Request]:
        """Admit (queue limit, duplicate ids, the engine's own validation) and run one request
        (with ``lora_request``, an adapter from ``self.adapters.resolve``; None = the base model;
        ``priority``: vLLM's request priority, checked by the engine against its policy;
        ``fork_of``, ``step_gate``: LLMEngine.add_request's beam-search fork hint and step gate).

        Leaving the block before the final output aborts it in the engine (client cancel,
        disconnect, error alike); a finished request is only forgotten."""
        reason = self.refusal_reason()
        if reason is not None:
            raise FrontDoorError(Code.UNAVAILABLE, reason)
        ae = self.async_engine
        rid = request_id or uuid.uuid4().hex
        if rid in self.active or ae.has_request(rid):
            raise FrontDoorError(Code.ALREADY_EXISTS, f"request_id={rid!r} is invalid: already in flight",
                                 "request_id")
        waiting = ae.stats.num_waiting + ae.num_pending_adds
        limit = self.config.max_queued_requests
        if waiting >= limit:
            raise FrontDoorError(Code.RESOURCE_EXHAUSTED,
                                 f"server overloaded: {waiting} requests waiting "
                                 f"(--max-queued-requests={limit}); retry later")
        # registered before the first await, so a drain that starts now waits for (or aborts) it
        self.active[rid] = None
        owned = True
        req: Request | None = None
        try:
            try:
                stream = await ae.add_request(rid, prompt, params, lora_request, priority, fork_of,
                                              **({"step_gate": True} if step_gate else {}))
            except DuplicateRequestError as exc:  # another caller's request: not ours to abort
                owned = False
                raise FrontDoorError(Code.ALREADY_EXISTS, str(exc), "request_id") from None
            except ValueError as exc:
                raise invalid(str(exc), _field_of(str(exc))) from None
            except EngineDeadError as exc:
                raise FrontDoorError(Code.INTERNAL, dead_message(exc)) from None
            except RuntimeError as exc:
                raise FrontDoorError(Code.UNAVAILABLE, str(exc)) from None
            self.active[rid] = stream
            if self.config.enable_log_requests and not rid.startswith(PROBE_PREFIX):
                from serving.request_log import request_line

                log.info(request_line(rid, prompt, params, lora_request, self.config.max_log_len))
            req = Request(rid, params, stream)
            yield req
        finally:
            # reached on completion, error, client cancel, disconnect and deadline alike
            self.active.pop(rid, None)
            if owned:
                if req is not None and req.finished:
                    ae.release(rid)
                else:
                    ae.abort(rid)
            if not self.active:
                self._idle.set()

    async def embed(self, request_id: str, prompt: Any, params: Any, priority: int = 0) -> tuple[str, Any]:
        """One embedding request (``params`` a PoolingParams), admitted like ``request`` (``priority``
        too): (request id, its ``EmbeddingRequestOutput``)."""
        async with self.request(request_id, prompt, params, priority=priority) as req:
            while True:
                batch = await req.next_batch()
                if not batch:
                    break
                for out in batch:
                    if getattr(out, "finished", False):
                        return req.request_id, out
        raise FrontDoorError(Code.UNAVAILABLE, f"request_id={req.request_id!r} ended without an embedding")

    async def embed_many(self, request_id: str, prompts: list, params: Any, priority: int = 0) -> list:
        """Several prompts as one client request (OpenAI's ``input`` list): sub-requests
        ``f"{request_id}-{i}"`` admitted together so the scheduler batches them; the outputs in
        input order. All or nothing: the first error cancels (aborts) the others."""
        tasks = [asyncio.ensure_future(self.embed(f"{request_id}-{i}", p, params, priority))
                 for i, p in enumerate(prompts)]
        try:
            return [out for _, out in await asyncio.gather(*tasks)]
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def drop(self, request_id: str) -> None:
        """Abort one admitted request now (a stream whose client stopped reading); the caller's
        ``request`` block unwinds later."""
        self.active.pop(request_id, None)
        self.async_engine.abort(request_id)
        if not self.active:
            self._idle.set()

    # ----- drain ---------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        """Refuse new work; let in-flight requests run up to ``timeout`` s, then abort the rest
        (their callers get UNAVAILABLE) and give them 2 s to unwind."""
        self.draining = True
        if self.active:
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        left = list(self.active)
        if left:
            log.warning("serving: aborting %d requests still running after %.1fs", len(left), timeout)
            self.abort_all(f"server shutting down: request aborted after --shutdown-timeout={timeout:g}s")
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), 2.0)

    def abort_all(self, message: str) -> None:
        for rid in list(self.active):
            self.async_engine.abort(rid, RequestAbortedError(message))


def dead_message(exc: EngineDeadError) -> str:
    cause = exc.cause
    return f"engine step failed: {type(cause).__name__}: {cause}" if cause is not None else str(exc)


def _field_of(message: str) -> str | None:
    """The field a validation message names first (``'temperature=-1.0 is invalid'`` -> temperature)."""
    head = message.split(" ", 1)[0]
    for sep in ("=", "[", ":", "."):
        head = head.split(sep, 1)[0]
    return head if head.isidentifier() else None
