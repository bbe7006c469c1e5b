"""Serving throughput and time to first token: `lmforge serve` vs llama.cpp's `llama-server`, same GGUF file.

For each N in --clients, N concurrent clients each send one streaming chat request (a short question of their
own, greedy, max_tokens 128, ignore_eos so every answer is full length) and all of them start together.
Measured per server and N: aggregate generated tokens/s (all completion tokens over the wall time from the first
request sent to the last stream finished), p50 and p95 time to first token (sending to the first non-empty
content delta), and our throughput over llama-server's at the same N. Tokens come from the final usage chunk
(stream_options.include_usage), or from counting content chunks where a server sends none.

The peer is llama.cpp's own server with continuous batching: `llama-server -np 32` (32 slots, like our
--max-batch 32), a KV cache of 32 x (prompt + max_tokens), the same thread count as torch uses in ours, and
prompt caching off per request (our engine keeps no prefix cache). The two servers run one after the other,
never together, each after one warm-up request, each in its own process started and stopped here.

    .venv/bin/python benchmarks/serve.py [--clients 1,8,32] [--max-tokens 128] [--dtype auto] [--skip-llamacpp]
                                         [--model PATH] [--format table|json]

llama-server is built by `.venv/bin/python benchmarks/llamacpp.py --build` (~25 min on 2 cores); without it its
rows are skipped with a note. llama.cpp is a benchmark-only dependency: nothing under `make test` needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import llamacpp  # benchmarks/llamacpp.py, importable as this script's own folder is on sys.path
from host import load_average, machine
from rich.console import Console
from rich.table import Table

from lmforge.weights.registry import resolve

MODEL = "smollm2-135m-instruct"
OURS, PEER = "lmforge serve", "llama-server"
SLOTS = 32  # our --max-batch and llama-server's -np: both decode up to this many requests together
PROMPT_ROOM = 128  # per-slot KV room for the chat-templated question (~40 tokens with SmolLM2's system prompt)
TOPICS = (
    "the water cycle", "black holes", "the Roman Empire", "photosynthesis", "volcanoes", "the printing press",
    "honey bees", "the Moon landing", "plate tectonics", "the human heart", "coral reefs", "the Silk Road",
    "electric motors", "the Great Wall of China", "penguins", "the Renaissance", "rainbows", "the internet",
    "glaciers", "ancient Egypt", "solar panels", "octopuses", "the Olympic Games", "earthquakes",
    "the violin", "deserts", "vaccines", "the Eiffel Tower", "tornadoes", "chess", "the Amazon rainforest",
    "bicycles",
)


@dataclass
class Stream:
    """One client's request: when its first content arrived, when it ended, and what it was billed."""

    ttft: float
    end: float
    completion_tokens: int
    prompt_tokens: int | None


@dataclass
class Row:
    server: str
    clients: int
    tok_s: float = float("nan")
    ttft_p50_ms: float = float("nan")
    ttft_p95_ms: float = float("nan")
    stream_tok_s: float = float("nan")  # median over clients of one stream's own decode rate after its first token
    wall_s: float = float("nan")
    completion_tokens: int = 0
    short_streams: int = 0  # streams that ended before max_tokens (ignore_eos should make this 0)
    prompt_tokens: float | None = None
    ratio: float | None = None  # ours / llama-server aggregate tok/s at the same N
    error: str | None = None
    ttfts_ms: list[float] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), so p95 of 8 values is not just the max."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def question(run: int, client: int) -> str:
    # the run number keeps questions distinct across runs too, so no server can answer from an earlier run's cache
    return f"Question {run}.{client}: tell me about {TOPICS[client % len(TOPICS)]}."


# ---- clients --------------------------------------------------------------------------------------------


async def chat_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Stream:
    sent = time.perf_counter()
    first: float | None = None
    chunks, usage = 0, None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {r.status_code} from {url}: {text[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"error in the stream from {url}: {obj['error']}")
            if obj.get("usage"):
                usage = obj["usage"]
            for choice in obj.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"a stream from {url} ended without any content")
    tokens = usage["completion_tokens"] if usage else chunks
    return Stream(first - sent, end - sent, tokens, usage.get("prompt_tokens") if usage else None)


