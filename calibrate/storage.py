"""Optuna storage for workers: URLs checked and opened with one clear paragraph (the password
redacted from every message), heartbeats and retries of lost trials, and the repair of a journal
file torn by a kill."""
from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

from stagevar.errors import StageVarError

log = logging.getLogger("stagevar.calibrate.storage")


class StorageError(StageVarError):
    """The Optuna storage cannot be used (one paragraph, password redacted)."""


def redact(url: str | None) -> str | None:
    """The URL with its password replaced by ``***``.

    >>> redact("postgresql://me:pa:ss@db:5432/x")
    'postgresql://me:***@db:5432/x'
    >>> redact("postgresql//me:p@ss@db/x")          # malformed URLs too
    'postgresql//me:***@db/x'
    """
    if not url or "@" not in url:
        return url
    head, _, tail = url.rpartition("@")
    i = head.find("//")
    start = i + 2 if i >= 0 else head.find(":") + 1
    userinfo = head[start:]
    if ":" not in userinfo:
        return url
    return head[:start] + userinfo.split(":", 1)[0] + ":***@" + tail


def _secrets(url: str) -> list[str]:
    try:
        from sqlalchemy.engine import make_url
        pw = make_url(url).password
    except Exception:  # noqa: BLE001 - unparsable: fall back to the raw text
        m = re.search(r"://[^:/@]*:([^/]*)@", url)
        pw = m.group(1) if m else None
    from urllib.parse import quote
    return [s for s in {pw, quote(pw or "", safe="")} if s and len(s) >= 3]


def _scrub(text: str, url: str) -> str:
    text = " ".join(str(text).split())                     # one paragraph
    text = re.sub(r"\(Background on this error at: [^)]*\)", "", text).strip()
    text = text.replace(url, redact(url))
    for s in _secrets(url):
        text = text.replace(s, "***")
    return text


_DRIVERS = {"postgresql": ("psycopg", "psycopg2", "pg8000", "asyncpg"), "mysql": ("pymysql", "MySQLdb", "mysql.connector")}
_DRIVER_NAMES = {"MySQLdb": "mysqldb", "mysql.connector": "mysqlconnector"}


