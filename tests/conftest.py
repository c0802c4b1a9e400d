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
