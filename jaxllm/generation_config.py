"""A checkpoint's ``generation_config.json`` (no jax): default sampling parameters and EOS ids, as vLLM
reads them (``--generation-config`` / ``--override-generation-config``).

What is read (vLLM's ``ModelConfig.get_diff_sampling_param``): only ``repetition_penalty``,
``temperature``, ``top_k``, ``top_p``, ``min_p`` and ``max_new_tokens`` (renamed ``max_tokens``), each
when present and not null; everything else in the file (``do_sample``, ``max_length``, ...) is ignored,
``do_sample: false`` included (a file's temperature applies anyway, as in vLLM). The override (a dict)
is laid over the file first and may add keys; keys outside those six are ignored (logged once).
Where the file comes from (``generation_config``):

- ``"auto"`` (default): the model's own ``generation_config.json``, for an HF safetensors directory
  and an Orbax directory (``python -m checkpoints.convert`` copies an HF source's file there); GGUF and
  dummy weights have none: nothing is taken;
- ``"vllm"``: no file for the sampling defaults (only the override applies); the EOS ids are still
  the model's own file's (vLLM reads them whatever this says);
- a folder: that folder's ``generation_config.json`` (must exist), for any load format.

The defaults fill only what a request leaves unset: ``LLM.generate(prompts)`` / ``LLM.chat`` without
``sampling_params`` use ``LLM.get_default_sampling_params()``, the OpenAI server and the gRPC Generate
rpc fill the fields a body/message leaves unset, ``python -m jaxllm.generate`` the flags not given.
Precedence: request > override > file > jaxllm's ``SamplingParams`` defaults.

``max_tokens`` on the server (vLLM's ``get_max_tokens``): the request's, else the default's, else the
endpoint's own fallback (completions 16, chat the rest of the context); the engine stops any request
at ``max_model_len``. A ``max_new_tokens`` the operator chose (in ``override_generation_config``, or in a
``--generation-config <folder>`` file) is moreover a cap on every request's max_tokens
(``max_tokens_cap``, vLLM's ``override_max_tokens``); the checkpoint's own file's is only a default.

EOS (vLLM's ``SamplingParams.update_from_generation_config``): the file's ``eos_token_id`` (an int or a
list) are stop tokens beside the tokenizer's and config.json's; the factory adds them to the
tokenizer's ``eos_token_ids``, the one set the engine, the sampler's min_tokens masks, structured
outputs and beam search read, so ``ignore_eos`` covers them too.
"""
from __future__ import annotations

import json
import os
from typing import Any

import msgspec

from jaxllm.hf_overrides import named_value, parse_json_object
from jaxllm.sampling_params import SamplingParams

FILE = "generation_config.json"
MODES = ("auto", "vllm")  # or a folder
# the generation config keys vLLM takes as sampling defaults -> SamplingParams field
SAMPLING_KEYS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature", "top_k": "top_k",
                 "top_p": "top_p", "min_p": "min_p", "max_new_tokens": "max_tokens"}
FLAG, OVERRIDE_FLAG = "--generation-config", "--override-generation-config"


class GenerationDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """What an engine took from the generation config. ``sampling``: {SamplingParams field: value};
    ``eos_token_ids``: the file's eos ids (beside the tokenizer's); ``max_tokens_cap``: an operator's
    max_new_tokens that caps server requests; ``source``: where they came from (for log lines);
    ``ignored``: override keys that are not sampling defaults."""
    sampling: dict = {}
    eos_token_ids: tuple[int, ...] = ()
    max_tokens_cap: int | None = None
    source: str = ""
    ignored: tuple[str, ...] = ()

    def sampling_params(self) -> SamplingParams:
        """vLLM's ``LLM.get_default_sampling_params()``: SamplingParams with these defaults."""
        return SamplingParams(**self.sampling)

    def fill(self, fields: dict, fallback_max_tokens: int | None = None, *, cap: bool = True) -> dict:
        """A request's set ``fields`` (SamplingParams keyword arguments; ``max_tokens`` present only when
        the request set it) with the defaults under them. max_tokens: the request's, else the default's,
        else ``fallback_max_tokens`` (None: SamplingParams' 16), then at most ``max_tokens_cap`` (``cap``:
        the server's rule; the offline API and the CLI take no cap, as vLLM's)."""
        out = {k: v for k, v in self.sampling.items() if k != "max_tokens"}
        out.update(fields)
        limit = fields.get("max_tokens")
        if limit is None:
            limit = self.sampling.get("max_tokens", fallback_max_tokens)
        if cap and self.max_tokens_cap is not None:
            limit = self.max_tokens_cap if limit is None else min(limit, self.max_tokens_cap)
        out.pop("max_tokens", None)
        if limit is not None:
            out["max_tokens"] = limit
        return out

    def describe(self) -> str:
        """One line for the start-up log ('' when nothing was taken)."""
        parts = []
        if self.sampling:
            parts.append(f"default sampling params {self.sampling}")
        if self.max_tokens_cap is not None:
            parts.append(f"max_tokens capped at {self.max_tokens_cap} on the server")
        if self.eos_token_ids:
            parts.append(f"eos_token_id {list(self.eos_token_ids)}")
        if self.ignored:
            parts.append(f"ignored override keys {list(self.ignored)} (not sampling defaults)")
        return f"generation config ({self.source}): " + "; ".join(parts) if parts else ""


