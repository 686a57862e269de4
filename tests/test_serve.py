"""`glmc serve` over real HTTP on 127.0.0.1: the openai client, errors, in-flight batching, disconnects, the page."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import httpx2
import openai
import pytest
import torch

import glmc
from glmc.runtime.generate import SamplingConfig, generate
from glmc.serve.cli_serve import open_server
from glmc.serve.slots import OrtRows, TorchRows, make_rows

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does os.path.join do?"}]


@pytest.fixture(scope="session")
def serve_build(tmp_path_factory):
    """The shipped model at int8 for ONNX Runtime only, 4 rows (limits: prompt 64, sequence 256)."""
    from glmc.cli import main
    tmp = tmp_path_factory.mktemp("serve")
    rc = main(["compile", "compile_configs/glmc-tiny-int8.yaml", "--set", f"output={tmp / 'glmc-tiny-int8'}",
               "--set", f"cache_dir={tmp / 'cache'}", "--set", "targets=[onnxruntime]",
               "--set", "limits.max_batch=4"])
    assert rc == 0
    return tmp / "glmc-tiny-int8"


@pytest.fixture(scope="session")
def unpadded_build(serve_build):
    """The same model lowered without padding support (GQA takes each row's length from its mask; the fast form
    on CUDA); the stages before the lowering come from serve_build's cache."""
    from glmc.cli import main
    out = serve_build.parent / "glmc-tiny-int8-unpadded"
    rc = main(["compile", "compile_configs/glmc-tiny-int8.yaml", "--set", f"output={out}",
               "--set", f"cache_dir={serve_build.parent / 'cache'}", "--set", "targets=[onnxruntime]",
               "--set", "limits.max_batch=4", "--set", "onnxruntime.padded_batches=false"])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def model(serve_build):
    return glmc.load(serve_build)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(build, **options):
    """A real server (uvicorn, its own thread) on a free port; yields (base URL, scheduler)."""
    import uvicorn
    app, scheduler = open_server(build, **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", scheduler
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def server(serve_build):
    with serving(serve_build, max_queue=8) as s:
        yield s


def client(url: str) -> Any:  # (Any: the client's typed overloads do not take plain message dicts)
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(url: str, name: str) -> float:
    text = httpx2.get(url + "/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
              or (line.startswith(name + "{") and line.split(" ")[0] == name)]
    assert len(values) == 1, (name, text)
    return values[0]


def test_chat_and_completions_equal_glmc_load(server, model):
    url, _ = server
    c, name = client(url), "glmc-tiny-int8"
    assert [m.id for m in c.models.list().data] == [name]
    expected_chat = model.chat(CHAT, max_new_tokens=40)
    r = c.chat.completions.create(model=name, messages=CHAT, temperature=0, max_tokens=40)
    assert r.choices[0].message.content == expected_chat and expected_chat
    assert r.usage.prompt_tokens == len(model.prompt_ids(CHAT))
    assert r.choices[0].finish_reason in ("stop", "length")
    assert (r.choices[0].finish_reason == "length") == (r.usage.completion_tokens == 40)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.chat.completions.create(model=name, messages=CHAT, temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected_chat
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason

    expected_text = model.generate("def main(", max_new_tokens=24)
    r = c.completions.create(model=name, prompt="def main(", temperature=0, max_tokens=24)
    assert r.choices[0].text == expected_text and r.choices[0].finish_reason == "length"
    # a temperature too close to 0 to sample with is greedy, as OpenAI-style servers treat it (not a 500)
    r = c.completions.create(model=name, prompt="def main(", temperature=1e-5, max_tokens=24)
    assert r.choices[0].text == expected_text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(model.prompt_ids("def main(")), 24)
    streamed = list(c.completions.create(model=name, prompt="def main(", temperature=0, max_tokens=24, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == expected_text and len(streamed) > 2
    # the raw SSE ends with [DONE]; completions default to 16 tokens (OpenAI's default)
    with httpx2.stream("POST", url + "/v1/completions", json={"prompt": "import", "stream": True, "seed": 1}) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]
    r = c.completions.create(model=name, prompt="import", seed=1)
    assert r.usage.completion_tokens == 16
    # sampling with a seed repeats
    a, b = (c.completions.create(model=name, prompt="The", temperature=0.9, top_p=0.9, seed=7, max_tokens=20)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def test_page_health_and_metrics(server):
    url, _ = server
    page = httpx2.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text and "<script src" not in page.text and "https://" not in page.text
    health = httpx2.get(url + "/health").json()
    assert health == {"status": "ok", "model": "glmc-tiny-int8", "backend": "onnxruntime",
                      "batching": "inflight (up to 4 rows)", "running": 0, "queued": 0, "max_input_length": 64,
                      "max_sequence_length": 256}
    before = metric(url, "glmc_time_to_first_token_seconds_count")
    r = client(url).completions.create(model="glmc-tiny-int8", prompt="def", temperature=0, max_tokens=5)
    text = httpx2.get(url + "/metrics").text
    assert "# TYPE glmc_time_to_first_token_seconds histogram" in text and "# TYPE glmc_requests_total counter" in text
    assert metric(url, "glmc_time_to_first_token_seconds_count") == before + 1
    assert metric(url, 'glmc_time_to_first_token_seconds_bucket{le="+Inf"}') == before + 1
    assert metric(url, "glmc_generation_tokens_total") >= r.usage.completion_tokens
    assert metric(url, "glmc_requests_running") == 0 and metric(url, "glmc_requests_queued") == 0


def test_stop_strings_end_the_text_and_never_leak(server, model):
    url, _ = server
    c = client(url)
    full = model.generate("def main(", max_new_tokens=40)
    stop = full[10:13]
    assert len(stop.strip()) > 0 and full.index(stop) > 0, full
    expected = full[:full.index(stop)]
    r = c.completions.create(model="glmc-tiny-int8", prompt="def main(", temperature=0, max_tokens=40,
                             stop=[stop, "never appears"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model="glmc-tiny-int8", prompt="def main(", temperature=0, max_tokens=40, stop=stop, stream=True)]
    assert "".join(pieces) == expected and stop not in "".join(pieces)


def test_stop_string_prefixes_are_held_back_until_they_resolve(model):
    """Token by token: text that may begin a stop string is held back ("is" of "this" may begin "is a"), released
    when it does not, and the text ends before the stop string."""
    from glmc.serve.text import TextOut
    text = "def this(): return this is a test"
    expected = text[:text.index("is a")]
    out = TextOut(model.tokenizer, chat=False, stop=["is a"])
    shown, held = [], []
    for token in model.tokenizer.encode(text):
        shown.append(out.push(token))
        assert expected.startswith("".join(shown))  # never a character past where the text will end
        held.append(out.held)
        if out.stopped:
            break
    shown.append(out.finish())
    assert "".join(shown) == expected == out.text
    assert "is" in held and "".join(shown[:-1]).endswith("this ")  # "is" of "this" held, then released
    plain = TextOut(model.tokenizer, chat=False, stop=["zzz"])
    assert "".join([plain.push(t) for t in model.tokenizer.encode(text)] + [plain.finish()]) == text


@pytest.mark.parametrize("body, status, param, words", [
    ({"messages": CHAT, "temperature": "hot"}, 400, "temperature", "expected a number"),
    ({"messages": CHAT, "temperature": 3}, 400, "temperature", "out of range"),
    ({"messages": CHAT, "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"messages": CHAT, "n": 2}, 400, "n", "only n=1"),
    ({"messages": CHAT, "logprobs": True}, 400, "logprobs", "not supported"),
    ({"messages": CHAT, "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "system, user or assistant"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "expected a string"),
    ({}, 400, "messages", "required"),
    ({"messages": CHAT, "stop": [""]}, 400, "stop", "non-empty"),
    ({"messages": [{"role": "user", "content": "word " * 100}]}, 400, "messages", "max_input_length is 64"),
    ({"messages": CHAT, "model": "gpt-4"}, 404, "model", "serves 'glmc-tiny-int8'"),
])
def test_errors_name_the_field(server, body, status, param, words):
    url, _ = server
    r = httpx2.post(url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] and err["code"]


def test_errors_through_the_openai_client(server):
    url, _ = server
    c = client(url)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="glmc-tiny-int8", prompt="x " * 200)
    assert e.value.param == "prompt" and "max_input_length is 64" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="glmc-tiny-int8", messages=CHAT, n=2)
    assert e.value.param == "n"
    assert httpx2.post(url + "/v1/completions", content=b"{not json").json()["error"]["code"] == "invalid_json"
    assert httpx2.get(url + "/v1/nothing").status_code == 404


def long_stream(url: str, max_tokens: int = 200, prompt: str = "The"):
    """A streaming request kept open (the caller reads and closes it)."""
    return httpx2.stream("POST", url + "/v1/completions", timeout=60,
                        json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})


def wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_answers_503_with_retry_after(serve_build):
    """One row and one place in the queue: of six requests sent at once, those beyond the two that fit are refused
    with 503 + Retry-After (the openai client raises InternalServerError); the others are answered."""
    with serving(serve_build, max_batch=1, max_queue=1) as (url, scheduler):
        results: list[object] = [None] * 6

        def ask(i: int) -> None:
            try:
                results[i] = client(url).completions.create(model="glmc-tiny-int8", prompt="The", temperature=0,
                                                            max_tokens=200)
            except openai.APIStatusError as e:
                results[i] = e

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        refused = [r for r in results if isinstance(r, openai.InternalServerError)]
        answered = [r for r in results if isinstance(r, openai.types.Completion)]
        assert len(refused) + len(answered) == 6 and len(refused) >= 1 and len(answered) >= 2
        for e in refused:
            assert e.status_code == 503 and int(e.response.headers["Retry-After"]) >= 1
            assert e.code == "server_overloaded" and "retry after" in e.message
        wait_for(lambda: scheduler.running == 0 and scheduler.queued == 0)
        assert metric(url, 'glmc_requests_total{outcome="rejected"}') == len(refused)
        assert metric(url, "glmc_batch_capacity") == 1 and metric(url, "glmc_queue_capacity") == 1
        assert max(scheduler.metrics.decode_steps) == 1  # one row: never more in a step


def test_a_queued_request_that_hangs_up_leaves_the_queue(model):
    """On the scheduler itself (its thread not started yet, so the queue holds still): a cancelled queued request
    leaves the queue at once, with no prefill, and its place is free for the next."""
    import asyncio

    from glmc.runtime.chat_format import stop_ids
    from glmc.serve.scheduler import QueueFull, Request, Scheduler
    from glmc.serve.text import TextOut

    loop = asyncio.new_event_loop()
    scheduler = Scheduler(make_rows(model.backend, 1), stop_ids(model.tokenizer), max_queue=1)

    def request(n: int) -> Request:
        return Request(model.prompt_ids("def main("), SamplingConfig(max_new_tokens=n),
                       TextOut(model.tokenizer, chat=False), loop)

    first, second = request(8), request(8)
    scheduler.submit(first)
    scheduler.submit(second)
    with pytest.raises(QueueFull):
        scheduler.submit(request(8))
    scheduler.cancel(second)
    assert (scheduler.queued, second.finish_reason, scheduler.metrics.requests["cancelled"]) == (1, "cancelled", 1)
    third = request(8)
    scheduler.submit(third)  # the place is free again
    scheduler.start()
    try:
        wait_for(lambda: first.finish_reason is not None and third.finish_reason is not None)
    finally:
        scheduler.stop()
        loop.close()
    assert (first.finish_reason, third.finish_reason, scheduler.metrics.prefills) == ("length", "length", 2)


def test_disconnect_frees_the_row_at_once(server):
    url, scheduler = server
    before = metric(url, 'glmc_requests_total{outcome="cancelled"}')
    with long_stream(url, 250) as s:
        lines = s.iter_lines()
        for _ in range(3):
            next(lines)
        assert scheduler.running == 1
        t0 = time.perf_counter()
    wait_for(lambda: scheduler.running == 0, 5)
    assert time.perf_counter() - t0 < 2.0  # freed within a few decode steps (the counter below: before its end)
    assert metric(url, "glmc_requests_running") == 0
    assert metric(url, 'glmc_requests_total{outcome="cancelled"}') == before + 1
    # the row is usable again
    assert httpx2.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 3}).status_code == 200


def test_requests_batch_in_flight_and_a_short_one_does_not_wait(server, model):
    """A long request starts; a short one arrives while it runs, joins its decode batch and finishes first; both
    give the text each gives alone (greedy)."""
    url, scheduler = server
    steps_before = scheduler.metrics.decode_steps.copy()
    long_expected = model.generate("The", max_new_tokens=200)
    short_prompt = "import numpy as np"
    short_expected = model.generate(short_prompt, max_new_tokens=12)
    done: dict[str, float] = {}
    short_client = client(url)
    with long_stream(url, 200) as s:
        lines = s.iter_lines()
        first = next(lines)
        t0 = time.perf_counter()
        r = short_client.completions.create(model="glmc-tiny-int8", prompt=short_prompt, temperature=0,
                                            max_tokens=12)
        done["short"] = time.perf_counter() - t0
        assert scheduler.running == 1  # the long one, started first, is still going: the short one did not wait
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *lines]
                       if line.startswith("data: {"))
        done["long"] = time.perf_counter() - t0
    assert r.choices[0].text == short_expected
    assert text == long_expected
    assert done["short"] < done["long"]
    steps = scheduler.metrics.decode_steps - steps_before
    assert steps[2] >= 10, steps  # the short request's decode steps ran beside the long one's


