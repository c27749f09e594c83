"""The adapter library: one standard PEFT LoRA per task, plus a manifest.

Layout of a library directory::

    LIB/library.json                      manifest (see below)
    LIB/adapters/<name>/adapter_config.json
    LIB/adapters/<name>/adapter_model.safetensors
    LIB/plugin/                           the router (written by `dlp-lora train-plugin`)
    LIB/routing/<name>.jsonl              the prompts the router learns the adapter from (one JSON object a line:
                                          "input", and for prepared task rows their prefixes and choices)

``library.json``::

    {"format": 1,
     "base_model": {"name": ..., "path": ..., "fingerprint": ...},
     "adapters": {"<name>": {"task": ..., "path": "adapters/<name>", "rank": 8, "alpha": 16,
                             "targets": ["q_proj", "v_proj"], ...training and score fields...}}}

An entry with ``"special": "multitask"`` (``dlp-lora train-multitask``) is not a task adapter: it is served when a
request names it, never routed to, and left out of :attr:`Library.names` (the router's labels, the oracle, merge-all,
TIES, Arrow and the evaluation cache's library signature); :attr:`Library.all_names` has every adapter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import ADAPTER_META, validate_adapter
from .errors import DLPLoRAError
from .paths import atomic_write_text, read_json

__all__ = ["ADAPTER_META", "FORMAT", "MANIFEST", "MULTITASK", "ROUTING_DIR", "SPECIAL", "Library", "add_adapter", "base_record",
           "check_adapter_name", "example_rows", "read_examples", "remove_adapter", "score_record", "stage_adapter",
           "validate_adapter"]

MANIFEST = "library.json"
FORMAT = 1
ROUTING_DIR = "routing"
ROUTING_FIELDS = ("input", "task_prefix", "input_prefix", "output_prefix", "choices")  # what the router's views use
MAX_EXAMPLE_CHARS = 20_000
SPECIAL = "special"  # an entry's kind when it is not a task adapter (never routed to): MULTITASK
MULTITASK = "multitask"


@dataclass
class Library:
    root: Path
    manifest: dict = field(default_factory=dict)

    # ------------------------------------------------------------ open / create
    @classmethod
    def open(cls, root: str | os.PathLike) -> "Library":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise DLPLoRAError(f"{root} is not an adapter library: {MANIFEST} is missing "
                               f"(create one with `dlp-lora train-loras --out {root}` or `dlp-lora library add NAME DIR --library {root} --create`)")
        manifest = read_json(path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("adapters"), dict):
            raise DLPLoRAError(f"{path} is not a dlp-lora manifest (no 'adapters' object)")
        return cls(root, manifest)

    @classmethod
    def open_or_create(cls, root: str | os.PathLike, base_model: dict | None = None) -> "Library":
        root = Path(root)
        if (root / MANIFEST).is_file():
            lib = cls.open(root)
            if base_model is not None:
                lib.check_base(base_model)
            return lib
        return cls(root, {"format": FORMAT, "base_model": base_model or {}, "adapters": {}})

    # ------------------------------------------------------------ reading
    @property
    def names(self) -> list[str]:
        """The task adapters: what the router learns, the oracle uses and the merges combine (not the special ones)."""
        return [n for n, e in self.manifest["adapters"].items() if not e.get(SPECIAL)]

    @property
    def special_names(self) -> list[str]:
        """The special adapters (e.g. the multi-task LoRA baseline, ``"special": "multitask"``): served when a request
        names them, never routed to, never part of merge-all / TIES / Arrow."""
        return [n for n, e in self.manifest["adapters"].items() if e.get(SPECIAL)]

    @property
    def all_names(self) -> list[str]:
        return list(self.manifest["adapters"])

    def multitask_names(self) -> list[str]:
        return [n for n in self.special_names if self.manifest["adapters"][n].get(SPECIAL) == MULTITASK]

    @property
    def base_model(self) -> dict:
        return self.manifest.get("base_model") or {}

    def base_model_dir(self, model: str | None = None) -> str | None:
        """The backbone to load: `model` when given, else the directory the library recorded when it still exists on
        this machine, else None (the embedded default; a library moved between machines falls back to it)."""
        if model is not None:
            return model
        path = self.base_model.get("path")
        return path if path and Path(path).is_dir() else None

    def entry(self, name: str) -> dict:
        try:
            return self.manifest["adapters"][name]
        except KeyError:
            raise DLPLoRAError(f"unknown adapter {name!r}; the library {self.root} holds: "
                               f"{', '.join(self.all_names) or '(none)'}") from None

    def adapter_dir(self, name: str) -> Path:
        return self.root / self.entry(name)["path"]

    def plugin_dir(self) -> Path:
        return self.root / "plugin"

    def routing_path(self, name: str) -> Path:
        return self.root / ROUTING_DIR / f"{name}.jsonl"

    def routing_prompts(self, name: str) -> list[dict] | None:
        """The prompts the router learns adapter `name` from: LIB/routing/<name>.jsonl, else (a library built by
        `train-loras` before the prompts were kept) the train split of the data directory recorded in library.json
        when it is still there; None when there are none."""
        from .tasks import read_jsonl

        path = self.routing_source(name)
        if path is None:
            return None
        rows = [{k: r[k] for k in ROUTING_FIELDS if r.get(k) is not None} for r in read_jsonl(path, ("input",))]
        return rows or None

    def routing_source(self, name: str) -> Path | None:
        """The file :meth:`routing_prompts` reads for adapter `name` (LIB/routing/<name>.jsonl, else the train split
        in the recorded data directory), or None when there is neither."""
        from .tasks import prepared_path

        path = self.routing_path(name)
        if path.is_file():
            return path
        data = self.manifest.get("data_dir")
        path = prepared_path(data, name, "train") if data else None
        return path if path is not None and path.is_file() else None

    def prompt_sources(self, data, split: str = "train", names=None) -> tuple[dict[str, str], dict[str, list[dict]]]:
        """For each adapter (or `names`), where the router's prompts for it come from: the prepared `split` in `data`
        when the adapter is a task there, else the routing prompts the library keeps (:meth:`routing_prompts`); and
        the rows of the latter ({name: rows}). Refuses adapters that have neither."""
        from .tasks import prepared_path

        sources, own, missing = {}, {}, []
        for n in self.names if names is None else names:
            if data and prepared_path(data, n, split).is_file():
                sources[n] = f"prepared {split} split {prepared_path(data, n, split)}"
            elif (rows := self.routing_prompts(n)) is not None:
                sources[n] = f"routing prompts {self.routing_source(n)}"
                own[n] = rows
            else:
                missing.append(n)
        if missing:
            raise DLPLoRAError(f"no prompts for {', '.join(missing)}: no task of that name is prepared in {data} and "
                               f"{self.root} keeps no routing prompts for it; add them with `dlp-lora library add "
                               f"NAME DIR --library {self.root} --examples FILE --force`")
        return sources, own

    def keep_routing_prompts(self, data_dir, names=None) -> list[str]:
        """Keep the train split in `data_dir` of each adapter (`names`, default all) that has no routing prompts in
        LIB/routing yet (what a plugin trained from the data directory learnt); returns the names written."""
        from .tasks import prepared_path, read_jsonl

        done = []
        for n in self.names if names is None else names:
            src = prepared_path(data_dir, n, "train")
            if not self.routing_path(n).is_file() and src.is_file():
                self.save_routing_prompts(n, read_jsonl(src, ("input",)))
                done.append(n)
        return done

    def save_routing_prompts(self, name: str, rows) -> Path:
        """Keep `rows` (prepared task rows, or {"input": prompt}) as adapter `name`'s routing prompts."""
        path = self.routing_path(name)
        keep = [{k: r[k] for k in ROUTING_FIELDS if r.get(k) is not None} for r in rows]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
        return path

    def check_base(self, base_model: dict) -> None:
        mine = self.base_model.get("fingerprint")
        theirs = base_model.get("fingerprint")
        if mine and theirs and mine != theirs:
            raise DLPLoRAError(
                f"the library {self.root} was built for base model {self.base_model.get('name')} "
                f"(fingerprint {mine}), not {base_model.get('name')} (fingerprint {theirs}); "
                f"use another --out directory or the matching --model")

    # ------------------------------------------------------------ writing
    def set_entry(self, name: str, entry: dict) -> None:
        self.manifest["adapters"][name] = entry
        self.save()

    def remove_entry(self, name: str) -> dict:
        entry = self.entry(name)
        del self.manifest["adapters"][name]
        self.save()
        return entry

    def record_scores(self, results: dict[str, tuple[dict, dict]], source: str) -> list[str]:
        """Record per adapter its score on its own task against the base model: `results` maps a task to its
        (adapter result, base result). Saves the manifest; returns the adapters that do not beat the base model."""
        for name, (adapter, base) in results.items():
            if name in self.manifest["adapters"]:
                self.manifest["adapters"][name] = {**self.manifest["adapters"][name],
                                                   **score_record(adapter, base, source)}
        self.save()
        return [n for n in results if n in self.manifest["adapters"] and not self.manifest["adapters"][n]["beats_base"]]

    def save(self) -> None:
        atomic_write_text(self.root / MANIFEST, json.dumps(self.manifest, indent=2, ensure_ascii=False))


