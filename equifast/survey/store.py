"""The survey store: one SQLite file holding every finished model of a survey.

SQLite because a survey is a single writer (the driver) with a few readers (analysis code, the
report), and a transaction per finished model is exactly what makes a killed survey safe to start
again: a model's rows are either all committed or not there at all.

Schema (``SCHEMA_VERSION`` 3; every table keyed by ``run_id`` where it belongs to one run):

``runs``
    one row per ``(model, config_hash)`` that finished (``status='done'``) or gave up
    (``status='failed'``): ``run_id, model, config_hash, family, group_spec, status, pretrained,
    note, images, seconds, images_per_second, batch_size, attempts, device, loader, backend,
    started, finished, env_id, config`` (the run's configuration as JSON: what the engine
    recorded, and under ``survey`` the survey's configuration that ``config_hash`` hashes, for a
    finished run; the survey's configuration for a failed one), ``error`` (the last
    error's one-line message for a failed run), ``warning`` (what is wrong with a finished run's
    numbers, e.g. layers whose scores leave out images with NaN features, or grid offsets that
    are estimates under rotations or flips; version 3, added when
    an older store is opened). A unique index on ``(model, config_hash)`` makes a duplicate
    impossible: a rerun skips finished pairs, and a retried failure replaces its row.
``layers``
    ``run_id, layer, depth, rel_depth, kind, layout, grid_h, grid_w, channels, prefix, stride_y,
    stride_x, stride, offset_y, offset_x``: the measured layers of a run.
``scores``
    ``run_id, layer, element, exact, comparison, metric, value, ci_low, ci_high, n, pooled,
    init, init_lo, init_hi, learned, learned_lo, learned_hi``: the rows of
    :attr:`equifast.Result.frame` (layer geometry lives in ``layers``; the last six are NULL
    without ``baseline="init"``; version 1 had no such columns, and opening a version-1 store
    adds them).
``model_scores``
    ``run_id, metric, value, ci_low, ci_high, n``: top-1, top-5, consistency.
``skipped``
    ``run_id, path, reason``: input files a run could not read.
``errors``
    ``error_id, model, config_hash, attempt, batch_size, kind, message, traceback, time, env_id,
    fatal``: every failure, also the out-of-memory attempts that a smaller batch then got past
    (``fatal=0``).
``environments``
    ``env_id, fingerprint, created, hostname, platform, python, torch, torchvision, timm,
    equifast, device, device_name, git_commit``: where runs ran (one row per distinct setup).
``meta``
    ``key, value``: ``schema_version``.
``claims``
    ``model, config_hash, owner, hostname, pid, claimed``: the models that a running survey is
    measuring now (:meth:`SurveyStore.claim`), so that a second survey on the same store leaves
    them alone; a claim goes with the model's rows (or its failure), and a claim whose survey
    died is taken over. Not exported: it only matters while surveys run.

Example:
    >>> store = open_store("survey.sqlite")                            # doctest: +SKIP
    >>> store.runs[["model", "status", "images_per_second"]]           # doctest: +SKIP
    >>> eq = store.scores.query("metric == 'corr' and comparison == 'eq' and element == 'mean'")
    ...                                                                # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import socket
import sqlite3
import subprocess
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from equifast.result import BASELINE_COLUMNS, FRAME_COLUMNS, MODEL_COLUMNS, Result

__all__ = ["SCHEMA_VERSION", "DuplicateRunError", "SurveyStore", "environment_info",
           "export_store", "model_key", "open_store"]

SCHEMA_VERSION = 3

LAYER_COLUMNS = [
    "layer", "depth", "rel_depth", "kind", "layout", "grid_h", "grid_w", "channels", "prefix",
    "stride_y", "stride_x", "stride", "offset_y", "offset_x",
]
SCORE_COLUMNS = [
    "layer", "element", "exact", "comparison", "metric", "value", "ci_low", "ci_high", "n",
    "pooled", *BASELINE_COLUMNS,
]
RUN_COLUMNS = [
    "run_id", "model", "config_hash", "family", "group_spec", "status", "pretrained", "note",
    "images", "seconds", "images_per_second", "batch_size", "attempts", "device", "loader",
    "backend", "started", "finished", "env_id", "config", "error", "warning",
]
# Numeric columns of the frames read back (a column of NULLs is float64 NaN, not objects).
_LAYER_NUMBERS = ("depth", "rel_depth", "grid_h", "grid_w", "channels", "prefix", "stride_y",
                  "stride_x", "stride", "offset_y", "offset_x")
_SCORE_NUMBERS = ("value", "ci_low", "ci_high", "n", *BASELINE_COLUMNS, *_LAYER_NUMBERS)
_RUN_NUMBERS = ("images", "seconds", "images_per_second", "batch_size", "attempts")
ENVIRONMENT_COLUMNS = [
    "hostname", "platform", "python", "torch", "torchvision", "timm", "equifast", "device",
    "device_name", "git_commit",
]

_CLAIMS_TABLE = """CREATE TABLE IF NOT EXISTS claims (
    model TEXT NOT NULL, config_hash TEXT NOT NULL, owner TEXT NOT NULL, hostname TEXT,
    pid INTEGER, claimed TEXT, PRIMARY KEY (model, config_hash)
)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS environments (
    env_id INTEGER PRIMARY KEY, fingerprint TEXT UNIQUE NOT NULL, created TEXT,
    {", ".join(f"{c} TEXT" for c in ENVIRONMENT_COLUMNS)}
);
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY, model TEXT NOT NULL, config_hash TEXT NOT NULL, family TEXT,
    group_spec TEXT, status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    pretrained INTEGER, note TEXT, images INTEGER, seconds REAL, images_per_second REAL,
    batch_size INTEGER, attempts INTEGER, device TEXT, loader TEXT, backend TEXT,
    started TEXT, finished TEXT, env_id INTEGER REFERENCES environments (env_id),
    config TEXT, error TEXT, warning TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS runs_model_config ON runs (model, config_hash);
