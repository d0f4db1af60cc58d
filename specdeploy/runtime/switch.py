"""SpecSwitch: speculate or decode plain, step by step, from measured step times and acceptance.

Speculation pays while a spec step's tokens per unit of time beat a plain step's:
acceptance_length / spec_step_time >= 1 / plain_step_time. Both sides are measured as the run
goes (requests of one task in `speculative_generate`, as `SpecEngine` and Triton's `SpecDecoder`
keep one switch per task in a `SwitchBook`; a whole batch in `BatchSpeculator`), so the switch
turns speculation off where it does not pay (a prompt the draft predicts badly, a large batch)
and back on where it does, whatever the method: the loop never asks which proposer it runs.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Hashable
from statistics import median

from specdeploy.errors import SpecDeployError

MODES = ("on", "off", "auto")


class SpecSwitch:
    """Speculation "on", "off", or "auto" (a measured cost model).

    auto: the time of a spec step and of a plain step (each the median of its last `window`
    steps), and the tokens a spec step emits per slot (the acceptance length; a plain step emits
    exactly one). It runs spec steps while acceptance_length / spec_time >= 1 / plain_time.
    Medians, not moving averages: an average seeded or hit by one slow step stays high for many
    steps, so one-off costs (a proposer's catch-up over the prompt at a request's first draft, a
    CUDA graph captured the first time a shape occurs) can turn off speculation that pays.

    Acceptance is noisy step to step (1 to k + 1 tokens), and while speculation is off it is not
    measured at all, so the estimate must not outlive its evidence: it is a ratio of sums (over
    slot-steps: one slot for one step) that age by `acceptance_decay` every step, spec or plain.
    It starts with a burst of spec steps, then measures one plain step. While on, one plain step
    in `probe_every` refreshes the plain step time. While off, a burst of spec steps every
    `probe_every` steps re-measures acceptance; the old evidence has faded by then, so the burst
    decides. A burst runs until it holds `probe_len` slot-steps of evidence: `probe_len` steps for
    one request, a single step for a batch of that many. A burst that does not turn speculation
    back on doubles the wait before the next one (up to `max_wait`), so where speculation never
    pays probing costs little; one that does resets the wait.
    """

    def __init__(self, mode: str = "on", probe_every: int = 64, window: int = 9, probe_len: int = 4,
                 acceptance_decay: float = 0.95, max_wait: int = 512) -> None:
        if mode not in MODES:
            raise SpecDeployError(f"speculation switch must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode, self.probe_every = mode, probe_every
        self.probe_len, self.acceptance_decay, self.max_wait = probe_len, acceptance_decay, max_wait
        self._times = {True: deque(maxlen=window), False: deque(maxlen=window)}  # seconds of recent steps
        self.step_s: dict[bool, float | None] = {True: None, False: None}  # their medians, spec / plain
        self._tokens = self._weight = 0.0  # aged sums over slot-steps: tokens of spec steps, and their count
        self._steps = 0
        self._off_for = 0  # plain steps since speculation was last chosen
        self._wait = probe_every  # plain steps before the next probe burst
        self._burst = probe_len  # slot-steps of evidence the current burst still gathers
        self._probing = False  # a burst ran and its verdict is pending
        self.spec_steps = 0
        self.plain_steps = 0
        self._lock = threading.Lock()  # requests of one task may share a switch from several threads

    @property
    def acceptance(self) -> float | None:
        """Tokens per slot per spec step, over the aged evidence (None before any spec step)."""
        return self._tokens / self._weight if self._weight > 0 else None

    def prefers_spec(self) -> bool:
        """The cost model's choice (before probing)."""
        t_spec, t_plain = self.step_s[True], self.step_s[False]
        if t_spec is None or t_plain is None or self.acceptance is None:
            return True
        return self.acceptance / t_spec >= 1.0 / t_plain

    def expects_spec(self) -> bool:
        """Will the next step most likely speculate? For work queued before `choose` decides (a draft
        ahead of the verdict): "on", or "auto" whose cost model prefers speculation (a probe may differ)."""
        return self.mode == "on" or self.mode == "auto" and self.prefers_spec()

    def choose(self, slots: int = 1) -> bool:
        """Speculate in the next step (of `slots` active slots)?"""
        with self._lock:
            return self._choose(slots)

    def _choose(self, slots: int) -> bool:
        self._steps += 1
        if self.mode != "auto":
            return self.mode == "on"
        if self._burst > 0:
            self._burst -= max(slots, 1)
            return True
        if self.step_s[True] is None or self.acceptance is None:
            return True  # a step still in flight holds the first evidence
        if self.step_s[False] is None:
            return False  # then plain once
        best = self.prefers_spec()
        if self._probing:  # the burst's verdict
            self._probing = False
            self._wait = self.probe_every if best else min(2 * self._wait, self.max_wait)
        if best:
            self._off_for = 0
            return self._steps % self.probe_every != 0
        if self._off_for >= self._wait:
            self._off_for, self._burst, self._probing = 0, self.probe_len - max(slots, 1), True
            return True
        self._off_for += 1
        return False

    def record(self, spec: bool, tokens_per_slot: float | None, seconds: float, slots: int = 1) -> None:
        """One finished step: its mode, tokens emitted per active slot, its time, its active slots."""
        with self._lock:
            self._record(spec, tokens_per_slot, seconds, slots)

    def _record(self, spec: bool, tokens_per_slot: float | None, seconds: float, slots: int) -> None:
        if spec:
            self.spec_steps += 1
        else:
            self.plain_steps += 1
        if seconds > 0:  # the median once per step, where the time changes, not at every read
            self._times[spec].append(seconds)
            self.step_s[spec] = median(self._times[spec])
        self._tokens *= self.acceptance_decay
        self._weight *= self.acceptance_decay
        if spec and tokens_per_slot is not None and slots > 0:
            self._tokens += tokens_per_slot * slots
            self._weight += slots


class SwitchBook:
    """One auto `SpecSwitch` per key (task, proposer or method, k, greedy), kept across requests: a
    chat answer is too short for its own first steps to settle whether speculation pays, or for a
    probe to come back. Other modes ("on", "off") pass through as they are."""

    def __init__(self) -> None:
        self._switches: dict[Hashable, SpecSwitch] = {}
        self._lock = threading.Lock()

    def get(self, mode: str, key: Hashable) -> str | SpecSwitch:
        if mode != "auto":
            return mode
        with self._lock:
            return self._switches.setdefault(key, SpecSwitch("auto"))
