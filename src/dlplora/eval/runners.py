"""Runners: how an evaluation method runs forward passes and generation.

A runner has ``model``, ``tokenizer``, ``context(sets)`` (a context manager under which forward passes of
``model`` use one adapter set per batch row) and ``generate(texts, histories, sets, max_new)``.
"""

from __future__ import annotations

import types
from contextlib import nullcontext

import torch

from ..decoding import decode_loop, eos_token_ids
from ..errors import DLPLoRAError
from ..tasks import chat_prompt


class FusedRunner:
    """Forward passes and generation on the DLP-LoRA engine with one weighted adapter set per row."""

    def __init__(self, engine):
        self.engine = engine
        self.model = engine.model
        self.tokenizer = engine.tokenizer

    def context(self, sets):
        return self.engine.apply(sets)

    def generate(self, texts, histories, sets, max_new) -> list[str]:
        out = self.engine.generate(list(texts), adapters=[dict(s) for s in sets], history=[list(h) for h in histories],
                                   max_new_tokens=[int(m) for m in max_new], on_error="return")
        return [o.get("text", "").strip() for o in out]


class PeftRunner:
    """A model used as it is: a plain or PEFT model, or one that routes by itself (Arrow); adapter sets are
    ignored. Generation uses the engine's decode loop (same greedy decoding, KV cache and EOS handling as the
    other methods)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = eos_token_ids(model, tokenizer)

    def context(self, sets):
        return nullcontext()

    @torch.inference_mode()
    def generate(self, texts, histories, sets, max_new) -> list[str]:
        tok = self.tokenizer
        rows = [tok(chat_prompt(tok, t, list(h)), add_special_tokens=False)["input_ids"] for t, h in zip(texts, histories)]
        gen, _ = decode_loop(self.model, rows, [int(m) for m in max_new], self.eos_ids, tok.pad_token_id)
        return [tok.decode(g, skip_special_tokens=True).strip() for g in gen]


def peft_with_every_adapter(library, model=None, dtype=None, device=None, label=lambda i, name: name):
    """A fresh copy of the library's backbone as a PEFT model with every adapter of the library loaded, adapter i
    under the name ``label(i, name)``. Returns (PEFT model, tokenizer)."""
    from peft import PeftModel

    from ..adapters import peft_wrapping
    from ..backbone import load_backbone

    names = library.names
    net, tok, _ = load_backbone(library.base_model_dir(model), dtype=dtype, device=device)
    with peft_wrapping():
        pm = PeftModel.from_pretrained(net, str(library.adapter_dir(names[0])), adapter_name=label(0, names[0]))
    for i, n in enumerate(names[1:], 1):
        pm.load_adapter(str(library.adapter_dir(n)), adapter_name=label(i, n))
    return pm, tok


def build_arrow_model(library, model=None, top_k: int = 3, temperature: float = 1.0, seed: int = 0, dtype=None,
                      device=None):
    """PEFT's Arrow (``ArrowConfig`` + the ``arrow_router`` LoRA variant) over the library's adapters, on a
    fresh copy of the backbone. Built like ``peft.create_arrow_model`` (which loads every adapter as
    ``task_i`` and adds the ``arrow_router`` adapter), except that the router targets exactly the modules
    the adapters cover: create_arrow_model targets every module with a matching leaf name, which fails for
    adapters restricted to some layers (``layers_to_transform``, our --top-layers). Returns (model, names)."""
    from peft import ArrowConfig, LoraConfig

    names = library.names
    pm, tok = peft_with_every_adapter(library, model, dtype, device, label=lambda i, _: f"task_{i}")
    task_names = [f"task_{i}" for i in range(len(names))]
    covered: dict[str, set] = {}
    ranks = set()
    for mod_name, mod in pm.get_base_model().named_modules():
        if hasattr(mod, "lora_A"):
            for tn in task_names:
                if tn in mod.lora_A:
                    covered.setdefault(tn, set()).add(mod_name)
                    ranks.add(mod.lora_A[tn].weight.shape[0])
    mods = covered.get("task_0", set())
    if len(ranks) != 1 or any(covered.get(tn, set()) != mods for tn in task_names):
        raise DLPLoRAError("Arrow needs adapters of one rank on the same modules; this library mixes ranks or "
                           "target modules")
    cfg = ArrowConfig(top_k=min(top_k, len(names)), router_temperature=temperature, rng_seed=seed)
    cfg.task_adapter_names = task_names
    cfg.gks_adapter_names = []
    pm.add_adapter("arrow_router", LoraConfig(arrow_config=cfg, target_modules=sorted(mods), r=ranks.pop()))
    pm.set_adapter("arrow_router")
    for mod in pm.modules():
        if "arrow_router" in getattr(mod, "lora_arrow", ()):
            arrow = mod.lora_arrow["arrow_router"]
            arrow.forward = types.MethodType(_arrow_mix, arrow)
    pm.eval()
    return pm, tok


ARROW_IMPL = "mix2"  # in Arrow's cache signature: predictions timed with _arrow_mix


def _arrow_mix(self, x, lora_A, lora_B, dropout, scaling):
    """PEFT's ``ArrowLoraLinearLayer.forward`` with the same routing and the same sum, computed without its
    (tokens x experts x out_features) intermediate: PEFT lifts every token through every expert's B and then mixes;
    here each expert's rank-r projection is scaled by its routing coefficient and the concatenated B is applied once
    (one rank E*r matmul). Equal to PEFT's output (tests/test_eval.py compares the two models' logits)."""
    names = self.task_adapter_names
    x = self._cast_input_dtype(x, lora_A[names[0]].weight.dtype)
    lead, f_in = x.shape[:-1], x.shape[-1]
    tok = x.reshape(-1, f_in)
    t, e = tok.size(0), self.prototypes.size(0)
    # the stacked weights, built once per layer (not per forward: a decode step would copy every B again); the Arrow
    # model is for inference, its adapters never change after build_arrow_model
    cat = getattr(self, "_dlp_cat", None)
    if cat is None or cat[0].dtype != tok.dtype or cat[0].device != tok.device:
        cat = (torch.cat([lora_A[n].weight for n in names], dim=0),  # (E*r, in)
               torch.cat([lora_B[n].weight for n in names], dim=1),  # (out, E*r)
               torch.tensor([scaling[n] for n in names], device=tok.device, dtype=tok.dtype))
        self._dlp_cat = cat
    a_cat, b_cat, scales = cat
    sim = torch.abs(tok @ self.prototypes.T)  # (t, E), sign-agnostic as in PEFT
    top_v, idx = torch.topk(sim, self.top_k, dim=1)
    score = tok.new_full((t, e), float("-inf")).scatter_(1, idx, top_v)
    coeff = torch.softmax(score / self.temperature, dim=1) * scales  # (t, E)
    z = (tok @ a_cat.T).view(t, e, -1) * coeff[:, :, None]  # (t, E, r)
    delta = dropout(z.reshape(t, -1) @ b_cat.T)
    return delta.view(*lead, delta.size(-1))


def build_ties_model(library, model=None, density: float = 0.2, combination: str = "ties", dtype=None, device=None):
    """One static merge of every adapter of the library, PEFT's way: ``add_weighted_adapter`` with
    ``combination_type="ties"`` (or ``"dare_ties"``), weight 1 each, keeping the top `density` share of each task
    vector's entries (TIES' k = 20% by default), then merged into a fresh copy of the backbone. What a PEFT or LoRAX
    user picks to serve many tasks without routing. Returns (model, tokenizer)."""
    if not 0 < density <= 1:
        raise DLPLoRAError(f"TIES density must be in (0, 1], got {density}")
    names = library.names
    pm, tok = peft_with_every_adapter(library, model, dtype, device)
    pm.add_weighted_adapter(names, [1.0] * len(names), "static_merge", combination_type=combination, density=density)
    pm.set_adapter("static_merge")
    merged = pm.merge_and_unload(adapter_names=["static_merge"])
    merged.eval()
    return merged, tok


@torch.no_grad()
def build_static_merge(library, weights: dict[str, float], model=None, dtype=None, device=None):
    """One static merge: a fresh copy of the library's backbone whose linear weights hold ``W + sum_k w_k s_k B_k A_k``
    for the adapters of `weights` ({name: w}). What merge-all computes (every task adapter at 1/N) and what one
    adapter computes (the multi-task baseline at 1), merged once, so a forward pass costs what the base model's does.
    Summed in float32, then cast to the model's dtype. Returns (model, tokenizer)."""
    from ..adapters import load_peft_adapter
    from ..backbone import load_backbone

    net, tok, _ = load_backbone(library.base_model_dir(model), dtype=dtype, device=device)
    deltas: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        for module, (a, b, scale) in load_peft_adapter(library.adapter_dir(name), name).layers.items():
            d = (b @ a) * (w * scale)
            deltas[module] = deltas[module] + d if module in deltas else d
    for module, d in deltas.items():
        try:
            lin = net.get_submodule(module)
        except AttributeError:
            raise DLPLoRAError(f"an adapter targets {module}, which the backbone does not have") from None
        lin.weight.copy_((lin.weight.float() + d.to(lin.weight.device)).to(lin.weight.dtype))
    net.eval()
    return net, tok


def warm_up(fused, others, names) -> None:
    """One short generation per code path (base, one adapter, mixed rows, Arrow, TIES) before anything is timed:
    first calls pay one-off kernel and allocation costs that would otherwise land on whichever method runs first."""
    mixed = [{names[0]: 1.0}, {n: 1.0 / len(names) for n in names}]
    for sets in ([{}], [{names[0]: 1.0}], mixed):
        fused.generate(["warm up"] * len(sets), [[] for _ in sets], sets, [2] * len(sets))
    for runner in others:
        runner.generate(["warm up"], [[]], [{}], [2])
