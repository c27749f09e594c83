"""Tiny random-weight models, random adapters and libraries for tests, benchmarks and dry runs (no download).

:func:`tiny_model_dir` writes a Llama (or Qwen2) model of a few hundred thousand parameters with a
word-level tokenizer and a ChatML chat template into a directory that ``from_pretrained`` loads.
:func:`random_peft_adapter` saves a PEFT LoRA with random factors; :func:`random_peft_library` builds an
adapter library of them (the way `dlp-lora library add` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from torch import nn

    from .adapters import AdapterWeights

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a small fixed text, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The quick brown fox jumps over the lazy dog. Translate the following German text into English.",
              "Solve the following math problem step by step. What is 12 plus 7? The answer is 19.",
              "choice: correct incorrect valid invalid True False Neither yes no same different"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def tiny_model_dir(path: str | Path, arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2,
                   context: int = 512) -> Path:
    """Write a tiny random model + tokenizer to `path` (idempotent) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=True)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def tiny_examples(task: str, n: int, kind: str = "mcq", seed: int = 0) -> list[dict]:
    """Synthetic prepared examples in the format of :mod:`dlplora.tasks` (for unit tests)."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if kind == "mcq":
            choices = ["yes", "no"]
            ans = int((a + b) % 2 == 1)
            rows.append({"id": f"{task}-{i}", "task": task, "input": f"Is {a} plus {b} even?", "target": choices[ans],
                         "choices": choices, "answer_index": ans, "aliases": [], "task_prefix": f"{task} quiz.\n",
                         "input_prefix": "\nQ: ", "output_prefix": "\nA: ", "subtask": task})
        else:
            rows.append({"id": f"{task}-{i}", "task": task, "input": f"Add {a} and {b}.", "target": f"The answer is {a + b}.",
                         "choices": None, "answer_index": None, "aliases": [], "task_prefix": f"{task} sums.\n",
                         "input_prefix": "", "output_prefix": "", "subtask": task})
    return rows


def write_prepared(data_dir: str | Path, task: str, train: list[dict], test: list[dict], data_format: int | None = None) -> Path:
    """Write a task's splits as :func:`dlplora.tasks.prepare` does, with its format record (the current format
    unless `data_format` says otherwise; 1 writes none, as dlp-lora did before it kept one)."""
    from .tasks import DATA_FORMAT, write_format

    data_dir = Path(data_dir)
    for split, rows in (("train", train), ("test", test)):
        p = data_dir / task / f"{split}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt = DATA_FORMAT if data_format is None else data_format
    if fmt > 1:
        write_format(data_dir, task, fmt)
    return data_dir


def random_peft_adapter(model, out: str | Path, rank: int = 8, alpha: float | None = None,
                        targets=("q_proj", "v_proj"), seed: int = 0, std: float = 0.02, factors=("lora_B",),
                        use_rslora: bool = False) -> Path:
    """Save to `out` a PEFT LoRA for `model` (a loaded model, left as it was, or a model directory) whose
    `factors` ("lora_A", "lora_B") are drawn from N(0, std); the others keep PEFT's init (B = 0: no effect).
    `alpha` defaults to 2 * rank."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .adapters import peft_wrapping

    if isinstance(model, (str, Path)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    torch.manual_seed(seed)
    with peft_wrapping():
        pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha,
                                              target_modules=list(targets), lora_dropout=0.0, use_rslora=use_rslora))
    with torch.no_grad():
        for name, param in pm.named_parameters():
            if any(f in name for f in factors):
                param.normal_(0, std)
    pm.save_pretrained(out)
    pm.unload()  # the plain model back
    return Path(out)


def random_peft_library(root: str | Path, model_dir: str | Path, specs, std: float = 0.02, factors=("lora_B",),
                        seed: int = 0, model=None) -> Path:
    """An adapter library at `root` for the base model in `model_dir`, of random PEFT LoRAs added (and validated)
    like `dlp-lora library add` does. `specs`: {name: (rank, alpha, targets)}, or a count N for N adapters
    rand0.. of rank 8 on q_proj/v_proj. Adapter i uses seed `seed + i`; `model` (the loaded `model_dir`) saves
    a load. Returns `root`."""
    import tempfile

    from .library import add_adapter

    if isinstance(specs, int):
        specs = {f"rand{i}": (8, 16, ("q_proj", "v_proj")) for i in range(specs)}
    if model is None:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="dlp-random-adapters-") as tmp:
        for i, (name, (rank, alpha, targets)) in enumerate(specs.items()):
            src = random_peft_adapter(model, Path(tmp) / name, rank=rank, alpha=alpha, targets=targets, seed=seed + i,
                                      std=std, factors=factors)
            add_adapter(root, name, src, model=str(model_dir))
    return Path(root)



def random_adapter(model: nn.Module, name: str, rank: int = 8, alpha: float = 16.0,
                   targets: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0, std: float = 0.02) -> AdapterWeights:
    """An adapter with random A and B of the right shapes for `model` (benchmarks, tests)."""
    import torch
    from torch import nn

    from .adapters import AdapterWeights
    from .fusion import FusedLoRALinear

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for mod_name, mod in model.named_modules():
        leaf = mod_name.rsplit(".", 1)[-1]
        base = mod.base if isinstance(mod, FusedLoRALinear) else mod
        if leaf in targets and isinstance(base, nn.Linear):
            a = torch.randn(rank, base.in_features, generator=g) * std
            b = torch.randn(base.out_features, rank, generator=g) * std
            layers[mod_name] = (a, b, alpha / rank)
    return AdapterWeights(name=name, path="", rank=rank, alpha=alpha, use_rslora=False,
                          targets=sorted(set(targets)), layers=layers)


def save_peft_adapter(ad, out: str | Path, base_model: str | None = None) -> Path:
    """Write an :class:`dlplora.adapters.AdapterWeights` (e.g. :func:`random_adapter`) as a PEFT LoRA
    directory (adapter_config.json + adapter_model.safetensors), without building a PEFT model (fast for a real-size
    backbone)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (a, b, _) in ad.layers.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.detach().contiguous().float()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.detach().contiguous().float()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ad.rank, "lora_alpha": ad.alpha,
           "target_modules": list(ad.targets), "bias": "none", "use_rslora": ad.use_rslora, "lora_dropout": 0.0,
           "base_model_name_or_path": base_model}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return out
