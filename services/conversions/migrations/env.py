"""Alembic environment of the conversions service: see framework.migrations."""

from alembic import context

from framework.migrations import run_migrations
from services.conversions.models import Base

run_migrations(context, Base)
