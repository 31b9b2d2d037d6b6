"""When to stop proposing drafts for a request whose drafts keep being rejected (host only, no jax).

A draft costs a token of compute whether or not it is accepted (on a compute-bound CPU fully; on
a memory-bound accelerator little, but a step carrying drafts still runs a draft bucket instead
of a decode one). Per request, an exponential moving average of accepted / drafted over its
steps that carried drafts:

    ema <- ALPHA * (accepted / drafted) + (1 - ALPHA) * ema        (ema starts at 1.0)

When it falls below THRESHOLD the request gets no drafts for a pause, then is proposed for again
with ema reset to THRESHOLD (so one more poor step pauses it again, one good step keeps it going).
The first pause lasts PAUSE_STEPS engine steps; each further one twice the previous, up to
MAX_PAUSE_STEPS, until a step accepts at least THRESHOLD of its drafts (back to PAUSE_STEPS).
So text that never repeats costs a few drafting steps per doubling, and a request that starts
repeating (code, a quoted paragraph) drafts again within PAUSE_STEPS..MAX_PAUSE_STEPS steps.
Drafts never change what is generated (the runner verifies them), so this changes speed only,
never outputs.
"""
from __future__ import annotations

from collections.abc import Container, Hashable

ALPHA = 0.3  # 5 drafting steps with nothing accepted in a row pause a fresh request (0.5: 3)
THRESHOLD = 0.2
PAUSE_STEPS = 4
MAX_PAUSE_STEPS = 64


class DraftBackoff:
    def __init__(self, alpha: float = ALPHA, threshold: float = THRESHOLD, pause_steps: int = PAUSE_STEPS,
                 max_pause_steps: int = MAX_PAUSE_STEPS) -> None:
        self.alpha, self.threshold = alpha, threshold
        self.pause_steps, self.max_pause_steps = pause_steps, max_pause_steps
        self._ema: dict[Hashable, float] = {}  # request key -> moving acceptance rate
        self._paused_until: dict[Hashable, int] = {}  # request key -> first step it drafts again
        self._pause: dict[Hashable, int] = {}  # request key -> its next pause (absent: pause_steps)

    def record(self, key: Hashable, drafted: int, accepted: int, step: int) -> None:
        """One step of `key` that carried `drafted` > 0 drafts, `accepted` of them kept."""
        rate = accepted / drafted
        if rate >= self.threshold:
            self._pause.pop(key, None)
        ema = self.alpha * rate + (1 - self.alpha) * self._ema.get(key, 1.0)
        if ema < self.threshold:
            pause = self._pause.get(key, self.pause_steps)
            self._paused_until[key] = step + pause
            self._pause[key] = min(2 * pause, self.max_pause_steps)
            ema = self.threshold
        self._ema[key] = ema

    def allows(self, key: Hashable, step: int) -> bool:
        """May `key` carry drafts in the step after `step`?"""
        until = self._paused_until.get(key)
        if until is None:
            return True
        if step < until:
            return False
        del self._paused_until[key]
        return True

    def retain(self, keep: Container) -> None:
        for d in (self._ema, self._paused_until, self._pause):
            for key in [key for key in d if key not in keep]:
                del d[key]
