"""Where dlp-lora keeps its cache (models, BIG-bench files)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$DLP_LORA_CACHE`, default `~/.cache/dlp-lora`. Created on first use."""
    root = Path(os.environ.get("DLP_LORA_CACHE") or Path.home() / ".cache" / "dlp-lora").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def extra_data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The directory of the non-BIG-bench tasks: the argument, else `$DLP_LORA_EXTRA_DATA`, else None."""
    value = explicit if explicit else os.environ.get("DLP_LORA_EXTRA_DATA")
    return Path(value).expanduser() if value else None


def read_json(path: Path, hint: str = ""):
    """Parse a JSON file; a corrupt one raises DLPLoRAError naming the file (and `hint`, the fix)."""
    import json

    from .errors import DLPLoRAError

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise DLPLoRAError(f"{path} is corrupt: {exc}" + (f"; {hint}" if hint else "")) from exc


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
