"""Train one LoRA adapter per task, fast on CPU.

Speed comes from three things, measured side by side by ``dlp-lora bench train``:
- the loss is taken on the answer tokens only, and the 49k-row vocabulary head is applied only at
  those positions (the hidden states of prompt tokens never reach it);
- bf16 autocast for the matrix products;
- length-bucketed batches, so little compute is spent on padding.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..backbone import decoder_and_head
from ..errors import DLPLoRAError
from ..tasks import answer_text, chat_prompt, user_message

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_LINEAR  # docs/curves: all linear at lr 1e-3 beat q/v at 5e-3 (EpiReason 64 vs 48)
    dropout: float = 0.05
    steps: int = 113  # 900 examples of batch 8: the library's budget (docs/curves/README.md says why)
    batch_size: int = 8
    lr: float = 1e-3  # peak; the demo's 12-step budget uses 5e-3 (object_counting EM 0% -> 20% vs 1e-3 there)
    max_len: int = 512  # 192 cut the middle out of most TrackObj, GSM8K, QuesSel, CNN/DM prompts
    max_answer_tokens: int = 128
    seed: int = 0
    bf16: bool | None = None  # None: on where the CPU has native bf16 (AVX512-BF16 or AMX), else off
    top_layers: int | None = 10  # LoRA only in the last N decoder layers (backward stops there); None = all
    cache_bottom: bool = True  # run the frozen layers below the LoRA layers once per example (train.prefix)

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = cpu_has_native_bf16()
        # "all-linear" or "q_proj,v_proj" as PEFT's LoraConfig takes them (a bare string was read letter by letter)
        self.targets = parse_targets(self.targets)

    def validate(self) -> None:
        if self.rank <= 0:
            raise DLPLoRAError(f"--rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise DLPLoRAError(f"--alpha must be positive, got {self.alpha}")
        if self.steps <= 0:
            raise DLPLoRAError(f"--steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise DLPLoRAError(f"--batch-size must be positive, got {self.batch_size}")
        if self.top_layers is not None and self.top_layers <= 0:
            raise DLPLoRAError(f"--top-layers must be positive, got {self.top_layers}")
        if self.max_len < 16:
            raise DLPLoRAError(f"--max-len must be at least 16, got {self.max_len}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def cpu_has_native_bf16() -> bool:
    """bf16 autocast pays off only with native bf16 instructions; on a plain AVX2 CPU it is many times
    slower than fp32 (measured here: forward 3x, backward 18x slower on SmolLM2)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_targets(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        if value.strip() == "all-linear":
            return ALL_LINEAR
        items = [v.strip() for v in value.split(",") if v.strip()]
    else:
        items = list(value)
    if not items:
        raise DLPLoRAError("--targets is empty")
    return tuple(items)


def check_targets(model, targets: tuple[str, ...]) -> None:
    """Every target must name Linear layers that the model has."""
    present = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    missing = [t for t in targets if t not in present]
    if missing:
        raise DLPLoRAError(f"target module(s) {', '.join(missing)} not found in the model; "
                           f"its linear layers are: {', '.join(sorted(present))}")


# ---------------------------------------------------------------- tokenisation

def encode_example(tokenizer, ex: dict, max_len: int, max_answer_tokens: int) -> tuple[list[int], int]:
    """Token ids of prompt + answer + end-of-turn, and the index where the answer starts.
    An over-long prompt loses its middle: the head (chat header, task instruction) and the tail (the
    question and the answer cue) are kept."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, user_message(ex)), add_special_tokens=False).input_ids
    answer_ids = tokenizer(answer_text(ex), add_special_tokens=False).input_ids[:max_answer_tokens]
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    room = max_len - len(answer_ids)
    if len(prompt_ids) > room:
        head = min(32, room // 4)
        prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (room - head):]
    return prompt_ids + answer_ids, len(prompt_ids)


def bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches of similar length, batches in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(encoded: list[tuple[list[int], int]], pad_id: int):
    """Right-padded input ids, attention mask, and the (row, position) pairs whose next token is a target."""
    T = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    rows, pos, tgt = [], [], []
    for b, (seq, start) in enumerate(encoded):
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        for t in range(start, len(seq)):  # position t-1 predicts token t
            rows.append(b)
            pos.append(t - 1)
            tgt.append(seq[t])
    return ids, mask, torch.tensor(rows), torch.tensor(pos), torch.tensor(tgt)


# ---------------------------------------------------------------- the loss

def target_only_loss(model, ids, mask, rows, pos, tgt, bf16: bool = True):
    """Cross-entropy on the answer tokens, with the vocabulary head applied only at those positions."""
    body, head = decoder_and_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = head(hidden[rows, pos])
    return F.cross_entropy(logits.float(), tgt)


def naive_loss(model, ids, mask, rows, pos, tgt):
    """The textbook PEFT loop: full logits in fp32 and `labels=` (the baseline of `bench train`)."""
    labels = torch.full_like(ids, -100)
    labels[rows, pos + 1] = tgt
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


# ---------------------------------------------------------------- training one adapter

@dataclass
class TrainResult:
    steps: int
    examples: int
    tokens: int
    target_tokens: int
    final_loss: float
    first_loss: float
    wall_seconds: float
    losses: list[float] = field(default_factory=list)


def make_peft_model(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    from ..adapters import peft_wrapping

    check_targets(model, cfg.targets)
    extra = {}
    if cfg.top_layers:
        n_layers = model.config.num_hidden_layers
        extra["layers_to_transform"] = list(range(max(0, n_layers - cfg.top_layers), n_layers))
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=cfg.dropout,
                      bias="none", task_type="CAUSAL_LM", **extra)
    with peft_wrapping():
        return get_peft_model(model, lcfg)


def bottom_cache(peft_model, cfg: TrainConfig):
    """A PrefixCache of the layers below the LoRA layers when cfg.cache_bottom (else None)."""
    if not (cfg.cache_bottom and cfg.top_layers):
        return None
    from .prefix import PrefixCache

    n_layers = decoder_and_head(peft_model)[0].config.num_hidden_layers
    return PrefixCache(peft_model, max(0, n_layers - cfg.top_layers), cfg.bf16)


def train_step(peft_model, batch: list[tuple[list[int], int]], pad_id: int, cfg: TrainConfig, params, opt, sched,
               where: str, prefix=None, keys: list[int] | None = None) -> tuple[float, int, int]:
    """One optimizer step on encoded examples (`keys`: their indices, for a `prefix` cache of the bottom layers):
    answer-only loss, clipped gradients. Returns (loss, tokens, answer tokens)."""
    ids, mask, rows, pos, tgt = collate(batch, pad_id)
    if prefix is not None:
        from .prefix import prefix_loss

        loss = prefix_loss(peft_model, prefix, keys, [s for s, _ in batch], pad_id, rows, pos, tgt, bf16=cfg.bf16)
    else:
        loss = target_only_loss(peft_model, ids, mask, rows, pos, tgt, bf16=cfg.bf16)
    if not torch.isfinite(loss):
        raise DLPLoRAError(f"{where}: the loss became {loss.item()}; lower --lr")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item(), int(mask.sum()), len(tgt)


def cosine_schedule(opt, steps: int):
    """The library's schedule: linear warm-up over a tenth of the steps, then a cosine down to 5% of the peak."""
    warmup = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / steps))))


