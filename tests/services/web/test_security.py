"""The web service's security rules, checked over HTTP against the running service.

Authorization is checked route by route, for every route the service serves: the
routes are enumerated from the server's URL map, not listed here, so a route
added later is covered (and a new public route fails the test until it is
deliberately added to ``PUBLIC_ROUTES``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import requests
import websocket as websocket_client
from werkzeug.routing import AnyConverter, IntegerConverter, PathConverter

from framework.exceptions import ConfigurationError
from services.web.http import EdgeServer, Route
from services.web.service import WebService

from .conftest import ADMIN_EMAIL, ADMIN_PASSWORD, App

# The only routes an anonymous caller may reach: logging in, getting a token,
# and the static files the login page needs.
PUBLIC_ROUTES = {
    ("GET", "/login"),
    ("POST", "/login"),
    ("GET", "/static/<path:filename>"),
    ("POST", "/api/v1/tokens"),
}
SAMPLE_ID = "00000000-0000-4000-8000-000000000000"


def served_routes(app: App) -> list[tuple[str, str, str, Route]]:
    """``(method, rule, url, route)`` for every HTTP route the web server serves."""
    server = app.web.shared_extensions[EdgeServer]
    adapter = server.url_map.bind("localhost")
    found = []
    for rule in server.url_map.iter_rules():
        if not isinstance(rule.endpoint, Route):
            continue
        values: dict[str, Any] = {}
        for name, converter in rule._converters.items():
            if isinstance(converter, IntegerConverter):
                values[name] = 1
            elif isinstance(converter, AnyConverter):
                values[name] = sorted(converter.items)[0]
            elif isinstance(converter, PathConverter):
                values[name] = "app.css"
            else:
                values[name] = SAMPLE_ID
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            url = adapter.build(rule.endpoint, values, method=method)
            found.append((method, rule.rule, url, rule.endpoint))
    assert len(found) > 50, "the URL map should hold every route"
    return found


def test_only_the_login_and_token_routes_are_public(app: App) -> None:
    public = {
        (method, rule)
        for method, rule, _, route in served_routes(app)
        if route.access == "public"
    }
    assert public == PUBLIC_ROUTES


def test_every_other_route_refuses_anonymous_callers(app: App) -> None:
    anonymous = app.session()
    for method, rule, url, route in served_routes(app):
        if (method, rule) in PUBLIC_ROUTES:
            continue
        response = anonymous.request(method, url, allow_redirects=False)
        if route.api:
            assert response.status_code == 401, (method, url, response.text)
            assert response.headers["Content-Type"] == "application/problem+json"
            assert response.json()["status"] == 401
        else:
            assert response.status_code == 303, (method, url, response.text)
            assert response.headers["Location"].startswith("/login?next=")


def test_every_admin_route_refuses_members(app: App) -> None:
    app.create_member("member@example.com", "member password")
    panel = app.session()
    assert panel.login("member@example.com", "member password").status_code == 303
    api = app.api(app.token("member@example.com", "member password"))
    admin_routes = [r for r in served_routes(app) if r[3].access == "admin"]
    assert len(admin_routes) > 20
    for method, _, url, route in admin_routes:
        if route.api:
            response = api.request(method, url, allow_redirects=False)
            assert response.status_code == 403, (method, url, response.text)
            assert response.json()["title"] == "Forbidden"
        else:
            response = panel.request(
                method, url, data={"csrf_token": panel.csrf}, allow_redirects=False
            )
            assert response.status_code == 403, (method, url, response.text)
            assert "this needs an administrator" in response.text


def test_the_api_ignores_session_cookies(app: App) -> None:
    panel = app.admin()
    response = panel.get("/api/v1/users")
    assert response.status_code == 401
    assert panel.get("/users").status_code == 200


def test_a_revoked_or_unknown_token_is_refused(app: App) -> None:
    token = app.token()
    api = app.api(token)
    assert api.get("/api/v1/conversions").status_code == 200
    assert app.api(token + "x").get("/api/v1/conversions").status_code == 401
    panel = app.admin()
    page = panel.get("/tokens").text
    token_id = int(page.split('action="/tokens/')[1].split("/")[0])
    assert panel.submit(f"/tokens/{token_id}/revoke").status_code == 303
    assert api.get("/api/v1/conversions").status_code == 401


def test_tokens_are_stored_hashed(app: App) -> None:
    token = app.token()
    state = app.web.shared_extensions  # noqa: F841 -- the store is a dependency
    store = next(e for e in app.web.extensions if type(e).__name__ == "EdgeStore")
    with store.engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT token_hash, prefix FROM web_api_tokens"
        ).fetchall()
    assert rows and all(token not in row[0] for row in rows)
    assert rows[0][1] == token[:10]


# -- the panel's sessions and forms ------------------------------------------------------


def test_session_cookie_is_http_only_and_same_site_lax(app: App) -> None:
    panel = app.session()
    response = panel.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    cookie = response.headers["Set-Cookie"]
    session_cookie = [
        c
        for c in response.raw.headers.getlist("Set-Cookie")
        if c.startswith("web_session=")
    ][0]
    assert "HttpOnly" in session_cookie
    assert "SameSite=Lax" in session_cookie
    assert "Secure" not in session_cookie  # served over plain HTTP here
    assert cookie


def test_cookies_are_secure_when_served_over_https(app: App) -> None:
    store = next(e for e in app.web.extensions if type(e).__name__ == "EdgeStore")
    object.__setattr__(store.state.settings, "cookie_secure", "true")
    response = app.session().get("/login")
    assert "Secure" in response.headers["Set-Cookie"]
    object.__setattr__(store.state.settings, "cookie_secure", "auto")
    assert "Secure" not in app.session().get("/login").headers["Set-Cookie"]
    https = app.session().get("/login", headers={"X-Forwarded-Proto": "https"})
    assert "Secure" not in https.headers["Set-Cookie"]  # no proxy is trusted


def test_a_form_posted_without_its_csrf_token_is_refused(app: App) -> None:
    panel = app.admin()
    response = panel.post(
        "/users",
        data={"email": "x@example.com", "password": "password1", "display_name": "X"},
        allow_redirects=False,
    )
    assert response.status_code == 403
    assert "CSRF" in response.text
    response = panel.submit(
        "/users",
        {"email": "x@example.com", "password": "password1", "display_name": "X"},
    )
    assert response.status_code == 303


def test_the_login_form_needs_its_own_csrf_token(app: App) -> None:
    response = app.session().post(
        "/login",
        data={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "csrf_token": "forged"},
        allow_redirects=False,
    )
    assert response.status_code == 403
    assert "web_session" not in response.headers.get("Set-Cookie", "")


def test_logout_ends_the_session_on_the_server(app: App) -> None:
    panel = app.admin()
    stolen = dict(panel.cookies)
    assert panel.submit("/logout").status_code == 303
    replay = app.session()
    replay.cookies.update(stolen)
    response = replay.get("/", allow_redirects=False)
    assert response.status_code == 303
    assert response.headers["Location"].startswith("/login")


def test_deactivating_a_user_ends_their_sessions_and_tokens(app: App) -> None:
    member = app.create_member()
    panel = app.session()
    panel.login("member@example.com", "member password")
    api = app.api(app.token("member@example.com", "member password"))
    assert panel.get("/conversions").status_code == 200
    admin = app.api(app.token())
    assert (
        admin.patch(
            f"/api/v1/users/{member['id']}", json={"is_active": False}
        ).status_code
        == 200
    )
    assert panel.get("/conversions", allow_redirects=False).status_code == 303
    assert api.get("/api/v1/conversions").status_code == 401


def test_a_password_change_ends_the_users_sessions(app: App) -> None:
    member = app.create_member()
    panel = app.session()
    panel.login("member@example.com", "member password")
    from framework.standalone.rpc import ClusterRpcProxy
    from framework.testing.services import entrypoint_waiter
    from services.users.service import UsersService

    with entrypoint_waiter(app.web, "on_user_updated"):
        with ClusterRpcProxy(app.config) as rpc:
            rpc.users.change_password(member["id"], "member password", "a new password")
    assert UsersService  # the users service dispatched user_updated(changed=password)
    assert panel.get("/conversions", allow_redirects=False).status_code == 303


def test_a_password_reset_announced_by_users_ends_sessions_and_tokens(
    app: App,
) -> None:
    """However the reset reached the users service (here a script's RPC, not the
    web's routes), its event ends what the old password opened."""
    member = app.create_member()
    panel = app.session()
    panel.login("member@example.com", "member password")
    api = app.api(app.token("member@example.com", "member password"))
    from framework.standalone.rpc import ClusterRpcProxy
    from framework.testing.services import entrypoint_waiter

    with entrypoint_waiter(app.web, "on_user_updated"):
        with ClusterRpcProxy(app.config) as rpc:
            rpc.users.reset_password(member["id"], "a new password")
    assert panel.get("/conversions", allow_redirects=False).status_code == 303
    assert api.get("/api/v1/conversions").status_code == 401


def test_a_session_idle_too_long_has_expired(app: App) -> None:
    import time_machine

    panel = app.admin()
    assert panel.get("/", allow_redirects=False).status_code == 200
    with time_machine.travel(time.time() + 31 * 60):
        assert panel.get("/", allow_redirects=False).status_code == 303


def test_a_session_expires_after_its_absolute_lifetime_even_when_used(app: App) -> None:
    import time_machine

    panel = app.admin()
    start = time.time()
    # Used every 25 minutes (the idle limit is 30), for 12 hours.
    for minutes in range(25, 12 * 60, 25):
        with time_machine.travel(start + minutes * 60):
            assert panel.get("/tokens", allow_redirects=False).status_code == 200
    with time_machine.travel(start + 12 * 3600 + 60):
        assert panel.get("/tokens", allow_redirects=False).status_code == 303


def test_login_is_throttled_per_account_with_retry_after(app: App) -> None:
    panel = app.session()
    for _ in range(3):
        assert panel.login(ADMIN_EMAIL, "wrong password").status_code == 401
    response = panel.login(ADMIN_EMAIL, ADMIN_PASSWORD)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) > 0
    api = requests.post(
        app.base_url + "/api/v1/tokens",
        json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD, "name": "t"},
        timeout=10,
    )
    assert api.status_code == 429
    assert api.headers["Content-Type"] == "application/problem+json"
    assert int(api.headers["Retry-After"]) > 0


