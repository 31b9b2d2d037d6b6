"""Embed RPC: proto <-> engine arguments (no jax). The servicer's ``Embed`` handler admits the
request like ``Generate`` (same gate, request-id rules, queue limit, drain) and awaits
``AsyncEngine.embed``; this module turns the message into what the engine takes and back."""

from __future__ import annotations

import asyncio
from typing import Any

from jaxllm.pooling_params import PoolingParams
from serving import convert
from serving.health import PROBE_PREFIX
from serving.proto.jaxllm.v1 import generation_pb2 as pb


def check_request_id(rid: str, max_len: int) -> None:
    if len(rid) > max_len:
        raise ValueError(f"request_id of length {len(rid)} is invalid: must be at most {max_len} characters")
    if rid.startswith(PROBE_PREFIX):
        raise ValueError(f"request_id={rid!r} is invalid: the prefix {PROBE_PREFIX!r} is reserved")


def embed_request_to_engine(req: pb.EmbedRequest, vocab_size: int | None) -> tuple[Any, PoolingParams]:
    """(prompt for ``engine.add_request``, PoolingParams); ValueError naming the field."""
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt is invalid: set one of text or token_ids")
    if kind == "text":
        if req.text == "":
            raise ValueError("text='' is invalid: the prompt must be non-empty")
        prompt: Any = req.text
    else:
        prompt = {"prompt_token_ids": convert.check_token_ids("token_ids", req.token_ids.ids, vocab_size)}
    params = PoolingParams(
        pooling_type=req.pooling_type if req.HasField("pooling_type") else None,
        normalize=req.normalize if req.HasField("normalize") else None,
        truncate_prompt_tokens=req.truncate_prompt_tokens if req.HasField("truncate_prompt_tokens") else None)
    return prompt, params.validate()


def embed_response(rid: str, out: Any) -> pb.EmbedResponse:
    return pb.EmbedResponse(request_id=rid, embedding=out.outputs.embedding,
                            prompt_tokens=len(out.prompt_token_ids))


async def embed_many(ae: Any, request_id: str, prompts: list, params: PoolingParams | None = None) -> list:
    """Embed several prompts as one client request (OpenAI's ``input`` list): sub-requests
    ``f"{request_id}-{i}"`` submitted together, so the scheduler batches them; the outputs in input
    order. All or nothing: the first error (a ValueError naming the field for bad input) cancels
    the others, whose requests are aborted (``AsyncEngine.embed`` aborts on cancel)."""
    tasks = [asyncio.ensure_future(ae.embed(f"{request_id}-{i}", p, params)) for i, p in enumerate(prompts)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
