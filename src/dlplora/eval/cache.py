"""The prediction cache: every prediction, keyed by (library, method, example, kind, adapter set), as JSON lines
in OUT/cache/<method>.jsonl, so a rerun or a crashed run resumes. A prediction records its compute time, so a
method's time survives a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..config import QUANTIZE_SCHEMES


class PredictionCache:
    """Predictions as JSON lines, one file per method: {"k": key, "v": value, "s": seconds}.
    A truncated last line (a crash mid-write) is ignored."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, dict] = {}
        self.hits = 0
        self.new = 0
        self.used: set[str] = set()  # the keys this run read or wrote
        for f in sorted(self.dir.glob("*.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.data[rec["k"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> dict | None:
        rec = self.data.get(key)
        if rec is not None:
            self.hits += 1
            self.used.add(key)
        return rec

    def put_many(self, method: str, records: list[dict]) -> None:
        """Append `records` to OUT/cache/<method>.jsonl and remember them."""
        append_records(self.dir, method, records)
        self.remember(records)

    def remember(self, records: list[dict]) -> None:
        """Records another process appended to this directory: used by this run, counted as new."""
        for rec in records:
            self.data[rec["k"]] = rec
            self.used.add(rec["k"])
        self.new += len(records)

    def used_seconds(self) -> float:
        """The recorded compute time of every prediction this run used, whichever run (or sitting) computed it:
        the cost of the whole grid even when it was spread over several resumed runs."""
        return sum(float(self.data[k].get("s", 0.0)) for k in self.used)


def append_records(directory: Path, method: str, records: list[dict], writer: str = "") -> None:
    """Append `records` to `directory`/<method>.jsonl, or <method>.<writer>.jsonl: one file per process that writes
    into the same directory (the workers of a Ray cluster, eval/ray_grid.py), all read back on the next run."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in method + (f".{writer}" if writer else ""))
    with open(Path(directory) / f"{safe}.jsonl", "a", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        fh.flush()


def set_tag(s: dict) -> str:
    """The adapter set in a cache key: a prediction is reused only for the same weighted set."""
    return ",".join(f"{n}={w:.4g}" for n, w in sorted(s.items())) if s else "-"


def content_tag(item: dict) -> str:
    """What the model is asked, in a cache key: a hash of the example's prompt text, options, target and chat history,
    so a prediction is never reused for an example whose data changed (e.g. prepared again in another format)."""
    ex = item["ex"]
    what = [ex.get("task_prefix"), ex.get("input_prefix"), ex.get("input"), ex.get("output_prefix"), ex.get("choices"),
            ex.get("target"), item.get("history") or []]
    return hashlib.sha1(json.dumps(what, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()[:8]


def cache_namespace(method: str) -> str:
    """The two DLP weightings run the same fused engine: a prompt that both route to the same weighted set (e.g. one
    adapter at weight 1) is the same computation, so they share predictions (and their recorded time). Every other
    method keeps its own, so base / LoRA / DLP times are measured side by side."""
    return "dlp" if method.startswith("dlp") else method


def precision_tag(engine) -> str:
    """The part of a cache key that names the numbers a model computes: its dtype and device unless fp32 on the CPU
    (the keys of older caches), and its quantisation scheme (:data:`dlplora.config.QUANTIZE_SCHEMES`)."""
    tag = ""
    dtype = str(engine.model.dtype).replace("torch.", "")
    if dtype != "float32" or engine.model.device.type != "cpu":
        tag += f"-{dtype}-{engine.model.device.type}"
    quantize = getattr(engine, "quantize", "none") or "none"
    if quantize != "none":
        tag += f"-{QUANTIZE_SCHEMES.get(quantize, quantize)}"
    return tag


def library_signature(library) -> str:
    """Changes when the adapters change: part of every cache key. The router plugin is not part of it: what a
    routing method computes for a prompt is fixed by the adapter set it chose, which is in the key (`set_tag`), and
    by the chat history (`content_tag`); so a retrained plugin recomputes only the prompts it routes differently,
    and no other method's predictions."""
    return adapters_signature(library, library.names)


def adapters_signature(library, names) -> str:
    """:func:`library_signature` of the adapters `names` only (the task adapters: adding a special adapter such as
    the multi-task baseline keeps every other method's predictions; the multi-task method's key has its own)."""
    from ..library import SCORE_FIELDS as scored  # written back by evaluations: not what the adapters compute

    h = hashlib.sha1()
    adapters = {n: {k: v for k, v in library.manifest["adapters"][n].items() if k not in scored} for n in names}
    h.update(json.dumps(adapters, sort_keys=True).encode())
    for n in names:
        f = library.adapter_dir(n) / "adapter_model.safetensors"
        if f.is_file():
            st = f.stat()
            h.update(f"{n}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:10]
