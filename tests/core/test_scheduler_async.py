"""The scheduler with a step in flight (async scheduling): step N+1 is scheduled before step N's
sampled tokens are known. Placeholders, and requests that finish, are aborted, preempted or whose
id is reused while a step is in flight."""
from jaxllm.core.request import RequestStatus
from jaxllm.core.scheduler_output import PLACEHOLDER_TOKEN_ID
from tests.core.test_scheduler import BS, assert_no_leaks, drive, make, req


def drive_async(sched, runner, on_step=None):
    """Like test_scheduler.drive, but one step stays in flight: schedule + dispatch N+1, then read
    and apply step N (finishing at max_output_tokens / max_model_len)."""
    cfg = sched.config
    finished = {}
    in_flight = None
    for _ in range(10_000):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        nxt = None
        if out.seqs:
            if on_step:
                on_step(out)
            nxt = (out, runner.dispatch(out))
        else:
            assert in_flight is not None, "empty step with nothing in flight"
            runner.release(out.finished_or_preempted_ids)
        if in_flight is not None:
            prev, pending = in_flight
            new = sched.update_from_output(prev, {k: v.token_id for k, v in pending.result().items()})
            for r, _ in new:
                assert r.num_tokens <= cfg.max_model_len
                if r.num_output_tokens >= r.max_output_tokens or r.num_tokens >= cfg.max_model_len:
                    finished[r.request_id] = r
                    sched.finish_requests(r.request_id, RequestStatus.FINISHED_LENGTH)
        in_flight = nxt
    else:
        raise AssertionError("did not finish")
    if in_flight is not None:  # its requests are all finished: nothing may come of it
        assert sched.update_from_output(in_flight[0], in_flight[1].result()) == []
    assert_no_leaks(sched)
    return finished


def test_placeholder_decode_follows_prefill_without_waiting():
    sched, runner = make(budget=32)
    sched.add_request(req("a", range(3, 10), max_tokens=3))
    first = sched.schedule()
    second = sched.schedule()  # step 1's token is not known yet
    (s,) = second.seqs
    assert s.placeholder and s.token_ids == [PLACEHOLDER_TOKEN_ID] and s.sample and s.start_pos == 7
    a = sched.requests["a"]
    assert a.num_computed_tokens == 8 and a.num_output_placeholders == 2
    p1, p2 = runner.dispatch(first), runner.dispatch(second)
    t1 = sched.update_from_output(first, {k: v.token_id for k, v in p1.result().items()})
    t2 = sched.update_from_output(second, {k: v.token_id for k, v in p2.result().items()})
    assert a.output_token_ids == [t1[0][1], t2[0][1]] and a.num_output_placeholders == 0
    sched.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    assert_no_leaks(sched)


def test_known_last_token_in_flight_is_not_scheduled_again():
    sched, runner = make()
    sched.add_request(req("a", range(3, 10), max_tokens=1))
    first = sched.schedule()
    assert sched.schedule().seqs == []  # the token in flight is its last: no wasted slot
    runner.dispatch(first).result()


def test_finished_while_in_flight_gets_nothing_and_frees_blocks():
    sched, runner = make(budget=32)
    sched.add_request(req("a", range(3, 3 + 2 * BS), max_tokens=10))
    sched.add_request(req("b", range(50, 55), max_tokens=10))
    s1 = sched.schedule()
    p1 = runner.dispatch(s1)
    s2 = sched.schedule()  # both decode on placeholders
    assert [s.placeholder for s in s2.seqs] == [True, True]
    p2 = runner.dispatch(s2)
    sched.update_from_output(s1, {k: v.token_id for k, v in p1.result().items()})
    sched.finish_requests("a", RequestStatus.FINISHED_STOPPED)  # e.g. its step-1 token hit a stop string
    sched.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert sched.update_from_output(s2, {k: v.token_id for k, v in p2.result().items()}) == []
    assert_no_leaks(sched)


def test_reused_id_does_not_take_the_old_requests_token():
    sched, runner = make()
    old = req("a", range(3, 9), max_tokens=10)
    sched.add_request(old)
    s1 = sched.schedule()
    p1 = runner.dispatch(s1)
    s2 = sched.schedule()
    p2 = runner.dispatch(s2)
    sched.update_from_output(s1, {k: v.token_id for k, v in p1.result().items()})
    sched.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    new = req("a", range(20, 30), max_tokens=10)
    sched.add_request(new)
    s3 = sched.schedule()  # the new "a" is prefilled while the old one's step 2 is in flight
    assert s3.seqs[0].prefix_token_ids == [] and "a" in s3.finished_or_preempted_ids
    p3 = runner.dispatch(s3)
    assert sched.update_from_output(s2, {k: v.token_id for k, v in p2.result().items()}) == []
    assert new.output_token_ids == [] and len(old.output_token_ids) == 1
    got = sched.update_from_output(s3, {k: v.token_id for k, v in p3.result().items()})
    assert [r for r, _ in got] == [new]
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert_no_leaks(sched)


def test_preempted_while_in_flight_keeps_its_token_and_waits_for_it():
    # 4 blocks of 4 tokens: two 7-token prompts fill 2 blocks each; the next decode needs a 5th
    sched, runner = make(num_blocks=4, budget=64)
    sched.add_request(req("a", range(3, 10), max_tokens=6))
    sched.add_request(req("b", range(30, 37), max_tokens=6))
    s1 = sched.schedule()
    p1 = runner.dispatch(s1)
    s2 = sched.schedule()  # positions 7 fit; both decode on placeholders
    p2 = runner.dispatch(s2)
    sched.update_from_output(s1, {k: v.token_id for k, v in p1.result().items()})
    s3 = sched.schedule()  # position 8 needs a new block each: "b" (latest) is preempted
    assert s3.finished_or_preempted_ids == ["b"] and [s.request_id for s in s3.seqs] == ["a"]
    b = sched.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_output_placeholders == 1
    p3 = runner.dispatch(s3)
    got = sched.update_from_output(s2, {k: v.token_id for k, v in p2.result().items()})
    assert {r.request_id for r, _ in got} == {"a", "b"} and b.num_output_tokens == 2
    sched.update_from_output(s3, {k: v.token_id for k, v in p3.result().items()})
    sched.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    assert_no_leaks(sched)


def test_async_drive_matches_sync_drive_under_preemption_and_chunking():
    import random
    rng = random.Random(3)
    reqs = [(f"q{i}", [rng.randrange(3, 131) for _ in range(rng.choice([1, 5, 17, 40, 70]))],
             rng.randint(1, 20), 1000 + i, 0.8 if i % 2 else 0.0) for i in range(24)]

    def run(driver):
        sched, runner = make(num_blocks=40, budget=24, max_seqs=6, max_len=180)
        for rid, prompt, mt, seed, temp in reqs:
            sched.add_request(req(rid, prompt, max_tokens=mt, seed=seed, temperature=temp))
        done = driver(sched, runner)
        return {k: r.output_token_ids for k, r in done.items()}, sched.num_preemptions, runner

    sync, _, _ = run(drive)
    got, preemptions, runner = run(drive_async)
    assert got == sync
    assert preemptions > 0 and runner.num_placeholders_fed > 0
