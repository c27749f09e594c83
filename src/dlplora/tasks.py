"""The paper's 26 tasks: registry, loaders, deterministic splits and the prompt renderer.

20 tasks come from BIG-bench (the ``bigbench==1.0.0`` sdist on PyPI, fetched once with
``pip download`` and reduced to the task.json files we use), 6 from JSONL files
``{"input", "target"}`` in a directory the user supplies (``--extra-data``).

A prepared example is a dict::

    {"id", "task", "input", "target", "choices", "answer_index", "aliases",
     "task_prefix", "input_prefix", "output_prefix", "subtask"}

``choices``/``answer_index`` are set for multiple-choice examples, None otherwise. The same
renderer (:func:`user_message`, :func:`chat_prompt`, :func:`candidates`) is used by adapter
training, the router and evaluation.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .background import BACKGROUND_FILE, build_background, write_background
from .errors import DLPLoRAError
from .paths import atomic_write_text, cache_dir, extra_data_dir

SPLIT_SEED = 1234
SAMPLE_SIZE = 1000
# The prepared data's format, recorded in OUT/<task>/format.json. 2: a multiple-choice example lists its options in
# an order shuffled per example, as BIG-bench's `append_choices_to_input` does (a permutation of the sorted options).
# Format 1 kept the task file's order, which puts the answer first in every ConParaKC and QuesSel example: an adapter
# could learn the position instead of the task.
DATA_FORMAT = 2
CHOICE_SEED = "dlp-lora-choices"
BIGBENCH_VERSION = "1.0.0"
# BIG-bench's own defaults when a task.json does not set its prefixes (bigbench/api/json_task.py).
_BB_INPUT_PREFIX = "\nQ: "
_BB_OUTPUT_PREFIX = "\nA: "


@dataclass(frozen=True)
class TaskSpec:
    name: str  # full snake_case name, also the adapter name
    short: str  # the paper's short name
    kind: str  # "mcq" or "qa"
    metrics: tuple[str, ...]
    source: str  # "bigbench" or "extra"
    subtasks: tuple[str, ...] = ()  # BIG-bench subtask dirs to merge ("" = the task's own task.json)
    instruction: str = ""  # task prefix for the extra tasks (BIG-bench tasks carry their own)
    note: str = ""

    @property
    def has_choices(self) -> bool:
        return "accuracy" in self.metrics


_MCQ = ("accuracy",)
_EM = ("exact_match",)
_GEN = ("bleu", "rouge1", "rougeL")

_TASKS = [
    TaskSpec("abstract_narrative_understanding", "AbsNarr", "mcq", _MCQ, "bigbench", ("4_distractors",),
             note="subtask 4_distractors (5 choices)"),
    TaskSpec("contextual_parametric_knowledge_conflicts", "ConParaKC", "mcq", _MCQ, "bigbench", ("",),
             note="multiple-choice form (target_scores); the free-text target is kept as an alias"),
    TaskSpec("cs_algorithms", "CSAlg", "mcq", _MCQ, "bigbench", ("lcs", "valid_parentheses"),
             note="subtasks lcs + valid_parentheses merged"),
    TaskSpec("disfl_qa", "DisflQA", "mcq", _EM, "bigbench", ("",),
             note="BIG-bench form is exact-match generation: target string is the answer, scored by exact match"),
    TaskSpec("elementary_math_qa", "ElemMath", "mcq", _MCQ, "bigbench",
             ("question_only", "question_with_language_hint", "question_with_mathematical_hint"),
             note="subtasks with a question merged (the hint-only subtasks have no question)"),
    TaskSpec("epistemic_reasoning", "EpiReason", "mcq", _MCQ, "bigbench", ("",)),
    TaskSpec("formal_fallacies_syllogisms_negation", "FormFall", "mcq", _MCQ, "bigbench", ("",)),
    TaskSpec("language_identification", "LangID", "mcq", _MCQ, "bigbench", ("",)),
    TaskSpec("logical_deduction", "LogDeduc", "mcq", _MCQ, "bigbench", ("three_objects", "five_objects", "seven_objects"),
             note="three/five/seven objects merged"),
    TaskSpec("object_counting", "ObjCount", "mcq", _EM, "bigbench", ("",),
             note="BIG-bench form is exact-match generation: first target is the answer, all targets accepted"),
    TaskSpec("play_dialog_same_or_different", "PlayDiag", "mcq", _MCQ, "bigbench", ("",)),
    TaskSpec("question_selection", "QuesSel", "mcq", _MCQ, "bigbench", ("",)),
    TaskSpec("reasoning_about_colored_objects", "ColorReason", "mcq", _MCQ, "bigbench", ("",)),
    TaskSpec("tracking_shuffled_objects", "TrackObj", "mcq", _MCQ, "bigbench", ("three_objects", "five_objects", "seven_objects"),
             note="three/five/seven objects merged"),
    TaskSpec("unit_conversion", "UnitConv", "mcq", _MCQ, "bigbench",
             ("chained_conversion", "different_systems", "novel_systems", "si_conversion", "unit_identification"),
             note="only the multiple-choice subtasks (the 3 numeric-answer subtasks are dropped)"),
    TaskSpec("vitaminc_fact_verification", "VitaFact", "mcq", _MCQ, "bigbench", ("",)),
    TaskSpec("winowhy", "WinoWhy", "mcq", _MCQ, "bigbench", ("",)),
    TaskSpec("gsm8k", "GSM8K", "qa", _GEN + ("answer_accuracy",), "extra",
             instruction="Solve the following grade-school math problem step by step. End with '#### ' and the final number.\n"),
    TaskSpec("cnn_dailymail", "CNNDM", "qa", _GEN, "extra",
             instruction="Summarize the following news article in a few highlight sentences.\n"),
    TaskSpec("linguistics_puzzles", "LingPuzz", "qa", _GEN, "bigbench", ("",)),
    TaskSpec("news_commentary_de", "NewsDE", "qa", _GEN, "extra", instruction="Translate the following German text into English.\n"),
    TaskSpec("news_commentary_es", "NewsES", "qa", _GEN, "extra", instruction="Translate the following Spanish text into English.\n"),
    TaskSpec("news_commentary_it", "NewsIT", "qa", _GEN, "extra", instruction="Translate the following Italian text into English.\n"),
    TaskSpec("strategyqa", "StratQA", "qa", _GEN, "bigbench", ("",),
             note="generative form: the target is the yes/no answer with its explanation"),
    TaskSpec("topical_chat", "TopChat", "qa", _GEN, "bigbench", ("",), note="next dialogue turn as target"),
    TaskSpec("alpaca", "ALPACA", "qa", _GEN, "extra"),
]

TASKS: dict[str, TaskSpec] = {t.name: t for t in _TASKS}
_BY_SHORT = {t.short.lower(): t.name for t in _TASKS}
MCQ_TASKS = [t.name for t in _TASKS if t.kind == "mcq"]
QA_TASKS = [t.name for t in _TASKS if t.kind == "qa"]
EXTRA_TASKS = [t.name for t in _TASKS if t.source == "extra"]


def get_task(name: str) -> TaskSpec:
    key = name.strip()
    if key in TASKS:
        return TASKS[key]
    if key.lower() in _BY_SHORT:
        return TASKS[_BY_SHORT[key.lower()]]
    raise DLPLoRAError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or their short names, e.g. WinoWhy)")


def parse_tasks(value: str | Iterable[str] | None, data_dir: str | os.PathLike | None = None) -> list[str]:
    """'all', 'mcq', 'qa', or a comma-separated list of full or short names -> full names, in registry order
    for the groups and in the given order otherwise. With `data_dir`, a name outside the registry is
    accepted when prepared data exists for it there (a custom task in the same format)."""
    if value is None:
        return list(TASKS)
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [i.strip() for i in items if i.strip()]
    if not items:
        raise DLPLoRAError("no tasks given")
    out: list[str] = []
    for item in items:
        group = {"all": list(TASKS), "mcq": MCQ_TASKS, "qa": QA_TASKS}.get(item.lower())
        if not group and data_dir is not None and prepared_path(data_dir, item, "train").is_file() \
                and item.lower() not in _BY_SHORT and item not in TASKS:
            group = [item]
        for name in group or [get_task(item).name]:
            if name not in out:
                out.append(name)
    return out


# ---------------------------------------------------------------- BIG-bench download and cache

def bigbench_dir() -> Path:
    return cache_dir() / f"bigbench-{BIGBENCH_VERSION}"


def _needed_bigbench_files() -> dict[str, Path]:
    """Archive-relative task.json path -> cache path, for every BIG-bench (sub)task we use."""
    out = {}
    for t in _TASKS:
        if t.source != "bigbench":
            continue
        for sub in t.subtasks:
            rel = f"{t.name}/{sub}/task.json" if sub else f"{t.name}/task.json"
            out[rel] = bigbench_dir() / rel
    return out


def fetch_bigbench_sdist(tmp: str, log=print) -> Path:
    """The bigbench sdist: $DLP_LORA_BIGBENCH_SDIST if set, else downloaded into `tmp` with pip."""
    sdist = os.environ.get("DLP_LORA_BIGBENCH_SDIST")
    if sdist:
        return Path(sdist)
    log(f"downloading the BIG-bench task files (PyPI sdist bigbench=={BIGBENCH_VERSION}, 358 MB, once)...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", "-d", tmp, f"bigbench=={BIGBENCH_VERSION}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = list(Path(tmp).glob("bigbench-*.tar.gz"))
    if res.returncode != 0 or not found:
        raise DLPLoRAError(
            f"could not download the BIG-bench sdist with `{' '.join(cmd[2:])}`: "
            f"{(res.stderr or res.stdout).strip().splitlines()[-1:] or 'no file'}. "
            "Set DLP_LORA_BIGBENCH_SDIST to a local bigbench-1.0.0.tar.gz to skip the download.")
    return found[0]


def background_path() -> Path:
    """The cached background prompts (BIG-bench tasks outside the suite; see :mod:`dlplora.background`)."""
    return bigbench_dir() / BACKGROUND_FILE


def _cache_background(tarball: Path, log=print) -> None:
    rows = build_background(tarball, exclude=list(TASKS))
    write_background(background_path(), rows)
    log(f"cached {len(rows)} background prompts from {len({r['task'].split('/')[0] for r in rows})} other "
        f"BIG-bench tasks in {background_path()}")


def ensure_background(log=print, fetch: bool | None = None) -> Path | None:
    """The cached background pool. Built from the bigbench sdist when missing and `fetch` is true;
    `fetch=None` fetches only where the BIG-bench tasks are already cached (this user works with them),
    so that a library of the user's own tasks never triggers the 358 MB download. None = no pool."""
    path = background_path()
    if path.is_file():
        return path
    if fetch is None:
        fetch = bigbench_dir().is_dir()
    if not fetch:
        return None
    with tempfile.TemporaryDirectory(prefix="dlp-bigbench-") as tmp:
        _cache_background(fetch_bigbench_sdist(tmp, log), log)
    return path


