"""Schedules and runs, and the built-in schedules.

The built-ins are ordinary rows, editable (or deletable) like any other schedule;
``next_fire_at`` is left NULL and computed by the first replica that sees them.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Heartbeats of a running conversion older than this mean its worker died.
STALLED_AFTER_SECONDS = 300
# Conversion outputs are kept a week.
OUTPUTS_KEPT_SECONDS = 7 * 24 * 3600

BUILT_IN_SCHEDULES = [
    {
        "name": "Requeue stalled conversions",
        "cron": "* * * * *",
        "target": {
            "kind": "rpc",
            "service": "conversions",
            "method": "requeue_stalled",
            "kwargs": {"heartbeat_older_than_seconds": STALLED_AFTER_SECONDS},
        },
        # A missed minute is covered by the next one.
        "missed_run_policy": "skip",
        "catchup_window_seconds": 60,
        "timeout_seconds": 50,
    },
    {
        "name": "Purge expired conversion outputs",
        "cron": "0 3 * * *",
        "target": {
            "kind": "rpc",
            "service": "conversions",
            "method": "purge_expired",
            "kwargs": {"older_than_seconds": OUTPUTS_KEPT_SECONDS},
        },
        "missed_run_policy": "run_once",
        "catchup_window_seconds": 12 * 3600,
        "timeout_seconds": 600,
    },
    {
        "name": "Nightly users export",
        "cron": "30 2 * * *",
        "target": {
            "kind": "rpc",
            "service": "conversions",
            "method": "export_users",
            "kwargs": {"target_format": "csv"},
        },
        "missed_run_policy": "run_once",
        "catchup_window_seconds": 12 * 3600,
        "timeout_seconds": 600,
    },
]


def upgrade() -> None:
    schedules = op.create_table(
        "schedules",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("cron", sa.String(200), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("missed_run_policy", sa.String(16), nullable=False),
        sa.Column("catchup_window_seconds", sa.Integer(), nullable=False),
        sa.Column("overlap_policy", sa.String(16), nullable=False),
        sa.Column("jitter_seconds", sa.Integer(), nullable=False),
        sa.Column("timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("history_limit", sa.Integer(), nullable=False),
        sa.Column("next_fire_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("queued_for", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_schedules_next_fire_at", "schedules", ["next_fire_at"])
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "schedule_id",
            sa.Integer(),
            sa.ForeignKey("schedules.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replica", sa.String(255), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("result_summary", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.UniqueConstraint("schedule_id", "scheduled_for", name="uq_runs_tick"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_runs_schedule_id_id", "runs", ["schedule_id", "id"])
    op.create_index("ix_runs_outcome_deadline", "runs", ["outcome", "deadline_at"])

    now = datetime.now(UTC)
    op.bulk_insert(
        schedules,
        [
            {
                "timezone": "UTC",
                "enabled": True,
                "overlap_policy": "skip",
                "jitter_seconds": 0,
                "history_limit": 100,
                "next_fire_at": None,
                "queued_for": None,
                "created_at": now,
                "updated_at": now,
                **schedule,
            }
            for schedule in BUILT_IN_SCHEDULES
        ],
    )


def downgrade() -> None:
    op.drop_index("ix_runs_outcome_deadline", table_name="runs")
    op.drop_index("ix_runs_schedule_id_id", table_name="runs")
    op.drop_table("runs")
    op.drop_index("ix_schedules_next_fire_at", table_name="schedules")
    op.drop_table("schedules")
