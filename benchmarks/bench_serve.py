"""Load test of `glmc serve`: concurrent streaming clients, random arrivals, mixed prompts; docs/serve.md's table.

    python benchmarks/bench_serve.py build/glmc-tiny-int8-b16 --clients 1 8 32 --requests 48

For each client count it starts `glmc serve` (a subprocess) twice: with in-flight batching (the build's max_batch
rows) and with `--max-batch 1` (one request at a time, the same requests queued). Each client sends requests one
after another, waiting an exponential think time (mean --think seconds) before each, so requests arrive at random
times; prompts are drawn from texts of 2-30 words and ask for 16-96 tokens (greedy, so every run generates the same
tokens). Streaming with usage: time to first token (TTFT) is the first content chunk, time per output token (TPOT)
is (last chunk - first chunk) / (tokens - 1).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2

TEXT = ("the os module provides a portable way of using operating system dependent functionality return the "
         "path of a file join one or more path components intelligently raise an error if the value is not "
         "valid read the whole file and return its contents as a string")
WORDS = TEXT.split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(build: str, max_batch: int | None, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "glmc.cli", "serve", build, "--port", str(port), "--log-level", "warning",
           "--max-queue", "256", "--device", "cpu"]
    if max_batch:
        cmd += ["--max-batch", str(max_batch)]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            httpx2.get(url + "/health")
            return proc, url
        except httpx2.TransportError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"glmc serve did not start: {' '.join(cmd)}") from None
            time.sleep(0.2)


def one_request(http: httpx2.Client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with http.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()!r:.200}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                first = first or now
                last = now
    end = time.perf_counter()
    first = first or end
    return {"ttft": first - t0, "tpot": ((last or first) - first) / max(tokens - 1, 1), "tokens": tokens,
            "start": t0, "end": end}


def run_load(url: str, model: str, clients: int, requests: int, think: float, seed: int) -> dict:
    rng = random.Random(seed)
    jobs = [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))), rng.randint(16, 96))
            for _ in range(requests)]
    per_client = [jobs[i::clients] for i in range(clients)]
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        r = random.Random(seed * 1000 + i)
        http = httpx2.Client()  # one keep-alive connection per client, as an SDK client holds
        for prompt, max_tokens in per_client[i]:
            time.sleep(r.expovariate(1 / think) if think > 0 else 0)
            res = one_request(http, url, model, prompt, max_tokens)
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    before = decode_steps(url)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results)
    tpot = sorted(r["tpot"] for r in results if r["tokens"] > 1)
    after = decode_steps(url)
    steps = {k: v - before.get(k, 0.0) for k, v in after.items()}
    mean_rows = sum(k * v for k, v in steps.items()) / max(sum(steps.values()), 1)
    return {"clients": clients, "requests": len(results), "wall_s": wall, "req_s": len(results) / wall,
            "tok_s": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "tpot_p50": pct(tpot, 50),
            "tpot_p99": pct(tpot, 99), "mean_rows": mean_rows}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(url: str, model: str, pid: int, total: int, clients: int, seed: int) -> dict:
    """`total` streaming requests from `clients` clients, 10% of them hanging up after a few chunks: counts the
    server errors, and samples the server's resident memory every 100 requests."""
    rng = random.Random(seed)
    jobs = [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))), rng.randint(8, 48),
             rng.random() < 0.1) for _ in range(total)]
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "errors": 0, "disconnected": 0, "ok": 0}
    why: collections.Counter[str] = collections.Counter()
    rss: list[float] = []

    def client() -> None:
        http = httpx2.Client()
        while True:
            with lock:
                if state["next"] >= total:
                    return
                prompt, max_tokens, hang_up = jobs[state["next"]]
                state["next"] += 1
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                    "stream": True}
            try:
                with http.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}")
                    for n, _ in enumerate(r.iter_lines()):
                        if hang_up and n >= 4:
                            break
                key = "disconnected" if hang_up else "ok"
            except (RuntimeError, httpx2.HTTPError) as e:
                key = "errors"
                with lock:
                    why[f"{type(e).__name__}: {e}"[:120]] += 1
            with lock:
                state[key] += 1
                state["done"] += 1
                if state["done"] % 100 == 0:
                    rss.append(rss_mib(pid))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(0.5)
    text = httpx2.get(url + "/metrics").text
    running = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("glmc_requests_running "))
    settled = rss[len(rss) // 4] if rss else float("nan")  # after the first quarter: warmed up
    return {**state, "wall_s": wall, "running_after": running, "rss_settled_mib": settled,
            "rss_end_mib": rss_mib(pid), "rss_max_mib": max(rss, default=float("nan")),
            "rss_samples": [round(x, 1) for x in rss], "error_kinds": dict(why)}


def decode_steps(url: str) -> dict[int, float]:
    """rows -> decode steps so far, from /metrics."""
    text = httpx2.get(url + "/metrics").text
    return {int(line.split('"')[1]): float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("glmc_decode_steps_total{")}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", help="a glmc build directory (its limits.max_batch bounds the in-flight batch)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=48, help="requests per client count (default: 48)")
    ap.add_argument("--think", type=float, default=0.2, help="mean seconds a client waits before each request")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime CPU threads (0: its default)")
    ap.add_argument("--modes", nargs="+", default=["inflight", "one-at-a-time"],
                    choices=["inflight", "one-at-a-time"])
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--soak", type=int, default=0, metavar="N",
                    help="instead: N requests from 16 clients, 10%% hanging up mid-stream; server errors, rows left "
                         "taken, resident memory")
    args = ap.parse_args()
    if args.soak:
        proc, url = start_server(args.build, None, args.threads)
        try:
            model = httpx2.get(url + "/v1/models").json()["data"][0]["id"]
            result = soak(url, model, proc.pid, args.soak, 16, args.seed)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(json.dumps(result, indent=1))
        growth = result["rss_end_mib"] / result["rss_settled_mib"] - 1
        print(f"\n`python {' '.join(sys.argv)}`, {time.strftime('%Y-%m-%d')}: {args.soak} requests in "
              f"{result['wall_s']:.0f} s, {result['disconnected']} hung up mid-stream, {result['errors']} errors, "
              f"{result['running_after']:.0f} rows taken afterwards, resident memory {result['rss_settled_mib']:.0f} "
              f"MiB settled -> {result['rss_end_mib']:.0f} MiB at the end ({growth:+.1%})")
        return 0 if result["errors"] == 0 and result["running_after"] == 0 and abs(growth) <= 0.10 else 1
    rows = []
    for mode in args.modes:
        proc, url = start_server(args.build, 1 if mode == "one-at-a-time" else None, args.threads)
        try:
            model = httpx2.get(url + "/v1/models").json()["data"][0]["id"]
            health = httpx2.get(url + "/health").json()
            one_request(httpx2.Client(), url, model, "warm up", 8)
            for clients in args.clients:
                row = run_load(url, model, clients, max(args.requests, clients), args.think, args.seed)
                row.update(mode=mode, batching=health["batching"])
                rows.append(row)
                print(f"{mode:14s} {clients:3d} clients: {row['req_s']:.2f} req/s {row['tok_s']:.1f} tok/s "
                      f"TTFT p50 {row['ttft_p50'] * 1e3:.0f} ms p99 {row['ttft_p99'] * 1e3:.0f} ms", file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\n`python {' '.join(sys.argv)}` on {platform.node()} ({platform.processor() or platform.machine()}, "
          f"{_cpus()} CPUs), {time.strftime('%Y-%m-%d')}\n")
    print("| mode | clients | requests | req/s | output tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 "
          "| rows/step |")
    print("| --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |")
    for r in rows:
        print(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
              f"{r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p99'] * 1e3:.0f} ms | {r['tpot_p50'] * 1e3:.1f} ms | "
              f"{r['tpot_p99'] * 1e3:.1f} ms | {r['mean_rows']:.2f} |")
    base = {r["mode"]: r for r in rows if r["clients"] == 1}
    for r in rows:
        if r["mode"] == "inflight" and r["clients"] > 1 and "inflight" in base:
            b = base["inflight"]
            print(f"\ninflight, {r['clients']} clients: output tok/s {r['tok_s'] / b['tok_s']:.1f}x one client's; "
                  f"TTFT p99 {r['ttft_p99'] * 1e3:.0f} ms vs one client's p50 {b['ttft_p50'] * 1e3:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _cpus() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
