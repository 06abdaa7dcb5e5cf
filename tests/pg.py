"""A throwaway PostgreSQL server for tests (``from pg import postgres``).

The :func:`postgres` fixture runs ``initdb`` in a fresh temporary directory, starts the server
with ``pg_ctl`` on 127.0.0.1 on a free port (TCP only, ``fsync=off``: the data is disposable),
creates a user with a password and a database owned by it, and yields a :class:`PgServer` with
the connection URL. The server is stopped (``pg_ctl stop -m immediate``) and the directory
removed afterwards.

Binaries are taken from ``$PG_BIN``, else the newest ``/usr/lib/postgresql/*/bin`` (Debian), else
``PATH``. ``initdb`` refuses to run as root, so as root the server runs as the ``postgres`` OS
user (created by the Debian package) through ``runuser``, in a directory chowned to it.
Where no PostgreSQL is installed the tests that use the fixture are skipped (``.ci/run``
installs it); where one is installed but does not start, they fail.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

USER = "stagevar"
PASSWORD = "s3cret-pw"
DATABASE = "stagevar"


@dataclasses.dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    password: str
    database: str
    directory: Path

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def url_with_password(self, password: str) -> str:
        return f"postgresql://{self.user}:{password}@{self.host}:{self.port}/{self.database}"


def find_bin_dir() -> Path | None:
    env = os.environ.get("PG_BIN")
    if env and (Path(env) / "initdb").is_file():
        return Path(env)

    def version(p: str) -> float:
        try:
            return float(Path(p).parent.name)
        except ValueError:
            return 0.0

    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    exe = shutil.which("initdb")
    if exe and shutil.which("pg_ctl"):
        return Path(os.path.realpath(exe)).parent
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runner() -> tuple[list[str], int | None, int | None]:
    """(command prefix, uid, gid) to run the server as a non-root user."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root and there is no 'postgres' OS user to run PostgreSQL as "
                    "(the Debian postgresql package creates it)")
    return ["runuser", "-u", "postgres", "--"], pw.pw_uid, pw.pw_gid


def start_server(timeout: float = 600.0) -> PgServer:       # hang guards only
    bindir = find_bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH); "
                    "apt-get install postgresql")
    prefix, uid, gid = _runner()
    root = Path(tempfile.mkdtemp(prefix="stagevar-pg-"))      # not under pytest's 0700 tmp: postgres must reach it
    data = root / "data"
    pwfile = root / "pw"
    super_pw = uuid.uuid4().hex
    pwfile.write_text(super_pw + "\n")
    if uid is not None:
        os.chown(root, uid, gid)
        os.chown(pwfile, uid, gid)
    os.chmod(root, 0o700)
    env = dict(os.environ, LC_ALL="C", LANG="C")

    def run(*cmd, check=True):
        return subprocess.run([*prefix, *map(str, cmd)], capture_output=True, text=True, env=env, check=check, timeout=timeout)

    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb failed: {exc.stderr or exc.stdout}")
    for attempt in range(5):
        port = free_port()
        opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='{root}' "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        res = run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-o", opts, "-w", "-t", "300", "start", check=False)
        if res.returncode == 0:
            break
        run(bindir / "pg_ctl", "-D", data, "stop", "-m", "immediate", check=False)
    else:
        log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {res.stderr}\n{log[-2000:]}")
    server = PgServer("127.0.0.1", port, USER, PASSWORD, DATABASE, root)
    try:       # over the unix socket in ``root`` (trust): no Python driver needed here
        for sql in (f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'", f"CREATE DATABASE {DATABASE} OWNER {USER}"):
            run(bindir / "psql", "-h", root, "-p", port, "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1",
                "-q", "-c", sql)
    except BaseException as exc:
        stop_server(server)
        pytest.fail(f"could not create the test user and database: {getattr(exc, 'stderr', exc)}")
    return server


def stop_server(server: PgServer) -> None:
    bindir = find_bin_dir()
    prefix, _, _ = _runner()
    if bindir is not None:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(server.directory / "data"), "stop", "-m", "immediate",
                        "-w", "-t", "30"], capture_output=True, timeout=60)
    shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    """A running throwaway PostgreSQL server (:class:`PgServer`); stopped and removed afterwards."""
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)
