"""DraftBackoff: the moving acceptance rate, the pauses (doubling) and the resume, step by step (by hand)."""
from __future__ import annotations

from jaxllm.engine.spec_backoff import DraftBackoff


def test_low_acceptance_pauses_drafting_then_resumes():
    b = DraftBackoff(alpha=0.5, threshold=0.2, pause_steps=3, max_pause_steps=8)
    assert b.allows("a", 0)
    b.record("a", 4, 4, step=1)  # ema 0.5 * 1 + 0.5 * 1.0 = 1.0
    b.record("a", 4, 0, step=2)  # 0.5
    b.record("a", 4, 0, step=3)  # 0.25: still drafting
    assert b.allows("a", 3) and b._ema["a"] == 0.25
    b.record("a", 4, 0, step=4)  # 0.125 < 0.2: paused for steps 4..6, ema back to 0.2
    assert [b.allows("a", s) for s in (4, 5, 6, 7)] == [False, False, False, True]
    assert b._ema["a"] == 0.2
    b.record("a", 2, 0, step=8)  # 0.1: one more poor step pauses it again, twice as long
    assert [b.allows("a", s) for s in range(8, 15)] == [False] * 6 + [True]
    b.record("a", 2, 0, step=15)  # and again: 12 steps, capped at 8
    assert [b.allows("a", s) for s in range(15, 24)] == [False] * 8 + [True]
    b.record("a", 4, 3, step=24)  # a good step: ema 0.475, pauses back to 3 steps
    b.record("a", 4, 0, step=25)  # 0.2375
    b.record("a", 4, 0, step=26)  # 0.11875: paused 3 steps
    assert [b.allows("a", s) for s in (26, 28, 29)] == [False, False, True]
    assert b.allows("b", 8)  # per request
    b.record("b", 4, 1, step=8)  # 0.625
    b.retain({"b"})
    assert "a" not in b._ema and "a" not in b._paused_until and "a" not in b._pause and b._ema == {"b": 0.625}
