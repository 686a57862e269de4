"""Counters of the server's work, rendered as Prometheus text for GET /metrics."""

from __future__ import annotations

import threading
from collections import Counter

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Updated by the scheduler thread and the HTTP handlers; read by render()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # outcome -> count (stop, length, cancelled, rejected, error)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)  # per bucket (last: +Inf), not cumulative
        self.ttft_sum = 0.0
        self.decode_steps: Counter[int] = Counter()  # rows in the step -> steps
        self.prefills = 0

    def finished(self, outcome: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        with self._lock:
            self.requests[outcome] += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def first_token(self, seconds: float) -> None:
        with self._lock:
            i = next((i for i, b in enumerate(TTFT_BUCKETS) if seconds <= b), len(TTFT_BUCKETS))
            self.ttft[i] += 1
            self.ttft_sum += seconds

    def prefill(self) -> None:
        with self._lock:
            self.prefills += 1

    def step(self, rows: int) -> None:
        with self._lock:
            self.decode_steps[rows] += 1

    def render(self, running: int, queued: int, capacity: int, max_queue: int, batching: str) -> str:
        with self._lock:
            lines = [
                "# HELP glmc_requests_total Requests answered, by outcome (finish reason, cancelled, rejected).",
                "# TYPE glmc_requests_total counter"]
            for outcome in sorted(set(self.requests) | {"stop", "length", "cancelled", "rejected"}):
                lines.append(f'glmc_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')
            lines += [
                "# HELP glmc_requests_running Requests holding a row of the decode batch.",
                "# TYPE glmc_requests_running gauge", f"glmc_requests_running {running}",
                "# HELP glmc_requests_queued Requests waiting for a row.",
                "# TYPE glmc_requests_queued gauge", f"glmc_requests_queued {queued}",
                "# HELP glmc_batch_capacity Rows of the decode batch (the build's max_batch, or --max-batch).",
                "# TYPE glmc_batch_capacity gauge", f"glmc_batch_capacity {capacity}",
                "# HELP glmc_queue_capacity Requests that may wait; beyond it the server answers 503.",
                "# TYPE glmc_queue_capacity gauge", f"glmc_queue_capacity {max_queue}",
                "# HELP glmc_batching How requests share the backend (inflight, or one at a time and why).",
                "# TYPE glmc_batching gauge", f'glmc_batching{{mode="{_label(batching)}"}} 1',
                "# HELP glmc_prompt_tokens_total Prompt tokens of finished requests.",
                "# TYPE glmc_prompt_tokens_total counter", f"glmc_prompt_tokens_total {self.prompt_tokens}",
                "# HELP glmc_generation_tokens_total Tokens generated for finished requests.",
                "# TYPE glmc_generation_tokens_total counter",
                f"glmc_generation_tokens_total {self.completion_tokens}",
                "# HELP glmc_prefills_total Prompts prefilled into a row.",
                "# TYPE glmc_prefills_total counter", f"glmc_prefills_total {self.prefills}",
                "# HELP glmc_decode_steps_total Decode steps, by how many rows (requests) they advanced together.",
                "# TYPE glmc_decode_steps_total counter"]
            for rows in sorted(self.decode_steps):
                lines.append(f'glmc_decode_steps_total{{rows="{rows}"}} {self.decode_steps[rows]}')
            lines += ["# HELP glmc_time_to_first_token_seconds From a request's arrival to its first token.",
                      "# TYPE glmc_time_to_first_token_seconds histogram"]
            total = 0
            for bound, n in zip((*TTFT_BUCKETS, "+Inf"), self.ttft, strict=True):
                total += n
                lines.append(f'glmc_time_to_first_token_seconds_bucket{{le="{bound}"}} {total}')
            lines += [f"glmc_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"glmc_time_to_first_token_seconds_count {total}"]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
