"""The HTTP benchmark's service under our framework (identical below the marker in
``http_services_nameko.py``)."""

from __future__ import annotations

from framework.web.handlers import http

# -- identical in http_services_ours.py and http_services_nameko.py below this line --


class BenchWeb:
    name = "bench_web"

    @http("GET", "/ping")
    def ping(self, request):
        return "pong"

    @http("GET", "/json")
    def json(self, request):
        return 200, {"Content-Type": "application/json"}, '{"hello": "world"}'

    @http("POST", "/echo")
    def echo(self, request):
        return request.get_data(as_text=True)
