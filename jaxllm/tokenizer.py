"""Tokenizer: the HF tokenizer (from a directory or built offline from GGUF metadata), chat templates,
and incremental detokenization for streaming."""
from __future__ import annotations

import hashlib
import json
import os

_SPECIAL_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxllm", "tokenizers")


class Tokenizer:
    """Narrow wrapper over a transformers tokenizer: the only tokenizer surface the engine uses."""

    def __init__(self, hf_tokenizer, extra_eos_ids=()):
        self.hf = hf_tokenizer
        eos = set(extra_eos_ids)
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        self.eos_token_ids: set[int] = eos
        self.all_special_ids: set[int] = set(hf_tokenizer.all_special_ids)
        self.vocab_size: int = len(hf_tokenizer)
        self.bos_token_id = hf_tokenizer.bos_token_id
        # Decoding runs twice per generated token (incremental detokenization on the engine
        # thread): the Rust `tokenizers` decoder directly is ~5x cheaper than transformers' wrapper,
        # which only adds argument conversion here, unless it would clean up spaces afterwards.
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if getattr(hf_tokenizer, "clean_up_tokenization_spaces", False):
            backend = None
        self._fast_decode = backend.decode if backend is not None else None
        # IncrementalDetokenizer streams through it (tokenizers.decoders.DecodeStream), with the
        # ids it knows: an id past its vocabulary (a model's padded rows) stalls a stream for good
        self.stream_backend = backend
        self.backend_vocab_size = backend.get_vocab_size(with_added_tokens=True) if backend is not None else 0

    @staticmethod
    def from_dir(path: str, extra_eos_ids=()) -> "Tokenizer":
        """An HF directory's tokenizer. Without a template of its own (tokenizer_config.json's or
        chat_template.jinja), a processor's chat_template.json is read, as vLLM does: multimodal
        checkpoints such as Gemma 3 4B-27B may keep their template only there."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        legacy = os.path.join(path, "chat_template.json")
        if not hf.chat_template and os.path.isfile(legacy):
            with open(legacy) as f:
                template = json.load(f).get("chat_template")
            if isinstance(template, str):
                hf.chat_template = template
        return Tokenizer(hf, extra_eos_ids)

    @staticmethod
    def from_gguf(path: str, extra_eos_ids=()) -> "Tokenizer":
        """Builds the tokenizer from GGUF metadata (offline, no torch); the converted files are cached
        by file identity so later starts skip the conversion. The cache holds what
        `TokenizersBackend.save_pretrained` wrote, so it is read back with that class directly:
        `AutoTokenizer` would import torch through transformers' config machinery (2.5 s of start-up)."""
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        st = os.stat(path)
        key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        cache = os.path.join(_SPECIAL_CACHE, key)
        if os.path.isfile(os.path.join(cache, "tokenizer.json")):
            return Tokenizer(TokenizersBackend.from_pretrained(cache, local_files_only=True), extra_eos_ids)
        tok = _hf_tokenizer_from_gguf(path)
        try:
            tmp = cache + f".tmp{os.getpid()}"
            tok.save_pretrained(tmp)
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home only costs the conversion next time
        return Tokenizer(tok, extra_eos_ids)

    def save(self, path: str) -> None:
        self.hf.save_pretrained(path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_pair(self, text: str, text_pair: str) -> list[int]:
        """The tokenizer's pair encoding, ``tokenizer(text, text_pair)`` (its template post-processor:
        what a cross-encoder was trained on, e.g. ``<bos> a <sep> b <sep>``)."""
        return list(self.hf(text, text_pair, add_special_tokens=True)["input_ids"])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        """The vocabulary's own strings of ``ids`` (byte-level BPE: ``"Ġworld"``), as vLLM's
        ``/tokenize`` ``token_strs``; not their decoded text."""
        return [str(t) for t in self.hf.convert_ids_to_tokens(list(ids))]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation. Template errors propagate as they are: each edge
        names its own field (`chat_prompt` here, serving.proto_tools.render_ids for gRPC)."""
        return self._render_chat(messages, add_generation_prompt)[1]

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    chat_template: str | None = None, continue_final_message: bool = False,
                    tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
                    documents: list[dict] | None = None) -> dict:
        """``{"prompt": rendered text, "prompt_token_ids": ids}`` for a conversation, like vLLM's
        ``LLM.chat``: the model's template (or ``chat_template``, a Jinja string); with
        ``continue_final_message`` the last (assistant) message is left open for the model to
        continue instead of starting a new turn. ``tools`` (OpenAI's ``[{"type": "function",
        "function": {...}}]``) reach the template as its ``tools`` variable, ``chat_template_kwargs``
        as further variables (``enable_thinking``...), ``documents`` (RAG) as its ``documents``. A template error is a ValueError naming it."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message=True is invalid with add_generation_prompt=True: "
                             "continue the last message or start a new turn, not both")
        extra = check_template_kwargs(chat_template_kwargs)
        try:
            if documents is not None:
                extra["documents"] = documents
            text, ids = self._render_chat(messages, add_generation_prompt, chat_template, continue_final_message,
                                          tools, extra)
        except ValueError:
            raise
        except Exception as exc:  # jinja's raise_exception, undefined fields, template syntax
            raise ValueError(f"messages is invalid: the chat template failed: {exc}") from exc
        return {"prompt": text, "prompt_token_ids": ids}

    def render_template(self, messages: list[dict], chat_template: str, template_kwargs: dict | None = None) -> str:
        """``chat_template`` (a Jinja string) rendered on ``messages`` as transformers renders chat
        templates (its sandboxed Jinja, the tokenizer's special tokens as variables), no generation
        prompt, not tokenized: vLLM's score template (jaxllm/scoring.py). ``template_kwargs``: more
        variables (checked by ``check_template_kwargs`` first). Template errors propagate as they are."""
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                           chat_template=chat_template, **check_template_kwargs(template_kwargs))

    def _render_chat(self, messages, add_generation_prompt: bool, chat_template: str | None = None,
                     continue_final_message: bool = False, tools: list[dict] | None = None,
                     extra: dict | None = None) -> tuple[str, list[int]]:
        """The template rendered once; its text tokenized without added special tokens (what
        transformers' `apply_chat_template(tokenize=True)` does after rendering)."""
        if not (chat_template or self.hf.chat_template):
            raise ValueError("messages: this model's tokenizer has no chat template; send a plain prompt")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template,
                                           continue_final_message=continue_final_message,
                                           tools=tools or None, **(extra or {}))
        return text, self.encode(text, add_special_tokens=False)


