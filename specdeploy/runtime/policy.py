"""Policy: which method and how many draft tokens (k) each task gets, or speculation off.

A policy is read from ``policy.json`` (written by ``specdeploy advise``, or by hand)::

    {"version": 1,
     "default": {"method": "ngram", "k": 4},
     "tasks": {"code": {"method": "ngram", "k": 8},
               "creative_writing": {"method": "none", "k": "off"}},
     "sampled": {"default": {"method": "none", "k": "off"},
                 "tasks": {"code": {"method": "eagle", "k": 2}}},
     "adaptive": {"enabled": true, "min_k": 1, "max_k": 8},
     "switch": "auto"}

``default`` and ``tasks`` rule greedy requests, and sampled ones too unless the file has a
``sampled`` section: then requests with temperature > 0 follow it (its own default and tasks).
Acceptance differs between greedy and sampled decoding (a draft's token must be drawn by the
target's distribution, not only be its argmax), so one task may pay at one and not the other.
``"switch": "auto"`` (default "on") lets speculating requests decode plain steps wherever the
measured acceptance does not pay for the measured step time (`SpecSwitch`, switch.py; `SpecEngine`
keeps one per task across requests): per-task advice comes from a few prompts, and prompts of one
task differ. Extra keys (the
advisor's evidence: α, expected speedup, costs) are kept and ignored.

Decisions are per request: `decide(task)` before it, `observe(decision, stats)` after it.
k never changes what is generated (verification keeps only tokens equal to the target's
choice), so whatever the policy decides, the output stays lossless; only the speed changes.

Online adaptation (``"adaptive": {"enabled": true}``), per task, from the requests' `SpecStats`:

- running α = exponential moving average of accepted / proposed;
- running last-position acceptance = fraction of full-length drafts whose LAST token was
  accepted (the whole draft); high means k is too small (raise: k *= 2, up to max_k), low
  means the last draft tokens are mostly wasted (lower: k //= 2, down to min_k);
- off: a task whose running α stays below ``off_below`` (after ``min_requests`` requests)
  stops speculating; every ``probe_every``-th request of it speculates again (a probe) and
  turns it back on if that probe's α reaches ``off_below``. A task the policy file marks
  off is probed the same way when adaptation is on.

Every decision is a `Decision` (task, method, k, reason, sampled); `summary()` counts them per
task (sampled requests under "TASK (sampled)" when the policy has a sampled section).
"""
from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple

from specdeploy.config import MAX_K, METHODS
from specdeploy.errors import SpecDeployError
from specdeploy.runtime.stats import SpecStats

OFF = "off"


