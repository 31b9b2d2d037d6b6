"""Embed, Score and Classify RPCs: proto <-> engine arguments (no jax). The servicer's ``Embed`` handler
admits the request through the front door like ``Generate`` (same gate, request-id rules, queue limit,
drain: ``FrontDoor.embed``); this module turns the message into what the engine takes and back. Score
and Classify run HTTP /v1/score's and /classify's own code (serving/openai_score.py,
serving/openai_classify.py) on the proto's fields."""

from __future__ import annotations

import json
import uuid
from typing import Any

from jaxllm.pooling_params import PoolingParams
from serving import convert
from serving.frontdoor import FrontDoorError, check_token_ids, invalid
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
    try:
        scores, tokens = await pair_scores(door, info, t1, t2, truncate, rid, client_chosen=False,
                                           template_kwargs=_template_kwargs(req.chat_template_kwargs_json))
    except FrontDoorError as exc:  # the score template's refusals name HTTP's field: name the proto's
        if exc.param == "chat_template_kwargs" and exc.message.startswith("chat_template_kwargs"):
            raise invalid("chat_template_kwargs_json" + exc.message[len("chat_template_kwargs"):],
                          "chat_template_kwargs_json") from None
        raise
    return pb.ScoreResponse(request_id=rid, scores=scores.tolist(), prompt_tokens=tokens)


def _template_kwargs(text: str) -> dict | None:
    """``ScoreRequest.chat_template_kwargs_json``: a JSON object's text ("" = none), HTTP's
    ``chat_template_kwargs``; INVALID_ARGUMENT naming the field otherwise."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise invalid(f"chat_template_kwargs_json is invalid: not JSON ({exc})", "chat_template_kwargs_json") \
            from None
    if not isinstance(value, dict):
        raise invalid(f"chat_template_kwargs_json is invalid: must be a JSON object, not {type(value).__name__}",
                      "chat_template_kwargs_json")
    return value


def classify_inputs(req: pb.ClassifyRequest, vocab_size: int | None, max_items: int) -> list:
    """A ClassifyRequest's inputs as the engine takes them: one of ``text``, ``token_ids`` (EmbedRequest's),
    ``texts`` or ``token_id_lists``; ValueError / INVALID_ARGUMENT naming the field, value and limit."""
    kinds = ([req.WhichOneof("prompt")] if req.WhichOneof("prompt") else []) + \
        [k for k in ("texts", "token_id_lists") if len(getattr(req, k))]
    if len(kinds) != 1:
        got = f" (got {' and '.join(kinds)})" if kinds else ""
        raise ValueError(f"prompt is invalid: set exactly one of text, token_ids, texts or token_id_lists{got}")
    kind = kinds[0]
    if kind in ("text", "token_ids"):
        return [convert.text_or_token_ids(req, kind, vocab_size)]
    from serving.openai_embed import check_item_count

    check_item_count(kind, len(getattr(req, kind)), max_items)
    if kind == "token_id_lists":
        return [{"prompt_token_ids": check_token_ids(f"token_id_lists[{i}]", t.ids, vocab_size)}
                for i, t in enumerate(req.token_id_lists)]
    for i, t in enumerate(req.texts):
        if t == "":
            raise ValueError(f"texts[{i}]='' is invalid: the prompt must be non-empty")
    return list(req.texts)


async def classify(door: Any, info: Any, req: pb.ClassifyRequest) -> pb.ClassifyResponse:
    """The Classify RPC: HTTP /classify's rules and answers (serving/openai_classify.py) for a proto's
    inputs; the engine's requests are ``<request_id>-<i>`` (as Score's), so a client id already in flight
    is ALREADY_EXISTS; unset: ``classify-<uuid>``."""
    from serving.openai_classify import check_classify_task, classify_prompts

    check_classify_task(info, "Classify")
    try:
        prompts = classify_inputs(req, info.vocab_size, door.config.max_queued_requests)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    rid = door.check_request_id(req.request_id) or f"classify-{uuid.uuid4().hex}"
    answers = await classify_prompts(
        door, info, prompts, req.truncate_prompt_tokens if req.HasField("truncate_prompt_tokens") else None,
        req.activation if req.HasField("activation") else None, rid, client_chosen=False)
    return pb.ClassifyResponse(
        request_id=rid, prompt_tokens=sum(a.prompt_tokens for a in answers),
        results=[pb.Classification(index=i, probs=a.probs, label_index=a.label_index, label=a.label,
                                   prompt_tokens=a.prompt_tokens) for i, a in enumerate(answers)])
