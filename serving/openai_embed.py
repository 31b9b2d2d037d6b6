"""``POST /v1/embeddings``: OpenAI's embeddings API over the front door (no jax).

``input`` is a string, a list of strings, a list of token ids or a list of token-id lists; every
item is one engine request (``f"{id}-{i}"``), admitted together so the scheduler batches them,
all or nothing (``FrontDoor.embed_many``). vLLM's extra fields: ``truncate_prompt_tokens``,
``normalize``, ``pooling_type``, ``request_id`` (the answer's ``id`` is ``embd-<id>``, the
``X-Request-Id`` header winning as on the other endpoints: serving/request_ids.py; with neither a
random uuid). ``encoding_format="base64"`` returns the values' bytes base64-encoded: float32 by
default (what OpenAI's client expects), vLLM's ``embed_dtype`` ``float16`` / ``bfloat16`` (float32
rounded to nearest even, as torch converts) in vLLM's ``endianness`` (``native``, the default, =
the host's; ``little``, ``big``); fp8 dtypes and ``encoding_format="bytes"`` (vLLM's binary answer)
are a 400 naming the field; with ``"float"`` both are unused. vLLM's pooling extras (``priority``,
``use_activation`` = ``normalize``, ``add_special_tokens``, ...): serving/openai_pooling_fields.py.
A server that generates refuses with 400
naming ``model`` (start it with ``--task embed``). ``dimensions`` (vLLM's Matryoshka truncation:
the first d values, normalised after the cut) only for a Matryoshka model (the engine's
``is_matryoshka`` / ``matryoshka_dimensions``), else 400 naming ``dimensions``.
"""

from __future__ import annotations

import base64
import sys
import time
import uuid
from typing import Literal

import numpy as np

from jaxllm.pooling_params import PoolingParams
from serving.frontdoor import FrontDoor, ModelInfo, check_token_ids, invalid
from serving.openai_pooling_chat import PoolingChatFields
from serving.openai_pooling_fields import PoolingFields, text_prompts
from serving.request_ids import engine_prefix

EMBED_DTYPES = ("float32", "float16", "bfloat16")  # vLLM's also has fp8_e4m3 / fp8_e5m2: refused


class EmbeddingRequest(PoolingFields, PoolingChatFields):
    input: str | list[str] | list[int] | list[list[int]] | None = None  # or messages (openai_pooling_chat)
    model: str | None = None
    encoding_format: Literal["float", "base64", "bytes"] = "float"
    dimensions: int | None = None
    user: str | None = None  # accepted, unused
    # vLLM's extra fields
    truncate_prompt_tokens: int | None = None
    normalize: bool | None = None  # vLLM's older name of use_activation
    pooling_type: str | None = None
    request_id: str | None = None  # vLLM's: names the answer (serving/request_ids.py)
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"


def encode_base64(vec, embed_dtype: str, endianness: str) -> str:
    """One embedding as vLLM's base64 answer: its values as ``embed_dtype`` in ``endianness`` byte order."""
    order = {"little": "<", "big": ">", "native": "<" if sys.byteorder == "little" else ">"}[endianness]
    x = np.asarray(vec, dtype=np.float32)
    if embed_dtype == "bfloat16":  # the upper 16 bits of float32, rounded to nearest even
        u = x.view(np.uint32).astype(np.uint64)
        raw = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(order + "u2")
    else:
        raw = x.astype(order + ("f4" if embed_dtype == "float32" else "f2"))
    return base64.b64encode(raw.tobytes()).decode("ascii")


def check_item_count(field: str, n: int, max_items: int) -> None:
    """One client request's inputs are that many engine requests at once: at most the waiting queue."""
    if n > max_items:
        raise invalid(f"{field} has {n} items, which is invalid: exceeds the server limit "
                      f"--max-queued-requests={max_items}", field)


def _prompts(body: EmbeddingRequest, vocab_size: int | None, max_items: int) -> list:
    inp = body.input
    if isinstance(inp, str):
        items: list = [inp]
    elif not inp:
        raise invalid("input=[] is invalid: must hold at least one string or token id", "input")
    elif isinstance(inp[0], int):
        items = [{"prompt_token_ids": check_token_ids("input", inp, vocab_size)}]
    elif isinstance(inp[0], str):
        items = list(inp)
    else:
        items = [{"prompt_token_ids": check_token_ids(f"input[{i}]", ids, vocab_size)}
                 for i, ids in enumerate(inp)]
    check_item_count("input", len(items), max_items)
    for i, p in enumerate(items):
        if p == "":
            raise invalid(f"input[{i}]='' is invalid: the prompt must be non-empty", "input")
    return items


def pooling_prompts(door: FrontDoor, info: ModelInfo, body) -> list:
    """An embeddings / classify body's engine prompts: vLLM's chat-shaped body (``messages``) rendered as
    one prompt, else ``input``'s items (strings tokenized with the body's special-token choice)."""
    if body.is_chat():
        return [body.chat_prompt(info.tokenizer, door.config)]
    try:
        prompts = _prompts(body, info.vocab_size, door.config.max_queued_requests)
    except ValueError as exc:
        raise invalid(str(exc), "input") from None
    return text_prompts(prompts, info.tokenizer, body.special_tokens())


async def create_embeddings(door: FrontDoor, info: ModelInfo, body: EmbeddingRequest,
                            request_id: str | None = None) -> dict:
    """``request_id``: the client's (checked by the caller), None = a fresh uuid."""
    task = getattr(info.engine, "task", "generate")
    if task != "embed":
        raise invalid(f"model={info.name!r} is invalid for /v1/embeddings: this server's task is "
                      f"{task!r} (start it with --task embed)", "model")
    body.check_pooling_fields()
    if body.encoding_format == "bytes":
        raise invalid("encoding_format='bytes' is not supported by this server: use 'base64' (the same bytes, "
                      "base64-encoded) or 'float'", "encoding_format")
    if body.encoding_format == "base64" and body.embed_dtype not in EMBED_DTYPES:
        raise invalid(f"embed_dtype={body.embed_dtype!r} is not supported by this server: use one of "
                      f"{', '.join(EMBED_DTYPES)}", "embed_dtype")
    prompts = pooling_prompts(door, info, body)
    try:
        normalize = body.activation_flag("normalize", body.normalize)
        params = PoolingParams(pooling_type=body.pooling_type, normalize=normalize,
                               truncate_prompt_tokens=body.truncation(info.max_model_len),
                               dimensions=body.dimensions).validate()
    except ValueError as exc:
        raise invalid(str(exc)) from None
    answer_id = "embd-" + (request_id or uuid.uuid4().hex)
    # the engine's requests: f"{prefix}-{i}", unique even when two clients send one id
    outs = await door.embed_many(engine_prefix(answer_id, request_id is not None), prompts, params, body.priority)
    data = []
    for i, out in enumerate(outs):
        vec = out.outputs.embedding
        if body.encoding_format == "base64":
            vec = encode_base64(vec, body.embed_dtype, body.endianness)
        data.append({"object": "embedding", "index": i, "embedding": vec})
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    return {"id": answer_id, "object": "list", "created": int(time.time()), "data": data, "model": info.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
