"""bad_words (vLLM's): tokenization rule, per-step bans against a brute-force matcher, and engine runs
on the fake runner (sync, async, speculative, mixed batches) where the unconstrained greedy run
produced each word and the constrained one never does."""
import random

import pytest

from jaxllm.engine.bad_words import banned_token_ids, tokenize_bad_words
from jaxllm.sampling_params import MAX_BAD_WORD_TOKENS, MAX_BAD_WORDS, SamplingParams
from jaxllm.tokenizer import TokenIdsOnlyTokenizer
from tests.engine.conftest import make_engine, run_all
from tests.fakes.fake_tokenizer import FakeTokenizer


class WordTokenizer:
    """A BPE-like toy: a word is one token, with its leading space folded in when it has one
    ("hi" -> [10], " hi" -> [11]); "bye" has no spaced token (" bye" -> [2, 12], a longer spelling);
    anything else one token per character."""
    has_text = True
    WORDS = {"hi": 10, " hi": 11, "bye": 12, "a b": 13, " a b": 14}

    def encode(self, text, add_special_tokens=True):
        if text in self.WORDS:
            return [self.WORDS[text]]
        if text == " bye":
            return [2, 12]
        return [100 + ord(c) for c in text]


def test_tokenization_follows_vllms_rule():
    tok = WordTokenizer()
    # the spaced form is kept only when it is as long and starts with another token
    assert tokenize_bad_words(["hi", "  bye", "a b"], tok, 300) == ((10,), (11,), (12,), (13,), (14,))
    assert tokenize_bad_words(["xy"], tok, 300) == ((220, 221),)  # " xy" is 3 tokens: dropped
    assert tokenize_bad_words(["xy"], FakeTokenizer(), 131) == ((123, 124),)  # " xy" is 3 chars: dropped


def brute_bans(seqs, out):
    """Every t such that out + [t] ends with one of seqs, seqs lying wholly in out + [t]."""
    cands = {s[-1] for s in seqs}
    return {t for t in cands for s in seqs
            if s[-1] == t and len(s) <= len(out) + 1 and (out + [t])[len(out) + 1 - len(s):] == list(s)}


def test_bans_match_brute_force():
    rng = random.Random(0)
    for _ in range(3000):
        seqs = tuple(tuple(rng.randrange(4) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4)))
        out = [rng.randrange(4) for _ in range(rng.randint(0, 6))]
        got = banned_token_ids(seqs, out)
        assert len(got) == len(set(got)) and set(got) == brute_bans(seqs, out), (seqs, out)


def test_limits_are_one_line_errors():
    with pytest.raises(ValueError, match=rf"^bad_words=\[.* is invalid: must be None or a list of 1 to {MAX_BAD_WORDS} words$"):
        SamplingParams(bad_words=["w"] * (MAX_BAD_WORDS + 1))
    with pytest.raises(ValueError, match=r"^bad_words=\['ok', '  '\] is invalid: every word must be a str with"):
        SamplingParams(bad_words=["ok", "  "])
    with pytest.raises(ValueError, match=r"^bad_words=\[\] is invalid"):
        SamplingParams(bad_words=[])
    long = "x" * (MAX_BAD_WORD_TOKENS + 1)
    with pytest.raises(ValueError, match=rf"^bad_words word '{long}' is invalid: it is {MAX_BAD_WORD_TOKENS + 1} "
                                         rf"tokens, must be 1 to {MAX_BAD_WORD_TOKENS}$"):
        tokenize_bad_words([long], FakeTokenizer(), 131)
    with pytest.raises(ValueError, match=r"^bad_words word 'hi' is invalid: token ids \[10\] are past the vocabulary"):
        tokenize_bad_words(["hi"], WordTokenizer(), 10)
    with pytest.raises(ValueError, match=r"^bad_words=\['x'\] is invalid: this model has no tokenizer"):
        tokenize_bad_words(["x"], TokenIdsOnlyTokenizer(50), 50)
    eng = make_engine()
    with pytest.raises(ValueError, match=r"^bad_words word"):
        eng.add_request("a", "hello", SamplingParams(bad_words=["ok", long]))
    assert not eng.has_unfinished_requests() and not eng.scheduler.requests


def occurs(seq, out) -> bool:
    return any(out[i:i + len(seq)] == list(seq) for i in range(len(out) - len(seq) + 1))


PROMPTS = ["The quick brown fox", "jumps over", "the lazy dog.", "Pack my box with five dozen"]


def words_from(text, rng):
    """Words the text contains: two- and three-character pieces and one single character."""
    words = []
    for n in (2, 3, 2, 1):
        i = rng.randrange(0, len(text) - n)
        if text[i:i + n].strip() == text[i:i + n] and text[i:i + n] not in words:
            words.append(text[i:i + n])
    return words


def run(prompts, params_list, **cfg):
    eng = make_engine(**cfg)
    for i, (p, sp) in enumerate(zip(prompts, params_list)):
        eng.add_request(f"r{i}", p, sp)
    finals = run_all(eng)
    return [finals[f"r{i}"] for i in range(len(prompts))], eng


@pytest.mark.parametrize("cfg", [{}, {"async_scheduling": True},
                                 {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3,
                                                         "prompt_lookup_max": 2, "prompt_lookup_min": 1}}],
                         ids=["sync", "async", "ngram-spec"])
def test_greedy_never_produces_a_bad_word_the_free_run_produced(cfg):
    tok, rng = FakeTokenizer(), random.Random(1)
    free_params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    free, _ = run(PROMPTS, [free_params] * len(PROMPTS))
    words = [words_from(o.outputs[0].text, rng) for o in free]
    # every other request is constrained; the rest must not feel it
    params = [free_params.clone(bad_words=w) if i % 2 == 0 else free_params for i, w in enumerate(words)]
    got, eng = run(PROMPTS, params, **cfg)
    changed = 0
    for i, (f, g, w) in enumerate(zip(free, got, words)):
        fo, go = list(f.outputs[0].token_ids), list(g.outputs[0].token_ids)
        if i % 2:
            assert go == fo
            continue
        seqs = tokenize_bad_words(w, tok, tok.vocab_size)
        assert any(occurs(s, fo) for s in seqs), "the free run must produce a bad word"
        assert not any(occurs(s, go) for s in seqs), (w, g.outputs[0].text)
        # up to its first banned token, the constrained run is the free run
        first = min(k for k in range(len(fo)) if any(occurs(s, fo[:k + 1]) for s in seqs))
        assert go[:first] == fo[:first] and go[first] != fo[first]
        changed += 1
    assert changed == 2


def test_async_equals_sync_with_bad_words():
    tok, rng = FakeTokenizer(), random.Random(2)
    base = SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True, n=2)
    free, _ = run(PROMPTS, [base] * len(PROMPTS))
    params = [base.clone(bad_words=words_from(o.outputs[0].text, rng)) for o in free]
    sync, _ = run(PROMPTS, params)
    asyn, eng = run(PROMPTS, params, async_scheduling=True)
    assert eng.async_scheduling
    for s, a, p in zip(sync, asyn, params):
        assert [c.token_ids for c in s.outputs] == [c.token_ids for c in a.outputs]
        seqs = tokenize_bad_words(p.bad_words, tok, tok.vocab_size)
        assert not any(occurs(q, list(c.token_ids)) for q in seqs for c in s.outputs)