def test_login_is_throttled_per_address_across_accounts(app: App) -> None:
    app.config["LOGIN_MAX_FAILURES_PER_ADDRESS"] = 4
    store = next(e for e in app.web.extensions if type(e).__name__ == "EdgeStore")
    object.__setattr__(store.state.settings, "max_failures_per_address", 4)
    panel = app.session()
    for index in range(4):
        assert (
            panel.login(f"nobody{index}@example.com", "wrong password").status_code
            == 401
        )
    assert panel.login(ADMIN_EMAIL, ADMIN_PASSWORD).status_code == 429


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example",
        "javascript:alert(1)",
    ],
)
def test_login_never_redirects_off_site(app: App, target: str) -> None:
    response = app.session().login(ADMIN_EMAIL, ADMIN_PASSWORD, next_url=target)
    assert response.status_code == 303
    assert response.headers["Location"] == "/"


def test_login_redirects_to_the_page_asked_for(app: App) -> None:
    response = app.session().login(
        ADMIN_EMAIL, ADMIN_PASSWORD, next_url="/users?page=1"
    )
    assert response.headers["Location"] == "/users?page=1"


def test_every_response_carries_the_security_headers(app: App) -> None:
    panel = app.admin()
    for response in (
        panel.get("/"),
        panel.get("/static/app.js"),
        panel.get("/no-such-page"),
        app.api().get("/api/v1/users"),
    ):
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"


