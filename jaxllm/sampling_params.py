"""Per-request sampling parameters (host side, no jax).

``SamplingParams`` is a msgspec Struct so the offline API, JSONL files and the gRPC layer
all fill the same object. Construction validates every field (``__post_init__``, as vLLM's
``SamplingParams``): ``SamplingParams(temperature=-1.0)`` raises ``ValueError`` naming the
field, the value and the allowed range (msgspec decoding wraps it in ``msgspec.ValidationError``).
Only the vocabulary-dependent checks (token ids < vocab_size) wait for admission:
``LLMEngine.add_request`` calls ``validate(vocab_size)``, which re-checks everything (a Struct is
mutable after construction) before anything is scheduled.

Notes on semantics:
- ``temperature == 0`` is greedy (top_p/top_k/min_p are then irrelevant); ``top_k`` -1 or 0 = off.
- ``seed=None`` draws a seed from the engine RNG (``EngineConfig.seed``) at add time, so a
  whole run is reproducible; an explicit seed makes the request reproducible whatever else is
  in the batch.
- ``min_tokens``: EOS / stop_token_ids / stop strings do not end the request before it has
  ``min_tokens`` generated tokens (the sampler also masks EOS and stop ids meanwhile).
- ``allowed_token_ids`` (only these can be sampled) and ``logit_bias`` (added to the raw logits)
  apply first, before penalties, as in vLLM; logprobs stay those of the raw model distribution.
- ``bad_words`` (vLLM's): strings the completion must not contain as tokens. Each word is
  tokenized as is and with a leading space (jaxllm/engine/bad_words.py, vLLM's rule); at every step
  the last token of a tokenized word is banned when the generated tokens end with the rest of it
  (a one-token word is always banned). Only generated tokens count (a prompt ending in a word's
  first tokens does not ban its last), and only that tokenization (the same text spelled with
  other tokens passes), as in vLLM. Logprobs stay the raw model's.
- ``structured_outputs``: the completion must match a JSON schema, regex, choice or Lark grammar
  (a per-step token bitmask on device, see jaxllm/engine/grammar.py); logprobs stay the raw model's.
- ``truncate_prompt_tokens=k`` keeps the prompt's last k tokens (before the length checks);
  ``RequestOutput.prompt_token_ids`` are the kept ones.
- ``output_kind`` (vLLM's ``RequestOutputKind``): what each step's ``RequestOutput`` carries. CUMULATIVE
  (the default): everything so far; DELTA: only what is new since the request's previous output
  (text, token_ids and logprobs; cumulative_logprob stays cumulative; prompt_logprobs come once);
  FINAL_ONLY: no output until the request finishes (``LLM.generate`` and ``LLM.chat`` ask for it:
  the engine then builds no per-step output copies of growing token lists).
- ``prompt_logprobs=k``: ``RequestOutput.prompt_logprobs`` holds, per prompt token after the first,
  its logprob and the top-k (None for the first token, as vLLM), computed by the prefill steps (a
  step variant compiled per bucket at warm-up); such requests bypass the prefix cache (a cached
  prefix has no logits).
"""

from __future__ import annotations

import enum
import math

import msgspec

from jaxllm.structured_outputs import StructuredOutputsParams

MAX_LOGPROBS = 20
# Per-row id lists travel to the on-device sampler as fixed-width [rows, K] arrays (one compiled
# shape): these are K, and the validation limits.
MAX_LOGIT_BIAS = 300  # entries of logit_bias (OpenAI's limit)
MAX_ALLOWED_TOKEN_IDS = 300
LOGIT_BIAS_RANGE = 100.0  # |bias| <= 100, as OpenAI's API
# bad_words: words per request, and tokens per tokenized word (jaxllm/engine/bad_words.py). Each word
# bans at most 2 ids a step (its two tokenizations), which ride in the sampler's mask_ids.
MAX_BAD_WORDS = 16
MAX_BAD_WORD_TOKENS = 16


