"""The OpenAI protocol of the server: reading and checking request bodies into typed parameters, and
writing responses and stream chunks (the shape of vLLM's entrypoints/openai protocol module)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .config import APIError

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise APIError(400, f"'{name}' must be a number, got {v!r}", param=name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise APIError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v!r}", param=name)
    return float(v)


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is supported
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise APIError(400, f"{where}: only text content parts are supported", param="messages")
            parts.append(p["text"])
        return "".join(parts)
    raise APIError(400, f"{where}: 'content' must be a string or a list of text parts", param="messages")


def _parse_messages(body: dict) -> tuple[str, list[dict]]:
    msgs = body.get("messages")
    if msgs is None:
        raise APIError(400, "'messages' is required: a list of {\"role\", \"content\"} objects", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object", param="messages")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}]: role must be system, user or assistant, got {role!r}",
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
    return [s for s in stop if s]


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
    return prompt


def parse_generation(body: dict, chat: bool, max_tokens_limit: int) -> GenerationParams:
    """Check a generation request body; raises :class:`APIError` (400) naming the field at fault."""
    if chat:
        prompt, history = _parse_messages(body)
    else:
        prompt, history = _completion_prompt(body), None
    n = body.get("n", 1)
    if n not in (1, None):
        raise APIError(400, "only n=1 is supported", param="n")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(key)
    if max_tokens is not None:
        if not _is_int(max_tokens) or max_tokens < 1:
            raise APIError(400, f"'{key}' must be a positive integer, got {max_tokens!r}", param=key)
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"'{key}' is {max_tokens}, over this server's limit of {max_tokens_limit}", param=key)
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)  # default greedy (OpenAI: 1)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}", param="seed")
    stop = _parse_stop(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    return GenerationParams(chat=chat, prompt=prompt, history=history, model=body.get("model"),
                            adapters=body.get("adapters"), max_tokens=max_tokens, temperature=temperature,
                            top_p=top_p, seed=seed, stop=stop, stream=stream,
                            include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")),
                            return_token_ids=body.get("return_token_ids") is True)


# ---------------------------------------------------------------- responses

class ResponseWriter:
    """The response objects of one request: the whole completion, or its stream chunks (SSE lines)."""

    def __init__(self, params: GenerationParams, request_id: str, created: int, model_id: str, routing: dict):
        self.params = params
        self.id = ("chatcmpl-" if params.chat else "cmpl-") + request_id[:24]
        self.created, self.model_id, self.routing = created, model_id, routing

    @staticmethod
    def usage(done: dict) -> dict:
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

    def completion(self, done: dict, prompt_ids: list[int]) -> dict:
        """The non-streaming response for the scheduler's "done" payload."""
        if self.params.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done["text"]},
                      "logprobs": None, "finish_reason": done["finish_reason"]}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": done["text"], "logprobs": None, "finish_reason": done["finish_reason"]}
            obj = "text_completion"
        if self.params.return_token_ids:  # extension (as in vLLM): the prompt's and the completion's token ids
            choice["token_ids"] = done["token_ids"]
            choice["prompt_token_ids"] = list(prompt_ids)
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": [choice],
                "usage": self.usage(done), "routing": self.routing, "system_fingerprint": None}

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.params.chat else "text_completion"

    def chunk(self, text: str | None, finish=None, first=False) -> str:
        if self.params.chat:
            delta = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        c = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model_id,
             "choices": [choice], "routing": self.routing}
        if self.params.include_usage:
            c["usage"] = None
        return "data: " + json.dumps(c, ensure_ascii=False) + "\n\n"

    def usage_chunk(self, done: dict) -> str:
        u = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model_id,
             "choices": [], "usage": self.usage(done), "routing": self.routing}
        return "data: " + json.dumps(u) + "\n\n"

    @staticmethod
    def error_chunk(err: APIError) -> str:
        return "data: " + json.dumps(err.body()) + "\n\n"
