"""Alembic environment of the users service: see framework.migrations."""

from alembic import context

from framework.migrations import run_migrations
from services.users.models import Base

run_migrations(context, Base)
