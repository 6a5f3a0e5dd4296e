"""Throwaway team servers for a test: a PostgreSQL cluster, an MLflow tracking server and a Prefect server.

Each is a context manager that starts the server as a child process in its own process group, waits until it
answers, and on exit (also after an error) stops the whole group and waits for it, so nothing outlives the test.

PostgreSQL refuses to run as root. Under root the cluster's folder is handed to the unprivileged `nobody` user and
`initdb` and `postgres` run as that user (through `setpriv`, which execs the command: the child is the postmaster).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent
UNPRIVILEGED_USER = "nobody"


def postgres_bindir() -> Path | None:
    """The folder holding PostgreSQL's server programs (Debian: /usr/lib/postgresql/<major>/bin), newest first;
    None when they are not installed."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_in_group(pgid: int) -> list[int]:
    """The ids of the live (non-zombie) processes whose process group is `pgid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def processes_mentioning(text: str) -> list[int]:
    """The ids of the live processes whose command line contains `text` (this process excepted)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in command and state != "Z":
            found.append(int(entry.name))
    return found


def stop_group(process: subprocess.Popen, first: int = signal.SIGTERM, grace: float = 30.0) -> None:
    """Signal the process group `process` leads with `first`, then SIGKILL whatever is left after `grace` seconds;
    reap the leader. The group is this helper's own child's (started with start_new_session=True)."""
    pgid = process.pid
    if process.poll() is None or processes_in_group(pgid):
        try:
            os.killpg(pgid, first)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            process.poll()
            if not processes_in_group(pgid):
                break
            time.sleep(0.2)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def wait_until_answers(url: str, process: subprocess.Popen, log: Path, timeout: float, expect=None) -> float:
    """Poll `url` until it answers 200 (and `expect(response)` holds); returns the seconds waited. Fails at once,
    with the log's tail, when the process exits, and after `timeout` seconds."""
    start = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered:\n"
                               f"{tail(log)}")
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200 and (expect is None or expect(response)):
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.5)


# ----------------------------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class Database:
    name: str
    user: str
    password: str
    port: int

    def url(self, driver: str) -> str:
        """A SQLAlchemy URL, e.g. driver "psycopg2" for MLflow, "asyncpg" for Prefect."""
        return f"postgresql+{driver}://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.name}"

    def connect(self):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, dbname=self.name, user=self.user,
                                password=self.password, connect_timeout=10)


@dataclass
class PostgresCluster:
    """A running throwaway cluster: its superuser, port, and the postmaster's process."""

    folder: Path
    port: int
    superuser: str
    password: str
    process: subprocess.Popen

    def superuser_database(self) -> Database:
        return Database("postgres", self.superuser, self.password, self.port)

    def create_database(self, name: str, extensions: tuple[str, ...] = ()) -> Database:
        """A login role and a database it owns (as a team's administrator would make them), with `extensions`
        created by the superuser. Returns the role's connection details."""
        password = secrets.token_hex(12)
        admin = self.superuser_database().connect()
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE ROLE {name} LOGIN PASSWORD %s", (password,))
            cursor.execute(f"CREATE DATABASE {name} OWNER {name}")
        admin.close()
        if extensions:
            inside = Database(name, self.superuser, self.password, self.port).connect()
            inside.autocommit = True
            with inside.cursor() as cursor:
                for extension in extensions:
                    cursor.execute(f"CREATE EXTENSION IF NOT EXISTS {extension}")
            inside.close()
        return Database(name, name, password, self.port)


def _as_postgres_user(owner: pwd.struct_passwd | None) -> list[str]:
    if owner is None:
        return []
    return ["setpriv", f"--reuid={owner.pw_uid}", f"--regid={owner.pw_gid}", "--clear-groups"]


