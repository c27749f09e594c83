"""The OpenAI protocol of the server: reading and checking request bodies into typed parameters, and
writing responses and stream chunks (the shape of vLLM's entrypoints/openai protocol module).

Request fields, in three kinds:

* implemented: ``messages`` / ``prompt``, ``model``, ``max_tokens`` (``max_completion_tokens``), ``temperature``,
  ``top_p``, ``seed``, ``stop``, ``n``, ``stream``, ``stream_options.include_usage``, ``logprobs`` (and
  ``top_logprobs`` for chat), and the extensions ``adapters`` and ``return_token_ids``;
* refused (:data:`UNSUPPORTED`): OpenAI's parameters that this server does not implement (tools, penalties,
  ``logit_bias``, ``response_format``, ``best_of``, ``echo``, ``suffix``, ...) and vLLM's sampling extensions. A
  request that sets one to anything but its default gets 400 naming it (``param``), so a client never believes it
  got what it asked for; the default (``0``, ``null``, ``[]``, ...) is accepted;
* anything else is ignored, as vLLM does (and harmless metadata such as ``user``, ``metadata``,
  ``service_tier``): :attr:`GenerationParams.ignored` lists them and the server logs them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .config import MAX_TOP_LOGPROBS, APIError

MIN_TEMPERATURE = 1e-5  # below: greedy (as vLLM); logits / 1e-300 would overflow the softmax
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # a 64-bit seed (torch.Generator.manual_seed's range holds it)

# Parameters refused unless they hold a default: name -> (the accepted defaults, the endpoints that know the name).
# An empty default list means any value but null is refused.
_BOTH, _CHAT, _COMPL = ("chat", "completions"), ("chat",), ("completions",)
UNSUPPORTED: dict[str, tuple[tuple, tuple[str, ...]]] = {
    # OpenAI
    "frequency_penalty": ((0,), _BOTH),
    "presence_penalty": ((0,), _BOTH),
    "logit_bias": (({},), _BOTH),
    "tools": (([],), _CHAT),
    "tool_choice": (("none",), _CHAT),
    "functions": (([],), _CHAT),
    "function_call": (("none",), _CHAT),
    "response_format": (({"type": "text"},), _CHAT),
    "audio": ((), _CHAT),
    "modalities": ((["text"],), _CHAT),
    "prediction": ((), _CHAT),
    "reasoning_effort": ((), _CHAT),
    "verbosity": ((), _CHAT),
    "web_search_options": ((), _CHAT),
    "store": ((False,), _CHAT),
    "best_of": ((1,), _COMPL),  # also accepted when equal to n
    "echo": ((False,), _BOTH),
    "suffix": (("",), _COMPL),
    # vLLM's extensions
    "top_k": ((0, -1), _BOTH),
    "min_p": ((0,), _BOTH),
    "repetition_penalty": ((1,), _BOTH),
    "length_penalty": ((1,), _BOTH),
    "use_beam_search": ((False,), _BOTH),
    "min_tokens": ((0,), _BOTH),
    "ignore_eos": ((False,), _BOTH),
    "stop_token_ids": (([],), _BOTH),
    "include_stop_str_in_output": ((False,), _BOTH),
    "skip_special_tokens": ((True,), _BOTH),
    "bad_words": (([],), _BOTH),
    "allowed_token_ids": ((), _BOTH),
    "prompt_logprobs": ((), _BOTH),
    "truncate_prompt_tokens": ((), _BOTH),
    "guided_json": ((), _BOTH),
    "guided_regex": ((), _BOTH),
    "guided_choice": ((), _BOTH),
    "guided_grammar": ((), _BOTH),
    "structured_outputs": ((), _BOTH),
    "logits_processors": ((), _BOTH),
    "chat_template": ((), _CHAT),
    "chat_template_kwargs": ((), _CHAT),
    "add_generation_prompt": ((True,), _CHAT),
    "continue_final_message": ((False,), _CHAT),
    "documents": ((), _CHAT),
}
_IMPLEMENTED = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
                "logprobs", "adapters", "return_token_ids"}
_KNOWN = {"chat": _IMPLEMENTED | {"messages", "max_completion_tokens", "top_logprobs"},
          "completions": _IMPLEMENTED | {"prompt"}}
_HARMLESS = {"user", "metadata", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls",
             "request_id"}  # accepted and ignored: they do not change the output

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a number, got {_short(v)}", param=name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise APIError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {_short(v)}",
                       param=name)
    return float(v)


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _check_text(text: str, where: str, param: str) -> str:
    """`text`, refused (400) when it holds a lone surrogate (JSON can carry "\\ud800"; it is not a character,
    so no tokenizer can encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{where} is not valid Unicode text: it holds a lone surrogate "
                            f"{text[exc.start]!r} at character {exc.start}", param=param) from None
    return text


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return _check_text(content, where, "messages")
    if isinstance(content, list):  # content parts: only text is supported
        parts = []
        for j, p in enumerate(content):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, f"{where}: only text content parts are supported", param="messages")
            parts.append(_check_text(p["text"], f"{where}.content[{j}].text", "messages"))
        return "".join(parts)
    raise APIError(400, f"{where}: 'content' must be a string or a list of text parts", param="messages")