def training_setup(model, tokenizer, examples: list[dict], cfg: TrainConfig, steps: int, desc: str):
    """What a training run starts from: seeded RNGs, the encoded examples and their lengths, the trainable
    parameters, AdamW and the cosine schedule over `steps`. Returns (rng, encoded, lengths, params, opt, sched)."""
    if not examples:
        raise DLPLoRAError(f"{desc}: no training examples")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    encoded = [encode_example(tokenizer, ex, cfg.max_len, cfg.max_answer_tokens) for ex in examples]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    return rng, encoded, [len(ids) for ids, _ in encoded], params, opt, cosine_schedule(opt, steps)


def train_adapter(peft_model, tokenizer, examples: list[dict], cfg: TrainConfig, desc: str = "train",
                  progress: bool = True) -> TrainResult:
    """Train the active LoRA of `peft_model` on `examples` for cfg.steps optimizer steps."""
    from tqdm.auto import tqdm

    rng, encoded, lengths, params, opt, sched = training_setup(peft_model, tokenizer, examples, cfg, cfg.steps, desc)
    prefix = bottom_cache(peft_model, cfg)
    peft_model.train()
    batches: list[list[int]] = []
    tokens = target_tokens = 0
    losses = []
    t0 = time.time()
    bar = tqdm(total=cfg.steps, desc=desc, unit="step", disable=not progress, leave=False, dynamic_ncols=True)
    seen = set()
    for step in range(cfg.steps):
        if not batches:
            batches = bucketed_batches(lengths, cfg.batch_size, rng)
        idx = batches.pop()
        seen.update(idx)
        loss, n_tok, n_tgt = train_step(peft_model, [encoded[i] for i in idx], tokenizer.pad_token_id, cfg, params,
                                        opt, sched, f"{desc}: step {step}", prefix, idx)
        losses.append(loss)
        tokens += n_tok
        target_tokens += n_tgt
        el = time.time() - t0
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / max(el, 1e-9):.0f}")
        bar.update(1)
    bar.close()
    peft_model.eval()
    tail = losses[-max(1, len(losses) // 5):]
    return TrainResult(steps=cfg.steps, examples=len(seen), tokens=tokens, target_tokens=target_tokens,
                       final_loss=round(sum(tail) / len(tail), 4), first_loss=round(losses[0], 4),
                       wall_seconds=round(time.time() - t0, 1), losses=[round(x, 4) for x in losses])
