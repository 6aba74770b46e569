"""Automatic degradation: the head steps down a ladder when its time per output token breaks a target.

The measure is the mean time between two tokens of one stream (time per output token, the figure the
monitoring alert uses) over a sliding window. Above the target for a full window, the service takes one step
down; below ``up_fraction`` of the target for a full window, one step back up. Each step clears the window,
so the next decision judges the new level alone; the gap between the two thresholds keeps a step that makes
the service fast enough from being undone at once.

Levels (``levels()``): 0 serves as configured; 1 caps ``max_tokens`` of new requests; then each further level
reloads the model with fewer experts per token (Qwen3-30B-A3B: 8 -> 6 -> 4), which cuts the weights read per
token. llama.cpp reads the count from the GGUF's ``<arch>.expert_used_count``; the engine overrides it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Level:
    """One rung: ``max_tokens`` caps new requests (None: no cap), ``experts_used`` is the expert count per
    token the engine loads with (None: the model's own)."""

    index: int
    max_tokens: int | None
    experts_used: int | None

    def describe(self) -> str:
        parts = []
        if self.max_tokens is not None:
            parts.append(f"max_tokens capped at {self.max_tokens}")
        if self.experts_used is not None:
            parts.append(f"{self.experts_used} experts per token")
        return ", ".join(parts) or "as configured"


def levels(max_tokens_cap: int, model_experts: int | None, configured_experts: int | None) -> list[Level]:
    """The ladder for a model that uses ``model_experts`` experts per token (its GGUF's count, None for a
    dense model) served with ``configured_experts`` (``--experts-used``, None: the model's).

    Returns level 0 (as configured), level 1 (the cap), then one level per expert count of 3/4 and 1/2 of
    the served count, rounded down, each at least 1 and smaller than the one before: 8 -> 6 -> 4, 2 -> 1."""
    base = configured_experts or model_experts
    ladder = [Level(0, None, configured_experts), Level(1, max_tokens_cap, configured_experts)]
    if base:
        previous = base
        for fraction in (0.75, 0.5):
            count = max(1, math.floor(base * fraction))
            if count < previous:
                ladder.append(Level(len(ladder), max_tokens_cap, count))
                previous = count
    return ladder


class Ladder:
    """Decides the level from token gaps.

    ``target_ms``: the mean time per output token that is acceptable (ms); ``window_s``: how long a level is
    judged before the next decision (s); ``up_fraction``: the mean must be below this share of the target to
    step back up; ``min_tokens``: fewer gaps in the window than this decide nothing (an idle service stays
    where it is). Times are ``time.monotonic()`` seconds; gaps are seconds."""

    def __init__(
        self,
        target_ms: float,
        window_s: float,
        rungs: list[Level],
        up_fraction: float = 0.7,
        min_tokens: int = 16,
    ):
        self.target_ms = target_ms
        self.window_s = window_s
        self.rungs = rungs
        self.up_fraction = up_fraction
        self.min_tokens = min_tokens
        self.level = 0
        self.changed_at: float | None = None
        self.reason = ""
        self._gaps: deque[tuple[float, float]] = deque()
        self._sum = 0.0

    @property
    def current(self) -> Level:
        return self.rungs[self.level]

    def observe(self, now: float, gap_s: float) -> None:
        self._gaps.append((now, gap_s))
        self._sum += gap_s

    def _trim(self, now: float) -> None:
        while self._gaps and self._gaps[0][0] < now - self.window_s:
            self._sum -= self._gaps.popleft()[1]

    def mean_ms(self, now: float) -> float | None:
        """Mean gap in the window (ms), or None with fewer than ``min_tokens`` gaps."""
        self._trim(now)
        if len(self._gaps) < self.min_tokens:
            return None
        return 1000.0 * self._sum / len(self._gaps)

    def decide(self, now: float) -> Level | None:
        """The level to move to, or None to stay. A level is judged only after a full window at it."""
        if self.changed_at is not None and now - self.changed_at < self.window_s:
            return None
        mean = self.mean_ms(now)
        if mean is None:
            return None
        if mean > self.target_ms and self.level + 1 < len(self.rungs):
            step, verb = 1, "above"
        elif mean < self.target_ms * self.up_fraction and self.level > 0:
            step, verb = -1, f"below {self.up_fraction:g} x"
        else:
            return None
        gaps = len(self._gaps)
        self.level += step
        self.changed_at = now
        self.reason = (
            f"mean {mean:.1f} ms per output token over the last {self.window_s:g} s ({gaps} tokens), "
            f"{verb} the target {self.target_ms:g} ms"
        )
        self._gaps.clear()
        self._sum = 0.0
        return self.current
