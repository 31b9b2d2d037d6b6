"""Host-side faults injected into one request (the engine must fail only that request)."""
from __future__ import annotations

from jaxllm.engine import output_processor
from tests.fakes.fake_tokenizer import FakeIncrementalDetokenizer


class PoisonDetokenizer(FakeIncrementalDetokenizer):
    """Raises UnicodeDecodeError once a prompt starting with "POISON" has 2 characters of output."""

    def __init__(self, tokenizer, prompt_ids, skip_special_tokens):
        super().__init__(tokenizer, prompt_ids, skip_special_tokens)
        self.poisoned = tokenizer.decode(prompt_ids).startswith("POISON")

    def add(self, new_ids):
        if self.poisoned and len(self.text) >= 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return super().add(new_ids)


def explode_on_boom_stop(monkeypatch) -> None:
    """The stop checker raises RuntimeError("stop checker exploded") for requests with stop "BOOM"."""
    real = output_processor.find_stop_string

    def flaky(text, n_new, stops, include):
        if "BOOM" in stops:
            raise RuntimeError("stop checker exploded")
        return real(text, n_new, stops, include)

    monkeypatch.setattr(output_processor, "find_stop_string", flaky)
