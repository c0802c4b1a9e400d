"""The jobs list's indexes end with ``id``: pages by key and deep pages by number.

The list is ordered by ``(created_at, id)``, newest first. With ``id`` in each
index, a page after a cursor is one index range, and a page deep in the list
skips the earlier pages inside the index alone (no table rows read), under each
filter the list takes: none, owner, state, owner and state. The old indexes are
prefixes of the new ones, so they go.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

NEW = {
    "ix_jobs_created_id": ["created_at", "id"],
    "ix_jobs_owner_created_id": ["owner", "created_at", "id"],
    "ix_jobs_state_created_id": ["state", "created_at", "id"],
    "ix_jobs_owner_state_created_id": ["owner", "state", "created_at", "id"],
}
OLD = {
    "ix_jobs_state_created": ["state", "created_at"],
    "ix_jobs_owner_created": ["owner", "created_at"],
    "ix_jobs_created": ["created_at"],
}


def upgrade() -> None:
    for name, columns in NEW.items():
        op.create_index(name, "jobs", columns)
    for name in OLD:
        op.drop_index(name, table_name="jobs")


def downgrade() -> None:
    for name, columns in OLD.items():
        op.create_index(name, "jobs", columns)
    for name in NEW:
        op.drop_index(name, table_name="jobs")
