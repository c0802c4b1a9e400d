"""Emails stored normalised (NFKC + case folding), unique as stored.

Until now an email was stored as registered and unique by ``lower(email)``, which
PostgreSQL and Python disagree on (final sigma, dotted İ). Each existing email is
rewritten to ``services.users.schemas.normalise_email``'s form, and the index
becomes a plain unique index on the stored form.

Two existing accounts whose emails normalise alike (the bug this fixes let them
register) stop the upgrade with their ids: which one keeps the address is for a
person to decide.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from services.users.schemas import normalise_email

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

users = sa.table("users", sa.column("id", sa.Integer), sa.column("email", sa.String))


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.select(users.c.id, users.c.email)).all()
    owners: dict[str, list[int]] = {}
    for user_id, email in rows:
        owners.setdefault(normalise_email(email), []).append(user_id)
    clashes = sorted(ids for ids in owners.values() if len(ids) > 1)
    if clashes:
        raise RuntimeError(
            "accounts whose emails are the same once normalised (user ids): "
            + "; ".join(", ".join(map(str, ids)) for ids in clashes)
            + ". Change or delete all but one of each group, then upgrade again."
        )
    op.drop_index("uq_users_email_lower", table_name="users")
    for user_id, email in rows:
        normalised = normalise_email(email)
        if normalised != email:
            connection.execute(
                users.update().where(users.c.id == user_id).values(email=normalised)
            )
    op.create_index("uq_users_email", "users", ["email"], unique=True)


def downgrade() -> None:
    # The original spelling is gone; normalised emails stay as they are.
    op.drop_index("uq_users_email", table_name="users")
    op.create_index(
        "uq_users_email_lower", "users", [sa.text("lower(email)")], unique=True
    )
