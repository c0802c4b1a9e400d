"""The users service: accounts, roles and password authentication.

Events go through the framework's transactional outbox: each is written in the
transaction of the change it announces and published once that commits, so a
listener never hears of a change that was rolled back, nor misses one because
the process died or the broker was down right after the commit.
"""

from __future__ import annotations

import logging
from typing import Any

from framework.lifecycle import on_start
from framework.outbox import OutboxDispatcher
from framework.rpc import rpc
from framework.settings import ProductionSecrets
from services.users.dependencies import (
    DEVELOPMENT_SECRETS,
    AdminSettings,
    PasswordHasher,
    UserStore,
    transactional,
)
from services.users.exceptions import (
    AuthenticationFailed,
    EmailAlreadyRegistered,
    InvalidUserData,
    UserNotFound,
)
from services.users.models import Base, User
from services.users.schemas import (
    DEFAULT_PER_PAGE,
    ROLE_ADMIN,
    ROLE_MEMBER,
    USER_CREATED,
    USER_DELETED,
    USER_UPDATED,
    UserPage,
    UserPayload,
    dump_page,
    dump_user,
    parse_changes,
    parse_new_user,
    parse_password,
    parse_query,
    reject_malformed_text,
)

log = logging.getLogger(__name__)

# One message for every way a login can fail, so it does not reveal which emails
# have accounts or which accounts are deactivated.
AUTHENTICATION_FAILED = "invalid email or password"


def user_of_event(event_type: str, event_data: dict[str, Any]) -> int:
    """The aggregate an event belongs to: every event carries its user."""
    return event_data["user"]["id"]


