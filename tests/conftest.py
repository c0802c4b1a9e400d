"""Shared test configuration. The fixtures come from the framework's pytest plugin
(``framework.testing.pytest``: ``rabbit_config``, ``container_factory``,
``web_session``...), the helpers from ``framework.testing.services``
(``worker_factory``, ``entrypoint_hook``...); sub-directories add their own
conftests.

When to mock and when to use the real thing:

* Inside the bounded context under test, never mock. A service's own RabbitMQ
  traffic goes through the real broker (``rabbit_config`` gives every test a fresh
  vhost), its own tables live in the real PostgreSQL, its own dependency providers
  run for real. Mocking these hides exactly the bugs integration tests exist for:
  wire formats, acks and redelivery, transactions, migrations.
* Outside it, mock. Other services and third parties are replaced at the boundary:
  ``worker_factory`` and ``replace_dependencies`` swap the dependency provider that
  talks to them (an ``RpcProxy``, an HTTP client) for a mock, and the test asserts
  on the calls made across the boundary, which are the published contract.
* Whole-system journeys (``tests/e2e``) mock nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

# Fixtures that reach the real RabbitMQ or PostgreSQL. A test using one (directly or
# through another fixture) is an integration test whether or not its module says so,
# so ``pytest -m "not integration"`` runs with neither service up. Tests that reach
# them some other way (processes, raw sockets) carry the marker themselves.
INTEGRATION_FIXTURES = frozenset(
    {
        "rabbit_manager",
        "rabbit_config",
        "rabbit_ssl_config",
        "amqp_uri",
        "vhost_pipeline",
        "get_message_from_queue",
    }
)
INTEGRATION_FIXTURE_PREFIXES = ("pg_", "postgres")


def _needs_real_services(item: pytest.Item) -> bool:
    if item.get_closest_marker("e2e") is not None:
        return True
    names = set(getattr(item, "fixturenames", ()))
    return bool(names & INTEGRATION_FIXTURES) or any(
        name.startswith(INTEGRATION_FIXTURE_PREFIXES) for name in names
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (
            _needs_real_services(item)
            and item.get_closest_marker("integration") is None
        ):
            item.add_marker(pytest.mark.integration)


# Debian's package (CI installs it); Playwright cannot download its own browser here.
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright's sync API, one for the whole session.

    One, because the sync API marks an event loop as running in this thread until
    ``stop()``, and a second ``sync_playwright()`` then fails ("Sync API inside the
    asyncio loop"); and ``stop()`` itself waits for ever under eventlet's monkey
    patching, so at the end the driver process is killed instead.
    """
    from playwright.sync_api import sync_playwright

    manager = sync_playwright()
    playwright = manager.start()
    browser = playwright.chromium.launch(executable_path=CHROMIUM)
    yield browser
    browser.close()
    try:
        manager._client._transport._proc.kill()
    except Exception:
        pass
