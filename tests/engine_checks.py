"""Shared checks for tests that run a real engine."""


def assert_clean(engine):
    """Nothing left behind: no requests, every KV block free, block-pool invariants hold, no penalty
    rows held by the runner."""
    assert not engine.has_unfinished_requests()
    s = engine.get_stats()
    assert s["num_free_blocks"] == s["num_blocks"], s
    assert s["num_running"] == 0 and s["num_waiting"] == 0, s
    assert not engine.scheduler.requests and not engine.kv.req_blocks
    engine.kv.pool.check_invariants()
    r = engine.runner
    assert not r._rows and len(r._free_rows) == r.num_rows - 1, "penalty rows leaked"
