"""Logging in and out, and personal API tokens (the panel's and the API's)."""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import Any

from werkzeug.wrappers import Request, Response

from services.users.exceptions import AuthenticationFailed
from services.web.exceptions import CsrfFailed, NotFound, TooManyAttempts, Unprocessable
from services.web.http import (
    CSRF_FIELD,
    MEMBER,
    PUBLIC,
    SESSION_COOKIE,
    json_response,
    parse_json,
    redirect,
    render,
    route,
    safe_next,
)
from services.web.schemas import TOKEN_NAME_MAX_LENGTH, TokenCreated, TokenRequest

log = logging.getLogger(__name__)

# Before there is a session, the login form is protected by a double-submit
# token: a random value in a cookie only this site can set, repeated in the form.
LOGIN_CSRF_COOKIE = "web_login_csrf"


def cookie_secure(request: Request, setting: str) -> bool:
    if setting in ("true", "1", "yes"):
        return True
    if setting in ("false", "0", "no"):
        return False
    return request.scheme == "https"


class AuthRoutes:
    store: Any
    users: Any
    hub: Any

    def _authenticate(
        self, request: Request, email: str, password: str
    ) -> dict[str, Any]:
        """The user, or ``AuthenticationFailed``; ``TooManyAttempts`` while throttled.

        Failures count per account and per address, so neither guessing one
        account's password from many addresses nor many accounts' from one works.
        """
        account_key = "account:" + email.strip().lower()[:254]
        address_key = "address:" + (request.remote_addr or "unknown")
        retry_after = self.store.login_retry_after([account_key, address_key])
        if retry_after is not None:
            raise TooManyAttempts(retry_after)
        try:
            user = self.users.authenticate(email, password)
        except AuthenticationFailed:
            self.store.login_failed(account_key, address_key)
            log.info("login failed", extra={"address": request.remote_addr})
            raise
        self.store.login_succeeded(account_key)
        return user

    # -- the panel ---------------------------------------------------------------------

    @route("GET", "/login", access=PUBLIC)
    def login_page(self, request: Request) -> Response:
        target = safe_next(request.args.get("next"))
        if request.principal is not None:  # type: ignore[attr-defined]
            return redirect(target)
        return self._login_form(request, target)

    def _login_form(
        self,
        request: Request,
        target: str,
        error: str = "",
        status: int = 200,
        email: str = "",
    ) -> Response:
        token = secrets.token_urlsafe(32)
        response = render(
            request,
            "login.html",
            status=status,
            login_csrf=token,
            next=target,
            error=error,
            email=email,
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE,
            token,
            httponly=True,
            samesite="Strict",
            secure=cookie_secure(request, self.store.settings.cookie_secure),
            path="/login",
        )
        return response

    @route("POST", "/login", access=PUBLIC)
    def login(self, request: Request) -> Response:
        expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        given = request.form.get(CSRF_FIELD, "")
        if not expected or not hmac.compare_digest(expected.encode(), given.encode()):
            raise CsrfFailed(
                "the login form is out of date; reload the page and try again"
            )
        target = safe_next(request.form.get("next"))
        email = request.form.get("email", "")[:254]
        password = request.form.get("password", "")
        try:
            user = self._authenticate(request, email, password)
        except AuthenticationFailed:
            return self._login_form(
                request, target, "Wrong email or password.", status=401, email=email
            )
        except TooManyAttempts as exc:
            response = self._login_form(
                request,
                target,
                f"Too many failed logins. Try again in {exc.retry_after} seconds.",
                status=429,
                email=email,
            )
            response.headers["Retry-After"] = str(exc.retry_after)
            return response
        session = self.store.create_session(user)
        response = redirect(target)
        response.set_cookie(
            SESSION_COOKIE,
            session.secret,
            httponly=True,
            samesite="Lax",
            secure=cookie_secure(request, self.store.settings.cookie_secure),
            path="/",
        )
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        log.info("logged in", extra={"user_id": user["id"]})
        return response

    @route("POST", "/logout", access=MEMBER)
    def logout(self, request: Request) -> Response:
        session_id = request.principal.session_id  # type: ignore[attr-defined]
        self.store.revoke_session(session_id)
        # This replica's sockets of the session; another replica's are refused
        # at their next subscribe or reconnect.
        self.hub.close_sockets(session_id=session_id)
        response = redirect("/login")
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @route("GET", "/tokens", access=MEMBER)
    def tokens_page(self, request: Request) -> Response:
        principal = request.principal  # type: ignore[attr-defined]
        return render(
            request,
            "tokens.html",
            tokens=self.store.list_tokens(principal.user_id),
            new_token=None,
            error="",
        )

    @route("POST", "/tokens", access=MEMBER)
    def create_token_page(self, request: Request) -> Response:
        principal = request.principal  # type: ignore[attr-defined]
        name = request.form.get("name", "").strip()
        if not name or len(name) > TOKEN_NAME_MAX_LENGTH:
            return render(
                request,
                "tokens.html",
                status=422,
                tokens=self.store.list_tokens(principal.user_id),
                new_token=None,
                error=f"A token needs a name of 1 to {TOKEN_NAME_MAX_LENGTH} characters.",
            )
        user = {"id": principal.user_id, "role": principal.role}
        secret, _ = self.store.create_token(user, name)
        return render(
            request,
            "tokens.html",
            status=201,
            tokens=self.store.list_tokens(principal.user_id),
            new_token=secret,
            error="",
        )

    @route("POST", "/tokens/<int:token_id>/revoke", access=MEMBER)
    def revoke_token_page(self, request: Request, token_id: int) -> Response:
        principal = request.principal  # type: ignore[attr-defined]
        if not self.store.revoke_token(principal.user_id, token_id):
            raise NotFound("no such token")
        return redirect("/tokens")

    # -- the API -----------------------------------------------------------------------

    @route(
        "POST",
        "/api/v1/tokens",
        access=PUBLIC,
        summary="Get a personal bearer token with an email and password",
        body=TokenRequest,
        response=TokenCreated,
        status=201,
        tag="tokens",
    )
    def create_token(self, request: Request) -> Response:
        data = parse_json(request, TokenRequest)
        if not data.name.strip():
            raise Unprocessable("invalid token", {"name": "must not be blank"})
        user = self._authenticate(request, data.email, data.password)
        secret, payload = self.store.create_token(user, data.name.strip())
        return json_response({**payload, "token": secret}, status=201)
