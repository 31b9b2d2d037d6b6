"""vLLM's score and rerank APIs for an embedding model or a cross-encoder over the front door (no jax).

``POST /score`` = ``/v1/score`` (vLLM's ``ScoreRequest``): ``text_1`` and ``text_2``, each a string
or a list of strings, paired 1:1, 1:N (``text_1`` one text, scored against each of ``text_2``) or
N:N (element-wise); anything else is a 400. vLLM's other names of the pair are taken too, in its
precedence when a body holds several: ``queries`` + ``documents``, then ``queries`` + ``items``, then
``data_1`` + ``data_2``, then ``text_1`` + ``text_2`` (``PAIR_NAMES``); errors name the pair's fields.
The answer: ``{"id": "score-<id>", "object": "list", "created", "model", "data": [{"index", "object":
"score", "score"}], "usage"}``, ``data`` in the second side's order.

``POST /rerank`` = ``/v1/rerank`` = ``/v2/rerank`` (vLLM's Jina/Cohere-shaped ``RerankRequest``):
``query`` against each of ``documents``; ``results`` sorted by ``relevance_score``, highest first
(ties: the lower index first), the best ``top_n`` (0, the default, or more than there are: all;
negative: a 400). Each result is ``{"index", "relevance_score", "document": {"text"}}``;
``return_documents=false`` (Jina's and Cohere's field; vLLM always returns them) leaves
``document`` out. The answer: ``{"id": "rerank-<id>", "model", "usage", "results"}``.

For an embedding model vLLM scores a pair by the cosine similarity of the two embeddings; so here:
every input (``text_1``'s, then ``text_2``'s; a 1:N query once) is one engine embedding
request, admitted together so the scheduler batches them (``FrontDoor.embed_many``, all or
nothing), pooled as the server is configured, and the cosine is taken in float64 on the host.
``usage.prompt_tokens`` counts the tokens the engine embedded, each input once (vLLM counts a 1:N
query once per pair, plus a padding token).

For a cross-encoder (a ``--task classify`` server whose model has ``num_labels == 1``: a reranker),
each pair is one engine request: the tokenizer's pair encoding ``tokenizer(text_1, text_2)``
(``truncate_prompt_tokens`` keeping its last k tokens), classified with its raw logit, the score the
model's score activation of it (sigmoid; jaxllm/scoring.py), ``usage.prompt_tokens`` the pairs' tokens.
A server started with ``--chat-template`` (vLLM's score template) encodes each pair as the template's
rendering of ``[{"role": "query", "content": text_1}, {"role": "document", "content": text_2}]``
tokenized as one text instead (``scoring.ScoreTemplate``; /score, /rerank, run_batch and the gRPC Score
rpc alike); a body's ``chat_template_kwargs`` (a jaxllm extension: vLLM's ScoreRequest and
RerankRequest have no such field) adds template variables such as an ``instruction``. A template that
fails to render or renders blank is a 400 naming ``--chat-template`` and the reason;
``chat_template_kwargs`` without a template is a 400 naming it. An embedding server ignores both
(vLLM's rule for the template: each text is embedded alone).
vLLM's pooling extras (serving/openai_pooling_fields.py): ``use_activation=false`` scores a
cross-encoder's pair by its raw logit (no sigmoid); on an embedding server it changes nothing (the
cosine ignores the normalisation); ``priority`` is the engine requests'.
A classifier with more labels is a 400 naming ``model`` (vLLM refuses score for it too), and so is a
generating server (score needs an embedding or cross-encoder model). Request ids
as /v1/embeddings (serving/request_ids.py): the ``X-Request-Id`` header, then the body's
``request_id``, else a random uuid.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from fastapi import Request

from jaxllm import scoring
from jaxllm.pooling_params import PoolingParams
from serving.frontdoor import FrontDoor, ModelInfo, invalid
from serving.openai_pooling_fields import PoolingFields
from serving.request_ids import engine_prefix


# vLLM's ScoreRequest is a union of four bodies, one pair each; pydantic takes the first that validates,
# so a body with two whole pairs is read by the first of these (the other pair's fields go unused)
PAIR_NAMES = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class ScoreRequest(PoolingFields):
    text_1: str | list[str] | None = None
    text_2: str | list[str] | None = None
    data_1: str | list[str] | None = None  # vLLM's other pair names (PAIR_NAMES)
    data_2: str | list[str] | None = None
    queries: str | list[str] | None = None
    documents: str | list[str] | None = None
    items: str | list[str] | None = None
    model: str | None = None
    truncate_prompt_tokens: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # the score template's variables (jaxllm extension)
    request_id: str | None = None  # as /v1/embeddings' (the X-Request-Id header wins)
    user: str | None = None  # accepted, unused


    def pair(self) -> tuple[str, Any, str, Any]:
        """(name, value) of the two sides, by vLLM's precedence (PAIR_NAMES); a 400 naming the missing
        side when no pair is whole."""
        for a, b in PAIR_NAMES:
            if getattr(self, a) is not None and getattr(self, b) is not None:
                return a, getattr(self, a), b, getattr(self, b)
        order = (PAIR_NAMES[3], PAIR_NAMES[2], PAIR_NAMES[0], PAIR_NAMES[1])  # text_1 alone: text_2 is missing
        given = [n for n in dict.fromkeys(n for names in order for n in names) if getattr(self, n) is not None]
        half = next(((a, b) for a, b in order if a in given or b in given), PAIR_NAMES[3])
        missing = half[1] if half[0] in given else half[0]
        pairs = ", ".join(f"{a} + {b}" for a, b in reversed(PAIR_NAMES))
        raise invalid(f"{missing} is required: a score body holds one pair ({pairs})"
                      + (f"; got only {' and '.join(given)}" if given else ""), missing)


class RerankRequest(PoolingFields):
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int = 0  # vLLM's default: every document
    return_documents: bool = True
    truncate_prompt_tokens: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    request_id: str | None = None
    user: str | None = None


def _texts(name: str, value: str | list[str]) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise invalid(f"{name}=[] is invalid: must hold at least one text", name)
    for i, t in enumerate(items):
        if t == "":
            where = name if isinstance(value, str) else f"{name}[{i}]"
            raise invalid(f"{where}='' is invalid: the text must be non-empty", name)
    return items


def pair_texts(name_1: str, value_1, name_2: str, value_2, max_items: int) -> tuple[list[str], list[str]]:
    """vLLM's pairing rules (1:1, 1:N, N:N), the server's item limit; 400 naming the field."""
    t1, t2 = _texts(name_1, value_1), _texts(name_2, value_2)
    try:
        scoring.pair_lists(t1, t2, name_1, name_2)  # the offline API's pairing rule (LLM.score)
    except ValueError as exc:
        raise invalid(str(exc), name_2) from None
    if len(t1) + len(t2) > max_items:
        raise invalid(f"{name_1} and {name_2} hold {len(t1) + len(t2)} texts, which is invalid: exceeds "
                      f"the server limit --max-queued-requests={max_items}", name_2)
    return t1, t2


async def pair_scores(door: FrontDoor, info: ModelInfo, t1: list[str], t2: list[str], truncate: int | None,
                      answer_id: str, client_chosen: bool, template_kwargs: dict | None = None,
                      activation: bool | None = None, priority: int = 0) -> tuple[np.ndarray, int]:
    """(score of each pair [len(t2)] f64, prompt tokens the engine ran), its requests named after
    ``answer_id`` (``engine_prefix``) and admitted as one batch at ``priority``: a cross-encoder's pair
    encodings (or the server's score template's renderings, with ``template_kwargs``; ``activation=False``:
    the raw logits), or ``t1 + t2`` embedded and their cosine."""
    try:
        params = PoolingParams(truncate_prompt_tokens=truncate).validate()
    except ValueError as exc:
        raise invalid(str(exc), "truncate_prompt_tokens") from None
    prefix = engine_prefix(answer_id, client_chosen)
    if getattr(info.engine, "task", "generate") == "classify":
        mc = info.engine.runner.model_config
        try:
            template = scoring.score_template(door.config.chat_template, "--chat-template", template_kwargs)
            ids = scoring.pair_prompts(info.tokenizer, t1, t2, truncate, getattr(mc, "use_sep_token", True), template)
        except scoring.ScoreTemplateError as exc:  # names --chat-template or chat_template_kwargs
            raise invalid(str(exc)) from None
        except ValueError as exc:
            raise invalid(str(exc), "text_1") from None
        outs = await door.embed_many(prefix, [{"prompt_token_ids": i} for i in ids], PoolingParams(activation=False),
                                     priority)
        logits = [o.outputs.probs for o in outs]  # [n, 1] raw
        scores = np.asarray(logits, dtype=np.float64)[:, 0] if activation is False else \
            scoring.cross_encoder_scores(logits, mc)
        return scores, sum(len(i) for i in ids)
    outs = await door.embed_many(prefix, t1 + t2, params, priority)
    vecs = np.asarray([o.outputs.embedding for o in outs], dtype=np.float64)  # [n1 + n2, E]
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    return scoring.cosine_scores(vecs[:len(t1)], vecs[len(t1):]), tokens


def check_task(info: ModelInfo, path: str) -> None:
    task = getattr(info.engine, "task", "generate")
    if task == "classify":
        try:
            scoring.check_cross_encoder(info.engine.runner.model_config, path)
        except ValueError as exc:
            raise invalid(f"model={info.name!r}: {exc}", "model") from None
    elif task != "embed":
        raise invalid(f"model={info.name!r} is invalid for {path}: this server's task is {task!r} "
                      "(scoring needs an embedding model or a cross-encoder: --task embed or classify)", "model")


async def create_score(door: FrontDoor, info: ModelInfo, body: ScoreRequest, path: str,
                       request_id: str | None = None) -> dict:
    """``request_id``: the client's (checked by the caller), None = a fresh uuid."""
    check_task(info, path)
    body.check_pooling_fields()
    t1, t2 = pair_texts(*body.pair(), door.config.max_queued_requests)
    answer_id = "score-" + (request_id or uuid.uuid4().hex)
    scores, tokens = await pair_scores(door, info, t1, t2, body.truncation(info.max_model_len), answer_id,
                                       request_id is not None, body.chat_template_kwargs, body.use_activation,
                                       body.priority)
    data = [{"index": i, "object": "score", "score": float(s)} for i, s in enumerate(scores)]
    return {"id": answer_id, "object": "list", "created": int(time.time()), "model": info.name, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


async def create_rerank(door: FrontDoor, info: ModelInfo, body: RerankRequest, path: str,
                        request_id: str | None = None) -> dict:
    check_task(info, path)
    body.check_pooling_fields()
    if body.top_n < 0:
        raise invalid(f"top_n={body.top_n} is invalid: must be >= 0 (0: every document)", "top_n")
    t1, t2 = pair_texts("query", body.query, "documents", body.documents, door.config.max_queued_requests)
    answer_id = "rerank-" + (request_id or uuid.uuid4().hex)
    scores, tokens = await pair_scores(door, info, t1, t2, body.truncation(info.max_model_len), answer_id,
                                       request_id is not None, body.chat_template_kwargs, body.use_activation,
                                       body.priority)
    order = sorted(range(len(t2)), key=lambda i: -scores[i])  # stable: ties keep the lower index first
    if 0 < body.top_n < len(order):
        order = order[:body.top_n]
    results = []
    for i in order:
        r = {"index": i, "relevance_score": float(scores[i])}
        if body.return_documents:
            r["document"] = {"text": t2[i]}
        results.append(r)
    return {"id": answer_id, "model": info.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": results}


def add_score_routes(app, door: FrontDoor, model_of, client_id) -> None:
    """vLLM's paths on the HTTP app: /score and /rerank, their /v1 aliases, and Cohere's /v2/rerank
    (``model_of`` / ``client_id``: serving/openai_api.py's model and request-id rules)."""

    async def score(body: ScoreRequest, request: Request):
        rid = client_id(request, body)
        return await create_score(door, model_of(body.model, adapters=False), body, request.url.path, rid)

    async def rerank(body: RerankRequest, request: Request):
        rid = client_id(request, body)
        return await create_rerank(door, model_of(body.model, adapters=False), body, request.url.path, rid)

    for path in ("/score", "/v1/score"):
        app.add_api_route(path, score, methods=["POST"])
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.add_api_route(path, rerank, methods=["POST"])
