"""LLM.beam_search's engine bookkeeping on the fake runner (no jax): forks, continued requests,
aborts and prefix-cache hits under the fake's KV checks (a fork reading a stale or wrong block
fails there), sync and async scheduling, against a brute force over the fake "model"; no leaked
blocks; one engine step per depth for all prompts (synchronous engine)."""
import pytest

from jaxllm import LLM, BeamSearchParams
from jaxllm.core.request import RequestStatus  # noqa: F401 - the engine's own
from tests.engine.conftest import assert_clean, make_engine
from tests.fakes.fake_runner import _mix, context_hash

V = 131  # FakeTokenizer's vocabulary
EOS = 1


def fake_candidates(ctx: list[int], k: int) -> list[tuple[int, float]]:
    """The fake runner's greedy token for `ctx` and its k-wide logprob list (tests/fakes/fake_runner.py)."""
    tok = context_hash(ctx) % V
    lp = -float(_mix(tok, len(ctx)) % 1000) / 100.0
    return [((tok + i) % V, lp - i) for i in range(k)]


def brute_force(prompt, width, max_tokens, max_model_len, length_penalty=1.0):
    def score(toks, cum):
        return cum / (len(toks) - (toks[-1] == EOS)) ** length_penalty

    live, done = [(list(prompt), 0.0)], []
    for _ in range(min(max_tokens, max_model_len - len(prompt))):
        cands = []
        for toks, cum in live:
            for t, lp in fake_candidates(toks, 2 * width):
                if t == EOS:
                    done.append((toks, cum + lp, "stop"))
                else:
                    cands.append((toks + [t], cum + lp))
        cands.sort(key=lambda c: score(*c), reverse=True)
        live = cands[:width]
        if not live:
            break
    done += [(t, c, "length") for t, c in live]
    done.sort(key=lambda d: score(d[0], d[1]), reverse=True)
    return done[:width]


PROMPTS = [[3 + ord(c) for c in s] for s in ("hello", "beam search!", "x")]


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("width,lp", [(1, 1.0), (3, 1.0), (5, 0.5)])
def test_matches_brute_force_no_leaks(async_scheduling, width, lp):
    engine = make_engine(num_blocks=96, block_size=4, max_num_seqs=32, max_num_batched_tokens=256,
                         max_model_len=40, async_scheduling=async_scheduling)
    llm = LLM(engine=engine)
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=width, max_tokens=12, length_penalty=lp))
    for p, out in zip(PROMPTS, outs):
        want = brute_force(p, width, 12, 40, lp)
        assert [(s.tokens, s.cum_logprob, s.finish_reason) for s in out.sequences] == want
        for s in out.sequences:
            assert s.text == engine.tokenizer.decode(s.tokens, skip_special_tokens=False)
    assert any(s.finish_reason == "stop" for o in outs for s in o.sequences) or width == 1
    # every depth of every prompt in one engine step: an async engine is stepped synchronously for
    # the search (a fork needs the previous step read back) and is async again afterwards
    assert engine.num_steps == 12 and engine.async_scheduling == async_scheduling
    assert_clean(engine)


