"""Pydantic models of the OpenAI-compatible request bodies (no jax).

Strict types (``"5"`` is not an int, ``1`` is not a bool) and unknown fields refused, so a typo
such as ``max_tokenz`` is a 400 naming it rather than a silently ignored value. Ranges are left
to ``SamplingParams.validate`` and the front door's caps, whose messages name field, value and
limit the same way for every door. Besides OpenAI's fields, vLLM's extra sampling fields are
accepted (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``,
``ignore_eos``, ``skip_special_tokens``, ``include_stop_str_in_output``, ``prompt_logprobs``,
``bad_words``, ``use_beam_search``, ``length_penalty``, ``allowed_token_ids``, ``truncate_prompt_tokens``,
``return_tokens_as_token_ids``, ``return_token_ids``, ``cache_salt``), and vLLM's ``priority`` and
``request_id`` (the request's, not sampling fields). The structured-output fields are serving/openai_structured.py's; the vLLM / OpenAI
fields accepted and ignored, or refused by name, serving/openai_compat.py's (serving/README.md's table).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator
from pydantic_core import PydanticCustomError

from jaxllm.generation_config import NONE as NO_DEFAULTS, GenerationDefaults
from jaxllm.sampling_params import SamplingParams

from serving.openai_compat import Body, ChatCompatFields, CompatFields
from serving.openai_echo import echo_sampling_kwargs
from serving.openai_structured import ResponseFormat, StructuredFields, StructuredOutputsBody  # noqa: F401


_Body = Body
_NULL_IS_DEFAULT = ("n", "stream", "echo", "logprobs", "top_logprobs")


class StreamOptions(_Body):
    include_usage: bool | None = None  # None: as continuous_usage_stats (vLLM: true when stream_options is set)
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far


class _SamplingFields(StructuredFields, CompatFields):
    model: str | None = None  # None = the served model
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's shape) -> bias
    seed: int | None = None
    user: str | None = None  # accepted, unused
    # vLLM's extra body fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    prompt_logprobs: int | None = None  # top-k per prompt token (serving/openai_echo.py answers it)
    bad_words: list[str] | None = None  # words never generated (jaxllm/engine/bad_words.py)
    # vLLM's: lower runs first under --scheduling-policy priority; a non-zero value under fcfs is a 400
    priority: int = 0
    # vLLM's: the answer's id suffix (the X-Request-Id header wins; serving/request_ids.py)
    request_id: str | None = None
    # vLLM's beam search fields (serving/openai_beam.py): n is the beam width
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # vLLM's: keep the prompt's last k tokens (-1: max_model_len; serving/openai_generate.py)
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None  # vLLM's: sample only among these ids
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprob tokens as "token_id:<id>"
    return_token_ids: bool | None = None  # vLLM's: the prompt's and the choices' token ids in the answer
    # vLLM's: the prefix cache is shared only between requests with the same salt (KVCacheManager.block_key)
    cache_salt: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """vLLM's Optional fields with a default: JSON null means the default (clients send it)."""
        if isinstance(data, dict) and any(data.get(k, 0) is None for k in _NULL_IS_DEFAULT):
            data = {k: v for k, v in data.items() if not (k in _NULL_IS_DEFAULT and v is None)}
        return data

    def sampling_kwargs(self) -> dict[str, Any]:
        """The SamplingParams fields this body sets (unset = the model's generation config default, else
        SamplingParams')."""
        kw: dict[str, Any] = {}
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k",
                     "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos",
                     "skip_special_tokens", "include_stop_str_in_output", "stop", "prompt_logprobs",
                     "bad_words", "allowed_token_ids"):
            v = getattr(self, name)
            if v is not None:
                kw[name] = v
        kw["n"] = self.n
        if self.truncate_prompt_tokens not in (None, -1):  # -1: the job sets max_model_len
            kw["truncate_prompt_tokens"] = self.truncate_prompt_tokens
        so = self.structured()
        if so is not None:
            kw["structured_outputs"] = so
        if self.logit_bias is not None:
            bias = {}
            for key, val in self.logit_bias.items():
                try:
                    bias[int(key)] = val
                except ValueError:
                    raise ValueError(f"logit_bias key {key!r} is invalid: must be a token id") from None
            kw["logit_bias"] = bias
        return kw