def ensure_bigbench(log=print) -> Path:
    """Fetch the bigbench sdist once (pip download), extract the task.json files we use and the
    background prompts of the other tasks, delete the tarball."""
    needed = _needed_bigbench_files()
    if all(p.is_file() for p in needed.values()):
        return bigbench_dir()
    with tempfile.TemporaryDirectory(prefix="dlp-bigbench-") as tmp:
        tarball = fetch_bigbench_sdist(tmp, log)
        wanted = {f"benchmark_tasks/{rel}": dest for rel, dest in needed.items()}
        got = 0
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                for member in tar:
                    key = member.name.split("/bigbench/", 1)[-1]
                    dest = wanted.get(key)
                    if dest is None or not member.isfile():
                        continue
                    data = tar.extractfile(member).read()
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmpf = dest.with_name(".task.json.tmp")
                    tmpf.write_bytes(data)
                    os.replace(tmpf, dest)
                    got += 1
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DLPLoRAError(f"the BIG-bench archive {tarball} is unreadable or corrupt: {exc}") from exc
        missing = [k for k, p in needed.items() if not p.is_file()]
        if missing:
            raise DLPLoRAError(f"the BIG-bench archive {tarball} lacks {', '.join(missing)}")
        if not background_path().is_file():
            _cache_background(tarball, log)
    log(f"cached {got} BIG-bench task files in {bigbench_dir()}")
    return bigbench_dir()


