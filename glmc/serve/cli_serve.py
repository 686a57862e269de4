"""`glmc serve BUILD_OR_CHECKPOINT`: load a model, put a Scheduler on it and serve the HTTP app with uvicorn."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Serve a build (or a checkpoint, default: the shipped model) over an OpenAI-compatible HTTP API, with a chat page
at http://HOST:PORT/ .

One scheduler thread owns the model and batches requests in flight: a request joins the running decode batch as
soon as its prompt is prefilled and leaves when it finishes, each at its own length, up to the build's
limits.max_batch rows (--max-batch lowers it). Beyond that, up to --max-queue requests wait; more are refused with
503 and a Retry-After header. ONNX Runtime builds (a GroupQueryAttention cache) and the torch backend batch in
flight; other backends run one request at a time (GET /metrics and /health say which).

examples:
  glmc compile compile_configs/glmc-tiny-int8.yaml && glmc serve build/glmc-tiny-int8 --port 8000
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "glmc-tiny-int8", "messages": [{"role": "user", "content": "What does len do?"}]}'
  python -c 'import openai; c = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-"); \\
             print(c.completions.create(model="glmc-tiny-int8", prompt="def main(", max_tokens=20).choices[0].text)'

endpoints: POST /v1/chat/completions, POST /v1/completions (stream: true for server-sent events), GET /v1/models,
GET /health, GET /metrics (Prometheus text), GET / (the chat page). Request fields: messages | prompt,
max_tokens, temperature (default 1; 0 = greedy), top_p, seed, stop, stream, n (1).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = DESCRIPTION
    p.add_argument("build", nargs="?", default=None, metavar="BUILD_OR_CHECKPOINT",
                   help="a glmc build directory, a lowered model directory or a checkpoint (default: the shipped "
                        "model, on torch)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto: CUDA when available)")
    p.add_argument("--backend", choices=("auto", "torch", "onnxruntime", "tensorrt"), default="auto",
                   help="auto: TensorRT on a GPU that runs the engine, else ONNX Runtime, else torch")
    p.add_argument("--target", default=None, help="which ONNX lowering ONNX Runtime runs (default: onnxruntime)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="rows decoded together (<= the build's limits.max_batch; 1 = one request at a time)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row (default: 64); "
                                                             "more get 503 with Retry-After")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for ONNX Runtime (0: its default)")
    p.add_argument("--name", default=None, help="the model id clients name (default: the build directory's name)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def open_server(path: str | Path | None = None, backend: str = "auto", device: str = "auto",
                target: str | None = None, max_batch: int | None = None, max_queue: int = 64, threads: int = 0,
                name: str | None = None) -> tuple[Any, Any]:
    """(Starlette app, Scheduler) for a path; the app starts the scheduler when it starts."""
    from glmc.api import load
    from glmc.runtime.chat_format import stop_ids
    from glmc.serve.app import make_app
    from glmc.serve.protocol import Limits
    from glmc.serve.scheduler import Scheduler
    from glmc.serve.slots import make_rows

    if max_queue < 0:
        from glmc.errors import GlmcError
        raise GlmcError(f"--max-queue {max_queue}: expected 0 or more")
    model = load(path, backend=backend, device=device, target=target, max_batch=max_batch, threads=threads)
    be = model.backend
    limits = Limits(max_input_length=int(getattr(be, "max_input_length", be.max_length)),
                    max_sequence_length=int(be.max_length))
    rows = make_rows(be, max_batch)
    scheduler = Scheduler(rows, stop_ids(model.tokenizer), max_queue=max_queue)
    app = make_app(model, scheduler, name or Path(model.path).name, limits)
    return app, scheduler


def run(args: argparse.Namespace) -> int:
    import uvicorn

    app, scheduler = open_server(args.build, args.backend, args.device, args.target, args.max_batch,
                                 args.max_queue, args.threads, args.name)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("glmc.serve").info("batching: %s; http://%s:%d/", scheduler.batching, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
