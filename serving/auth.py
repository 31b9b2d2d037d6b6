"""API-key interceptor: ``authorization: Bearer <key>`` (any of ``--api-key``'s keys,
serving/api_keys.py) on every RPC except grpc.health.v1."""

from __future__ import annotations

import grpc

from serving.api_keys import KeyRing

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: KeyRing, open_prefixes: tuple[str, ...] = OPEN_PREFIXES):
        self._keys = keys
        self._open = open_prefixes

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        got = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                got = value  # str, or bytes: KeyRing hashes the bytes as sent
                break
        handler = await continuation(handler_call_details)
        if self._keys.accepts(got):
            return handler
        if handler is None:
            return None
        msg = ("missing authorization metadata: send 'authorization: Bearer <api key>'" if not got
               else "invalid API key")
        return _deny(handler, msg)


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def abort_unary(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(abort_unary, **kw)
