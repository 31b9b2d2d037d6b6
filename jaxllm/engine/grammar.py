"""Grammars for structured outputs: llguidance matchers on the host, one packed bitmask per step.

- ``GrammarCompiler.check(spec)`` (engine thread, at admission): turns the spec into an
  llguidance grammar and validates it without the tokenizer (milliseconds); a bad schema, regex or
  grammar raises ``ValueError`` naming ``structured_outputs.<kind>``, so the request never enters
  the scheduler. ``submit(spec)`` builds the matcher (the tokenizer-dependent part) on a pool of
  daemon threads (``jaxllm/daemon_pool.py``: a compile in flight never holds up exit); both
  results sit in an LRU cache keyed by the spec, so a repeated schema costs nothing.
- ``GrammarState`` (one per sequence): ``ready`` once its matcher exists (the scheduler leaves the
  request waiting until then, without blocking others), ``accept(token)`` after every sampled token.
- ``fill_bitmask(states, width)``: ``[n, width]`` int32 rows, bit ``t % 32`` of word ``t // 32`` set
  iff token ``t`` is allowed next (llguidance's layout). Ids past the tokenizer's vocabulary (padded
  logits) are never allowed; a finished (or failed) grammar allows only EOS.

JSON is generated compactly (``", "`` and ``": "`` separators, no free whitespace): with
flexible whitespace a sampled model can emit blanks until ``max_tokens`` and never close the
object. llguidance drops the GIL while it builds a matcher or computes masks.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import threading
from collections.abc import Callable, Sequence

import numpy as np

from jaxllm.daemon_pool import DaemonPool
from jaxllm.structured_outputs import StructuredOutputsParams

log = logging.getLogger("jaxllm")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256  # compiled specs kept (LRU)


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar of a (shape-validated) spec; ValueError naming the field."""
    import llguidance

    kind = spec.kind
    value = getattr(spec, kind)
    try:
        if kind in ("json", "json_object"):
            schema = {"type": "object"} if kind == "json_object" else value
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        if kind == "choice":
            return llguidance.grammar_from("choice", list(value))
        return llguidance.grammar_from("grammar", value)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise ValueError(f"structured_outputs.{kind}={_short(value)} is invalid: {_one_line(e)}") from None


def hf_grammar_tokenizer(tokenizer, vocab_size: int):
    """llguidance's tokenizer from the model's own (HF fast) tokenizer; ``vocab_size`` = logits
    width (ids past the tokenizer's own vocabulary are never allowed)."""
    import llguidance.hf

    n_vocab = max(vocab_size, len(tokenizer.hf))
    return llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=n_vocab, eos_token=sorted(tokenizer.eos_token_ids))


def bytes_grammar_tokenizer(tokens: Sequence[bytes | None], eos_token_ids: Sequence[int]):
    """An llguidance tokenizer from each id's bytes (None = a special token). For byte-level test
    vocabularies (the fake tokenizer, tiny random models); encodes byte by byte."""
    import llguidance

    eos = sorted(eos_token_ids)
    by_byte = {t: i for i, t in enumerate(tokens) if t is not None and len(t) == 1}
    specials = [i for i, t in enumerate(tokens) if t is None]

    class _Bytes:
        eos_token_id = eos[0]
        bos_token_id = None
        special_token_ids = specials

        def __init__(self):
            self.tokens = [b"\xff<special_%d>" % i if t is None else t for i, t in enumerate(tokens)]

        def __call__(self, s: bytes) -> list[int]:
            return [by_byte[bytes([b])] for b in s if bytes([b]) in by_byte]

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()), eos_token=eos)