def base_record(info) -> dict:
    """The manifest's record of a base model (a :class:`dlplora.backbone.BackboneInfo`)."""
    return {"name": info.name, "path": info.path, "fingerprint": info.fingerprint, "architecture": info.architecture}


SCORE_FIELDS = ("score", "base_score", "n_test", "interval", "base_interval", "p_value", "significant",
                "wins_losses_ties", "score_detail", "beats_base")  # what score_record writes


def score_record(adapter: dict, base: dict, source: str) -> dict:
    """The manifest fields for an adapter scored on its own task against the base model: `adapter` and `base` are
    task results (metric, n, main and every metric; with per-example scores, as :mod:`dlplora.eval.metrics` makes
    them, also the 95% bootstrap interval of each and the paired sign test of adapter against base).

    Top level: ``score`` / ``base_score`` (the main figure), ``n_test``, ``interval`` / ``base_interval`` (95%
    percentile bootstrap over the test examples), ``p_value`` (exact two-sided sign test on the per-example
    scores), ``significant`` (better than base at 95%) and ``beats_base``; ``score_detail`` keeps every metric."""
    from .stats import main_scores, paired_test

    def rounded(score):
        return {k: round(v, 2) for k, v in score.items() if isinstance(v, (int, float))}

    def interval(result):
        ci = (result.get("ci") or {}).get("main")
        return [round(ci[0], 2), round(ci[1], 2)] if ci else None

    rec = {"score": round(adapter["main"], 2), "base_score": round(base["main"], 2), "n_test": adapter["n"],
           "interval": interval(adapter), "base_interval": interval(base),
           "score_detail": {"metric": adapter["metric"], "adapter_all": rounded(adapter), "base_all": rounded(base),
                            "source": source},
           "beats_base": adapter["main"] > base["main"]}
    a, b = main_scores(adapter), main_scores(base)
    if a is not None and b is not None and len(a) == len(b) and a:
        t = paired_test(a, b)
        rec.update({"p_value": round(t["p"], 5), "significant": bool(t["better"]),
                    "wins_losses_ties": [t["wins"], t["losses"], t["ties"]]})
    return rec


