"""HTTP and websocket entrypoints, served by one shared web server per container.

* ``framework.web.handlers``: ``@http(method, url)``;
* ``framework.web.websocket``: ``@rpc`` for websocket clients, ``WebSocketHubProvider``;
* ``framework.web.server``: the shared ``WebServer`` (``WEB_SERVER_ADDRESS``).

The same module layout as ``nameko.web``, so ``from framework.web.handlers import
http`` reads as ``from nameko.web.handlers import http`` does.
"""
