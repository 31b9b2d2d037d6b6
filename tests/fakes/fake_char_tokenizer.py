"""The fake engine's tokenizer (tests/fakes/fake_engine.py; no jax): one token per Latin-1
character (id = ord(c), others as "?"), plus BOS=256, EOS=257; a chat template of
``<role>content`` lines."""

from __future__ import annotations

BOS, EOS = 256, 257
VOCAB_SIZE = 258


class FakeCharTokenizer:
    vocab_size = VOCAB_SIZE
    eos_token_ids = [EOS]
    bos_token_id = BOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) if ord(c) < 256 else ord("?") for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            if i < 256:
                out.append(chr(i))
            elif not skip_special_tokens:
                out.append("<bos>" if i == BOS else "<eos>")
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = ""
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"role={m.get('role')!r} is invalid: must be system, user or assistant")
            text += f"<{m['role']}>{m['content']}\n"
        if add_generation_prompt:
            text += "<assistant>"
        return self.encode(text)
