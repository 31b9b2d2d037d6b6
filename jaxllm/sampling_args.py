"""The sampling flags: `SamplingParams` fields as command-line flags (`add_sampling_args`) and the
parsed flags back as fields or a `SamplingParams` (`sampling_fields_from_args`,
`sampling_params_from_args`), for `python -m jaxllm.generate` and `python -m serving.client`.

Each flag is the field name with dashes, except the request's seed, `--sampling-seed` (`--seed` is the
engine's, jaxllm/cli_args.py); the structured-output flags fill `structured_outputs`. No jax.
"""
from __future__ import annotations

import argparse

import msgspec

from jaxllm.sampling_params import MAX_BAD_WORD_TOKENS, MAX_BAD_WORDS, SamplingParams
from jaxllm.structured_outputs import KINDS, StructuredOutputsParams

# (field, type, help); the flag is --field-with-dashes except seed (--sampling-seed).
_SAMPLING = (
    ("n", int, "samples per prompt"),
    ("temperature", float, "0 = greedy"),
    ("top_p", float, "nucleus sampling: keep the smallest set of tokens with this much probability"),
    ("top_k", int, "keep the k most likely tokens; -1 or 0 = off"),
    ("min_p", float, "drop tokens less likely than min_p times the most likely one"),
    ("presence_penalty", float, "subtracted from the logit of every token already generated, in [-2, 2]"),
    ("frequency_penalty", float, "subtracted per occurrence of a generated token, in [-2, 2]"),
    ("repetition_penalty", float, "divides positive logits of prompt and generated tokens; 1 = off"),
    ("max_tokens", int, "tokens to generate at most"),
    ("min_tokens", int, "tokens to generate before EOS, stop ids or stop strings may end the request"),
    ("logprobs", int, "return the top-k logprobs of each generated token"),
    ("prompt_logprobs", int, "return the top-k logprobs of each prompt token"),
    ("truncate_prompt_tokens", int, "keep each prompt's last K tokens"),
)


# the sampling flags a generation_config.json can set (jaxllm/generation_config.py SAMPLING_KEYS' fields)
MODEL_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")


def add_sampling_args(ap: argparse.ArgumentParser, *, server_defaults: bool = False,
                      model_defaults: bool = False) -> None:
    """The `SamplingParams` fields as flags. `server_defaults` (the gRPC client): an unset flag is
    not sent and the server's default applies; the help shows that default. `model_defaults`
    (jaxllm.generate): the flags a generation config sets (MODEL_DEFAULT_FIELDS) default to None, to
    be filled from the model's generation_config.json, else SamplingParams' default."""
    d = SamplingParams()

    def default(field, shown=None):
        value = getattr(d, field)
        if model_defaults and field in MODEL_DEFAULT_FIELDS:
            return None, f" (default: the model's generation config, else {value})"
        if not server_defaults:
            return value, ""
        return None, f" (default: the server's, {shown if shown is not None else value})"

    g = ap.add_argument_group("sampling" + (" (unset = the server's default)" if server_defaults else ""))
    for field, typ, text in _SAMPLING:
        value, note = default(field, "none" if getattr(d, field) is None else None)
        if getattr(d, field) is None and not note:
            note = " (default: off)"
        g.add_argument("--" + field.replace("_", "-"), type=typ, default=value, help=text + note)
    value, note = default("seed", "drawn from the engine seed")
    g.add_argument("--sampling-seed", type=int, dest="sampling_seed", default=value,
                   help="this request's seed" + (note or " (default: drawn from the engine --seed)"))
    g.add_argument("--stop", action="append", default=None,
                   help="stop string, repeatable (default: none)")
    g.add_argument("--stop-token-ids", type=int, nargs="+", action="extend", default=None, metavar="ID",
                   help="token ids that end the request, several values or repeated (default: none)")
    value, note = default("ignore_eos")
    g.add_argument("--ignore-eos", action="store_true", default=value,
                   help="keep generating after EOS" + (note or " (default: off)"))
    value, note = default("skip_special_tokens")
    g.add_argument("--skip-special-tokens", action=argparse.BooleanOptionalAction, default=value,
                   help="leave special tokens out of the text" + note)
    value, note = default("include_stop_str_in_output")
    g.add_argument("--include-stop-str-in-output", action="store_true", default=value,
                   help="keep the matched stop string at the end of the text" + (note or " (default: off)"))
    g.add_argument("--allowed-token-ids", type=int, nargs="+", action="extend", default=None, metavar="ID",
                   help="sample only among these ids (default: all)")
    g.add_argument("--logit-bias", type=_logit_bias, default=None, metavar="JSON",
                   help='token id -> bias added to its logit, e.g. \'{"50256": -100}\' (default: none)')
    g.add_argument("--bad-words", action="append", default=None, metavar="WORD",
                   help="a word never to generate, repeatable (vLLM's bad_words: tokenized with and without a "
                        "leading space; at most %d words of at most %d tokens; default: none)"
                        % (MAX_BAD_WORDS, MAX_BAD_WORD_TOKENS))
    s = ap.add_argument_group("structured outputs (field structured_outputs; at most one, default: free text)")
    s.add_argument("--json-schema", type=_json_file, default=None, metavar="FILE", dest="so_json",
                   help="the completion is JSON valid under the JSON schema in FILE (default: off)")
    s.add_argument("--regex", default=None, dest="so_regex", help="the whole completion matches this regex (default: off)")
    s.add_argument("--choice", action="append", default=None, dest="so_choice",
                   help="the completion is one of these strings, one flag per choice (default: off)")
    s.add_argument("--grammar", type=_text_file, default=None, metavar="FILE", dest="so_grammar",
                   help="the completion matches the Lark (llguidance dialect) or GBNF grammar in FILE "
                        "(default: off)")
    s.add_argument("--json-object", action="store_true", default=None, dest="so_json_object",
                   help="the completion is a JSON object, any (default: off)")


def sampling_fields_from_args(args) -> dict:
    """{SamplingParams field: value} of the sampling flags (None = unset); `seed` is --sampling-seed
    (args.seed, where there is one, is the engine's)."""
    fields = {f: getattr(args, f) for f in SamplingParams.__struct_fields__ if f != "seed" and hasattr(args, f)}
    so = {k: getattr(args, "so_" + k, None) for k in KINDS}
    fields["structured_outputs"] = StructuredOutputsParams(**so) if any(v is not None for v in so.values()) else None
    return {**fields, "seed": getattr(args, "sampling_seed", None)}


def sampling_params_from_args(args) -> SamplingParams:
    return SamplingParams(**{k: v for k, v in sampling_fields_from_args(args).items() if v is not None})


def _text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{path!r} is invalid: cannot read it ({e.__class__.__name__}: "
                                         f"{getattr(e, 'strerror', None) or e})") from None


def _json_file(path: str) -> dict:
    text = _text_file(path)
    try:
        schema = msgspec.json.decode(text)
    except msgspec.DecodeError as e:
        raise argparse.ArgumentTypeError(f"{path!r} is invalid: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError(f"{path!r} is invalid: a JSON schema must be an object")
    return schema


def _logit_bias(text: str) -> dict[int, float]:
    try:
        return msgspec.json.decode(text, type=dict[int, float])
    except msgspec.DecodeError as e:
        raise argparse.ArgumentTypeError(f"--logit-bias {text!r} is invalid: need a JSON object of "
                                         f"token id -> number ({e})") from None
