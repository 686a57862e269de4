"""`glmc serve`: an OpenAI-compatible HTTP server over one loaded model, with in-flight batching and a chat page.

The flow, bottom of the package: cli_serve (flags) -> app (HTTP routes, SSE) -> protocol (request fields, OpenAI
errors) -> scheduler (one thread owns the backend; requests join and leave the decode batch) -> slots (one request
per KV-cache row, each at its own length) -> glmc.runtime backends. text turns tokens into the streamed text (stop
strings), metrics renders the Prometheus page.
"""
