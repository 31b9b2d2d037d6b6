"""Embed RPC: proto <-> engine arguments (no jax). The servicer's ``Embed`` handler admits the
request through the front door like ``Generate`` (same gate, request-id rules, queue limit,
drain: ``FrontDoor.embed``); this module turns the message into what the engine takes and back."""

from __future__ import annotations

from typing import Any

from jaxllm.pooling_params import PoolingParams
from serving import convert
from serving.proto.jaxllm.v1 import generation_pb2 as pb


def embed_request_to_engine(req: pb.EmbedRequest, vocab_size: int | None) -> tuple[Any, PoolingParams]:
    """(prompt for ``engine.add_request``, PoolingParams); ValueError naming the field."""
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt is invalid: set one of text or token_ids")
    prompt = convert.text_or_token_ids(req, kind, vocab_size)
    params = PoolingParams(
        pooling_type=req.pooling_type if req.HasField("pooling_type") else None,
        normalize=req.normalize if req.HasField("normalize") else None,
        truncate_prompt_tokens=req.truncate_prompt_tokens if req.HasField("truncate_prompt_tokens") else None)
    return prompt, params.validate()


def embed_response(rid: str, out: Any) -> pb.EmbedResponse:
    return pb.EmbedResponse(request_id=rid, embedding=out.outputs.embedding,
                            prompt_tokens=len(out.prompt_token_ids))
