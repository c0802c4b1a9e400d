"""``services.web.http``: how the web service's server treats its connections."""

from __future__ import annotations

import socket

from services.web.http import EdgeServer

from .conftest import App


def test_connections_send_each_write_at_once(app: App) -> None:
    """Nagle's algorithm off (TCP_NODELAY on the listening socket, which the
    accepted connections inherit): with it on, a page written in two pieces
    waited for the client's delayed acknowledgement of the first, 40 ms on
    every keep-alive request for a page over about 16 KB."""
    server = app.web.shared_extensions[EdgeServer]
    listening = server._sock

    assert listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert app.admin().get("/conversions").status_code == 200