def score_line(entry: dict) -> str:
    """One line of an adapter's recorded score against base: "accuracy 62.0 [52.0, 71.0] vs base 41.0, p=0.003 (n=100)";
    also reads the manifests written before the top-level fields (``score`` was a dict then)."""
    sc = entry.get("score")
    if isinstance(sc, dict):  # older manifest
        return f"{sc.get('metric')} {sc.get('adapter', 0):.1f} vs base {sc.get('base', 0):.1f} (n={sc.get('n')})"
    metric = (entry.get("score_detail") or {}).get("metric", "score")
    ci = entry.get("interval")
    line = f"{metric} {sc:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "") + f" vs base {entry.get('base_score', 0):.1f}"
    if entry.get("p_value") is not None:
        line += f", p={entry['p_value']:.3g}" + (" (significant)" if entry.get("significant") else "")
    return line + f" (n={entry.get('n_test')})"


def train_line(entry: dict) -> str:
    """One line of how an adapter was trained, from its manifest entry: "113 steps over 900 distinct examples in
    5.9 min, loss 1.29 -> 0.29"; "" for an adapter added from elsewhere (no training record)."""
    if entry.get("wall_seconds") is None:
        return ""
    line = (f"{entry.get('steps', '?')} steps over {entry.get('examples_seen', '?')} distinct examples in "
            f"{float(entry['wall_seconds']) / 60:.1f} min")
    if entry.get("first_loss") is not None and entry.get("final_loss") is not None:
        line += f", loss {entry['first_loss']:.2f} -> {entry['final_loss']:.2f}"
    return line


