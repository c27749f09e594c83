"""DLP-LoRA: a library of LoRA adapters, routed and fused per prompt by a lightweight plugin.

The names below load on first use (PEP 562), so that `import dlplora.cli` (and `dlp-lora --help`) does not pay for
the backbone and task modules.
"""

from __future__ import annotations

import importlib

_LAZY = {"BackboneInfo": "backbone", "load_backbone": "backbone", "load_tokenizer": "backbone",
         "DLPLoRAError": "errors", "TASKS": "tasks", "chat_prompt": "tasks", "load_split": "tasks",
         "parse_tasks": "tasks", "prepare": "tasks", "user_message": "tasks"}

__all__ = ["BackboneInfo", "DLPLoRAError", "TASKS", "chat_prompt", "load_backbone", "load_split", "load_tokenizer",
           "parse_tasks", "prepare", "user_message"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
