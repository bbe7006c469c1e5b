"""llama.cpp's own `llama-bench` and `llama-server`, built natively from source for benchmarks only.

llama.cpp has no wheel of its tools, but PyPI's `llama-cpp-python` sdist vendors a full llama.cpp tree
(vendor/llama.cpp, with its git metadata). `--build` downloads that sdist (pinned, so the llama.cpp commit
we compare against does not move), unpacks it into .cache/llama.cpp/ (git-ignored) and builds just the two
tools with -march=native (GGML_NATIVE), static, CPU only: about 25 minutes on 2 cores (llama-server pulls
in llama.cpp's chat-template parsers and multimodal library).

    .venv/bin/python benchmarks/llamacpp.py --build [--jobs 2]   # build, then print paths and version
    .venv/bin/python benchmarks/llamacpp.py                      # print what is built

Other benchmarks import `find_binary`, `llama_bench` and `server`; without a binary those raise
`MissingBinary`, whose message says how to build it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "llama.cpp"
BUILD = CACHE / "build"
SDIST = "llama-cpp-python"
SDIST_VERSION = "0.3.36"  # vendors ggml-org/llama.cpp@0c1e570; bump deliberately, results change with it
SOURCE = CACHE / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"
TARGETS = ("llama-bench", "llama-server")
BUILD_HINT = "build it with `.venv/bin/python benchmarks/llamacpp.py --build` (~25 min on 2 cores) or put it on PATH"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",  # the host's own SIMD (AVX2/AVX-512...), as a user building llama.cpp locally gets
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries: no libllama.so/libggml.so lookup at run time
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",  # the tools only read local GGUF files; no HTTPS model downloads needed
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the build fetches the server's web UI from Hugging Face (no internet)
    # LLAMA_CURL is deprecated in this llama.cpp (it only warns), so it is not passed.
)


class MissingBinary(FileNotFoundError):
    """A llama.cpp tool is neither built here nor on PATH; the message says how to build it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name} not found: {BUILD_HINT}")
        self.name = name


def find_binary(name: str) -> Path | None:
    """The tool built by --build, else one on PATH, else None."""
    built = BUILD / "bin" / name
    if built.is_file() and os.access(built, os.X_OK):
        return built
    found = shutil.which(name)
    return Path(found) if found else None


def _require(name: str) -> Path:
    path = find_binary(name)
    if path is None:
        raise MissingBinary(name)
    return path


def version(name: str = "llama-bench") -> str | None:
    """`<tool> --version` of the binary in use: llama.cpp's build number and commit, and the compiler."""
    path = find_binary(name)
    if path is None:
        return None
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=60)
    return (out.stdout + out.stderr).strip()  # llama.cpp prints its version on stderr


# ---- llama-bench ----------------------------------------------------------------------------------------


def _bench_rows(binary: Path, gguf: Path, args: Sequence[str], threads: int, reps: int) -> list[dict]:
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)  # logs go to stderr, so stdout is the JSON array alone


def llama_bench(gguf: Path, n_prompt: int = 512, n_gen: int = 128, threads: int = 2, reps: int = 3,
                depth: int = 0) -> dict:
    """Prefill and decode speed of llama.cpp itself, as llama-bench measures them (after its warm-up run).

    prefill_tok_s: pp<n_prompt>, a n_prompt-token batch into an empty context. decode_tok_s: tg<n_gen>, n_gen
    tokens one at a time, after `depth` tokens already in the KV cache (llama-bench's default, 0, decodes
    from an empty context; pass depth=n_prompt to decode after the prompt as a generate() call does).
    Both are means over `reps` repetitions, with their standard deviations. Raises MissingBinary.
    """
    binary = _require("llama-bench")
    if depth == 0:
        rows = _bench_rows(binary, gguf, ["-p", str(n_prompt), "-n", str(n_gen)], threads, reps)
    else:  # -d applies to every test, so prefill (at depth 0) and decode (at `depth`) are separate runs
        rows = (_bench_rows(binary, gguf, ["-p", str(n_prompt), "-n", "0"], threads, reps)
                + _bench_rows(binary, gguf, ["-p", "0", "-n", str(n_gen), "-d", str(depth)], threads, reps))
    pp = next(r for r in rows if r["n_prompt"] == n_prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == n_gen and r["n_prompt"] == 0)
    return {
        "prefill_tok_s": pp["avg_ts"], "prefill_std": pp["stddev_ts"],
        "decode_tok_s": tg["avg_ts"], "decode_std": tg["stddev_ts"],
        "threads": tg["n_threads"], "depth": tg.get("n_depth", 0),
        # the commit, not build_number: the sdist's git metadata is a shallow clone, so its count is always 1
        "build": f"commit {tg['build_commit']}", "model_type": tg["model_type"],
        "cpu": tg["cpu_info"], "backend": tg["backends"],
    }


