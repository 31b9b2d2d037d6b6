"""vLLM's server-information endpoints of the HTTP door (no jax): ``GET /load`` and
``GET /tokenizer_info``.

``GET /load`` answers ``{"server_load": n}``: with ``--enable-server-load-tracking``, n is the
number of generation and pooling requests in flight (vLLM's ``load_aware_call`` routes that exist
here: completions, chat completions, responses, embeddings, score, rerank, classify), each counted
from the moment it passed the API key and body checks until the last byte of its answer is sent (a
stream counts until it ends or its client goes); without the flag it answers 0, as vLLM's does. It
needs no API key (vLLM lists it with /health among its public endpoints). A load balancer reads it
to send work to the least busy replica.

``GET /tokenizer_info`` (only with ``--enable-tokenizer-info-endpoint``; behind ``--api-key``)
answers vLLM's fields: the tokenizer's own configuration (transformers' ``init_kwargs``: special
tokens, ``model_max_length``, ``added_tokens_decoder``, its template...) without file paths
(``vocab_file``, ``merges_file``), special tokens as their text, plus ``tokenizer_class`` (the
transformers class name) and ``chat_template`` when the server was started with ``--chat-template``
(it replaces the tokenizer's own, as the server renders with it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serving.frontdoor import Code, FrontDoorError

if TYPE_CHECKING:
    from serving.server import ServingServer

# vLLM's counted routes that jaxllm serves (POST); vLLM's /pooling, /v1/messages and audio are not served
COUNTED_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings",
                           "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/classify",
                           "/v1/classify"})
_FILE_FIELDS = ("vocab_file", "merges_file")  # paths on the server's disk: vLLM leaves them out


class ServerLoad:
    """The in-flight count behind ``GET /load``: an ASGI wrapper around the routes (inside the key
    and body-size guard, so a refused request is never counted)."""

    def __init__(self, app, enabled: bool, route_path):
        self.app = app
        self.enabled = enabled
        self.route_path = route_path  # path -> the path the routes see (without --root-path)
        self.value = 0

    async def __call__(self, scope, receive, send):
        if not (self.enabled and scope["type"] == "http" and scope.get("method") == "POST"
                and self.route_path(scope.get("path", "")) in COUNTED_PATHS):
            return await self.app(scope, receive, send)
        self.value += 1
        try:
            await self.app(scope, receive, send)  # returns once the whole answer is sent (streams too)
        finally:
            self.value -= 1


def add_info_routes(app, server: "ServingServer", load: ServerLoad) -> None:
    cfg = server.config

    @app.get("/load")
    async def server_load():
        return {"server_load": load.value}

    if not cfg.enable_tokenizer_info_endpoint:
        return  # as vLLM: the path does not exist (404)

    @app.get("/tokenizer_info")
    async def get_tokenizer_info():
        tokenizer = server.door.model().tokenizer  # 503 while starting / draining
        if tokenizer is None:
            raise FrontDoorError(Code.NOT_FOUND, "GET /tokenizer_info: this server has no tokenizer")
        return tokenizer_info(tokenizer, cfg.chat_template)


def tokenizer_info(tokenizer: Any, chat_template: str | None) -> dict:
    """vLLM's /tokenizer_info answer for ``tokenizer`` (jaxllm's wrapper or a bare one)."""
    hf = getattr(tokenizer, "hf", tokenizer)  # jaxllm.tokenizer.Tokenizer wraps transformers' own
    info = {k: v for k, v in dict(getattr(hf, "init_kwargs", None) or {}).items() if k not in _FILE_FIELDS}
    info = _jsonable(info)
    info["tokenizer_class"] = type(hf).__name__
    if chat_template:
        info["chat_template"] = chat_template
    return info


def _jsonable(obj: Any) -> Any:
    """``obj`` as JSON: special tokens (transformers' AddedToken) as their text, dict keys as strings,
    anything else unknown as its str()."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "content") and isinstance(obj.content, str):
        return obj.content
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    return str(obj)