def parse_tool_call_arguments(messages: list[dict], field: str = "messages") -> list[dict]:
    """The messages with each assistant tool call's ``arguments`` JSON text turned into a dict, as
    vLLM hands them to chat templates (copies; others unchanged). ValueError names a bad one."""
    out = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if calls:
            m = dict(m, tool_calls=[dict(c) for c in calls])
            for j, call in enumerate(m["tool_calls"]):
                fn = call.get("function")
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        call["function"] = dict(fn, arguments=json.loads(fn["arguments"]))
                    except json.JSONDecodeError as exc:
                        shown = fn["arguments"] if len(fn["arguments"]) <= 60 else fn["arguments"][:57] + "..."
                        raise ValueError(f"{field}[{i}].tool_calls[{j}].function.arguments={shown!r} is invalid: "
                                         f"not JSON ({exc})") from None
        out.append(m)
    return out


def check_text_parts(messages: list[dict], field: str = "messages") -> None:
    """A message ``content`` given as a list of OpenAI parts may hold text parts only: image, audio and
    file inputs are not supported (a multimodal checkpoint such as Gemma 3 27B runs its text model alone,
    and its template would render an image part as a bare image token). ValueError names the part."""
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"{field}[{i}].content[{j}].type={kind!r} is not supported: only text parts "
                                 f"(no image, audio or file inputs)")


# arguments of transformers' apply_chat_template that chat_template_kwargs may not set
_RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template",
                                       "add_generation_prompt", "continue_final_message", "tokenize",
                                       "return_dict", "return_tensors", "padding", "truncation", "max_length",
                                       "tokenizer_kwargs", "return_assistant_tokens_mask"})