# ---- llama-server ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(gguf: Path, port: int | None = None, parallel: int = 1, ctx: int = 4096, threads: int = 2,
           extra: Sequence[str] = (), timeout: float = 120.0) -> Iterator[str]:
    """Run llama-server on 127.0.0.1 until the block ends; yields its base URL once /health says ready.

    `ctx` is the whole KV cache, which llama-server splits evenly over the `parallel` slots (-np), so each
    request gets ctx / parallel tokens. The server's log goes to a temp file (a pipe nobody reads would fill
    up and stall it) and is quoted if it fails to start. Raises MissingBinary, or RuntimeError on a failed start.
    """
    binary = _require("llama-server")
    port = port or free_port()
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel),
           "-c", str(ctx), "-t", str(threads), *extra]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            _wait_healthy(proc, url, timeout, log)
            yield url
        finally:
            proc.terminate()  # SIGTERM: llama-server finishes its slots and exits cleanly
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"llama-server exited ({proc.returncode}) while starting:\n{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # 503 until the model is loaded
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    log.seek(0)
    raise RuntimeError(f"llama-server not healthy after {timeout:.0f}s:\n{log.read()[-3000:]}")


# ---- build ----------------------------------------------------------------------------------------------


def fetch_source() -> Path:
    """Download the pinned sdist (once) and unpack it (once); returns the vendored llama.cpp tree."""
    if (SOURCE / "CMakeLists.txt").is_file():
        return SOURCE
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"{SDIST}=={SDIST_VERSION}", "-d", str(CACHE)], check=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(CACHE, filter="data")  # "data": no absolute paths or links out of CACHE
    if not (SOURCE / "CMakeLists.txt").is_file():
        raise RuntimeError(f"{sdist.name} has no vendor/llama.cpp tree at {SOURCE}")
    return SOURCE


def _cmake() -> str:
    found = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("cmake not found: install it (`.venv/bin/pip install cmake`)")
    return found


def build(jobs: int = 2) -> dict[str, Path]:
    """Configure and build llama-bench and llama-server in .cache/llama.cpp/build; returns their paths."""
    source = fetch_source()
    cache_file = BUILD / "CMakeCache.txt"
    if cache_file.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={source}" not in cache_file.read_text():
        shutil.rmtree(BUILD)  # configured for another (older) source tree; cmake refuses to reuse it
    # The tree carries its own git metadata, so build-info gets llama.cpp's commit; the ceiling keeps git from
    # walking up into this repository (and stamping lmforge's commit) should a future sdist lack it.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(source.parent)}
    cmake = _cmake()
    subprocess.run([cmake, "-S", str(source), "-B", str(BUILD), *CMAKE_FLAGS], check=True, env=env)
    subprocess.run([cmake, "--build", str(BUILD), "--target", *TARGETS, "-j", str(jobs)], check=True, env=env)
    return {name: BUILD / "bin" / name for name in TARGETS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true", help=f"download {SDIST}=={SDIST_VERSION} and build the tools")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    args = ap.parse_args()
    if args.build:
        build(args.jobs)
    missing = False
    for name in TARGETS:
        path = find_binary(name)
        print(f"{name}: {path or 'not found: ' + BUILD_HINT}")
        missing |= path is None
    print(f"source: {SOURCE if SOURCE.is_dir() else '(not downloaded)'}  [{SDIST}=={SDIST_VERSION}]")
    print(version() or "version: -")  # "version: 0.5.0-dev (build 1, commit ...)" and the compiler
    sys.exit(1 if missing else 0)


if __name__ == "__main__":
    main()
