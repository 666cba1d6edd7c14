"""Engine construction and the one unit-of-work scope every store operation runs in."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from collm_fl.errors import StoreError
from collm_fl.store.models import Base

log = logging.getLogger(__name__)


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the schema created; SQLite gets WAL and foreign keys."""
    try:
        parsed = make_url(url)
    except SQLAlchemyError as e:
        raise StoreError(f"invalid database URL {url!r}: {e}") from e
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database not in (None, "", ":memory:"):
        db = parsed.database
        if not db.startswith("file:"):  # URI filenames are the caller's business
            Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url)
        if is_sqlite:
            event.listen(engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(engine)
    except SQLAlchemyError as e:
        raise StoreError(f"cannot open database {parsed.render_as_string()}: {e}") from e
    log.debug("opened database %s", parsed.render_as_string())
    return engine


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: commit once when the block ends, roll back if it raises.

    Database errors come out as :class:`StoreError`; other exceptions pass through unchanged.
    """
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except SQLAlchemyError as e:
        session.rollback()
        raise StoreError(f"database error: {e}") from e
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _sqlite_pragmas(dbapi_conn: object, _record: object) -> None:
    cursor = dbapi_conn.cursor()  # type: ignore[attr-defined]
    try:
        # WAL lets readers (the dashboard, `collm` CLI) see committed rounds while training writes.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()
