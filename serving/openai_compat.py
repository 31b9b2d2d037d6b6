"""vLLM's and OpenAI's request fields this server accepts without using them, and the ones it refuses
(no jax). The strict base of every OpenAI-compatible body lives here too.

vLLM's bodies allow unknown fields (it logs and drops them); ours forbid them, so a typo is a 400
naming it. Every field vLLM's request models declare is therefore declared here or in the bodies
(serving/openai_protocol.py, serving/openai_structured.py), in one of three ways; the table in
serving/README.md ("OpenAI request fields") lists each:

- honoured: the bodies' own fields;
- accepted and ignored (``IGNORED``): they do not change the answer here, as in vLLM or OpenAI
  without the feature behind them (``service_tier``, ``store``, ``metadata``, ``kv_transfer_params``
  without a KV connector, ...);
- refused unless unset or at their default (``refused()``): they would change the answer and this
  server cannot honour them; the 400 names the field, its value and why.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

# accepted, never used: they change nothing a client gets back from this server
IGNORED = ("service_tier", "store", "metadata", "prediction", "session_id", "kv_transfer_params",
           "ec_transfer_params", "vllm_xargs", "mm_processor_kwargs", "media_io_kwargs", "stream_interval",
           "return_token_offsets", "return_mm_kwargs", "routed_experts_prompt_start", "guided_decoding_backend")


class Body(BaseModel):
    """Strict types (``"5"`` is not an int), unknown fields refused (a 400 naming them)."""
    model_config = ConfigDict(extra="forbid", strict=True)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class CompatFields(Body):
    """The fields of /v1/completions and /v1/chat/completions beyond what the bodies honour."""
    # accepted and ignored (IGNORED): OpenAI's
    service_tier: str | None = None  # no tiers: one queue (vLLM ignores it too)
    store: bool | None = None  # nothing is stored
    metadata: dict[str, str] | None = None  # only for stored completions
    prediction: dict | None = None  # OpenAI's predicted outputs: a latency hint, never the answer
    # accepted and ignored: vLLM's, for features this server does not run (no effect there either)
    session_id: str | None = None  # routing identity across requests
    kv_transfer_params: dict[str, Any] | None = None  # disaggregated prefill: no KV connector here
    ec_transfer_params: dict[str, Any] | None = None  # encoder-cache disaggregation: no encoders here
    vllm_xargs: dict[str, Any] | None = None  # custom extensions' arguments: none are installed
    mm_processor_kwargs: dict[str, Any] | None = None  # multimodal processor: text-only server
    media_io_kwargs: dict[str, Any] | None = None  # media loaders: text-only server
    stream_interval: int | None = None  # tokens per streamed chunk: chunks carry what each step made
    return_token_offsets: bool | None = None  # vLLM: render endpoints only, ignored on generation
    return_mm_kwargs: bool | None = None  # vLLM: render endpoints only
    routed_experts_prompt_start: int | None = None  # only shapes routed-expert data, never returned here
    # refused unless unset / default (refused())
    logits_processors: list | None = None
    watermarking: bool | None = None
    thinking_token_budget: int | None = None
    repetition_detection: dict | None = None
    logprob_token_ids: list[int] | None = None
    return_prompt_text: bool | None = None
    truncation_side: str | None = None  # "left" (keep the last tokens) is what truncate_prompt_tokens does
    spaces_between_special_tokens: bool = True
    early_stopping: bool | None = None  # older vLLM beam search

    def refused(self) -> tuple[str, str] | None:
        """(message, field) of the first field set to a value this server cannot honour, else None."""
        checks: list[tuple[str, Any, bool, str]] = [
            ("logits_processors", self.logits_processors, bool(self.logits_processors),
             "this server loads no logits processors"),
            ("watermarking", self.watermarking, bool(self.watermarking), "this server does not watermark"),
            ("thinking_token_budget", self.thinking_token_budget,
             self.thinking_token_budget not in (None, -1), "this server does not cap reasoning tokens"),
            ("repetition_detection", self.repetition_detection, self.repetition_detection is not None,
             "this server does not stop on repeated n-grams"),
            ("logprob_token_ids", self.logprob_token_ids, self.logprob_token_ids is not None,
             "use logprobs/top_logprobs"),
            ("return_prompt_text", self.return_prompt_text, bool(self.return_prompt_text),
             "use POST /tokenize with the messages"),
            ("truncation_side", self.truncation_side, self.truncation_side not in (None, "left"),
             "truncate_prompt_tokens keeps the prompt's last tokens ('left')"),
            ("spaces_between_special_tokens", self.spaces_between_special_tokens,
             not self.spaces_between_special_tokens,
             "the detokenizer cannot change the spacing around special tokens"),
            ("early_stopping", self.early_stopping, bool(self.early_stopping),
             "beam search runs until every beam ends"),
        ]
        checks += self._more_refusals()
        for name, value, bad, why in checks:
            if bad:
                return f"{name}={_shown(value)} is not supported by this server: {why}", name
        return None

    def _more_refusals(self) -> list[tuple[str, Any, bool, str]]:
        return []


class ChatCompatFields(CompatFields):
    """/v1/chat/completions' extra OpenAI fields: audio, web search, the legacy function calling."""
    modalities: list[str] | None = None  # ["text"] only
    audio: dict | None = None
    web_search_options: dict | None = None
    functions: list | None = None
    function_call: Any = None

    def _more_refusals(self) -> list[tuple[str, Any, bool, str]]:
        return [
            ("modalities", self.modalities, self.modalities is not None and set(self.modalities) - {"text"} != set(),
             "this server answers text only"),
            ("audio", self.audio, self.audio is not None, "this server answers text only"),
            ("web_search_options", self.web_search_options, self.web_search_options is not None,
             "this server runs no web search"),
            ("functions", self.functions, self.functions is not None, "use tools (the legacy functions field "
             "is not served)"),
            ("function_call", self.function_call, self.function_call is not None, "use tool_choice (the legacy "
             "function_call field is not served)"),
        ]
