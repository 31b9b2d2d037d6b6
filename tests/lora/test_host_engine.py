"""The engine with adapters over the fake runner and a fake loader: the max_loras rule, FCFS among
adapter requests, block-hash namespacing, preemption, async scheduling, errors (no jax).

The fake runner tags each KV entry with the adapter it was computed with and checks the tag on
every read, and mixes the adapter into its "model": a block shared across adapters, a slot
overwritten under a running request, or a wrong ``lora_slot`` fails or changes the output. The
reference for every mixed run is each request run alone on a fresh engine."""

from __future__ import annotations

import pytest

from jaxllm.core.block_pool import hash_request_blocks
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import assert_clean, run_all
from tests.lora.host_fakes import FakeLoader, lora, make_lora_engine, settle_loads

G = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def alone(prompt, adapter, params=G, **kw):
    e = make_lora_engine(**kw)
    if adapter is not None:
        e.add_lora(lora(adapter))  # loaded here, synchronously: the reference never waits for a load
    e.add_request("x", prompt, params, lora_request=None if adapter is None else lora(adapter))
    return run_all(e)["x"].outputs[0].token_ids


def first_steps(runner):
    """request id -> (step index, position in the step) of its first scheduling."""
    first = {}
    for k, out in enumerate(runner.steps):
        for j, s in enumerate(out.seqs):
            first.setdefault(s.request_id, (k, j))
    return first


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_more_adapters_than_slots_all_finish_in_arrival_order(async_scheduling):
    # 6 adapter requests over 4 adapters, base requests between them; 2 slots
    plan = [("r0", 1), ("r1", 2), ("b0", None), ("r2", 3), ("r3", 1), ("b1", None), ("r4", 4), ("r5", 2)]
    e = make_lora_engine(max_loras=2, max_cpu_loras=4, async_scheduling=async_scheduling)
    for i, (rid, a) in enumerate(plan):
        e.add_request(rid, f"prompt {i} " + "x" * i, SamplingParams(temperature=0.0, max_tokens=4 + i,
                                                                   ignore_eos=True),
                      lora_request=None if a is None else lora(a))
    settle_loads(e)  # the rule under test is about slots, not loads (tests/lora/test_host_load_async.py)
    fin = run_all(e)
    runner = e.runner
    for out in runner.steps:  # the rule: at most max_loras distinct adapters in every step
        assert len({s.lora_slot for s in out.seqs} - {0}) <= 2
        assert {s.lora_slot for s in out.seqs} <= {0, 1, 2}
    first = first_steps(runner)
    adapter_order = sorted((rid for rid, a in plan if a is not None), key=first.get)
    assert adapter_order == ["r0", "r1", "r2", "r3", "r4", "r5"]  # FCFS among adapter requests
    assert first["r2"][0] > first["r1"][0]  # adapter 3 really waited for a slot
    assert first["b1"] < first["r2"]  # a base request passed the waiting adapter request
    for i, (rid, a) in enumerate(plan):
        want = alone(f"prompt {i} " + "x" * i, a,
                     SamplingParams(temperature=0.0, max_tokens=4 + i, ignore_eos=True))
        assert fin[rid].outputs[0].token_ids == want, rid
    # the adapters made a difference (the fake's "model" mixes the adapter in)
    assert alone("prompt 0 ", 1) != alone("prompt 0 ", 2) != alone("prompt 0 ", None)
    assert e.lora.num_pinned() == 0


def test_block_hashes_namespaced_by_adapter():
    # hashes: another extra key changes every block's hash
    toks = list(range(3, 3 + 13))
    h1, h2 = hash_request_blocks(toks, 4, 1, []), hash_request_blocks(toks, 4, 2, [])
    assert len(h1) == 3 and not set(h1) & set(h2) and h1 == hash_request_blocks(toks, 4, 1, [])
    e = make_lora_engine(max_loras=2, max_cpu_loras=2)
    prompt = "the same long prompt, several blocks"
    e.add_request("a1", prompt, G, lora_request=lora(1))
    e.add_request("a2", prompt, G, lora_request=lora(2))
    settle_loads(e)  # the loads run on the loader thread: the step below must find them done
    e.step()  # both prefilled in one step
    b1, b2 = (set(e.kv.get_block_ids(r)) for r in ("a1", "a2"))
    assert b1 and not b1 & b2  # same prompt, other adapter: disjoint blocks
    e.add_request("a1-again", prompt, G, lora_request=lora(1))
    e.add_request("base", prompt, G)
    e.step()
    again = e.kv.get_block_ids("a1-again")
    assert set(again[:-1]) <= b1 and not set(again) & b2  # same adapter: the cached blocks
    assert not set(e.kv.get_block_ids("base")) & (b1 | b2)
    fin = run_all(e)
    assert fin["a1-again"].num_cached_tokens == (len(prompt) - 1) // 4 * 4
    assert fin["a2"].num_cached_tokens == 0 and fin["base"].num_cached_tokens == 0
    assert fin["a1"].outputs[0].token_ids == fin["a1-again"].outputs[0].token_ids == alone(prompt, 1)