def request_body(model: str, text: str, max_tokens: int, peer: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
        "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    if peer:
        body["cache_prompt"] = False  # llama-server's per-slot prefix reuse: ours has none, so neither gets one
    return body


async def run_clients(url: str, model: str, n: int, max_tokens: int, run: int,
                      peer: bool) -> tuple[float, list[Stream]]:
    """N requests sent together; returns the wall time (first sent to last finished) and each stream."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    # no read timeout: 32 streams of 128 tokens on 2 cores can take minutes, and a hang shows up as one anyway
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=30.0)) as client:
        bodies = [request_body(model, question(run, i), max_tokens, peer) for i in range(n)]
        start = time.perf_counter()
        streams = await asyncio.gather(*(chat_stream(client, url, b) for b in bodies))
        return time.perf_counter() - start, list(streams)


def chat_model_id(url: str) -> str:
    data = httpx.get(f"{url}/v1/models", timeout=30).raise_for_status().json()["data"]
    chat = [m for m in data if m.get("kind", "chat") == "chat"]  # "kind" is our extension; llama-server has none
    if not chat:
        raise RuntimeError(f"{url}/v1/models lists no chat model: {data}")
    return chat[0]["id"]


def measure(server: str, url: str, clients: list[int], max_tokens: int, console: Console) -> list[Row]:
    peer = server == PEER
    model = chat_model_id(url)
    asyncio.run(run_clients(url, model, 1, max_tokens, 0, peer))  # warm-up: first-request allocations, page cache
    rows = []
    for run, n in enumerate(clients, start=1):
        console.log(f"{server}: {n} client{'s' if n > 1 else ''} ...")
        wall, streams = asyncio.run(run_clients(url, model, n, max_tokens, run, peer))
        ttfts = [s.ttft * 1000 for s in streams]
        total = sum(s.completion_tokens for s in streams)
        per_stream = [(s.completion_tokens - 1) / (s.end - s.ttft) for s in streams
                      if s.completion_tokens > 1 and s.end > s.ttft]
        prompts = [s.prompt_tokens for s in streams if s.prompt_tokens is not None]
        rows.append(Row(
            server, n, tok_s=total / wall, ttft_p50_ms=percentile(ttfts, 0.5), ttft_p95_ms=percentile(ttfts, 0.95),
            stream_tok_s=statistics.median(per_stream) if per_stream else float("nan"), wall_s=wall,
            completion_tokens=total, short_streams=sum(s.completion_tokens < max_tokens for s in streams),
            prompt_tokens=statistics.mean(prompts) if prompts else None, ttfts_ms=ttfts,
        ))
    return rows


# ---- servers --------------------------------------------------------------------------------------------


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log: Any, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{name} exited ({proc.returncode}) while starting:\n{log.read()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    log.seek(0)
    raise RuntimeError(f"{name} not healthy after {timeout:.0f}s:\n{log.read()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    # SIGINT is Ctrl-C: the server drains (nothing is in flight by now) and exits; SIGTERM/SIGKILL if it hangs
    for send, wait in ((lambda: proc.send_signal(signal.SIGINT), 45), (proc.terminate, 10), (proc.kill, None)):
        send()
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def lmforge_server(model: str, dtype: str, timeout: float = 120.0) -> Iterator[str]:
    """`lmforge serve` in its own process until the block ends; yields its base URL once /health says 200."""
    port = llamacpp.free_port()
    cmd = [sys.executable, "-m", "lmforge", "serve", "--model", model, "--port", str(port), "--embed-model", "none",
           "--feedback", "", "--max-batch", str(SLOTS), "--dtype", dtype]
    url = f"http://127.0.0.1:{port}"
    # the log goes to a temp file: a pipe nobody reads would fill up and stall the server
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_healthy(proc, url, timeout, log, OURS)
            yield url
        finally:
            _stop(proc)


def peer_server(gguf: Path, max_tokens: int, threads: int) -> contextlib.AbstractContextManager[str]:
    # -c is the whole KV cache, which llama-server splits evenly over its -np slots
    return llamacpp.server(gguf, parallel=SLOTS, ctx=SLOTS * (PROMPT_ROOM + max_tokens), threads=threads)


# ---- report ---------------------------------------------------------------------------------------------


def llamacpp_commit() -> str | None:
    text = llamacpp.version("llama-server")
    if text is None:
        return None
    found = re.search(r"commit ([0-9a-f]+)", text)
    return found.group(1) if found else text.splitlines()[0]


def print_table(header: dict[str, Any], rows: list[Row], notes: list[str], console: Console) -> None:
    for key, value in header.items():
        console.print(f"[bold]{key}:[/bold] {value}")
    table = Table(title=f"Concurrent streaming chat clients, {header['max_tokens']} tokens each (ignore_eos), greedy",
                  caption="us / llama-server: aggregate tok/s of lmforge serve over llama-server's at the same N")
    for col in ("server", "clients", "tok/s (aggregate)", "TTFT p50 ms", "TTFT p95 ms", "tok/s per stream",
                "wall s", "tokens", "prompt tok", "us / llama-server"):
        table.add_column(col, justify="left" if col == "server" else "right")
    for row in sorted(rows, key=lambda r: (r.clients, r.server != OURS)):
        if row.error:
            table.add_row(row.server, str(row.clients), "failed", "(see below)", *[""] * 6)
            continue
        table.add_row(
            row.server, str(row.clients), f"{row.tok_s:,.1f}", f"{row.ttft_p50_ms:,.0f}", f"{row.ttft_p95_ms:,.0f}",
            f"{row.stream_tok_s:,.1f}", f"{row.wall_s:,.2f}",
            f"{row.completion_tokens:,}" + (f" ({row.short_streams} short)" if row.short_streams else ""),
            f"{row.prompt_tokens:.0f}" if row.prompt_tokens is not None else "-",
            f"{row.ratio:.2f}x" if row.ratio is not None else "",
        )
    console.print(table)
    for note in notes:
        console.print(note)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens each client asks for (ignore_eos)")
    ap.add_argument("--skip-llamacpp", action="store_true", help="measure lmforge serve only")
    ap.add_argument("--model", default=None, help=f"GGUF file both servers load (default: the shipped {MODEL})")
    ap.add_argument("--dtype", default="auto", help="passed to `lmforge serve --dtype`")
    ap.add_argument("--format", choices=["table", "json"], default="table")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not clients or min(clients) < 1 or args.max_tokens < 1:
        ap.error("--clients needs numbers >= 1 and --max-tokens must be >= 1")
    model = args.model or str(resolve(MODEL))
    gguf = Path(model)

    # SIGTERM would otherwise end Python without running the finally blocks that stop the servers. SIGINT gets the
    # same plain handler because asyncio.run's own one only cancels the running task, and httpx's streams can
    # swallow that cancellation, so Ctrl-C would just move on to the next measurement.
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)

    import torch  # only for the thread count lmforge serve will use (torch's default), which llama-server gets too

    threads = torch.get_num_threads()
    console = Console(width=140, stderr=args.format == "json")
    commit = llamacpp_commit()
    header = {
        "machine": machine(), "load average": load_average(),
        "file": f"{gguf} ({gguf.stat().st_size / 1e6:,.1f} MB)" if gguf.is_file() else model,
        "llama.cpp": f"commit {commit} ({llamacpp.find_binary('llama-server')})" if commit else "not built",
        "threads": threads, "slots": SLOTS, "dtype": args.dtype, "max_tokens": args.max_tokens, "clients": clients,
    }
    rows: list[Row] = []
    notes: list[str] = []
    failed = False
    servers: list[tuple[str, Any]] = [(OURS, lambda: lmforge_server(model, args.dtype))]
    if args.skip_llamacpp:
        notes.append("llama-server rows skipped: --skip-llamacpp")
    elif not gguf.is_file():
        notes.append(f"llama-server rows skipped: --model {model} is not a GGUF file")
    else:
        servers.append((PEER, lambda: peer_server(gguf, args.max_tokens, threads)))
    for name, start in servers:  # one at a time: both at once would share the cores
        try:
            with contextlib.ExitStack() as stack:  # leaving it, by any exception or Ctrl-C too, stops the server
                with console.status(f"starting {name} ..."):
                    url = stack.enter_context(start())
                rows += measure(name, url, clients, args.max_tokens, console)
        except llamacpp.MissingBinary as e:
            notes.append(f"llama-server rows skipped: {e}")
        except (RuntimeError, httpx.HTTPError) as e:
            failed = True
            notes.append(f"{name} failed: {e}")
            rows += [Row(name, n, error=str(e)) for n in clients if not any(r.server == name and r.clients == n
                                                                             for r in rows)]
    peers = {r.clients: r.tok_s for r in rows if r.server == PEER and not r.error}
    for row in rows:
        if row.server == OURS and not row.error and row.clients in peers:
            row.ratio = row.tok_s / peers[row.clients]

    if args.format == "json":
        print(json.dumps({"header": header, "rows": [asdict(r) for r in rows], "notes": notes}, indent=2))
    else:
        print_table(header, rows, notes, console)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the servers are stopped by now (their context managers' finally blocks)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