# ---------------------------------------------------------------- loading raw examples

def _load_bigbench_task(spec: TaskSpec) -> list[dict]:
    root = ensure_bigbench()
    examples = []
    for sub in spec.subtasks:
        path = root / spec.name / sub / "task.json" if sub else root / spec.name / "task.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DLPLoRAError(f"cached BIG-bench file {path} is unreadable ({exc}); delete {root} to fetch it again") from exc
        task_prefix = data.get("task_prefix", "")
        in_prefix = data.get("example_input_prefix", _BB_INPUT_PREFIX)
        out_prefix = data.get("example_output_prefix", _BB_OUTPUT_PREFIX)
        for k, ex in enumerate(data.get("examples", [])):
            rec = {"input": ex["input"], "task_prefix": task_prefix, "input_prefix": in_prefix,
                   "output_prefix": out_prefix, "subtask": sub or spec.name, "choices": None,
                   "answer_index": None, "aliases": []}
            targets = ex.get("target")
            targets = [targets] if isinstance(targets, str) else list(targets or [])
            if spec.has_choices:
                scores = ex.get("target_scores")
                if not scores:
                    continue
                choices = shuffled_choices(scores, f"{spec.name}/{sub}/{k}")
                best = max(range(len(choices)), key=lambda i: scores[choices[i]])
                rec.update(choices=choices, answer_index=best, target=choices[best], aliases=targets)
            else:
                if not targets:
                    continue
                rec.update(target=targets[0], aliases=targets[1:])
            examples.append(rec)
    return examples


