"""Priority scheduling (SchedulerConfig.policy="priority") against a brute-force model of the policy.

The model keeps no sorted queues: every step it sorts the running and waiting sets by
(priority, arrival) from scratch, finds each victim with max() over all running requests, and
counts blocks as ceil(allocated tokens / block_size) per request (prefix caching off, so no
sharing). It states vLLM v1's rules: running first, preempt the max-key running request when a
running request's blocks cannot be had, admit waiting requests in key order only in a step
without preemption, and never preempt for a waiting request."""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxllm.config import SchedulerConfig
from jaxllm.core.kv_cache_manager import KVCacheManager
from jaxllm.core.request import Request, RequestStatus
from jaxllm.core.scheduler import Scheduler
from jaxllm.sampling_params import SamplingParams
from tests.core.test_scheduler import assert_no_leaks
from tests.fakes.fake_runner import FakeRunner

BS = 4


def make(policy, num_blocks, budget, max_seqs, max_len=64, caching=False):
    kv = KVCacheManager(num_blocks, BS, enable_caching=caching)
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                     max_model_len=max_len, policy=policy), kv)


def req(rid, prompt_len, max_tokens, priority=0, first=3):
    p = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(rid, list(range(first, first + prompt_len)), p, seed=0, max_output_tokens=max_tokens,
                   priority=priority)


class Model:
    """The policy, brute force. Requests: dicts with id, prio, arr, prompt, max_out."""

    def __init__(self, num_blocks, budget, max_seqs, max_len):
        self.free_total, self.budget, self.max_seqs, self.max_len = num_blocks, budget, max_seqs, max_len
        self.st = {}  # id -> dict(prio, arr, tokens, out, computed, alloc, state)

    def add(self, rid, prio, arr, prompt_len, max_out):
        self.st[rid] = dict(prio=prio, arr=arr, tokens=prompt_len, out=0, max_out=max_out, computed=0,
                            alloc=0, state="waiting")

    def key(self, rid):
        return (self.st[rid]["prio"], self.st[rid]["arr"])

    def free(self):
        return self.free_total - sum(math.ceil(s["alloc"] / BS) for s in self.st.values())

    def step(self):
        """-> ({id: num_new_tokens}, [preempted ids])"""
        budget, plan, preempted = self.budget, {}, []
        running = sorted((r for r, s in self.st.items() if s["state"] == "running"), key=self.key)
        for rid in running:
            if budget == 0 or self.st[rid]["state"] != "running":
                break
            s = self.st[rid]
            n = min(s["tokens"] - s["computed"], budget, self.max_len - s["computed"])
            while math.ceil((s["computed"] + n) / BS) - math.ceil(s["alloc"] / BS) > self.free():
                victim = max((r for r, v in self.st.items() if v["state"] == "running"), key=self.key)
                assert victim not in plan, "a victim already scheduled this step"
                self.st[victim].update(state="waiting", computed=0, alloc=0)
                preempted.append(victim)
                if victim == rid:
                    break
            if s["state"] != "running":
                break
            s["alloc"] = max(s["alloc"], s["computed"] + n)
            plan[rid] = n
            budget -= n
        if not preempted:
            for rid in sorted((r for r, s in self.st.items() if s["state"] == "waiting"), key=self.key):
                nrun = sum(1 for s in self.st.values() if s["state"] == "running")
                if budget == 0 or nrun >= self.max_seqs:
                    break
                s = self.st[rid]
                n = min(s["tokens"], budget)
                if math.ceil(n / BS) > self.free():
                    break
                s.update(state="running", alloc=n)
                plan[rid] = n
                budget -= n
        for rid, n in plan.items():
            self.st[rid]["computed"] += n
        return plan, preempted

    def sampled(self, rid):
        """The token of a step that reached the end of rid's known tokens; True when that ends it."""
        s = self.st[rid]
        assert s["computed"] == s["tokens"], (rid, s)
        s["tokens"] += 1
        s["out"] += 1
        if s["out"] >= s["max_out"] or s["tokens"] >= self.max_len:
            del self.st[rid]
            return True
        return False


def run_both(policy, specs, num_blocks, budget, max_seqs, max_len=64):
    """specs: (step it arrives at, priority, prompt_len, max_tokens). Drives the Scheduler and the
    Model side by side, comparing each step's plan and preemptions. -> the Scheduler's finish order."""
    sched = make(policy, num_blocks, budget, max_seqs, max_len)
    model = Model(num_blocks, budget, max_seqs, max_len)
    runner = FakeRunner(num_blocks, BS)
    pending = sorted(enumerate(specs), key=lambda x: x[1][0])
    order, step, arr = [], 0, 0
    while pending or sched.has_unfinished_requests():
        while pending and pending[0][1][0] <= step:
            i, (_, prio, plen, mt) = pending.pop(0)
            sched.add_request(req(f"r{i}", plen, mt, prio, first=3 + i))
            model.add(f"r{i}", prio, arr, plen, mt)
            arr += 1
        step += 1
        if not sched.has_unfinished_requests():
            continue
        before = sched.num_preemptions
        out = sched.schedule()
        plan, preempted = model.step()
        assert {s.request_id: len(s.token_ids) for s in out.seqs} == plan, step
        assert sched.num_preemptions - before == len(preempted)
        assert [r for r in out.finished_or_preempted_ids if r in preempted] == preempted
        sampled = runner.execute(out)
        for r, _ in sched.update_from_output(out, {k: v.token_id for k, v in sampled.items()}):
            ends = model.sampled(r.request_id)
            assert ends == (r.num_output_tokens >= r.max_output_tokens or r.num_tokens >= max_len)
            if ends:
                sched.finish_requests(r.request_id, RequestStatus.FINISHED_LENGTH)
                order.append(r.request_id)
        assert step < 5000, "did not finish"
    assert not model.st
    assert_no_leaks(sched)
    return order


