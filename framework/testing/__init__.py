"""Test support: service helpers (``services``), small utilities (``utils``,
``waiting``), a RabbitMQ management client (``rabbit``), a websocket client
(``websocket``) and the pytest plugin (``pytest``, registered as an entry point).

Kept empty of imports: the pytest plugin must monkey patch before anything here
pulls in kombu or the container machinery.
"""
