"""ORM tables of the version store: runs, rounds, adapter versions, participations, events.

Rows are internal to :mod:`collm_fl.store`; callers see the frozen dataclasses of
:mod:`collm_fl.store.repository`. Free-form metrics and configs are JSON text columns so the schema
does not change every time a strategy reports a new number.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One federated fine-tuning run; versions live under ``runs/<name>/versions``."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    config_json: Mapped[str] = mapped_column(Text, default="{}")
    base_model: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(32), default="running")


class Version(Base):
    """An adapter version on disk; number 0 is the initial adapter, then 1, 2, 3... per run."""

    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("run_id", "number", name="uq_versions_run_number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int]
    round_number: Mapped[int]
    path: Mapped[str] = mapped_column(String(1024))  # relative to the store root, POSIX separators
    sha256: Mapped[str] = mapped_column(String(64))  # of adapter_model.safetensors
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")
    eval_loss: Mapped[float | None] = mapped_column(Float)
    parent_number: Mapped[int | None]  # the version this one was aggregated from


class Round(Base):
    """The outcome of one federated round (aggregated, kept the previous adapter, or failed)."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number", name="uq_rounds_run_number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int]
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(32))  # "aggregated" | "kept-previous" | "failed"
    num_ok: Mapped[int] = mapped_column(default=0)
    num_rejected: Mapped[int] = mapped_column(default=0)
    num_failed: Mapped[int] = mapped_column(default=0)
    train_loss: Mapped[float | None] = mapped_column(Float)
    eval_loss: Mapped[float | None] = mapped_column(Float)
    eval_perplexity: Mapped[float | None] = mapped_column(Float)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id"))
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")


class Participation(Base):
    """What one node did in one round: ok, rejected by validation, or failed."""

    __tablename__ = "participations"
    __table_args__ = (Index("ix_participations_run_round", "run_id", "round_number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    round_number: Mapped[int]
    # Flower node ids are unsigned 64-bit: beyond SQL's signed BIGINT, so kept as decimal text.
    node_id: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(32))  # "ok" | "rejected" | "failed"
    reason: Mapped[str | None] = mapped_column(Text)
    # A node's claim, up to MAX_NUM_EXAMPLES (2**53): BIGINT, as INTEGER is 32-bit on PostgreSQL
    # and MySQL (SQLite's is 64-bit either way).
    num_examples: Mapped[int | None] = mapped_column(BigInteger)
    train_loss: Mapped[float | None] = mapped_column(Float)
    metrics_json: Mapped[str] = mapped_column(Text, default="{}")


class Event(Base):
    """A timestamped decision or observation (e.g. an allocation decision) with a JSON payload."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_run_kind", "run_id", "kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(64))
    payload_json: Mapped[str] = mapped_column(Text, default="{}")
