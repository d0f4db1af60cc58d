"""Acceptance counters per request and per task label, counted one way everywhere."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Counters of one request, or the sum over many (`merge`)."""

    requests: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens given to the user
    target_forwards: int = 0  # verify steps (prefill not counted)
    wall_s: float = 0.0
    switched_off: int = 0  # verify steps decoded plain by the speculation switch (switch "auto")
    proposed_at: list[int] = field(default_factory=list)  # [position] drafts that reached position i
    accepted_at: list[int] = field(default_factory=list)  # [position] drafts accepted at position i

    def record_step(self, proposed: int, accepted: int) -> None:
        self.target_forwards += 1
        self.proposed += proposed
        self.accepted += accepted
        _grow(self.proposed_at, proposed)
        _grow(self.accepted_at, proposed)
        for i in range(proposed):
            self.proposed_at[i] += 1
        for i in range(accepted):
            self.accepted_at[i] += 1

    def merge(self, other: "SpecStats") -> None:
        self.requests += other.requests
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.emitted += other.emitted
        self.target_forwards += other.target_forwards
        self.wall_s += other.wall_s
        self.switched_off += other.switched_off
        for mine, theirs in ((self.proposed_at, other.proposed_at), (self.accepted_at, other.accepted_at)):
            _grow(mine, len(theirs))
            for i, v in enumerate(theirs):
                mine[i] += v

    @property
    def alpha(self) -> float | None:
        """accepted / proposed; None when nothing was proposed."""
        return self.accepted / self.proposed if self.proposed else None

    @property
    def acceptance_length(self) -> float | None:
        """Tokens emitted per target forward, the recovered/bonus token included."""
        return self.emitted / self.target_forwards if self.target_forwards else None

    @property
    def acceptance_by_position(self) -> list[float]:
        """Fraction of drafts reaching position i whose token i was accepted."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted_at, self.proposed_at)]

    @property
    def tokens_per_s(self) -> float:
        return self.emitted / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "alpha": self.alpha,
            "acceptance_length": self.acceptance_length,
            "acceptance_by_position": self.acceptance_by_position,
            "emitted": self.emitted,
            "target_forwards": self.target_forwards,
            "wall_s": self.wall_s,
            "switched_off": self.switched_off,
            "tokens_per_s": self.tokens_per_s,
        }


class TaskStats:
    """SpecStats summed per task label."""

    def __init__(self) -> None:
        self.by_task: dict[str, SpecStats] = {}

    def add(self, task: str, stats: SpecStats) -> None:
        self.by_task.setdefault(task, SpecStats()).merge(stats)

    def total(self) -> SpecStats:
        return merged(self.by_task.values())


def merged(stats: Iterable[SpecStats]) -> SpecStats:
    """The counters of several requests (or tasks) summed into one SpecStats."""
    out = SpecStats()
    for s in stats:
        out.merge(s)
    return out


def _grow(xs: list[int], n: int) -> None:
    xs.extend([0] * (n - len(xs)))
