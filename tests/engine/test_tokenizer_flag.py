"""vLLM's --tokenizer (EngineConfig.tokenizer): the engine's tokenizer comes from the given HF
tokenizer directory instead of the checkpoint (here dummy tiny-llama's shapes, which have none).
Reference: the transformers tokenizer saved to that directory. (Building a whole engine for this
costs a dummy-weight load; ``build_engine`` passes ``tokenizer_source``'s answer to
``load_tokenizer``, the two calls tested here.)"""
from __future__ import annotations

import pytest

from checkpoints import load_tokenizer
from checkpoints.dummy import dummy_config
from jaxllm.config import EngineConfig
from jaxllm.engine.factory import tokenizer_source
from tests.models.hf_tiny import tiny_pair_tokenizer


def test_tokenizer_flag_replaces_the_checkpoints(tmp_path):
    ref = tiny_pair_tokenizer(512, words=("hello", "world"))
    ref.save_pretrained(tmp_path)
    config = EngineConfig(model="dummy:tiny-llama", tokenizer=str(tmp_path)).validate()
    assert tokenizer_source(config, None) == ("dir", str(tmp_path))
    assert tokenizer_source(EngineConfig(model="m"), ("gguf", "m.gguf")) == ("gguf", "m.gguf")  # unset: the model's
    assert tokenizer_source(EngineConfig(model="m", tokenizer="t.gguf"), ("dir", "m")) == ("gguf", "t.gguf")
    tok = load_tokenizer(tokenizer_source(config, None), dummy_config("tiny-llama"))
    text = "hello world hello"
    assert list(tok.encode(text)) == ref(text)["input_ids"]
    assert tok.decode(ref(text)["input_ids"], skip_special_tokens=True) == text


def test_tokenizer_flag_must_name_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer='.*' is invalid: need an HF tokenizer directory"):
        EngineConfig(model="m", tokenizer=str(tmp_path)).validate()  # a directory without tokenizer files