CREATE TABLE IF NOT EXISTS layers (
    run_id INTEGER NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE, layer TEXT NOT NULL,
    depth INTEGER, rel_depth REAL, kind TEXT, layout TEXT, grid_h INTEGER, grid_w INTEGER,
    channels INTEGER, prefix INTEGER, stride_y REAL, stride_x REAL, stride REAL,
    offset_y REAL, offset_x REAL, PRIMARY KEY (run_id, layer)
);
CREATE TABLE IF NOT EXISTS scores (
    run_id INTEGER NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE, layer TEXT NOT NULL,
    element TEXT, exact INTEGER, comparison TEXT, metric TEXT, value REAL, ci_low REAL,
    ci_high REAL, n INTEGER, pooled INTEGER, {", ".join(f"{c} REAL" for c in BASELINE_COLUMNS)}
);
CREATE INDEX IF NOT EXISTS scores_run ON scores (run_id);
CREATE TABLE IF NOT EXISTS model_scores (
    run_id INTEGER NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE, metric TEXT,
    value REAL, ci_low REAL, ci_high REAL, n INTEGER
);
CREATE TABLE IF NOT EXISTS skipped (
    run_id INTEGER NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE, path TEXT, reason TEXT
);
{_CLAIMS_TABLE};
CREATE TABLE IF NOT EXISTS errors (
    error_id INTEGER PRIMARY KEY, model TEXT, config_hash TEXT, attempt INTEGER,
    batch_size INTEGER, kind TEXT, message TEXT, traceback TEXT, time TEXT,
    env_id INTEGER REFERENCES environments (env_id), fatal INTEGER
);
"""


# A claim of another machine (or container: its processes cannot be seen from here) is taken as
# left behind by a survey that died once it is this old; a survey that still runs then loses
# nothing but the time of measuring that model twice (the first to write it keeps it).
CLAIM_HOURS = 24.0

_TABLES = ("meta", "environments", "runs", "layers", "scores", "model_scores", "skipped", "errors")


class DuplicateRunError(ValueError):
    """A ``(model, config)`` pair that is already done in the store (another survey finished it)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones, NaN to NULL (SQLite has no NaN)."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def model_key(name: str) -> str:
    """The one name under which a model is kept in a store (``runs.model``).

    ``timm:resnet18`` and ``resnet18`` are the same timm model, kept as ``resnet18`` (the name
    timm lists); ``torchvision:resnet18`` and ``tv:resnet18`` the same torchvision model, kept as
    ``tv:resnet18``, another model than timm's ``resnet18``. A pretrained tag
    (``resnet18.a1_in1k``) names other weights and stays. Spaces around the parts are dropped.

    Example:
        >>> model_key("timm:resnet18"), model_key("torchvision:resnet18")
        ('resnet18', 'tv:resnet18')
    """
    name = name.strip()
    prefix, colon, rest = name.partition(":")
    if not colon:
        return name
    if prefix.strip() == "timm":
        return rest.strip()
    if prefix.strip() in ("tv", "torchvision"):
        return f"tv:{rest.strip()}"
    return name


def _cannot_write(error: sqlite3.OperationalError) -> bool:
    """Whether SQLite failed because it could not create or change a file (read-only folder,
    file or file system), not because the database is bad or busy."""
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (8, 14)  # SQLITE_READONLY (and its extended codes), SQLITE_CANTOPEN
    text = str(error).lower()
    return "readonly database" in text or "unable to open database file" in text


def _probed(connection: sqlite3.Connection) -> sqlite3.Connection:
    """``connection`` once it has read the schema (SQLite opens files lazily: a connection that
    cannot read fails here, not in ``connect``); closed when it cannot."""
    try:
        connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except BaseException:
        connection.close()
        raise
    return connection


