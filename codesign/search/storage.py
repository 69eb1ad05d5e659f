"""Study storage shared by search workers: opening it, checking its file, and creating a study once.

Workers start together: several processes may open a fresh SQLite file or journal at the same moment.
SQLAlchemy's schema creation and Optuna's study creation are not safe against that (one of two workers
died creating the SQLite schema), and each worker would seed the new study (its default trial) again.
For file storages, opening and setting up the study happens under an exclusive lock on a file beside
the storage (``<file>.lock``); storages on a server (PostgreSQL) retry the creation a few times instead.
Each worker that opens a study also takes the next *worker index* from the study (under the same lock),
which seeds its sampler: two processes never draw with the same seed, whatever ``--worker`` says.

A storage file that exists but is empty or is not what its URL says (not an SQLite database, not an
Optuna journal) is refused with an error naming the file: it is never taken for a new study.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from codesign.errors import SearchError

__all__ = ["claim_and_seed", "claim_worker_index", "open_storage", "storage_file", "storage_lock"]

HEARTBEAT_S = 30
WORKERS_ATTR = "codesign.workers_started"
_SQLITE_HEADER = b"SQLite format 3\x00"
_CREATE_TRIES = 5  # server storages: creating a study another worker creates at the same moment


def optuna_module() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise SearchError(
            "search needs optuna, which is not installed",
            fix="pip install 'codesign[search]' (or: pip install optuna)",
        ) from exc
    # failed trials are logged here in one line (with their reason kept in the study), not by
    # Optuna with a traceback each
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def storage_file(url: str) -> Path | None:
    """The file an SQLite or journal storage URL names (None for servers and ``:memory:``)."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :])
    if url.startswith("journal:") and url[len("journal:") :]:
        return Path(url[len("journal:") :])
    return None


def check_storage_file(url: str) -> None:
    """Refuse an existing storage file that is empty or not of its URL's kind (naming the file)."""
    path = storage_file(url)
    if path is None or not path.exists():
        return
    if path.is_dir():
        raise SearchError(f"storage {url!r} names a directory, {path}", fix="name a file for the study")
    size = path.stat().st_size
    kind = "an SQLite database" if url.startswith("sqlite:") else "an Optuna journal"
    if size == 0 and url.startswith("sqlite:"):  # Optuna itself creates a journal empty, then appends
        raise SearchError(
            f"storage file {path} is empty, not {kind}: it is not taken for a new study",
            fix=f"delete {path} to start a new study there, or point --storage at the study's file",
        )
    if size == 0:
        return
    with path.open("rb") as f:
        head = f.read(4096)
    if url.startswith("sqlite:"):
        good = head.startswith(_SQLITE_HEADER)
    else:
        first = head.split(b"\n", 1)[0]
        good = _is_json_object(first) if b"\n" in head or len(head) < 4096 else True
    if not good:
        raise SearchError(
            f"storage file {path} is not {kind} (it starts with {head[:16]!r})",
            fix=f"point --storage at the study's file, or move {path} away to start a new study",
        )


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@contextlib.contextmanager
def storage_lock(url: str) -> Iterator[None]:
    """Exclusive for the duration: other processes opening the same file storage wait here."""
    path = storage_file(url)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def open_storage(url: str) -> Any:
    """An Optuna storage from a URL: ``sqlite:///file``, ``postgresql://...``, ``journal:file``, ``:memory:``."""
    optuna = optuna_module()
    if url == ":memory:":
        return optuna.storages.InMemoryStorage()
    if url.startswith("journal:"):
        path = url[len("journal:") :]
        if not path:
            raise SearchError("journal storage needs a file path", fix="write journal:path/to/study.log")
        check_storage_file(url)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise SearchError(
            f"storage {url!r} is not a URL",
            fix="use sqlite:///file.db, postgresql://user@host/db, journal:file.log or :memory:",
        )
    engine: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        check_storage_file(url)
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}}  # several workers wait for the file lock
    # a trial whose worker stopped beating is failed by Optuna; run its parameters again
    retry = (
        getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        or optuna.storages.RetryFailedTrialCallback
    )
    try:
        for attempt in range(_CREATE_TRIES):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    warnings.simplefilter("ignore", FutureWarning)
                    return optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine,
                        heartbeat_interval=HEARTBEAT_S,
                        grace_period=4 * HEARTBEAT_S,
                        heartbeat_stale_trial_callback=retry(max_retry=1),
                    )
            except Exception as exc:
                # workers opening a fresh server database together race on creating Optuna's schema
                # (a duplicate type or table): the loser retries and finds the schema made
                concurrent = type(exc).__name__ in ("IntegrityError", "ProgrammingError")
                if not concurrent or storage_file(url) is not None or attempt == _CREATE_TRIES - 1:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")
    except Exception as exc:  # SQLAlchemy raises its own errors for bad URLs, files and missing drivers
        file = storage_file(url)
        where = f" (file {file})" if file is not None else ""
        raise SearchError(
            f"cannot open storage {url!r}{where}: {type(exc).__name__}: {str(exc).splitlines()[0]}",
            fix="check the URL and that the file is this study's database"
            if file is not None
            else "check the URL; PostgreSQL needs a driver (pip install psycopg2-binary)",
        ) from exc


