"""The DLP-LoRA inference engine: route each prompt once, then generate with the fused adapters.

>>> engine = DLPLoRA.from_library("lib")                        # backbone + all adapters + plugin
>>> engine.generate(["Translate to English: Guten Morgen"])     # routed by the plugin
[{'text': ..., 'routing': {'adapters': [{'name': ..., 'weight': ...}], 'source': 'plugin'}, 'tokens': ..., ...}]
>>> engine.generate(["2+2?"], adapters={"gsm8k": 1.0})          # explicit set, weights used as given
>>> chat = engine.chat(); chat.send("hello", on_token=print)    # keeps history, re-routes every turn

The router (:mod:`dlplora.plugin`) runs once per prompt / user turn, on the turn's text plus a window of earlier user
turns (``route_window``); the chosen weighted set is fixed on the fused layers before the first token and kept for
every token of the turn. Generation: the primitives of :mod:`dlplora.decoding` (KV cache, EOS, stop strings, per-row
limits), the loop the benchmarks use for every contender. Routing settings: :class:`dlplora.config.RoutingConfig`.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .config import DEFAULT_MAX_NEW_TOKENS, TURN_SEPARATOR, RoutingConfig, check_mode
from .decoding import StopStreamer, decode_loop, eos_token_ids
from .errors import ContextLengthError, DLPLoRAError, RequestError
from .fusion import LoRAFusion, load_peft_adapter
from .quantize import apply_quantize, quantize_dtype, resolve_quantize

ENGINE_TABLE = "engine"  # the engine's slot table in the fused layers (the server's scheduler has its own)

_ROUTING_ALIASES = {"route_window": "window"}  # DLPLoRA(..., route_window=N) names RoutingConfig.window so


# ---------------------------------------------------------------- requests

MAX_WEIGHT = 1.0  # an explicit mix weight is in [0, MAX_WEIGHT]: 1.5 extrapolated one adapter into empty text


def adapter_set(value, where: str) -> dict[str, float]:
    """An explicit adapter set: {name: weight}, or an object with .names and .weights (a Routing). Each weight is
    in [0, 1] (0 = left out) and used as given (not renormalised)."""
    if hasattr(value, "names") and hasattr(value, "weights"):
        names, weights = list(value.names), list(value.weights)
        if len(names) != len(weights):
            raise RequestError(f"{where}: {len(weights)} weights for {len(names)} adapters", "adapters")
        value = dict(zip(names, weights))
    if not isinstance(value, Mapping):
        raise RequestError(f"{where}: adapters must be a {{name: weight}} mapping, got {type(value).__name__}",
                           "adapters")
    out = {}
    for name, w in value.items():
        if not isinstance(name, str):
            raise RequestError(f"{where}: adapter names must be strings, got {name!r}", "adapters")
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise RequestError(f"{where}: weight of adapter {name!r} is not a number: {w!r}", "adapters") from None
        if not 0 <= w <= MAX_WEIGHT:  # NaN fails this too
            raise RequestError(f"{where}: weight of adapter {name!r} is {w:g}; each weight must be in [0, {MAX_WEIGHT:g}] (finite; 1 = "
                               f"full strength, 0 = left out; past 1 the output can break down)", "adapters")
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


def routing_config(routing: RoutingConfig | None = None, **overrides) -> RoutingConfig:
    """`routing` (default: the defaults) with keyword overrides (p=, top_k=, ..., route_window=) applied, checked."""
    changes = {_ROUTING_ALIASES.get(k, k): v for k, v in overrides.items()}
    return (routing or RoutingConfig()).replace(**changes) if changes else (routing or RoutingConfig())


def routing_field(adapters: list[dict], source: str, base_reason: str | None = None) -> dict:
    """A response's `routing`: the weighted adapters, how chosen, and for the base model its reason."""
    out = {"adapters": adapters, "source": source}
    if not adapters and base_reason:
        out.update(base_model=True, base_reason=base_reason)
    return out


