"""The engine's intake helpers: prompt resolution and validation, per-sample seeds, and the
no-text detokenizer (also imported by jaxllm.prompt_inputs and the embedding path)."""
from __future__ import annotations

import hashlib

SEED_MOD = 1 << 63


def derive_seed(seed: int, index: int) -> int:
    if index == 0:
        return seed
    d = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(d[:8], "little") % SEED_MOD


def validate_prompt_ids(ids: list[int], vocab_size: int, max_model_len: int) -> None:
    """The prompt rules (also checked by `python -m jaxllm.generate` before it builds an engine):
    at least 1 token, every id an int in [0, vocab_size), shorter than max_model_len."""
    if not ids:
        raise ValueError("prompt=[] is invalid: the prompt must have at least 1 token")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt_token_ids[{i}]={t!r} is invalid: must be an int in "
                             f"[0, vocab_size={vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt length={len(ids)} tokens is invalid: must be < "
                         f"max_model_len={max_model_len} (room for 1 generated token)")


def check_priority(priority, priority_policy: bool) -> None:
    """A request's priority (vLLM's): an int; under scheduling_policy "fcfs" only 0 (also checked by
    `python -m jaxllm.generate` for its --input lines before it builds an engine)."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority={priority!r} is invalid: must be an integer")
    if priority != 0 and not priority_policy:
        raise ValueError(f"priority={priority} is invalid: scheduling_policy='fcfs' takes priority 0 "
                         f"only (start the engine with --scheduling-policy priority)")


def resolve_prompt(prompt, tokenizer) -> tuple[str | None, list[int]]:
    """A prompt as vLLM takes it (a str, a list of ids, or a dict with 'prompt_token_ids' or
    'prompt') -> (its text or None, its token ids); one-line ValueError for anything else."""
    if isinstance(prompt, str):
        return prompt, list(tokenizer.encode(prompt))
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"prompt_token_ids={ids!r} is invalid: must be a list of ints")
            return prompt.get("prompt"), list(ids)
        if "prompt" in prompt and isinstance(prompt["prompt"], str):
            return prompt["prompt"], list(tokenizer.encode(prompt["prompt"]))
        raise ValueError(f"prompt={prompt!r} is invalid: a dict prompt needs "
                         f"'prompt_token_ids' (list of ints) or 'prompt' (str)")
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    raise ValueError(f"prompt of type {type(prompt).__name__} is invalid: must be a str, a list "
                     f"of token ids, or a dict with 'prompt_token_ids' or 'prompt'")


MAX_CACHE_SALT_CHARS = 1024  # vLLM's limit


def cache_salt_of(prompt) -> str | None:
    """A dict prompt's ``cache_salt`` (vLLM's): requests share prefix-cache blocks only when their
    salts are equal (none = no salt); ValueError for a salt that is not a non-empty str."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > MAX_CACHE_SALT_CHARS):
        shown = repr(salt) if len(repr(salt)) <= 40 else repr(salt)[:37] + "..."
        raise ValueError(f"cache_salt={shown} is invalid: must be a non-empty str of at most "
                         f"{MAX_CACHE_SALT_CHARS} characters")
    return salt


class _NoText:
    """The detokenizer of a detokenize=False request: no text, no host decoding."""

    @staticmethod
    def add(new_ids) -> str:
        return ""


_NO_TEXT = _NoText()
