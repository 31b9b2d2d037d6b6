"""vLLM's extra fields of the pooling bodies: /v1/embeddings, /classify, /score, /rerank (no jax).

vLLM's ``PoolingBasicRequestMixin`` (and its classify / embed mixins) give every pooling body the same
extras; here each is honoured, accepted and ignored, or refused by name (serving/README.md's table):

- ``priority``: honoured, the engine's request priority (lower runs first under ``--scheduling-policy
  priority``; under fcfs a non-zero value is the engine's 400 naming it), as on the generation bodies;
- ``truncate_prompt_tokens=-1``: vLLM's "truncate to ``max_model_len``";
- ``truncation_side``: ``"left"`` (keep the last tokens: what truncation does) accepted, ``"right"`` refused;
- ``padding``: ``"do_not_pad"`` accepted, ``"max_length"`` refused (no fixed-length models here);
- ``use_activation``: vLLM's newer name of the embeddings' ``normalize`` and the classifier's
  ``activation`` (a cross-encoder's score: false = the raw logit); both names at different values: 400;
- ``mm_processor_kwargs``: ignored (text-only server);
- ``cache_salt``: checked as the generation bodies' (1-1024 characters) and ignored: pooling requests
  bypass the prefix cache (jaxllm/core/kv_cache_manager.py), so no namespace can change what they see.
"""

from __future__ import annotations

from typing import Any

from serving.frontdoor import invalid
from serving.openai_compat import Body


class PoolingFields(Body):
    """The extras every pooling body shares (vLLM's ``PoolingBasicRequestMixin`` + ``use_activation``)."""
    priority: int = 0
    truncation_side: str | None = None
    padding: str | None = None
    use_activation: bool | None = None
    mm_processor_kwargs: dict[str, Any] | None = None  # ignored: text only
    cache_salt: str | None = None  # ignored: pooling bypasses the prefix cache

    def check_pooling_fields(self) -> None:
        """400 naming the first field this server cannot honour (value and why)."""
        side = self.truncation_side
        if side not in (None, "left", "right"):
            raise invalid(f"truncation_side={side!r} is invalid: must be 'left' or 'right'", "truncation_side")
        if side == "right":
            raise invalid("truncation_side='right' is not supported by this server: truncate_prompt_tokens keeps "
                          "the prompt's last tokens ('left')", "truncation_side")
        if self.padding not in (None, "do_not_pad", "max_length"):
            raise invalid(f"padding={self.padding!r} is invalid: must be 'max_length' or 'do_not_pad'", "padding")
        if self.padding == "max_length":
            raise invalid("padding='max_length' is not supported by this server: prompts run unpadded "
                          "('do_not_pad')", "padding")
        salt = self.cache_salt
        if salt is not None and not 1 <= len(salt) <= 1024:
            raise invalid(f"cache_salt of {len(salt)} characters is invalid: must hold 1 to 1024", "cache_salt")

    def activation_flag(self, name: str, value: bool | None) -> bool | None:
        """The older field ``name`` (``normalize`` / ``activation``) merged with ``use_activation``."""
        new = self.use_activation
        if value is not None and new is not None and value != new:
            raise invalid(f"{name}={value} and use_activation={new} disagree: send one of them "
                          f"(use_activation is vLLM's newer name of {name})", "use_activation")
        return value if value is not None else new

    def truncation(self, max_model_len: int) -> int | None:
        """``truncate_prompt_tokens`` with vLLM's -1 read as ``max_model_len``."""
        k = getattr(self, "truncate_prompt_tokens", None)
        return max_model_len if k == -1 else k


def text_prompts(items: list, tokenizer: Any, add_special_tokens: bool) -> list:
    """vLLM's ``add_special_tokens=false`` on the text items: each tokenized without BOS etc. (token-id
    items and the default pass unchanged; the engine's own tokenization adds them)."""
    if add_special_tokens:
        return items
    return [{"prompt_token_ids": list(tokenizer.encode(p, add_special_tokens=False))} if isinstance(p, str) else p
            for p in items]