def training_seconds(entries: dict) -> float:
    """The training time of a set of adapters ({name: manifest entry}): the sum of their recorded wall times."""
    return sum(float(e.get("wall_seconds") or 0) for e in entries.values())


def library_totals(manifest: dict) -> list[str]:
    """The library's totals, as lines: the training time of its adapters (the sum of their wall times, each
    recorded when it was trained) and, where scores are recorded, how many adapters beat the base model."""
    everything = manifest.get("adapters") or {}
    adapters = {n: e for n, e in everything.items() if not e.get(SPECIAL)}
    out = []
    timed = {n: e for n, e in adapters.items() if e.get("wall_seconds") is not None}
    if timed:
        out.append(f"training: {len(timed)} of {len(adapters)} adapters trained here, "
                   f"{training_seconds(timed) / 3600:.2f} h in total (the sum of their wall times)")
    for n, e in everything.items():
        if e.get(SPECIAL) and e.get("wall_seconds") is not None:
            out.append(f"special adapter {n} ({e[SPECIAL]}, never routed to): {float(e['wall_seconds']) / 3600:.2f} h")
    scored = [e for e in adapters.values() if "beats_base" in e]  # written by score_record
    if scored:
        beats = sum(bool(e["beats_base"]) for e in scored)
        sig = sum(bool(e.get("significant")) for e in scored)
        out.append(f"scores: {beats} of {len(scored)} scored adapters beat the base model on their own task, "
                   f"{sig} significantly (paired test, 95%)")
    return out


# ---------------------------------------------------------------- adding and removing adapters

def check_adapter_name(name) -> str:
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name):
        raise DLPLoRAError(f"adapter name {str(name)[:80]!r}: use letters, digits, '_', '-' and '.' only (at most 128, "
                           f"starting with a letter or digit)")
    return name


def example_rows(examples, where: str = "examples") -> list[dict]:
    """Routing prompts from example prompts: each a string, or an object with "input" (a prepared task row, whose
    prefixes and choices are kept), "text" or "prompt"."""
    if not isinstance(examples, (list, tuple)):
        raise DLPLoRAError(f"{where} must be a list of prompts, got {type(examples).__name__}")
    rows = []
    for i, ex in enumerate(examples):
        row = dict(ex) if isinstance(ex, dict) else {"input": ex}
        text = next((row[k] for k in ("input", "text", "prompt") if k in row), None)
        if not isinstance(text, str) or not text.strip():
            raise DLPLoRAError(f"{where}[{i}]: a prompt must be a non-empty string (or an object with 'input', 'text' "
                               f"or 'prompt')")
        if len(text) > MAX_EXAMPLE_CHARS:
            raise DLPLoRAError(f"{where}[{i}]: the prompt is {len(text)} characters, over {MAX_EXAMPLE_CHARS}")
        row["input"] = text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate cannot be written as UTF-8
        rows.append({k: row[k] for k in ROUTING_FIELDS if row.get(k) is not None})
    if not rows:
        raise DLPLoRAError(f"{where} is empty: give at least one example prompt of the adapter's task")
    return rows