def _parse_messages(body: dict, max_messages: int) -> tuple[str, list[dict]]:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "'messages' is required: a list of {\"role\", \"content\"} objects", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    if len(msgs) > max_messages:
        raise APIError(400, f"'messages' holds {len(msgs)} messages, over this server's limit of {max_messages}",
                       param="messages", code="too_many_messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}]: role must be system, user or assistant, got {_short(role)}",
                           param="messages")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content_text(m.get("content"), f"messages[{i}]")})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be a user message (the turn to answer)", param="messages")
    if not out[-1]["content"].strip():
        raise APIError(400, "the last user message is empty", param="messages")
    return out[-1]["content"], out[:-1]


def _parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    return [_check_text(s, "'stop'", "stop") for s in stop if s]


ROUTED_HEADER = "x-dlp-lora-routed"  # the set the Ray Serve ingress routed a request to: {"adapters", "why"} (JSON)


def routed_header(value: str | None) -> tuple[dict | None, str | None]:
    """(adapter set, the router's reason when it chose the base model) from :data:`ROUTED_HEADER`; (None, None)
    without it. Read only where ``ServeConfig.trust_routing_header`` is set (:mod:`dlplora.serve.ray_serve`)."""
    if value is None:
        return None, None
    try:
        data = json.loads(value)
        aset = {str(n): float(w) for n, w in data["adapters"].items()}
        why = data.get("why")
    except (ValueError, TypeError, KeyError, AttributeError):
        raise APIError(400, f"malformed {ROUTED_HEADER} header", param="model") from None
    if not all(math.isfinite(w) and w >= 0 for w in aset.values()):
        raise APIError(400, f"malformed {ROUTED_HEADER} header: weights must be finite and >= 0", param="model")
    return aset, why if isinstance(why, str) else None


def error_response(err: APIError):
    from fastapi.responses import JSONResponse

    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def read_json(request, limit: int) -> dict:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, f"the request body must be JSON with Content-Type: application/json, got "
                            f"{ctype or 'no Content-Type'}", code="unsupported_media_type")
    too_big = APIError(413, f"the request body is over the server's limit of {limit} bytes", code="request_too_large")
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            if int(cl) > limit:
                raise too_big
        except ValueError:
            raise APIError(400, f"bad Content-Length {cl!r}") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: it is nested too deeply",
                       code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


@dataclass
class GenerationParams:
    """A checked /v1/chat/completions (chat) or /v1/completions body."""

    chat: bool
    prompt: str  # the turn to answer: the last user message, or the completion prompt
    history: list[dict] | None  # the earlier chat messages (chat only)
    model: str | None  # the "model" field as given (adapter choice: ServerState.choose)
    adapters: object  # the "adapters" extension field as given
    max_tokens: int | None  # None: the server's default
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    n: int = 1  # choices
    logprobs: int | None = None  # None: no log probabilities; k: with k alternatives per token
    ignored: list[str] = field(default_factory=list)  # unknown fields, ignored

    def choice_seeds(self) -> list[int | None]:
        """The sampling seed of each choice: `seed` + i (wrapped into 64 bits) when a seed is given, else None
        (the scheduler draws one). Greedy choices need none."""
        if self.seed is None:
            return [None] * self.n
        lo, hi = SEED_RANGE
        return [(self.seed + i - lo) % (hi - lo + 1) + lo for i in range(self.n)]


