"""A byte-ish tokenizer: one token per ASCII character, a few special ids (no jax, no files).

ids: 0 = <bos>, 1 = <eos>, 2 = <sep> (special), 3 + ord(c) for c in chr(0..127).
"""

from __future__ import annotations

BOS, EOS, SEP = 0, 1, 2
_SPECIAL = {BOS: "<bos>", EOS: "<eos>", SEP: "<sep>"}
OFFSET = 3


class FakeTokenizer:
    vocab_size = OFFSET + 128
    eos_token_ids = {EOS}
    all_special_ids = set(_SPECIAL)

    def __init__(self, add_bos: bool = False) -> None:
        self.add_bos = add_bos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [OFFSET + (ord(c) & 127) for c in text]
        return ([BOS] if add_special_tokens and self.add_bos else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = []
        for i in ids:
            if i in _SPECIAL:
                if not skip_special_tokens:
                    out.append(_SPECIAL[i])
            else:
                out.append(chr(i - OFFSET))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += self.encode(f"{m['role']}: {m['content']}", add_special_tokens=False) + [SEP]
        if add_generation_prompt:
            ids += self.encode("assistant: ", add_special_tokens=False)
        return ids

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    chat_template: str | None = None, continue_final_message: bool = False,
                    tools: list[dict] | None = None, chat_template_kwargs: dict | None = None) -> dict:
        ids = self.apply_chat_template(messages, add_generation_prompt)
        if tools:  # the tools' names lead the conversation, as a system line would
            names = ",".join(t["function"]["name"] for t in tools)
            ids = self.encode(f"tools: {names}", add_special_tokens=False) + [SEP] + ids
        if continue_final_message:
            ids = ids[:-1]  # the last message's <sep>: left open
        return {"prompt": self.decode(ids, skip_special_tokens=False), "prompt_token_ids": ids}


class FakeIncrementalDetokenizer:
    def __init__(self, tokenizer: FakeTokenizer, prompt_ids: list[int], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        delta = self.tokenizer.decode(new_ids, self.skip_special_tokens)
        self.text += delta
        return delta