def test_pages_have_no_inline_scripts(app: App) -> None:
    panel = app.admin()
    for path in (
        "/",
        "/conversions",
        "/users",
        "/schedules",
        "/system",
        "/tokens",
        "/docs",
    ):
        html = panel.get(path).text
        for chunk in html.split("<script")[1:]:
            head = chunk.split(">", 1)[0]
            assert "src=" in head or 'type="application/json"' in head, (path, head)
        assert "onclick=" not in html and "javascript:" not in html


def test_user_supplied_strings_are_escaped(app: App) -> None:
    evil = '<script>alert("x")</script>'
    api = app.api(app.token())
    api.post(
        "/api/v1/users",
        json={
            "email": "evil@example.com",
            "password": "password1",
            "display_name": evil,
        },
    )
    html = app.admin().get("/users").text
    assert evil not in html
    assert "&lt;script&gt;" in html


# -- websockets ------------------------------------------------------------------------


def ws_url(app: App) -> str:
    return app.base_url.replace("http://", "ws://") + "/ws"


def ws_connect(app: App, cookies: dict[str, str]) -> Any:
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
    ws = websocket_client.create_connection(ws_url(app), cookie=cookie, timeout=10)
    assert json.loads(ws.recv())["event"] == "connected"
    return ws


def ws_call(ws: Any, method: str, **data: Any) -> dict[str, Any]:
    ws.send(json.dumps({"method": method, "data": data, "correlation_id": 1}))
    while True:
        frame = json.loads(ws.recv())
        if frame["type"] == "result":
            return frame


