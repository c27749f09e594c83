"""Views of a prompt: the ways a user may write the same task request without BIG-bench's scaffolding.

A prepared example (see :mod:`dlplora.tasks`) is rendered from parts::

    task_prefix + input_prefix + input + "\\n  choice: ..." * k + output_prefix

Users rarely write all of them. Each *view* keeps or drops parts, or damages the text as people do:

=================  ==============================================================================
``rendered``       all parts, exactly as adapter training and evaluation render it
``no_task_prefix`` without the task's instruction
``no_choices``     without the choice list (same as ``rendered`` for generative tasks)
``no_io_prefixes`` without the input/output prefixes (``Q:``, ``Sentence:``, ``Language:``, ...)
``input_only``     the input text alone: no instruction, no scaffolding
``first_half``     the first half of the rendered prompt (cut at a word boundary)
``history``        another task's rendered turn placed before it (joined as the engine joins turns)
``noise``          light noise: case, whitespace and punctuation changes
=================  ==============================================================================

:func:`render_view` gives one view; :func:`augment` draws random *combinations* of them for training,
so the router learns the task from its content rather than from a fixed tail such as ``Language:``.
"""

from __future__ import annotations

import random

from ..config import TURN_SEPARATOR

VIEWS = ("rendered", "no_task_prefix", "no_choices", "no_io_prefixes", "input_only", "first_half", "history", "noise")
_PUNCT = ".,;:?!"


def compose(ex: dict, *, task_prefix: bool = True, io_prefixes: bool = True, choices: bool = True) -> str:
    """The prompt from the parts that are kept (all kept = :func:`dlplora.tasks.user_message`)."""
    text = ((ex.get("input_prefix") or "") if io_prefixes else "") + ex["input"]
    if choices and ex.get("choices"):
        text += "".join(f"\n  choice: {c}" for c in ex["choices"])
    if io_prefixes:
        text += ex.get("output_prefix") or ""
    if task_prefix and ex.get("task_prefix"):
        text = ex["task_prefix"] + text
    return text.strip()


def first_part(text: str, frac: float = 0.5) -> str:
    """The first `frac` of `text` by characters, cut back to a word boundary (at least one word)."""
    cut = max(1, int(len(text) * frac))
    head = text[:cut]
    if cut < len(text) and not text[cut].isspace():
        space = max(head.rfind(" "), head.rfind("\n"))
        if space > 0:
            head = head[:space]
    return head.strip() or text.split()[0]


def add_noise(text: str, rng: random.Random) -> str:
    """Light noise a person adds: change the case (all lower, a few words capitalised or shouted),
    double or collapse whitespace, turn line breaks into spaces, drop or add punctuation."""
    words = text.split(" ")
    mode = rng.random()
    if mode < 0.3:
        words = [w.lower() for w in words]
    elif mode < 0.6:
        words = [w.capitalize() if rng.random() < 0.3 else w for w in words]
    elif mode < 0.75:
        words = [w.upper() if rng.random() < 0.15 else w for w in words]
    out = []
    for w in words:
        if w and w[-1] in _PUNCT and rng.random() < 0.3:
            w = w[:-1]
        out.append(w)
        out.append("  " if rng.random() < 0.1 else " ")
    text = "".join(out[:-1])
    if rng.random() < 0.5:
        text = text.replace("\n", " ")
    if rng.random() < 0.3:
        text = text.rstrip() + rng.choice(["?", "!", " ?", "...", " please"])
    if rng.random() < 0.2:
        text = "  " + text + " \n"
    return text if text.strip() else "?"


def render_view(ex: dict, view: str, rng: random.Random, other_turn: str | None = None) -> str:
    """One view of example `ex` (see the module docstring). ``history`` needs `other_turn`, the
    rendered prompt of another task's example."""
    if view == "rendered":
        return compose(ex)
    if view == "no_task_prefix":
        return compose(ex, task_prefix=False)
    if view == "no_choices":
        return compose(ex, choices=False)
    if view == "no_io_prefixes":
        return compose(ex, io_prefixes=False)
    if view == "input_only":
        return ex["input"].strip()
    if view == "first_half":
        return first_part(compose(ex))
    if view == "history":
        if other_turn is None:
            raise ValueError("the history view needs another task's turn")
        return other_turn + TURN_SEPARATOR + compose(ex)
    if view == "noise":
        return add_noise(compose(ex), rng)
    raise ValueError(f"unknown view {view!r}; views: {', '.join(VIEWS)}")


def augment(ex: dict, rng: random.Random, other_turn: str | None = None) -> str:
    """A random combination of views for training: each scaffolding part is dropped with probability
    1/2 (or everything but the input, 1 in 6), then the text may be cut to its first 30-90%, get
    another task's turn before it, and get light noise."""
    if rng.random() < 1 / 6:
        text = ex["input"].strip()
    else:
        text = compose(ex, task_prefix=rng.random() < 0.5, io_prefixes=rng.random() < 0.5,
                       choices=rng.random() < 0.5)
    if rng.random() < 0.25:
        text = first_part(text, rng.uniform(0.3, 0.9))
    if other_turn is not None and rng.random() < 0.2:
        text = other_turn + TURN_SEPARATOR + text
    if rng.random() < 0.3:
        text = add_noise(text, rng)
    return text if text.strip() else ex["input"]


def view_texts(rows_by_task: dict[str, list[dict]], view: str, seed: int = 1) -> tuple[list[str], list[str]]:
    """Every example of every task in `view` -> (texts, gold task names). History turns are drawn
    from the other tasks' examples with a fixed seed."""
    rng = random.Random(seed)
    names = list(rows_by_task)
    texts, gold = [], []
    for task, rows in rows_by_task.items():
        others = [n for n in names if n != task]
        for r in rows:
            other = None
            if view == "history" and others:
                other = compose(rng.choice(rows_by_task[rng.choice(others)]))
            texts.append(render_view(r, view, rng, other) if view != "history" or other else compose(r))
            gold.append(task)
    return texts, gold