class RequestOutputKind(enum.IntEnum):
    """vLLM's: what each step's RequestOutput carries (see the module notes)."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class SamplingParams(msgspec.Struct, kw_only=True):
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = -1  # -1 or 0 = off, else >= 1
    min_p: float = 0.0  # [0, 1]
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int = 16  # >= 1
    min_tokens: int = 0  # [0, max_tokens]
    logprobs: int | None = None  # top-k logprobs per generated token, 0..20
    prompt_logprobs: int | None = None  # 0..20
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, [-100, 100]
    allowed_token_ids: list[int] | None = None  # sample only among these ids
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens (>= 1)
    detokenize: bool = True  # False: outputs carry token ids only (text ""), no host decoding
    bad_words: list[str] | None = None  # never generate these words (vLLM's; see the module notes)
    # the completion must match a JSON schema / regex / choice / grammar (jaxllm/structured_outputs.py)
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE  # per-step outputs (module notes)

    # ----- derived views -----------------------------------------------------------
    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            return [self.stop]
        return list(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    def clone(self, **changes) -> "SamplingParams":
        return msgspec.structs.replace(self, **changes)

    # ----- validation --------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate(vocab_size=None)  # the vocabulary-dependent checks wait for admission

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Check every field; raise ValueError('<field>=<value> is invalid: <rule>')."""
        _int("n", self.n, lo=1)
        _num("temperature", self.temperature, "must be >= 0", lambda v: v >= 0)
        _num("top_p", self.top_p, "must be in (0, 1]", lambda v: 0 < v <= 1)
        _int("top_k", self.top_k, rule="must be -1 or 0 (off) or >= 1", ok=lambda v: v >= -1)
        _num("min_p", self.min_p, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        _num("presence_penalty", self.presence_penalty, "must be in [-2, 2]", lambda v: -2 <= v <= 2)
        _num("frequency_penalty", self.frequency_penalty, "must be in [-2, 2]", lambda v: -2 <= v <= 2)
        _num("repetition_penalty", self.repetition_penalty, "must be > 0", lambda v: v > 0)
        if self.seed is not None:
            _int("seed", self.seed, rule="must be None or an integer in [-2**63, 2**64)",
                 ok=lambda v: -(2**63) <= v < 2**64)
        _int("max_tokens", self.max_tokens, lo=1)
        _int("min_tokens", self.min_tokens, lo=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} is invalid: must be <= max_tokens={self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                _int(name, v, rule=f"must be None or in [0, {MAX_LOGPROBS}]",
                     ok=lambda x: 0 <= x <= MAX_LOGPROBS)
        if type(self.output_kind) is not RequestOutputKind:  # an int from the wire, or anything else
            kinds = {k.value: k for k in RequestOutputKind}
            if isinstance(self.output_kind, bool) or self.output_kind not in kinds:
                raise ValueError(f"output_kind={self.output_kind!r} is invalid: must be one of "
                                 + ", ".join(f"{k.value} ({k.name})" for k in RequestOutputKind))
            self.output_kind = kinds[self.output_kind]
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "detokenize"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"{name}={v!r} is invalid: must be a bool")
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if not isinstance(stops, (list, tuple)):
                raise ValueError(f"stop={self.stop!r} is invalid: must be a string or a list of strings")
            for s in stops:
                if not isinstance(s, str) or s == "":
                    raise ValueError(f"stop={self.stop!r} is invalid: every stop string must be a non-empty str")
        if not self.detokenize and self.stop_strings:
            raise ValueError(f"stop={self.stop!r} is invalid with detokenize=False: stop strings are "
                             f"matched on the text; use stop_token_ids")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise ValueError(
                    f"stop_token_ids={self.stop_token_ids!r} is invalid: must be a list of token ids")
            _token_ids("stop_token_ids", self.stop_token_ids, vocab_size)
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not 1 <= len(ids) <= MAX_ALLOWED_TOKEN_IDS:
                raise ValueError(f"allowed_token_ids={_short(ids)} is invalid: must be None or a list of 1 to "
                                 f"{MAX_ALLOWED_TOKEN_IDS} token ids")
            _token_ids("allowed_token_ids", ids, vocab_size)
        if self.logit_bias is not None:
            bias = self.logit_bias
            if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias={_short(bias)} is invalid: must be None or a dict of at most "
                                 f"{MAX_LOGIT_BIAS} token id -> bias entries")
            _token_ids("logit_bias", list(bias), vocab_size, shown=bias)
            for t, b in bias.items():
                _num(f"logit_bias[{t}]", b, f"must be a number in [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]",
                     lambda v: abs(v) <= LOGIT_BIAS_RANGE)
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, (list, tuple)) or not 1 <= len(words) <= MAX_BAD_WORDS:
                raise ValueError(f"bad_words={_short(words)} is invalid: must be None or a list of 1 to "
                                 f"{MAX_BAD_WORDS} words")
            for w in words:
                if not isinstance(w, str) or not w.lstrip():
                    raise ValueError(f"bad_words={_short(words)} is invalid: every word must be a str with a "
                                     f"non-space character (got {_short(w)})")
        if self.truncate_prompt_tokens is not None:
            _int("truncate_prompt_tokens", self.truncate_prompt_tokens, rule="must be None or an integer >= 1",
                 ok=lambda v: v >= 1)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError(f"structured_outputs={_short(self.structured_outputs)} is invalid: must be "
                                 f"None or a StructuredOutputsParams")
            self.structured_outputs.validate()
            end = self.structured_outputs.reasoning_end
            if end and vocab_size is not None and max(end) >= vocab_size:
                raise ValueError(f"structured_outputs.reasoning_end={_short(end)} is invalid: token id "
                                 f"{max(end)} is past the vocabulary ({vocab_size} ids)")
        return self


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _token_ids(name: str, ids, vocab_size: int | None, shown=None) -> None:
    hi = vocab_size
    shown = ids if shown is None else shown
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (hi is not None and t >= hi):
            rng = f"[0, {hi})" if hi is not None else ">= 0"
            raise ValueError(f"{name}={_short(shown)} is invalid: token id {t!r} must be an int in {rng}")


def _num(name: str, v, rule: str, ok) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name}={v!r} is invalid: {rule}")


def _int(name: str, v, lo: int | None = None, rule: str | None = None, ok=None) -> None:
    if rule is None:
        rule = f"must be an integer >= {lo}"
        ok = lambda x: x >= lo  # noqa: E731
    if isinstance(v, bool) or not isinstance(v, int) or not ok(v):
        raise ValueError(f"{name}={v!r} is invalid: {rule}")
