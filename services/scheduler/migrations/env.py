"""Alembic environment of the scheduler service: see framework.migrations."""

from alembic import context

from framework.migrations import run_migrations
from services.scheduler.models import Base

run_migrations(context, Base)
