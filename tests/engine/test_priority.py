"""Priority scheduling through the engine and LLM.generate on the fake runner: admission order,
who is preempted when the KV cache runs out, outputs equal to fcfs, no leaked blocks."""
import random

import pytest

from jaxllm.llm import LLM
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import assert_clean, make_engine, run_all


def prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 120) for _ in range(rng.randrange(4, 20))] for _ in range(n)]


def test_admission_in_priority_order_ties_by_arrival():
    eng = make_engine(scheduling_policy="priority", max_num_seqs=1)
    prios = [3, 1, 2, 0, 1, -4]
    for i, (p, prio) in enumerate(zip(prompts(len(prios)), prios)):
        eng.add_request(f"r{i}", p, SamplingParams(max_tokens=3, temperature=0), priority=prio)
    order = []
    while eng.has_unfinished_requests():
        order += [o.request_id for o in eng.step() if o.finished]
    assert order == ["r5", "r3", "r1", "r4", "r2", "r0"]
    assert_clean(eng)


def record_preemptions(eng):
    """Wrap the scheduler's _preempt: at every preemption, the victim's (priority, arrival) must be the
    largest among the running requests it leaves; returns the victims' ids in order."""
    sched, victims = eng.scheduler, []
    real = sched._preempt

    def preempt(req):
        key = (req.priority, req.arrival_seq)
        assert all((r.priority, r.arrival_seq) < key for r in sched.running), (req.request_id, key)
        victims.append(req.request_id)
        real(req)
    sched._preempt = preempt
    return victims


def run(policy, prios, params, num_blocks=14):
    """Every prompt at once into a small KV cache (14 blocks of 4 tokens): preemptions happen."""
    eng = make_engine(num_blocks=num_blocks, scheduling_policy=policy, max_num_seqs=8, max_model_len=56)
    victims = record_preemptions(eng)
    for i, (p, prio) in enumerate(zip(prompts(len(prios), seed=7), prios)):
        eng.add_request(f"r{i}", p, params, **({"priority": prio} if prio else {}))
    return run_all(eng), victims, eng


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                                    SamplingParams(max_tokens=24, temperature=1.0, seed=11, n=2, ignore_eos=True)],
                         ids=["greedy", "seeded-n2"])
def test_preemption_takes_the_lowest_priority_and_outputs_equal_fcfs(params):
    prios = [5, 0, 3, 0, 9, 1, 2, 7]
    fcfs, fcfs_victims, _ = run("fcfs", [0] * len(prios), params)
    prio, victims, eng = run("priority", prios, params)
    assert fcfs_victims and victims, "the cache must be small enough to preempt"
    assert eng.scheduler.num_preemptions == len(victims)
    # every victim was the lowest-priority running request (record_preemptions checks it); so the most
    # urgent request (priority 0, first of those) never is: alone it fits the cache
    assert "r1" not in {v.split("#")[0] for v in victims} and "r1" in {v.split("#")[0] for v in fcfs_victims}
    assert fcfs.keys() == prio.keys()
    for rid in fcfs:
        a, b = fcfs[rid], prio[rid]
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs], rid
        assert [c.text for c in a.outputs] == [c.text for c in b.outputs], rid
        assert [c.finish_reason for c in a.outputs] == [c.finish_reason for c in b.outputs] == \
            ["length"] * params.n


def test_fcfs_refuses_a_priority_and_priority_must_be_an_int():
    eng = make_engine()
    with pytest.raises(ValueError, match=r"^priority=2 is invalid: scheduling_policy='fcfs' takes priority 0"):
        eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=2), priority=2)
    eng = make_engine(scheduling_policy="priority")
    with pytest.raises(ValueError, match=r"^priority=True is invalid: must be an integer$"):
        eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=2), priority=True)
    with pytest.raises(ValueError, match=r"^priority='1' is invalid: must be an integer$"):
        eng.add_request("a", [5, 6, 7], SamplingParams(max_tokens=2), priority="1")
    assert_clean(eng)


def test_llm_generate_priority():
    eng = make_engine(scheduling_policy="priority", max_num_seqs=1)
    llm = LLM(model="fake", engine=eng, scheduling_policy="priority")
    finished, step = [], eng.step
    eng.step = lambda: [o for o in step() if not o.finished or not finished.append(o.request_id)]
    ps = prompts(3)
    outs = llm.generate(ps, SamplingParams(max_tokens=2, temperature=0), use_tqdm=False, priority=[2, 0, 1])
    assert [o.prompt_token_ids for o in outs] == ps  # input order, whatever ran first
    assert finished == [outs[1].request_id, outs[2].request_id, outs[0].request_id]
    with pytest.raises(ValueError, match=r"^priority=\[1\] is invalid: must be a list with exactly one int"):
        llm.generate(ps, SamplingParams(max_tokens=2), use_tqdm=False, priority=[1])
    fcfs = LLM(model="fake", engine=make_engine())
    with pytest.raises(ValueError, match=r"^priority=1 is invalid: scheduling_policy='fcfs'"):
        fcfs.generate(ps, SamplingParams(max_tokens=2), use_tqdm=False, priority=[0, 1, 0])
    assert_clean(fcfs.engine)