def storage_url(url: str) -> str:
    """Validate ``url`` and pin an installed DB driver when none is named (SQLAlchemy's default
    driver for ``postgresql://`` is psycopg 3 from SQLAlchemy 2.1 on, psycopg2 before)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError
    red = redact(url)
    if not url or "://" not in url:
        raise StorageError(f"invalid storage URL {red!r}: a worker needs a database URL shared by all workers, such as "
                           "postgresql://USER:PASSWORD@HOST:5432/DATABASE (or sqlite:///FILE on one machine).")
    try:
        u = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise StorageError(f"invalid storage URL {red}: {_scrub(exc, url)}. Use postgresql://USER:PASSWORD@HOST:5432/DATABASE "
                           "(special characters in the password percent-encoded).") from None
    backend, _, driver = u.drivername.partition("+")
    if backend == "postgres":
        raise StorageError(f"invalid storage URL {red}: the scheme is postgresql://, not postgres://.")
    if backend not in ("postgresql", "mysql", "sqlite", "mariadb", "oracle", "mssql"):
        raise StorageError(f"invalid storage URL {red}: unknown database {backend!r}. Use postgresql://USER:PASSWORD@HOST:5432/DATABASE.")
    if backend in _DRIVERS and not driver:
        try:
            default = u.get_dialect().driver
        except Exception:  # noqa: BLE001
            default = None
        mods = [m for m in _DRIVERS[backend] if _DRIVER_NAMES.get(m, m) == default] + list(_DRIVERS[backend])
        found = next((m for m in mods if _usable_driver(backend, m)), None)
        if found is None:
            extra = "postgres" if backend == "postgresql" else backend
            raise StorageError(f"cannot open the storage {red}: no {backend} driver is installed. Install one with "
                               f"pip install 'stagevar[{extra}]' (psycopg) or pip install psycopg2-binary.")
        u = u.set(drivername=f"{backend}+{_DRIVER_NAMES.get(found, found)}")
        return u.render_as_string(hide_password=False)
    return url


def _usable_driver(backend: str, module: str) -> bool:
    """The DB-API module is installed and this SQLAlchemy has a dialect for it."""
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False
        from sqlalchemy.dialects import registry
        registry.load(f"{backend}.{_DRIVER_NAMES.get(module, module)}")
        return True
    except Exception:  # noqa: BLE001 - any failure: not usable
        return False


def retry_callback(max_retry: int):
    import optuna
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(max_retry=max_retry)


def retried_trial_number(trial) -> int | None:
    """The trial a retry re-runs (None for an original trial)."""
    return trial.system_attrs.get("failed_trial")


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None, max_retry: int = 2,
                 connect_timeout: int = 10):
    """An :class:`optuna.storages.RDBStorage` for ``url`` (with heartbeat and retry of lost trials
    when ``heartbeat_interval`` is given), or :class:`StorageError` with one clear paragraph."""
    import optuna
    import sqlalchemy.exc
    red = redact(url)
    real = storage_url(url)
    engine_kwargs: dict[str, Any] = {}
    if real.startswith(("postgresql", "mysql", "mariadb")):
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": int(connect_timeout)}}
    kw: dict[str, Any] = {}
    if heartbeat_interval:
        params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        cb_name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
        kw = {"heartbeat_interval": int(heartbeat_interval), "grace_period": int(grace_period or 2 * heartbeat_interval),
              cb_name: retry_callback(max_retry)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                 # experimental / deprecation notices of the heartbeat API
            return optuna.storages.RDBStorage(real, engine_kwargs=engine_kwargs, **kw)
    except sqlalchemy.exc.OperationalError as exc:
        reason = _scrub(getattr(exc, "orig", None) or exc, url)
        low = reason.lower()
        if "password" in low or "authentication" in low or "access denied" in low:
            hint = "Check the user name and password in the URL."
        elif "does not exist" in low or "unknown database" in low:
            hint = "Check the database name; create it first (createdb NAME)."
        elif "unable to open database file" in low:
            hint = "Check that the directory of the SQLite file exists and is writable."
        else:
            hint = "Check that the server is running and reachable from this machine (host, port, firewall)."
        raise StorageError(f"cannot connect to the Optuna storage {red}: {reason}. {hint}") from None
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, RuntimeError, ValueError) as exc:
        raise StorageError(f"cannot open the Optuna storage {red}: {_scrub(exc, url)}. Check the URL "
                           "(postgresql://USER:PASSWORD@HOST:5432/DATABASE) and that the database is an Optuna "
                           "storage of a compatible version (optuna storage upgrade).") from None


def storage_guard(url: str):
    """Context: turn database errors in the middle of a run into one StorageError paragraph."""
    import contextlib

    import sqlalchemy.exc

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except sqlalchemy.exc.SQLAlchemyError as exc:
            raise StorageError(f"lost the Optuna storage {redact(url)}: {_scrub(getattr(exc, 'orig', None) or exc, url)}. "
                               "The trial in flight is retried by another worker after the grace period; restart this "
                               "worker to rejoin.") from None
    return guard()


def repair_journal(path: str | Path) -> bool:
    """Make an Optuna journal file safe to append to after a crash: drop a torn last line (a
    write cut short), which Optuna skips on read but which would swallow the next appended entry
    and make the whole journal unreadable. Returns True when something was removed. Call it
    before opening the journal of a run that may have been killed (single writer)."""
    p = Path(path)
    if not p.is_file():
        return False
    size = p.stat().st_size
    if size == 0:
        return False
    with open(p, "rb+") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return False
        # find the end of the last complete line
        pos, chunk = size, 1 << 16
        keep = 0
        while pos > 0:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step)
            i = buf.rfind(b"\n")
            if i >= 0:
                keep = pos + i + 1
                break
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("journal %s: removed a torn last entry (%d bytes) left by an interrupted write", p, size - keep)
    return True