def open_study_once(url: str, create: Callable[[Any], Any]) -> Any:
    """``create(storage)`` (open or create a study and set it up) with no other worker doing the same.

    File storages: under :func:`storage_lock`. Server storages: retried when a concurrent creation
    makes it fail (a unique-name clash, a schema created at the same moment).
    """
    if storage_file(url) is not None:
        with storage_lock(url):
            return create(open_storage(url))
    for attempt in range(_CREATE_TRIES):
        try:
            return create(open_storage(url))
        except SearchError:
            raise
        except Exception:
            if attempt == _CREATE_TRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def claim_worker_index(study: Any, url: str = "") -> int:
    """The next worker index of ``study`` (0 for its first worker).

    File and in-memory storages: call it under the study's lock (a read and a write of a study
    attribute). Server storages (PostgreSQL, MySQL): a counter row of codesign's own table in the same
    database, read ``FOR UPDATE`` and incremented in one transaction, which the server serializes, so
    workers on several machines starting together each get their own index.
    """
    if "://" in url and storage_file(url) is None:
        return _claim_on_server(study)
    index = int(study.user_attrs.get(WORKERS_ATTR, 0))
    study.set_user_attr(WORKERS_ATTR, index + 1)
    return index


def claim_and_seed(study: Any, url: str, seed: Callable[[], None]) -> int:
    """Claim this worker's index (``claim_worker_index``) and, for the study's first worker only, call
    ``seed()`` (set the study's attributes, enqueue its first trials). The claim is atomic where the
    storage allows it, so workers opening a fresh study together seed it once: reading an attribute
    and writing it after is not (two workers on a server both found a fresh study unseeded)."""
    index = claim_worker_index(study, url)
    if index == 0:
        seed()
    return index


def _claim_on_server(study: Any) -> int:
    import sqlalchemy as sa

    storage = study._storage
    backend = getattr(storage, "_backend", storage)  # Optuna wraps an RDBStorage in a cache
    engine = getattr(backend, "engine", None)
    if engine is None:
        raise SearchError(f"storage {type(backend).__name__} has no database engine to count workers in")
    meta = sa.MetaData()
    counters = sa.Table(
        "codesign_worker_counters",
        meta,
        sa.Column("study", sa.String(512), primary_key=True),
        sa.Column("started", sa.Integer, nullable=False),
    )
    for attempt in range(_CREATE_TRIES):  # two workers may create the table at the same moment
        try:
            meta.create_all(engine, checkfirst=True)
            break
        except sa.exc.SQLAlchemyError:
            if attempt == _CREATE_TRIES - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    name = study.study_name
    with engine.begin() as conn:
        try:
            with conn.begin_nested():
                conn.execute(counters.insert().values(study=name, started=0))
        except sa.exc.IntegrityError:
            pass  # another worker made the row: count on it
        # the row lock (SELECT ... FOR UPDATE, then UPDATE, in one transaction) serializes the workers
        started = conn.execute(
            sa.select(counters.c.started).where(counters.c.study == name).with_for_update()
        ).scalar_one()
        conn.execute(counters.update().where(counters.c.study == name).values(started=started + 1))
    return int(started)
