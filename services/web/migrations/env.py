"""Alembic environment of the web service: see framework.migrations."""

from alembic import context

from framework.migrations import run_migrations
from services.web.models import Base

run_migrations(context, Base)
