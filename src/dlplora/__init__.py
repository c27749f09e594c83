"""DLP-LoRA: a library of LoRA adapters, routed and fused per prompt by a lightweight plugin."""

from .backbone import BackboneInfo, load_backbone, load_tokenizer
from .errors import DLPLoRAError
from .tasks import TASKS, chat_prompt, load_split, parse_tasks, prepare, user_message

__all__ = ["BackboneInfo", "DLPLoRAError", "TASKS", "chat_prompt", "load_backbone", "load_split", "load_tokenizer",
           "parse_tasks", "prepare", "user_message"]
__version__ = "0.1.0"