def test_preemption_with_adapters_keeps_outputs():
    # 16 blocks of 4 tokens: four 20-token sequences cannot all grow to 36 tokens
    e = make_lora_engine(num_blocks=16, max_loras=2, max_cpu_loras=3, max_model_len=48)
    p = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plan = [(f"r{i}", (i % 3) + 1 if i % 4 else None) for i in range(6)]
    for i, (rid, a) in enumerate(plan):
        e.add_request(rid, f"{i}" * 20, p, lora_request=None if a is None else lora(a))
    fin = run_all(e)
    assert e.scheduler.num_preemptions > 0
    for i, (rid, a) in enumerate(plan):
        assert fin[rid].outputs[0].token_ids == alone(f"{i}" * 20, a, p, num_blocks=16, max_model_len=48)


def test_n_children_share_the_adapter_and_the_pin():
    e = make_lora_engine()
    p = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=5, ignore_eos=True)
    e.add_request("n", "children", p, lora_request=lora(1))
    assert e.lora.num_pinned() == 1
    out = run_all(e)["n"]
    assert len(out.outputs) == 3 and e.lora.num_pinned() == 0
    assert all(s.lora_slot == 1 for o in e.runner.steps for s in o.seqs)


def test_errors_leave_the_engine_serving():
    off = make_lora_engine(enable_lora=False, loader=FakeLoader())
    with pytest.raises(ValueError, match=r"^lora_request='adapter1' is invalid: this engine runs without adapters"):
        off.add_request("a", "hi", G, lora_request=lora(1))
    with pytest.raises(ValueError, match=r"^enable_lora=False is invalid for add_lora"):
        off.add_lora(lora(1))
    assert off.list_loras() == set()
    e = make_lora_engine(max_loras=1, max_cpu_loras=1)
    e.add_request("bad", "hi", G, lora_request=lora(1, "bad:/adapters/broken"))  # its load fails off-thread
    settle_loads(e)
    assert e.step() == [] and not e.has_unfinished_requests()  # the failed load failed the request
    errors = e.take_request_errors()
    assert list(errors) == ["bad"] and isinstance(errors["bad"], ValueError)
    msg = str(errors["bad"])
    assert "\n" not in msg and msg.startswith("lora_request='adapter1' is invalid: adapter at bad:/adapters/broken")
    assert "/adapters/broken/adapter_model.safetensors" in msg and e.list_loras() == set()
    with pytest.raises(ValueError, match=r"^lora_request of type str is invalid"):
        e.add_request("bad", "hi", G, lora_request="adapter1")
    e.add_request("ok", "hi", G, lora_request=lora(2))
    # a second adapter while the only host entry is pinned: loaded beyond max_cpu_loras, it waits
    # for the one device slot and runs after
    e.add_request("busy", "hi", G, lora_request=lora(3))
    with pytest.raises(ValueError, match="unfinished request"):
        e.remove_lora(2)
    e.add_request("abort-me", "hi", G, lora_request=lora(2))
    e.step()
    e.abort_request("abort-me")
    fin = run_all(e)  # asserts no leaked blocks
    assert set(fin) == {"ok", "busy"} and fin["ok"].outputs[0].token_ids == alone("hi", 2)
    assert fin["busy"].outputs[0].token_ids == alone("hi", 3)
    assert e.lora.num_pinned() == 0 and e.remove_lora(2) and e.list_loras() == {3}
    e.add_request("later", "hi", G, lora_request=lora(3))
    assert run_all(e)["later"].outputs[0].token_ids == alone("hi", 3)
    assert_clean(e)


def test_a_reused_id_never_hits_the_old_adapters_blocks():
    e = make_lora_engine(max_loras=1, max_cpu_loras=1)
    prompt = "a prompt of a few blocks"
    e.add_request("old", prompt, G, lora_request=lora(1, "/adapters/old"))
    old = run_all(e)["old"]
    assert e.remove_lora(1)
    from jaxllm.lora import LoRARequest
    new = LoRARequest("adapter1-v2", 1, "/adapters/new")  # same id, another adapter
    e.add_request("new", prompt, G, lora_request=new)
    e.add_request("new-again", prompt, G, lora_request=new)
    fin = run_all(e)  # the fake runner's KV tags fail on any block computed by the old adapter
    assert fin["new"].num_cached_tokens == 0 and fin["new-again"].num_cached_tokens > 0
    assert fin["new"].outputs[0].token_ids != old.outputs[0].token_ids


def test_lora_requests_info_series():
    from prometheus_client import CollectorRegistry

    from jaxllm.metrics.prometheus import PrometheusStatLogger

    e = make_lora_engine(max_loras=1, max_cpu_loras=2, async_scheduling=False)
    reg = CollectorRegistry()
    e.add_stat_logger(PrometheusStatLogger(reg, "fake", max_model_len=128, max_num_batched_tokens=32))

    def series():
        return [(s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"], s.labels["max_lora"])
                for m in reg.collect() if m.name == "jaxllm:lora_requests_info" for s in m.samples]
    e.add_request("x", "hi", G, lora_request=lora(1))
    e.add_request("y", "hi", G, lora_request=lora(2))  # waits: one slot
    e.add_request("z", "hi", G)
    settle_loads(e)
    e.step()
    assert series() == [("adapter1", "adapter2", "1")]  # one series, the current adapters
    run_all(e)
    assert series() == [("", "", "1")]
