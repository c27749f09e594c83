"""The load generator of `dlp-lora bench serve`, in the manner of `vllm bench serve` (vllm/benchmarks/serve.py).

* a **workload** (:func:`build_workload`) of test prompts drawn round robin over the tasks, each a routed request
  (``"model": "dlp-lora"``), a pinned adapter (``"model": "<adapter>"``) or a weighted mix (``"adapters"``), a chat
  turn or a completion, streamed or not (shares: :data:`KIND_SHARES`, :data:`CHAT_SHARE`, :data:`STREAM_SHARE`);
* the **request bodies**: ours (:func:`request_body`) and llama-server's, where a set of adapters becomes
  per-request LoRA scales (``"lora": [{"id", "scale"}]``, :func:`lora_scales`);
* the **client** (:func:`drive`): asyncio + httpx against any OpenAI-compatible base URL; arrivals all at once
  (``request_rate`` inf) or a Poisson process (gamma intervals with ``burstiness`` != 1), at most
  ``max_concurrency`` requests in flight;
* the **metrics** (:func:`summarize`), as vLLM defines them: TTFT (request sent -> first text), ITL (between two
  chunks of text), TPOT ((E2EL - TTFT) / (output tokens - 1)), E2EL (request sent -> the whole response); TTFT,
  ITL and TPOT from the streamed requests, E2EL from all; output tokens/s and requests/s over the run's duration;
* a **server under test** in a subprocess (:class:`ServerProcess`): started, waited for (``GET /health``), stopped
  at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DLPLoRAError

ROUTED, PINNED, MIX = "routed", "pinned", "mix"
KIND_SHARES = ((ROUTED, 0.4), (PINNED, 0.3), (MIX, 0.3))  # of the requests
CHAT_SHARE = 0.75  # the rest are completions (the prompt as is, no chat template)
STREAM_SHARE = 0.5  # streamed requests give TTFT, ITL and TPOT
PERCENTILES = (50, 90, 99)


# ---------------------------------------------------------------- the workload

@dataclass
class Item:
    """One request of the workload: a prompt of `task`, its adapter choice (None: routed by the server), and how
    it is sent."""

    index: int
    task: str
    prompt: str
    kind: str  # ROUTED, PINNED or MIX
    adapters: dict[str, float] | None
    chat: bool
    stream: bool


def build_workload(prompts_by_task: dict[str, list[str]], names: list[str], n: int, seed: int = 0,
                   routed: bool = True) -> list[Item]:
    """`n` requests, their tasks round robin over `prompts_by_task` (each task's prompts drawn without replacement
    while they last), then shuffled. A pinned request names its task's adapter (another one when the library has
    none of that name); a mix weighs it with one or two other adapters at random weights. `routed=False` (a library
    without a plugin): no routed requests."""
    if not prompts_by_task or not names:
        raise DLPLoRAError("the workload needs prompts and at least one adapter")
    rng = random.Random(seed)
    tasks = sorted(t for t, p in prompts_by_task.items() if p)
    pools = {t: rng.sample(prompts_by_task[t], len(prompts_by_task[t])) for t in tasks}
    kinds, shares = zip(*[(k, s) for k, s in KIND_SHARES if routed or k != ROUTED])
    items = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        prompt = pools[task][(i // len(tasks)) % len(pools[task])]
        kind = rng.choices(kinds, weights=shares)[0]
        own = task if task in names else rng.choice(names)
        adapters = None
        if kind == PINNED:
            adapters = {own: 1.0}
        elif kind == MIX:
            others = rng.sample([x for x in names if x != own], min(rng.choice((1, 2)), len(names) - 1))
            raw = [rng.uniform(0.2, 1.0) for _ in range(1 + len(others))]
            adapters = {a: round(w / sum(raw), 3) for a, w in zip([own] + others, raw)}
        items.append(Item(i, task, prompt, kind, adapters, chat=rng.random() < CHAT_SHARE,
                          stream=rng.random() < STREAM_SHARE))
    rng.shuffle(items)
    for i, it in enumerate(items):
        it.index = i
    return items


def _base_body(item: Item, max_tokens: int) -> tuple[str, dict]:
    body: dict = {"max_tokens": max_tokens, "temperature": 0, "stream": item.stream}
    if item.stream:
        body["stream_options"] = {"include_usage": True}
    if item.chat:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": item.prompt}]}
    return "/v1/completions", body | {"prompt": item.prompt}


def request_body(item: Item, max_tokens: int) -> tuple[str, dict]:
    """(path, body) of `item` for our server: routed (``"model": "dlp-lora"``), pinned or a mix."""
    path, body = _base_body(item, max_tokens)
    if item.kind == PINNED:
        body["model"] = next(iter(item.adapters))
    else:
        body["model"] = "dlp-lora"
        if item.kind == MIX:
            body["adapters"] = dict(item.adapters)
    return path, body


def lora_scales(adapters: dict[str, float], ids: dict[str, int]) -> list[dict]:
    """A weighted set of adapters as llama-server's per-request ``lora`` field: adapter i (the i-th ``--lora`` of
    the server) at its weight; the adapters left out stay at scale 0 (``--lora-init-without-apply``)."""
    missing = [n for n in adapters if n not in ids]
    if missing:
        raise DLPLoRAError(f"llama-server holds no LoRA for {', '.join(missing)}")
    return [{"id": ids[n], "scale": float(w)} for n, w in sorted(adapters.items(), key=lambda kv: ids[kv[0]]) if w > 0]


def llama_body(item: Item, max_tokens: int, adapters: dict[str, float], ids: dict[str, int]) -> tuple[str, dict]:
    """(path, body) of `item` for llama-server: `adapters` (the item's set, or for a routed item the set our router
    chose) as per-request LoRA scales."""
    path, body = _base_body(item, max_tokens)
    return path, body | {"model": "base", "lora": lora_scales(adapters, ids)}


# ---------------------------------------------------------------- the client

@dataclass
class Outcome:
    """What one request got: its text, output tokens, timings (seconds) and, from our server, the routing."""

    index: int
    ok: bool = False
    error: str | None = None
    text: str = ""
    output_tokens: int = 0
    prompt_tokens: int = 0
    latency: float = 0.0  # E2EL
    ttft: float | None = None  # streamed requests only
    itl: list[float] = field(default_factory=list)
    routing: dict | None = None


def _text_of(choice: dict, chat: bool, stream: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    part = choice.get("delta" if stream else "message") or {}
    return part.get("content") or ""


async def send(client, path: str, body: dict, index: int) -> Outcome:
    """Send one request and time it (streamed: the arrival of every chunk that carries text)."""
    chat = path.endswith("chat/completions")
    out = Outcome(index)
    t0 = time.perf_counter()
    try:
        if not body.get("stream"):
            r = await client.post(path, json=body)
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {r.text[:300]}"
                return out
            data = r.json()
            out.text = _text_of(data["choices"][0], chat, False)
            usage = data.get("usage") or {}
            out.output_tokens, out.prompt_tokens = usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0)
            out.routing = data.get("routing")
        else:
            async with client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    out.error = f"HTTP {r.status_code}: {r.text[:300]}"
                    return out
                parts, chunks, last, usage = [], 0, t0, None
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        raise RuntimeError(f"error in the stream: {str(chunk['error'])[:300]}")
                    usage = chunk.get("usage") or usage
                    out.routing = chunk.get("routing") or out.routing
                    text = _text_of(chunk["choices"][0], chat, True) if chunk.get("choices") else ""
                    if text:
                        now = time.perf_counter()
                        if out.ttft is None:
                            out.ttft = now - t0
                        else:
                            out.itl.append(now - last)
                        last = now
                        parts.append(text)
                        chunks += 1
                out.text = "".join(parts)
                out.output_tokens = (usage or {}).get("completion_tokens", chunks)
                out.prompt_tokens = (usage or {}).get("prompt_tokens", 0)
        out.ok = True
    except Exception as exc:  # a dropped connection, a timeout, a broken stream: a failed request
        out.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        out.latency = time.perf_counter() - t0
    return out


async def _drive(base_url, requests, max_concurrency, request_rate, burstiness, seed, api_key, timeout):
    import httpx
    import numpy as np

    rng = np.random.default_rng(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    n_conn = (max_concurrency or len(requests)) + 4
    limits = httpx.Limits(max_connections=n_conn, max_keepalive_connections=n_conn)

    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=headers, limits=limits) as client:
        async def one(i, path, body):
            if sem is None:
                return await send(client, path, body, i)
            async with sem:
                return await send(client, path, body, i)

        t0 = time.perf_counter()
        tasks = []
        for i, (path, body) in enumerate(requests):
            tasks.append(asyncio.create_task(one(i, path, body)))
            if math.isfinite(request_rate) and i + 1 < len(requests):
                # vLLM's arrivals: gamma intervals of mean 1 / rate (burstiness 1: a Poisson process)
                await asyncio.sleep(float(rng.gamma(burstiness, 1.0 / (request_rate * burstiness))))
        outcomes = await asyncio.gather(*tasks)
        return list(outcomes), time.perf_counter() - t0


def drive(base_url: str, requests: list[tuple[str, dict]], max_concurrency: int | None = None,
          request_rate: float = math.inf, burstiness: float = 1.0, seed: int = 0, api_key: str | None = None,
          timeout: float = 3600.0) -> tuple[list[Outcome], float]:
    """Send `requests` ((path, body) pairs) to `base_url`; returns (their outcomes in order, the run's seconds)."""
    return asyncio.run(_drive(base_url, requests, max_concurrency, request_rate, burstiness, seed, api_key, timeout))


# ---------------------------------------------------------------- metrics

def _stats(xs: list[float]) -> dict | None:
    import numpy as np

    if not xs:
        return None
    a = np.asarray(xs) * 1000.0
    return {"mean": round(float(a.mean()), 2)} | {f"p{q}": round(float(np.percentile(a, q)), 2) for q in PERCENTILES}


def summarize(outcomes: list[Outcome], duration: float) -> dict:
    """vLLM's serving metrics of one run: counts, throughput, and TTFT / TPOT / ITL / E2EL in milliseconds (mean,
    p50, p90, p99)."""
    ok = [o for o in outcomes if o.ok]
    streamed = [o for o in ok if o.ttft is not None]
    tokens = sum(o.output_tokens for o in ok)
    return {"requests": len(outcomes), "completed": len(ok), "failed": len(outcomes) - len(ok),
            "streamed": len(streamed), "duration_s": round(duration, 3), "output_tokens": tokens,
            "input_tokens": sum(o.prompt_tokens for o in ok),
            "output_tok_s": round(tokens / duration, 2) if duration > 0 else 0.0,
            "requests_per_s": round(len(ok) / duration, 3) if duration > 0 else 0.0,
            "ttft_ms": _stats([o.ttft for o in streamed]),
            "tpot_ms": _stats([(o.latency - o.ttft) / (o.output_tokens - 1) for o in streamed if o.output_tokens > 1]),
            "itl_ms": _stats([x for o in streamed for x in o.itl]),
            "e2el_ms": _stats([o.latency for o in ok]),
            "failed_examples": [{"index": o.index, "error": o.error} for o in outcomes if not o.ok][:3]}


# ---------------------------------------------------------------- the server under test

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server under test in a subprocess (its output in `log_path`): ``with ServerProcess(cmd, url, ...) as s``
    starts it and waits until ``GET url/health`` answers 200; leaving the block (also on an error or Ctrl-C) stops
    it (SIGTERM, then SIGKILL after `grace` seconds)."""

    def __init__(self, cmd: list[str], url: str, log_path: str | Path, name: str, timeout: float = 900.0,
                 env: dict | None = None, grace: float = 30.0):
        self.cmd, self.url, self.log_path, self.name = cmd, url, Path(log_path), name
        self.timeout, self.env, self.grace = timeout, env, grace
        self.proc: subprocess.Popen | None = None
        self.ready_s = 0.0

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __enter__(self) -> "ServerProcess":
        import httpx

        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
            except OSError as exc:
                raise DLPLoRAError(f"could not start {self.name} ({self.cmd[0]}): {exc}") from None
        try:
            while True:
                if self.proc.poll() is not None:
                    raise DLPLoRAError(f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                                       f"its log ({self.log_path}) ends:\n{self.log_tail()}")
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t0 > self.timeout:
                    raise DLPLoRAError(f"{self.name} was not ready after {self.timeout:.0f}s; its log ends:\n"
                                       f"{self.log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(self.grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def __exit__(self, *exc) -> None:
        self.stop()