spec = st.tuples(st.integers(0, 6), st.integers(-2, 2), st.integers(1, 14), st.integers(1, 6))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(spec, min_size=1, max_size=9), num_blocks=st.integers(6, 24),
       budget=st.integers(4, 24), max_seqs=st.integers(1, 5))
def test_priority_matches_model(specs, num_blocks, budget, max_seqs):
    run_both("priority", specs, num_blocks, budget, max_seqs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(spec.map(lambda t: (t[0], 0, t[2], t[3])), min_size=1, max_size=9),
       num_blocks=st.integers(6, 24), budget=st.integers(4, 24), max_seqs=st.integers(1, 5))
def test_fcfs_matches_model_with_equal_priorities(specs, num_blocks, budget, max_seqs):
    """fcfs puts a preempted request at the front, priority at its arrival place: without grammars or
    adapters every running request arrived before every waiting one, so the two agree."""
    run_both("fcfs", specs, num_blocks, budget, max_seqs)


def test_waiting_admitted_in_priority_order_ties_by_arrival():
    sched = make("priority", num_blocks=64, budget=64, max_seqs=2)
    for rid, prio in [("a", 3), ("b", 1), ("c", 1), ("d", -5)]:
        sched.add_request(req(rid, 4, 2, prio))
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["d", "b"]
    assert [r.request_id for r in sched.waiting] == ["c", "a"]


def test_lowest_priority_running_request_is_preempted():
    # 6 blocks of 4: three 8-token prompts take 2 blocks each; the first decode needs a 3rd block
    sched = make("priority", num_blocks=6, budget=64, max_seqs=4)
    for rid, prio in [("lo", 5), ("hi", 0), ("mid", 2)]:
        sched.add_request(req(rid, 8, 4, prio))
    runner = FakeRunner(6, BS)
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["hi", "mid", "lo"]
    sched.update_from_output(out, {k: v.token_id for k, v in runner.execute(out).items()})
    out = sched.schedule()
    # "hi" needs a block: the victim is "lo" (largest priority value), though it arrived first
    assert [s.request_id for s in out.seqs] == ["hi", "mid"]
    assert out.finished_or_preempted_ids == ["lo"]
    assert sched.requests["lo"].status == RequestStatus.PREEMPTED
    assert [r.request_id for r in sched.running] == ["hi", "mid"]


def test_waiting_request_never_preempts():
    """vLLM v1: a higher-priority waiting request that does not fit waits; nothing is preempted for it."""
    sched = make("priority", num_blocks=4, budget=64, max_seqs=4)
    runner = FakeRunner(4, BS)
    sched.add_request(req("lo", 8, 2, priority=9))  # 2 blocks
    out = sched.schedule()
    sched.update_from_output(out, {k: v.token_id for k, v in runner.execute(out).items()})
    sched.add_request(req("hi", 12, 2, priority=0))  # needs 3 blocks, 2 are free
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["lo"] and sched.num_preemptions == 0
    assert [r.request_id for r in sched.waiting] == ["hi"]


def test_fcfs_refuses_a_priority():
    sched = make("fcfs", num_blocks=8, budget=8, max_seqs=2)
    with pytest.raises(ValueError, match=r"^priority=3 is invalid: scheduling_policy='fcfs'"):
        sched.add_request(req("a", 4, 2, priority=3))
    assert not sched.requests and not sched.waiting


def test_policy_is_validated():
    with pytest.raises(ValueError, match=r"^scheduling_policy='lifo' is invalid: must be one of"):
        SchedulerConfig(policy="lifo").validate()


def test_preempted_request_goes_back_to_its_priority_place():
    """fcfs puts a preempted request at the front; priority puts it behind higher-priority waiters."""
    sched = make("priority", num_blocks=6, budget=64, max_seqs=4)
    runner = FakeRunner(6, BS)

    def step():
        out = sched.schedule()
        sched.update_from_output(out, {k: v.token_id for k, v in runner.execute(out).items()})
        return [s.request_id for s in out.seqs], out.finished_or_preempted_ids

    for rid, prio in [("a", 1), ("b", 4)]:
        sched.add_request(req(rid, 6, 8, prio))  # 2 blocks each, room up to 8 tokens
    assert step() == (["a", "b"], [])
    sched.add_request(req("c", 4, 8, priority=2))  # 1 block, then 2 at its first decode
    sched.add_request(req("d", 8, 2, priority=3))  # 2 blocks: never free while the others run
    assert step() == (["a", "b", "c"], [])  # d waits: 1 block free
    assert step() == (["a", "c", "b"], [])  # running walk in priority order; c takes the last block
    # a needs a 3rd block at its 9th token: b (priority 4) is preempted, d stays ahead of it
    assert step() == (["a", "c"], ["b"])
    assert [r.request_id for r in sched.waiting] == ["d", "b"]