def _completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise APIError(400, "'prompt' is required", param="prompt")
    if not isinstance(prompt, str):
        raise APIError(400, "'prompt' must be a string (batched or token prompts are not supported)", param="prompt")
    if not prompt.strip():
        raise APIError(400, "'prompt' is empty", param="prompt")
    return _check_text(prompt, "'prompt'", "prompt")


def _is_default(v, defaults: tuple) -> bool:
    for d in defaults:
        if isinstance(d, (int, float)) and not isinstance(d, bool):
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == d:
                return True
        elif type(v) is type(d) and v == d:
            return True
    return False


def check_unsupported(body: dict, chat: bool) -> list[str]:
    """Refuse (400) every :data:`UNSUPPORTED` parameter set to a value other than its default; returns the unknown
    fields (to be ignored)."""
    endpoint = "chat" if chat else "completions"
    for name, (defaults, where) in UNSUPPORTED.items():
        if name not in body or body[name] is None or _is_default(body[name], defaults):
            continue
        if name == "best_of" and _is_int(body[name]) and body[name] == (body.get("n") or 1):
            continue
        known = "" if endpoint in where else f" (and it is not a parameter of /v1/{'chat/' if chat else ''}completions)"
        accepted = " or ".join(json.dumps(d) for d in defaults)
        raise APIError(400, f"'{name}' is not supported by this server{known}; got {_short(body[name])}. Leave it "
                            f"out{' or send ' + accepted if accepted else ''}.", param=name,
                       code="unsupported_parameter")
    known = _KNOWN[endpoint] | _HARMLESS
    return sorted(k for k in body if k not in known and k not in UNSUPPORTED)


def _parse_logprobs(body: dict, chat: bool) -> int | None:
    """The number of alternatives per token when log probabilities are asked for, else None."""
    lp = body.get("logprobs")
    if chat:
        if lp is not None and not isinstance(lp, bool):
            raise APIError(400, f"'logprobs' must be true or false, got {_short(lp)}", param="logprobs")
        top = body.get("top_logprobs")
        if top is not None:
            if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"'top_logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}], got {_short(top)}",
                               param="top_logprobs")
            if lp is not True:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return (top or 0) if lp else None
    if lp is None:
        return None
    if not _is_int(lp) or not 0 <= lp <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"'logprobs' must be an integer in [0, {MAX_TOP_LOGPROBS}] (the alternatives per token), "
                            f"got {_short(lp)}", param="logprobs")
    return lp


def parse_generation(body: dict, chat: bool, max_tokens_limit: int, max_messages: int = 256,
                     max_n: int = 8) -> GenerationParams:
    """Check a generation request body; raises :class:`APIError` (400) naming the field at fault."""
    ignored = check_unsupported(body, chat)
    if chat:
        prompt, history = _parse_messages(body, max_messages)
    else:
        prompt, history = _completion_prompt(body), None
    n = body.get("n")
    if n is None:
        n = 1
    elif not _is_int(n) or not 1 <= n <= max_n:
        raise APIError(400, f"'n' must be an integer in [1, {max_n}] (this server's limit), got {_short(n)}",
                       param="n")
    logprobs = _parse_logprobs(body, chat)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None:
        if not _is_int(max_tokens) or max_tokens < 1:
            raise APIError(400, f"'{key}' must be a positive integer, got {_short(max_tokens)}", param=key)
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"'{key}' is {_short(max_tokens)}, over this server's limit of {max_tokens_limit}",
                           param=key)
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)  # default greedy (OpenAI: 1)
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise APIError(400, f"'seed' must be a 64-bit integer, got {_short(seed)}", param="seed")
    stop = _parse_stop(body)
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    return GenerationParams(chat=chat, prompt=prompt, history=history, model=body.get("model"),
                            adapters=body.get("adapters"), max_tokens=max_tokens, temperature=temperature,
                            top_p=top_p, seed=seed, stop=stop, stream=stream,
                            include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")),
                            return_token_ids=body.get("return_token_ids") is True, n=n, logprobs=logprobs,
                            ignored=ignored)


