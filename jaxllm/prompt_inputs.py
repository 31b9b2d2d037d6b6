"""The prompts of `python -m jaxllm.generate` (--prompt, --chat-prompt, --input), each with its own
SamplingParams, checked with the tokenizer and the model config alone, before the engine is built.

`--input` lines are plain text (one prompt a line) or JSON objects with exactly one of `prompt`,
`messages` (chat) or `prompt_token_ids`, plus any `SamplingParams` field, which overrides the
command line's value for that line: `{"prompt": "Hi", "max_tokens": 3, "temperature": 0}`, and
`priority` (an int, lower first; not 0 only with `--scheduling-policy priority`).
Every problem is a ValueError starting with where it is (`FILE:LINE: ` or `--prompt #2: `).
"""
from __future__ import annotations

import dataclasses

import msgspec

from jaxllm.sampling_params import SamplingParams

PROMPT_KEYS = ("prompt", "messages", "prompt_token_ids")
REQUEST_KEYS = ("priority",)  # keys of the request itself, beside the prompt and SamplingParams
SAMPLING_KEYS = frozenset(SamplingParams.__struct_fields__)


@dataclasses.dataclass
class PromptItem:
    where: str  # "FILE:LINE" or "--prompt #2"
    kind: str  # "text" | "chat" | "ids"
    payload: object  # str | list of messages | list of ids, as given
    params: SamplingParams
    prompt: object = None  # what LLM.generate takes, filled by validate_items
    priority: int = 0  # the line's `priority` key (scheduling_policy "priority")

    @property
    def shown(self) -> str:
        if self.kind == "ids":
            return f"{len(self.payload)} token ids"
        text = self.payload[-1].get("content", "") if self.kind == "chat" else self.payload
        return repr(text)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def cli_items(prompts: list[str], chat_prompts: list[str], chat: bool, params: SamplingParams) -> list[PromptItem]:
    items = [PromptItem(f"--prompt #{i}", "chat", _user(p), params) if chat
             else PromptItem(f"--prompt #{i}", "text", p, params) for i, p in enumerate(prompts, 1)]
    items += [PromptItem(f"--chat-prompt #{i}", "chat", _user(p), params) for i, p in enumerate(chat_prompts, 1)]
    return items


def read_inputs(path: str, chat: bool, params: SamplingParams,
                scheduling_policy: str = "fcfs") -> list[PromptItem]:
    """The prompts of an --input file; `params` are the command line's, which JSON keys override;
    a line's `priority` is checked against `scheduling_policy` as the engine would."""
    items = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            if not line.lstrip().startswith("{"):
                items.append(PromptItem(where, "chat", _user(line), params) if chat
                             else PromptItem(where, "text", line, params))
                continue
            try:
                obj = msgspec.json.decode(line)
            except msgspec.DecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e})") from None
            items.append(_json_item(where, obj, chat, params, scheduling_policy))
    if not items:
        raise ValueError(f"--input {path}: the file is empty (no prompt lines)")
    return items


def _json_item(where: str, obj: dict, chat: bool, params: SamplingParams, scheduling_policy: str) -> PromptItem:
    kinds = [k for k in PROMPT_KEYS if k in obj]
    if not kinds:
        raise ValueError(f"{where}: a JSON line needs one of 'prompt', 'messages' or 'prompt_token_ids'")
    if len(kinds) > 1:
        raise ValueError(f"{where}: {' and '.join(repr(k) for k in kinds)} conflict: give one prompt kind per line")
    for key in obj:
        if key not in PROMPT_KEYS and key not in REQUEST_KEYS and key not in SAMPLING_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}: a line holds one of 'prompt', 'messages', "
                             f"'prompt_token_ids', 'priority' and SamplingParams fields "
                             f"({', '.join(sorted(SAMPLING_KEYS))})")
    priority = obj.get("priority", 0)
    try:
        from jaxllm.engine.intake import check_priority

        check_priority(priority, scheduling_policy == "priority")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    overrides = {k: v for k, v in obj.items() if k in SAMPLING_KEYS}
    if overrides:
        try:
            # through JSON, as the line was read: logit_bias keys are strings there
            merged = msgspec.json.encode({**msgspec.structs.asdict(params), **overrides})
            params = msgspec.json.decode(merged, type=SamplingParams)
        except msgspec.ValidationError as e:  # "Expected `int`, got `str` - at `$.max_tokens`"
            raise ValueError(f"{where}: {e}") from None
    kind = kinds[0]
    value = obj[kind]
    if kind == "prompt":
        if not isinstance(value, str):
            raise ValueError(f"{where}: prompt={value!r} is invalid: must be a string")
        item = PromptItem(where, "chat", _user(value), params) if chat else PromptItem(where, "text", value, params)
    elif kind == "messages":
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise ValueError(f"{where}: messages={value!r} is invalid: must be a non-empty list of "
                             f"{{'role': ..., 'content': ...}} objects")
        item = PromptItem(where, "chat", value, params)
    else:
        if not isinstance(value, list):
            raise ValueError(f"{where}: prompt_token_ids={value!r} is invalid: must be a list of ints")
        item = PromptItem(where, "ids", value, params)
    item.priority = priority
    return item


def validate_items(items: list[PromptItem], tokenizer, vocab_size: int, max_model_len: int,
                   task: str = "generate") -> None:
    """Tokenize every prompt and check it and its SamplingParams as the engine would (same rules,
    same messages, prefixed with where the prompt came from); fills each item's `prompt`.
    task "embed" / "classify": a prompt may be max_model_len tokens long (nothing is generated)."""
    from jaxllm.engine.bad_words import tokenize_bad_words
    from jaxllm.engine.intake import validate_prompt_ids

    for it in items:
        try:
            it.params.validate(vocab_size)
            if it.params.bad_words:
                tokenize_bad_words(it.params.bad_words, tokenizer, vocab_size)
            if it.kind == "text":
                if not it.payload:
                    raise ValueError("prompt='' is invalid: must be a non-empty string")
                ids = list(tokenizer.encode(it.payload))
                it.prompt = it.payload
            elif it.kind == "chat":
                it.prompt = tokenizer.chat_prompt(it.payload)
                ids = list(it.prompt["prompt_token_ids"])
            else:
                ids = list(it.payload)
                it.prompt = {"prompt_token_ids": ids}
            if it.params.truncate_prompt_tokens is not None:
                ids = ids[-it.params.truncate_prompt_tokens:]  # the engine checks what is kept
            if task in ("embed", "classify"):
                if len(ids) > max_model_len:
                    raise ValueError(f"prompt length={len(ids)} tokens is invalid: must be <= "
                                     f"max_model_len={max_model_len}")
                validate_prompt_ids(ids, vocab_size, max_model_len + 1)
            else:
                validate_prompt_ids(ids, vocab_size, max_model_len)
        except ValueError as e:
            raise ValueError(f"{it.where}: {e}") from None
