"""Beam searches with more beams than ``max_num_seqs`` (fake runner, no jax): the gated beams that
fill the running slots must not shut the others out forever. vLLM queues the beams beyond
max_num_seqs (slower, same beams); so must jaxllm: every search here ends within a step cap (a hang
fails in a fraction of a second) with the beams of the brute force over the fake "model" and of the
same search on an engine with room for every beam."""
import pytest

from jaxllm import LLM, BeamSearchParams, SamplingParams
from tests.engine.conftest import assert_clean, make_engine, run_all
from tests.engine.test_beam_search_fake import PROMPTS, brute_force

STEP_CAP = 2000  # far above what any search here needs (depths x beams)


def capped(engine, cap: int = STEP_CAP):
    """Make ``engine.step`` raise after ``cap`` calls: a search that stops making progress (the
    driver spins on empty steps) fails instead of hanging the suite."""
    real, calls = engine.step, [0]

    def step():
        calls[0] += 1
        if calls[0] > cap:
            raise AssertionError(f"no progress after {cap} engine steps: "
                                 f"{engine.scheduler.num_running} running, {engine.scheduler.num_waiting} waiting, "
                                 f"{engine.scheduler.num_gate_closed()} held by their step gate")
        return real()

    engine.step = step
    return calls


def beams(outs):
    return [[(s.tokens, s.cum_logprob, s.finish_reason) for s in o.sequences] for o in outs]


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("width,max_num_seqs", [(3, 2), (4, 1), (5, 3)])
def test_more_beams_than_running_slots(width, max_num_seqs, async_scheduling, caching):
    cfg = dict(num_blocks=96, block_size=4, max_num_batched_tokens=256, max_model_len=40,
               enable_prefix_caching=caching, async_scheduling=async_scheduling)
    params = BeamSearchParams(beam_width=width, max_tokens=10)
    engine = make_engine(max_num_seqs=max_num_seqs, **cfg)
    capped(engine)
    outs = LLM(engine=engine).beam_search(PROMPTS, params)
    ref = LLM(engine=make_engine(max_num_seqs=32, **cfg)).beam_search(PROMPTS, params)
    assert beams(outs) == beams(ref)
    assert beams(outs) == [brute_force(p, width, 10, 40) for p in PROMPTS]
    assert max(len(o.seqs) for o in engine.runner.steps) <= max_num_seqs
    assert engine.scheduler.num_preemptions > 0  # held beams made room for the waiting ones
    assert_clean(engine)


def test_n_samples_above_max_num_seqs_queue():
    """n > max_num_seqs without beam search: the children are ordinary (ungated) requests, the ones
    beyond max_num_seqs wait for a slot; same samples as on an engine with room for all."""
    params = SamplingParams(n=5, temperature=0.9, seed=7, max_tokens=8, ignore_eos=True)
    finals = []
    for max_num_seqs in (2, 8):
        e = make_engine(max_num_seqs=max_num_seqs, max_num_batched_tokens=64)
        e.add_request("p", "shared prompt that spans blocks", params)
        finals.append(run_all(e, max_steps=200)["p"])  # asserts nothing is left unfinished
        assert max(len(o.seqs) for o in e.runner.steps) <= max_num_seqs
    assert [c.token_ids for c in finals[0].outputs] == [c.token_ids for c in finals[1].outputs]
    assert len({tuple(c.token_ids) for c in finals[0].outputs}) > 1