def test_concurrent_requests_equal_alone(server, model):
    url, scheduler = server
    prompts = ["The", "def main():", "import os", "class A:", "x = [", "# a comment"]
    expected = [model.generate(p, max_new_tokens=30) for p in prompts]
    out: list[str | None] = [None] * len(prompts)

    def ask(i: int) -> None:
        r = client(url).completions.create(model="glmc-tiny-int8", prompt=prompts[i], temperature=0,
                                           max_tokens=30)
        out[i] = r.choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == expected
    assert max(scheduler.metrics.decode_steps) == 4  # six requests, four rows: the batch filled up


@pytest.fixture
def one_torch_thread():
    """torch's CPU thread pool spins against ONNX Runtime's and the other tests' threads on a 2-core machine
    (measured: 166 ms a token with 2 threads under load, 8 ms with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend, length", [("onnxruntime", 48), ("onnxruntime-unpadded", 48), ("torch", 48)])
def test_rows_join_leave_and_compact_like_alone(request, backend, length, one_torch_thread):
    """Rows at different lengths, joining mid-way (two at once, in one prefill), one leaving early from the middle of
    the batch, past the end of the buffer (compaction): each row's greedy tokens equal its generation alone."""
    if backend == "torch":
        m = glmc.load(max_length=length)
    else:
        build = request.getfixturevalue("unpadded_build" if backend.endswith("unpadded") else "serve_build")
        m = glmc.load(build, max_length=length)
        assert m.backend.padded == (backend == "onnxruntime")
    prompts = [m.prompt_ids(p) for p in ["The", "def main(): return a", "x", "import json"]]
    scale = length / 48
    news = [min(int(n * scale), length - len(p)) for n, p in zip([40, 34, 20, 30], prompts, strict=True)]
    alone = [generate(m.backend, [p], SamplingConfig(max_new_tokens=n))[0] for p, n in zip(prompts, news, strict=True)]
    rows = make_rows(m.backend, 4)
    assert isinstance(rows, TorchRows if backend == "torch" else OrtRows) and rows.note is None
    starts, leave = [int(s * scale) for s in (0, 12, 12, 20)], int(25 * scale)
    out: dict[int, list[int]] = {}
    active: dict[int, int] = {}  # slot -> prompt
    step = 0
    while len(out) < len(prompts) or active:
        joining = [i for i, s in enumerate(starts) if s == step]  # together: one left-padded prefill
        for i, (slot, logits) in zip(joining, rows.add_many([prompts[i] for i in joining]), strict=True):
            out[i], active[slot] = [int(logits.argmax())], i
        if step == leave:  # prompt 2 leaves early, from the middle of the batch
            slot = next(s for s, i in active.items() if i == 2)
            rows.remove(slot)
            del active[slot]
        for slot, i in list(active.items()):
            if len(out[i]) == news[i]:
                rows.remove(slot)
                del active[slot]
        if active:
            for slot, logits in rows.step({s: out[i][-1] for s, i in active.items()}).items():
                out[active[slot]].append(int(logits.argmax()))
        step += 1
    for i in range(len(prompts)):
        assert out[i] == alone[i][:len(out[i])] and (i == 2 or len(out[i]) == news[i])
    if backend == "onnxruntime":  # (torch drops the positions no row holds when a row leaves, so it rarely needs to)
        assert rows.compactions >= 1