@contextmanager
def postgres_cluster(bindir: Path, startup_timeout: float = 60.0) -> Iterator[PostgresCluster]:
    """initdb a cluster in a new temporary folder, run it on a free 127.0.0.1 port (password authentication over
    TCP, the Unix socket inside the folder), and on exit stop it (fast shutdown) and delete the folder."""
    owner = pwd.getpwnam(UNPRIVILEGED_USER) if os.geteuid() == 0 else None
    if owner is not None and shutil.which("setpriv") is None:
        raise RuntimeError("running as root needs `setpriv` (util-linux) to start PostgreSQL as an unprivileged user")
    # Outside pytest's tmp_path: that tree is private to root, and the cluster's user must reach its folder.
    folder = Path(tempfile.mkdtemp(prefix="pixelpick-postgres-"))
    process = None
    try:
        data, sockets, password_file = folder / "data", folder / "sockets", folder / "password"
        data.mkdir(mode=0o700)
        sockets.mkdir(mode=0o700)
        password = secrets.token_hex(16)
        password_file.write_text(password + "\n")
        if owner is not None:
            for path in (folder, data, sockets, password_file):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        superuser = "pixelpick"
        initdb = subprocess.run(
            [*_as_postgres_user(owner), str(bindir / "initdb"), "-D", str(data), "-U", superuser,
             f"--pwfile={password_file}", "-E", "UTF8", "--locale=C.UTF-8", "--auth-local=trust",
             "--auth-host=scram-sha-256", "--no-sync"],
            cwd=folder, env=env, capture_output=True, text=True, timeout=120)
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{initdb.stdout}\n{initdb.stderr}")
        password_file.unlink()
        port = free_port()
        log = folder / "postgres.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [*_as_postgres_user(owner), str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                 "-k", str(sockets), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
                cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        cluster = PostgresCluster(folder, port, superuser, password, process)
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"postgres exited with {process.returncode}:\n{tail(log)}")
            try:
                cluster.superuser_database().connect().close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not accept connections within {startup_timeout:.0f} s:\n"
                                       f"{tail(log)}") from None
                time.sleep(0.3)
        yield cluster
    finally:
        if process is not None:
            stop_group(process, first=signal.SIGINT)  # SIGINT: fast shutdown (ends sessions, then exits)
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------ MLflow and Prefect


@dataclass
class Server:
    """A started server: `wait()` blocks until it answers its health endpoint."""

    name: str
    url: str
    port: int
    process: subprocess.Popen
    log: Path
    health: str
    timeout: float
    expect: object = None
    seconds_to_start: float | None = None

    def wait(self) -> Server:
        if self.seconds_to_start is None:
            self.seconds_to_start = wait_until_answers(self.url + self.health, self.process, self.log, self.timeout,
                                                       self.expect)
        return self


def _server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               OMP_NUM_THREADS="1", PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


@contextmanager
def _server(name: str, command: list[str], env: dict[str, str], port: int, health: str, log: Path,
            timeout: float, expect=None, wait: bool = True) -> Iterator[Server]:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=log.parent, start_new_session=True)
    try:
        server = Server(name, f"http://127.0.0.1:{port}", port, process, log, health, timeout, expect)
        yield server.wait() if wait else server
    finally:
        stop_group(process)


@contextmanager
def mlflow_server(database: Database, artifacts: Path, folder: Path, timeout: float = 180.0,
                  wait: bool = True) -> Iterator[Server]:
    """`mlflow server` with its tracking and registry data in `database` and proxied artifacts in `artifacts`
    (`wait=False`: started, not yet answering; call `wait()`)."""
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", database.url("psycopg2"),
               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    # PixelPick queues no MLflow server jobs: without them the server starts no job-runner processes (and leaves no
    # job queue folder behind in /dev/shm).
    env = _server_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with _server("mlflow", command, env, port, "/health", folder / "mlflow-server.log", timeout,
                 expect=lambda r: r.text.strip() == "OK", wait=wait) as server:
        yield server


@contextmanager
def prefect_server(database: Database, home: Path, folder: Path, timeout: float = 180.0,
                   wait: bool = True) -> Iterator[Server]:
    """`prefect server start` with its state in `database` (PREFECT_HOME in `home`; `wait` as for mlflow_server)."""
    port = free_port()
    env = _server_env(PREFECT_HOME=str(home), PREFECT_API_DATABASE_CONNECTION_URL=database.url("asyncpg"),
                      PREFECT_SERVER_UI_ENABLED="false")
    command = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
               "--analytics-off", "--no-ui"]
    with _server("prefect", command, env, port, "/api/health", folder / "prefect-server.log", timeout,
                 expect=lambda r: r.json() is True, wait=wait) as server:
        yield server
