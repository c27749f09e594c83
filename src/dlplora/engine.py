"""The DLP-LoRA inference engine: route each prompt once, then generate with the fused adapters.

>>> engine = DLPLoRA.from_library("lib")                        # backbone + all adapters + plugin
>>> engine.generate(["Translate to English: Guten Morgen"])     # routed by the plugin
[{'text': ..., 'routing': {'adapters': [{'name': ..., 'weight': ...}], 'source': 'plugin'}, 'tokens': ..., ...}]
>>> engine.generate(["2+2?"], adapters={"gsm8k": 1.0})          # explicit set, weights used as given
>>> chat = engine.chat(); chat.send("hello", on_token=print)    # keeps history, re-routes every turn

The router (:mod:`dlplora.plugin`) runs once per prompt / user turn, on the turn's text plus a window
of earlier user turns (``route_window``); the chosen weighted set is fixed on the fused layers before
the first token and kept for every token of the turn. Generation is a batched greedy / sampled loop
with a KV cache, left padding, EOS, stop strings and a per-row token limit; :func:`decode_loop` is the
same loop the benchmarks use for every contender.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .errors import DLPLoRAError
from .fusion import LoRAFusion, MODES, load_peft_adapter

WEIGHTINGS = ("softmax", "renorm")
DEFAULT_MAX_NEW_TOKENS = 128


# ---------------------------------------------------------------- the shared decode loop

def _cache_kwarg() -> str:
    """transformers 5 calls the KV cache argument `cache`; older versions `past_key_values`."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def decode_loop(model, rows: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], eos_ids: Sequence[int],
                pad_id: int, temperature: float = 0.0, top_p: float = 1.0, generator=None,
                on_step: Callable[[int, list[list[int]], list[bool]], None] | None = None,
                forward_kwargs: dict | None = None) -> tuple[list[list[int]], list[str]]:
    """Batched generation with a KV cache and left padding.

    Returns (generated token ids per row, EOS excluded; finish reason per row: "stop" or "length").
    `on_step(step, generated, done)` runs after every step and may set ``done[i] = True`` (stop strings).
    """
    b = len(rows)
    limits = [max_new_tokens] * b if isinstance(max_new_tokens, int) else list(max_new_tokens)
    dev = next(model.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = dict(forward_kwargs or {})
    kw[_cache_kwarg()] = _new_cache(model)
    kw["use_cache"] = True
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, **kw)
    logits = out.logits[:, -1]
    next_pos = pos[:, -1:] + 1
    eos = set(int(e) for e in eos_ids)
    generated: list[list[int]] = [[] for _ in range(b)]
    done = [lim <= 0 for lim in limits]
    reasons = ["length"] * b
    for step in range(max(limits + [0])):
        if all(done):
            break
        tok = _sample(logits, temperature, top_p, generator)
        toks = tok.tolist()
        for i, t in enumerate(toks):
            if done[i]:
                continue
            if t in eos:
                done[i], reasons[i] = True, "stop"
                continue
            generated[i].append(t)
            if len(generated[i]) >= limits[i]:
                done[i] = True
        if on_step is not None:
            before = list(done)
            on_step(step, generated, done)
            for i in range(b):
                if done[i] and not before[i]:
                    reasons[i] = "stop"
        if all(done):
            break
        feed = torch.tensor([pad_id if d else t for t, d in zip(toks, done)], dtype=torch.long, device=dev)
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=dev)], dim=1)
        out = model(input_ids=feed[:, None], attention_mask=mask, position_ids=next_pos, logits_to_keep=1, **kw)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return generated, reasons


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(e, int):
        ids.add(e)
    elif isinstance(e, (list, tuple)):
        ids.update(int(x) for x in e)
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for name in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
        if name in specials:
            ids.add(int(tokenizer.convert_tokens_to_ids(name)))
    return sorted(ids)


# ---------------------------------------------------------------- requests

