"""Step gates in the scheduler (``Request.gate``, a beam search's driver holding its requests in
lockstep): a gated request is scheduled only while its outputs (in flight included) are below its
gate; prefill chunks run, a placeholder decode never runs ahead, a preempted gated request keeps
its place and waits for its release, and its tokens are those of the same request ungated."""
from jaxllm.core.request import RequestStatus
from tests.core.test_scheduler import assert_no_leaks, drive, make, req


def step(sched, runner):
    """One synchronous step: (request id, tokens, samples) scheduled; finish at max_output_tokens."""
    out = sched.schedule()
    sampled = runner.execute(out)
    for r, _ in sched.update_from_output(out, {k: v.token_id for k, v in sampled.items()}):
        if r.num_output_tokens >= r.max_output_tokens:
            sched.finish_requests(r.request_id, RequestStatus.FINISHED_LENGTH)
    return [(s.request_id, len(s.token_ids), s.sample) for s in out.seqs]


def reference(prompt, max_tokens):
    sched, runner = make()
    sched.add_request(req("g", prompt, max_tokens=max_tokens))
    return drive(sched, runner)["g"].output_token_ids


def test_prefill_chunks_run_then_each_token_waits_for_its_release():
    sched, runner = make(budget=8)
    g = req("g", range(3, 15), max_tokens=3)  # 12 prompt tokens: two chunks under budget 8
    g.gate = 1
    sched.add_request(g)
    sched.add_request(req("u", range(40, 43), max_tokens=6))
    assert step(sched, runner) == [("g", 8, False)]
    assert step(sched, runner) == [("g", 4, True), ("u", 3, True)]
    assert g.gate_closed and g.num_output_tokens == 1
    for _ in range(3):  # the ungated one keeps going, the gated one keeps its blocks and waits
        assert step(sched, runner) == [("u", 1, True)]
    assert g.status == RequestStatus.RUNNING and sched.kv.req_blocks["g"]
    g.gate = 2
    assert step(sched, runner) == [("g", 1, True), ("u", 1, True)]
    assert step(sched, runner) == [("u", 1, True)]  # u's 6th token: it finishes; g waits again
    assert step(sched, runner) == []
    assert sched.num_gate_closed() == 1
    g.gate = 3
    assert step(sched, runner) == [("g", 1, True)]
    assert_no_leaks(sched)  # g finished at its max_tokens
    assert g.output_token_ids == reference(range(3, 15), 3)


def test_no_placeholder_decode_past_the_gate():
    """Async scheduling: ungated, the next schedule decodes on the token in flight; gated, it does not."""
    sched, runner = make()
    g, u = req("g", range(3, 8), max_tokens=4), req("u", range(20, 25), max_tokens=4)
    g.gate = 1
    sched.add_request(g)
    sched.add_request(u)
    first = sched.schedule()
    assert [(s.request_id, s.sample) for s in first.seqs] == [("g", True), ("u", True)]
    second = sched.schedule()  # step 1 still in flight
    assert [(s.request_id, s.placeholder) for s in second.seqs] == [("u", True)]
    assert g.gate_closed and g.num_output_placeholders == 1
    sampled = runner.execute(first)
    sched.update_from_output(first, {k: v.token_id for k, v in sampled.items()})
    assert g.gate_closed  # its token arrived: still held until released
    sched.finish_requests(["g", "u"], RequestStatus.FINISHED_ABORTED)
    assert_no_leaks(sched)


def test_preempted_gated_request_waits_for_release_then_recomputes():
    sched, runner = make(num_blocks=6, budget=32, caching=False)
    u = req("u", range(3, 7), max_tokens=14)  # grows to 18 tokens: 5 blocks
    sched.add_request(u)
    step(sched, runner)
    g = req("g", range(50, 57), max_tokens=2)  # arrives later: the preemption victim
    g.gate = 1
    sched.add_request(g)
    for _ in range(20):
        step(sched, runner)
        if g.status == RequestStatus.PREEMPTED:
            break
    assert g.status == RequestStatus.PREEMPTED and g.num_output_tokens == 1 and g.gate_closed
    while "u" in sched.requests:  # blocks free again once u finishes, but g is held by its gate
        assert all(rid == "u" for rid, _, _ in step(sched, runner))
    assert step(sched, runner) == [] and list(sched.waiting) == [g]
    g.gate = 2
    assert step(sched, runner) == [("g", 8, True)]  # prompt + its first token recomputed, one more sampled
    assert_no_leaks(sched)
    assert g.output_token_ids == reference(range(50, 57), 2)


