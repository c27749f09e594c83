"""Training: one LoRA adapter (:mod:`.lora`) and a whole library of them, locally or on Ray (:mod:`.library_builder`)."""

from .library_builder import train_library, train_one
from .lora import TrainConfig, TrainResult, make_peft_model, train_adapter

__all__ = ["TrainConfig", "TrainResult", "make_peft_model", "train_adapter", "train_library", "train_one"]