def test_torch_backend_serves_in_flight(one_torch_thread):
    """A checkpoint (the shipped model) on the torch backend: batched in flight too."""
    shipped = glmc.load()
    with serving(None, backend="torch", max_batch=2) as (url, _):
        health = httpx2.get(url + "/health").json()
        assert health["backend"] == "torch" and "inflight" in health["batching"]
        r = client(url).chat.completions.create(model="glmc-tiny", messages=CHAT, temperature=0, max_tokens=12)
        assert r.choices[0].message.content == shipped.chat(CHAT, max_new_tokens=12)


def test_glmc_serve_command(serve_build, capsys):
    from glmc.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "in flight" in help_text and "--max-queue" in help_text and "curl" in help_text
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glmc.cli", "serve", str(serve_build), "--port", str(port),
                             "--max-batch", "2", "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                health = httpx2.get(f"http://127.0.0.1:{port}/health").json()
                break
            except httpx2.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.time() < deadline
                time.sleep(0.2)
        assert health["backend"] == "onnxruntime" and health["batching"] == "inflight (up to 2 rows)"
        assert (health["max_input_length"], health["max_sequence_length"]) == (64, 256)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium and chromium-driver "
                                               "(apt-get install -y chromium chromium-driver)")
def test_chat_page_streams_a_reply_in_a_real_browser(server, model, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    found = chromium()
    assert found is not None  # the skipif above
    browser, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text == "glmc-tiny-int8")
        for field, value in (("temperature", "0"), ("max_tokens", "40")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "input").send_keys("What does os.path.join do?")
        driver.find_element(By.ID, "send").click()
        reply = WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant[data-done='true']"))
        expected = model.chat([{"role": "user", "content": "What does os.path.join do?"}], max_new_tokens=40)
        assert reply.text == expected.strip() and expected
        assert int(reply.get_attribute("data-chunks") or 0) > 1  # it arrived in pieces, as they were generated
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user").text == "What does os.path.join do?"
        driver.save_screenshot(str(tmp_path / "chat.png"))
    finally:
        driver.quit()


def test_serve_imports_point_down():
    """Nothing in glmc imports glmc.serve (the CLI's command table names its module as a string)."""
    import pathlib
    import re
    root = pathlib.Path(glmc.__file__).parent
    users = [p for p in root.rglob("*.py") if "serve" not in p.parts
             and re.search(r"^\s*(from|import) glmc\.serve", p.read_text(), re.M)]
    assert users == []
    assert '"serve": ("glmc.serve.cli_serve"' in (root / "cli.py").read_text()
