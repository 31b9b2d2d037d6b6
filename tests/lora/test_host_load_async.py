"""Adapter loads run off the engine thread: other requests keep stepping while an adapter loads; its
requests wait in the queue (FCFS among adapter requests kept, a slot reserved), then run; a failed
load fails exactly its requests; aborting or removing while loading leaves nothing behind (no jax).

A ``GatedLoader`` holds chosen loads for as long as a test needs ("still loading" is a state the
test controls, not a race). The reference for every output is the synchronous path: the adapter
added with ``add_lora`` (loaded on the caller's thread) before the request, on a fresh engine."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from jaxllm.lora import LoRARequest
from jaxllm.lora.loader import LoRALoadError
from jaxllm.sampling_params import SamplingParams
from tests.engine.conftest import assert_clean, run_all
from tests.lora.host_fakes import GatedLoader, lora, make_lora_engine, settle_loads

G = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def sync_ref(prompt, adapter: LoRARequest | None, params=G, **kw) -> list[int]:
    e = make_lora_engine(**kw)
    if adapter is not None:
        assert e.add_lora(adapter)  # loaded now on this thread: no request ever waits for it
    e.add_request("x", prompt, params, lora_request=adapter)
    return run_all(e)["x"].outputs[0].token_ids


def tokens_by_step(e, steps: int) -> list[dict[str, int]]:
    """Run ``steps`` steps; per step, request id -> its number of generated tokens so far."""
    seen = []
    for _ in range(steps):
        outs = e.step()
        seen.append({o.request_id: len(o.outputs[0].token_ids) for o in outs})
    return seen


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_other_requests_stream_while_an_adapter_loads(async_scheduling):
    loader = GatedLoader(held={1})
    e = make_lora_engine(max_loras=2, max_cpu_loras=2, loader=loader, async_scheduling=async_scheduling)
    long = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    e.add_lora(lora(2))  # resident adapter: ready before the cold one is asked for
    e.add_request("base", "a base prompt", long)
    e.add_request("cold", "a cold prompt", G, lora_request=lora(1))
    e.add_request("warm", "a warm prompt", long, lora_request=lora(2))
    assert loader.started[1].wait(10)
    seen = tokens_by_step(e, 8)  # the load is held: 8 steps run anyway
    for rid in ("base", "warm"):  # a token in every step (after the first, under async scheduling)
        counts = [s[rid] for s in seen if rid in s]
        assert len(counts) >= 7 and counts == sorted(set(counts)), (rid, seen)
    assert all("cold" not in s for s in seen)
    assert [r.request_id for r in e.scheduler.waiting] == ["cold"] and 1 in e.lora.loading
    assert [a.name for _, a in e.runner.lora_calls] == ["adapter2"]  # only the ready adapter has a slot
    loader.let_go(1)
    fin = run_all(e)
    assert fin["cold"].outputs[0].token_ids == sync_ref("a cold prompt", lora(1))
    assert fin["warm"].outputs[0].token_ids == sync_ref("a warm prompt", lora(2), long)
    assert fin["base"].outputs[0].token_ids == sync_ref("a base prompt", None, long)
    assert loader.loads == {1: 1, 2: 1} and e.lora.num_pinned() == 0 and e.list_loras() == {1, 2}


def test_a_loading_request_keeps_its_place_and_reserves_a_slot():
    # two slots; r1's adapter loads while r2 (adapter 2, ready) runs; r3 (adapter 3, ready) arrived
    # after r1: it must not take the second slot before r1 (the order of the synchronous path)
    loader = GatedLoader(held={1})
    e = make_lora_engine(max_loras=2, max_cpu_loras=3, loader=loader, async_scheduling=False)
    e.add_lora(lora(2)), e.add_lora(lora(3))
    long = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    e.add_request("r2", "two", long, lora_request=lora(2))
    e.step()  # r2 runs, adapter 2 resident
    e.add_request("r1", "one", G, lora_request=lora(1))
    e.add_request("r2b", "two again", G, lora_request=lora(2))  # the resident adapter: runs meanwhile
    e.add_request("r3", "three", G, lora_request=lora(3))  # needs the slot r1 reserved: waits
    e.add_request("b", "base", G)
    tokens_by_step(e, 3)
    running = {r.request_id for r in e.scheduler.running}
    assert running == {"r2", "r2b", "b"}, running
    loader.let_go(1)
    settle_loads(e)
    fin = run_all(e)
    first = {}
    for k, out in enumerate(e.runner.steps):
        for s in out.seqs:
            first.setdefault(s.request_id, k)
        assert len({s.lora_slot for s in out.seqs} - {0}) <= 2  # max_loras
    assert first["r2"] < first["r2b"] < first["r1"] < first["r3"], first
    assert first["r3"] > first["r2b"] + 3  # r3 waited for a slot (r2 runs 24 tokens, r1 8)
    for rid, prompt, a, p in (("r1", "one", 1, G), ("r2", "two", 2, long), ("r2b", "two again", 2, G),
                              ("r3", "three", 3, G), ("b", "base", None, G)):
        want = sync_ref(prompt, None if a is None else lora(a), p, max_loras=2, max_cpu_loras=3)
        assert fin[rid].outputs[0].token_ids == want, rid


def test_a_loading_request_with_no_slot_to_reserve_waits_as_the_synchronous_path():
    # one slot, held by r2's adapter: r1 (loading) could not get a slot even if loaded, so it waits
    # like a request waiting for a slot, and the adapter requests behind it wait too (FCFS: else
    # adapter 2's requests could keep the slot forever); a base request passes
    loader = GatedLoader(held={1})
    e = make_lora_engine(max_loras=1, max_cpu_loras=2, loader=loader, async_scheduling=False)
    e.add_lora(lora(2))
    e.add_request("r2", "two", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), lora_request=lora(2))
    e.step()
    e.add_request("r1", "one", G, lora_request=lora(1))
    e.add_request("r2b", "two again", G, lora_request=lora(2))
    e.add_request("b", "base", G)
    e.step()
    assert {r.request_id for r in e.scheduler.running} == {"r2", "b"}
    loader.let_go(1)
    settle_loads(e)
    run_all(e)
    first = {}
    for k, out in enumerate(e.runner.steps):
        for s in out.seqs:
            first.setdefault(s.request_id, k)
    assert first["r2"] < first["b"] < first["r1"] < first["r2b"], first


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_failed_load_fails_exactly_its_requests(async_scheduling):
    loader = GatedLoader(held={1})
    e = make_lora_engine(max_loras=2, max_cpu_loras=2, loader=loader, async_scheduling=async_scheduling)
    bad = lora(1, "bad:/adapters/broken")
    e.add_request("bad-n", "one", SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=4), lora_request=bad)
    e.add_request("bad", "two", G, lora_request=bad)
    e.add_request("ok", "three", G, lora_request=lora(2))
    e.add_request("base", "four", G)
    tokens_by_step(e, 3)
    loader.let_go(1)
    settle_loads(e)
    fin, errors = {}, {}
    while e.has_unfinished_requests():
        fin.update({o.request_id: o for o in e.step() if o.finished})
        errors.update(e.take_request_errors())
    assert set(errors) == {"bad-n", "bad"} and set(fin) == {"ok", "base"}
    for exc in errors.values():
        msg = str(exc)
        assert isinstance(exc, LoRALoadError) and "\n" not in msg
        assert msg.startswith("lora_request='adapter1' is invalid: adapter at bad:/adapters/broken failed to load: "
                              "/adapters/broken/adapter_model.safetensors: tensor")
    assert fin["ok"].outputs[0].token_ids == sync_ref("three", lora(2))
    assert fin["base"].outputs[0].token_ids == sync_ref("four", None)
    assert_clean(e)
    assert e.lora.num_pinned() == 0 and e.list_loras() == {2} and not e.lora.loading
    # the engine goes on; the id was never registered, so a good adapter may take it
    e.add_request("again", "one", G, lora_request=lora(1))
    settle_loads(e)
    assert run_all(e)["again"].outputs[0].token_ids == sync_ref("one", lora(1))


def test_llm_generate_raises_the_load_error_and_cleans_up():
    from jaxllm import LLM

    llm = LLM("fake", engine=make_lora_engine(max_loras=2, max_cpu_loras=2))
    with pytest.raises(LoRALoadError, match=r"^lora_request='adapter9' is invalid: adapter at bad:/a9 failed to load"):
        llm.generate(["a", "b", "c"], G, use_tqdm=False, lora_request=[None, lora(9, "bad:/a9"), lora(2)])
    eng = llm.engine
    assert not eng.has_unfinished_requests() and eng.lora.num_pinned() == 0
    assert eng.kv.num_free_blocks == eng.kv.num_blocks


def test_abort_while_loading_leaves_nothing():
    loader = GatedLoader(held={1})
    e = make_lora_engine(max_loras=1, max_cpu_loras=1, loader=loader)
    e.add_request("r1", "one", G, lora_request=lora(1))
    e.add_request("b", "base", G)
    tokens_by_step(e, 2)
    (out,) = e.abort_request("r1")
    assert out.finished and out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == []
    assert e.lora.num_pinned() == 0 and 1 in e.lora.loading  # the load itself goes on
    loader.let_go(1)
    settle_loads(e)
    fin = run_all(e)
    assert set(fin) == {"b"} and not e.lora.loading
    assert e.list_loras() == {1}  # loaded for nobody: registered and cached, unpinned (as a request's add)
    e.add_request("r1-again", "one", G, lora_request=lora(1))
    assert run_all(e)["r1-again"].outputs[0].token_ids == sync_ref("one", lora(1), max_loras=1, max_cpu_loras=1)
    assert loader.loads[1] == 1  # the cached load served it


def test_remove_while_loading_is_refused_then_drops_the_load():
    loader = GatedLoader(held={1})
    e = make_lora_engine(max_loras=1, max_cpu_loras=1, loader=loader)
    e.add_request("r1", "one", G, lora_request=lora(1))
    e.step()
    with pytest.raises(ValueError, match=r"^lora_int_id=1 is invalid to remove now: 1 unfinished request\(s\) "
                                         r"use adapter 'adapter1'"):
        e.remove_lora(1)
    e.abort_request("r1")
    assert e.remove_lora(1) and not e.lora.loading and e.list_loras() == set()
    assert not e.remove_lora(1)
    loader.let_go(1)
    time.sleep(0.05)  # the dropped load finishes; its result is never used
    e.step()
    assert e.list_loras() == set() and not e.lora._cache
    # the id may name another adapter now: a new load, and nothing of the old one is used
    new = LoRARequest("adapter1-v2", 1, "/adapters/new")
    e.add_request("new", "one", G, lora_request=new)
    settle_loads(e)
    fin = run_all(e)
    assert fin["new"].outputs[0].token_ids == sync_ref("one", new, max_loras=1, max_cpu_loras=1)
    assert e.runner.loras[1].name == "adapter1-v2"


def test_add_lora_with_an_adapter_loaded_elsewhere_wakes_waiting_requests():
    loader = GatedLoader(held={1})
    e = make_lora_engine(max_loras=1, max_cpu_loras=1, loader=loader)
    e.add_request("r1", "one", G, lora_request=lora(1))
    e.step()
    assert 1 in e.lora.loading
    ready = e.load_lora_adapter(lora(1))  # the servers' path: loaded on the loader thread, nothing registered
    loader.let_go(1)  # both loads of id 1 go (one worker: the request's first, then this one)
    adapter = ready.result(10)
    assert 1 in e.lora.loading and e.list_loras() == set()  # the engine polls only before a step
    assert e.add_lora(lora(1), adapter) and not e.lora.loading and e.list_loras() == {1}
    fin = run_all(e)
    assert fin["r1"].outputs[0].token_ids == sync_ref("one", lora(1), max_loras=1, max_cpu_loras=1)


def test_grpc_load_adapter_does_not_stall_a_streaming_request():
    from serving.client import build_request
    from serving.proto.jaxllm.v1 import generation_pb2 as pb
    from serving.proto.jaxllm.v1 import generation_pb2_grpc as pb_grpc
    from tests.serving.http_helpers import ThreadedServer

    loader = GatedLoader(held={1})
    eng = make_lora_engine(model="fake-llm", max_loras=2, max_cpu_loras=2, async_scheduling=False, loader=loader)
    fast = eng.runner.execute
    eng.runner.execute = lambda out: (time.sleep(0.01), fast(out))[1]
    s = ThreadedServer(eng)

    async def go():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.server.port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            stream = stub.Generate(build_request("a base prompt", max_tokens=80, ignore_eos=True), timeout=20)
            await stream.read()
            load = stub.LoadAdapter(pb.LoadAdapterRequest(name="slow", path="/adapters/slow"), timeout=20)
            while not loader.started[1].is_set():
                await asyncio.sleep(0.01)
            during = []  # tokens that arrive while the load is held
            for _ in range(5):
                r = await stream.read()
                during.extend(t for d in r.outputs for t in d.token_ids)
            assert not load.done()
            loader.let_go(1)
            loaded = await load
            rest = []
            while (r := await stream.read()) != grpc.aio.EOF:
                rest.append(r)
            return during, loaded, rest
    try:
        during, loaded, rest = s.call(go())
        assert len(during) >= 5 and (loaded.name, loaded.id) == ("slow", 1)
        assert rest[-1].outputs[0].finish_reason == pb.FINISH_REASON_LENGTH
        s.wait_idle()
        assert eng.list_loras() == {1} and eng.lora.num_pinned() == 0
    finally:
        s.close()


def test_a_served_adapter_that_fails_to_reload_is_invalid_argument():
    # max_cpu_loras=1: a1 leaves the host cache when a2 is registered; its files then break, so the
    # request that needs it again fails its (off-thread) reload: INVALID_ARGUMENT, one line, and the
    # server goes on
    from serving.client import build_request
    from tests.lora.host_fakes import FakeLoader
    from tests.lora.test_host_serving import grpc_error, grpc_tokens, offline
    from tests.serving.http_helpers import ThreadedServer

    broken: set[int] = set()

    class BreakingLoader(FakeLoader):
        def __call__(self, lora):
            if lora.lora_int_id in broken:
                raise ValueError(f"{lora.lora_path}/adapter_model.safetensors: No such file or directory")
            return super().__call__(lora)

    eng = make_lora_engine(model="fake-llm", max_loras=1, max_cpu_loras=1, loader=BreakingLoader())
    s = ThreadedServer(eng, lora_modules=(("a1", "/adapters/a1"), ("a2", "/adapters/a2")))
    try:
        assert list(eng.lora._cache) == [2]
        broken.add(1)
        err = grpc_error(s, "Generate", build_request("Once upon a time", max_tokens=4, lora_name="a1"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "\n" not in err.details()
        assert err.details().startswith("lora_request='a1' is invalid: adapter at /adapters/a1 failed to load: "
                                        "/adapters/a1/adapter_model.safetensors: No such file")
        assert grpc_tokens(s, "a2") == offline(LoRARequest("a2", 2, "/adapters/a2"))
        s.wait_idle()
        assert eng.lora.num_pinned() == 0 and eng.list_loras() == {1, 2}  # still served, as before the change
    finally:
        s.close()
