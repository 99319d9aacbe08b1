"""When to try again: exponential backoff with jitter, and when to give up.

One policy object serves the job queue and the delivery outbox. Jitter spreads the retries of
many rows that failed together (a PACS that went down for everyone) so they do not come back
in one burst.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Delay before attempt ``n + 1`` after ``n`` failed attempts: ``base * factor**(n-1)``, capped.

    The jitter multiplies the delay by a uniform factor in ``[1 - jitter, 1 + jitter]``; the
    result never exceeds ``max_seconds`` and is never negative.
    """

    base_seconds: float = 5.0
    factor: float = 2.0
    max_seconds: float = 600.0
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if not self.base_seconds >= 0:
            raise ValueError(f"base_seconds must be >= 0, got {self.base_seconds}")
        if not self.factor >= 1:
            raise ValueError(f"factor must be >= 1 (a delay never shrinks), got {self.factor}")
        if not self.max_seconds >= self.base_seconds:
            raise ValueError(
                f"max_seconds ({self.max_seconds}) must be >= base_seconds ({self.base_seconds})"
            )
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def nominal(self, failed_attempts: int) -> float:
        """The delay without jitter after ``failed_attempts`` (>= 1) failures."""
        if failed_attempts < 1:
            raise ValueError(f"failed_attempts must be >= 1, got {failed_attempts}")
        delay = self.base_seconds
        # Multiply step by step and stop at the cap: factor**n would overflow for large n.
        for _ in range(failed_attempts - 1):
            delay *= self.factor
            if delay >= self.max_seconds:
                return self.max_seconds
        return min(delay, self.max_seconds)

    def delay(self, failed_attempts: int, rng: random.Random | None = None) -> float:
        """The delay to wait after ``failed_attempts`` failures, with jitter."""
        nominal = self.nominal(failed_attempts)
        if self.jitter == 0:
            return nominal
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return min(self.max_seconds, max(0.0, nominal * (1 + spread)))


def exhausted(attempts: int, max_attempts: int) -> bool:
    """True when ``attempts`` used up the ``max_attempts`` allowed: the row goes to ``dead``."""
    return attempts >= max_attempts