def test_a_websocket_without_a_session_is_refused(app: App) -> None:
    with pytest.raises(websocket_client.WebSocketBadStatusException) as refused:
        websocket_client.create_connection(ws_url(app), timeout=10)
    assert refused.value.status_code == 401


def test_websocket_subscriptions_are_authorized_on_subscribe(app: App) -> None:
    member = app.create_member()
    admin_api = app.api(app.token())
    upload = admin_api.post("/api/v1/files?name=a.csv", data=b"a,b\n1,2\n")
    job = admin_api.post(
        "/api/v1/conversions",
        json={"file_id": upload.json()["id"], "target_format": "parquet"},
    ).json()
    panel = app.session()
    panel.login("member@example.com", "member password")
    ws = ws_connect(app, dict(panel.cookies))
    try:
        refused = ws_call(ws, "subscribe", channel=f"job:{job['id']}")
        assert refused["success"] is False
        assert refused["error"]["exc_type"] == "NotFound"
        missing = ws_call(ws, "subscribe", channel=f"job:{SAMPLE_ID}")
        assert missing["error"]["exc_type"] == "NotFound"  # as for someone else's
        assert ws_call(ws, "subscribe", channel="schedules")["success"] is False
        mine = ws_call(ws, "subscribe", channel="jobs")
        assert mine == {**mine, "success": True, "data": f"jobs.user.{member['id']}"}
    finally:
        ws.close()


def test_refuses_to_start_in_production_with_the_development_secret(
    container_factory: Any, web_settings: dict[str, Any]
) -> None:
    from services.web.dependencies import DEVELOPMENT_SECRET_KEY

    config = {
        **web_settings,
        "SECRET_KEY": DEVELOPMENT_SECRET_KEY,
        "ENVIRONMENT": "production",
    }
    container = container_factory(WebService, config)
    with pytest.raises(ConfigurationError, match="SECRET_KEY"):
        container.start()


def ws_closed(ws: Any) -> bool:
    """Whether the server closes the socket (frames before the close are skipped)."""
    try:
        while True:
            if not ws.recv():
                return True
    except websocket_client.WebSocketConnectionClosedException:
        return True


def test_a_users_sockets_close_when_their_rights_change(app: App) -> None:
    member = app.create_member()
    panel = app.session()
    panel.login("member@example.com", "member password")
    ws = ws_connect(app, dict(panel.cookies))
    try:
        assert ws_call(ws, "subscribe", channel="jobs")["success"]
        admin = app.api(app.token())
        assert (
            admin.patch(
                f"/api/v1/users/{member['id']}", json={"role": "admin"}
            ).status_code
            == 200
        )
        assert ws_closed(ws)
    finally:
        ws.close()
    # Reconnected, the socket is authorized with the new rights.
    ws = ws_connect(app, dict(panel.cookies))
    try:
        assert ws_call(ws, "subscribe", channel="jobs")["data"] == "jobs.all"
    finally:
        ws.close()