# ---------------------------------------------------------------- responses

def _lp(v: float) -> float:
    return v if math.isfinite(v) else -9999.0  # OpenAI's floor; JSON has no -Infinity


def chat_logprobs(items) -> dict:
    """OpenAI's chat ``logprobs`` object for :class:`dlplora.serve.logprobs.TokenLogprob` items."""
    return {"content": [{"token": t.token, "logprob": _lp(t.logprob), "bytes": t.bytes,
                         "top_logprobs": [{"token": a, "logprob": _lp(v), "bytes": b} for a, b, v in t.top]}
                        for t in items], "refusal": None}


def completion_logprobs(items) -> dict:
    """OpenAI's (legacy) completions ``logprobs`` object: tokens, their log probabilities, the alternatives of each
    (up to ``logprobs`` of them, plus the chosen token) and each token's character offset in the completion."""
    tops = []
    for t in items:
        d = {}
        for a, _, v in t.top:
            d.setdefault(a, _lp(v))
        d.setdefault(t.token, _lp(t.logprob))
        tops.append(d)
    return {"tokens": [t.token for t in items], "token_logprobs": [_lp(t.logprob) for t in items],
            "top_logprobs": tops, "text_offset": [t.offset for t in items]}


class ResponseWriter:
    """The response objects of one request: the whole completion, or its stream chunks (SSE lines)."""

    def __init__(self, params: GenerationParams, request_id: str, created: int, model_id: str, routing: dict):
        self.params = params
        self.id = ("chatcmpl-" if params.chat else "cmpl-") + request_id[:24]
        self.created, self.model_id, self.routing = created, model_id, routing

    @staticmethod
    def usage(dones: list[dict]) -> dict:
        """Prompt tokens once, completion tokens summed over the choices (as OpenAI counts them)."""
        prompt = dones[0]["prompt_tokens"]
        completion = sum(d["completion_tokens"] for d in dones)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs(self, items) -> dict | None:
        """The ``logprobs`` field of a choice (None when the request did not ask for them)."""
        if self.params.logprobs is None or items is None:
            return None
        return chat_logprobs(items) if self.params.chat else completion_logprobs(items)

    def completion(self, dones: list[dict], prompt_ids: list[int], logprobs: list | None = None) -> dict:
        """The non-streaming response for the scheduler's "done" payloads (one per choice) and, when asked for,
        each choice's :class:`~dlplora.serve.logprobs.TokenLogprob` items."""
        choices = []
        for i, done in enumerate(dones):
            lp = self.logprobs(logprobs[i] if logprobs else None)
            if self.params.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": done["text"]},
                          "logprobs": lp, "finish_reason": done["finish_reason"]}
            else:
                choice = {"index": i, "text": done["text"], "logprobs": lp, "finish_reason": done["finish_reason"]}
            if self.params.return_token_ids:  # extension (as in vLLM): the prompt's and the completion's token ids
                choice["token_ids"] = done["token_ids"]
                choice["prompt_token_ids"] = list(prompt_ids)
            choices.append(choice)
        return {"id": self.id, "object": "chat.completion" if self.params.chat else "text_completion",
                "created": self.created, "model": self.model_id, "choices": choices, "usage": self.usage(dones),
                "routing": self.routing, "system_fingerprint": None}

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.params.chat else "text_completion"

    def chunk(self, text: str | None, finish=None, first=False, index: int = 0, logprobs=None) -> str:
        """One SSE chunk of choice `index`: its new text (and the log probabilities of the tokens it completes)."""
        lp = self.logprobs(logprobs) if logprobs else None
        if self.params.chat:
            delta = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": lp, "finish_reason": finish}
        c = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model_id,
             "choices": [choice], "routing": self.routing}
        if self.params.include_usage:
            c["usage"] = None
        return "data: " + json.dumps(c, ensure_ascii=False) + "\n\n"

    def usage_chunk(self, dones: list[dict]) -> str:
        u = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model_id,
             "choices": [], "usage": self.usage(dones), "routing": self.routing}
        return "data: " + json.dumps(u) + "\n\n"

    @staticmethod
    def error_chunk(err: APIError) -> str:
        return "data: " + json.dumps(err.body()) + "\n\n"