@dataclass(frozen=True)
class TaskRule:
    """The static choice for one task: a method and k (k = 0: speculation off)."""

    method: str = "ngram"
    k: int = 4

    @property
    def off(self) -> bool:
        return self.k == 0 or self.method == "none"

    def as_dict(self) -> dict:
        return {"method": "none", "k": OFF} if self.off else {"method": self.method, "k": self.k}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "TaskRule":
        if not isinstance(d, dict):
            raise SpecDeployError(f"policy {where}: expected an object with 'method' and 'k', got {d!r}")
        if "enabled" in d:  # a guess users make; silently ignoring it would leave the task on
            raise SpecDeployError(f'policy {where}: "enabled" is not a policy key; turn a task off with '
                                  '{"method": "none", "k": "off"} (the format `specdeploy advise` writes)')
        method, k = d.get("method", "ngram"), d.get("k", 4)
        if method not in METHODS:
            raise SpecDeployError(f"policy {where}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if k == OFF or method == "none":
            return cls(method="none", k=0)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
            raise SpecDeployError(f"policy {where}: k must be 'off' or an integer in [1, {MAX_K}], got {k!r}")
        return cls(method=method, k=k)


class Rules(NamedTuple):
    """One section's static rules: per-task rules, and the default for tasks not named."""

    tasks: dict[str, TaskRule]
    default: TaskRule

    def rule(self, task: str) -> TaskRule:
        return self.tasks.get(task, self.default)


@dataclass(frozen=True)
class Adaptation:
    """Online adaptation settings (see the module docstring); thresholds are heuristics, tune per deployment."""

    enabled: bool = False
    min_k: int = 1
    max_k: int = 8
    raise_above: float = 0.6  # running last-position acceptance above which k doubles
    lower_below: float = 0.15  # ... below which k halves
    off_below: float = 0.1  # running α below which a task stops speculating
    min_requests: int = 2  # requests of a task observed before it may be turned off
    probe_every: int = 8  # while off, every N-th request of the task speculates (a probe)
    decay: float = 0.5  # weight of the past in the moving averages (0: last request only)

    def __post_init__(self) -> None:
        if not 1 <= self.min_k <= self.max_k <= MAX_K:
            raise SpecDeployError(f"policy adaptive: need 1 <= min_k <= max_k <= {MAX_K}, got {self.min_k}, {self.max_k}")
        for name in ("raise_above", "lower_below", "off_below", "decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise SpecDeployError(f"policy adaptive: {name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.probe_every < 1 or self.min_requests < 1:
            raise SpecDeployError("policy adaptive: probe_every and min_requests must be >= 1")

    @classmethod
    def from_dict(cls, d: dict | None) -> "Adaptation":
        d = d or {}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SpecDeployError(f"policy adaptive: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class Decision:
    """What the policy chose for one request. k = 0: speculation off (plain decoding)."""

    task: str
    method: str
    k: int
    reason: str  # "policy" | "default" | "adapted" | "off" | "probe"
    sampled: bool = False  # decided by the policy's sampled section (a request with temperature > 0)
    switch: str = "on"  # the request's speculation switch (`speculative_generate(switch=...)`)

    @property
    def off(self) -> bool:
        return self.k == 0

    def as_dict(self) -> dict:
        out = {"task": self.task, "method": self.method, "k": OFF if self.off else self.k, "reason": self.reason}
        if self.sampled:
            out["sampled"] = True
        if self.switch != "on" and not self.off:
            out["switch"] = self.switch
        return out


@dataclass
class _TaskState:
    k: int  # current k when on (and the k a probe uses)
    method: str
    off: bool
    alpha: float | None = None  # running α
    last: float | None = None  # running acceptance at the last draft position
    observed: int = 0  # speculating requests observed
    since_off: int = 0  # requests since the task was turned off
    changes: list[str] = field(default_factory=list)  # "k 4->8", "off", "on" (latest last)


def read_policy_file(path: str | Path) -> dict:
    """The JSON object of a policy file; SpecDeployError when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecDeployError(f"{path}: policy file not found") from None
    except (OSError, ValueError) as e:
        raise SpecDeployError(f"{path}: cannot read policy ({e})") from None


class Policy:
    """Per-task method and k (greedy, and optionally sampled, rules), with optional online adaptation.
    Thread-safe."""

    def __init__(self, tasks: dict[str, TaskRule] | None = None, default: TaskRule | None = None,
                 adaptive: Adaptation | None = None, extra: dict | None = None,
                 sampled: tuple[dict[str, TaskRule], TaskRule] | None = None, switch: str = "on") -> None:
        if switch not in ("on", "auto"):
            raise SpecDeployError(f"policy switch: expected 'on' or 'auto', got {switch!r}")
        self.switch = switch
        self.tasks = dict(tasks or {})
        self.default = default or TaskRule()
        self.sampled = None if sampled is None else Rules(dict(sampled[0]), sampled[1])  # requests at T > 0
        self.adaptive = adaptive or Adaptation()
        self.extra = dict(extra or {})  # evidence kept from the file (advisor's measurements)
        self._state: dict[str, _TaskState] = {}
        self._counts: dict[str, Counter] = {}
        self._lock = threading.Lock()

    # ---- file -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Policy":
        if not isinstance(d, dict):
            raise SpecDeployError("policy: expected a JSON object")
        tasks, default, evidence = _rules(d, "")
        sampled = extra_sampled = None
        if "sampled" in d:
            if not isinstance(d["sampled"], dict):
                raise SpecDeployError("policy: 'sampled' must be an object {default, tasks}")
            s_tasks, s_default, s_evidence = _rules(d["sampled"], "sampled ")
            sampled, extra_sampled = (s_tasks, s_default), {k: v for k, v in d["sampled"].items() if k not in ("tasks", "default")}
            extra_sampled["tasks"] = s_evidence
        extra = {k: v for k, v in d.items() if k not in ("tasks", "default", "adaptive", "version", "sampled", "switch")}
        extra["tasks"] = evidence
        if extra_sampled is not None:
            extra["sampled"] = extra_sampled
        return cls(tasks, default, Adaptation.from_dict(d.get("adaptive")), extra, sampled, d.get("switch", "on"))

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        return cls.from_dict(read_policy_file(path))

    def to_dict(self) -> dict:
        def written(tasks: dict[str, TaskRule], default: TaskRule, evidence: dict) -> dict:
            return {"default": default.as_dict(),
                    "tasks": {t: {**r.as_dict(), **evidence.get(t, {})} for t, r in tasks.items()}}

        out = {"version": 1, **written(self.tasks, self.default, self.extra.get("tasks", {}))}
        if self.sampled is not None:
            more = self.extra.get("sampled", {})
            out["sampled"] = {**written(*self.sampled, more.get("tasks", {})),
                              **{k: v for k, v in more.items() if k != "tasks"}}
        out["adaptive"] = asdict(self.adaptive)
        out["switch"] = self.switch
        out.update({k: v for k, v in self.extra.items() if k not in ("tasks", "sampled")})
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def section(self, sampled: bool = False) -> Rules:
        """The rules of greedy requests, or (with `sampled`) of requests at temperature > 0."""
        return self.sampled if sampled and self.sampled is not None else Rules(self.tasks, self.default)

    def rule(self, task: str, sampled: bool = False) -> TaskRule:
        """The static rule for a task's greedy (or, with `sampled`, temperature > 0) requests."""
        return self.section(sampled).rule(task)

    def rules(self) -> list[tuple[str, TaskRule]]:
        """Every static rule, named as error messages name it ("default", "task 'code'", "sampled default", ...)."""
        out = [("default", self.default)] + [(f"task {t!r}", r) for t, r in self.tasks.items()]
        if self.sampled is not None:
            out += [("sampled default", self.sampled.default)] + [(f"sampled task {t!r}", r) for t, r in self.sampled.tasks.items()]
        return out

    # ---- decisions ----------------------------------------------------------------------
    def decide(self, task: str, temperature: float = 0.0) -> Decision:
        """The method and k for the next request of `task` at `temperature`."""
        sampled = temperature > 0 and self.sampled is not None
        with self._lock:
            d = replace(self._decide(task, sampled), switch=self.switch)
            self._counts.setdefault(_key(task, sampled), Counter())["off" if d.off else f"{d.method} k={d.k}"] += 1
            return d

    def _decide(self, task: str, sampled: bool) -> Decision:
        rules = self.section(sampled)
        rule = rules.rule(task)
        static = "policy" if task in rules.tasks else "default"
        if not self.adaptive.enabled:
            if rule.off:
                return Decision(task, "none", 0, static, sampled)
            return Decision(task, rule.method, rule.k, static, sampled)
        s = self._state_of(task, sampled)
        if s.off:
            s.since_off += 1
            if s.method != "none" and s.since_off % self.adaptive.probe_every == 0:
                return Decision(task, s.method, s.k, "probe", sampled)
            return Decision(task, "none", 0, "off", sampled)
        return Decision(task, s.method, s.k, "adapted" if s.changes else static, sampled)

    def _state_of(self, task: str, sampled: bool) -> _TaskState:
        key = _key(task, sampled)
        s = self._state.get(key)
        if s is None:
            a, rules = self.adaptive, self.section(sampled)
            rule, default = rules.rule(task), rules.default
            # a task marked off still gets a method to probe with: the default's (or ngram)
            method = rule.method if not rule.off else (default.method if not default.off else "ngram")
            k = rule.k if not rule.off else (default.k if not default.off else a.min_k)
            s = self._state[key] = _TaskState(k=min(max(k, a.min_k), a.max_k), method=method, off=rule.off)
        return s

    def observe(self, decision: Decision, stats: SpecStats) -> None:
        """Update the running acceptance of the decision's task from one request's stats."""
        if not self.adaptive.enabled or decision.off or stats.proposed == 0:
            return
        a = self.adaptive
        with self._lock:
            s = self._state_of(decision.task, decision.sampled)
            alpha = stats.accepted / stats.proposed
            k = decision.k
            # acceptance at the last position: drafts that reached position k, and were accepted up to it
            reached = stats.proposed_at[k - 1] if len(stats.proposed_at) >= k else 0
            last = stats.accepted_at[k - 1] / reached if reached else None
            s.alpha = alpha if s.alpha is None else a.decay * s.alpha + (1 - a.decay) * alpha
            if last is not None:
                s.last = last if s.last is None else a.decay * s.last + (1 - a.decay) * last
            s.observed += 1
            if decision.reason == "probe":
                if alpha >= a.off_below:  # the probe alone decides: the task's traffic may have changed
                    s.off, s.alpha, s.last = False, alpha, last
                    s.changes.append("on")
                s.since_off = 0
                return
            if s.observed >= a.min_requests and s.alpha < a.off_below:
                s.off, s.since_off = True, 0
                s.changes.append("off")
                return
            if s.last is not None and s.last >= a.raise_above and s.k < a.max_k:
                s.changes.append(f"k {s.k}->{min(2 * s.k, a.max_k)}")
                s.k, s.last = min(2 * s.k, a.max_k), None
            elif s.last is not None and s.last < a.lower_below and s.k > a.min_k:
                s.changes.append(f"k {s.k}->{max(s.k // 2, a.min_k)}")
                s.k, s.last = max(s.k // 2, a.min_k), None

    def summary(self) -> dict:
        """Per task: how many requests got each decision, and the adaptive state now."""
        with self._lock:
            out = {}
            for task, counts in self._counts.items():
                row: dict = {"decisions": dict(counts)}
                s = self._state.get(task)
                if s is not None:
                    row.update({"k": s.k, "method": s.method, "off": s.off, "running_alpha": s.alpha,
                                "running_last_position": s.last, "changes": list(s.changes)})
                out[task] = row
            return out


def _key(task: str, sampled: bool) -> str:
    return f"{task} (sampled)" if sampled else task


def _rules(d: dict, where: str) -> tuple[dict[str, TaskRule], TaskRule, dict]:
    """(tasks, default, per-task evidence) of a policy section: the file's top level or its sampled part."""
    tasks_in = d.get("tasks", {})
    if not isinstance(tasks_in, dict):
        raise SpecDeployError(f"policy: '{where}tasks' must be an object {{task: {{method, k}}}}")
    tasks = {t: TaskRule.from_dict(r, f"{where}task {t!r}") for t, r in tasks_in.items()}
    default = TaskRule.from_dict(d["default"], f"{where}default") if "default" in d else TaskRule()
    evidence = {t: {k: v for k, v in r.items() if k not in ("method", "k")} for t, r in tasks_in.items()}
    return tasks, default, evidence
