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
        """The allowed-token bitmask of every sampling seq with a grammar, when its matcher has seen
        every token before this step; when a constrained seq runs on a token still in flight (async
        scheduling, scheduler.late_grammar_mask) the step goes out with ``late_bitmask`` instead and
        ``_send_late_bitmask`` writes the masks once the step before is processed."""
        constrained = [s.sample and r.grammar is not None for s, r in zip(out.seqs, out.requests)]
        if not any(constrained):
            return
        out.constrained = constrained
        if any(s.placeholder for s, c in zip(out.seqs, constrained) if c):
            out.late_bitmask = True
            return
        out.grammar_bitmask = self._bitmask(out, constrained)

    def _bitmask(self, out, constrained: list[bool]) -> np.ndarray:
        """[num_seqs, W] i32: the constrained seqs' grammar masks, zero rows elsewhere."""
        states = [r.grammar for r, c in zip(out.requests, constrained) if c]
        masks = self.grammar.fill_bitmask(states, cdiv(self.vocab_size, 32))  # [n, W] i32
        bitmask = np.zeros((len(out.seqs), masks.shape[1]), np.int32)  # [num_seqs, W] i32
        bitmask[np.flatnonzero(constrained)] = masks
        return bitmask

    def _send_late_bitmask(self, out, pending) -> None:
        """A late-bitmask step's masks, now that the step before it is processed: its requests still
        running have seen every token; one finished, aborted or failed since gets a free row (its
        token there is discarded)."""
        if not getattr(pending, "needs_bitmask", False):  # already read back (nothing left to run)
            return
        live = [c and self.scheduler.holds(r) for r, c in zip(out.requests, out.constrained)]
        if any(live):
            pending.set_bitmask(self._bitmask(out, live), live)
        else:
            pending.set_bitmask(None, None)