def _as_set(value, where: str) -> dict[str, float]:
    """An explicit adapter set: {name: weight}, or an object with .names and .weights (a Routing)."""
    if hasattr(value, "names") and hasattr(value, "weights"):
        names, weights = list(value.names), list(value.weights)
        if len(names) != len(weights):
            raise DLPLoRAError(f"{where}: {len(weights)} weights for {len(names)} adapters")
        value = dict(zip(names, weights))
    if not isinstance(value, Mapping):
        raise DLPLoRAError(f"{where}: adapters must be a {{name: weight}} mapping, got {type(value).__name__}")
    out = {}
    for name, w in value.items():
        if not isinstance(name, str):
            raise DLPLoRAError(f"{where}: adapter names must be strings, got {name!r}")
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise DLPLoRAError(f"{where}: weight of adapter {name!r} is not a number: {w!r}") from None
        if math.isnan(w) or math.isinf(w):
            raise DLPLoRAError(f"{where}: weight of adapter {name!r} is {w}; weights must be finite")
        if w < 0:
            raise DLPLoRAError(f"{where}: weight of adapter {name!r} is negative ({w}); weights must be >= 0")
        if w > 0:
            out[name] = out.get(name, 0.0) + w
    return out


def parse_adapters(text: str) -> dict[str, float]:
    """``"a=0.5,b=0.3"`` (or ``"a"`` for weight 1) -> {"a": 0.5, "b": 0.3}."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, w = part.partition("=")
        name = name.strip()
        if not name:
            raise DLPLoRAError(f"--adapters {text!r}: empty adapter name in {part!r}")
        try:
            out[name] = float(w) if sep else 1.0
        except ValueError:
            raise DLPLoRAError(f"--adapters {text!r}: weight {w!r} of {name} is not a number") from None
    if not out:
        raise DLPLoRAError(f"--adapters {text!r}: no adapter given (expected name=weight,name=weight)")
    return out


def _per_prompt(value, n: int, is_single: Callable[[object], bool], what: str) -> list:
    if value is None:
        return [None] * n
    if is_single(value):
        return [value] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise DLPLoRAError(f"{what}: {len(value)} entries for {n} prompts")
        return list(value)
    raise DLPLoRAError(f"{what}: unsupported value of type {type(value).__name__}")


def _is_history(h) -> bool:
    return isinstance(h, (list, tuple)) and (len(h) == 0 or isinstance(h[0], Mapping))


# ---------------------------------------------------------------- the engine

class DLPLoRA:
    """A backbone with a library of LoRA adapters fused in, and a router that picks a weighted set
    of them for every prompt."""

    def __init__(self, model, tokenizer, fusion: LoRAFusion, router=None, p: float = 0.6, top_k: int | None = None,
                 weighting: str = "softmax", floor: float = 0.0, mode: str = "auto", route_window: int = 0,
                 info=None, library=None):
        if weighting not in WEIGHTINGS:
            raise DLPLoRAError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if mode not in MODES:
            raise DLPLoRAError(f"unknown fusion mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0 < p <= 1:
            raise DLPLoRAError(f"p must be in (0, 1], got {p}")
        self.model = model
        self.tokenizer = tokenizer
        self.fusion = fusion
        self.router = router
        self.p, self.top_k, self.weighting, self.floor = p, top_k, weighting, floor
        self.mode = mode
        self.route_window = route_window
        self.info = info
        self.library = library
        self.lock = threading.RLock()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    @property
    def names(self) -> list[str]:
        return list(self.fusion.names)

    # -------------------------------------------------- construction
    @classmethod
    def from_library(cls, lib_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                     plugin_dir: str | os.PathLike | None = None, p: float = 0.6, top_k: int | None = None,
                     weighting: str = "softmax", floor: float = 0.0, mode: str = "auto", route_window: int = 0,
                     dtype=None, router=None, adapters: Sequence[str] | None = None) -> "DLPLoRA":
        """Load the library's backbone (or `model`), fuse its adapters (all, or the names in `adapters`)
        and load its plugin (LIB/plugin, or `plugin_dir`; none is fine when every request names its
        adapters). `router` replaces the plugin by any object with the plugin's ``route`` method."""
        from .backbone import load_backbone
        from .library import Library

        lib = Library.open(lib_dir)
        names = list(adapters) if adapters else lib.names
        if not names:
            raise DLPLoRAError(f"the library {lib.root} holds no adapters; add some with `dlp-lora train-loras`")
        for n in names:
            lib.entry(n)  # unknown names fail here, clearly
        if model is None:
            base_path = lib.base_model.get("path")
            if base_path and Path(base_path).is_dir():
                model = base_path
        net, tok, info = load_backbone(model, dtype=dtype)
        lib.check_base(info.to_dict())
        fusion = LoRAFusion(net, [load_peft_adapter(lib.adapter_dir(n), n) for n in names])
        if router is None:
            pdir = Path(plugin_dir) if plugin_dir else lib.plugin_dir()
            if plugin_dir and not pdir.is_dir():
                raise DLPLoRAError(f"--plugin {plugin_dir}: no such directory")
            if pdir.is_dir() and any(pdir.iterdir()):
                from .plugin import Plugin

                router = Plugin.load(pdir, expected_labels=lib.names)
        return cls(net, tok, fusion, router=router, p=p, top_k=top_k, weighting=weighting, floor=floor, mode=mode,
                   route_window=route_window, info=info, library=lib)

    # -------------------------------------------------- routing
    def routing_text(self, text: str, history: Sequence[Mapping] | None = None, window: int | None = None) -> str:
        """What the router reads for a turn: the last `window` user turns of history, then the turn."""
        window = self.route_window if window is None else window
        earlier = [m.get("content", "") for m in (history or []) if m.get("role") == "user"]
        earlier = earlier[-window:] if window > 0 else []
        return "\n".join(earlier + [text])

    def route(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """The router's weighted set for each text ({} = base model)."""
        if self.router is None:
            lib = self.library.root if self.library is not None else "LIB"
            raise DLPLoRAError(f"the library has no plugin to route prompts; train one with "
                               f"`dlp-lora train-plugin --library {lib}` or pass adapters explicitly "
                               f"(--adapters name=weight)")
        routings = self.router.route(list(texts), p=self.p, top_k=self.top_k, weighting=self.weighting,
                                     floor=self.floor)
        if len(routings) != len(texts):
            raise DLPLoRAError(f"the router returned {len(routings)} routings for {len(texts)} texts")
        out = []
        for r in routings:
            s = _as_set(r, "router")
            unknown = [n for n in s if n not in self.fusion._index]
            if unknown:
                raise DLPLoRAError(f"the plugin chose adapters {', '.join(unknown)} that are not loaded; "
                                   f"retrain it with `dlp-lora train-plugin` for this library")
            out.append(s)
        return out

    @contextmanager
    def apply(self, sets: Sequence[Mapping[str, float]], mode: str | None = None):
        """Run forward passes of ``engine.model`` with one weighted set per batch row (for scoring)."""
        with self.lock:
            with self.fusion.routing([_as_set(s, "adapters") for s in sets], mode=mode or self.mode) as used:
                yield used

    # -------------------------------------------------- requests
    def _prepare(self, prompt, adapters, history, raw: bool, max_new: int) -> dict:
        """Check one request; returns {ids, set (or None = route), route_text} or raises DLPLoRAError."""
        if not isinstance(prompt, str):
            raise DLPLoRAError(f"the prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise DLPLoRAError("the prompt is empty")
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise DLPLoRAError(f"max_new_tokens must be a positive integer, got {max_new!r}")
        if history is not None and not _is_history(history):
            raise DLPLoRAError("history must be a list of {'role': ..., 'content': ...} messages")
        aset = None
        if adapters is not None:
            aset = _as_set(adapters, "adapters")
            unknown = [n for n in aset if n not in self.fusion._index]
            if unknown:
                raise DLPLoRAError(f"unknown adapter {unknown[0]!r}; the library holds: {', '.join(self.names)}")
        if raw:
            text = prompt if not history else "".join(m.get("content", "") + "\n" for m in history) + prompt
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        else:
            from .tasks import chat_prompt

            ids = self.tokenizer(chat_prompt(self.tokenizer, prompt, list(history or [])),
                                 add_special_tokens=False)["input_ids"]
        if self.context_length:
            room = self.context_length - max_new
            if room <= 0:
                raise DLPLoRAError(f"max_new_tokens {max_new} leaves no room in the context window "
                                   f"of {self.context_length} tokens")
            if len(ids) > room:
                raise DLPLoRAError(f"the prompt is {len(ids)} tokens; with max_new_tokens {max_new} it must be at "
                                   f"most {room} (context window {self.context_length})")
        return {"ids": ids, "set": aset, "route_text": self.routing_text(prompt, history)}

    def validate(self, prompts: Sequence[str], adapters=None, history=None, raw: bool = False,
                 max_new_tokens: int | Sequence[int] = DEFAULT_MAX_NEW_TOKENS) -> list[str | None]:
        """Check each request without generating: per row None (fine) or the error message."""
        reqs, errors = self._prepare_all(prompts, adapters, history, raw, max_new_tokens)
        return errors

    def _prepare_all(self, prompts, adapters, history, raw, max_new_tokens):
        if isinstance(prompts, str):
            prompts = [prompts]
        n = len(prompts)
        adapters_l = _per_prompt(adapters, n, lambda v: isinstance(v, Mapping) or hasattr(v, "names"), "adapters")
        history_l = _per_prompt(history, n, _is_history, "history")
        max_l = _per_prompt(max_new_tokens, n, lambda v: isinstance(v, int), "max_new_tokens")
        reqs, errors = [], []
        for i in range(n):
            try:
                r = self._prepare(prompts[i], adapters_l[i], history_l[i], raw, max_l[i])
                if r["set"] is None and self.router is None:
                    self.route([])  # raises the "train a plugin" error
                r["max_new"] = max_l[i]
                reqs.append(r)
                errors.append(None)
            except DLPLoRAError as exc:
                reqs.append(None)
                errors.append(str(exc))
        return reqs, errors

    # -------------------------------------------------- generation
    def generate(self, prompts: str | Sequence[str], max_new_tokens: int | Sequence[int] = DEFAULT_MAX_NEW_TOKENS,
                 adapters=None, raw: bool = False, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, history=None, mode: str | None = None, seed: int | None = None,
                 on_error: str = "raise", on_token: Callable[[int, str], None] | None = None) -> list[dict]:
        """Generate a completion for each prompt.

        adapters: None (the plugin routes each prompt), one {name: weight} set for all prompts, or a
            list with one set (or None = route) per prompt. Explicit weights are used as given ({} = base).
        raw: feed the prompt as is, without the chat template.
        temperature: 0 = greedy (default); otherwise sampling, with nucleus `top_p`.
        stop: strings that end a completion (not included in the text).
        history: earlier chat messages, for all prompts or one list per prompt.
        on_error: "raise" (default) or "return": a bad request gets {"error": message} in its row,
            the other rows are generated normally.
        on_token: streaming callback ``on_token(row, new_text)``.

        Returns per prompt ``{"text", "routing": {"adapters": [{"name", "weight"}], "source"},
        "tokens", "prompt_tokens", "finish_reason", "mode"}``.
        """
        if on_error not in ("raise", "return"):
            raise DLPLoRAError(f"on_error must be 'raise' or 'return', got {on_error!r}")
        if temperature < 0 or math.isnan(temperature):
            raise DLPLoRAError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise DLPLoRAError(f"top_p must be in (0, 1], got {top_p}")
        if mode is not None and mode not in MODES:
            raise DLPLoRAError(f"unknown fusion mode {mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(stop, str):
            stop = [stop]
        stop = [s for s in (stop or []) if s]
        single = isinstance(prompts, str)
        if single:
            prompts = [prompts]
        if not prompts:
            return []
        reqs, errors = self._prepare_all(prompts, adapters, history, raw, max_new_tokens)

        # route the rows without an explicit set, all in one call
        to_route = [i for i, r in enumerate(reqs) if r is not None and r["set"] is None]
        if to_route:
            try:
                sets = self.route([reqs[i]["route_text"] for i in to_route])
                for i, s in zip(to_route, sets):
                    reqs[i]["set"], reqs[i]["source"] = s, "plugin"
            except DLPLoRAError as exc:
                for i in to_route:
                    reqs[i], errors[i] = None, str(exc)
        for r in reqs:
            if r is not None:
                r.setdefault("source", "explicit")

        if on_error == "raise":
            bad = [(i, e) for i, e in enumerate(errors) if e]
            if bad:
                i, e = bad[0]
                raise DLPLoRAError(e if len(prompts) == 1 else f"prompt {i + 1}: {e}")

        live = [i for i, r in enumerate(reqs) if r is not None]
        results: list[dict] = [{"error": e} if e else {} for e in errors]
        if live:
            outs = self._run([reqs[i] for i in live], temperature, top_p, stop, mode or self.mode, seed,
                             None if on_token is None else (lambda j, t: on_token(live[j], t)))
            for i, o in zip(live, outs):
                results[i] = o
        return results

    def _run(self, reqs, temperature, top_p, stop, mode, seed, on_token) -> list[dict]:
        tok = self.tokenizer
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=next(self.model.parameters()).device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 31, (1,)).item()))
        texts = [""] * len(reqs)
        emitted = [0] * len(reqs)
        hold = max([len(s) for s in stop] + [1]) - 1

        def decode(ids):
            return tok.decode(ids, skip_special_tokens=True)

        closed = [False] * len(reqs)

        def on_step(step, generated, done):
            for i, ids in enumerate(generated):
                if closed[i]:
                    continue
                text = decode(ids)
                cut = min([text.find(s) for s in stop if s in text] or [-1]) if stop else -1
                if cut >= 0:
                    text = text[:cut]
                    done[i] = True
                texts[i] = text
                if on_token is not None:
                    safe = len(text) if done[i] else len(text) - hold
                    while not done[i] and safe > emitted[i] and text[safe - 1] == "\ufffd":
                        safe -= 1
                    if safe > emitted[i]:
                        on_token(i, text[emitted[i]:safe])
                        emitted[i] = safe
                closed[i] = done[i]

        with self.lock:
            used = self.fusion.set_routing([r["set"] for r in reqs], mode=mode,
                                           expected_tokens=max(r["max_new"] for r in reqs))
            try:
                generated, reasons = decode_loop(
                    self.model, [r["ids"] for r in reqs], [r["max_new"] for r in reqs], self.eos_ids,
                    tok.pad_token_id, temperature=temperature, top_p=top_p, generator=gen,
                    on_step=on_step if (stop or on_token is not None) else None)
            finally:
                self.fusion.clear()
        out = []
        for i, (r, ids, why) in enumerate(zip(reqs, generated, reasons)):
            text = decode(ids)
            if stop:
                cut = min([text.find(s) for s in stop if s in text] or [-1])
                if cut >= 0:
                    text, why = text[:cut], "stop"
            if on_token is not None and len(text) > emitted[i]:
                on_token(i, text[emitted[i]:])
                emitted[i] = len(text)
            adapters = [{"name": n, "weight": round(float(w), 6)}
                        for n, w in sorted(r["set"].items(), key=lambda kv: -kv[1])]
            out.append({"text": text, "routing": {"adapters": adapters, "source": r["source"]},
                        "tokens": len(ids), "prompt_tokens": len(r["ids"]), "finish_reason": why,
                        "mode": used or "base"})
        return out

    # -------------------------------------------------- chat
    def chat(self, system: str | None = None, **defaults) -> "ChatSession":
        """A conversation that keeps its history and re-routes every user turn."""
        return ChatSession(self, system=system, **defaults)


class ChatSession:
    """Multi-turn chat on a :class:`DLPLoRA` engine. Each :meth:`send` routes the new user turn
    (plus the engine's ``route_window`` earlier user turns) once, then generates the reply."""

    def __init__(self, engine: DLPLoRA, system: str | None = None, **defaults):
        self.engine = engine
        self.history: list[dict] = [{"role": "system", "content": system}] if system else []
        self.defaults = defaults

    def send(self, text: str, on_token: Callable[[str], None] | None = None, **kwargs) -> dict:
        opts = dict(self.defaults) | kwargs
        cb = None if on_token is None else (lambda _row, t: on_token(t))
        result = self.engine.generate([text], history=[list(self.history)], on_token=cb, **opts)[0]
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": result["text"]}]
        return result

    def reset(self) -> None:
        self.history = [m for m in self.history if m["role"] == "system"]
