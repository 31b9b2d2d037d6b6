"""LLM.beam_search on the real jitted engine (tiny random llama) against a brute-force beam search:
vLLM's algorithm written out plainly over HF transformers' full forward of the same weights (no KV
cache, one forward per beam per step). Sequences must be identical, cum_logprobs equal to f32
rounding; the reference asserts its own ranking margins so a near-tie cannot pass or fail by luck."""
import json
import os

import numpy as np
import pytest

from jaxllm import LLM, BeamSearchParams, SamplingParams
from tests.models.hf_tiny import make_tiny_hf

TOL = 1e-4  # jax vs torch f32 logprobs; the reference's ranking margins (scores) must exceed it


class Reference:
    def __init__(self, path: str):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self.forwards = 0

    def logprobs(self, tokens: list[int]) -> np.ndarray:  # [vocab] f64, next token after `tokens`
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([tokens])).logits[0, -1].double()
        self.forwards += 1
        return self.torch.log_softmax(logits, -1).numpy()

    def beam_search(self, prompt, width, max_tokens, eos, *, length_penalty=1.0, ignore_eos=False,
                    max_model_len=10**9, include_stop=False):
        """vLLM's LLM.beam_search step for step: 2*width candidates per beam, EOS candidates finish,
        the best `width` others live on, final ranking over finished + live by the penalised score."""
        def score(toks, cum):
            n = len(toks) - (1 if toks[-1] in eos else 0)
            return cum / n ** length_penalty

        live, done, margins = [(list(prompt), 0.0)], [], []
        for _ in range(min(max_tokens, max_model_len - len(prompt))):
            cands = []
            for toks, cum in live:
                lp = self.logprobs(toks)
                for t in np.argsort(-lp, kind="stable")[:2 * width].tolist():
                    if t in eos and not ignore_eos:
                        done.append((toks + [t] if include_stop else toks, cum + lp[t], "stop", t))
                    else:
                        cands.append((toks + [t], cum + lp[t]))
            cands.sort(key=lambda c: score(*c), reverse=True)
            if len(cands) > width:
                margins.append(score(*cands[width - 1]) - score(*cands[width]))
            live = cands[:width]
            if not live:
                break
        done += [(toks, cum, "length", None) for toks, cum in live]
        done.sort(key=lambda d: score(d[0], d[1]), reverse=True)
        best = done[:width]
        if len(done) > width:
            margins.append(score(*done[width - 1][:2]) - score(*done[width][:2]))
        assert not margins or min(margins) > TOL, f"reference ranking too close to call: {min(margins)}"
        return best


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = sharpened_tiny_llama(str(tmp_path_factory.mktemp("beam")))
    ref = Reference(d)
    # EOS mid-beam: the id the best beam (EOS ignored) picks second becomes the model's EOS
    first = ref.beam_search(PROMPTS[0], 3, 4, eos=set(), ignore_eos=True)
    eos = first[0][0][len(PROMPTS[0]) + 1]
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = eos
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    # 16 seqs: every live beam (3 prompts x width 4 at most) still runs in every step; buckets decode 8/16,
    # mixed 64 (3 step programs to compile, not 5)
    llm = LLM(d, max_model_len=48, max_num_seqs=16, max_num_batched_tokens=64, block_size=4)
    return llm, ref, eos


