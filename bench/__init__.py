"""Benchmarks: our framework and nameko 2.14.1 side by side on one RabbitMQ.

``python -m bench`` runs everything and prints the table; see ``bench/README.md``.

The package is imported by both virtual environments (the measuring clients run
under nameko's venv as well as ours), so modules that clients import
(``client``, ``payloads``, ``raw``) use only the standard library, py-amqp and the
framework under test.
"""
