"""The server's Prometheus metrics, rendered as text exposition (no client library needed)."""

from __future__ import annotations

import collections
import threading

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Counters rendered as Prometheus text exposition (no client library needed)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> n
        self.routed: collections.Counter = collections.Counter()  # adapter -> n
        self.sources: collections.Counter = collections.Counter()  # plugin / pinned / explicit -> n
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.cancelled = 0
        self.timeouts = 0
        self.batch_counts = [0] * (len(BATCH_BUCKETS) + 1)
        self.batch_sum = 0
        self.batch_n = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_n = 0
        self.queue_depth = 0
        self.running = 0
        self.engine_restarts = 0  # the engine process restarted after a crash (serve.engine_proc)

    @staticmethod
    def _bucket(buckets, value) -> int:
        for i, b in enumerate(buckets):
            if value <= b:
                return i
        return len(buckets)

    def observe_batch(self, size: int) -> None:
        with self.lock:
            self.batch_counts[self._bucket(BATCH_BUCKETS, size)] += 1
            self.batch_sum += size
            self.batch_n += 1

    def observe_latency(self, seconds: float) -> None:
        with self.lock:
            self.latency_counts[self._bucket(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds
            self.latency_n += 1

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, int(status))] += 1

    def count_routing(self, routing: dict) -> None:
        with self.lock:
            self.sources[routing["source"]] += 1
            for a in routing["adapters"]:
                self.routed[a["name"]] += 1

    def add_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def render(self, adapters: list[str]) -> str:
        def esc(s: str) -> str:
            return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        def hist(name, help_, buckets, counts, total, n):
            out = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
            acc = 0
            for b, c in zip(list(buckets) + ["+Inf"], counts):
                acc += c
                out.append(f'{name}_bucket{{le="{b}"}} {acc}')
            out += [f"{name}_sum {total}", f"{name}_count {n}"]
            return out

        with self.lock:
            lines = ["# HELP dlp_lora_requests_total HTTP requests by endpoint and status code.",
                     "# TYPE dlp_lora_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                lines.append(f'dlp_lora_requests_total{{endpoint="{esc(ep)}",status="{st}"}} {n}')
            lines += ["# HELP dlp_lora_generated_tokens_total Completion tokens generated.",
                      "# TYPE dlp_lora_generated_tokens_total counter",
                      f"dlp_lora_generated_tokens_total {self.generated_tokens}",
                      "# HELP dlp_lora_prompt_tokens_total Prompt tokens prefilled.",
                      "# TYPE dlp_lora_prompt_tokens_total counter",
                      f"dlp_lora_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP dlp_lora_cancelled_total Requests dropped because the client went away.",
                      "# TYPE dlp_lora_cancelled_total counter",
                      f"dlp_lora_cancelled_total {self.cancelled}",
                      "# HELP dlp_lora_timeouts_total Requests that ran past the request timeout.",
                      "# TYPE dlp_lora_timeouts_total counter",
                      f"dlp_lora_timeouts_total {self.timeouts}",
                      "# HELP dlp_lora_engine_restarts_total Engine processes restarted after a crash.",
                      "# TYPE dlp_lora_engine_restarts_total counter",
                      f"dlp_lora_engine_restarts_total {self.engine_restarts}"]
            lines += hist("dlp_lora_batch_size", "Rows in each decode step of the running batch.", BATCH_BUCKETS,
                          self.batch_counts, self.batch_sum, self.batch_n)
            lines += hist("dlp_lora_request_latency_seconds", "Time from arrival to the last token.",
                          LATENCY_BUCKETS, self.latency_counts, round(self.latency_sum, 6), self.latency_n)
            lines += ["# HELP dlp_lora_queue_depth Requests waiting to join the running batch.",
                      "# TYPE dlp_lora_queue_depth gauge", f"dlp_lora_queue_depth {self.queue_depth}",
                      "# HELP dlp_lora_running_requests Rows in the running batch.",
                      "# TYPE dlp_lora_running_requests gauge", f"dlp_lora_running_requests {self.running}",
                      "# HELP dlp_lora_adapter_routed_total Requests that used each adapter (any weight).",
                      "# TYPE dlp_lora_adapter_routed_total counter"]
            for name in adapters:
                lines.append(f'dlp_lora_adapter_routed_total{{adapter="{esc(name)}"}} {self.routed.get(name, 0)}')
            lines += ["# HELP dlp_lora_routing_source_total Requests by how their adapters were chosen.",
                      "# TYPE dlp_lora_routing_source_total counter"]
            for src in ("plugin", "pinned", "explicit"):
                lines.append(f'dlp_lora_routing_source_total{{source="{src}"}} {self.sources.get(src, 0)}')
        return "\n".join(lines) + "\n"


def sum_expositions(texts: list[str]) -> str:
    """The sum of Prometheus text expositions of the same metrics (the /metrics of several Ray Serve replicas):
    samples with the same name and labels add up (counters, histogram buckets, sums and counts, and the queue depth
    and running gauges, which become totals over the replicas). Each family keeps its HELP / TYPE lines and its
    samples together, in the order they first appear."""
    families: dict[str, tuple[list[str], dict[str, float]]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                comments, _ = families.setdefault(family, ([], {}))
                if line not in comments:
                    comments.append(line)
                continue
            key, _, value = line.rpartition(" ")
            _, samples = families.setdefault(family, ([], {}))
            samples[key] = samples.get(key, 0.0) + float(value)
    out = []
    for comments, samples in families.values():
        out += comments
        out += [f"{k} {int(v) if float(v).is_integer() else round(v, 6)}" for k, v in samples.items()]
    return "\n".join(out) + "\n"
