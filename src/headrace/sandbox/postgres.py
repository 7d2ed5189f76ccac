"""A throwaway PostgreSQL cluster for tests, benchmarks and ``make demo``.

It runs the real server binaries (``initdb`` / ``pg_ctl``) with logical
replication enabled, on a free loopback port and a private Unix socket. When
the current user is root (as in CI) the server runs as the unprivileged
``postgres`` user, because ``initdb`` refuses to run as root.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psycopg

from headrace.errors import HeadraceError

SUPERUSER = "postgres"

# Fast but honest: fsync is off (the tests kill headrace, not the OS), but
# synchronous_commit stays on so a commit's LSN is flushed when COMMIT returns.
SERVER_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_wal_senders": "40",
    "max_replication_slots": "40",
    "max_connections": "200",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "shared_buffers": "128MB",
    "max_wal_size": "2GB",
    # New WAL segments are not filled with zeros first: at 100,000 changes/s the
    # backends spent 2.4% of the machine's CPU writing those zeros (perf), and the
    # cluster's WAL is throwaway like the rest of it.
    "wal_init_zero": "off",
    "wal_sender_timeout": "60s",
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",
    "timezone": "UTC",
}


class PostgresNotFoundError(HeadraceError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> Path:
    """Locate the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Looks on PATH, then under ``/usr/lib/postgresql/*/bin`` (newest first),
    then asks ``pg_config --bindir``.
    """
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
        candidates.append(Path(on_path).parent)
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    candidates.extend(Path(p) for p in versions)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], check=True, capture_output=True, text=True
            )
            candidates.append(Path(out.stdout.strip()))
    for directory in candidates:
        if all((directory / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return directory
    raise PostgresNotFoundError(
        "no PostgreSQL server binaries found (initdb, pg_ctl, postgres)",
        "install them: apt-get install postgresql (or put their bin directory on PATH)",
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_as() -> str | None:
    """The user to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError as exc:
        raise HeadraceError(
            "running as root but there is no 'postgres' system user to run the server as",
            "create one (useradd --system postgres) or run as a normal user",
        ) from exc
    return SUPERUSER


@dataclass
class ThrowawayPostgres:
    """A private PostgreSQL cluster, created on :meth:`start`, removed on :meth:`stop`.

    ``settings`` overrides or extends :data:`SERVER_SETTINGS`.
    """

    settings: dict[str, str] = field(default_factory=dict)
    base_dir: Path | None = None
    port: int = 0
    bindir: Path = field(default_factory=find_bindir)
    _root: Path | None = field(default=None, init=False)
    _run_user: str | None = field(default=None, init=False)

    @property
    def root(self) -> Path:
        if self._root is None:
            raise HeadraceError("the throwaway cluster is not started", "call start() first")
        return self._root

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @property
    def user(self) -> str:
        return SUPERUSER

    def dsn(self, dbname: str = "postgres", *, unix: bool = False, **extra: str) -> str:
        """A libpq connection string for ``dbname`` (TCP unless ``unix``)."""
        host = str(self.socket_dir) if unix else "127.0.0.1"
        parts = {"host": host, "port": str(self.port), "user": SUPERUSER, "dbname": dbname}
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def _cmd(self, *args: str) -> list[str]:
        if self._run_user:
            return ["runuser", "-u", self._run_user, "--", *args]
        return list(args)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), *args),
            check=check,
            capture_output=True,
            text=True,
        )

    def start(self) -> ThrowawayPostgres:
        """Create the cluster and start the server; returns self."""
        self._run_user = _run_as()
        parent = str(self.base_dir) if self.base_dir else None
        self._root = Path(tempfile.mkdtemp(prefix="headrace-pg-", dir=parent))
        self.socket_dir.mkdir()
        if self._run_user:
            entry = pwd.getpwnam(self._run_user)
            for path in (self._root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        if not self.port:
            self.port = free_port()
        init = subprocess.run(
            self._cmd(
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ),
            check=False,
            capture_output=True,
            text=True,
        )
        if init.returncode != 0:
            self._remove()
            raise HeadraceError(f"initdb failed: {init.stderr.strip()}", "see the message above")
        conf = dict(SERVER_SETTINGS)
        conf.update(self.settings)
        conf.update(
            {
                "port": str(self.port),
                "listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{self.socket_dir}'",
            }
        )
        with (self.datadir / "postgresql.conf").open("a") as out:
            out.write("\n# headrace throwaway cluster\n")
            for key, value in conf.items():
                out.write(f"{key} = {value}\n")
        with (self.datadir / "pg_hba.conf").open("a") as out:
            out.write("local replication all trust\nhost replication all 127.0.0.1/32 trust\n")
        self._start_server()
        atexit.register(self.stop)
        return self

    def _start_server(self) -> None:
        result = self._pg_ctl("-l", str(self.logfile), "-w", "-t", "60", "start", check=False)
        if result.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise HeadraceError(
                f"PostgreSQL did not start: {result.stderr.strip()}\n{log[-2000:]}",
                "see the server log above",
            )

    def restart(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` or ``immediate``, i.e. a crash) and start it again."""
        self._pg_ctl("-m", mode, "-w", "stop")
        self._start_server()

    def stop_server(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-w", "stop", check=False)

    def start_server(self) -> None:
        self._start_server()

    def stop(self) -> None:
        """Stop the server and remove every file of the cluster."""
        if self._root is None:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if (self.datadir / "postmaster.pid").exists():
            self._pg_ctl("-m", "immediate", "-w", "stop", check=False)
        self._remove()

    def _remove(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server accepts connections."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def throwaway_postgres(**settings: str) -> Iterator[ThrowawayPostgres]:
    """Context manager form: ``with throwaway_postgres() as pg: pg.dsn()``."""
    cluster = ThrowawayPostgres(settings=dict(settings))
    with cluster:
        yield cluster