class UsersService:
    name = "users"

    # Each provider is typed with what it injects (``DependencyProvider[T]``), so
    # the methods below see ``self.users`` as a ``UserRepository``.
    users = UserStore(Base)
    passwords = PasswordHasher()
    first_admin = AdminSettings()
    # Each user's events are published in the order they happened.
    dispatch = OutboxDispatcher(aggregate=user_of_event)
    # Refuses to start in production with a development default secret.
    production_secrets = ProductionSecrets(DEVELOPMENT_SECRETS)

    @rpc(
        expected_exceptions=(InvalidUserData, EmailAlreadyRegistered),
        sensitive_arguments="password",
    )
    @transactional
    def create_user(
        self, email: str, password: str, display_name: str, role: str = ROLE_MEMBER
    ) -> UserPayload:
        new = parse_new_user(email, password, display_name, role)
        password_hash = self.passwords.hash(new.password)
        with self.users.transaction():
            if self.users.find_by_email(new.email) is not None:
                raise EmailAlreadyRegistered(f"{new.email} is already registered")
            user = self.users.add(
                User(
                    email=new.email,
                    display_name=new.display_name,
                    role=new.role,
                    is_active=True,
                    password_hash=password_hash,
                )
            )
            payload = dump_user(user)
            self.dispatch(USER_CREATED, {"user": payload})
        return payload

    @rpc(expected_exceptions=(UserNotFound, InvalidUserData))
    def get_user(self, user_id: int) -> UserPayload:
        return dump_user(self.users.get(user_id))

    @rpc(expected_exceptions=(UserNotFound, InvalidUserData))
    def get_user_by_email(self, email: str) -> UserPayload:
        reject_malformed_text(email=email)
        user = self.users.find_by_email(email)
        if user is None:
            raise UserNotFound(f"no user with email {email}")
        return dump_user(user)

    @rpc(expected_exceptions=InvalidUserData)
    def list_users(
        self,
        page: int = 1,
        per_page: int = DEFAULT_PER_PAGE,
        text: str | None = None,
        role: str | None = None,
    ) -> UserPage:
        query = parse_query(page, per_page, text, role)
        users, total = self.users.search(query)
        return dump_page(users, total, query)

    @rpc(expected_exceptions=(UserNotFound, InvalidUserData, EmailAlreadyRegistered))
    @transactional
    def update_user(self, user_id: int, **changes: object) -> UserPayload:
        wanted = parse_changes(changes)
        with self.users.transaction():
            user = self.users.get(user_id)
            if "email" in wanted:
                owner = self.users.find_by_email(wanted["email"])
                if owner is not None and owner.id != user.id:
                    raise EmailAlreadyRegistered(
                        f"{wanted['email']} is already registered"
                    )
            changed = sorted(
                field
                for field, value in wanted.items()
                if getattr(user, field) != value
            )
            if not changed:
                return dump_user(user)
            for field in changed:
                setattr(user, field, wanted[field])
            self.users.flush()
            payload = dump_user(user)
            self.dispatch(USER_UPDATED, {"user": payload, "changed": changed})
        return payload

    @rpc(expected_exceptions=(UserNotFound, InvalidUserData))
    def deactivate_user(self, user_id: int) -> UserPayload:
        return self.update_user(user_id, is_active=False)

    @rpc(expected_exceptions=(UserNotFound, InvalidUserData))
    @transactional
    def delete_user(self, user_id: int) -> None:
        with self.users.transaction():
            user = self.users.get(user_id)
            payload = dump_user(user)
            self.users.delete(user)
            self.dispatch(USER_DELETED, {"user": payload})

    @rpc(
        expected_exceptions=(AuthenticationFailed, InvalidUserData),
        sensitive_arguments="password",
    )
    @transactional
    def authenticate(self, email: str, password: str) -> UserPayload:
        reject_malformed_text(email=email, password=password)
        with self.users.transaction():
            user = self.users.find_by_email(email)
            if user is None:
                # Costs what a wrong password costs, whatever the hashing
                # parameters' history (see Passwords.stand_in_hash).
                stand_in = self.passwords.stand_in_hash(
                    self.users.usual_hash_parameters
                )
                self.passwords.verify(stand_in, password)
                raise AuthenticationFailed(AUTHENTICATION_FAILED)
            if not self.passwords.verify(user.password_hash, password):
                raise AuthenticationFailed(AUTHENTICATION_FAILED)
            if not user.is_active:
                raise AuthenticationFailed(AUTHENTICATION_FAILED)
            if self.passwords.needs_rehash(user.password_hash):
                user.password_hash = self.passwords.hash(password)
            return dump_user(user)

    @rpc(
        expected_exceptions=(UserNotFound, InvalidUserData, AuthenticationFailed),
        sensitive_arguments=("old_password", "new_password"),
    )
    @transactional
    def change_password(
        self, user_id: int, old_password: str, new_password: str
    ) -> UserPayload:
        reject_malformed_text(old_password=old_password)
        new_password = parse_password(new_password, field="new_password")
        with self.users.transaction():
            user = self.users.get(user_id)
            if not user.is_active or not self.passwords.verify(
                user.password_hash, old_password
            ):
                raise AuthenticationFailed(AUTHENTICATION_FAILED)
            user.password_hash = self.passwords.hash(new_password)
            self.users.flush()
            payload = dump_user(user)
            self.dispatch(USER_UPDATED, {"user": payload, "changed": ["password"]})
        return payload

    @rpc(
        expected_exceptions=(UserNotFound, InvalidUserData),
        sensitive_arguments="new_password",
    )
    @transactional
    def reset_password(self, user_id: int, new_password: str) -> UserPayload:
        """An admin sets someone's password without knowing the old one.

        Authorization is the caller's (the web service lets only admins here).
        A deactivated account may be reset too, so that an admin can hand it a
        fresh password before activating it again. The event says ``reset`` so
        that listeners end everything the old password opened, API tokens
        included: a reset usually means the old password is not to be trusted.
        """
        new_password = parse_password(new_password, field="new_password")
        # Hashed before the transaction opens, so the row is not held for it.
        password_hash = self.passwords.hash(new_password)
        with self.users.transaction():
            user = self.users.get(user_id)
            user.password_hash = password_hash
            self.users.flush()
            payload = dump_user(user)
            self.dispatch(
                USER_UPDATED, {"user": payload, "changed": ["password"], "reset": True}
            )
        log.info(
            "password reset",
            extra={"service": self.name, "user_id": payload["id"]},
        )
        return payload

    @on_start
    def create_first_admin(self) -> None:
        """Without an active admin, create the one configured in ``ADMIN_EMAIL``.

        Replicas starting together race to create it; the unique email index lets
        exactly one win, and the others find the email taken. An existing member
        with that email is not promoted behind anyone's back.
        """
        if self.users.active_admin_exists():
            return
        admin = self.first_admin
        if admin is None:
            log.warning(
                "no active admin account, and none configured",
                extra={"service": self.name},
            )
            return
        try:
            self.create_user(
                admin.email, admin.password, admin.display_name, role=ROLE_ADMIN
            )
        except EmailAlreadyRegistered:
            if self.users.active_admin_exists():
                log.info(
                    "another instance created the first admin account",
                    extra={"service": self.name, "email": admin.email},
                )
            else:
                log.warning(
                    "the first admin's email belongs to an account that is not an "
                    "active admin; not promoting it",
                    extra={"service": self.name, "email": admin.email},
                )
        else:
            log.info(
                "created the first admin account",
                extra={"service": self.name, "email": admin.email},
            )
