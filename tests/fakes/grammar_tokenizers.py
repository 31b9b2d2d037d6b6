"""llguidance tokenizers for the test vocabularies (no HF tokenizer there): one byte per id."""
from __future__ import annotations

from jaxllm.engine.grammar import bytes_grammar_tokenizer
from tests.fakes.fake_tokenizer import _SPECIAL, OFFSET, FakeTokenizer


def fake_grammar_tokenizer():
    """FakeTokenizer's ids: specials, then one id per ASCII byte."""
    return bytes_grammar_tokenizer([None] * OFFSET + [bytes([c]) for c in range(128)],
                                   FakeTokenizer.eos_token_ids)


def byte_vocab_grammar_tokenizer(vocab_size: int, eos_token_ids):
    """A token-id-only model (tiny random HF llama): id i is byte i, EOS ids are special."""
    eos = set(eos_token_ids)
    return lambda: bytes_grammar_tokenizer([None if i in eos else bytes([i % 256]) if i < 256 else None
                                            for i in range(vocab_size)], sorted(eos))


def decode_bytes(ids, eos_token_ids) -> str:
    """The text of byte-vocabulary ids (trailing EOS dropped)."""
    return bytes(t for t in ids if t not in set(eos_token_ids)).decode("latin-1")


assert len(_SPECIAL) == OFFSET