def _claim_alive(hostname: str | None, pid: int | None, claimed: str | None) -> bool:
    """Whether the survey that made a claim may still be running."""
    if hostname == socket.gethostname() and pid is not None and os.name == "posix":
        try:
            os.kill(pid, 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return False
        except PermissionError:  # it exists, run by another user
            return True
        return True
    try:
        age = datetime.now(timezone.utc) - datetime.fromisoformat(claimed or "")
    except ValueError:
        return False
    return age.total_seconds() < CLAIM_HOURS * 3600


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info(device: str | None = None) -> dict[str, str | None]:
    """Versions, host, device and git commit of this process (one ``environments`` row)."""
    import torch

    import equifast

    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except Exception:  # noqa: BLE001 - an optional package that is missing or broken
            return None

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    device_name = platform.processor() or platform.machine()
    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "timm": version("timm"),
        "equifast": equifast.__version__,
        "device": device,
        "device_name": device_name,
        "git_commit": _git_commit(),
    }


class SurveyStore:
    """A survey's SQLite store: written by the survey driver, read as pandas frames.

    A store where nothing can be written (a read-only folder, file or file system) is still read:
    WAL needs to create its ``-shm`` file beside the database, so reading falls back to SQLite's
    ``mode=ro``, then to ``immutable=1`` (``read_only`` says which); writing to it is a
    ``PermissionError``.

    Args:
        path: The SQLite file.
        create: Create it (and its folder) when missing, for writing; otherwise a missing file is
            an error.

    Attributes:
        read_only: None when opened read-write (as usual); else how it is read, where nothing
            can be written: ``"mode=ro"`` or ``"mode=ro&immutable=1"``.

    Raises:
        FileNotFoundError: ``create`` is False and there is no file at ``path``.
        ValueError: the file is not an equifast store, or one of a newer schema.
        PermissionError: ``create`` is True and the store or its folder cannot be written, or
            the file cannot even be read.
    """

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path)
        self.read_only: str | None = None
        self._connection: sqlite3.Connection | None = None
        if self.path.is_dir():  # (SQLite says "unable to open", which reads as a permission)
            raise ValueError(f"{self.path} is a folder, not a survey store: expected the store's "
                             f"SQLite file, e.g. {self.path / 'survey.sqlite'}")
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(f"no survey store at {self.path} (run `equifast survey "
                                        f"--store {self.path} ...` first)")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise PermissionError(self._cannot_write(error)) from None
        try:
            self._connection = self._connect(create)
            # Before anything is written: a file with other tables is someone else's database.
            self._check_tables()
            self._connection.execute("PRAGMA foreign_keys = ON")
            if create:
                try:
                    # WAL: readers (a report, a notebook) never block the writer.
                    # synchronous=FULL: a committed model survives even a power cut, not only a
                    # killed process.
                    self._connection.execute("PRAGMA journal_mode = WAL")
                    self._connection.execute("PRAGMA synchronous = FULL")
                    with self._connection:
                        self._connection.executescript(_SCHEMA)
                        self._connection.execute(
                            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                            (str(SCHEMA_VERSION),))
                except sqlite3.OperationalError as error:
                    if _cannot_write(error):
                        raise PermissionError(self._cannot_write(error)) from None
                    raise
            version = self._connection.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as error:
            self._close_quietly()
            raise ValueError(f"{self.path} is not an equifast survey store ({error})") from None
        except (ValueError, PermissionError):
            self._close_quietly()
            raise
        if version is None:
            self._connection.close()
            raise ValueError(f"{self.path} is not an equifast survey store (no schema_version)")
        if int(version[0]) > SCHEMA_VERSION:
            self._connection.close()
            raise ValueError(f"{self.path} has schema version {version[0]}; this equifast reads "
                             f"up to {SCHEMA_VERSION}: upgrade equifast")
        self._upgrade(strict=create)

    def _check_tables(self) -> None:
        """Refuse a database that holds tables but no equifast ``meta`` with a schema version
        (only reads: the file is left as it is).

        Raises:
            ValueError: naming the file, the tables expected and the tables found.
        """
        tables = [row[0] for row in self._connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "ORDER BY name")]
        if not tables:
            return  # an empty database (or a new file): the schema is created here
        version = None
        if "meta" in tables:
            try:
                version = self._connection.execute(
                    "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            except sqlite3.OperationalError:  # a table named meta, but not ours
                pass
        if version is None:
            found = ", ".join(tables[:12]) + (f" and {len(tables) - 12} more"
                                              if len(tables) > 12 else "")
            raise ValueError(
                f"{self.path} is not an equifast survey store: expected the tables "
                f"{', '.join(_TABLES)} (with a schema_version in meta), found {found}; it was left "
                "unchanged: choose another store file (--store)")

    def _connect(self, create: bool) -> sqlite3.Connection:
        """A connection that has read the schema: read-write, else (``create`` False, and only
        because nothing can be written there) read-only."""
        try:
            return _probed(sqlite3.connect(self.path, timeout=60))
        except sqlite3.OperationalError as error:
            if not _cannot_write(error):
                raise
            if create:
                raise PermissionError(self._cannot_write(error)) from None
            first = error
        # A WAL database needs its -shm file beside it, which a reader creates when it is not
        # there. mode=ro reads without creating it when it is there; immutable=1 promises SQLite
        # that nothing changes the file (nothing can, where nothing can be written), so no -shm
        # is needed at all.
        uri = self.path.resolve().as_uri()
        for how in ("mode=ro", "mode=ro&immutable=1"):
            try:
                connection = _probed(sqlite3.connect(f"{uri}?{how}", uri=True, timeout=60))
            except sqlite3.OperationalError as error:
                last = error
                continue
            self.read_only = how
            wal = self.path.with_name(self.path.name + "-wal")
            if "immutable" in how and wal.is_file() and wal.stat().st_size > 0:
                warnings.warn(f"{self.path} is read as immutable (nothing can be written there): "
                              f"its write-ahead log {wal.name} ({wal.stat().st_size} bytes) is "
                              "not read, so runs committed since its last checkpoint are "
                              "missing; open it once where it can be written to include them",
                              stacklevel=3)
            return connection
        raise PermissionError(f"cannot read the survey store {self.path}: {first}; read-only "
                              f"({how}): {last}") from None

    def _cannot_write(self, error: BaseException) -> str:
        if not self.path.exists():
            # a parent that is an existing file (mkdir says "File exists"), not a folder
            existing = next((p for p in self.path.parents if p.exists()), None)
            if existing is not None and not existing.is_dir():
                return (f"cannot create the survey store {self.path}: {existing} is an existing "
                        "file, not a folder; give --store a path in a folder")
            return (f"cannot create the survey store {self.path}: its folder is read-only "
                    f"({error}); give --store a path in a folder that can be written")
        return (f"cannot write the survey store {self.path}: its folder or file is read-only "
                f"({error}); reading it works (open_store, `equifast report`), to add models "
                "copy it to a writable place and survey into the copy (--store)")

    def _close_quietly(self) -> None:
        connection = getattr(self, "_connection", None)
        if connection is not None:
            connection.close()

    def _upgrade(self, strict: bool = False) -> None:
        """Bring an older store to this version: version 2 added the baseline columns of
        ``scores``, version 3 ``runs.warning``.

        A store that cannot be written (a read-only file) is read as it is: the missing columns
        read as NULL (:meth:`_select`); with ``strict`` (a writer), that is an error.
        """
        missing = [("scores", c, "REAL") for c in BASELINE_COLUMNS
                   if c not in self._columns("scores")]
        if "warning" not in self._columns("runs"):
            missing.append(("runs", "warning", "TEXT"))
        if not missing or self.read_only:
            return
        try:
            with self._connection:
                for table, column, kind in missing:
                    self._connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                self._connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                                         (str(SCHEMA_VERSION),))
        except sqlite3.OperationalError:
            if strict:
                raise

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self._connection.execute(f"PRAGMA table_info({table})")}

    def _score_column(self, column: str, present: set[str]) -> str:
        """The SELECT expression of a frame column in :attr:`scores`."""
        if column == "model":
            return "runs.model"
        if column in LAYER_COLUMNS:
            return f"layers.{column}"
        return f"scores.{column}" if column in present else f"NULL AS {column}"

    def _select(self, table: str, columns: Iterable[str]) -> str:
        """``columns`` of ``table`` for a SELECT; NULL for those an older store lacks."""
        present = self._columns(table)
        return ", ".join(c if c in present else f"NULL AS {c}" for c in columns)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> SurveyStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        counts = dict(self._connection.execute(
            "SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall())
        return (f"SurveyStore({str(self.path)!r}, done={counts.get('done', 0)}, "
                f"failed={counts.get('failed', 0)})")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise PermissionError(
                f"cannot write the survey store {self.path}: it was opened read-only "
                f"({self.read_only}), as nothing can be written there; to add models copy it to "
                "a writable place and survey into the copy (--store)")
        # BEGIN IMMEDIATE takes the write lock at once: two writers wait rather than deadlock.
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield self._connection
        except BaseException:
            self._connection.rollback()
            raise
        self._connection.commit()

    # ---------------------------------------------------------------------------------------
    # writing (the survey driver)

    def environment_id(self, info: dict[str, str | None]) -> int:
        """The ``env_id`` of an environment (:func:`environment_info`), added when new."""
        fingerprint = config_hash(info)
        with self._transaction() as db:
            db.execute(
                f"INSERT OR IGNORE INTO environments (fingerprint, created, "
                f"{', '.join(ENVIRONMENT_COLUMNS)}) VALUES (?, ?, "
                f"{', '.join('?' for _ in ENVIRONMENT_COLUMNS)})",
                (fingerprint, _now(), *[info.get(c) for c in ENVIRONMENT_COLUMNS]),
            )
            row = db.execute("SELECT env_id FROM environments WHERE fingerprint = ?",
                             (fingerprint,)).fetchone()
        return int(row[0])

    def status(self, model: str, config_hash: str) -> str | None:
        """``'done'``, ``'failed'`` or None (not run) for a ``(model, config)`` pair."""
        model = model_key(model)
        row = self._connection.execute(
            "SELECT status FROM runs WHERE model = ? AND config_hash = ?", (model, config_hash)
        ).fetchone()
        return None if row is None else row[0]

    def group_spec_of(self, config_hash: str) -> str | None:
        """The group spec stored with a configuration's earliest run, or None: a later survey
        of the same configuration whose spec is spelt otherwise (``flip:h``, ``flip:horizontal``)
        keeps that one, so that the report shows the configuration as one group."""
        row = self._connection.execute(
            "SELECT group_spec FROM runs WHERE config_hash = ? AND group_spec IS NOT NULL "
            "ORDER BY run_id LIMIT 1", (config_hash,)
        ).fetchone()
        return None if row is None else row[0]

    def device_types_of(self, config_hash: str) -> set[str]:
        """The device types (``"cpu"``, ``"cuda"``) a configuration's finished runs ran on."""
        rows = self._connection.execute(
            "SELECT DISTINCT device FROM runs WHERE config_hash = ? AND status = 'done' "
            "AND device IS NOT NULL", (config_hash,)
        ).fetchall()
        return {str(device).split(":")[0] for (device,) in rows}

    def claim(self, model: str, config_hash: str, owner: str,
              retry_failed: bool = False) -> str | None:
        """Claim a ``(model, config)`` pair for the survey ``owner`` before measuring it.

        Returns:
            None when the pair is ``owner``'s now; else why it is not: done, failed (unless
            ``retry_failed``), or claimed by another survey that is still alive (a claim of a
            process of this machine that no longer runs, or one of another machine older than
            :data:`CLAIM_HOURS`, is taken over).
        """
        model = model_key(model)
        with self._transaction() as db:
            status = self.status(model, config_hash)
            if status == "done":
                return "done: another survey finished it"
            if status == "failed" and not retry_failed:
                return "failed in another survey (--retry-failed measures it again)"
            db.execute(_CLAIMS_TABLE)  # a store of an equifast without claims
            row = db.execute("SELECT owner, hostname, pid, claimed FROM claims WHERE model = ? "
                             "AND config_hash = ?", (model, config_hash)).fetchone()
            if row is not None and row[0] != owner and _claim_alive(*row[1:]):
                return (f"another survey is measuring it (process {row[2]} on {row[1]}, since "
                        f"{row[3]})")
            db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?)",
                       (model, config_hash, owner, socket.gethostname(), os.getpid(), _now()))
        return None

    def release(self, owner: str) -> None:
        """Drop the claims ``owner`` still holds (the models it did not get to record)."""
        if "owner" not in self._columns("claims"):
            return
        with self._transaction() as db:
            db.execute("DELETE FROM claims WHERE owner = ?", (owner,))

    def _drop_claim(self, db: sqlite3.Connection, model: str, config_hash: str) -> None:
        if "owner" in self._columns("claims"):
            db.execute("DELETE FROM claims WHERE model = ? AND config_hash = ?",
                       (model, config_hash))

    def add_result(self, result: Result, *, model: str, config_hash: str, family: str | None,
                   group_spec: str, attempts: int = 1, started: str | None = None,
                   env_id: int | None = None, survey_config: dict[str, Any] | None = None
                   ) -> int:
        """Write a finished model (runs, layers, scores, model scores, skipped files) in one
        transaction; a failed row of the same pair is replaced. ``result.config["warning"]``,
        when there is one, goes to ``runs.warning``; ``survey_config`` (the survey's
        configuration, which ``config_hash`` hashes) is kept in ``runs.config`` under
        ``"survey"``, beside what the engine recorded. Returns the ``run_id``.

        Raises:
            DuplicateRunError: (a ValueError) the pair is already done (another survey finished
                it; the store never holds a duplicate).
        """
        model = model_key(model)
        config = result.config
        frame = result.frame
        with self._transaction() as db:
            if self.status(model, config_hash) == "done":
                raise DuplicateRunError(f"{model} with config {config_hash} is already in "
                                        f"{self.path}")
            db.execute("DELETE FROM runs WHERE model = ? AND config_hash = ?",
                       (model, config_hash))
            self._drop_claim(db, model, config_hash)
            cursor = db.execute(
                "INSERT INTO runs (model, config_hash, family, group_spec, status, pretrained, "
                "note, images, seconds, images_per_second, batch_size, attempts, device, loader, "
                "backend, started, finished, env_id, config, warning) "
                "VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (model, config_hash, family, group_spec, _plain(config.get("pretrained")),
                 config.get("note"), _plain(config.get("images")), _plain(config.get("seconds")),
                 _plain(config.get("images_per_second")), _plain(config.get("batch_size")),
                 attempts, config.get("device"), config.get("loader"), config.get("backend"),
                 started or _now(), _now(), env_id,
                 json.dumps(config if survey_config is None else {**config,
                                                                  "survey": survey_config},
                            default=str),
                 config.get("warning")),
            )
            run_id = int(cursor.lastrowid)
            layers = frame.drop_duplicates("layer")[LAYER_COLUMNS]
            db.executemany(
                f"INSERT INTO layers (run_id, {', '.join(LAYER_COLUMNS)}) VALUES "
                f"(?, {', '.join('?' for _ in LAYER_COLUMNS)})",
                [(run_id, *map(_plain, row)) for row in layers.itertuples(index=False)],
            )
            db.executemany(
                f"INSERT INTO scores (run_id, {', '.join(SCORE_COLUMNS)}) VALUES "
                f"(?, {', '.join('?' for _ in SCORE_COLUMNS)})",
                [(run_id, *map(_plain, row))
                 for row in frame[SCORE_COLUMNS].itertuples(index=False)],
            )
            model_rows = result.model_frame[MODEL_COLUMNS[1:]]
            db.executemany(
                "INSERT INTO model_scores (run_id, metric, value, ci_low, ci_high, n) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(run_id, *map(_plain, row)) for row in model_rows.itertuples(index=False)],
            )
            db.executemany("INSERT INTO skipped (run_id, path, reason) VALUES (?, ?, ?)",
                           [(run_id, str(path), str(reason)) for path, reason in result.skipped])
        return run_id

    def add_error(self, *, model: str, config_hash: str, attempt: int, batch_size: int | None,
                  kind: str, message: str, traceback: str, env_id: int | None = None,
                  fatal: bool = True, group_spec: str | None = None, family: str | None = None,
                  config: dict[str, Any] | None = None) -> None:
        """Record a failure; a fatal one also marks the pair ``failed`` in ``runs`` (one
        transaction), unless it is already done."""
        model = model_key(model)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO errors (model, config_hash, attempt, batch_size, kind, message, "
                "traceback, time, env_id, fatal) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (model, config_hash, attempt, batch_size, kind, message, traceback, _now(),
                 env_id, int(fatal)),
            )
            if fatal and self.status(model, config_hash) != "done":
                self._drop_claim(db, model, config_hash)
                db.execute("DELETE FROM runs WHERE model = ? AND config_hash = ?",
                           (model, config_hash))
                db.execute(
                    "INSERT INTO runs (model, config_hash, family, group_spec, status, "
                    "batch_size, attempts, finished, env_id, config, error) "
                    "VALUES (?, ?, ?, ?, 'failed', ?, ?, ?, ?, ?, ?)",
                    (model, config_hash, family, group_spec, batch_size, attempt, _now(), env_id,
                     json.dumps(config or {}, default=str), message.splitlines()[0][:500]
                     if message else kind),
                )

    # ---------------------------------------------------------------------------------------
    # reading (analysis code)

    def _frame(self, sql: str, params: tuple = (), numeric: Iterable[str] = ()) -> pd.DataFrame:
        """A query's rows; the ``numeric`` columns as numbers even when every value is NULL
        (pandas reads a column of NULLs as objects, None: NaN here, float64)."""
        frame = pd.read_sql_query(sql, self._connection, params=params)
        for column in numeric:
            if column in frame.columns and frame[column].dtype == object:
                frame[column] = frame[column].astype("float64")
        return frame

    @property
    def runs(self) -> pd.DataFrame:
        """One row per ``(model, config)``: status, timing, family, configuration (JSON), the
        error of a failed run and the warning of a finished one."""
        frame = self._frame(f"SELECT {self._select('runs', RUN_COLUMNS)} FROM runs "
                            "ORDER BY run_id", numeric=_RUN_NUMBERS)
        frame["pretrained"] = frame["pretrained"].map(lambda v: None if pd.isna(v) else bool(v))
        return frame

    @property
    def scores(self) -> pd.DataFrame:
        """The per-layer scores of every finished run: :data:`equifast.result.FRAME_COLUMNS` plus
        ``run_id`` and ``group_spec`` (the columns of :attr:`equifast.Result.frame`)."""
        return self._scores()

    def _scores(self, run_id: int | None = None) -> pd.DataFrame:
        """:attr:`scores`, of one run only when ``run_id`` is given (read by that id in SQLite:
        :meth:`result` in a loop over the models of a large store must not read every run)."""
        present = self._columns("scores")
        columns = ", ".join(self._score_column(c, present) for c in FRAME_COLUMNS)
        frame = self._frame(
            f"SELECT scores.run_id, runs.group_spec, {columns} FROM scores "
            "JOIN runs USING (run_id) JOIN layers USING (run_id, layer) "
            "WHERE runs.status = 'done'" + ("" if run_id is None else " AND scores.run_id = ?")
            + " ORDER BY scores.run_id, layers.depth, scores.rowid",
            params=() if run_id is None else (run_id,),
            numeric=_SCORE_NUMBERS,
        )
        for column in ("exact", "pooled"):
            frame[column] = frame[column].astype(bool)
        return frame

    @property
    def layers(self) -> pd.DataFrame:
        """Layer geometry per finished run (``run_id``, ``model`` and the layer columns)."""
        return self._frame(
            "SELECT layers.run_id, runs.model, runs.group_spec, layers.* FROM layers "
            "JOIN runs USING (run_id) WHERE runs.status = 'done' ORDER BY run_id, depth",
            numeric=_LAYER_NUMBERS,
        ).loc[:, lambda f: ~f.columns.duplicated()]

    @property
    def model_scores(self) -> pd.DataFrame:
        """top1, top5 and consistency of every finished run, with ``run_id, group_spec``."""
        return self._model_scores()

    def _model_scores(self, run_id: int | None = None) -> pd.DataFrame:
        return self._frame(
            "SELECT model_scores.run_id, runs.group_spec, runs.model, metric, value, ci_low, "
            "ci_high, n FROM model_scores JOIN runs USING (run_id) WHERE runs.status = 'done'"
            + ("" if run_id is None else " AND model_scores.run_id = ?")
            + " ORDER BY model_scores.run_id, model_scores.rowid",
            params=() if run_id is None else (run_id,),
            numeric=("value", "ci_low", "ci_high", "n"),
        )

    @property
    def skipped(self) -> pd.DataFrame:
        """Unreadable input files, per run."""
        return self._skipped()

    def _skipped(self, run_id: int | None = None) -> pd.DataFrame:
        return self._frame("SELECT skipped.run_id, runs.model, path, reason FROM skipped "
                           "JOIN runs USING (run_id)"
                           + ("" if run_id is None else " WHERE skipped.run_id = ?")
                           + " ORDER BY skipped.rowid",
                           params=() if run_id is None else (run_id,))

    @property
    def errors(self) -> pd.DataFrame:
        """Every recorded failure, with its traceback (``fatal=False``: a retry got past it)."""
        frame = self._frame("SELECT * FROM errors ORDER BY error_id")
        frame["fatal"] = frame["fatal"].astype(bool)
        return frame

    @property
    def environments(self) -> pd.DataFrame:
        return self._frame("SELECT * FROM environments ORDER BY env_id")

    @property
    def meta(self) -> pd.DataFrame:
        """The store's own records (``key``, ``value``: its schema version and the like)."""
        return self._frame("SELECT key, value FROM meta ORDER BY key")

    def tables(self) -> dict[str, pd.DataFrame]:
        """Every table as a frame (what :func:`export_store` writes)."""
        return {"runs": self.runs, "scores": self.scores, "layers": self.layers,
                "model_scores": self.model_scores, "skipped": self.skipped,
                "errors": self.errors, "environments": self.environments, "meta": self.meta}

    def result(self, model: str, group_spec: str | None = None, *,
               config_hash: str | None = None, **settings: Any) -> Result:
        """The finished run of ``model`` as a :class:`equifast.Result`.

        A store can hold a model under several configurations: other groups, or one group
        measured with other settings of :data:`equifast.plots.CONFIGURATION_KEYS` (``subpixel``,
        ``channel_map``, ``align``, ``pooled``, and the survey's ``data``, ``input_size``,
        ``layers``, ``layouts``, ``model_kwargs``), each labelled in the report as
        :func:`equifast.plots.configuration_labels` writes it, e.g. ``rotate:90
        (channel_map=match)``. ``group_spec``, ``config_hash`` and those settings pick one; when
        the runs left are of several configurations, the latest run is returned with a warning
        that names it and lists each configuration's label with its config hash. Runs of one
        configuration that differ only in settings that do not change what is measured (another
        ``limit``, ``bootstrap``...) are one configuration, as in the report: the latest run
        counts (``config_hash`` picks an earlier one).

        Args:
            model: The model (``timm:resnet18`` is ``resnet18``: :func:`model_key`).
            group_spec: Only runs of this group (as stored in ``runs.group_spec``), or of this
                configuration (its label, as the report and the error below write it).
            config_hash: Only the run with this configuration hash (``runs.config_hash``).
            **settings: Only runs measured with these settings of ``CONFIGURATION_KEYS``
                (a setting a run's configuration lacks is :func:`equifast.measure`'s default),
                written as for :func:`~equifast.survey.run_survey`: ``input_size=160`` or
                ``(160, 160)``, ``data`` a folder's path, ``layers="layer1"`` or a list.

        Example:
            >>> store.result("resnet18")              # one configuration   # doctest: +SKIP
            >>> store.result("resnet18", "rotate:90")                        # doctest: +SKIP
            UserWarning: resnet18 has 2 configurations in survey.sqlite that match
            group_spec='rotate:90'; returning the latest run, 'rotate:90 (channel_map=match)'
            (config_hash='c1bbd15e34ee0dfb'); pick one with config_hash=..., a setting
            (subpixel=..., channel_map=..., align=..., pooled=...) or group_spec:
              'rotate:90 (channel_map=identity)': config_hash='3aa3b5bfe13f3869'
              'rotate:90 (channel_map=match)': config_hash='c1bbd15e34ee0dfb'
            >>> store.result("resnet18", "rotate:90", channel_map="match")  # doctest: +SKIP
            >>> store.result("resnet18", "rotate:90 (channel_map=match)")   # the same run
            ...                                                              # doctest: +SKIP
            >>> store.result("resnet18", config_hash="c1bbd15e34ee0dfb")    # doctest: +SKIP

        Raises:
            KeyError: no finished run of that model (the message lists the models there are),
                or none that matches (the message lists the model's configurations).
            TypeError: a keyword that is not one of ``CONFIGURATION_KEYS``.
        """
        from equifast.plots import (
            CONFIGURATION_KEYS,
            _configuration_settings,
            _setting_text,
            configuration_labels,
        )

        unknown = sorted(set(settings) - set(CONFIGURATION_KEYS))
        if unknown:
            raise TypeError(f"result() got unexpected keyword(s) {', '.join(unknown)}: it picks a "
                            f"configuration by group_spec, config_hash or the settings "
                            f"{', '.join(CONFIGURATION_KEYS)}")
        key = model_key(model)
        runs = self.runs
        done = runs[runs.status == "done"]
        mine = done[done.model == key]
        if mine.empty:
            known = sorted(done.model.unique())
            raise KeyError(f"no finished run of {model!r} in {self.path}; finished models: "
                           f"{known}")
        # labelled among every run (a finished run stored before runs kept their survey's
        # configuration reads it from a run of the same config_hash), as in the report
        labels = configuration_labels(runs)[mine.index]
        chosen = mine
        if group_spec is not None:  # a group, or a configuration's label
            chosen = chosen[(chosen.group_spec == group_spec)
                            | (labels[chosen.index] == group_spec)]
        if config_hash is not None:
            chosen = chosen[chosen.config_hash == config_hash]
        if settings and not chosen.empty:
            table = _configuration_settings(runs)
            for name, value in settings.items():
                chosen = chosen[table.loc[chosen.index, name] == _setting_text(value, name)]

        def listing(rows: pd.DataFrame) -> list[str]:
            """One line per configuration (in the order of its first run): its label and config
            hash, the latest run's first where it has several."""
            lines = []
            for label, part in rows.groupby(labels[rows.index], sort=False):
                hashes = [repr(h) for h in part.sort_values("run_id").config_hash[::-1]]
                more = f" (latest; earlier: {', '.join(hashes[1:])})" if len(hashes) > 1 else ""
                lines.append(f"{label!r}: config_hash={hashes[0]}{more}")
            return lines

        asked = ", ".join([f"group_spec={group_spec!r}"] * (group_spec is not None)
                          + [f"config_hash={config_hash!r}"] * (config_hash is not None)
                          + [f"{name}={value!r}" for name, value in settings.items()])
        if chosen.empty:
            raise KeyError(f"no finished run of {key!r} with {asked} in {self.path}; its "
                           f"configurations: {'; '.join(listing(mine))}")
        latest = chosen.loc[chosen.run_id.idxmax()]
        found = labels[chosen.index].nunique()
        if found > 1:
            # The latest run, as before configurations could be picked (analysis code relies on
            # store.result(model)), but never silently: which one it is and what else there is.
            warnings.warn(
                f"{key} has {found} configurations in {self.path}"
                f"{f' that match {asked}' if asked else ''}; returning the latest run, "
                f"{labels[latest.name]!r} (config_hash={latest.config_hash!r}); pick one with "
                f"config_hash=..., a setting "
                f"({', '.join(f'{name}=...' for name in CONFIGURATION_KEYS)}) or group_spec:\n  "
                + "\n  ".join(listing(chosen)), stacklevel=2)
        run_id = int(latest.run_id)
        config = json.loads(latest.config) if isinstance(latest.config, str) else {}
        frame = self._scores(run_id)[FRAME_COLUMNS].reset_index(drop=True)
        model_frame = self._model_scores(run_id)[MODEL_COLUMNS]
        skipped = self._skipped(run_id)
        return Result(frame=frame, model_frame=model_frame.reset_index(drop=True), config=config,
                      skipped=list(zip(skipped.path, skipped.reason)))


