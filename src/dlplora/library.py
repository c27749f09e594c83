"""The adapter library: one standard PEFT LoRA per task, plus a manifest.

Layout of a library directory::

    LIB/library.json                      manifest (see below)
    LIB/adapters/<name>/adapter_config.json
    LIB/adapters/<name>/adapter_model.safetensors
    LIB/plugin/                           the router (written by `dlp-lora train-plugin`)

``library.json``::

    {"format": 1,
     "base_model": {"name": ..., "path": ..., "fingerprint": ...},
     "adapters": {"<name>": {"task": ..., "path": "adapters/<name>", "rank": 8, "alpha": 16,
                             "targets": ["q_proj", "v_proj"], ...training and score fields...}}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DLPLoRAError
from .paths import atomic_write_text

MANIFEST = "library.json"
FORMAT = 1


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
                               f"(create one with `dlp-lora train-loras --out {root}` or `dlp-lora library add`)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DLPLoRAError(f"{path} is corrupt: {exc}") from exc
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
        return list(self.manifest["adapters"])

    @property
    def base_model(self) -> dict:
        return self.manifest.get("base_model") or {}

    def entry(self, name: str) -> dict:
        try:
            return self.manifest["adapters"][name]
        except KeyError:
            raise DLPLoRAError(f"unknown adapter {name!r}; the library {self.root} holds: {', '.join(self.names) or '(none)'}") from None

    def adapter_dir(self, name: str) -> Path:
        return self.root / self.entry(name)["path"]

    def plugin_dir(self) -> Path:
        return self.root / "plugin"

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

    def save(self) -> None:
        atomic_write_text(self.root / MANIFEST, json.dumps(self.manifest, indent=2, ensure_ascii=False))