@dataclass
class Request:
    """One checked request: prompt ids, explicit adapter set (None = route it), the router's text, token budget."""

    ids: list[int]
    adapters: dict[str, float] | None
    route_text: str
    max_new: int
    source: str = "explicit"
    base_reason: str | None = None  # why the router chose the base model


# ---------------------------------------------------------------- the engine

class DLPLoRA:
    """A backbone with a library of LoRA adapters fused in, and a router that picks a weighted set
    of them for every prompt."""

    def __init__(self, model, tokenizer, fusion: LoRAFusion, router=None, routing: RoutingConfig | None = None,
                 info=None, library=None, **routing_overrides):
        """`routing`: how prompts are routed and fused (default RoutingConfig()); keyword overrides of its fields
        (p=, top_k=, weighting=, floor=, mode=, route_window=) are accepted too."""
        self.model = model
        self.tokenizer = tokenizer
        self.fusion = fusion
        self.router = router
        self.routing = routing_config(routing, **routing_overrides)
        self.info = info
        self.library = library
        self.plugin_dir = library.plugin_dir() if library is not None else None  # where a retrained router goes
        # labels of the router that must never be chosen (a live library: unloaded or pinned-only adapters); its
        # choice is then cut to the others, reweighted, or the base model; swapped whole with the router
        self.unroutable = frozenset(getattr(router, "labels", ())) - set(fusion.names)
        self.lock = threading.RLock()
        self.quantize = "none"  # quantised base linears (dlplora.quantize); from_library records its choice
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    @property
    def names(self) -> list[str]:
        return list(self.fusion.names)

    # the routing settings as attributes (engine.p = 0.9 works): each reads and replaces self.routing
    p = property(lambda self: self.routing.p, lambda self, v: self._set_routing(p=v))
    top_k = property(lambda self: self.routing.top_k, lambda self, v: self._set_routing(top_k=v))
    weighting = property(lambda self: self.routing.weighting, lambda self, v: self._set_routing(weighting=v))
    floor = property(lambda self: self.routing.floor, lambda self, v: self._set_routing(floor=v))
    mode = property(lambda self: self.routing.mode, lambda self, v: self._set_routing(mode=v))
    route_window = property(lambda self: self.routing.window, lambda self, v: self._set_routing(window=v))

    def _set_routing(self, **change) -> None:
        self.routing = self.routing.replace(**change)

    def base_decision(self) -> dict | None:
        """The router's base-model decision in force (:meth:`Plugin.base_decision`; None without a router)."""
        info = getattr(self.router, "base_decision", None)
        return info(self.routing.base_threshold) if info is not None else None

    # -------------------------------------------------- construction
    @classmethod
    def from_library(cls, lib_dir: str | os.PathLike, model: str | os.PathLike | None = None,
                     plugin_dir: str | os.PathLike | None = None, routing: RoutingConfig | None = None, dtype=None,
                     router=None, adapters: Sequence[str] | None = None, device=None, quantize: str | None = None,
                     **routing_overrides) -> "DLPLoRA":
        """Load the library's backbone (or `model`), fuse its adapters (all, or the names in `adapters`)
        and load its plugin (LIB/plugin, or `plugin_dir`; none is fine when every request names its
        adapters). `router` replaces the plugin by any object with the plugin's ``route`` method.
        `dtype` / `device`: "auto" or a name of :mod:`dlplora.device` (or torch objects); the default
        is fp32 on the CPU. `quantize="int8"` / ``"int4"``: quantised base linears, adapters in float
        (:mod:`dlplora.quantize`; CPU; fp32 / bf16 activations). `routing` and its keyword overrides (p=, top_k=, ...) as in :class:`DLPLoRA`."""
        routing = routing_config(routing, **routing_overrides)  # bad values fail before any loading
        from .backbone import load_backbone
        from .library import Library

        lib = Library.open(lib_dir)
        names = list(adapters) if adapters else lib.all_names  # special adapters too: served when named, never routed
        if not names:
            raise DLPLoRAError(f"the library {lib.root} holds no adapters; add some with `dlp-lora train-loras`")
        for n in names:
            lib.entry(n)  # unknown names fail here, clearly
        model = lib.base_model_dir(model)
        quantize = resolve_quantize(quantize, device, dtype)  # "auto": this CPU's fast path (dlplora.device)
        if quantize != "none" and dtype in (None, "auto"):
            dtype = quantize_dtype(quantize)  # int8: fp32 activations; int4: bf16
        net, tok, info = load_backbone(model, dtype=dtype, device=device)
        lib.check_base(info.to_dict())
        fusion = LoRAFusion(net, [load_peft_adapter(lib.adapter_dir(n), n) for n in names])
        apply_quantize(net, quantize)
        if router is None:
            pdir = Path(plugin_dir) if plugin_dir else lib.plugin_dir()
            if plugin_dir and not pdir.is_dir():
                raise DLPLoRAError(f"--plugin {plugin_dir}: no such directory")
            if pdir.is_dir() and any(pdir.iterdir()):
                from .plugin import Plugin

                router = Plugin.load(pdir, expected_labels=lib.names, partial=True)
        engine = cls(net, tok, fusion, router=router, routing=routing, info=info, library=lib)
        engine.quantize, engine.plugin_dir = quantize, Path(plugin_dir) if plugin_dir else lib.plugin_dir()
        return engine

    def _route_rows(self, sets: list[dict], mode: str, expected_tokens: int) -> str | None:
        """Set the fused layers for one generation. In auto mode on the decoding core, rows with different sets
        (or quantised weights) use the engine's slot table, filled in place, so a compiled decode step keeps its
        graph from one call to the next; one set for every row is merged into the weights for a long enough
        generation. Other modes, or no core: :meth:`LoRAFusion.set_routing`."""
        from .core import core_for
        from .fusion import MERGE_MIN_TOKENS

        same = all(s == sets[0] for s in sets)
        merge = same and not self.fusion.quantized and expected_tokens >= MERGE_MIN_TOKENS
        if mode != "auto" or merge or (same and not sets[0]) or core_for(self.model, len(sets)) is None:
            return self.fusion.set_routing(sets, mode=mode, expected_tokens=expected_tokens)
        if self.fusion.slot_tables.get(ENGINE_TABLE, 0) < len(sets):
            self.fusion.init_slots(len(sets), table=ENGINE_TABLE)
        self.fusion.clear()
        for i, s in enumerate(sets):
            self.fusion.set_slot(i, s, table=ENGINE_TABLE)
        self.fusion.use_slots(0, len(sets), table=ENGINE_TABLE)
        return "slots"

    def compile(self) -> "DLPLoRA":
        """torch.compile the decode step of the engine's decoding core (:meth:`dlplora.core.DecodeCore.compile`)."""
        from .core import core_for

        core = core_for(self.model)
        if core is None:
            raise DLPLoRAError("--compile needs the decoding core, which does not run this model")
        core.compile()
        return self

    # -------------------------------------------------- routing
    def routing_text(self, text: str, history: Sequence[Mapping] | None = None, window: int | None = None) -> str:
        """What the router reads for a turn: the last `window` user turns of history, then the turn,
        joined by the plugin's turn separator (so it can tell the current turn from its context)."""
        window = self.routing.window if window is None else window
        earlier = [m.get("content", "") for m in (history or []) if m.get("role") == "user"]
        earlier = earlier[-window:] if window > 0 else []
        return TURN_SEPARATOR.join(earlier + [text])

    def route(self, texts: Sequence[str], routing: RoutingConfig | None = None) -> list[dict[str, float]]:
        """The router's weighted set for each text ({} = base model); `routing` overrides the engine's
        selection settings for this call."""
        return [s for s, _ in self.route_with_reasons(texts, routing)]

    def route_with_reasons(self, texts: Sequence[str], routing: RoutingConfig | None = None
                           ) -> list[tuple[dict[str, float], str | None]]:
        """As :meth:`route`, with the router's reason when it chose the base model (else None)."""
        if self.router is None:
            lib = self.library.root if self.library is not None else "LIB"
            raise DLPLoRAError(f"the library has no plugin to route prompts; train one with "
                               f"`dlp-lora train-plugin --library {lib}` or pass adapters explicitly "
                               f"(--adapters name=weight)")
        router, hidden = self.router, self.unroutable
        routings = router.route(list(texts), **(routing or self.routing).selection())
        if len(routings) != len(texts):
            raise DLPLoRAError(f"the router returned {len(routings)} routings for {len(texts)} texts")
        out = []
        for r in routings:
            s = adapter_set(r, "router")
            why = None if s else getattr(r, "base_reason", None) or "the router chose no adapter"
            cut = sorted(n for n in s if n in hidden)
            if cut:
                total = sum(w for n, w in s.items() if n not in hidden)
                s = {n: w / total for n, w in s.items() if n not in hidden} if total > 0 else {}
                why = None if s else f"the router chose {', '.join(cut)}, not routed to (pinned-only or unloaded)"
            unknown = [n for n in s if n not in self.fusion]
            if unknown:
                raise DLPLoRAError(f"the plugin chose adapters {', '.join(unknown)} that are not loaded; "
                                   f"retrain it with `dlp-lora train-plugin` for this library")
            out.append((s, why))
        return out

    @contextmanager
    def apply(self, sets: Sequence[Mapping[str, float]], mode: str | None = None):
        """Run forward passes of ``engine.model`` with one weighted set per batch row (for scoring)."""
        with self.lock:
            with self.fusion.routing([adapter_set(s, "adapters") for s in sets], mode=mode or self.mode) as used:
                yield used

    # -------------------------------------------------- requests
    def prepare_request(self, prompt: str, adapters=None, history=None, raw: bool = False,
                        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Request:
        """Check and tokenize one request (no routing, no generation). Raises :class:`RequestError` naming
        the field at fault (:class:`ContextLengthError` when it does not fit the context window)."""
        max_new = max_new_tokens
        if not isinstance(prompt, str):
            raise RequestError(f"the prompt must be a string, got {type(prompt).__name__}", "prompt")
        if not prompt.strip():
            raise RequestError("the prompt is empty", "prompt")
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise RequestError(f"max_new_tokens must be a positive integer, got {max_new!r}", "max_new_tokens")
        if history is not None and not _is_history(history):
            raise RequestError("history must be a list of {'role': ..., 'content': ...} messages", "history")
        aset = None
        if adapters is not None:
            aset = adapter_set(adapters, "adapters")
            unknown = [n for n in aset if n not in self.fusion]
            if unknown:
                raise RequestError(f"unknown adapter {unknown[0]!r}; the library holds: {', '.join(self.names)}",
                                   "adapters")
        if raw:
            text = prompt if not history else "".join(m.get("content", "") + "\n" for m in history) + prompt
            ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        else:
            from .chat import chat_ids

            ids = chat_ids(self.tokenizer, prompt, history)  # contents as plain text: no forged turns
        if self.context_length:
            room = self.context_length - max_new
            if room <= 0:
                raise ContextLengthError(f"max_new_tokens {max_new} leaves no room in the context window "
                                         f"of {self.context_length} tokens", "max_new_tokens")
            if len(ids) > room:
                raise ContextLengthError(f"the prompt is {len(ids)} tokens; with max_new_tokens {max_new} it must be "
                                         f"at most {room} (context window {self.context_length})", "prompt")
        return Request(ids=ids, adapters=aset, route_text=self.routing_text(prompt, history), max_new=max_new)

    def validate(self, prompts: Sequence[str], adapters=None, history=None, raw: bool | Sequence[bool] = False,
                 max_new_tokens: int | Sequence[int] = DEFAULT_MAX_NEW_TOKENS) -> list[str | None]:
        """Check each request without generating: per row None (fine) or the error message."""
        return self._prepare_all(prompts, adapters, history, raw, max_new_tokens)[1]

    def _prepare_all(self, prompts, adapters, history, raw, max_new_tokens):
        if isinstance(prompts, str):
            prompts = [prompts]
        n = len(prompts)
        adapters_l = _per_prompt(adapters, n, lambda v: isinstance(v, Mapping) or hasattr(v, "names"), "adapters")
        history_l = _per_prompt(history, n, _is_history, "history")
        max_l = _per_prompt(max_new_tokens, n, lambda v: isinstance(v, int), "max_new_tokens")
        raw_l = _per_prompt(raw, n, lambda v: isinstance(v, bool), "raw")
        reqs, errors = [], []
        for i in range(n):
            try:
                r = self.prepare_request(prompts[i], adapters_l[i], history_l[i], raw_l[i], max_l[i])
                if r.adapters is None and self.router is None:
                    self.route([])  # raises the "train a plugin" error
                reqs.append(r)
                errors.append(None)
            except DLPLoRAError as exc:
                reqs.append(None)
                errors.append(str(exc))
        return reqs, errors

    # -------------------------------------------------- generation
    def generate(self, prompts: str | Sequence[str], max_new_tokens: int | Sequence[int] = DEFAULT_MAX_NEW_TOKENS,
                 adapters=None, raw: bool | Sequence[bool] = False, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] | None = None, history=None, mode: str | None = None, seed: int | None = None,
                 on_error: str = "raise", on_token: Callable[[int, str], None] | None = None) -> list[dict]:
        """Generate a completion for each prompt.

        adapters: None (the plugin routes each prompt), one {name: weight} set for all prompts, or a
            list with one set (or None = route) per prompt. Explicit weights are used as given ({} = base).
        raw: feed the prompt as is, without the chat template (one bool for all prompts, or one per prompt).
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
        if mode is not None:
            check_mode(mode)
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
        to_route = [i for i, r in enumerate(reqs) if r is not None and r.adapters is None]
        if to_route:
            try:
                sets = self.route_with_reasons([reqs[i].route_text for i in to_route])
                for i, (s, why) in zip(to_route, sets):
                    reqs[i].adapters, reqs[i].source, reqs[i].base_reason = s, "plugin", why
            except DLPLoRAError as exc:
                for i in to_route:
                    reqs[i], errors[i] = None, str(exc)

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

    def _run(self, reqs: list[Request], temperature, top_p, stop, mode, seed, on_token) -> list[dict]:
        tok = self.tokenizer
        gen = None
        if temperature > 0:
            gen = torch.Generator(device=next(self.model.parameters()).device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2 ** 31, (1,)).item()))
        streamers = [StopStreamer(stop) for _ in reqs]
        closed = [False] * len(reqs)

        def decode(ids):
            return tok.decode(ids, skip_special_tokens=True)

        def on_step(step, generated, done):
            for i, ids in enumerate(generated):
                if closed[i]:
                    continue
                delta, stopped = streamers[i].update(decode(ids), final=done[i])
                done[i] = done[i] or stopped
                if on_token is not None and delta:
                    on_token(i, delta)
                closed[i] = done[i]

        with self.lock:
            used = self._route_rows([r.adapters for r in reqs], mode, max(r.max_new for r in reqs))
            try:
                generated, reasons = decode_loop(
                    self.model, [r.ids for r in reqs], [r.max_new for r in reqs], self.eos_ids,
                    tok.pad_token_id, temperature=temperature, top_p=top_p, generator=gen,
                    on_step=on_step if (stop or on_token is not None) else None)
            finally:
                self.fusion.clear()
        out = []
        for i, (r, ids, why) in enumerate(zip(reqs, generated, reasons)):
            delta, stopped = streamers[i].update(decode(ids), final=True)
            if stopped:
                why = "stop"
            if on_token is not None and delta:
                on_token(i, delta)
            adapters = [{"name": n, "weight": round(float(w), 6)}
                        for n, w in sorted(r.adapters.items(), key=lambda kv: -kv[1])]
            out.append({"text": streamers[i].text, "routing": routing_field(adapters, r.source, r.base_reason),
                        "tokens": len(ids), "prompt_tokens": len(r.ids), "finish_reason": why,
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
