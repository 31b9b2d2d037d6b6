"""Stop conditions (host only): pure functions the output processor applies per new token.

Order, per new token (the first that fires wins):
1. stop token: EOS (unless ``ignore_eos``) or one of ``stop_token_ids`` -> "stop"
   (stop_reason: the id for stop_token_ids, None for EOS). Its text is left out of the output
   unless ``include_stop_str_in_output``.
2. stop string, searched in the text the new token completed (so across token boundaries)
   -> "stop", stop_reason the string; the text is cut before it (after it with
   ``include_stop_str_in_output``).
3. length: ``max_tokens`` generated, or the sequence reached ``max_model_len`` -> "length".
While fewer than ``min_tokens`` tokens are generated, 1 and 2 are suppressed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from jaxllm.sampling_params import SamplingParams


def stop_token_reason(token_id: int, num_output_tokens: int, params: SamplingParams,
                      eos_token_ids: Collection[int]) -> tuple[bool, int | None]:
    """(stopped, stop_reason) for a token-level stop; ``num_output_tokens`` includes the token."""
    if num_output_tokens < params.min_tokens:
        return False, None
    if params.stop_token_ids and token_id in params.stop_token_ids:
        return True, token_id
    if not params.ignore_eos and token_id in eos_token_ids:
        return True, None
    return False, None


def find_stop_string(text: str, num_new_chars: int, stops: Sequence[str],
                     include_stop_str: bool) -> tuple[int, str] | None:
    """Look for a stop string overlapping the last ``num_new_chars`` characters of ``text``.

    Returns (length to keep, stop string) for the earliest match, or None."""
    if not stops or num_new_chars <= 0:
        return None
    best: tuple[int, str] | None = None
    for s in stops:
        start = max(0, len(text) - num_new_chars - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return None
    i, s = best
    return (i + len(s) if include_stop_str else i), s


def holdback_chars(params: SamplingParams) -> int:
    """Characters to hold back from streamed (unfinished) text, so a partial stop string is
    never shown and then taken back."""
    stops = params.stop_strings
    if not stops or params.include_stop_str_in_output:
        return 0
    return max(len(s) for s in stops) - 1