class GrammarCompiler:
    """Validated specs and compiled matcher templates, LRU-cached by spec; compiles on a pool."""

    def __init__(self, tokenizer_factory: Callable[[], object], vocab_size: int, eos_token_ids,
                 workers: int = 2, cache_size: int = CACHE_SIZE) -> None:
        self._tokenizer_factory = tokenizer_factory
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()
        self.vocab_size = vocab_size  # logits width
        self.eos_token_ids = sorted(eos_token_ids)
        self._pool = DaemonPool(workers, "jaxllm-grammar")  # daemon workers: exit never waits on a compile
        self._cache: collections.OrderedDict[tuple, tuple[str, concurrent.futures.Future | None]] = \
            collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiles = 0  # matchers built (cache misses)
        self._executor = None

    @property
    def tokenizer(self):
        with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = self._tokenizer_factory()
            return self._tokenizer

    def check(self, spec: StructuredOutputsParams) -> tuple:
        """Validate ``spec`` (engine thread, before admission); returns its cache key."""
        key = spec.key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return key
        import llguidance

        grammar = grammar_text(spec)
        err = llguidance.LLMatcher.validate_grammar(grammar, None)
        if err and not err.startswith("WARNING"):
            raise ValueError(f"structured_outputs.{spec.kind}={_short(getattr(spec, spec.kind))} is invalid: "
                             f"{_one_line(err)}")
        with self._lock:
            self._cache[key] = (grammar, None)
            self._trim()
        return key

    def submit(self, key: tuple) -> concurrent.futures.Future:
        """Future of the matcher template (initial state) for a checked spec's key."""
        with self._lock:
            grammar, fut = self._cache.get(key, (None, None))
        if grammar is None:  # evicted since check() (a full cache under many new specs): redo it
            kind, text = key
            value = {"choice": lambda: json.loads(text), "json_object": lambda: True}.get(kind, lambda: text)()
            self.check(StructuredOutputsParams(**{kind: value}))
        with self._lock:
            grammar, fut = self._cache.get(key, (None, None))
            if fut is None or fut.cancelled():  # a cancelled one was queued at a close(): compile again
                fut = self._pool.submit(self._compile, grammar)
                self._cache[key] = (grammar, fut)
                self._trim()
            self._cache.move_to_end(key)
            return fut

    def _trim(self) -> None:
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _compile(self, grammar: str):
        import llguidance

        self.num_compiles += 1
        return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)

    def new_state(self, key: tuple, reasoning_end: Sequence[int] | None = None) -> "GrammarState":
        return GrammarState(self.submit(key), self.eos_token_ids, reasoning_end)

    # ----- per step -------------------------------------------------------------------
    def fill_bitmask(self, states: Sequence["GrammarState"], width: int) -> np.ndarray:
        """``[len(states), width]`` int32 allowed-token bitmask of each state's next token."""
        import llguidance
        import llguidance.numpy as llnp

        live = [(s.matcher, i) for i, s in enumerate(states) if not s.thinking and not s.finished]
        tok_words = -(-self.tokenizer.vocab_size // 32) if live else width  # live: the tokenizer was built
        full = np.zeros((len(states), max(width, tok_words)), np.int32)  # [n, W'] i32 packed bits
        if len(live) == 1:
            llnp.fill_next_token_bitmask(live[0][0], full[:, :tok_words], live[0][1])
        elif live:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            view = np.ascontiguousarray(full[:, :tok_words]) if tok_words != full.shape[1] else full
            llnp.fill_next_token_bitmask_par(self._executor, live, view)
            if view is not full:
                full[:, :tok_words] = view
        out = np.ascontiguousarray(full[:, :width])
        bits = out.view(np.uint32)
        for i, s in enumerate(states):
            if s.thinking:  # the reasoning before the constraint: every token
                out[i] = -1
            elif s.finished:  # only EOS may follow
                bits[i] = 0
                for t in self.eos_token_ids:
                    bits[i, t // 32] |= np.uint32(1 << (t % 32))
        if self.vocab_size % 32:  # padded logits past the model's vocab: never allowed
            out[:, -1] &= np.int32((1 << (self.vocab_size % 32)) - 1)
        return out

    def close(self) -> None:
        """Stop the compile workers without waiting (``LLMEngine.close``): queued compiles are
        cancelled, one in flight finishes on its daemon thread. A later ``submit`` starts them again."""
        self._pool.close()


class GrammarState:
    """One sequence's matcher. ``ready`` once compiled; ``accept`` each sampled token.

    With ``reasoning_end`` (token ids) the sequence is ``thinking`` until its output holds them in
    a row: until then every token is allowed and none reaches the matcher (the end ids neither)."""

    __slots__ = ("_future", "_matcher", "eos_token_ids", "error", "_end", "_recent")

    def __init__(self, future: concurrent.futures.Future, eos_token_ids,
                 reasoning_end: Sequence[int] | None = None) -> None:
        self._future = future
        self._matcher = None
        self.eos_token_ids = eos_token_ids
        self.error: str | None = None
        self._end = list(reasoning_end) if reasoning_end else None  # None: constrained from the start
        self._recent: list[int] = []  # thinking: the output's last len(_end) tokens

    @property
    def thinking(self) -> bool:
        """Still before the end of the reasoning (unconstrained)."""
        return self._end is not None

    @property
    def ready(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float) -> None:
        concurrent.futures.wait([self._future], timeout=timeout)

    @property
    def matcher(self):
        """The sequence's own matcher, or None when building it failed (then only EOS is allowed)."""
        if self._matcher is None:
            try:
                self._matcher = self._future.result().deep_copy()
                if self._matcher.is_error():  # valid without the tokenizer, not with it
                    self.error = self._matcher.get_error()
            except Exception as e:  # noqa: BLE001 - e.g. the tokenizer could not be converted
                self._matcher, self.error = _FAILED, f"{type(e).__name__}: {e}"
            if self.error is not None:
                log.warning("structured outputs: the grammar failed to build (%s); the request ends "
                            "at once", _one_line(self.error))
        return None if self._matcher is _FAILED else self._matcher

    @property
    def finished(self) -> bool:
        m = self.matcher
        return m is None or m.is_stopped() or m.is_error()

    def accept(self, token_id: int) -> None:
        if self._end is not None:
            self._recent = (self._recent + [token_id])[-len(self._end):]
            if self._recent == self._end:
                self._end, self._recent = None, []
            return
        m = self.matcher
        if m is not None and not m.is_error() and not m.is_stopped():
            if not m.consume_token(token_id):
                self.error = m.get_error()


_FAILED = object()


def _one_line(e) -> str:
    return " ".join(str(e).split())[:300]


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."