def sharpened_tiny_llama(root: str) -> str:
    """The tiny random llama with its lm_head scaled up: a random model's next-token distribution
    is nearly flat, so beams tie within f32 noise; sharper logits give rankings one can call."""
    import torch
    import transformers

    d = make_tiny_hf("llama", root, seed=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(d)
    return d


LOGIT_SCALE = 10.0
PROMPTS = [[5, 17, 33, 2, 99, 140, 7], [200, 3, 3, 81, 12], list(range(30, 43))]


def check(outs, refs, prompts):
    assert len(outs) == len(refs)
    for out, ref, prompt in zip(outs, refs, prompts):
        got = [(s.tokens, s.finish_reason, s.stop_reason) for s in out.sequences]
        want = [(toks, fin, stop) for toks, _, fin, stop in ref]
        assert got == want
        for s, (_, cum, _, _) in zip(out.sequences, ref):
            assert abs(s.cum_logprob - cum) < TOL
            assert s.tokens[:len(prompt)] == prompt
            # one logprobs entry per generated token (the EOS's too), holding the chosen token
            gen = s.tokens[len(prompt):] + ([s.stop_reason] if s.finish_reason == "stop" and
                                            s.tokens[-1] != s.stop_reason else [])
            assert len(s.logprobs) == len(gen)
            assert abs(sum(e[t].logprob for e, t in zip(s.logprobs, gen)) - s.cum_logprob) < 1e-6


def assert_no_leak(llm):
    s = llm.engine.get_stats()
    assert s.num_free_blocks == s.num_blocks and not llm.engine.has_unfinished_requests()
    assert not llm.engine.kv.req_blocks
    llm.engine.kv.pool.check_invariants()


class Computed:
    """Stat logger: tokens the engine computed, per step."""

    def __init__(self):
        self.per_step = []

    def record(self, scheduler_stats, it) -> None:
        if it is not None and it.step_time is not None:
            self.per_step.append(it.num_batched_tokens)


@pytest.mark.parametrize("width,lp", [(4, 1.0), (3, 0.3)])
def test_batched_prompts_match_brute_force_with_eos(setup, width, lp):
    llm, ref, eos = setup
    params = BeamSearchParams(beam_width=width, max_tokens=6, length_penalty=lp)
    computed = Computed()
    llm.engine.add_stat_logger(computed)
    try:
        outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    finally:
        llm.engine.stat_loggers.remove(computed)
    refs = [ref.beam_search(p, width, 6, {eos}, length_penalty=lp) for p in PROMPTS]
    check(outs, refs, PROMPTS)
    assert any(s.finish_reason == "stop" for o in outs for s in o.sequences)  # EOS ended some beam
    # one step per depth for all prompts; after the prompts' prefill every beam computes exactly one
    # token a step: forks share their parent's blocks (the partial one copied on the device)
    # (the first step prefills what the prefix cache does not hold of the prompts)
    assert len(PROMPTS) <= computed.per_step[0] <= sum(map(len, PROMPTS))
    assert computed.per_step[1:] == [width * len(PROMPTS)] * 5
    assert_no_leak(llm)


def test_include_stop_str_and_ignore_eos(setup):
    llm, ref, eos = setup
    p = PROMPTS[0]
    out = llm.beam_search([p], BeamSearchParams(beam_width=3, max_tokens=5, include_stop_str_in_output=True))
    check(out, [ref.beam_search(p, 3, 5, {eos}, include_stop=True)], [p])
    stops = [s for s in out[0].sequences if s.finish_reason == "stop"]
    assert stops and all(s.tokens[-1] == eos == s.stop_reason for s in stops)
    out = llm.beam_search([p], BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True))
    check(out, [ref.beam_search(p, 3, 5, {eos}, ignore_eos=True)], [p])
    assert all(len(s.tokens) == len(p) + 5 and s.finish_reason == "length" for s in out[0].sequences)
    assert_no_leak(llm)


def test_width_one_is_greedy(setup):
    llm, _, _ = setup
    params = BeamSearchParams(beam_width=1, max_tokens=8, ignore_eos=True)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    greedy = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                          SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0), use_tqdm=False)
    for o, g, p in zip(outs, greedy, PROMPTS):
        (s,) = o.sequences
        assert s.tokens == p + g.outputs[0].token_ids
        assert abs(s.cum_logprob - g.outputs[0].cumulative_logprob) < 1e-5
    assert_no_leak(llm)


def test_max_model_len_caps_beams(setup):
    llm, ref, eos = setup
    p = list(range(1, 45))  # 44 tokens, max_model_len 48: 4 tokens of room
    out = llm.beam_search([p], BeamSearchParams(beam_width=2, max_tokens=10, ignore_eos=True))
    check(out, [ref.beam_search(p, 2, 10, {eos}, ignore_eos=True, max_model_len=48)], [p])
    assert [len(s.tokens) for s in out[0].sequences] == [48, 48]
    assert_no_leak(llm)


@pytest.mark.parametrize("kw,field", [
    (dict(beam_width=0, max_tokens=4), "beam_width=0"),
    (dict(beam_width=11, max_tokens=4), "beam_width=11"),
    (dict(beam_width=2, max_tokens=0), "max_tokens=0"),
    (dict(beam_width=2, max_tokens=4, temperature=-1.0), "temperature=-1.0"),
    (dict(beam_width=2, max_tokens=4, length_penalty=float("nan")), "length_penalty=nan"),
])
def test_bad_params_one_line(kw, field):
    with pytest.raises(ValueError, match=f"^{field} is invalid") as e:
        BeamSearchParams(**kw)
    assert "\n" not in str(e.value)


def test_bad_prompt_leaves_engine_usable(setup):
    llm, _, _ = setup
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    for bad, field in (([[1, 2], [1, 999]], r"prompt_token_ids\[1\]=999"), ([list(range(48))], "prompt length=48"),
                       ([[1, 2]], "params of type")):
        with pytest.raises(ValueError, match=field):
            llm.beam_search(bad, params if field != "params of type" else {"beam_width": 2})
        assert_no_leak(llm)
    assert len(llm.beam_search([[1, 2]], params)[0].sequences) == 2
    assert_no_leak(llm)


def test_sampled_beams_score_their_own_tokens(setup):
    """temperature > 0: a beam continues its request only when it picked the token that request
    sampled, otherwise it forks; either way every beam's cum_logprob must be its own tokens' logprob
    under a full forward (a beam riding a request that decoded another token would not be)."""
    llm, ref, eos = setup
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS],
                           BeamSearchParams(beam_width=3, max_tokens=6, temperature=1.5, ignore_eos=True))
    for p, out in zip(PROMPTS, outs):
        assert len(out.sequences) == 3
        for s in out.sequences:
            want = sum(ref.logprobs(s.tokens[:i])[s.tokens[i]] for i in range(len(p), len(s.tokens)))
            assert abs(s.cum_logprob - want) < TOL
    assert_no_leak(llm)