def check_template_kwargs(kwargs) -> dict:
    """``chat_template_kwargs`` as a dict copy (None: empty); ValueError naming a key that is one of
    transformers' own apply_chat_template arguments, or a value that is not a mapping."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"chat_template_kwargs={kwargs!r} is invalid: must be a dict of template variables")
    for key in sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS):
        raise ValueError(f"chat_template_kwargs.{key} is invalid: {key} is set by its own argument")
    return dict(kwargs)


def _hf_tokenizer_from_gguf(path: str):
    """A transformers fast tokenizer from GGUF metadata read with the gguf package.

    transformers' own `gguf_file=` route reads metadata through a torch-based reader; this reads
    it with `gguf` and hands it to transformers' tokenizer converters, so no torch is needed."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from checkpoints.gguf_loader import open_gguf

    reader = open_gguf(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general.arch"))}
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece vocabularies
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    fast, extra = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
    return TokenizersBackend(tokenizer_object=fast, **config, **extra)


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas.

    Decodes a short window (a few already-emitted tokens for context plus the new ones) rather
    than the whole text each step, and holds back text while it ends in an incomplete UTF-8
    sequence (U+FFFD), so the concatenated deltas equal decoding all output ids at once.

    With a Rust `tokenizers` backend the same algorithm runs inside `tokenizers.decoders.DecodeStream`
    (one call per token: 1.25 against 4.35 us per token for the two window decodes below, SmolLM2,
    `bench/detokenize.py`, 2026-12-04); ids outside the backend's vocabulary are left out, as its
    decode leaves them out.
    """

    CONTEXT = 5  # tokens of left context kept for merges and leading-space handling

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # start of the decode window in self.ids
        self.read_offset = 0  # ids before this are reflected in self.text
        self._backend = getattr(tokenizer, "stream_backend", None)
        if self._backend is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            self._known = tokenizer.backend_vocab_size

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        if self._backend is not None:
            delta = ""
            for i in new_ids:
                if 0 <= i < self._known:
                    try:
                        delta += self._stream.step(self._backend, i) or ""
                    except Exception:  # noqa: BLE001 - "Invalid prefix encountered": a decode whose
                        # prefix changed (a special token inside a byte-fallback run): windows from here on
                        self._backend = None
                        self.text += delta
                        self.read_offset = len(self.ids)
                        self.prefix_offset = max(0, self.read_offset - self.CONTEXT)
                        return delta + self._resync()
            self.text += delta
            return delta
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if full.endswith("\ufffd") or len(full) < len(prefix_text) or not full.startswith(prefix_text):
            # Incomplete multi-byte character (or an unstable window): wait for more tokens.
            if not full.startswith(prefix_text):
                return self._resync()
            return ""
        delta = full[len(prefix_text):]
        self.text += delta
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - self.CONTEXT)
        return delta

    def _resync(self) -> str:
        """Rare: the window decode disagrees with what was emitted; fall back to a full decode."""
        full = self.tok.decode(self.ids, self.skip)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""
        delta = full[len(self.text):]
        self.text = full
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - self.CONTEXT)
        return delta


class TokenIdsOnlyTokenizer:
    """Stands in for models without tokenizer files (dummy presets): prompts must be token ids and
    outputs carry token ids with empty text."""

    has_text = False  # no token has a text: Logprob.decoded_token stays None

    def __init__(self, vocab_size: int, eos_token_ids=()):
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.all_special_ids: set[int] = set()
        self.bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError("prompt: this model has no tokenizer; pass {'prompt_token_ids': [...]} instead of text")

    def encode_pair(self, text: str, text_pair: str) -> list[int]:
        return self.encode(text)  # raises: no tokenizer to encode a text pair with

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        raise ValueError("messages: this model has no tokenizer or chat template; pass token ids")

    def chat_prompt(self, messages, add_generation_prompt: bool = True, **_) -> dict:
        self.apply_chat_template(messages, add_generation_prompt)
