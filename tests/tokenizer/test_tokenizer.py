"""SmolLM2's tokenizer from GGUF metadata: chat template, and incremental detokenization equal to a
whole-sequence decode at every step."""
import numpy as np
import pytest

from checkpoints.loader import packaged_model_path
from jaxllm.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok():
    path = packaged_model_path("smollm2-135m")
    from checkpoints.gguf_loader import gguf_config, open_gguf

    return Tokenizer.from_gguf(path, gguf_config(open_gguf(path), path).eos_token_ids)


def test_matches_transformers_gguf_tokenizer(tok):
    import os

    from transformers import AutoTokenizer

    path = packaged_model_path("smollm2-135m")
    ref = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    # The fixture converted the metadata (or read the cache); this one reads the cache the first wrote.
    cached = Tokenizer.from_gguf(path, tok.eos_token_ids)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    for t in (tok, cached):
        for text in ["Hello world", "  leading spaces", "naïve café 東京 🙂", "def f(x):\n    return x"]:
            assert t.encode(text) == ref.encode(text)
        ids = t.apply_chat_template(msgs)
        assert ids == list(ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
        assert t.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
        assert 2 in t.eos_token_ids  # <|im_end|>
        assert t.all_special_ids == tok.all_special_ids and t.vocab_size == tok.vocab_size


def test_cached_gguf_tokenizer_does_not_import_torch(tok):
    """Start-up: the packaged model's tokenizer comes from the conversion cache without torch."""
    import subprocess
    import sys

    code = ("import sys; from checkpoints.loader import packaged_model_path; from jaxllm.tokenizer import Tokenizer; "
            "Tokenizer.from_gguf(packaged_model_path('smollm2-135m')); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("skip_special", [True, False])
def test_decode_equals_transformers_decode(tok, skip_special):
    """Tokenizer.decode takes the Rust decoder directly; it must equal transformers' decode."""
    assert tok._fast_decode is not None  # SmolLM2: the fast path is the one under test
    rng = np.random.default_rng(1)
    specials = sorted(tok.all_special_ids)
    for _ in range(200):
        ids = rng.integers(0, tok.vocab_size, rng.integers(0, 40)).tolist()
        ids.insert(int(rng.integers(0, len(ids) + 1)), int(rng.choice(specials)))
        assert tok.decode(ids, skip_special) == tok.hf.decode(ids, skip_special_tokens=skip_special)


MULTIBYTE = ["é", "ü", "ß", "東京", "日本語", "🙂", "👍🏽", "Ωμέγα", "привет", "∑∫", "😀😃", "naïve"]


def _random_text(rng) -> str:
    words = ["the", " cat", " sat", "\n", "  ", "ing", ",", " 42", "<", "\t"] + MULTIBYTE + [" " + m for m in MULTIBYTE]
    return "".join(rng.choice(words) for _ in range(rng.integers(1, 30)))


@pytest.mark.parametrize("skip_special", [True, False])
def test_incremental_detokenization_equals_full_decode(tok, skip_special):
    rng = np.random.default_rng(0)
    specials = sorted(tok.all_special_ids)
    for case in range(100):  # 2 x 100 = 200 sequences
        if case % 3 == 0:  # arbitrary ids: byte tokens split multi-byte characters anywhere
            ids = rng.integers(0, tok.vocab_size, rng.integers(1, 60)).tolist()
        else:
            ids = tok.encode(_random_text(rng))
            if case % 5 == 0:
                ids.insert(int(rng.integers(0, len(ids) + 1)), int(rng.choice(specials)))
        prompt = tok.encode("Say:")
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special)
        text = ""
        for k, t in enumerate(ids):
            text += detok.add([t])
            full = tok.decode(ids[:k + 1], skip_special)
            # Text is held back only while the full decode ends in an incomplete UTF-8 character.
            assert full.startswith(text), (case, k)
            held = full[len(text):]
            assert held == "" or full.endswith("\ufffd"), (case, k, held)
        assert detok.text == text


def test_chat_prompt_text_ids_override_and_continuation(tok):
    """chat_prompt: the rendered text and its ids agree with transformers; a template override and
    continue_final_message reach the template; template errors are ValueErrors naming messages."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    p = tok.chat_prompt(msgs)
    assert p["prompt_token_ids"] == tok.apply_chat_template(msgs)
    assert p["prompt"] == tok.hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert p["prompt"].endswith("<|im_start|>assistant\n")
    assert tok.encode(p["prompt"], add_special_tokens=False) == p["prompt_token_ids"]
    cont = tok.chat_prompt(msgs + [{"role": "assistant", "content": "The capital is"}],
                           add_generation_prompt=False, continue_final_message=True)
    assert cont["prompt"].endswith("The capital is")  # left open: no <|im_end|>
    assert cont["prompt_token_ids"][:len(p["prompt_token_ids"])] == p["prompt_token_ids"]
    own = tok.chat_prompt(msgs, add_generation_prompt=False, chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert own["prompt"] == "[What is the capital of France?]"
    with pytest.raises(ValueError, match="continue_final_message=True is invalid"):
        tok.chat_prompt(msgs, continue_final_message=True)
    with pytest.raises(ValueError, match="messages is invalid: the chat template failed: no roles"):
        tok.chat_prompt(msgs, chat_template="{{ raise_exception('no roles') }}")


def test_convert_ids_to_tokens_gives_vocabulary_strings(tok):
    """/tokenize's token_strs: the BPE vocabulary's strings (a leading space is "Ġ"), which join
    back to the text through the byte-level mapping; specials by name."""
    ids = tok.encode("Hello world", add_special_tokens=False)
    strs = tok.convert_ids_to_tokens(ids)
    assert len(strs) == len(ids) and strs[-1] == "Ġworld" and "".join(strs).replace("Ġ", " ") == "Hello world"
    assert tok.convert_ids_to_tokens([tok.hf.eos_token_id]) == [tok.hf.eos_token]


def test_processor_chat_template_json_is_read(tmp_path):
    """A multimodal checkpoint (Gemma 3 4B-27B) may keep its template only in the processor's
    chat_template.json, which transformers' AutoTokenizer does not read: from_dir falls back to it, as
    vLLM does; a template of the tokenizer's own wins."""
    import json

    from tokenizers import Tokenizer as RustTokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", "<bos>", "[", "]"] + list("abcdefghijklmnopqrstuvwxyz"))}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": "hi"}]
    with open(tmp_path / "chat_template.json", "w") as f:
        json.dump({"chat_template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"}, f)
    assert Tokenizer.from_dir(str(tmp_path)).chat_prompt(msgs, add_generation_prompt=False)["prompt"] == "[hi]"
    with open(tmp_path / "chat_template.jinja", "w") as f:
        f.write("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert Tokenizer.from_dir(str(tmp_path)).chat_prompt(msgs, add_generation_prompt=False)["prompt"] == "hi"