def read_examples(path: str | os.PathLike, root=None) -> list[dict]:
    """Example prompts from a JSONL file: per line a JSON string, or an object with "input", "text" or "prompt".
    With `root`, the file is read from inside it without following a symbolic link (:func:`dlplora.paths.read_under`)."""
    from .paths import read_under

    path = Path(path)
    if not path.is_file():
        raise DLPLoRAError(f"examples file {path} does not exist")
    items = []
    try:
        raw = read_under(root, path) if root is not None else path.read_bytes()
        lines = raw.decode("utf-8").split("\n")  # not splitlines(): U+2028 is text
    except UnicodeDecodeError as exc:
        raise DLPLoRAError(f"examples file {path} is not UTF-8 text ({exc})") from None
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except (ValueError, RecursionError) as exc:
                raise DLPLoRAError(f"{path}:{lineno}: not a JSON string or object ({str(exc)[:100]})") from None
    return example_rows(items, str(path))


def stage_adapter(lib: Library, name: str, path: str | os.PathLike, model=None, root=None) -> dict:
    """Validate a PEFT LoRA against the library's base model (`model`: its directory, default the recorded one) and
    copy it to LIB/adapters/<name>, replacing what is there; returns its manifest entry (not yet recorded). With
    `root` (a server's --adapter-root), every file is copied first, through descriptors opened from the resolved root
    without following a symbolic link (:func:`dlplora.paths.copy_tree_under`), and only the copy is validated: what
    is served is what was checked, and nothing of the client's directory is read through a link."""
    import shutil

    from .paths import copy_tree_under

    check_adapter_name(name)
    base = lib.base_model
    base_dir = base.get("path") if model is None else model
    info = validate_adapter(path, base_dir, base) if root is None else None
    final = lib.root / "adapters" / name
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if root is None:
        shutil.copytree(path, tmp)
    else:
        try:
            copy_tree_under(root, path, tmp)
            info = validate_adapter(tmp, base_dir, base)
        except DLPLoRAError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DLPLoRAError(str(exc).replace(str(tmp), str(path))) from None  # name the client's path, not ours
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return {"task": name, "path": f"adapters/{name}", "source": str(Path(path).resolve()), **info}


def add_adapter(library: str | os.PathLike, name: str, path: str | os.PathLike, model=None, force: bool = False,
                examples=None) -> dict:
    """Copy a PEFT LoRA into the library after validating it against the library's base model.
    Creates the library (for `model`, default the embedded backbone) if it does not exist yet. `examples` (rows of
    :func:`example_rows` or :func:`read_examples`) become its routing prompts (LIB/routing/<name>.jsonl)."""
    from .backbone import fingerprint, model_name, resolve_model

    check_adapter_name(name)
    root = Path(library)
    if (root / MANIFEST).is_file():
        lib = Library.open(root)
        where = None if model is None else resolve_model(model)
        if model is not None:
            lib.check_base({"name": model_name(where), "fingerprint": fingerprint(where)})
    else:
        where = resolve_model(model)
        base = {"name": model_name(where), "path": str(Path(where).resolve()), "fingerprint": fingerprint(where)}
        lib = Library.open_or_create(root, base)
    if name in lib.manifest["adapters"] and not force:
        raise DLPLoRAError(f"the library already has an adapter named {name!r}; pick another name or pass --force")
    entry = stage_adapter(lib, name, path, where)
    if examples is not None:
        lib.save_routing_prompts(name, examples)
    lib.set_entry(name, entry)
    return entry


def remove_adapter(library: str | os.PathLike, name: str) -> dict:
    """Remove adapter `name` from the library: its manifest entry, then its files and routing prompts."""
    import shutil

    lib = Library.open(library)
    entry = lib.remove_entry(name)
    files = (lib.root / str(entry.get("path") or f"adapters/{name}")).resolve()
    if files.is_relative_to((lib.root / "adapters").resolve()):  # never delete outside LIB/adapters
        shutil.rmtree(files, ignore_errors=True)
    lib.routing_path(name).unlink(missing_ok=True)
    return entry