def test_logging_out_closes_the_sessions_sockets(app: App) -> None:
    panel = app.admin()
    ws = ws_connect(app, dict(panel.cookies))
    try:
        assert ws_call(ws, "subscribe", channel="schedules")["success"]
        assert panel.submit("/logout").status_code == 303
        assert ws_closed(ws)
    finally:
        ws.close()


def test_throttling_forgets_windows_long_over(app: App) -> None:
    import time_machine

    store = next(e for e in app.web.extensions if type(e).__name__ == "EdgeStore")
    panel = app.session()
    panel.login("first@example.com", "wrong password")
    with time_machine.travel(time.time() + 3 * 3600):
        panel.login("second@example.com", "wrong password")
    with store.engine.connect() as connection:
        keys = [
            row[0]
            for row in connection.exec_driver_sql("SELECT key FROM web_login_throttle")
        ]
    assert "account:first@example.com" not in keys
    assert "account:second@example.com" in keys


def test_logins_sweep_away_sessions_that_can_no_longer_be_used(app: App) -> None:
    import time_machine

    store = next(e for e in app.web.extensions if type(e).__name__ == "EdgeStore")
    app.admin().submit("/logout")  # revoked
    idle = app.admin()  # left idle
    with time_machine.travel(time.time() + 3600):
        current = app.admin()
        assert current.get("/", allow_redirects=False).status_code == 200
    assert idle.get("/", allow_redirects=False).status_code == 303
    with store.engine.connect() as connection:
        (count,) = connection.exec_driver_sql("SELECT count(*) FROM web_sessions").one()
    assert count == 1


# -- the credential cache (services.web.dependencies.CredentialCache) ---------------


def edge_store(app: App) -> Any:
    return next(e for e in app.web.extensions if type(e).__name__ == "EdgeStore")


def revoke_in_the_database(app: App, table: str) -> None:
    """What another replica's revocation does: the row, not this replica's cache."""
    with edge_store(app).engine.begin() as connection:
        connection.exec_driver_sql(
            f"UPDATE {table} SET revoked_at = CURRENT_TIMESTAMP"  # noqa: S608
        )


def after_the_cache_bound(app: App) -> Any:
    import time_machine

    bound = edge_store(app).state.settings.credential_cache_seconds
    return time_machine.travel(time.time() + bound + 0.01)


def test_a_session_revoked_by_another_replica_ends_within_the_cache_bound(
    app: App,
) -> None:
    panel = app.admin()
    assert panel.get("/", allow_redirects=False).status_code == 200

    revoke_in_the_database(app, "web_sessions")

    with after_the_cache_bound(app):
        assert panel.get("/", allow_redirects=False).status_code == 303


def test_a_token_revoked_by_another_replica_ends_within_the_cache_bound(
    app: App,
) -> None:
    api = app.api(app.token())
    assert api.get("/api/v1/conversions").status_code == 200

    revoke_in_the_database(app, "web_api_tokens")

    with after_the_cache_bound(app):
        assert api.get("/api/v1/conversions").status_code == 401


def test_a_demoted_admin_loses_admin_routes_at_once(app: App) -> None:
    """The cached session and token of the demoted admin are forgotten by the
    demotion itself, not left to expire."""
    member = app.create_member()
    admin = app.api(app.token())
    assert (
        admin.patch(f"/api/v1/users/{member['id']}", json={"role": "admin"}).status_code
        == 200
    )
    panel = app.session()
    panel.login("member@example.com", "member password")
    api = app.api(app.token("member@example.com", "member password"))
    assert panel.get("/users").status_code == 200
    assert api.get("/api/v1/users").status_code == 200

    assert (
        admin.patch(
            f"/api/v1/users/{member['id']}", json={"role": "member"}
        ).status_code
        == 200
    )

    assert panel.get("/users").status_code == 403
    assert api.get("/api/v1/users").status_code == 403
