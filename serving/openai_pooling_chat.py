"""vLLM's chat-shaped pooling bodies (no jax): ``/v1/embeddings`` and ``/classify`` with ``messages``.

vLLM's ``EmbeddingRequest`` and ``ClassificationRequest`` are unions of a completion-shaped body
(``input``) and a chat-shaped one (``EmbeddingChatRequest`` / ``ClassificationChatRequest``:
``messages`` and its ``ChatRequestOptionsMixin``). The conversation is rendered by the chat template as
``/v1/chat/completions`` renders it (serving/openai_tools.render_body: the request's ``chat_template``
only with ``--trust-request-chat-template``, else ``--chat-template``, else the model's) and pooled as
one prompt: one ``data`` item. Their defaults differ from chat's: ``add_generation_prompt`` false (the
conversation as it stands is what is embedded), ``add_special_tokens`` false (the template writes
BOS etc.; true adds the tokenizer's on top). ``continue_final_message`` leaves the last message open;
with ``add_generation_prompt`` it is a 400. ``chat_template_kwargs`` are template variables (setting
one of the template's own arguments is a 400 naming it). ``media_io_kwargs`` and
``mm_processor_kwargs`` are ignored (text only: an image part is a 400 naming it, as on chat).

A body with both ``input`` and ``messages`` is read as the ``input`` body, as pydantic resolves vLLM's
union (its completion-shaped member comes first): the chat fields are then unused. Neither is a 400
naming ``input``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from serving.frontdoor import invalid
from serving.openai_compat import Body
from serving.openai_protocol import ChatMessage
from serving.openai_tools import render_body


class PoolingChatFields(Body):
    """vLLM's ``ChatRequestMixin`` on a pooling body (``input`` becomes optional beside it)."""
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = False  # vLLM's pooling default (chat's is true)
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    media_io_kwargs: dict[str, Any] | None = None  # ignored: text only
    add_special_tokens: bool | None = None  # None: true for input, false for messages (vLLM's defaults)

    def is_chat(self) -> bool:
        """True when the body is read as the chat-shaped one (``messages`` and no ``input``)."""
        if getattr(self, "input", None) is not None:
            return False
        if self.messages is None:
            raise invalid("input is required: send input (text or token ids) or messages (a conversation)",
                          "input")
        return True

    def special_tokens(self) -> bool:
        """``add_special_tokens`` with vLLM's per-form default."""
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return getattr(self, "input", None) is not None

    def chat_prompt(self, tokenizer: Any, cfg: Any) -> dict:
        """The conversation as one engine prompt (``{"prompt_token_ids": ids}``); 400 naming the field."""
        if self.continue_final_message and self.add_generation_prompt:  # vLLM refuses it at validation
            raise invalid("continue_final_message=True is invalid with add_generation_prompt=True: continue the "
                          "last message or start a new turn, not both", "continue_final_message")
        view = SimpleNamespace(messages=self.messages, chat_template=self.chat_template, tools=None,
                               reasoning_effort=None, chat_template_kwargs=self.chat_template_kwargs,
                               documents=None, continue_final_message=self.continue_final_message,
                               add_generation_prompt=self.add_generation_prompt,
                               add_special_tokens=self.special_tokens())
        try:
            rendered = render_body(tokenizer, view, cfg)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        return {"prompt_token_ids": [int(t) for t in rendered["prompt_token_ids"]]}
