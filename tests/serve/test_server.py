"""The server over real sockets: the official openai client unchanged, continuous batching under concurrent
streams, a client that hangs up, a burst past the queue bound, and shutdown with requests in flight."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers import randomized, running_server
from tiny import bert_folder, llama_folder

from lmforge.serve import ServeOptions, build
from lmforge.weights.load import load

QUESTIONS = [f"q{i} " + "abcdefghijklmnop"[i] * (i % 5 + 1) for i in range(16)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    model, tokenizer = load(llama_folder(root / "llama", layers=2, chat_template=True), dtype="float32")
    randomized(model, seed=2, scale=0.1)
    encoder, enc_tokenizer = load(bert_folder(root / "bert"), dtype="float32")
    return model, tokenizer, encoder, enc_tokenizer


def serving(models, slow: float = 0.0, **options):
    """A running server; `slow` seconds are added to every engine step, so requests overlap in time."""
    model, tokenizer, encoder, enc_tokenizer = models
    app = build(model, tokenizer, ServeOptions(name="tiny", embed_name="enc", **options), encoder, enc_tokenizer)
    scheduler = app.state.served.scheduler
    if slow:
        step = scheduler.engine.step
        scheduler.engine.step = lambda: (time.sleep(slow), step())[1]
    return running_server(app), scheduler


def stream_chat(base: str, content: str, max_tokens: int = 24, **extra) -> tuple[int, str, str | None]:
    """(status, streamed text, finish_reason) of one streaming chat request."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **extra}
    text, reason = "", None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.text, None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content", "")
                reason = choice["finish_reason"] or reason
    return 200, text, reason


def test_the_official_openai_client_works_unchanged(models):
    context, _ = serving(models, api_keys=["sk-test"])
    with context as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny", "enc"]
        messages = [{"role": "user", "content": "hello"}]
        answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
        assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
        parts = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
        chunks = list(parts)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == answer.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
        text = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, logprobs=2)
        assert len(text.choices[0].logprobs.tokens) == text.usage.completion_tokens
        vectors = client.embeddings.create(model="enc", input=["one", "two"])
        assert [len(d.embedding) for d in vectors.data] == [32, 32]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=messages)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.chat.completions.create(model="tiny", messages=messages, temperature=3)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_sixteen_concurrent_streams_each_get_their_solo_greedy_answer(models):
    context, scheduler = serving(models, slow=0.01, max_batch=16)
    with context as base:
        alone = [stream_chat(base, q) for q in QUESTIONS]
        assert scheduler.peak_running == 1
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda q: stream_chat(base, q), QUESTIONS))
    assert together == alone
    assert all(status == 200 and text and reason in ("stop", "length") for status, text, reason in together)
    assert scheduler.peak_running >= 8  # they really ran as one batch


def test_a_client_that_hangs_up_frees_its_slot(models):
    context, scheduler = serving(models, slow=0.05)
    with context as base:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 40,
                "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few events, then hang up
        assert any(line.startswith("data: ") for line in got)
        deadline = time.monotonic() + 5
        while (scheduler.engine.n_running or scheduler.outstanding) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.engine.n_running == 0 and scheduler.outstanding == 0
        assert scheduler.aborted == 1
        assert httpx.get(f"{base}/health").json()["running"] == 0


def test_a_burst_past_the_queue_bound_gets_503s_and_loses_no_accepted_request(models):
    context, scheduler = serving(models, slow=0.02, max_batch=2, max_queue=2)
    with context as base:
        alone = {q: stream_chat(base, q, max_tokens=12) for q in QUESTIONS[:12]}
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda q: (q, stream_chat(base, q, max_tokens=12)), QUESTIONS[:12]))
    refused = [r for _, r in results if r[0] == 503]
    served = [(q, r) for q, r in results if r[0] == 200]
    assert refused and len(served) >= 4 and len(refused) + len(served) == 12
    assert all(json.loads(body)["error"]["type"] == "server_overloaded" for _, body, _ in refused)
    assert all(r == alone[q] for q, r in served)
    assert scheduler.outstanding == 0


# ---- shutdown, on the real command and the real default model ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(port: int, grace: float, model: str = "smollm2-135m-instruct") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge", "serve", "--model", model, "--port", str(port), "--embed-model", "none",
           "--feedback", "", "--shutdown-grace", str(grace)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
    proc.kill()
    raise AssertionError("the server did not come up")


@pytest.mark.slow
@pytest.mark.parametrize("grace, tokens, reason", [(30.0, 40, "length"), (1.0, 2000, "abort")])
def test_shutdown_lets_streams_finish_within_the_grace_period_then_ends_them_cleanly(grace, tokens, reason):
    port = _free_port()
    proc = _start(port, grace)
    try:
        result: list = []
        thread = threading.Thread(target=lambda: result.append(
            stream_chat(f"http://127.0.0.1:{port}", "Tell me a long story.", max_tokens=tokens, ignore_eos=True,
                        model="smollm2-135m-instruct")))
        thread.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{port}/health").json()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        thread.join(60)
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    status, text, finish = result[0]
    assert status == 200 and finish == reason and text  # the stream ended with its finish chunk and [DONE]


@pytest.mark.slow
def test_serve_refuses_an_encoder_and_a_bad_port_with_one_line():
    env = {**os.environ, "LMFORGE_API_KEY": ""}
    for args, message in [(["--model", "minilm-l6"], "encoder"), (["--port", "70000"], "--port")]:
        done = subprocess.run([sys.executable, "-m", "lmforge", "serve", *args], capture_output=True, text=True,
                              env=env, timeout=60)
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
