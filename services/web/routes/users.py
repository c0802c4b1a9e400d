"""Users administration (admins only): the panel's pages and the API's routes.

Deactivating, deleting a user or resetting their password ends their sessions
and tokens here at once, without waiting for the users service's event to come
back.
"""

from __future__ import annotations

from typing import Any

from werkzeug.wrappers import Request, Response

from services.users.exceptions import EmailAlreadyRegistered, InvalidUserData
from services.web.exceptions import Conflict
from services.web.http import (
    ADMIN,
    json_response,
    parse_args,
    parse_json,
    redirect,
    render,
    route,
)
from services.web.schemas import (
    PasswordReset,
    UserChanges,
    UserCreate,
    UserOut,
    UserPage,
    UserQuery,
)

ROLES = ("member", "admin")


class UserRoutes:
    store: Any
    users: Any

    def _not_self(self, principal: Any, user_id: int, action: str) -> None:
        if principal.user_id == user_id:
            raise Conflict(f"you cannot {action} your own account")

    def _update(
        self, principal: Any, user_id: int, changes: dict[str, Any]
    ) -> dict[str, Any]:
        if changes.get("is_active") is False:
            self._not_self(principal, user_id, "deactivate")
        if "role" in changes and changes["role"] != "admin":
            self._not_self(principal, user_id, "demote")
        user = self.users.update_user(user_id, **changes)
        if not user["is_active"]:
            self.store.revoke_user_sessions(user_id)
            self.store.revoke_user_tokens(user_id)
        self.store.user_changed(user)
        return user

    def _delete(self, principal: Any, user_id: int) -> None:
        self._not_self(principal, user_id, "delete")
        self.users.delete_user(user_id)
        self.store.forget_user(user_id)

    def _reset_password(
        self, principal: Any, user_id: int, password: str
    ) -> dict[str, Any]:
        # An admin's own password is changed knowing the old one; a reset here
        # would let a borrowed session lock the real admin out.
        self._not_self(principal, user_id, "reset the password of")
        try:
            user = self.users.reset_password(user_id, password)
        except InvalidUserData as exc:
            # The users service names the argument; the form and the API call
            # the field "password".
            errors = {
                ("password" if field == "new_password" else field): reason
                for field, reason in exc.errors.items()
            }
            raise InvalidUserData(exc.message, errors) from None
        self.store.revoke_user_sessions(user_id)
        self.store.revoke_user_tokens(user_id)
        self.store.user_changed(user)
        return user

    # -- the panel ---------------------------------------------------------------------

    @route("GET", "/users", access=ADMIN)
    def users_page(self, request: Request) -> Response:
        query = parse_args(request, UserQuery)
        page = self.users.list_users(
            page=query.page, per_page=query.per_page, text=query.text
        )
        return render(request, "users.html", users=page, query=query)

    @route("GET", "/users/new", access=ADMIN)
    def new_user_page(self, request: Request) -> Response:
        return render(
            request, "user_form.html", user=None, form={}, errors={}, roles=ROLES
        )

    @route("POST", "/users", access=ADMIN)
    def create_user_page(self, request: Request) -> Response:
        form = request.form
        try:
            user = self.users.create_user(
                form.get("email", ""),
                form.get("password", ""),
                form.get("display_name", ""),
                role=form.get("role", "member"),
            )
        except InvalidUserData as exc:
            return render(
                request,
                "user_form.html",
                status=422,
                user=None,
                form=form,
                errors=exc.errors,
                roles=ROLES,
            )
        except EmailAlreadyRegistered:
            return render(
                request,
                "user_form.html",
                status=409,
                user=None,
                form=form,
                errors={"email": "is already registered"},
                roles=ROLES,
            )
        return redirect(f"/users/{user['id']}")

    @route("GET", "/users/<int:user_id>", access=ADMIN)
    def user_page(self, request: Request, user_id: int) -> Response:
        user = self.users.get_user(user_id)
        return render(
            request,
            "user_form.html",
            user=user,
            form=user,
            errors={},
            roles=ROLES,
            password_reset=request.args.get("password_reset") == "1",
        )

    @route("POST", "/users/<int:user_id>", access=ADMIN)
    def update_user_page(self, request: Request, user_id: int) -> Response:
        form = request.form
        changes = {
            "display_name": form.get("display_name", ""),
            "role": form.get("role", ""),
        }
        try:
            self._update(request.principal, user_id, changes)  # type: ignore[attr-defined]
        except InvalidUserData as exc:
            user = self.users.get_user(user_id)
            return render(
                request,
                "user_form.html",
                status=422,
                user=user,
                form=form,
                errors=exc.errors,
                roles=ROLES,
            )
        return redirect(f"/users/{user_id}")

    @route("POST", "/users/<int:user_id>/deactivate", access=ADMIN)
    def deactivate_user_page(self, request: Request, user_id: int) -> Response:
        self._update(request.principal, user_id, {"is_active": False})  # type: ignore[attr-defined]
        return redirect(f"/users/{user_id}")

    @route("POST", "/users/<int:user_id>/activate", access=ADMIN)
    def activate_user_page(self, request: Request, user_id: int) -> Response:
        self._update(request.principal, user_id, {"is_active": True})  # type: ignore[attr-defined]
        return redirect(f"/users/{user_id}")

    @route("GET", "/users/<int:user_id>/password", access=ADMIN)
    def reset_password_page(self, request: Request, user_id: int) -> Response:
        user = self.users.get_user(user_id)
        return render(request, "user_password.html", user=user, errors={})

    @route("POST", "/users/<int:user_id>/password", access=ADMIN)
    def reset_password_submit(self, request: Request, user_id: int) -> Response:
        form = request.form
        password = form.get("password", "")
        errors: dict[str, str] = {}
        if password != form.get("confirmation", ""):
            errors = {"confirmation": "does not match the new password"}
        else:
            try:
                self._reset_password(request.principal, user_id, password)  # type: ignore[attr-defined]
            except InvalidUserData as exc:
                errors = exc.errors
        if errors:
            user = self.users.get_user(user_id)
            return render(
                request, "user_password.html", status=422, user=user, errors=errors
            )
        return redirect(f"/users/{user_id}?password_reset=1")

    @route("GET", "/users/<int:user_id>/delete", access=ADMIN)
    def confirm_delete_user_page(self, request: Request, user_id: int) -> Response:
        user = self.users.get_user(user_id)
        return render(
            request,
            "confirm.html",
            title=f"Delete {user['display_name']}?",
            message=f"This deletes the account {user['email']} for good.",
            action=f"/users/{user_id}/delete",
            back=f"/users/{user_id}",
            button="Delete user",
        )

    @route("POST", "/users/<int:user_id>/delete", access=ADMIN)
    def delete_user_page(self, request: Request, user_id: int) -> Response:
        self._delete(request.principal, user_id)  # type: ignore[attr-defined]
        return redirect("/users")

    # -- the API -----------------------------------------------------------------------

    @route(
        "GET",
        "/api/v1/users",
        access=ADMIN,
        summary="Users, oldest first, optionally searched",
        query=UserQuery,
        response=UserPage,
        tag="users",
    )
    def api_list_users(self, request: Request) -> Response:
        query = parse_args(request, UserQuery)
        return json_response(
            self.users.list_users(
                page=query.page, per_page=query.per_page, text=query.text
            )
        )

    @route(
        "POST",
        "/api/v1/users",
        access=ADMIN,
        summary="Create a user",
        body=UserCreate,
        response=UserOut,
        status=201,
        tag="users",
    )
    def api_create_user(self, request: Request) -> Response:
        data = parse_json(request, UserCreate)
        user = self.users.create_user(
            data.email, data.password, data.display_name, role=data.role
        )
        return json_response(
            user, status=201, headers={"Location": f"/api/v1/users/{user['id']}"}
        )

    @route(
        "GET",
        "/api/v1/users/<int:user_id>",
        access=ADMIN,
        summary="One user",
        response=UserOut,
        tag="users",
    )
    def api_get_user(self, request: Request, user_id: int) -> Response:
        return json_response(self.users.get_user(user_id))

    @route(
        "PATCH",
        "/api/v1/users/<int:user_id>",
        access=ADMIN,
        summary="Change a user's email, name, role or active flag",
        body=UserChanges,
        response=UserOut,
        tag="users",
    )
    def api_update_user(self, request: Request, user_id: int) -> Response:
        data = parse_json(request, UserChanges)
        changes = data.model_dump(exclude_unset=True)
        none = [field for field, value in changes.items() if value is None]
        if none:
            raise InvalidUserData(
                "invalid changes", {field: "must not be null" for field in none}
            )
        return json_response(self._update(request.principal, user_id, changes))  # type: ignore[attr-defined]

    @route(
        "POST",
        "/api/v1/users/<int:user_id>/password",
        access=ADMIN,
        summary="Reset a user's password (ends their sessions and tokens)",
        body=PasswordReset,
        response=UserOut,
        tag="users",
    )
    def api_reset_password(self, request: Request, user_id: int) -> Response:
        data = parse_json(request, PasswordReset)
        return json_response(
            self._reset_password(request.principal, user_id, data.password)  # type: ignore[attr-defined]
        )

    @route(
        "DELETE",
        "/api/v1/users/<int:user_id>",
        access=ADMIN,
        summary="Delete a user",
        status=204,
        tag="users",
    )
    def api_delete_user(self, request: Request, user_id: int) -> Response:
        self._delete(request.principal, user_id)  # type: ignore[attr-defined]
        return Response(status=204)
