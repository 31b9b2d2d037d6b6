"""Embed and Score RPCs: proto <-> engine arguments (no jax). The servicer's ``Embed`` handler admits the
request through the front door like ``Generate`` (same gate, request-id rules, queue limit,
drain: ``FrontDoor.embed``); this module turns the message into what the engine takes and back."""

from __future__ import annotations

import uuid
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
        truncate_prompt_tokens=req.truncate_prompt_tokens if req.HasField("truncate_prompt_tokens") else None,
        dimensions=req.dimensions if req.HasField("dimensions") else None)
    return prompt, params.validate()


def embed_response(rid: str, out: Any) -> pb.EmbedResponse:
    return pb.EmbedResponse(request_id=rid, embedding=out.outputs.embedding,
                            prompt_tokens=len(out.prompt_token_ids))


async def score(door: Any, info: Any, req: pb.ScoreRequest) -> pb.ScoreResponse:
    """The Score RPC: HTTP /v1/score's rules and scores (serving/openai_score.py: cosine of embeddings,
    or a cross-encoder's pair scores); the engine's
    requests are ``<request_id>-<i>``, so a client id already in flight is ALREADY_EXISTS."""
    from serving.openai_score import check_task, pair_scores, pair_texts

    check_task(info, "Score")
    t1, t2 = pair_texts("text_1", list(req.text_1), "text_2", list(req.text_2), door.config.max_queued_requests)
    rid = door.check_request_id(req.request_id) or f"score-{uuid.uuid4().hex}"
    truncate = req.truncate_prompt_tokens if req.HasField("truncate_prompt_tokens") else None
    scores, tokens = await pair_scores(door, info, t1, t2, truncate, rid, client_chosen=False)
    return pb.ScoreResponse(request_id=rid, scores=scores.tolist(), prompt_tokens=tokens)