def test_held_requests_give_their_blocks_to_a_waiting_one_when_nothing_else_runs():
    """Held requests fill the pool and a waiting one (a driver's lagging beam) needs blocks: with
    nothing else to run the latest held one is preempted (no deadlock); while another request runs,
    the waiting one waits as any waiting request does."""
    sched, runner = make(num_blocks=6, budget=64, caching=False)
    a, b = req("a", range(3, 11), max_tokens=4), req("b", range(20, 28), max_tokens=4)  # 8 tokens: 2 blocks each
    a.gate = b.gate = 1
    u = req("u", range(40, 42), max_tokens=3)  # 1 block, runs 3 steps
    for r in (a, b, u):
        sched.add_request(r)
    step(sched, runner)
    w = req("w", range(60, 72), max_tokens=1)  # 12 tokens: 3 blocks, only 1 free
    sched.add_request(w)
    while "u" in sched.requests:
        assert step(sched, runner) == [("u", 1, True)] and w.status == RequestStatus.WAITING
    assert step(sched, runner) == [("w", 12, True)]  # u finished: b (latest held) gave its blocks
    assert b.status == RequestStatus.PREEMPTED and a.status == RequestStatus.RUNNING
    assert list(sched.waiting) == [b] and b.gate_closed
    a.gate = b.gate = 4
    while sched.has_unfinished_requests():
        step(sched, runner)
    assert_no_leaks(sched)
    assert b.output_token_ids == reference(range(20, 28), 4) and a.output_token_ids == reference(range(3, 11), 4)


def test_held_requests_give_their_running_slots_to_a_waiting_one_when_nothing_else_runs():
    """Held requests fill every running slot (max_num_seqs) and a waiting one needs a slot (beam_width
    > max_num_seqs): with nothing else to run the latest held one is preempted; while an ungated one
    runs, the waiting one waits for a slot as any waiting request does; an ungated workload is never
    preempted for a slot."""
    sched, runner = make(max_seqs=2, budget=64)
    a, w = req("a", range(3, 11), max_tokens=4), req("w", range(60, 66), max_tokens=2)
    a.gate = w.gate = 1
    u = req("u", range(40, 42), max_tokens=3)
    for r in (a, u, w):
        sched.add_request(r)
    assert step(sched, runner) == [("a", 8, True), ("u", 2, True)]
    while "u" in sched.requests:  # a held, u runs: w waits (no preemption)
        assert step(sched, runner) == [("u", 1, True)] and w.status == RequestStatus.WAITING
    assert step(sched, runner) == [("w", 6, True)]  # u's slot
    assert sched.num_preemptions == 0
    w2 = req("w2", range(70, 75), max_tokens=1)
    w2.gate = 1
    sched.add_request(w2)
    assert step(sched, runner) == [("w2", 5, True)]  # a, w held in both slots: w (latest) gave its slot
    assert w.status == RequestStatus.PREEMPTED and a.status == RequestStatus.RUNNING and sched.num_preemptions == 1
    assert step(sched, runner) == [] and list(sched.waiting) == [w]  # w2 finished; w held, nothing runs
    a.gate = w.gate = 4
    while sched.has_unfinished_requests():
        assert len(step(sched, runner)) <= 2
    assert_no_leaks(sched)
    assert a.output_token_ids == reference(range(3, 11), 4) and w.output_token_ids == reference(range(60, 66), 2)


def test_ungated_requests_beyond_max_num_seqs_just_wait():
    sched, runner = make(max_seqs=2, budget=64)
    for i in range(4):
        sched.add_request(req(f"r{i}", range(10 * i + 3, 10 * i + 8), max_tokens=3))
    finished = drive(sched, runner)
    assert sched.num_preemptions == 0 and len(finished) == 4
    assert all(finished[f"r{i}"].output_token_ids == reference(range(10 * i + 3, 10 * i + 8), 3) for i in range(4))
