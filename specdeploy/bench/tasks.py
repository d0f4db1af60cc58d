"""Task types and prompt sets for benchmarks (JSONL: one {"task": ..., "prompt": ...} per line)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from specdeploy.errors import SpecDeployError

TASKS: tuple[str, ...] = (
    "code",
    "creative_writing",
    "summarization",
    "qa",
    "translation",
    "math",
    "sql",
    "api_call",
    "legal",
    "customer_support",
)

BUILTIN_SETS: tuple[str, ...] = ("eval", "demo")


@dataclass(frozen=True)
class Prompt:
    """One benchmark or training prompt, labelled with its task type."""

    task: str
    prompt: str


def _parse_lines(lines: list[str], source: str) -> list[Prompt]:
    """Parse JSONL lines; errors name `source` and the 1-based line number."""
    out: list[Prompt] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecDeployError(f"{source}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise SpecDeployError(f"{source}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if "prompt" not in obj:
            raise SpecDeployError(f"{source}:{lineno}: missing 'prompt'")
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise SpecDeployError(f"{source}:{lineno}: 'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise SpecDeployError(f"{source}:{lineno}: 'prompt' is empty")
        task = obj.get("task", "default")
        if not isinstance(task, str) or not task.strip():
            raise SpecDeployError(f"{source}:{lineno}: 'task' must be a non-empty string, got {task!r}")
        out.append(Prompt(task=task, prompt=prompt))
    return out


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a JSONL prompt file. Each line needs a non-empty string `prompt`; `task` defaults to "default"."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecDeployError(f"{path}: prompt file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecDeployError(f"{path}: cannot read prompt file ({e})") from None
    return _parse_lines(text.split("\n"), str(path))


def builtin_prompts(name: str) -> list[Prompt]:
    """The packaged prompt set `name`: "eval" (8 per task) or "demo" (2 per task, a subset of eval)."""
    if name not in BUILTIN_SETS:
        raise SpecDeployError(f"unknown builtin prompt set {name!r}; choose one of {', '.join(BUILTIN_SETS)}")
    res = resources.files("specdeploy.bench").joinpath("prompts").joinpath(f"{name}.jsonl")
    try:
        text = res.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecDeployError(f"builtin prompt set {name!r} is missing or unreadable ({e})") from None
    return _parse_lines(text.split("\n"), f"<builtin {name}.jsonl>")
