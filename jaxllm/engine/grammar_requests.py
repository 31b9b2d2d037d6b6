"""LLMEngine's structured outputs (mixin, no jax): the grammar compiler it makes on first use, and
the allowed-token bitmask it writes into each SchedulerOutput (see engine.py's docstring and
jaxllm/engine/grammar.py)."""

from __future__ import annotations

import numpy as np

from jaxllm.core.kv_cache_manager import cdiv


class GrammarRequestsMixin:

    def grammar_compiler(self):
        """The structured-outputs compiler (made on first use: llguidance's tokenizer takes ~1 s)."""
        if self.grammar is None:
            from jaxllm.engine.grammar import GrammarCompiler, hf_grammar_tokenizer

            factory = self._grammar_tokenizer
            if factory is None:
                if getattr(self.tokenizer, "hf", None) is None:
                    raise ValueError("structured_outputs is invalid for this model: it has no text tokenizer "
                                     "(token-id-only model), so grammars cannot be matched")
                tok, vocab = self.tokenizer, self.vocab_size
                factory = lambda: hf_grammar_tokenizer(tok, vocab)  # noqa: E731
            self.grammar = GrammarCompiler(factory, self.vocab_size, self.eos_token_ids)
        return self.grammar

    def _attach_bitmask(self, out) -> None:
        """The allowed-token bitmask of every sampling seq with a grammar (its matcher has seen every
        token before this step: constrained requests never run on a token still in flight)."""
        constrained = [s.sample and r.grammar is not None for s, r in zip(out.seqs, out.requests)]
        if not any(constrained):
            return
        states = [r.grammar for r, c in zip(out.requests, constrained) if c]
        masks = self.grammar.fill_bitmask(states, cdiv(self.vocab_size, 32))  # [n, W] i32
        bitmask = np.zeros((len(out.seqs), masks.shape[1]), np.int32)  # [num_seqs, W] i32
        bitmask[np.flatnonzero(constrained)] = masks
        out.grammar_bitmask, out.constrained = bitmask, constrained