def open_store(path: str | os.PathLike) -> SurveyStore:
    """Open an existing survey store for analysis (frames: ``runs``, ``scores``, ``layers``,
    ``model_scores``, ``skipped``, ``errors``, ``environments``).

    Raises:
        FileNotFoundError: there is no store at ``path``.
    """
    return SurveyStore(path, create=False)


def export_store(path: str | os.PathLike, out: str | os.PathLike, format: str = "parquet"
                 ) -> list[Path]:
    """Write every table of a store to ``out/<table>.<format>`` (``parquet`` or ``csv``).

    Returns:
        The files written.

    Raises:
        FileNotFoundError: there is no store at ``path``.
        ValueError: an unknown ``format``; ``out`` (or a parent) is an existing file, or a
            folder that cannot be created or written.
    """
    from equifast.paths import check_folder

    if format not in ("parquet", "csv"):
        raise ValueError(f"format: expected 'parquet' or 'csv', found {format!r}")
    expected = f"expected a folder (for <table>.{format} files)"
    # (created once the store is open: a missing store leaves no empty folder behind)
    check_folder(out, "out", expected=expected, create=False)
    out = Path(out)
    written = []
    with open_store(path) as store:
        check_folder(out, "out", expected=expected)
        for name, frame in store.tables().items():
            target = out / f"{name}.{format}"
            if format == "parquet":
                frame.to_parquet(target, index=False)
            else:
                frame.to_csv(target, index=False)
            written.append(target)
    return written