COMPLETION_MAX_TOKENS = 16  # vLLM's CompletionRequest.max_tokens default (null too)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # top-k per generated token (legacy completions shape)
    echo: bool = False  # the prompt comes back before the completion (serving/openai_echo.py)
    suffix: str | None = None  # refused: no insertion models
    best_of: int | None = None  # only None or == n
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS etc. around a text prompt
    prompt_embeds: Any = None  # vLLM's: refused (serving/openai_generate.completion_job)

    def to_params(self, defaults: GenerationDefaults = NO_DEFAULTS) -> tuple[SamplingParams, bool]:
        """(params, whether the body set max_tokens); fields the body leaves unset take ``defaults``
        (the model's generation config), then SamplingParams' own. max_tokens unset is 16, vLLM's body
        default, so the generation config's max_new_tokens is no default here (vLLM's ``get_max_tokens``
        falls back to it only for chat); an operator's cap (``max_tokens_cap``) still lowers it."""
        kw = self.sampling_kwargs()
        kw["max_tokens"] = self.max_tokens if self.max_tokens is not None else COMPLETION_MAX_TOKENS
        if self.logprobs is not None:
            kw["logprobs"] = self.logprobs
        kw = echo_sampling_kwargs(defaults.fill(kw), echo=self.echo)
        return SamplingParams(**kw), self.max_tokens is not None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionDefinition(_Body):
    """A tool's function: ``name``, ``description``, ``parameters`` (its arguments' JSON schema)."""
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # accepted (the openai client's .stream() asks for it); schemas are always enforced


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    """``tool_choice={"type": "function", "function": {"name": ...}}``: call exactly this tool."""
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(_Body):
    name: str
    arguments: str | dict  # the JSON text (OpenAI); a dict is taken as it is


class MessageToolCall(_Body):
    """A call an earlier assistant turn made (``messages[i].tool_calls[j]``)."""
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # role "tool": the call this message answers
    # what the openai client sends back when an answer's message is appended as it is: accepted, unused
    refusal: str | None = None
    annotations: list | None = None
    audio: dict | None = None
    function_call: dict | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):  # an image part: one line naming it, not a union mismatch
        for j, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                raise PydanticCustomError("content_part", "content[{j}].type={kind} is not supported: only text "
                                          "parts (no image, audio or file inputs)", dict(j=j, kind=repr(kind)))
        return content

    def to_dict(self) -> dict:
        """The message as chat templates see it (tool call arguments stay text here; see
        serving/openai_tools.template_messages for the dict vLLM hands templates)."""
        c = self.content
        text = c if isinstance(c, str) else "".join(p.text for p in c or ())
        out: dict[str, Any] = {"role": self.role, "content": text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = [{"id": t.id, "type": t.type,
                                  "function": {"name": t.function.name, "arguments": t.function.arguments}}
                                 for t in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class _ChatTemplateFields(_Body):
    """vLLM's chat-template fields of /v1/chat/completions and /tokenize."""
    tools: list[Tool] | None = None
    chat_template: str | None = None  # a Jinja template for this request (needs --trust-request-chat-template)
    chat_template_kwargs: dict[str, Any] | None = None  # more template variables
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # vLLM's: the template's `documents` (RAG) and `reasoning_effort` variables (serving/openai_tools.render_body)
    documents: list[dict[str, str]] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None


class ChatCompletionRequest(_SamplingFields, ChatCompatFields, _ChatTemplateFields):
    messages: list[ChatMessage]
    # unset: "auto" with tools, else "none" (OpenAI's and vLLM's default)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None = true
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    echo: bool = False  # vLLM's extra: the answer starts with the last message when it is the assistant's
    include_reasoning: bool = True  # vLLM's extra: under --reasoning-parser, answer the reasoning too
    add_special_tokens: bool = False  # vLLM's: BOS etc. on top of what the chat template renders

    def to_params(self, default_max_tokens: int | None,
                  defaults: GenerationDefaults = NO_DEFAULTS) -> tuple[SamplingParams, bool]:
        """(params, whether the body set a limit); unset fields take ``defaults`` (the model's generation
        config); no limit there either = ``default_max_tokens`` (until max_model_len, as OpenAI and vLLM)."""
        kw = self.sampling_kwargs()
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if limit is not None:
            kw["max_tokens"] = limit
        if self.top_logprobs and not self.logprobs:  # 0 without logprobs: vLLM's default, accepted
            raise ValueError(f"top_logprobs={self.top_logprobs} is invalid: needs logprobs=true")
        if self.logprobs:
            kw["logprobs"] = self.top_logprobs or 0
        return SamplingParams(**defaults.fill(kw, default_max_tokens or None)), limit is not None


class TokenizeRequest(_ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # None: true for a prompt, false for messages (vLLM's defaults)
    return_token_strs: bool = False  # vLLM's extra: the vocabulary strings of the tokens too
    mm_processor_kwargs: dict[str, Any] | None = None  # vLLM's (messages form): ignored, text only


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(_Body):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Body):
    """vLLM's ``POST /v1/unload_lora_adapter`` body (``lora_int_id`` accepted and ignored, as vLLM)."""
    lora_name: str
    lora_int_id: int | None = None
