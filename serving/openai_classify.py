"""vLLM's classification API, ``POST /classify`` = ``/v1/classify``, over the front door (no jax).

A ``--task classify`` server (a *ForSequenceClassification checkpoint: a classifier, a reward model,
a cross-encoder) answers ``{"input": str | [str] | [ids] | [[ids]], "model"?, "truncate_prompt_tokens"?,
"activation"?, "request_id"?, "user"?}``: every input is one engine request (``f"{id}-{i}"``), admitted
together so the scheduler batches them, all or nothing (``FrontDoor.embed_many``, as /v1/embeddings).
The answer, vLLM's ``ClassificationResponse``: ``{"id": "classify-<id>", "object": "list", "created",
"model", "data": [{"index", "label", "probs", "num_classes"}], "usage": {"prompt_tokens",
"total_tokens", "completion_tokens": 0, "prompt_tokens_details": null}}``: ``probs`` the model's
activation of the logits (softmax; sigmoid for one label; ``activation: false``: the raw logits),
``label`` the ``id2label`` name of the largest. Any other server refuses with 400 naming ``model``.
The gRPC ``Classify`` rpc (serving/embed.py) runs the same checks and ``classify_prompts``. vLLM's
pooling extras (``use_activation`` = ``activation``, ``priority``, ``add_special_tokens``, ...):
serving/openai_pooling_fields.py.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import numpy as np
from fastapi import Request

from jaxllm.pooling_params import PoolingParams
from serving.frontdoor import FrontDoor, ModelInfo, invalid
from serving.openai_embed import pooling_prompts
from serving.openai_pooling_chat import PoolingChatFields
from serving.openai_pooling_fields import PoolingFields
from serving.request_ids import engine_prefix


class ClassificationRequest(PoolingFields, PoolingChatFields):
    input: str | list[str] | list[int] | list[list[int]] | None = None  # or messages (openai_pooling_chat)
    model: str | None = None
    truncate_prompt_tokens: int | None = None
    activation: bool | None = None  # vLLM's older name of use_activation: False = the raw logits
    request_id: str | None = None  # names the answer (serving/request_ids.py; the X-Request-Id header wins)
    user: str | None = None  # accepted, unused


@dataclasses.dataclass(frozen=True)
class Classified:
    """One input's answer, whichever door asked: ``probs`` (the activation of the labels' logits, or
    the raw logits), the index of the largest, its ``id2label`` name (None without labels), the tokens run."""

    probs: list[float]
    label_index: int
    label: str | None
    prompt_tokens: int


def check_classify_task(info: ModelInfo, path: str) -> None:
    """INVALID_ARGUMENT naming ``model`` (and the server's task) unless this is a classify server."""
    task = getattr(info.engine, "task", "generate")
    if task != "classify":
        raise invalid(f"model={info.name!r} is invalid for {path}: this server's task is {task!r} (classify "
                      f"needs a *ForSequenceClassification model: start it with --task classify)", "model")


async def classify_prompts(door: FrontDoor, info: ModelInfo, prompts: list, truncate_prompt_tokens: int | None,
                           activation: bool | None, answer_id: str, client_chosen: bool,
                           priority: int = 0) -> list[Classified]:
    """Every prompt one engine request named after ``answer_id`` (``engine_prefix``), admitted as one
    batch (all or nothing) at ``priority``; the answers in input order. HTTP /classify and the gRPC
    Classify rpc."""
    try:
        params = PoolingParams(truncate_prompt_tokens=truncate_prompt_tokens, activation=activation).validate()
    except ValueError as exc:
        raise invalid(str(exc)) from None
    outs = await door.embed_many(engine_prefix(answer_id, client_chosen), prompts, params, priority)
    labels = info.engine.runner.model_config.labels
    answers = []
    for out in outs:
        probs = out.outputs.probs
        best = int(np.argmax(probs))
        answers.append(Classified(probs, best, labels[best] if labels else None, len(out.prompt_token_ids)))
    return answers


async def create_classify(door: FrontDoor, info: ModelInfo, body: ClassificationRequest, path: str,
                          request_id: str | None = None) -> dict:
    """``request_id``: the client's (checked by the caller), None = a fresh uuid."""
    check_classify_task(info, path)
    body.check_pooling_fields()
    prompts = pooling_prompts(door, info, body)
    answer_id = "classify-" + (request_id or uuid.uuid4().hex)
    answers = await classify_prompts(door, info, prompts, body.truncation(info.max_model_len),
                                     body.activation_flag("activation", body.activation), answer_id,
                                     request_id is not None, body.priority)
    data = [{"index": i, "label": a.label, "probs": a.probs, "num_classes": len(a.probs)}
            for i, a in enumerate(answers)]
    tokens = sum(a.prompt_tokens for a in answers)
    return {"id": answer_id, "object": "list", "created": int(time.time()), "model": info.name, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}


def add_classify_routes(app, door: FrontDoor, model_of, client_id) -> None:
    """vLLM's /classify and its /v1 alias (``model_of`` / ``client_id``: serving/openai_api.py's rules)."""

    async def classify(body: ClassificationRequest, request: Request):
        rid = client_id(request, body)
        return await create_classify(door, model_of(body.model, adapters=False), body, request.url.path, rid)

    for path in ("/classify", "/v1/classify"):
        app.add_api_route(path, classify, methods=["POST"])