def shuffled_choices(scores: dict, key: str) -> list[str]:
    """A multiple-choice example's options in the order its prompt lists them: a permutation of the sorted options
    drawn from a generator seeded by `key` (task/subtask/index), so it is the same on every machine and run and
    unrelated to which option is right (BIG-bench's `rng.permutation(sorted(choices))`)."""
    order = sorted(scores)
    random.Random(f"{CHOICE_SEED}:{key}").shuffle(order)
    return order


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """Read JSON Lines; a malformed line is reported with its file and line number."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DLPLoRAError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DLPLoRAError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for key in required:
                if not isinstance(obj.get(key), str) or not obj[key].strip():
                    raise DLPLoRAError(f"{path}:{lineno}: field {key!r} is missing or empty")
            rows.append(obj)
    return rows


def _load_extra_task(spec: TaskSpec, extra_dir: Path | None) -> list[dict]:
    if extra_dir is None:
        raise DLPLoRAError(_missing_extra_message([spec.name], None))
    path = Path(extra_dir) / f"{spec.name}.jsonl"
    if not path.is_file():
        raise DLPLoRAError(_missing_extra_message([spec.name], extra_dir))
    rows = read_jsonl(path, required=("input", "target"))
    return [{"input": r["input"], "target": r["target"], "task_prefix": spec.instruction, "input_prefix": "",
             "output_prefix": "", "subtask": spec.name, "choices": None, "answer_index": None, "aliases": []}
            for r in rows]


def _missing_extra_message(names: list[str], extra_dir: Path | None) -> str:
    where = f"in {extra_dir}" if extra_dir else "because no --extra-data directory was given (nor $DLP_LORA_EXTRA_DATA)"
    files = ", ".join(f"{n}.jsonl" for n in names)
    return (f"tasks {', '.join(names)} need their data files {where}. Supply a directory holding {files} "
            f"(JSON Lines with {{\"input\", \"target\"}} per line) with --extra-data DIR, or leave those tasks out "
            f"(e.g. --tasks with BIG-bench tasks only).")


def load_examples(name: str, extra_data: str | os.PathLike | None = None) -> list[dict]:
    """All raw examples of a task, in source order."""
    spec = get_task(name)
    if spec.source == "bigbench":
        rows = _load_bigbench_task(spec)
    else:
        rows = _load_extra_task(spec, extra_data_dir(extra_data))
    for r in rows:
        r["task"] = spec.name
    return rows


def split_examples(rows: list[dict], seed: int = SPLIT_SEED, size: int = SAMPLE_SIZE) -> tuple[list[dict], list[dict]]:
    """Sample `size` examples with a fixed seed (all if fewer), then split 9:1 into train/test."""
    if not rows:
        raise DLPLoRAError("cannot split a task with no examples")
    rng = random.Random(seed)
    idx = rng.sample(range(len(rows)), min(size, len(rows)))
    n_test = max(1, round(len(idx) / 10))
    chosen = [dict(rows[i], id=f"{rows[i]['task']}-{i}") for i in idx]
    return chosen[n_test:], chosen[:n_test]


# ---------------------------------------------------------------- rendering

def user_message(ex: dict, with_prefix: bool = True) -> str:
    """The user's turn for an example: BIG-bench task prefix, input with its prefixes, and for a
    multiple-choice example the choices (BIG-bench's ``append_choices_to_input``)."""
    text = (ex.get("input_prefix") or "") + ex["input"]
    if ex.get("choices"):
        text += "".join(f"\n  choice: {c}" for c in ex["choices"])
    text += ex.get("output_prefix") or ""
    if with_prefix and ex.get("task_prefix"):
        text = ex["task_prefix"] + text
    return text.strip()


def chat_prompt(tokenizer, user_text: str, history: list[dict] | None = None) -> str:
    """The backbone's chat-template prompt for a user turn (optionally after earlier turns),
    ending with the assistant header. Falls back to plain text for a tokenizer without a template."""
    messages = list(history or []) + [{"role": "user", "content": user_text}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def example_prompt(tokenizer, ex: dict) -> str:
    return chat_prompt(tokenizer, user_message(ex))


def candidates(ex: dict) -> list[str]:
    """The continuations to score for a multiple-choice example (empty for generative ones)."""
    return list(ex.get("choices") or [])


def answer_text(ex: dict) -> str:
    """The assistant's reply the adapter learns: the correct choice, or the target text."""
    return ex["target"]


# ---------------------------------------------------------------- preparing the suite

def prepared_path(out_dir: str | os.PathLike, name: str, split: str) -> Path:
    return Path(out_dir) / name / f"{split}.jsonl"


def _format_path(out_dir: str | os.PathLike, name: str) -> Path:
    return Path(out_dir) / name / "format.json"


def write_format(out_dir: str | os.PathLike, name: str, data_format: int = DATA_FORMAT) -> None:
    """Record the format a task's splits in `out_dir` are prepared in (OUT/<task>/format.json)."""
    atomic_write_text(_format_path(out_dir, name), json.dumps({"format": data_format}) + "\n")


def prepared_format(data_dir: str | os.PathLike, name: str) -> int:
    """The format a task's data in `data_dir` was prepared with (1 when it predates the format record)."""
    try:
        return int(json.loads(_format_path(data_dir, name).read_text(encoding="utf-8")).get("format", 1))
    except (OSError, ValueError, AttributeError, TypeError):
        return 1


def stale_options(data_format: int, name: str) -> bool:
    """Whether data (or an adapter trained on it) of `data_format` is stale for task `name`: a registry
    multiple-choice task whose options were listed in the task file's order. Other tasks did not change."""
    return name in TASKS and TASKS[name].has_choices and data_format < DATA_FORMAT


def is_prepared(data_dir: str | os.PathLike, name: str) -> bool:
    """Whether `data_dir` holds both splits of a task, and for a registry multiple-choice task in the current format
    (the pipelines that reuse prepared data prepare a stale one again; only the options' order changed, so the other
    tasks' data, which may come from an --extra-data directory no longer at hand, stays)."""
    if not (prepared_path(data_dir, name, "train").is_file() and prepared_path(data_dir, name, "test").is_file()):
        return False
    return not stale_options(prepared_format(data_dir, name), name)


def load_split(data_dir: str | os.PathLike, name: str, split: str) -> list[dict]:
    """Read a prepared split written by :func:`prepare`. A registry multiple-choice task prepared in an older format
    (options in the task file's order) is refused: its prompts can give the answer's position away."""
    if not prepared_path(data_dir, name, split).is_file():
        name = get_task(name).name
    path = prepared_path(data_dir, name, split)
    if not path.is_file():
        raise DLPLoRAError(f"no prepared {split} data for task {name} at {path}; run `dlp-lora data prepare --tasks {name} --out {data_dir}`")
    if stale_options(prepared_format(data_dir, name), name):
        raise DLPLoRAError(f"the data of task {name} in {data_dir} was prepared by an older dlp-lora (format "
                           f"{prepared_format(data_dir, name)}: options in the task file's order, which can give the "
                           f"answer's position away); prepare it again: `dlp-lora data prepare --tasks {name} --out {data_dir}`")
    return read_jsonl(path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def prepare(tasks: str | Iterable[str] | None, out_dir: str | os.PathLike, extra_data: str | os.PathLike | None = None,
            tokenizer=None, log=print) -> list[dict]:
    """Write OUT/<task>/{train,test}.jsonl for each task and return a summary row per task.
    All missing extra-data files are reported together before anything is written."""
    names = parse_tasks(tasks)
    extra = extra_data_dir(extra_data)
    missing = [n for n in names if TASKS[n].source == "extra" and (extra is None or not (extra / f"{n}.jsonl").is_file())]
    if missing:
        raise DLPLoRAError(_missing_extra_message(missing, extra))
    if any(TASKS[n].source == "bigbench" for n in names):
        ensure_bigbench(log=log)
    summary = []
    for name in names:
        rows = load_examples(name, extra)
        train, test = split_examples(rows)
        _write_jsonl(prepared_path(out_dir, name, "train"), train)
        _write_jsonl(prepared_path(out_dir, name, "test"), test)
        write_format(out_dir, name)
        row = {"task": name, "short": TASKS[name].short, "kind": TASKS[name].kind, "n_source": len(rows),
               "n_train": len(train), "n_test": len(test)}
        if tokenizer is not None:
            lengths = sorted(len(tokenizer(example_prompt(tokenizer, ex)).input_ids) for ex in train + test)
            row["mean_prompt_tokens"] = round(sum(lengths) / len(lengths), 1)
            row["p95_prompt_tokens"] = lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))]
        summary.append(row)
    atomic_write_text(Path(out_dir) / "summary.json", json.dumps(summary, indent=2))
    return summary


def format_summary(summary: list[dict]) -> str:
    cols = ["task", "short", "kind", "n_train", "n_test", "mean_prompt_tokens", "p95_prompt_tokens"]
    cols = [c for c in cols if any(c in r for r in summary)]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in summary)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    for r in summary:
        lines.append("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))
    small = [r for r in summary if r["n_source"] < SAMPLE_SIZE]
    for r in small:
        lines.append(f"note: {r['task']} has only {r['n_source']} source examples, split 9:1 as {r['n_train']}/{r['n_test']}")
    return "\n".join(lines)
