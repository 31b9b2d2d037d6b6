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


def _llama_style_tokenizer() -> Tokenizer:
    """A small sentencepiece-style vocabulary (Metaspace pre-tokenizer, byte fallback, Llama's decoder
    chain: the leading space of a decode is stripped), built here: no hub."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ["\u2581", "\u2581the", "\u2581cat", "\u2581sat", "the", "ing", ",", "\u258142", "a", "b", "c", "é", "ü",
                  "東京", "\u2581日本語", "Ω", "t", "h", "e", "\u2581n", "aï", "ve"]:
        vocab.setdefault(piece, len(vocab))
    rust = RustTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    rust.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>",
                                             unk_token="<unk>", clean_up_tokenization_spaces=False))


def _window_only(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer without the streaming backend: IncrementalDetokenizer's window decodes."""
    import copy

    plain = copy.copy(tok)
    plain.stream_backend = None
    return plain


@pytest.mark.parametrize("vocab", ["smollm2", "llama_style"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_incremental_detokenization_equals_full_decode(tok, vocab, skip_special):
    """The streamed text (tokenizers' DecodeStream) ends equal to the full decode, for a byte-level
    BPE (SmolLM2) and a byte-fallback sentencepiece-style vocabulary (Llama 2's decoder chain), with
    ids one or several at a time (accepted drafts). Byte-level: at every step it is the full decode
    less an incomplete trailing character, its deltas are the window decoder's token for token, and
    ids past the vocabulary (a padded model's rows) are left out as the decode leaves them out."""
    tok = tok if vocab == "smollm2" else _llama_style_tokenizer()
    assert tok.stream_backend is not None
    plain = _window_only(tok)
    rng = np.random.default_rng(0)
    specials = sorted(tok.all_special_ids)
    for case in range(100):  # 2 x 100 = 200 sequences per vocabulary
        if case % 3 == 0 and vocab == "smollm2":  # arbitrary ids: byte tokens split multi-byte characters
            # anywhere (not for byte fallback: its decode turns an invalid byte run into one U+FFFD per
            # byte, so "ɮ" becomes "\ufffd\ufffd\ufffd" once a third byte follows: no prefix to keep)
            ids = rng.integers(0, tok.vocab_size, rng.integers(1, 60)).tolist()
        else:
            ids = tok.encode(_random_text(rng))
            if case % 5 == 0:  # (byte fallback: not inside a byte run, test_stream_survives_... below)
                at = [j for j in range(len(ids) + 1) if vocab == "smollm2" or j == 0
                      or not tok.convert_ids_to_tokens([ids[j - 1]])[0].startswith("<0x")]
                ids.insert(int(rng.choice(at)), int(rng.choice(specials)))
        if case % 7 == 0 and vocab == "smollm2":  # (byte fallback: an unknown id inside a byte run splits it)
            ids.insert(int(rng.integers(0, len(ids) + 1)), tok.vocab_size + 3)
        prompt = tok.encode("Say:")
        detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special)
        window = IncrementalDetokenizer(plain, prompt, skip_special_tokens=skip_special)
        text = ""
        k = 0
        while k < len(ids):
            n = 1 if case % 4 else int(rng.integers(1, 4))  # 1-3 ids at once every fourth case
            new = ids[k:k + n]
            delta, window_delta = detok.add(new), window.add(new)
            if case % 4 and vocab == "smollm2":  # one id at a time: the same deltas (given several, the
                assert delta == window_delta, (case, k)  # stream may emit what precedes a partial character sooner)
            text += delta
            k += len(new)
            if vocab == "smollm2":  # byte-level BPE: a decode's prefix stays (byte fallback's may not:
                full = tok.decode(ids[:k], skip_special)  # "μ" + the first byte of "έ" decode to 3 x U+FFFD)
                # Text is held back only while the full decode ends in an incomplete UTF-8 character.
                assert full.startswith(text), (case, k)
                held = full[len(text):]
                assert held == "" or full.endswith("\ufffd"), (case, k, held)
        assert detok.text == text == tok.decode(ids, skip_special), case
        if vocab == "smollm2":  # (the window decoder garbles byte-fallback runs cut by its window)
            assert window.text == text, case


def test_stream_survives_a_special_token_inside_a_byte_run():
    """A special token after a character's bytes and inside the next one's changes the decode of
    what came before ("ß" becomes 4 x U+FFFD: tokenizers' DecodeStream raises "Invalid prefix"): the
    detokenizer goes on with window decodes and the text after it still comes out."""
    from tokenizers.decoders import DecodeStream

    tok = _llama_style_tokenizer()
    east = [3 + b for b in "東".encode()]
    ids = (tok.encode("the", add_special_tokens=False) + [3 + b for b in "ß".encode()] + east[:2] + [2]
           + east[2:] + tok.encode(" the cat", add_special_tokens=False))
    stream = DecodeStream(skip_special_tokens=False)
    with pytest.raises(Exception, match="Invalid prefix"):  # what the fallback is for
        for t in ids:
            stream.step(tok.stream_backend, t)
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False)
    text = "".join(detok.add([t]) for t in ids)
    assert text.startswith("theß") and text.endswith(" the cat") and detok.text == text


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
