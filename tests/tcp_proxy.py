"""A TCP proxy in front of a local server (RabbitMQ, PostgreSQL) whose plug a test
can pull.

Run as its own process (plain threads, no eventlet):
``python tcp_proxy.py PORT [UPSTREAM_PORT]`` (upstream default 5672, RabbitMQ).
Commands come on stdin, one per line, each answered on stdout once done: ``cut``
closes every connection and stops listening (to clients the server is down),
``restore`` listens again (the server is back). Prints ``ready`` once listening.
(A pipe rather than signals: the answer tells the test the change has happened.)
"""

from __future__ import annotations

import socket
import sys
import threading

UPSTREAM_HOST = "127.0.0.1"


class Proxy:
    def __init__(self, port: int, upstream_port: int) -> None:
        self.port = port
        self.upstream = (UPSTREAM_HOST, upstream_port)
        self.listener: socket.socket | None = None
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()

    def listen(self) -> None:
        with self.lock:
            if self.listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self.listener = listener
        threading.Thread(target=self.accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            connections, self.connections = self.connections, set()
        if listener is not None:
            # close() alone does not wake a thread blocked in accept(): the kernel
            # keeps listening until that call returns. shutdown() does wake it.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self.connections.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(src, dst), daemon=True).start()

    def pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main() -> None:
    upstream_port = int(sys.argv[2]) if len(sys.argv) > 2 else 5672
    proxy = Proxy(int(sys.argv[1]), upstream_port)
    proxy.listen()
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "cut":
            proxy.cut()
        elif command == "restore":
            proxy.listen()
        print(command, flush=True)


if __name__ == "__main__":
    main()
