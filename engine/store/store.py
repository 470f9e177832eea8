"""The durable store: group-commit writer thread, claims, stats (SQLAlchemy only, no Twisted).

Durability contract: a callback of ``submit_ingest``/``submit`` runs only after the COMMIT holding
its rows returned; if the transaction failed, every callback of it gets the exception.

Parts (one module each): ``writer`` (group commit, SQLite settings, checkpoints), ``batch``
(the rows of one ingest batch), ``dedup`` (duplicate keys on SQLite), ``queue`` (claims,
completion, replay, documents), ``step_writes`` (what processing steps write), ``held_writes``
(registry writes of a batch held and sent grouped), ``read_model``
(messages, entries, stats for the CLI and ``/status``), ``sql`` (shared SQL text), ``accounts``
(local users), ``audit`` (the append-only audit trail), ``controls`` (pause, resume, retry now).

Sync API (claims, completion, replay, reads) uses the pooled engine from the calling thread; on
SQLite write transactions there start with ``BEGIN IMMEDIATE``, reads with a deferred ``BEGIN``.
Claims on PostgreSQL lock the head rows with ``FOR UPDATE SKIP LOCKED``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import sqlalchemy as sa
from sqlalchemy import event

from engine.histogram import Histogram


from .sql import ENTRY_COLS, EVENT_COLS, MSG_COLS, json_text
from .wal_index import release as release_wal_index, shm_path
from .writer import JOURNAL_SIZE_LIMIT, SQLITE_BUSY_TIMEOUT_MS, SQLITE_PAGE_SIZE, WRITER_LINGER_FACTOR, WRITER_LINGER_MAX_S, Job

from .accounts import AccountsMixin
from .audit import AuditMixin
from .batch import BatchMixin
from .controls import ControlsMixin
from .dedup import DedupMixin
from .queue import QueueMixin
from .read_model import ReadModelMixin
from .receipts import ReceiptsMixin
from .retention import RetentionMixin
from .step_writes import StepWritesMixin
from .writer import WriterMixin

log = logging.getLogger(__name__)

T = TypeVar("T")


class Store(WriterMixin, DedupMixin, BatchMixin, QueueMixin, StepWritesMixin, ReadModelMixin,
            ReceiptsMixin, AccountsMixin, AuditMixin, ControlsMixin, RetentionMixin):
    """One store: SQLite or PostgreSQL, one writer thread, pooled connections for the rest."""

    def __init__(self, url: str, *, dedup_window_seconds: float = 7 * 86400, pool_size: int = 5):
        self.url = url
        self.dedup_window_seconds = float(dedup_window_seconds)
        u = sa.engine.make_url(url)
        self.dialect = u.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database backend {self.dialect!r}")
        self._sqlite = self.dialect == "sqlite"
        if self._sqlite:
            db = u.database
            if db and db != ":memory:" and not db.startswith("file:"):
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(url, pool_size=pool_size, max_overflow=10,
                                           json_serializer=json_text)
            event.listen(self.engine, "connect", self._sqlite_on_connect)
            event.listen(self.engine, "begin", self._sqlite_on_begin)
            self._ph = "?"
        else:
            self.engine = sa.create_engine(url, pool_size=pool_size, max_overflow=10,
                                           pool_pre_ping=True, json_serializer=json_text)
            self._ph = "%s"
        self._wengine = self.engine.execution_options(minipfi_write=True)
        ph = self._ph
        self._sql_ins_msg = f"INSERT INTO messages ({MSG_COLS}) VALUES ({', '.join([ph] * 20)})"
        self._sql_ins_entry = (
            f"INSERT INTO queue_entries ({ENTRY_COLS}) VALUES ({', '.join([ph] * 14)})"
        )
        self._sql_ins_event = f"INSERT INTO events ({EVENT_COLS}) VALUES ({', '.join([ph] * 7)})"
        self._sql_nextval: str | None = None

        # writer state
        self._queue: deque[Job] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._wconn: sa.Connection | None = None
        self._id_pool: deque[int] = deque()
        self._pipe = None  # PostgreSQL: the psycopg pipeline of the running step transaction
        self._phase_commit = False
        self._queued_at_commit = 0
        self._linger_target: int | None = None  # set while lingering: submits wake only at it
        # Called in the writer thread after all the callbacks of a transaction (and after a
        # refused submit's callback): lets a consumer hand the results of one commit over to
        # another thread in ONE wake-up (engine.ingest.IngestBatcher).
        self.after_batch: Callable[[], None] | None = None
        # SQLite checkpoints (see engine.store.writer): the WAL-index read after each
        # transaction, and the writer's checkpoints
        self._shm = shm_path(u.database) if self._sqlite else None
        self._wal_written = False
        self._wal_ckpt_frames = 0
        self._wal_next_check = 0.0
        self.checkpoints = 0
        self.checkpoint_failures = 0
        self.checkpoint_s = 0.0
        # SQLite duplicate keys not yet in dedup_index (see "Duplicate keys on SQLite"):
        # committed ones, and those of the open transaction; key -> [(id, sha256, received_at, ack)]
        self._recent_keys: dict[str, list] = {}
        self._recent_n = 0
        self._staged_keys: dict[str, list] = {}
        self._staged_n = 0
        self._merging = False
        self.writer_healthy = True
        self.linger = WRITER_LINGER_MAX_S
        self.linger_factor = WRITER_LINGER_FACTOR
        # records submitted / taken by the writer (each written by one thread only; their
        # difference is what is queued, for the linger)
        self._submitted = 0
        self._taken = 0
        self.batches = 0            # counters for benchmarks / status
        self.batched_jobs = 0
        self.batched_records = 0
        self.busy_s = 0.0           # time in transactions + callbacks
        self.linger_s = 0.0
        self.commit_s = 0.0         # time in COMMIT (SQLite: the WAL write and its fsync)
        self.commit_time = Histogram()  # seconds per committed transaction of the writer (/metrics)
        # stats(): message and duplicate counts up to these ids (see stats)
        self._stats_lock = threading.Lock()
        self._stats_msgs: dict[tuple[str, str], int] = {}
        self._stats_dups: dict[str, int] = {}
        self._stats_codes: dict[tuple[str, str, str, str], int] = {}
        self._stats_msg_mark = 0
        self._stats_dup_mark = 0

    # ------------------------------------------------------------------ setup
    @staticmethod
    def default_url(data_dir: Path) -> str:
        return f"sqlite:///{Path(data_dir) / 'minipfi.db'}"

    @staticmethod
    def _sqlite_on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _sqlite_on_begin)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA page_size={SQLITE_PAGE_SIZE}")  # only effective on a new file
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
        cur.close()

    @staticmethod
    def _sqlite_on_begin(conn):
        if conn.connection.driver_connection.in_transaction:
            return  # the writer began it on the driver's connection (see _transaction)
        if conn.get_execution_options().get("minipfi_write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    def migrate(self) -> None:
        """``alembic upgrade head`` on this database; idempotent."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self._wengine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").scalar()
            return True
        except Exception:  # noqa: BLE001
            return False

    def dispose(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.stop()
        self.engine.dispose()
        release_wal_index(self._shm)

    # ------------------------------------------------------------------ sync API
    @contextmanager
    def _write_tx(self) -> Iterator[sa.Connection]:
        with self._wengine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            yield conn

    def in_transaction(self, op: Callable[[sa.Connection], T]) -> T:
        """``op(conn)`` in a write transaction of its own, from the calling thread."""
        with self._write_tx() as conn:
            return op(conn)

    def _event(self, conn: sa.Connection, kind: str, *, channel=None, destination=None,
               message_id=None, entry_id=None, detail: dict | None = None, at=None) -> None:
        conn.execute(
            sa.text(f"INSERT INTO events ({EVENT_COLS}) VALUES "
                    "(:at, :kind, :channel, :destination, :message_id, :entry_id, :detail)"),
            {"at": time.time() if at is None else at, "kind": kind, "channel": channel,
             "destination": destination, "message_id": message_id, "entry_id": entry_id,
             "detail": json.dumps(detail or {})})

    def add_event(self, kind: str, *, channel=None, destination=None, message_id=None,
                  entry_id=None, detail: dict | None = None) -> None:
        with self._write_tx() as conn:
            self._event(conn, kind, channel=channel, destination=destination,
                        message_id=message_id, entry_id=entry_id, detail=detail)
