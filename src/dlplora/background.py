"""Background prompts: texts of tasks that no adapter of the paper's suite covers.

The router's "none of these" class learns from them to send prompts that belong to no adapter to the
base model. The default pool comes from the same PyPI sdist as the BIG-bench tasks (``bigbench==1.0.0``):
up to ``PER_TASK`` examples of each of the ~147 BIG-bench JSON tasks that are *not* among the 26
tasks, rendered as BIG-bench renders them (task prefix, input with its prefixes, choices). It is
built from the sdist in the same pass that extracts the BIG-bench tasks (:func:`dlplora.tasks.ensure_bigbench`)
and cached as ``<cache>/bigbench-1.0.0/background.jsonl`` (about 3 MB).

A user can pass any other JSONL of ``{"text": ...}`` (or ``{"input": ...}``) lines with
``train-plugin --background FILE``.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
from pathlib import Path
from typing import Sequence

from .errors import DLPLoRAError
from .paths import atomic_write_text

BACKGROUND_FILE = "background.jsonl"
PER_TASK = 40
MAX_FILE_BYTES = 40_000_000  # skip the few huge task files (they would only slow the one-time build)
SEED = 7


def render_example(data: dict, ex: dict) -> str | None:
    inp = ex.get("input")
    if not isinstance(inp, str) or not inp.strip():
        return None
    text = str(data.get("example_input_prefix", "\nQ: ")) + inp
    scores = ex.get("target_scores")
    if isinstance(scores, dict) and scores and data.get("append_choices_to_input", True):
        text += "".join(f"\n  choice: {c}" for c in scores)
    text += str(data.get("example_output_prefix", "\nA: "))
    text = str(data.get("task_prefix", "")) + text
    return text.strip()[:4000] or None


def build_background(tarball: str | os.PathLike, exclude: Sequence[str], per_task: int = PER_TASK,
                     seed: int = SEED) -> list[dict]:
    """Sample `per_task` rendered examples from every BIG-bench JSON task (over its subtasks) whose
    task is not in `exclude` -> [{"task", "text"}]."""
    rng = random.Random(seed)
    skip = set(exclude)
    by_task: dict[str, list[dict]] = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for m in tar:
                if not (m.isfile() and m.name.endswith("/task.json") and "/benchmark_tasks/" in m.name):
                    continue
                rel = m.name.split("/benchmark_tasks/", 1)[1]
                task = rel.split("/")[0]
                if task in skip or m.size > MAX_FILE_BYTES:
                    continue
                try:
                    data = json.loads(tar.extractfile(m).read())
                except (ValueError, UnicodeDecodeError):
                    continue
                examples = data.get("examples") if isinstance(data, dict) else None
                if not isinstance(examples, list):
                    continue
                picked = rng.sample(examples, min(per_task, len(examples)))
                for ex in picked:
                    t = render_example(data, ex) if isinstance(ex, dict) else None
                    if t:
                        by_task.setdefault(task, []).append({"task": rel.rsplit("/task.json", 1)[0], "text": t})
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DLPLoRAError(f"the BIG-bench archive {tarball} is unreadable or corrupt: {exc}") from exc
    return [r for task in sorted(by_task) for r in rng.sample(by_task[task], min(per_task, len(by_task[task])))]


def write_background(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def read_background(path: str | os.PathLike, exclude_tasks: Sequence[str] = ()) -> list[dict]:
    """Background rows from a JSONL file of {"text"} or {"input"} objects (optionally with "task");
    rows whose task is in `exclude_tasks` are left out."""
    p = Path(path)
    if not p.is_file():
        raise DLPLoRAError(f"background prompts file {p} does not exist")
    rows, skip = [], set(exclude_tasks)
    for i, line in enumerate(p.read_text(encoding="utf-8").split("\n"), 1):  # not splitlines(): U+2028 is text
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DLPLoRAError(f"{p}:{i} is not valid JSON ({exc})") from None
        text = obj.get("text", obj.get("input")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DLPLoRAError(f'{p}:{i} has no non-empty "text" (or "input") string')
        task = str(obj.get("task", ""))
        if task.split("/")[0] not in skip:
            rows.append({"task": task, "text": text})
    if not rows:
        raise DLPLoRAError(f"{p} holds no background prompts")
    return rows