NONE = GenerationDefaults()


def check_mode(value: Any, name: str = "generation_config") -> str:
    """``"auto"``, ``"vllm"`` or a folder holding a generation_config.json; ValueError in one line
    naming ``name`` (the field, or the flag), the value and why."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{named_value(name, value)} is invalid: must be 'auto', 'vllm' or a folder holding a {FILE}")
    if value in MODES:
        return value
    if not os.path.isdir(value):
        raise ValueError(f"{named_value(name, value)} is invalid: no such folder (expected 'auto', 'vllm' or a "
                         f"folder holding a {FILE})")
    if not os.path.isfile(os.path.join(value, FILE)):
        raise ValueError(f"{named_value(name, value)} is invalid: the folder has no {FILE}")
    return value


def parse_override(value: Any, name: str = "override_generation_config") -> dict | None:
    """None, a dict or JSON text of an object -> a dict (a copy) or None, its sampling values checked
    as SamplingParams checks them; ValueError in one line naming ``name``, the value and why."""
    value = parse_json_object(value, name, "generation config keys, e.g. '{\"temperature\": 0.5}'")
    if value is None:
        return None
    _check_values(value, name)
    return value


def read_file(folder: str) -> tuple[dict, str]:
    """(the folder's generation_config.json as a dict, its path); ValueError naming the file when it is
    not a JSON object."""
    path = os.path.join(folder, FILE)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is invalid: not JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path} is invalid: cannot read it ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is invalid: must hold a JSON object")
    return raw, path


def resolve(mode: str, override: dict | None, fmt: str, path: str, *, flags: bool = False) -> GenerationDefaults:
    """The defaults of a model loaded as ``fmt`` ("hf", "gguf", "orbax", "dummy") from ``path``, under
    ``generation_config=mode`` and ``override_generation_config=override``. Bad values (e.g. temperature
    -1 in the file) raise ValueError naming the file or the override (``flags``: by its CLI flag)."""
    name, oname = (FLAG, OVERRIDE_FLAG) if flags else ("generation_config", "override_generation_config")
    mode = check_mode(mode, name)
    override = parse_override(override, oname) or {}
    own = os.path.join(path, FILE) if fmt in ("hf", "orbax") and os.path.isdir(path) else None
    own = own if own is not None and os.path.isfile(own) else None
    if mode in MODES:
        raw, where = read_file(os.path.dirname(own)) if own else ({}, None)
    else:
        raw, where = read_file(mode)
    eos = _eos_ids(raw.get("eos_token_id"), where)
    file_sampling = {} if mode == "vllm" else {k: raw[k] for k in SAMPLING_KEYS if raw.get(k) is not None}
    ours = {k: v for k, v in override.items() if k in SAMPLING_KEYS and v is not None}
    # a file value the override replaces is never used: only the values kept are checked
    _check_values({k: v for k, v in file_sampling.items() if k not in ours}, f"{where} (read for {named_value(name, mode)})")
    merged = {**file_sampling, **ours}
    sampling = {SAMPLING_KEYS[k]: v for k, v in merged.items()}
    # vLLM's override_max_tokens: a max_new_tokens the operator chose caps every server request
    chosen = override.get("max_new_tokens")
    if chosen is None and mode not in MODES:
        chosen = file_sampling.get("max_new_tokens")
    sources = [where] if where and (file_sampling or eos) else []
    if override:
        sources.append(oname)
    return GenerationDefaults(sampling=sampling, eos_token_ids=eos, max_tokens_cap=chosen,
                              source=" + ".join(sources),
                              ignored=tuple(sorted(k for k in override if k not in SAMPLING_KEYS)))


def _check_values(values: dict, source: str) -> None:
    for key, field in SAMPLING_KEYS.items():
        if values.get(key) is None:
            continue
        try:
            SamplingParams(**{field: values[key]})
        except (ValueError, TypeError) as e:
            msg = str(e)
            if field != key:  # max_new_tokens: name the file's key, not SamplingParams'
                msg = msg.replace(f"{field}=", f"{key}=", 1)
            raise ValueError(f"{source}: {msg}") from None


def _eos_ids(value: Any, where: str | None) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = [value] if not isinstance(value, list) else value
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise ValueError(f"{where}: eos_token_id={value!r} is invalid: must be a token id or a list of token "
                         f"ids (ints >= 0)")
    return tuple(dict.fromkeys(ids))
