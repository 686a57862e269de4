"""The HTTP application (Starlette): OpenAI's /v1 routes, health, metrics and the chat page over one Scheduler.

    app = make_app(model, scheduler, model_id="glmc-tiny-int8")   # then uvicorn.run(app, ...)

Routes: POST /v1/chat/completions and /v1/completions (a whole JSON answer, or server-sent events ending with
`data: [DONE]` when `stream` is true), GET /v1/models, /health, /metrics (Prometheus text) and / (the chat page,
package data). A streamed request whose client disconnects is cancelled at once (its row is freed before the next
decode step); a whole one is cancelled when the server sees the disconnect (checked every 0.25 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from glmc.errors import GlmcError
from glmc.runtime.generate import SamplingConfig
from glmc.serve.protocol import ApiError, Job, Limits, check_length, from_glmc, parse
from glmc.serve.scheduler import QueueFull, Request, Scheduler
from glmc.serve.text import TextOut


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def make_app(model: Any, scheduler: Scheduler, model_id: str, limits: Limits) -> Starlette:
    """`model`: a glmc.api.Model (its tokenizer makes the prompts); `scheduler` owns its backend."""
    created = int(time.time())

    def prompt_ids(job: Job) -> list[int]:
        param = "messages" if job.chat else "prompt"
        try:
            ids = model.prompt_ids(job.prompt, chat=job.chat)
        except GlmcError as e:
            raise from_glmc(e, param) from None
        check_length(len(ids), limits, param)
        bad = [t for t in ids if t >= model.tokenizer.vocab_size] if isinstance(job.prompt, list) and not job.chat \
            else []
        if bad:
            raise ApiError(400, f"'prompt': token id {bad[0]} is outside the vocabulary of "
                                f"{model.tokenizer.vocab_size}", param="prompt", code="invalid_value")
        return ids

    async def completions(http: HttpRequest, kind: str) -> Response:
        try:
            try:
                body = await http.json()
            except ValueError as e:
                raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
            job = parse(body, kind)
            if body.get("model") not in (None, model_id):
                raise ApiError(404, f"model '{body.get('model')}' is not served here; this server serves "
                                    f"'{model_id}' (GET /v1/models)", param="model", code="model_not_found")
            ids = prompt_ids(job)
            room = limits.max_sequence_length - len(ids)
            cfg = SamplingConfig(max_new_tokens=min(job.max_tokens or room, room), temperature=job.temperature,
                                 top_p=job.top_p, seed=job.seed)
            req = Request(ids, cfg, TextOut(model.tokenizer, job.chat, job.stop), asyncio.get_running_loop())
            try:
                scheduler.submit(req)
            except QueueFull as e:
                raise ApiError(503, f"{e} ({scheduler.running} running, {scheduler.queued} queued, queue bound "
                                    f"{scheduler.max_queue})", code="server_overloaded", kind="server_error",
                               headers={"Retry-After": str(e.retry_after)}) from None
        except ApiError as e:
            return error_response(e)
        rid = ("chatcmpl-" if job.chat else "cmpl-") + uuid.uuid4().hex[:24]
        if job.stream:
            return StreamingResponse(_events(scheduler, req, job, rid, model_id, int(time.time())),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _whole(http, scheduler, req, job, rid, model_id)

    async def chat_completions(http: HttpRequest) -> Response:
        return await completions(http, "chat")

    async def text_completions(http: HttpRequest) -> Response:
        return await completions(http, "completion")

    async def models(_: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                                           "owned_by": "glmc"}]})

    async def health(_: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "backend": getattr(model.backend, "name", "?"),
                             "batching": scheduler.batching, "running": scheduler.running,
                             "queued": scheduler.queued, **dataclasses.asdict(limits)})

    async def metrics(_: HttpRequest) -> Response:
        text = scheduler.metrics.render(scheduler.running, scheduler.queued, scheduler.capacity,
                                        scheduler.max_queue, scheduler.batching)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    page = resources.files("glmc.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    async def index(_: HttpRequest) -> Response:
        return HTMLResponse(page)

    async def not_found(http: HttpRequest, exc: Exception) -> Response:
        return error_response(ApiError(404, f"no route {http.method} {http.url.path} (see GET /v1/models, POST "
                                            "/v1/chat/completions, /v1/completions)", code="not_found"))

    async def method_not_allowed(http: HttpRequest, exc: Exception) -> Response:
        return error_response(ApiError(405, f"{http.method} is not allowed on {http.url.path}",
                                       code="method_not_allowed"))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", text_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]), Route("/", index, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: method_not_allowed})


def _usage(req: Request) -> dict:
    return {"prompt_tokens": len(req.ids), "completion_tokens": req.completion_tokens,
            "total_tokens": len(req.ids) + req.completion_tokens}


def _failed(req: Request) -> ApiError:
    return ApiError(500, f"generation failed: {req.error}", code="generation_failed", kind="server_error")


async def _whole(http: HttpRequest, scheduler: Scheduler, req: Request, job: Job, rid: str, model_id: str
                 ) -> Response:
    text, reason = [], None
    try:
        while reason is None:
            for kind, value in await req.next_events(timeout=0.25):
                if kind == "delta":
                    text.append(value)
                else:
                    reason = value
            if reason is None and await http.is_disconnected():
                scheduler.cancel(req)
                return Response(status_code=499)
    finally:
        scheduler.cancel(req)
    if reason == "error":
        return error_response(_failed(req))
    content = "".join(text)
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                               "finish_reason": reason} if job.chat else
                              {"index": 0, "text": content, "logprobs": None, "finish_reason": reason})
    return JSONResponse({"id": rid, "object": "chat.completion" if job.chat else "text_completion",
                         "created": int(time.time()), "model": model_id, "choices": [choice], "usage": _usage(req)})


async def _events(scheduler: Scheduler, req: Request, job: Job, rid: str, model_id: str, created: int
                  ) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if job.chat else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> str:
        if job.chat:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            if role:
                d["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [choice]}
        if job.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        if job.chat:
            yield chunk("", role=True)
        reason = None
        while reason is None:
            for kind, value in await req.next_events():
                if kind == "delta":
                    yield chunk(value)
                else:
                    reason = value
        if reason == "error":
            yield f"data: {json.dumps(_failed(req).body())}\n\n"
        else:
            yield chunk(None, reason)
            if job.include_usage:
                last = {"id": rid, "object": obj, "created": created, "model": model_id, "choices": [],
                        "usage": _usage(req)}
                yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # a disconnect cancels this generator: free the row now
        scheduler.cancel(req)
