"""Every service refuses to start in production with a development default secret.

compose.yaml gives every service a development database password so that
``docker compose up`` works with no settings; ENVIRONMENT=production must then
stop each of them at start, naming the key (never its value).
"""

from __future__ import annotations

from typing import Any

import pytest

from framework.exceptions import ConfigurationError
from framework.settings import DEVELOPMENT_DATABASE_PASSWORD
from services.conversions.service import ConversionsService
from services.scheduler.service import SchedulerService
from services.users.service import UsersService
from services.web.service import WebService

DEV_DATABASE_URL = f"postgresql://postgres:{DEVELOPMENT_DATABASE_PASSWORD}@db/app"


@pytest.mark.parametrize(
    "service_cls",
    [UsersService, ConversionsService, SchedulerService, WebService],
    ids=lambda cls: cls.name,
)
def test_production_refuses_the_development_database_password(
    service_cls: type, container_factory: Any, memory_config: dict[str, Any], tmp_path
) -> None:
    config = {
        **memory_config,
        "ENVIRONMENT": "production",
        "DATABASE_URL": DEV_DATABASE_URL,
        "SECRET_KEY": "a-real-production-secret-key-of-enough-length-0123456789",
        "ADMIN_PASSWORD": "a-real-admin-password",
        "STORAGE_URL": str(tmp_path),
    }
    container = container_factory(service_cls, config)

    with pytest.raises(ConfigurationError, match="DATABASE_URL") as refused:
        container.start()

    assert DEVELOPMENT_DATABASE_PASSWORD not in str(refused.value)
