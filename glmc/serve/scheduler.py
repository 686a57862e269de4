"""The one thread that owns the backend: admits queued requests into free rows, decodes all rows in one step.

In-flight batching: each loop iteration first prefills waiting requests into free rows (each alone: its first
token comes out at once), then advances every occupied row by one token in a single forward. A request leaves
its row as soon as it finishes (stop token, stop string, max_tokens, the context's end) or is cancelled (the
client went away), so the next waiting request takes the row at the next iteration. The queue is bounded:
`submit` refuses with QueueFull beyond `capacity + max_queue` requests. Events go back to the HTTP side through
each request's asyncio loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time

import torch

from glmc.runtime.generate import SamplingConfig, sample
from glmc.serve.metrics import Metrics
from glmc.serve.slots import Rows
from glmc.serve.text import TextOut

log = logging.getLogger("glmc.serve")


class QueueFull(Exception):
    """No row free and the queue is at its bound."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is at capacity; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclasses.dataclass(eq=False)  # compared by identity
class Request:
    """One generation: what to run, and the events (text deltas, then the end) for whoever waits on it."""

    ids: list[int]
    cfg: SamplingConfig  # max_new_tokens already cut to the context's room
    text: TextOut
    loop: asyncio.AbstractEventLoop
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    cancelled: bool = False
    slot: int | None = None
    last: int = 0
    generator: torch.Generator | None = None
    events: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # ("delta", text) | ("end", reason)
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def _push(self, kind: str, value: str) -> None:  # on the event loop's thread
        self.events.append((kind, value))
        self.changed.set()

    def send(self, kind: str, value: str) -> None:  # from the scheduler thread
        try:
            self.loop.call_soon_threadsafe(self._push, kind, value)
        except RuntimeError:  # the loop has closed: nobody waits any more
            self.cancelled = True

    async def next_events(self, timeout: float | None = None) -> list[tuple[str, str]]:
        """The events so far (waiting up to `timeout` for one); [] on timeout."""
        if not self.events:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout)
            except TimeoutError:
                return []
        self.changed.clear()
        out, self.events = self.events, []
        return out


class Scheduler:
    def __init__(self, rows: Rows, stop_ids: list[int], max_queue: int = 64, metrics: Metrics | None = None):
        self.rows = rows
        self.stop_ids = set(stop_ids)
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.capacity = rows.capacity
        self.batching = rows.note or f"inflight (up to {rows.capacity} rows)"
        self._pending: collections.deque[Request] = collections.deque()
        self._active: dict[int, Request] = {}  # slot -> request
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.05  # running mean of one loop iteration, for Retry-After

    # ----------------------------------------------------------------------------------- the HTTP side

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="glmc-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, req: Request) -> None:
        with self._cv:
            if len(self._pending) + len(self._active) >= self.capacity + self.max_queue:
                self.metrics.finished("rejected")
                waiting = len(self._pending) + 1
                raise QueueFull(max(1, round(waiting / self.capacity * req.cfg.max_new_tokens * self._step_seconds)))
            self._pending.append(req)
            self._cv.notify()

    def cancel(self, req: Request) -> None:
        """The client went away: a queued request leaves the queue now, a running one frees its row before the next
        decode step."""
        if req.finish_reason is None:
            req.cancelled = True
            with self._cv:
                if req in self._pending:  # not admitted yet: no row, nothing on the scheduler thread to undo
                    self._pending.remove(req)
                    self._end(req, "cancelled")
                self._cv.notify()

    # ----------------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._pending and not self._active:
                    self._cv.wait()
                if self._stopping:
                    break
                admit: list[Request] = []
                while self._pending and len(self._active) + len(admit) < self.capacity:
                    admit.append(self._pending.popleft())
            t0 = time.perf_counter()
            try:
                for req in [r for r in admit if r.cancelled]:
                    self._end(req, "cancelled")
                self._prefill([r for r in admit if not r.cancelled])
                for req in [r for r in self._active.values() if r.cancelled]:
                    self._end(req, "cancelled")
                if self._active:
                    self._decode()
            except Exception as e:
                log.exception("generation failed")
                for req in list(self._active.values()) + [r for r in admit if r.finish_reason is None]:
                    req.error = f"{type(e).__name__}: {e}"
                    self._end(req, "error")
            self._step_seconds = 0.9 * self._step_seconds + 0.1 * (time.perf_counter() - t0)
        for req in list(self._active.values()) + list(self._pending):
            req.error = "the server is shutting down"
            self._end(req, "error")

    def _prefill(self, reqs: list[Request]) -> None:
        """The admitted prompts into free rows (one forward where the rows allow it), each request's first token."""
        if not reqs:
            return
        for req in reqs:
            if req.cfg.seed is not None:
                req.generator = torch.Generator().manual_seed(req.cfg.seed)
            elif req.cfg.temperature > 0:
                req.generator = torch.Generator()
                req.generator.seed()
        added = self.rows.add_many([req.ids for req in reqs])
        for req, (slot, _) in zip(reqs, added, strict=True):
            req.slot = slot
            self._active[slot] = req
            self.metrics.prefill()
        for req, (_, logits) in zip(reqs, added, strict=True):
            self._take(req, logits)

    def _decode(self) -> None:
        tokens = {slot: req.last for slot, req in self._active.items()}
        logits = self.rows.step(tokens)
        self.metrics.step(len(tokens))
        for slot, req in list(self._active.items()):
            self._take(req, logits[slot])

    def _take(self, req: Request, logits: torch.Tensor) -> None:
        """Sample the row's next token, send its text, end the request when it is done."""
        token = int(sample(logits[None], req.cfg, _NO_HISTORY, req.generator)[0])
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
            self.metrics.first_token(req.first_token_at - req.arrived)
        if token in self.stop_ids:
            self._end(req, "stop")
            return
        req.completion_tokens += 1
        req.last = token
        piece = req.text.push(token)
        if piece:
            req.send("delta", piece)
        if req.text.stopped:
            self._end(req, "stop")
        elif req.completion_tokens >= req.cfg.max_new_tokens:
            self._end(req, "length")

    def _end(self, req: Request, reason: str) -> None:
        if req.slot is not None and req.slot in self._active:
            del self._active[req.slot]
            try:
                self.rows.remove(req.slot)
            except Exception:  # after a failed step the rows may be inconsistent: the request still ends
                log.exception("freeing slot %s failed", req.slot)
        if reason in ("stop", "length"):
            tail = req.text.finish()
            if tail:
                req.send("delta", tail)
        req.finish_reason = reason
        self.metrics.finished(reason, len(req.ids), req.completion_tokens)
        req.send("end", reason)


_NO_HISTORY = torch.empty(1, 0, dtype=torch.int64)  # sample() reads the history only for a repetition penalty