def test_continued_beams_skip_prefill():
    """A beam that keeps its request's own sampled token costs one decode token, no prefill: the
    engine computes far fewer tokens than vLLM's resubmit-every-beam scheme would."""
    engine = make_engine(num_blocks=96, block_size=4, max_num_seqs=32, max_num_batched_tokens=256,
                         max_model_len=64, async_scheduling=False)
    llm = LLM(engine=engine)
    p = PROMPTS[1]
    llm.beam_search([p], BeamSearchParams(beam_width=4, max_tokens=16))
    computed = sum(o.num_batched_tokens for o in engine.runner.steps)
    beams_per_step = [len(o.seqs) for o in engine.runner.steps]
    assert len(beams_per_step) == 16 and beams_per_step[0] == 1 and max(beams_per_step) == 4
    # vLLM resubmits every beam each step: its tokens after the last full cached block are prefilled
    # again (L - ((L - 1) // block) * block of a length-L beam, 1 to 4 tokens here)
    resubmit = len(p) + sum(n * (L - (L - 1) // 4 * 4) for n, L in
                            zip(beams_per_step[1:], range(len(p) + 1, len(p) + 16)))
    decode_only = len(p) + sum(beams_per_step[1:])
    # forks share their parent's blocks (partial one copied): every beam computes one token a step
    assert computed == decode_only < resubmit, (decode_only, computed, resubmit)
    assert engine.runner.num_block_copies > 0
    assert_clean(engine)


@pytest.mark.parametrize("caching", [False, True])
def test_forks_under_preemption_and_without_prefix_caching(caching):
    """A KV pool far too small for every beam: requests (forks among them) are preempted and
    recomputed, pins of forks not admitted yet hold their source blocks; without prefix caching
    forks fall back to a full prefill. Same beams as the brute force either way, nothing leaks."""
    engine = make_engine(num_blocks=12, block_size=4, max_num_seqs=32, max_num_batched_tokens=64,
                         max_model_len=40, enable_prefix_caching=caching, async_scheduling=False)
    llm = LLM(engine=engine)
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=4, max_tokens=14))
    for p, out in zip(PROMPTS, outs):
        assert [(s.tokens, s.cum_logprob) for s in out.sequences] == [(t, c) for t, c, _ in brute_force(p, 4, 14, 40)]
    assert engine.scheduler.num_preemptions > 0
    assert (engine.runner.num_block_copies > 0) == caching
    assert not engine.kv.fork_pins
    assert_clean(engine)


def test_error_mid_search_aborts_everything():
    engine = make_engine(num_blocks=96, block_size=4, max_num_seqs=32, max_num_batched_tokens=256,
                         max_model_len=40, async_scheduling=False)
    llm = LLM(engine=engine)
    real_step, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the caller's Ctrl-C in the middle of the search
        return real_step()

    engine.step = step
    with pytest.raises(KeyboardInterrupt):
        llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=10))
    engine.step = real_step
    while engine.has_unfinished_requests():
        engine.step()
    assert_clean(engine)
    outs = llm.beam_search(PROMPTS[:1], BeamSearchParams(beam_width=3, max_tokens=10))
    assert [s.tokens for s in outs[0].sequences] == [t for t, _, _ in brute_force(PROMPTS[0], 3, 10, 40)]
    assert_clean(engine)


def test_concurrency_limit_runs_prompts_in_turn():
    engine = make_engine(num_blocks=96, block_size=4, max_num_seqs=32, max_num_batched_tokens=256,
                         max_model_len=40, async_scheduling=False)
    llm = LLM(engine=engine)
    running = []
    real_step = engine.step

    def step():
        running.append(len({r.rsplit(".", 1)[0] for r in engine._parents}))  # prompts with live requests
        return real_step()

    engine.step = step
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=6), concurrency_limit=1)
    del engine.step
    assert max(running) == 1 and len(running) == 3 * 6  # one prompt at a time, one step per depth
    for p, out in zip(PROMPTS, outs):
        assert [(s.tokens, s.cum_logprob) for s in out.sequences] == [(t, c) for t, c, _ in brute_force(p, 3, 6, 40)]
    with pytest.raises(ValueError, match="^concurrency_limit=0 is invalid"):
        llm.beam_search(PROMPTS, BeamSearchParams(beam_width=3, max_tokens=6), concurrency_limit=0)
    assert_clean(engine)


def test_default_concurrency_keeps_every_beam_in_the_step():
    """More beams than max_num_seqs: by default only the prompts whose beams all fit run at once,
    so no running beam decodes ahead of a waiting one (tokens nobody asked for)."""
    engine = make_engine(num_blocks=96, block_size=4, max_num_seqs=8, max_num_batched_tokens=256,
                         max_model_len=40, async_scheduling=False)
    llm = LLM(engine=engine)
    outs = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=4, max_tokens=8))  # 12 beams, 8 seqs
    for p, out in zip(PROMPTS, outs):
        assert [(s.tokens, s.cum_logprob) for s in out.sequences] == [(t, c) for t, c, _ in brute_force(p, 4, 8, 40)]
    steps = engine.runner.steps
    assert max(len(o.seqs) for o in steps) <= 8 and len(steps) == 2 * 8  # 2 prompts, then 1: 8 depths each
    decode_only = sum(map(len, PROMPTS)) + 3 * 7 * 4
    assert sum(o.num_batched_tokens for o in steps) == decode_only
    assert_clean(engine)
