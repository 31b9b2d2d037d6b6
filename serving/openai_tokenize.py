"""vLLM's ``POST /tokenize`` and ``POST /detokenize`` on the HTTP door (no jax).

/tokenize takes exactly one of ``prompt`` (``add_special_tokens`` unset = true, vLLM's default for a
prompt) or chat ``messages`` (rendered with the chat template as /v1/chat/completions would) and
answers ``count``, ``max_model_len``, ``tokens`` and ``token_strs`` (the vocabulary's strings, only
with ``return_token_strs``; else null, as vLLM). /detokenize checks the ids against the vocabulary
and answers the decoded ``prompt`` (special tokens skipped)."""
from __future__ import annotations

from typing import Any, Callable

from serving.frontdoor import check_token_ids, invalid
from serving.openai_protocol import DetokenizeRequest, TokenizeRequest
from serving.openai_tools import render_body


def add_tokenize_routes(app: Any, cfg: Any, model_of: Callable) -> None:
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        info = model_of(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise invalid("prompt/messages are invalid: set exactly one of them", "prompt")
        try:
            if body.messages is not None:
                ids = render_body(info.tokenizer, body, cfg)["prompt_token_ids"]
            else:
                special = body.add_special_tokens is not False  # unset: true for a prompt (vLLM's)
                ids = [int(t) for t in info.tokenizer.encode(body.prompt, add_special_tokens=special)]
        except ValueError as exc:
            raise invalid(str(exc), "messages" if body.messages is not None else "prompt") from None
        strs = token_strs(info.tokenizer, ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": info.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        info = model_of(body.model)
        try:
            ids = check_token_ids("tokens", body.tokens, info.vocab_size) if body.tokens else []
        except ValueError as exc:
            raise invalid(str(exc), "tokens") from None
        return {"prompt": info.tokenizer.decode(ids, skip_special_tokens=True)}


def token_strs(tokenizer: Any, ids: list[int]) -> list[str]:
    """The vocabulary strings of ``ids`` (``convert_ids_to_tokens``); a tokenizer without one
    (the fakes, token-ids-only models) answers each id's own text, special tokens kept."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is not None:
        return list(convert(ids))
    return [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
