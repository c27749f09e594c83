"""Is PEFT's Arrow wired right? Its per-layer, per-token top-1 adapter on prompts of one known task.

Arrow (``peft`` ``ArrowLoraLinearLayer``) routes every token in every LoRA layer to the adapters whose prototype
(the top right singular vector of ``B @ A``) is most similar to the token's hidden state. Wired right, on prompts
that are clearly of one task, the top-1 adapter should be that task's far more often than chance (1 / adapters).
:func:`arrow_agreement` records the top-1 of every token of every Arrow layer during one forward pass per prompt
(a forward hook that recomputes Arrow's own similarity from its prototypes) and reports, per task and per layer,
how often it is the prompt's own task. ``dlp-lora arrow-check --library LIB --prompts N`` runs it on N test prompts per
task.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def arrow_layers(model) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    """(module name, LoRA layer, its ArrowLoraLinearLayer) of every layer routed by Arrow."""
    out = []
    for name, mod in model.named_modules():
        arrow = getattr(mod, "lora_arrow", None)  # peft's ArrowLinearVariant keeps its router in lora_arrow
        if arrow is not None and "arrow_router" in arrow and hasattr(mod, "lora_A"):
            out.append((name, mod, arrow["arrow_router"]))
    return out


@torch.inference_mode()
def arrow_agreement(model, tokenizer, names: list[str], prompts: dict[str, list[str]]) -> dict:
    """For Arrow `model` over adapters task_0.. (in the order of `names`) and prompts grouped by their true task
    (keys in `names`): the share of (token, layer) top-1 choices that are the prompt's own adapter, per task and
    per layer, with the chance level. Tokens are the prompt's, in its chat template."""
    from ..tasks import chat_prompt

    layers = arrow_layers(model)
    if not layers:
        raise ValueError("the model has no Arrow-routed layer (build it with eval.runners.build_arrow_model)")
    picks: list[tuple[str, torch.Tensor]] = []

    def hook(layer_name, lora_layer, arrow):
        def fn(mod, args, output):
            x = args[0]
            arrow.build_prototypes(lora_layer.lora_A, lora_layer.lora_B)
            tok = x.reshape(-1, x.shape[-1]).to(arrow.prototypes.dtype)
            sim = torch.abs(tok @ arrow.prototypes.T)  # Arrow's own similarity (arrow.py, forward step 1)
            order = [arrow.task_adapter_names.index(f"task_{i}") for i in range(len(names))]
            picks.append((layer_name, sim[:, order].argmax(dim=1)))
        return fn

    handles = [mod.register_forward_hook(hook(n, mod, a)) for n, mod, a in layers]
    per_task: dict[str, list[int]] = {}
    per_layer: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    try:
        for task, texts in prompts.items():
            own = names.index(task)
            hit = total = 0
            for text in texts:
                picks.clear()
                ids = tokenizer(chat_prompt(tokenizer, text), return_tensors="pt", add_special_tokens=False).input_ids
                model(input_ids=ids)
                for layer_name, top1 in picks:
                    h = int((top1 == own).sum())
                    hit += h
                    total += top1.numel()
                    per_layer[layer_name][0] += h
                    per_layer[layer_name][1] += top1.numel()
            per_task[task] = [hit, total]
    finally:
        for h in handles:
            h.remove()
    share = {t: 100 * h / max(1, n) for t, (h, n) in per_task.items()}
    return {"chance": 100 / len(names), "layers": len(layers), "mean_own_top1": sum(share.values()) / max(1, len(share)),
            "own_top1_by_task": {t: round(v, 2) for t, v in share.items()},
            "own_top1_by_layer": {k: round(100 * h / max(1, n), 2) for k, (h, n) in per_layer.items()},
            "prompts_per_task": {t: len(v) for t, v in prompts.items()}}
